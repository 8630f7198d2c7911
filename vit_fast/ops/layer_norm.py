"""LayerNorm and residual-add + LayerNorm over the last dim: registration, autograd, checks, dispatch.

Ops (all in the `vit_fast` namespace; mean and rstd are [rows] fp32, rows = numel // C):
- layer_norm_fwd(x, weight?, bias?, eps, y_dtype) -> (y, mean, rstd)
- layer_norm_bwd(dy, x, weight?, mean, rstd, compute_dweight, compute_dbias) -> (dx, dweight, dbias)
- add_layer_norm_fwd(x, residual, weight?, bias?, eps, y_dtype) -> (y, s, mean, rstd), s = x + residual
  in the promoted dtype of x and residual (as torch's add)
- add_layer_norm_bwd(dy, ds?, s, weight?, mean, rstd, compute_dweight, compute_dbias)
  -> (dx, dweight, dbias); dx = ds + dLN/ds is the gradient of both x and residual
The kernels read every input in its own dtype and compute in fp32, so mixed precision needs no cast
passes: bf16 x with fp32 weight (and an fp32 residual) under autocast, y written in y_dtype. dweight
and dbias come in weight's dtype. A gradient not asked for comes back as an empty [0] tensor.

Launch functions, custom ops, fake impls and autograd Functions follow the package's one pattern
(``vit_fast.ops`` docstring).
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F

from vit_fast import dispatch
from vit_fast.kernels import layer_norm as kernels
from vit_fast.ops.checks import ANY_FLOAT_DTYPES, FLOAT_DTYPES, check_kernel_dtypes, check_tensor

# ----------------------------------------------------------------------------- launches
# vit_fast.ops docstring, 1. A gradient not asked for comes back as None here.


def _layer_norm_fwd_launch(x, weight, bias, eps, y_dtype):
    dispatch.record_launch("layer_norm_fwd")
    with dispatch.device_of(x):
        y, _, mean, rstd = kernels.layer_norm_fwd(x, weight, bias, eps, y_dtype=y_dtype)
    return y, mean, rstd


def _layer_norm_bwd_launch(dy, x, weight, mean, rstd, compute_dweight, compute_dbias, dx_extra=None):
    """dx_extra: a gradient the kernel adds to dx (the stream's, see LayerNormStreamFunction)."""
    dispatch.record_launch("layer_norm_bwd")
    with dispatch.device_of(x):
        return kernels.layer_norm_bwd(dy, x, weight, mean, rstd, dx_extra, compute_dweight, compute_dbias)


def _add_layer_norm_fwd_launch(x, residual, weight, bias, eps, y_dtype):
    dispatch.record_launch("add_layer_norm_fwd")
    with dispatch.device_of(x):
        return kernels.layer_norm_fwd(x, weight, bias, eps, residual=residual, y_dtype=y_dtype)


def _add_layer_norm_bwd_launch(dy, ds, s, weight, mean, rstd, compute_dweight, compute_dbias):
    dispatch.record_launch("add_layer_norm_bwd")
    with dispatch.device_of(s):
        return kernels.layer_norm_bwd(dy, s, weight, mean, rstd, ds, compute_dweight, compute_dbias)


# ----------------------------------------------------------------------------- custom ops
# vit_fast.ops docstring, 2.


@torch.library.custom_op("vit_fast::layer_norm_fwd", mutates_args=())
def layer_norm_fwd(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                   eps: float, y_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _layer_norm_fwd_launch(x, weight, bias, eps, y_dtype)


@torch.library.custom_op("vit_fast::layer_norm_bwd", mutates_args=())
def layer_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], mean: torch.Tensor,
                   rstd: torch.Tensor, compute_dweight: bool, compute_dbias: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dweight, dbias = _layer_norm_bwd_launch(dy, x, weight, mean, rstd, compute_dweight, compute_dbias)
    return dx, _or_empty(dweight, x), _or_empty(dbias, x)


@torch.library.custom_op("vit_fast::add_layer_norm_fwd", mutates_args=())
def add_layer_norm_fwd(x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor],
                       bias: Optional[torch.Tensor], eps: float, y_dtype: torch.dtype
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _add_layer_norm_fwd_launch(x, residual, weight, bias, eps, y_dtype)


@torch.library.custom_op("vit_fast::add_layer_norm_bwd", mutates_args=())
def add_layer_norm_bwd(dy: torch.Tensor, ds: Optional[torch.Tensor], s: torch.Tensor,
                       weight: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor,
                       compute_dweight: bool, compute_dbias: bool
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dweight, dbias = _add_layer_norm_bwd_launch(dy, ds, s, weight, mean, rstd, compute_dweight, compute_dbias)
    return dx, _or_empty(dweight, s), _or_empty(dbias, s)


def _or_empty(grad, like):
    return grad if grad is not None else like.new_empty(0)


# ----------------------------------------------------------------------------- fake impls


def _fake_stats(x):
    rows = math.prod(x.shape[:-1])
    return x.new_empty(rows, dtype=torch.float32), x.new_empty(rows, dtype=torch.float32)


def _fake_grads(x, weight, compute_dweight, compute_dbias):
    C = x.shape[-1]
    param_dtype = kernels.param_grad_dtype(x, weight)
    dweight = x.new_empty(C if compute_dweight and weight is not None else 0, dtype=param_dtype)
    return x.new_empty(x.shape), dweight, x.new_empty(C if compute_dbias else 0, dtype=param_dtype)


@layer_norm_fwd.register_fake
def _layer_norm_fwd_fake(x, weight, bias, eps, y_dtype):
    return (x.new_empty(x.shape, dtype=y_dtype), *_fake_stats(x))


@layer_norm_bwd.register_fake
def _layer_norm_bwd_fake(dy, x, weight, mean, rstd, compute_dweight, compute_dbias):
    return _fake_grads(x, weight, compute_dweight, compute_dbias)


@add_layer_norm_fwd.register_fake
def _add_layer_norm_fwd_fake(x, residual, weight, bias, eps, y_dtype):
    s_dtype = torch.promote_types(x.dtype, residual.dtype)
    return (x.new_empty(x.shape, dtype=y_dtype), x.new_empty(x.shape, dtype=s_dtype), *_fake_stats(x))


@add_layer_norm_bwd.register_fake
def _add_layer_norm_bwd_fake(dy, ds, s, weight, mean, rstd, compute_dweight, compute_dbias):
    return _fake_grads(s, weight, compute_dweight, compute_dbias)


# ----------------------------------------------------------------------------- autograd Functions
# One per op (vit_fast.ops docstring, 3). They return y (and s) alone: mean and rstd stay inside,
# saved for the backward.


def _wanted(ctx, weight_index):
    """(compute dweight, compute dbias) from which of weight and bias need a gradient."""
    return ctx.needs_input_grad[weight_index], ctx.needs_input_grad[weight_index + 1]


class LayerNormFunction(torch.autograd.Function):
    """Gradients of (x, weight, bias, eps, y_dtype)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, y_dtype):
        y, mean, rstd = dispatch.op_or_launch(layer_norm_fwd, _layer_norm_fwd_launch)(x, weight, bias, eps, y_dtype)
        ctx.save_for_backward(x, weight, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        compute_dweight, compute_dbias = _wanted(ctx, 1)
        dx, dweight, dbias = dispatch.op_or_launch(layer_norm_bwd, _layer_norm_bwd_launch)(
            dy, x, weight, mean, rstd, compute_dweight, compute_dbias)
        return dx, dweight if compute_dweight else None, dbias if compute_dbias else None, None, None


class LayerNormStreamFunction(torch.autograd.Function):
    """(LN(x), x), the second output x itself: where the stream also feeds a later op (the next add +
    LayerNorm), its gradient joins dx inside the LayerNorm backward kernel instead of autograd adding
    two [rows, C] gradients in a pass of its own. Compiled, the graph adds them after the bwd op
    (layer_norm_bwd takes no extra gradient), where the compiler fuses the sum into its neighbours."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, y_dtype):
        y, mean, rstd = dispatch.op_or_launch(layer_norm_fwd, _layer_norm_fwd_launch)(x, weight, bias, eps, y_dtype)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.set_materialize_grads(False)  # an unused output's gradient comes as None: nothing to read
        return y, x

    @staticmethod
    def backward(ctx, dy, ds):
        if dy is None:  # only the stream was used
            return ds, None, None, None, None
        x, weight, mean, rstd = ctx.saved_tensors
        compute_dweight, compute_dbias = _wanted(ctx, 1)
        if torch.compiler.is_compiling():
            dx, dweight, dbias = layer_norm_bwd(dy, x, weight, mean, rstd, compute_dweight, compute_dbias)
            dx = dx if ds is None else dx + ds
        else:
            dx, dweight, dbias = _layer_norm_bwd_launch(dy, x, weight, mean, rstd, compute_dweight, compute_dbias, ds)
        return dx, dweight if compute_dweight else None, dbias if compute_dbias else None, None, None


class AddLayerNormFunction(torch.autograd.Function):
    """Gradients of (x, residual, weight, bias, eps, y_dtype). dx is in s's dtype; autograd casts it
    for an x or residual of another dtype."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, y_dtype):
        y, s, mean, rstd = dispatch.op_or_launch(add_layer_norm_fwd, _add_layer_norm_fwd_launch)(
            x, residual, weight, bias, eps, y_dtype)
        ctx.save_for_backward(s, weight, mean, rstd)
        ctx.set_materialize_grads(False)  # an unused s gives ds = None: no zeros to read
        return y, s

    @staticmethod
    def backward(ctx, dy, ds):
        s, weight, mean, rstd = ctx.saved_tensors
        compute_dweight, compute_dbias = _wanted(ctx, 2)
        if dy is None:  # only s was used: y contributes nothing
            dy = torch.zeros_like(s)
        dx, dweight, dbias = dispatch.op_or_launch(add_layer_norm_bwd, _add_layer_norm_bwd_launch)(
            dy, ds, s, weight, mean, rstd, compute_dweight, compute_dbias)
        return dx, dx, dweight if compute_dweight else None, dbias if compute_dbias else None, None, None


# ----------------------------------------------------------------------------- public functions


def _under_autocast(x):
    """CUDA autocast runs torch's layer_norm in fp32 (bf16 x with fp32 weights included). A non-tensor
    x is not: _check_inputs rejects it with its own message."""
    return isinstance(x, torch.Tensor) and x.device.type == "cuda" and torch.is_autocast_enabled("cuda")


def _check_inputs(x, weight, bias, residual, out_dtype, autocast):
    """Shapes, devices and dtypes; True when the kernels run. The stream (x, or x + residual in
    their promoted dtype, as torch adds) sets the dtype weight and bias must have, except under
    autocast, where torch computes in fp32 from whatever dtypes come, and when out_dtype is given:
    then mixed dtypes are read as they are too (math in fp32, y rounded once to out_dtype)."""
    check_tensor("x", x)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x: expected a tensor [..., C] with C >= 1, got shape {tuple(x.shape)}")
    C = x.shape[-1]
    stream_dtype = x.dtype
    if residual is not None:
        check_tensor("residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"residual: expected the shape of x {tuple(x.shape)}, got {tuple(residual.shape)}")
        stream_dtype = torch.promote_types(x.dtype, residual.dtype)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            check_tensor(name, t)
            if t.shape != (C,):
                raise ValueError(f"{name}: expected shape ({C},) (the last dim of x), got {tuple(t.shape)}")
    mixed_ok = autocast or out_dtype is not None
    for name, t in (("residual", residual), ("weight", weight), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise RuntimeError(f"{name}: expected device {x.device} (that of x), got {t.device}")
        if t is not None and name != "residual" and not mixed_ok and t.dtype != stream_dtype:
            raise ValueError(f"{name}: expected dtype {stream_dtype} (that of x"
                             f"{' + residual' if residual is not None else ''}), got {t.dtype} "
                             "(pass out_dtype to read mixed dtypes, computed in fp32)")
    if out_dtype is not None and out_dtype not in ANY_FLOAT_DTYPES:
        raise ValueError(f"out_dtype: expected one of {ANY_FLOAT_DTYPES} or None, got {out_dtype}")
    for name, t in (("x", x), ("residual", residual), ("weight", weight), ("bias", bias)):
        if t is not None:
            check_tensor(name, t, dtypes=ANY_FLOAT_DTYPES)
    if dispatch.use_kernels(x):
        check_kernel_dtypes(x=x, residual=residual, weight=weight, bias=bias)
        if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
            raise ValueError(f"out_dtype: expected one of {FLOAT_DTYPES} or None on the kernel path, got {out_dtype}")
        kernels.check_width(C)
        return True
    return False


def _torch_layer_norm(s, weight, bias, eps, out_dtype, autocast):
    """The PyTorch path's LN of the stream s. Mixed dtypes outside autocast (out_dtype given): math
    in fp32 (or float64 if any input is), y rounded once to out_dtype, as the kernels do."""
    dtypes = {t.dtype for t in (s, weight, bias) if t is not None}
    if len(dtypes) > 1 and not autocast:
        compute = torch.float64 if torch.float64 in dtypes else torch.float32
        s, weight, bias = (t.to(compute) if t is not None else None for t in (s, weight, bias))
    y = F.layer_norm(s, (s.shape[-1],), weight, bias, eps)
    return y if out_dtype is None else y.to(out_dtype)


def _y_dtype(stream_dtype, out_dtype, autocast):
    return out_dtype or (torch.float32 if autocast else stream_dtype)


def layer_norm(x, weight=None, bias=None, eps=1e-6, out_dtype=None):
    """LayerNorm over the last dim: x [..., C], weight / bias [C] or None -> y [..., C].

    The same numbers as ``F.layer_norm(x, (C,), weight, bias, eps)``, statistics in fp32, y
    contiguous on the kernel path. x may be any view whose last dim has unit stride and whose
    leading dims collapse (read in place); other layouts are copied once. Kernels take C <= 16384
    and fp16 / bf16 / fp32 (the PyTorch path float64 too). Under CUDA autocast it computes in fp32 and returns fp32, as torch's
    layer_norm does, reading a bf16 x and fp32 weights as they are (no cast passes).
    ``out_dtype``: y's dtype instead (e.g. the autocast dtype when y only feeds a Linear, which
    would round it to that dtype anyway: the same numbers, half the bytes). With out_dtype, weight
    and bias may have another float dtype than x on every path (CPU included): read as they are,
    math in fp32, y rounded once to out_dtype; dweight / dbias come in their own dtypes.
    """
    autocast = _under_autocast(x)
    if _check_inputs(x, weight, bias, None, out_dtype, autocast):
        return LayerNormFunction.apply(x, weight, bias, float(eps), _y_dtype(x.dtype, out_dtype, autocast))
    return _torch_layer_norm(x, weight, bias, eps, out_dtype, autocast)


def add_layer_norm(x, residual, weight=None, bias=None, eps=1e-6, out_dtype=None):
    """(LayerNorm(x + residual), x + residual): x, residual [..., C] of the same shape.

    s = x + residual in their promoted dtype (as torch's add), y normalized from s as stored. One
    read of x and residual, one write of y and s (both contiguous on the kernel path). The gradient
    of x and of residual is the same: ds + dLN/ds. Under CUDA autocast y is computed and returned
    in fp32, as torch's layer_norm would; ``out_dtype`` as in `layer_norm`.

    ``residual`` None: (LayerNorm(x), x), nothing added and nothing written but y; in eager mode on
    the kernel path the stream's gradient is added to dx inside the LayerNorm backward (one pass
    fewer than autograd summing the gradients of x's two consumers).
    """
    autocast = _under_autocast(x)
    if residual is None:
        if not _check_inputs(x, weight, bias, None, out_dtype, autocast):
            return _torch_layer_norm(x, weight, bias, eps, out_dtype, autocast), x
        return LayerNormStreamFunction.apply(x, weight, bias, float(eps), _y_dtype(x.dtype, out_dtype, autocast))
    check_tensor("residual", residual)  # required here: _check_inputs reads None as "no residual"
    if _check_inputs(x, weight, bias, residual, out_dtype, autocast):
        y_dtype = _y_dtype(torch.promote_types(x.dtype, residual.dtype), out_dtype, autocast)
        return AddLayerNormFunction.apply(x, residual, weight, bias, float(eps), y_dtype)
    s = x + residual
    return _torch_layer_norm(s, weight, bias, eps, out_dtype, autocast), s
