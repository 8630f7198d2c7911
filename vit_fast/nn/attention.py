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
