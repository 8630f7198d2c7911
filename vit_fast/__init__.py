"""vit_fast: a Vision Transformer for PyTorch on fused Triton and CUDA kernels."""
import importlib

from vit_fast import dispatch, functional, model, nn
from vit_fast.checkpoint import load_checkpoint, load_npz
from vit_fast.convert import convert
from vit_fast.eva import *  # noqa: F403 -- Eva, EvaBlock, EVA_MODELS and one factory per EVA-02 name
from vit_fast import eva
from vit_fast.factory import create_model
from vit_fast.graphs import capture_train_step, inference
from vit_fast.model import *  # noqa: F403 -- VisionTransformer, MODELS and one factory per name in MODELS
from vit_fast.pos_embed import resample_pos_embed

__version__ = "0.1.0"
__all__ = ["dispatch", "functional", "model", "nn", "convert", "inference", "capture_train_step", "create_model",
           "load_checkpoint", "load_npz", "resample_pos_embed", "eva",
           *model.__all__, *eva.__all__]


def __getattr__(name):
    # the tests' oracle (plain PyTorch) is no part of the library: imported on first use only
    if name == "reference":
        return importlib.import_module("vit_fast.reference")
    raise AttributeError(f"module 'vit_fast' has no attribute {name!r}")
