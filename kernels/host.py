"""Helpers for the launchers' host code, one definition each for every kernel module: integer
helpers (grids, block sizes), the SM count, tl.dot's input precision and the interpreter checks.

The integer helpers are plain Python on purpose: since Triton 3.9 `triton.cdiv` and
`triton.next_power_of_2` are constexpr functions whose host-side call costs about 2 us each
(argument unwrapping), and a LayerNorm forward + backward makes eight such calls on its launch path.
"""
import functools

import torch


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for a >= 0, b > 0."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, n - 1).bit_length()


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    """The number of SMs of CUDA device `device_index` (cached: the property query costs host time)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision: exact fp32 dots for fp32 inputs (tf32 would carry ~1e-3 error);
    fp16 / bf16 run on tensor cores (Triton's default "tf32", which only affects fp32 operands)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def is_interpreted(kernel) -> bool:
    """True when `kernel` (a @triton.jit function) runs under Triton's interpreter: TRITON_INTERPRET=1
    was set when it was decorated (Triton decides at decoration time)."""
    return type(kernel).__name__ == "InterpretedFunction"


def reject_bf16_dots_under_interpreter(op: str, kernel, dtype) -> None:
    """Triton's interpreter computes tl.dot on bfloat16 operands wrongly (plausible numbers, relative
    error ~1e8 and worse), so a kernel with bf16 dots must not run there: this raises instead. On a
    GPU (no interpreter) nothing changes."""
    if is_interpreted(kernel) and str(dtype) == "torch.bfloat16":
        raise RuntimeError(
            f"{op}: bfloat16 under TRITON_INTERPRET=1: Triton's interpreter computes tl.dot on bf16 wrongly; "
            "use float16/float32, or run without the interpreter (a GPU, or the PyTorch path on a CPU)")


def unit_stride_param(t):
    """A weight / bias vector [C] with unit stride (the kernels read it at ptr + c): a strided or
    expanded (stride-0) view is copied, C values; a unit-stride one or None passes through."""
    return t if t is None or t.stride(0) == 1 else t.contiguous()
