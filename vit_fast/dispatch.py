"""Where an op runs, decided per call from its input tensor.

- CUDA tensor: the Triton / CUDA kernels. Never a silent fallback: a case the kernels do not
  cover raises (ops check their inputs before they get here).
- CPU tensor with ``TRITON_INTERPRET=1`` set before triton was imported: the same Triton kernels
  under Triton's interpreter (how CI proves the kernels without a GPU).
- CPU tensor otherwise (and any other device): the plain PyTorch path.
- ``VIT_FAST_FORCE_TORCH=1`` forces the PyTorch path everywhere, for A/B comparisons.

``kernel_launches`` counts kernel-path calls per op so tests can prove the kernel ran;
``op_or_launch`` picks how an op's autograd Function reaches its kernels (``vit_fast.ops`` docstring).
"""
import collections
import contextlib
import os

import torch

FORCE_TORCH_ENV = "VIT_FAST_FORCE_TORCH"

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # e.g. a platform without triton wheels: PyTorch path only
    HAS_TRITON = False

kernel_launches = collections.Counter()


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def force_torch() -> bool:
    return os.environ.get(FORCE_TORCH_ENV) == "1"


def use_kernels(x: torch.Tensor) -> bool:
    """True when the op on ``x`` runs the Triton kernels, False for the PyTorch path."""
    if force_torch():
        return False
    if x.device.type == "cuda":
        if not HAS_TRITON:
            raise RuntimeError("vit_fast: CUDA tensors need triton installed (or set VIT_FAST_FORCE_TORCH=1)")
        return True
    return x.device.type == "cpu" and HAS_TRITON and interpreter_enabled()


def record_launch(op: str) -> None:
    kernel_launches[op] += 1


def op_or_launch(custom_op, launch):
    """The registered custom op while torch.compile traces (what the graph records), else its plain
    launch function, which runs the same body without the custom-op dispatch (``vit_fast.ops``)."""
    return custom_op if torch.compiler.is_compiling() else launch


def device_of(x: torch.Tensor):
    """Context in which a kernel launch on ``x`` goes to ``x``'s GPU (cuda:1 stays on cuda:1)."""
    if x.device.type == "cuda":
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()
