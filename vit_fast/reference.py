"""The oracle: plain PyTorch, written from the paper (Dosovitskiy et al., arXiv 2010.11929).

Tests and benchmarks import this module; nothing here calls a vit_fast kernel, and the library
never imports it (it imports only ``vit_fast.configs``, the named configurations). The functions
compute in the dtype they are given (tests pass float64 copies for the exact answer). The model
keeps timm's module and parameter names, so timm state_dicts load into it strict.
"""
import collections
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from vit_fast.configs import CONFIGS, EVA_CONFIGS, MODEL_CLASSES  # the library's named configs (the oracle may read its data)

# ----------------------------------------------------------------------------- functions


def attention(q, k, v, scale=None):
    """softmax(q k^T * scale) v over the last two dims; q, k, v: [..., N, D]."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def attention_packed(qkv, num_heads, scale=None):
    """qkv: [B, N, 3*H*D] in timm's order -> [B, N, H*D]."""
    B, N, _ = qkv.shape
    q, k, v = qkv.reshape(B, N, 3, num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    return attention(q, k, v, scale).transpose(1, 2).reshape(B, N, -1)


def layer_norm(x, weight=None, bias=None, eps=1e-6):
    """LayerNorm over the last dim, two-pass statistics."""
    mean = x.mean(dim=-1, keepdim=True)
    var = (x - mean).pow(2).mean(dim=-1, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def add_layer_norm(x, residual, weight=None, bias=None, eps=1e-6):
    """(LayerNorm(x + residual), x + residual)."""
    s = x + residual
    return layer_norm(s, weight, bias, eps), s


def gelu(x, approximate="none"):
    if approximate == "tanh":
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))
    if approximate == "none":
        return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))
    raise ValueError(f"approximate: expected 'none' or 'tanh', got {approximate!r}")


def linear(x, weight, bias=None, residual=None):
    y = torch.matmul(x, weight.t())
    if bias is not None:
        y = y + bias
    if residual is not None:
        y = y + residual
    return y


def linear_gelu(x, weight, bias=None, approximate="none"):
    return gelu(linear(x, weight, bias), approximate)


def patch_embed(x, weight, bias=None, cls_token=None, pos_embed=None, mean=None, std=None):
    """Images [B, C, H, W] -> tokens [B, L(+1), E] by the eager pipeline the fused op replaces."""
    if x.dtype == torch.uint8:
        m = torch.as_tensor(mean, dtype=weight.dtype, device=x.device).view(1, -1, 1, 1)
        s = torch.as_tensor(std, dtype=weight.dtype, device=x.device).view(1, -1, 1, 1)
        x = (x.to(weight.dtype) / 255.0 - m) / s
    p = weight.shape[-1]
    y = F.conv2d(x, weight, bias, stride=p).flatten(2).transpose(1, 2)
    if cls_token is not None:
        y = torch.cat([cls_token.expand(y.shape[0], -1, -1), y], dim=1)
    if pos_embed is not None:
        y = y + pos_embed
    return y


# ----------------------------------------------------------------------------- model

ACT_APPROXIMATE = {"gelu": "none", "gelu_tanh": "tanh"}


class PatchEmbed(nn.Module):
    """[B, C, H, W] -> [B, L, E] by a convolution with kernel = stride = patch size."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, bias=True):
        super().__init__()
        # an image size that is no multiple of the patch: the conv drops the remainder
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim, num_heads=8, qkv_bias=False, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        assert dim % num_heads == 0, "dim must be divisible by num_heads"
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attn = torch.softmax(q @ k.transpose(-2, -1) * self.head_dim**-0.5, dim=-1)
        x = (self.attn_drop(attn) @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class QuickGELU(nn.Module):
    """CLIP's x * sigmoid(1.702 x)."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer="gelu", drop=0.0):
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = QuickGELU() if act_layer == "quick_gelu" else nn.GELU(approximate=ACT_APPROXIMATE[act_layer])
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x):
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class LayerScale(nn.Module):
    def __init__(self, dim, init_values=1e-5):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm encoder block: x + attn(norm1(x)), then + mlp(norm2(x))."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, proj_drop=0.0, attn_drop=0.0,
                 init_values=None, act_layer="gelu", norm_eps=1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class AttentionPoolLatent(nn.Module):
    """Multi-head attention pooling with one learned latent query (SigLIP's MAP head), then
    x + mlp(norm(x)) on the pooled token; timm's names (latent, q, kv, proj, norm, mlp)."""

    def __init__(self, dim, num_heads=8, mlp_ratio=4.0, act_layer="gelu", norm_eps=1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.latent = nn.Parameter(torch.randn(1, 1, dim) * dim**-0.5)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer)

    def forward(self, x):
        B, N, C = x.shape
        H = self.num_heads
        q = self.q(self.latent.expand(B, -1, -1)).reshape(B, 1, H, C // H).transpose(1, 2)  # [B, H, 1, D]
        k, v = self.kv(x).reshape(B, N, 2, H, C // H).permute(2, 0, 3, 1, 4).unbind(0)
        x = attention(q, k, v).transpose(1, 2).reshape(B, 1, C)
        x = self.proj(x)
        x = x + self.mlp(self.norm(x))
        return x[:, 0]


class VisionTransformer(nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, global_pool="token",
                 embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, qkv_bias=True, class_token=True,
                 drop_rate=0.0, attn_drop_rate=0.0, init_values=None, act_layer="gelu", fc_norm=None,
                 representation_size=None, reg_tokens=0, no_embed_class=False, pre_norm=False, final_norm=True,
                 norm_eps=1e-6):
        super().__init__()
        if global_pool not in ("token", "avg", "map"):
            raise ValueError(f"global_pool: expected 'token', 'avg' or 'map', got {global_pool!r}")
        # timm: with average pooling the final LayerNorm moves after the pool (`fc_norm`) unless fc_norm=False
        use_fc_norm = global_pool == "avg" if fc_norm is None else fc_norm
        self.global_pool = global_pool
        self.num_prefix_tokens = (1 if class_token else 0) + reg_tokens
        self.no_embed_class = no_embed_class
        # CLIP (pre_norm): a LayerNorm after the embedding and no bias in the patch projection
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, bias=not pre_norm)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.reg_token = nn.Parameter(torch.randn(1, reg_tokens, embed_dim) * 0.02) if reg_tokens else None
        pos_rows = num_patches + (0 if no_embed_class else self.num_prefix_tokens)
        self.pos_embed = nn.Parameter(torch.randn(1, pos_rows, embed_dim) * 0.02)
        self.pos_drop = nn.Dropout(drop_rate)
        self.norm_pre = nn.LayerNorm(embed_dim, eps=norm_eps) if pre_norm else nn.Identity()
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, init_values, act_layer,
                  norm_eps)
            for _ in range(depth)
        ])
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps) if final_norm and not use_fc_norm else nn.Identity()
        self.attn_pool = (AttentionPoolLatent(embed_dim, num_heads, mlp_ratio, act_layer, norm_eps)
                          if global_pool == "map" else None)
        self.fc_norm = nn.LayerNorm(embed_dim, eps=norm_eps) if final_norm and use_fc_norm else nn.Identity()
        # the original ImageNet-21k checkpoints' pre-logits layer (Dense + tanh), named as timm < 0.6 did
        self.pre_logits = nn.Identity()
        if representation_size:
            self.pre_logits = nn.Sequential(collections.OrderedDict(
                fc=nn.Linear(embed_dim, representation_size), act=nn.Tanh()))
        self.head_drop = nn.Dropout(drop_rate)
        head_in = representation_size or embed_dim
        self.head = nn.Linear(head_in, num_classes) if num_classes > 0 else nn.Identity()
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)

    def prefix_tokens(self):
        return [t for t in (self.cls_token, self.reg_token) if t is not None]

    def forward_features(self, x):
        x = self.patch_embed(x)  # [B, L, E]
        prefix = [t.expand(x.shape[0], -1, -1) for t in self.prefix_tokens()]
        if self.no_embed_class:  # the position embedding covers the patches only: add, then prepend
            x = torch.cat(prefix + [x + self.pos_embed], dim=1)
        else:  # prepend (class token [, registers]), then add
            x = torch.cat(prefix + [x], dim=1) + self.pos_embed
        x = self.norm_pre(self.pos_drop(x))
        return self.norm(self.blocks(x))

    def forward_head(self, x, pre_logits=False):
        if self.attn_pool is not None:
            x = self.attn_pool(x[:, self.num_prefix_tokens:])
        else:
            x = x[:, self.num_prefix_tokens:].mean(dim=1) if self.global_pool == "avg" else x[:, 0]
        x = self.head_drop(self.pre_logits(self.fc_norm(x)))
        return x if pre_logits else self.head(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


class VisionTransformerDistilled(VisionTransformer):
    """DeiT with distillation (Touvron et al., arXiv 2012.12877): a distillation token after the
    class token (both with position rows), a second head on it; the output is the mean of the two
    heads (the pair in training when ``distilled_training`` is set)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        E = self.pos_embed.shape[-1]
        self.num_prefix_tokens = 2
        self.dist_token = nn.Parameter(torch.randn(1, 1, E) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, self.patch_embed.num_patches + 2, E) * 0.02)
        num_classes = self.head.out_features if isinstance(self.head, nn.Linear) else 0
        self.head_dist = nn.Linear(E, num_classes) if num_classes > 0 else nn.Identity()
        self.distilled_training = False

    def prefix_tokens(self):
        return [self.cls_token, self.dist_token]

    def forward_head(self, x, pre_logits=False):
        # token 0 (class) feeds head, token 1 (distillation) feeds head_dist; the two are averaged
        # (the features for pre_logits, else the logits) unless distilled training wants both
        cls_out, dist_out = x[:, 0], x[:, 1]
        if not pre_logits:
            cls_out, dist_out = self.head(cls_out), self.head_dist(dist_out)
            if self.training and self.distilled_training:
                return cls_out, dist_out
        return 0.5 * (cls_out + dist_out)


def create_reference(name, **kwargs):
    """The reference model for a factory name, e.g. ``create_reference('vit_base_patch16_224')``."""
    if name in EVA_CONFIGS:
        config = {k: v for k, v in EVA_CONFIGS[name].items() if k not in ("pixel_mean", "pixel_std")}
        return Eva(**{**config, **kwargs})
    if name not in CONFIGS:
        raise ValueError(f"name: expected one of {sorted(CONFIGS)}, got {name!r}")
    config = {k: v for k, v in CONFIGS[name].items() if k not in ("pixel_mean", "pixel_std")}  # uint8 only
    cls = VisionTransformerDistilled if MODEL_CLASSES.get(name) == "distilled" else VisionTransformer
    return cls(**{**config, **kwargs})


# ----------------------------------------------------------------------------- EVA-02 (timm/models/eva.py)


def eva_rope(grid, head_dim, temperature=10000.0, ref_feat_shape=None):
    """EVA-02's rotary table for a grid (H, W), written out per token: token (i, j) (row-major) has the
    angles (i * ref_H / H) * f_k then (j * ref_W / W) * f_k, f_k = temperature ** (-k / (head_dim / 4)),
    each angle used by one interleaved pair of channels. Built in float32 as timm's buffer is.
    Returns [H*W, 2 * head_dim]: sin | cos (timm's RotaryEmbeddingCat layout)."""
    H, W = grid
    nb = head_dim // 4
    exponents = torch.tensor([k / nb for k in range(nb)], dtype=torch.float32)
    freqs = 1.0 / torch.pow(torch.tensor(float(temperature)), exponents)  # float32, as timm's freq_bands
    ref_h, ref_w = ref_feat_shape if ref_feat_shape is not None else (None, None)
    rows = []
    for i in range(H):
        for j in range(W):
            py, px = torch.tensor(float(i)), torch.tensor(float(j))
            if ref_feat_shape is not None:  # EVA's rescale to the pretraining grid
                py, px = py / H * ref_h, px / W * ref_w
            rows.append(torch.cat([py * freqs, px * freqs]))
    angles = torch.stack(rows).repeat_interleave(2, dim=-1)  # [N, head_dim]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def rotate_pairs(x, table):
    """x [..., N, D] rotated pair by pair: (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin)."""
    sin, cos = table.to(x.dtype).chunk(2, -1)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    s, c = sin[..., 0::2], cos[..., 0::2]
    return torch.stack([x0 * c - x1 * s, x1 * c + x0 * s], dim=-1).flatten(-2)


class EvaAttention(nn.Module):
    """timm's EvaAttention: q_bias / v_bias with a zero k bias (qkv_fused) or q/k/v projections, RoPE on
    q and k past the prefix tokens, optional inner norm before proj."""

    def __init__(self, dim, num_heads, qkv_bias=True, qkv_fused=True, num_prefix_tokens=1, scale_norm=False,
                 norm_eps=1e-6):
        super().__init__()
        self.num_heads, self.head_dim, self.num_prefix_tokens = num_heads, dim // num_heads, num_prefix_tokens
        if qkv_fused:
            self.qkv = nn.Linear(dim, dim * 3, bias=False)
            self.q_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
            self.v_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        else:
            self.qkv = None
            self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
            self.k_proj = nn.Linear(dim, dim, bias=False)
            self.v_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.norm = nn.LayerNorm(dim, eps=norm_eps) if scale_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope=None):
        B, N, C = x.shape
        if self.qkv is not None:
            y = torch.matmul(x, self.qkv.weight.t())
            if self.q_bias is not None:
                y = y + torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
            q, k, v = y.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        else:
            q, k, v = (p(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
                       for p in (self.q_proj, self.k_proj, self.v_proj))
        if rope is not None:
            P = self.num_prefix_tokens
            q = torch.cat([q[:, :, :P], rotate_pairs(q[:, :, P:], rope)], dim=2)
            k = torch.cat([k[:, :, :P], rotate_pairs(k[:, :, P:], rope)], dim=2)
        x = attention(q, k, v).transpose(1, 2).reshape(B, N, C)
        return self.proj(self.norm(x))


class SwiGLUMlp(nn.Module):
    """silu(gate) * value -> [norm] -> fc2; packed (GluMlp: fc1 = [gate; value]) or split (SwiGLU: fc1_g, fc1_x)."""

    def __init__(self, dim, hidden, packed, scale_mlp=False, norm_eps=1e-6):
        super().__init__()
        self.packed = packed
        if packed:
            self.fc1 = nn.Linear(dim, 2 * hidden)
        else:
            self.fc1_g = nn.Linear(dim, hidden)
            self.fc1_x = nn.Linear(dim, hidden)
        self.norm = nn.LayerNorm(hidden, eps=norm_eps) if scale_mlp else nn.Identity()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        if self.packed:
            g, u = self.fc1(x).chunk(2, dim=-1)
        else:
            g, u = self.fc1_g(x), self.fc1_x(x)
        h = g * torch.sigmoid(g) * u
        return self.fc2(self.norm(h))


class EvaBlock(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio, qkv_bias=True, qkv_fused=True, swiglu_mlp=True, scale_mlp=False,
                 scale_attn_inner=False, num_prefix_tokens=1, init_values=None, norm_eps=1e-6):
        super().__init__()
        assert swiglu_mlp, "the oracle covers EVA-02's SwiGLU blocks"
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = EvaAttention(dim, num_heads, qkv_bias, qkv_fused, num_prefix_tokens, scale_attn_inner, norm_eps)
        self.gamma_1 = nn.Parameter(torch.full((dim,), float(init_values))) if init_values is not None else None
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = SwiGLUMlp(dim, int(dim * mlp_ratio), packed=not scale_mlp, scale_mlp=scale_mlp, norm_eps=norm_eps)
        self.gamma_2 = nn.Parameter(torch.full((dim,), float(init_values))) if init_values is not None else None

    def forward(self, x, rope=None):
        a = self.attn(self.norm1(x), rope)
        x = x + (a if self.gamma_1 is None else self.gamma_1 * a)
        m = self.mlp(self.norm2(x))
        return x + (m if self.gamma_2 is None else self.gamma_2 * m)


class Eva(nn.Module):
    """EVA-02: patch embed, class token, position embedding, RoPE + SwiGLU blocks, mean of the patch
    tokens, fc_norm, head (timm's default 'avg' pool)."""

    def __init__(self, img_size=224, patch_size=14, in_chans=3, num_classes=1000, embed_dim=768, depth=12,
                 num_heads=12, qkv_bias=True, qkv_fused=True, mlp_ratio=4.0, swiglu_mlp=True, scale_mlp=False,
                 scale_attn_inner=False, init_values=None, use_rot_pos_emb=True, ref_feat_shape=None,
                 rope_temperature=10000.0, norm_eps=1e-6):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.randn(1, self.patch_embed.num_patches + 1, embed_dim) * 0.02)
        self.blocks = nn.ModuleList([
            EvaBlock(embed_dim, num_heads, mlp_ratio, qkv_bias, qkv_fused, swiglu_mlp, scale_mlp, scale_attn_inner,
                     1, init_values, norm_eps) for _ in range(depth)])
        self.fc_norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.use_rot_pos_emb = use_rot_pos_emb
        self.rope_args = (embed_dim // num_heads, rope_temperature, ref_feat_shape)

    def forward_features(self, x):
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        rope = eva_rope(self.patch_embed.grid_size, *self.rope_args).to(x.device) if self.use_rot_pos_emb else None
        for block in self.blocks:
            x = block(x, rope)
        return x

    def forward_head(self, x, pre_logits=False):
        x = self.fc_norm(x[:, 1:].mean(dim=1))
        return x if pre_logits else self.head(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))
