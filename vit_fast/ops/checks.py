"""Input checks shared by the ops: each error names the argument and what was expected."""
import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what the Triton kernels take
ANY_FLOAT_DTYPES = FLOAT_DTYPES + (torch.float64,)  # the PyTorch path also takes float64 (gradcheck)


def check_tensor(name: str, t, ndim=None, dtypes=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name}: expected dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")


def check_kernel_dtypes(**tensors):
    """On the kernel path: every tensor given (None allowed) in FLOAT_DTYPES; float64 is named with
    where it runs instead."""
    for name, t in tensors.items():
        if t is not None and t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name}: expected dtype in (float16, bfloat16, float32) on the kernel path, got "
                             f"{str(t.dtype).replace('torch.', '')} (float64 runs on the PyTorch path: a CPU "
                             "tensor without TRITON_INTERPRET=1, or VIT_FAST_FORCE_TORCH=1)")


def check_same(ref_name: str, ref: torch.Tensor, **others):
    """Every tensor in ``others`` (None allowed) must share ``ref``'s device and dtype."""
    for name, t in others.items():
        if t is None:
            continue
        if t.device != ref.device:
            raise RuntimeError(f"{name}: expected device {ref.device} (that of {ref_name}), got {t.device}")
        if t.dtype != ref.dtype:
            raise ValueError(f"{name}: expected dtype {ref.dtype} (that of {ref_name}), got {t.dtype}")


def check_last_dim_contiguous(name: str, t: torch.Tensor):
    if t.numel() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name}: expected unit stride on the last dim, got strides {tuple(t.stride())}")
