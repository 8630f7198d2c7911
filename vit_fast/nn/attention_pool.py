"""Drop-in timm ``AttentionPoolLatent`` (SigLIP's MAP head): learned latent queries attending over the tokens.

state_dict as timm's: ``latent`` [1, latent_len, dim], ``q.weight`` / ``q.bias`` [dim, dim],
``kv.weight`` / ``kv.bias`` [2*dim, dim], ``proj.*``, ``norm.*`` and ``mlp.fc1.*`` / ``mlp.fc2.*``.
The forward, tokens [B, N, dim] -> pooled [B, dim]:

    q = q(latent)                     one Linear on the latent (shared by the batch, not per image)
    k, v = kv(x)                      [B, H, N, D] views of one Linear's output
    o = VF.attention(q, k, v)         the fused attention, N_q = latent_len (1) queries, N keys
    x = proj(o)
    x = x + mlp(norm(x))              fused LayerNorm, fused MLP with the residual in fc2's epilogue
    pool: x[:, 0] ('token') or the mean over the latents ('avg')
"""
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from vit_fast import dispatch
from vit_fast import functional as VF
from vit_fast.nn.attention import check_positive_int, check_tokens
from vit_fast.nn.block import norm_stream
from vit_fast.nn.layer_norm import LayerNorm
from vit_fast.nn.mlp import Mlp


class AttentionPoolLatent(nn.Module):
    """timm's AttentionPoolLatent (timm.layers.attention_pool) with its defaults: embed_dim =
    in_features = out_features, a q projection, qkv bias, no position embedding, no qk norm. ``norm_layer``
    None: vit_fast's LayerNorm, eps 1e-6 (timm's LayerNorm default). ``qk_norm``, ``pos_embed`` and
    ``out_features`` other than in_features are not supported (they raise)."""

    def __init__(self, in_features, out_features=None, embed_dim=None, num_heads=8, feat_size=None, mlp_ratio=4.0,
                 qkv_bias=True, qk_norm=False, latent_len=1, latent_dim=None, pos_embed="", pool_type="token",
                 norm_layer=None, act_layer="gelu", drop=0.0):
        super().__init__()
        check_positive_int("in_features", in_features)
        check_positive_int("num_heads", num_heads)
        check_positive_int("latent_len", latent_len)
        embed_dim = embed_dim or in_features
        out_features = in_features if out_features is None else out_features
        if embed_dim != in_features or out_features != in_features or (latent_dim or embed_dim) != embed_dim:
            raise ValueError("AttentionPoolLatent: vit_fast supports embed_dim = latent_dim = out_features = "
                             f"in_features ({in_features}), as timm's ViTs build it")
        if qk_norm or pos_embed:
            raise ValueError("AttentionPoolLatent: qk_norm and pos_embed are not supported")
        if pool_type not in ("token", "avg", ""):
            raise ValueError(f"pool_type: expected 'token', 'avg' or '', got {pool_type!r}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim: {embed_dim} is not divisible by num_heads {num_heads}")
        norm_layer = norm_layer or functools.partial(LayerNorm, eps=1e-6)
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.scale = self.head_dim**-0.5
        self.pool = pool_type
        self.latent_len = latent_len
        self.latent_dim = embed_dim
        self.feat_size = feat_size
        self.pos_embed = None
        self.latent = nn.Parameter(torch.zeros(1, latent_len, embed_dim))
        self.q = nn.Linear(embed_dim, embed_dim, bias=qkv_bias)
        self.kv = nn.Linear(embed_dim, embed_dim * 2, bias=qkv_bias)
        self.q_norm = nn.Identity()
        self.k_norm = nn.Identity()
        self.proj = nn.Linear(embed_dim, out_features)
        self.proj_drop = nn.Dropout(drop)
        self.norm = norm_layer(out_features)
        self.mlp = Mlp(out_features, int(out_features * mlp_ratio), out_features=out_features, act_layer=act_layer)
        self.out_features = out_features
        nn.init.trunc_normal_(self.latent, std=embed_dim**-0.5)

    def forward(self, x, attn_mask=None):
        """Tokens [B, N, dim] -> [B, dim] (pool_type 'token' / 'avg'), or [B, latent_len, dim] ('')."""
        C = self.kv.in_features
        check_tokens("AttentionPoolLatent", x, C)
        B, N, _ = x.shape
        if attn_mask is not None and dispatch.use_kernels(x):
            raise NotImplementedError("attn_mask: the fused attention kernels apply no mask; run on the PyTorch path")
        H, D, Q = self.num_heads, self.head_dim, self.latent_len
        q = self.q(self.latent).view(1, Q, H, D).transpose(1, 2).expand(B, H, Q, D)  # [B, H, Q, D]
        k, v = self.kv(x).unflatten(-1, (2, H, D)).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, N, D] views
        if attn_mask is None:
            x = VF.attention(q, k, v, self.scale)
        else:  # PyTorch path only (checked above)
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale)
        x = self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, Q, C)))
        h, x = norm_stream(self.norm, x)
        x = self.mlp.forward_fused(h, residual=x)  # x + mlp(norm(x)), the add in fc2's epilogue
        if self.pool == "token":
            return x[:, 0]
        if self.pool == "avg":
            return x.mean(1)
        return x
