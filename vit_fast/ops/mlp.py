"""Linear (+ bias, + residual) with the GELU fused: torch.library ops over the Triton kernels,
autograd, input checks, autocast and dispatch.

Ops (x is 2-D here: the public functions flatten the leading dims):
  vit_fast::linear_act_fwd(x [M,K], weight [N,K], bias [N]?, residual [M,N]?, activation, save_pre)
      -> (y [M,N], pre [M,N] or [0])      y = act(x @ weight^T + bias + residual)
  vit_fast::linear_act_bwd(dy [M,N], pre [M,N], x, weight, activation, has_bias) -> (dx, dw, db or [0])
``activation`` is "gelu" (erf), "gelu_tanh" or "none" (plain linear; its backward is four torch
ops: dresidual = dy, dx = dy @ W, dw = dy^T @ x, db = dy.sum(0)).

Saving ``pre`` vs recomputing it: the forward writes ``pre`` (x @ W^T + b, input dtype) beside y
only when a gradient is needed, one extra [M, N] store (ViT-B b256: 310 MB, ~0.1 ms at 3 TB/s,
estimated, not yet timed), the same memory eager autograd keeps (F.gelu saves its input).
Recomputing it in the backward would cost a whole [M,K]x[K,N] GEMM (cuBLAS: 0.38 ms at
768 -> 3072 on an H100, perf/TARGETS.md) to save that memory: saving is the default and the only
mode. Inference (no grad) writes y alone.

Autocast: ``torch.library.register_autocast`` casts to one fixed dtype, whereas F.linear follows the
region's dtype, so the public functions cast x, weight and bias to ``torch.get_autocast_dtype``
themselves (as F.linear does); the residual keeps its dtype, as in eager ``F.linear(...) + r``, and
the output takes the promoted dtype (residual float32 with bf16 x -> float32 out).
"""
from typing import Optional

import torch
import torch.nn.functional as F

from vit_fast import dispatch
from vit_fast.kernels import mlp as kernels
from vit_fast.ops.checks import ANY_FLOAT_DTYPES, check_kernel_dtypes, check_same, check_tensor

APPROXIMATE_TO_ACTIVATION = {"none": "gelu", "tanh": "gelu_tanh"}


def _linear_act_forward(x, weight, bias, residual, activation, save_pre):
    """The forward's launch: the custom op's body and the eager autograd.Function's forward."""
    dispatch.record_launch("linear_act_fwd")
    M, N = x.shape[0], weight.shape[0]
    out_dtype = residual.dtype if residual is not None else x.dtype  # residual is x.dtype or float32
    y = torch.empty((M, N), dtype=out_dtype, device=x.device)
    pre = torch.empty((M, N) if save_pre else (0,), dtype=x.dtype, device=x.device)
    with dispatch.device_of(x):
        kernels.linear_act(x, weight, bias, residual, y, pre if save_pre else None, activation)
    return y, pre


def _linear_act_backward(dy, pre, x, weight, activation, has_bias):
    """The GELU backward's launch + the two GEMMs: linear_act_bwd's body and the eager backward's."""
    dispatch.record_launch("linear_act_bwd")
    M, N = dy.shape
    dpre = torch.empty((M, N), dtype=x.dtype, device=x.device)
    db_partial = (torch.empty((kernels.db_partial_rows(M), N), dtype=torch.float32, device=x.device)
                  if has_bias else None)
    with dispatch.device_of(x):
        kernels.activation_backward(dy, pre, dpre, activation, db_partial)
    dx = dpre @ weight  # [M, K], cuBLAS on a GPU
    dw = dpre.t() @ x  # [N, K]
    db = db_partial.sum(0).to(weight.dtype) if has_bias else dy.new_empty((0,), dtype=weight.dtype)
    return dx, dw, db


# custom_op, not triton_op: triton_op + wrap_triton cannot run under Triton's interpreter on
# fake / functional tensors, so opcheck could not test it on CPU.
@torch.library.custom_op("vit_fast::linear_act_fwd", mutates_args=())
def linear_act_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   residual: Optional[torch.Tensor], activation: str, save_pre: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    return _linear_act_forward(x, weight, bias, residual, activation, save_pre)


@linear_act_fwd.register_fake
def _linear_act_fwd_fake(x, weight, bias, residual, activation, save_pre):
    M, N = x.shape[0], weight.shape[0]
    out_dtype = residual.dtype if residual is not None else x.dtype
    return x.new_empty((M, N), dtype=out_dtype), x.new_empty((M, N) if save_pre else (0,))


@torch.library.custom_op("vit_fast::linear_act_bwd", mutates_args=())
def linear_act_bwd(dy: torch.Tensor, pre: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, activation: str,
                   has_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _linear_act_backward(dy, pre, x, weight, activation, has_bias)


@linear_act_bwd.register_fake
def _linear_act_bwd_fake(dy, pre, x, weight, activation, has_bias):
    db = weight.new_empty((weight.shape[0],) if has_bias else (0,))
    return x.new_empty(x.shape), weight.new_empty(weight.shape), db


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, activation, save_pre = inputs
    # pre is a saved intermediate, not a result: without these two, autograd would hand the backward
    # a zero-filled [M, N] gradient for it (a 310 MB memset at ViT-B b256)
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.activation = activation
    ctx.has_bias = bias is not None
    ctx.has_residual = residual is not None
    ctx.save_for_backward(x, weight, output[1] if activation != "none" else None)


def _gradients(ctx, dy, backward_op):
    """Input gradients from dy; ``backward_op`` is linear_act_bwd (the custom op, traced by
    torch.compile) or its plain body (eager)."""
    if dy is None:  # y unused by the loss (grads are not materialized)
        return None, None, None, None, None, None
    x, weight, pre = ctx.saved_tensors
    dresidual = dy if ctx.has_residual else None
    if ctx.activation == "none":
        dy = dy.to(x.dtype)  # a float32 residual makes y (and dy) float32
        dx, dw = dy @ weight, dy.t() @ x
        db = dy.sum(0) if ctx.has_bias else None
        return dx, dw, db, dresidual, None, None
    if pre.numel() != dy.numel():
        raise RuntimeError("vit_fast::linear_act_fwd: backward needs the forward called with save_pre=True")
    dx, dw, db = backward_op(dy, pre, x, weight, ctx.activation, ctx.has_bias)
    return dx, dw, db if ctx.has_bias else None, dresidual, None, None


def _backward(ctx, dy, _dpre):
    return _gradients(ctx, dy, torch.ops.vit_fast.linear_act_bwd)


linear_act_fwd.register_autograd(_backward, setup_context=_setup_context)


class LinearActFunction(torch.autograd.Function):
    """linear_act_fwd's eager twin: the same forward, context and gradients without the custom-op
    dispatch, which measured (benchmarks/host_overhead.py, launches stubbed) ~290 us of host time
    per linear_gelu fwd+bwd, when several H100 rows are launch-bound. torch.compile still traces
    the custom op (see _linear_act). forward takes ctx (no setup_context staticmethod): with one,
    Function.apply runs inspect.signature on every call."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, activation, save_pre):
        output = _linear_act_forward(x, weight, bias, residual, activation, save_pre)
        _setup_context(ctx, (x, weight, bias, residual, activation, save_pre), output)
        return output

    @staticmethod
    def backward(ctx, dy, _dpre):
        return _gradients(ctx, dy, _linear_act_backward)


# ----------------------------------------------------------------------------- public functions


def _check_and_autocast(x, weight, bias):
    """Checks shapes and devices, applies autocast like F.linear, then checks dtypes."""
    check_tensor("x", x)
    check_tensor("weight", weight, ndim=2)
    if x.dim() < 1:
        raise ValueError(f"x: expected at least 1 dim [..., K], got shape {tuple(x.shape)}")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x: last dim {x.shape[-1]} does not match weight [N, K] = {list(weight.shape)} (K)")
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias: expected shape [{weight.shape[0]}] (weight's out_features), "
                             f"got {list(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise RuntimeError(f"{name}: expected device {x.device} (that of x), got {t.device}")
    if torch.is_autocast_enabled(x.device.type) and x.is_floating_point():
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    check_tensor("x", x, dtypes=ANY_FLOAT_DTYPES)
    check_same("x", x, weight=weight, bias=bias)
    return x, weight, bias


def _linear_act(x, weight, bias, residual, activation):
    """The kernel path: flatten to [M, K], run the op, restore the leading dims."""
    check_kernel_dtypes(x=x)  # weight and bias share x's dtype; a residual is x's dtype or float32
    N = weight.shape[0]
    x2d = x.reshape(-1, x.shape[-1])
    r2d = residual.reshape(-1, N) if residual is not None else None
    save_pre = activation != "none" and torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias))
    if torch.compiler.is_compiling():  # the custom op: what the graph records
        y, _ = torch.ops.vit_fast.linear_act_fwd(x2d, weight, bias, r2d, activation, save_pre)
    else:  # eager: the same code, a fraction of the host time (LinearActFunction)
        y, _ = LinearActFunction.apply(x2d, weight, bias, r2d, activation, save_pre)
    return y.view(*x.shape[:-1], N)


def linear_gelu(x, weight, bias=None, approximate="none"):
    """GELU(x @ weight^T + bias): x [..., K], weight [N, K], bias [N] -> [..., N].

    The same numbers as ``F.gelu(F.linear(x, weight, bias), approximate=approximate)``, in one
    Triton matmul on the kernel path (bias and GELU on the fp32 accumulator). ``approximate``:
    "none" (erf) or "tanh".
    """
    if approximate not in APPROXIMATE_TO_ACTIVATION:
        raise ValueError(f"approximate: expected 'none' or 'tanh', got {approximate!r}")
    x, weight, bias = _check_and_autocast(x, weight, bias)
    if not dispatch.use_kernels(x):
        return F.gelu(F.linear(x, weight, bias), approximate=approximate)
    return _linear_act(x, weight, bias, None, APPROXIMATE_TO_ACTIVATION[approximate])


def linear(x, weight, bias=None, residual=None):
    """x @ weight^T + bias + residual: x [..., K], weight [N, K], bias [N], residual [..., N] -> [..., N].

    On the kernel path one Triton matmul adds bias and residual on the fp32 accumulator. The
    residual may be x's dtype or float32 (the output takes its dtype, as ``F.linear(...) + r``).
    """
    x, weight, bias = _check_and_autocast(x, weight, bias)
    if residual is not None:
        check_tensor("residual", residual)
        expected = (*x.shape[:-1], weight.shape[0])
        if tuple(residual.shape) != expected:
            raise ValueError(f"residual: expected shape {list(expected)} (x's leading dims, weight's N), "
                             f"got {list(residual.shape)}")
        if residual.device != x.device:
            raise RuntimeError(f"residual: expected device {x.device} (that of x), got {residual.device}")
        if residual.dtype not in (x.dtype, torch.float32):
            raise ValueError(f"residual: expected dtype {x.dtype} (that of x) or float32, got {residual.dtype}")
    if not dispatch.use_kernels(x):
        y = F.linear(x, weight, bias)
        return y if residual is None else y + residual
    return _linear_act(x, weight, bias, residual, "none")
