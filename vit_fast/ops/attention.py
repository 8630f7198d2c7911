"""Attention op (skeleton: PyTorch path only until the Triton kernels land)."""
import torch.nn.functional as F


def attention(q, k, v, scale=None):
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def attention_packed(qkv, num_heads, scale=None):
    B, N, _ = qkv.shape
    q, k, v = qkv.reshape(B, N, 3, num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    return F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2).reshape(B, N, -1)
