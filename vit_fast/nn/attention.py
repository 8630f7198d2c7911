"""Drop-in timm `Attention`: same constructor, attribute names and state_dict, fused attention kernels."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from vit_fast import dispatch
from vit_fast import functional as VF


def check_positive_int(name, value):
    """``value`` must be an int >= 1 (bools refused): a ValueError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")


def check_tokens(module, x, dim):
    """``x`` must be a [B, N, dim] tensor: a ValueError naming ``x`` and ``module`` otherwise."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: {module} expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3 or x.shape[-1] != dim:
        raise ValueError(f"x: {module} expected tokens [B, N, {dim}], got shape {tuple(x.shape)}")


class Attention(nn.Module):
    """Multi-head self-attention: qkv Linear -> fused attention on the packed qkv -> proj.

    state_dict: ``qkv.weight`` [3*dim, dim] (+ ``qkv.bias``), ``proj.weight`` / ``proj.bias``, and with
    ``qk_norm`` timm's ``q_norm`` / ``k_norm`` (LayerNorm over head_dim, eps 1e-6). The kernels have no
    attention dropout: ``attn_drop > 0`` raises in training mode (it is the identity in eval mode).

    ``forward(x, attn_mask=None)`` as timm's: ``attn_mask`` is what ``F.scaled_dot_product_attention``
    takes (bool, True = attend, or an additive float mask, broadcastable to [B, H, N, N]). The fused
    kernels apply no mask: a mask on the kernel path (CUDA, or CPU under ``TRITON_INTERPRET=1``)
    raises NotImplementedError naming ``attn_mask``; on the PyTorch path it is applied by
    ``F.scaled_dot_product_attention``. Never silently ignored.
    """

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_norm=False, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        check_positive_int("dim", dim)
        check_positive_int("num_heads", num_heads)
        if dim % num_heads != 0:
            raise ValueError(f"dim: {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x, attn_mask=None, query_rows=None):  # [B, N, dim] -> [B, N (or query_rows), dim]
        """timm's forward; ``query_rows`` r: only the first r tokens' outputs ([B, r, dim]): qkv on
        every token (the keys and values need them), the attention for r queries against all N
        keys (``VF.attention``, N_q = r), proj on r rows. What a model's last block needs when the
        head reads the prefix tokens only."""
        C = self.qkv.in_features
        check_tokens("Attention", x, C)
        if self.training and self.attn_drop.p > 0:
            raise NotImplementedError(
                f"attn_drop={self.attn_drop.p}: the fused attention kernels have no attention dropout; "
                "use attn_drop=0 for training (eval mode is fine)")
        B, N, _ = x.shape
        if attn_mask is not None and dispatch.use_kernels(x):
            shape = tuple(attn_mask.shape) if isinstance(attn_mask, torch.Tensor) else type(attn_mask).__name__
            raise NotImplementedError(
                f"attn_mask: the fused attention kernels apply no mask (got {shape}); pass attn_mask=None, or "
                "run on the PyTorch path (a CPU tensor without TRITON_INTERPRET=1, or VIT_FAST_FORCE_TORCH=1)")
        if query_rows is not None:
            check_positive_int("query_rows", query_rows)
            if query_rows > N:
                raise ValueError(f"query_rows: {query_rows} is more than the {N} tokens of x")
            if query_rows == N:
                query_rows = None
        qkv = self.qkv(x)  # [B, N, 3*H*D]
        if query_rows is not None:
            q, k, v = qkv.unflatten(-1, (3, self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4).unbind(0)
            q, k = self.q_norm(q[:, :, :query_rows]), self.k_norm(k)  # [B, H, r, D], [B, H, N, D]
            if attn_mask is None:
                x = VF.attention(q, k, v, self.scale)
            else:  # PyTorch path only (checked above): the mask's rows of those queries
                if attn_mask.dim() >= 2 and attn_mask.shape[-2] == N:
                    attn_mask = attn_mask[..., :query_rows, :]
                x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale)
            return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, query_rows, C)))
        if attn_mask is None and isinstance(self.q_norm, nn.Identity):
            x = VF.attention_packed(qkv, self.num_heads, self.scale)  # [B, N, H*D], no transposes
        else:
            q, k, v = qkv.unflatten(-1, (3, self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4).unbind(0)
            q, k = self.q_norm(q), self.k_norm(k)
            if attn_mask is None:
                x = VF.attention(q, k, v, self.scale)
            else:  # PyTorch path only (checked above): the mask applied as timm applies it
                x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale)
            x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


def rotate_interleaved(x, sin, cos, num_prefix_tokens):
    """timm's EVA rotation by torch ops (apply_rot_embed_cat, interleaved pairs): the first
    ``num_prefix_tokens`` tokens kept, the rest x * cos + rot(x) * sin, rot(x) = [-x1, x0, -x3, x2, ...];
    x [B, H, N, D], sin / cos [N - num_prefix_tokens, D]. Only where a mask sends the attention to SDPA."""
    head, tail = x[:, :, :num_prefix_tokens], x[:, :, num_prefix_tokens:]
    rot = torch.stack([-tail[..., 1::2], tail[..., ::2]], -1).reshape(tail.shape)
    return torch.cat([head, (tail * cos + rot * sin).to(x.dtype)], dim=2)


class EvaAttention(nn.Module):
    """timm's ``EvaAttention`` (timm/models/eva.py) with RoPE inside the fused attention kernels.

    state_dict as timm's: ``qkv_fused`` (default) -> ``q_bias``, ``v_bias`` [H*D] (with ``qkv_bias``; the
    zero k bias is a non-persistent buffer) and ``qkv.weight`` [3*H*D, dim] (no bias); else ``q_proj``
    (weight, bias), ``k_proj`` (weight only), ``v_proj`` (weight, bias). ``norm`` (``scale_norm``: a
    LayerNorm over H*D before proj), ``proj``; timm's zero ``k_bias`` buffer is not kept (a zero
    block of the concatenated bias instead). The three projections run as one GEMM on the
    concatenated weights and biases (timm's fused form), then ``VF.attention_packed(qkv, H, scale,
    rope=(sin, cos), num_prefix_tokens=...)``: q and k past the prefix tokens rotated where the
    kernels load them (forward and backward). qk_norm, gated and rotate_half are not supported.

    ``forward(x, rope=None, attn_mask=None, is_causal=False)`` (timm's call; is_causal=True raises): ``rope`` (sin, cos), each [N - num_prefix_tokens, D]
    (timm's RotaryEmbeddingCat table [N - P, 2D] passes as ``table.chunk(2, -1)``, or the [N - P, 2D]
    tensor itself). A mask runs on the PyTorch path only (SDPA after the rotation), as ``Attention``.
    """

    def __init__(self, dim, num_heads=8, qkv_bias=True, qkv_fused=True, num_prefix_tokens=1, attn_drop=0.0,
                 proj_drop=0.0, attn_head_dim=None, norm_layer=None, scale_norm=False):
        super().__init__()
        check_positive_int("dim", dim)
        check_positive_int("num_heads", num_heads)
        if scale_norm and norm_layer is None:
            raise ValueError("norm_layer: scale_norm=True needs a norm_layer, as timm's")
        self.num_heads = num_heads
        self.head_dim = attn_head_dim or dim // num_heads
        if self.head_dim < 1:
            raise ValueError(f"dim: {dim} gives no head dim with num_heads {num_heads}")
        attn_dim = self.head_dim * num_heads
        self.scale = self.head_dim**-0.5
        self.num_prefix_tokens = num_prefix_tokens
        if qkv_fused:
            self.qkv = nn.Linear(dim, attn_dim * 3, bias=False)
            self.q_proj = self.k_proj = self.v_proj = None
            if qkv_bias:
                self.q_bias = nn.Parameter(torch.zeros(attn_dim))
                self.v_bias = nn.Parameter(torch.zeros(attn_dim))  # timm's zero k_bias: made where used
            else:
                self.q_bias = self.v_bias = None
        else:
            self.q_proj = nn.Linear(dim, attn_dim, bias=qkv_bias)
            self.k_proj = nn.Linear(dim, attn_dim, bias=False)
            self.v_proj = nn.Linear(dim, attn_dim, bias=qkv_bias)
            self.qkv = None
            self.q_bias = self.v_bias = None
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(attn_dim) if scale_norm else nn.Identity()
        self.proj = nn.Linear(attn_dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _qkv_params(self):
        if self.qkv is not None:
            if self.q_bias is None:
                return self.qkv.weight, None
            k_bias = torch.zeros_like(self.q_bias)  # the zero buffer, made here in q_bias's dtype / device
            return self.qkv.weight, torch.cat((self.q_bias, k_bias, self.v_bias))
        weight = torch.cat((self.q_proj.weight, self.k_proj.weight, self.v_proj.weight))
        if self.q_proj.bias is None:
            return weight, None
        return weight, torch.cat((self.q_proj.bias, torch.zeros_like(self.q_proj.bias), self.v_proj.bias))

    def forward(self, x, rope=None, attn_mask=None, is_causal=False):  # [B, N, dim] -> [B, N, dim]
        if is_causal:
            raise NotImplementedError("is_causal: the fused attention kernels have no causal mask (pass False)")
        in_features = (self.qkv or self.q_proj).in_features
        check_tokens("EvaAttention", x, in_features)
        if self.training and self.attn_drop.p > 0:
            raise NotImplementedError(
                f"attn_drop={self.attn_drop.p}: the fused attention kernels have no attention dropout")
        if isinstance(rope, torch.Tensor):
            rope = rope.chunk(2, -1)
        B, N, _ = x.shape
        weight, bias = self._qkv_params()
        qkv = F.linear(x, weight, bias)  # [B, N, 3*H*D], timm's order
        if attn_mask is None:
            x = VF.attention_packed(qkv, self.num_heads, self.scale, rope=rope,
                                    num_prefix_tokens=self.num_prefix_tokens if rope is not None else 0)
        else:
            if dispatch.use_kernels(x):
                raise NotImplementedError(
                    "attn_mask: the fused attention kernels apply no mask; pass attn_mask=None, or run on the "
                    "PyTorch path (a CPU tensor without TRITON_INTERPRET=1, or VIT_FAST_FORCE_TORCH=1)")
            q, k, v = qkv.unflatten(-1, (3, self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4).unbind(0)
            if rope is not None:
                q = rotate_interleaved(q, *rope, self.num_prefix_tokens)
                k = rotate_interleaved(k, *rope, self.num_prefix_tokens)
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale)
            x = x.transpose(1, 2).reshape(B, N, -1)
        return self.proj_drop(self.proj(self.norm(x)))
