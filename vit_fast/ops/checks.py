"""Input checks shared by the ops: each error names the argument and what was expected."""
import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_tensor(name: str, t, ndim=None, dtypes=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name}: expected dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")


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
    if t.numel() > 0 and t.stride(-1) != 1:
        raise ValueError(f"{name}: expected unit stride on the last dim, got strides {tuple(t.stride())}")
