"""Drop-in timm `Attention`: same constructor, attribute names and state_dict, fused attention kernels."""
import torch.nn as nn

from vit_fast import functional as VF


class Attention(nn.Module):
    """Multi-head self-attention: qkv Linear -> fused attention on the packed qkv -> proj.

    state_dict: ``qkv.weight`` [3*dim, dim] (+ ``qkv.bias``), ``proj.weight`` / ``proj.bias``, and with
    ``qk_norm`` timm's ``q_norm`` / ``k_norm`` (LayerNorm over head_dim, eps 1e-6). The kernels have no
    attention dropout: ``attn_drop > 0`` raises in training mode (it is the identity in eval mode).
    """

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_norm=False, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
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

    def forward(self, x):  # [B, N, dim] -> [B, N, dim]
        if self.training and self.attn_drop.p > 0:
            raise NotImplementedError(
                f"attn_drop={self.attn_drop.p}: the fused attention kernels have no attention dropout; "
                "use attn_drop=0 for training (eval mode is fine)")
        B, N, C = x.shape
        qkv = self.qkv(x)  # [B, N, 3*H*D]
        if isinstance(self.q_norm, nn.Identity):
            x = VF.attention_packed(qkv, self.num_heads, self.scale)  # [B, N, H*D], no transposes
        else:
            q, k, v = qkv.unflatten(-1, (3, self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4).unbind(0)
            x = VF.attention(self.q_norm(q), self.k_norm(k), v, self.scale).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))
