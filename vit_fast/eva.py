"""EVA-02 (timm's ``Eva``, timm/models/eva.py): RoPE + SwiGLU pre-norm blocks on the fused kernels.

    images -> patch embedding + class token + position embedding (one fused op, as the ViT's)
    -> blocks: x + attn(norm1(x), rope), x + mlp(norm2(x))
         norm1 / norm2: fused (add +) LayerNorm; attn: one qkv GEMM, then ``VF.attention_packed`` with
         rope=(sin, cos) and num_prefix_tokens=1 (the rotation inside the kernels), proj;
         mlp: ``VF.swiglu`` (silu(gate) * x in one kernel) -> norm (base / large) -> ``VF.linear``
         fc2 with the residual in its epilogue
    -> mean of the patch tokens -> fc_norm -> head

The rotary tables are timm's RotaryEmbeddingCat ('cat' rope, in_pixels=False) for the patch grid,
built once per (grid, device) and cached: not in the state_dict (timm's buffer is non-persistent),
so timm's checkpoints load strict. Unsupported timm options (post-norm blocks, register tokens, gated
attention, qk_norm, rotate_half, 'mixed' / 'dinov3' rope, MAP pooling) are not constructor
arguments here.
"""
import functools

import torch
import torch.nn as nn

from vit_fast.configs import EVA_CONFIGS
from vit_fast.model import VisionTransformer, from_config
from vit_fast.nn.attention import EvaAttention, check_tokens
from vit_fast.nn.block import DropPath, linear_input_dtype, norm_stream
from vit_fast.nn.layer_norm import LayerNorm
from vit_fast.nn.mlp import GluMlp, Mlp, SwiGLU


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def rope_tables(grid, head_dim, temperature=10000.0, ref_feat_shape=None, grid_offset=0.0, grid_indexing="ij",
                device=None):
    """timm's RotaryEmbeddingCat table (in_pixels=False, the 'cat' rope of EVA-02) for a grid (H, W):
    (sin, cos), each [H*W, head_dim] in float32, pairs interleaved (each frequency twice in a row).

    head_dim // 4 frequencies 1 / temperature ** (i / (head_dim // 4)); positions arange(s) + grid_offset
    along each axis, scaled by ref / s with a ``ref_feat_shape`` (EVA's rule for other grids); angles of
    the (row, column) pair of each token, the row's bands first."""
    if head_dim % 4:
        raise ValueError(f"head_dim: RoPE over a 2-D grid needs a multiple of 4, got {head_dim}")
    num_bands = head_dim // 4
    bands = 1.0 / (temperature ** (torch.arange(num_bands, device=device).to(torch.float32) / num_bands))
    shape = list(grid)
    ref = None if ref_feat_shape is None else list(_pair(ref_feat_shape))
    if grid_indexing == "xy":  # timm swaps the shapes for 'xy'
        shape = shape[::-1]
        ref = None if ref is None else ref[::-1]
    t = [torch.arange(s, device=device).to(torch.float32) + grid_offset for s in shape]
    if ref is not None:
        t = [x / s * r for x, s, r in zip(t, shape, ref)]
    pos = torch.stack(torch.meshgrid(t, indexing=grid_indexing), dim=-1).unsqueeze(-1) * bands  # [.., 2, nb]
    n = grid[0] * grid[1]
    sin = pos.sin().reshape(n, -1).repeat_interleave(2, -1)
    cos = pos.cos().reshape(n, -1).repeat_interleave(2, -1)
    return sin, cos


class EvaBlock(nn.Module):
    """timm's ``EvaBlock`` (pre-norm): norm1, attn (EvaAttention), gamma_1, norm2, mlp, gamma_2.

    mlp: ``swiglu_mlp`` with ``scale_mlp`` or ``swiglu_align_to`` -> SwiGLU (fc1_g / fc1_x, norm);
    ``swiglu_mlp`` alone -> GluMlp (packed fc1, SiLU, gate first); else the GELU Mlp. The residual adds
    run fused: the attention branch's inside norm2's add + LayerNorm, the MLP branch's in fc2's
    epilogue (no layer scale) or inside the next block's norm1.
    """

    def __init__(self, dim, num_heads, qkv_bias=True, qkv_fused=True, mlp_ratio=4.0, swiglu_mlp=False,
                 swiglu_align_to=0, scale_mlp=False, scale_attn_inner=False, num_prefix_tokens=1, proj_drop=0.0,
                 attn_drop=0.0, drop_path=0.0, init_values=None, act_layer="gelu", norm_layer=None,
                 attn_head_dim=None):
        super().__init__()
        norm_layer = norm_layer or functools.partial(LayerNorm, eps=1e-6)
        self.norm1 = norm_layer(dim)
        self.attn = EvaAttention(dim, num_heads, qkv_bias=qkv_bias, qkv_fused=qkv_fused,
                                 num_prefix_tokens=num_prefix_tokens, attn_drop=attn_drop, proj_drop=proj_drop,
                                 attn_head_dim=attn_head_dim, norm_layer=norm_layer, scale_norm=scale_attn_inner)
        self.gamma_1 = nn.Parameter(torch.full((dim,), float(init_values))) if init_values is not None else None
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        hidden = int(dim * mlp_ratio)
        if swiglu_mlp:
            if scale_mlp or swiglu_align_to:
                self.mlp = SwiGLU(dim, hidden, norm_layer=norm_layer if scale_mlp else None, drop=proj_drop,
                                  align_to=swiglu_align_to)
            else:
                self.mlp = GluMlp(dim, hidden * 2, norm_layer=None, act_layer=nn.SiLU, gate_last=False,
                                  drop=proj_drop)
        else:
            self.mlp = Mlp(dim, hidden, act_layer=act_layer, norm_layer=norm_layer if scale_mlp else None,
                           drop=proj_drop)
        self.gamma_2 = nn.Parameter(torch.full((dim,), float(init_values))) if init_values is not None else None
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def _fc2_adds_residual(self):
        if self.gamma_2 is not None:
            return False
        return not self.training or (self.mlp.drop2.p == 0.0 and isinstance(self.drop_path2, nn.Identity))

    def forward_fused(self, x, delta=None, rope=None, attn_mask=None):
        """The block on the residual stream x + delta ([B, N, C]) -> (x, delta) the same way (see
        vit_fast.nn.block). ``rope``: (sin, cos) [N - prefix, head_dim] each, or None."""
        check_tokens("EvaBlock", x, self.norm1.normalized_shape[0])
        to_linear = linear_input_dtype(x)
        h, x = norm_stream(self.norm1, x, delta, to_linear)
        branch = self.attn(h, rope=rope, attn_mask=attn_mask)
        if self.gamma_1 is not None:
            branch = self.gamma_1 * branch
        h, x = norm_stream(self.norm2, x, self.drop_path1(branch), to_linear)
        if self._fc2_adds_residual():
            return self.mlp.forward_fused(h, residual=x), None
        branch = self.mlp(h)
        if self.gamma_2 is not None:
            branch = self.gamma_2 * branch
        return x, self.drop_path2(branch)

    @classmethod
    def from_parts(cls, norm1, attn, norm2, mlp, gamma_1=None, gamma_2=None, drop_path1=None, drop_path2=None):
        """An EvaBlock around existing modules and layer-scale parameters (``vit_fast.convert``)."""
        block = cls.__new__(cls)
        nn.Module.__init__(block)
        block.norm1, block.attn = norm1, attn
        block.gamma_1, block.drop_path1 = gamma_1, drop_path1 or nn.Identity()
        block.norm2, block.mlp = norm2, mlp
        block.gamma_2, block.drop_path2 = gamma_2, drop_path2 or nn.Identity()
        return block

    def forward(self, x, rope=None, attn_mask=None, is_causal=False):
        """timm's ``EvaBlock.forward(x, rope=None, attn_mask=None, is_causal=False)``: [B, N, C] -> [B, N, C];
        ``rope``: timm's [N - prefix, 2 * head_dim] table (sin | cos) or a (sin, cos) pair."""
        if is_causal:
            raise NotImplementedError("is_causal: the fused attention kernels have no causal mask (pass False)")
        if isinstance(rope, torch.Tensor):
            rope = rope.chunk(2, -1)
        x, delta = self.forward_fused(x, rope=rope, attn_mask=attn_mask)
        return x if delta is None else x + delta


class Eva(VisionTransformer):
    """timm's ``Eva`` for the EVA-02 configs: the ViT's patch embedding, class token, position
    embedding, fc_norm and head (timm's names and state_dict order: ``cls_token``, ``pos_embed``,
    ``patch_embed.proj.*``, ``blocks.i.*``, ``fc_norm.*`` with 'avg' pooling else ``norm.*``, ``head.*``)
    around ``EvaBlock``s, with RoPE tables for the patch grid (``use_rot_pos_emb``)."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, global_pool="avg", embed_dim=768,
                 depth=12, num_heads=12, qkv_bias=True, qkv_fused=True, mlp_ratio=4.0, swiglu_mlp=False,
                 swiglu_align_to=0, scale_mlp=False, scale_attn_inner=False, drop_rate=0.0, pos_drop_rate=0.0,
                 proj_drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0, init_values=None, class_token=True,
                 use_abs_pos_emb=True, use_rot_pos_emb=False, rope_type="cat", rope_grid_offset=0.0,
                 rope_grid_indexing="ij", rope_temperature=10000.0, use_fc_norm=None, dynamic_img_size=False,
                 ref_feat_shape=None, pixel_mean=None, pixel_std=None, norm_eps=1e-6, act_layer="gelu"):
        if global_pool not in ("avg", "token"):
            raise ValueError(f"global_pool: vit_fast's Eva supports 'avg' and 'token', got {global_pool!r}")
        if not use_abs_pos_emb:
            raise ValueError("use_abs_pos_emb: vit_fast's Eva always has the learned position embedding (True)")
        if use_rot_pos_emb and rope_type != "cat":
            raise ValueError(f"rope_type: only timm's 'cat' rope (EVA-02) is supported, got {rope_type!r}")
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
                         global_pool=global_pool, embed_dim=embed_dim, depth=0, num_heads=num_heads,
                         class_token=class_token, dynamic_img_size=dynamic_img_size, fc_norm=use_fc_norm,
                         pixel_mean=pixel_mean, pixel_std=pixel_std, norm_eps=norm_eps)
        self.pos_drop = nn.Dropout(pos_drop_rate)
        self.head_drop = nn.Dropout(drop_rate)
        norm_layer = functools.partial(LayerNorm, eps=norm_eps)
        self.blocks = nn.Sequential(*[  # replaces the empty Sequential in place: state_dict order kept
            EvaBlock(embed_dim, num_heads, qkv_bias=qkv_bias, qkv_fused=qkv_fused, mlp_ratio=mlp_ratio,
                     swiglu_mlp=swiglu_mlp, swiglu_align_to=swiglu_align_to, scale_mlp=scale_mlp,
                     scale_attn_inner=scale_attn_inner, num_prefix_tokens=self.num_prefix_tokens,
                     proj_drop=proj_drop_rate, attn_drop=attn_drop_rate,
                     drop_path=drop_path_rate * i / max(depth - 1, 1), init_values=init_values,
                     act_layer=act_layer, norm_layer=norm_layer)
            for i in range(depth)])
        self.use_rot_pos_emb = use_rot_pos_emb
        self.head_dim = embed_dim // num_heads
        self.rope_args = dict(temperature=rope_temperature, ref_feat_shape=ref_feat_shape,
                              grid_offset=rope_grid_offset, grid_indexing=rope_grid_indexing)
        self._rope_cache = {}
        self._init_weights()

    def rope(self, grid, device):
        """(sin, cos) [H*W, head_dim] float32 for a patch grid, cached per (grid, device)."""
        key = (tuple(grid), str(device))
        if key not in self._rope_cache:
            self._rope_cache[key] = rope_tables(grid, self.head_dim, device=device, **self.rope_args)
        return self._rope_cache[key]

    def _forward_stream(self, x, attn_mask, rows=None):
        images = x
        x = self._tokens(images)  # checks the images first
        p = self.patch_embed.patch_size[0]
        grid = (images.shape[-2] // p, images.shape[-1] // p)
        rope = None
        if self.use_rot_pos_emb:
            sin, cos = self.rope(grid, x.device)
            if x.dtype == torch.float64:  # the PyTorch path in float64: timm's float32 table, cast
                sin, cos = sin.double(), cos.double()
            rope = (sin, cos)
        delta = None
        checkpointed = self.grad_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            if checkpointed:
                x, delta = torch.utils.checkpoint.checkpoint(block.forward_fused, x, delta, rope, attn_mask,
                                                             use_reentrant=False)
            else:
                x, delta = block.forward_fused(x, delta, rope=rope, attn_mask=attn_mask)
        if rows is not None and x.shape[1] > rows:
            x, delta = x[:, :rows], (None if delta is None else delta[:, :rows])
        return x, delta


def eva02_tiny_patch14_224(num_classes=1000, **kwargs):
    """EVA-02 Ti/14, 224x224 (embed 192, depth 12, 3 heads, packed SwiGLU, RoPE), as timm's eva02_tiny_patch14_224."""
    return from_config(Eva, EVA_CONFIGS["eva02_tiny_patch14_224"], num_classes, kwargs)


def eva02_small_patch14_224(num_classes=1000, **kwargs):
    """EVA-02 S/14, 224x224 (embed 384, depth 12, 6 heads, packed SwiGLU, RoPE), as timm's."""
    return from_config(Eva, EVA_CONFIGS["eva02_small_patch14_224"], num_classes, kwargs)


def eva02_base_patch14_224(num_classes=1000, **kwargs):
    """EVA-02 B/14, 224x224 (embed 768, depth 12, 12 heads, q/k/v projections, SwiGLU with norm, RoPE), as timm's."""
    return from_config(Eva, EVA_CONFIGS["eva02_base_patch14_224"], num_classes, kwargs)


def eva02_large_patch14_224(num_classes=1000, **kwargs):
    """EVA-02 L/14, 224x224 (embed 1024, depth 24, 16 heads, q/k/v projections, SwiGLU with norm, RoPE), as timm's."""
    return from_config(Eva, EVA_CONFIGS["eva02_large_patch14_224"], num_classes, kwargs)


EVA_MODELS = {f.__name__: f for f in (eva02_tiny_patch14_224, eva02_small_patch14_224, eva02_base_patch14_224,
                                      eva02_large_patch14_224)}

__all__ = ["Eva", "EvaBlock", "EVA_MODELS", "rope_tables", *EVA_MODELS]
