"""vit_fast: a Vision Transformer for PyTorch on fused Triton and CUDA kernels."""
from vit_fast import dispatch, functional, nn, reference

__version__ = "0.1.0"
__all__ = ["dispatch", "functional", "nn", "reference"]
