"""Linear + GELU op (skeleton: PyTorch path only until the Triton kernels land)."""
import torch.nn.functional as F


def linear_gelu(x, weight, bias=None, approximate="none"):
    return F.gelu(F.linear(x, weight, bias), approximate=approximate)


def linear(x, weight, bias=None, residual=None):
    y = F.linear(x, weight, bias)
    return y if residual is None else y + residual
