"""vit_fast: a Vision Transformer for PyTorch on fused Triton and CUDA kernels."""
from vit_fast import dispatch, functional, model, nn, reference
from vit_fast.checkpoint import create_model, load_checkpoint, load_npz, resample_pos_embed
from vit_fast.convert import convert
from vit_fast.graphs import capture_train_step, inference
from vit_fast.model import *  # noqa: F403 -- VisionTransformer, MODELS and one factory per name in MODELS

__version__ = "0.1.0"
__all__ = ["dispatch", "functional", "model", "nn", "reference", "convert", "inference", "capture_train_step",
           *model.__all__]
