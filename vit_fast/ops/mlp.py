"""Linear (+ bias, + residual) with the GELU fused: torch.library ops over the Triton kernels,
autograd, input checks, autocast and dispatch.

Ops (x is 2-D here: the public functions flatten the leading dims):
  vit_fast::linear_act_fwd(x [M,K], weight [N,K], bias [N]?, residual [M,N]?, activation, save_pre)
      -> (y [M,N], pre [M,N] or [0])      y = act(x @ weight^T + bias + residual)
  vit_fast::linear_act_bwd(dy [M,N], pre [M,N], x, weight, activation, has_bias) -> (dx, dw, db or [0])
``activation`` is "gelu" (erf), "gelu_tanh", "quick_gelu" or "none" (plain linear; its backward is four torch
ops: dresidual = dy, dx = dy @ W, dw = dy^T @ x, db = dy.sum(0)).

The whole MLP, fc2(GELU(fc1(x))) (+ residual), as one op pair with its own backward:
  vit_fast::mlp_fwd(x [M,C], w1 [H,C], b1 [H]?, w2 [C2,H], b2 [C2]?, residual [M,C2]?, activation,
                    save, backend) -> (y [M,C2], pre [M,H] or [0], h [M,H])
  vit_fast::mlp_bwd(dy [M,C2], x, w1, w2, pre, h, activation, has_b1, has_b2, backend)
      -> (dx, dw1, db1 or [0], dw2, db2 or [0])
Saved for the backward: x, pre (fc1's pre-activation), h = GELU(pre) (fc2's input, for dW2) and the
two weights: what linear_gelu + linear save between them. Backward: dresidual = dy, db2 = dy.sum(0)
(fp32 accumulation), dW2 = dy^T @ h, then dpre = (dy @ W2) * GELU'(pre) in ONE Triton matmul whose
epilogue reads the saved pre tile and also writes the fc1 bias gradient's per-row-tile partials
(``kernels.linear_act_grad``), then dW1 = dpre^T @ x, dx = dpre @ W1. The weight and bias gradients
are deterministic (no atomics; fixed-order reductions).

Backend (``VIT_FAST_MLP_BACKEND``, read per call): "triton" runs fc1 + GELU and fc2 (+ residual)
as the Triton matmuls with fused epilogues and the fused backward above; "torch" runs every GEMM
as a torch matmul (cuBLAS on a GPU) with F.gelu in the forward and the existing
``activation_backward`` kernel after dy @ W2 in the backward, so a GPU run can A/B the two. Unset:
``MLP_BACKEND_TABLE`` keyed by (device capability, dtype, activation), ``DEFAULT_MLP_BACKEND`` for
anything not in it (CPU tensors under the interpreter included).

Saving ``pre`` vs recomputing it: the forward writes ``pre`` (x @ W^T + b, input dtype) beside y
only when a gradient is needed, one extra [M, N] store, the same memory eager autograd keeps
(F.gelu saves its input). Recomputing it in the backward would cost a whole [M,K]x[K,N] GEMM to
save that memory, far more than the store: saving is the default and the only mode. Inference (no
grad) writes y alone.

Autocast: ``torch.library.register_autocast`` casts to one fixed dtype, whereas F.linear follows the
region's dtype, so the public functions cast x, weight and bias to ``torch.get_autocast_dtype``
themselves (as F.linear does); the residual keeps its dtype, as in eager ``F.linear(...) + r``, and
the output takes the promoted dtype (residual float32 with bf16 x -> float32 out).

SwiGLU (timm's SwiGLU up to its norm and fc2):
  vit_fast::swiglu_fwd(x [M,K], wg [N,K], bg [N]?, wx [N,K], bx [N]?, save) -> (h [M,N], pre [M,2N] or [0])
      h = silu(x @ wg^T + bg) * (x @ wx^T + bx); pre = g | u (the two pre-activations) when ``save``
  vit_fast::swiglu_bwd(dh [M,N], x, wg, wx, pre, has_bias) -> (dx [M,K], dw [2N,K], db [2N] or [0])
      dw rows [0, N) are dWg, [N, 2N) dWx (one GEMM, split by the autograd code: a custom op's
      outputs must not alias each other); db likewise (fp32 partials summed in a fixed order, in
      the weights' dtype).

Launch functions, custom ops, fake impls and autograd Functions follow the package's one pattern
(``vit_fast.ops`` docstring).
"""
import functools
import os
from typing import Optional

import torch
import torch.nn.functional as F

from vit_fast import dispatch
from vit_fast.kernels import mlp as kernels
from vit_fast.ops.checks import ANY_FLOAT_DTYPES, check_kernel_dtypes, check_same, check_tensor


# ----------------------------------------------------------------------------- activations


# Activation spellings, the library's one map. The kernels' names (``kernels.ACTIVATIONS``: "gelu"
# (erf), "gelu_tanh", "quick_gelu" (x * sigmoid(1.702 x), OpenAI CLIP's), "none") are the
# ``activation=`` spelling of every op (VF.linear_act, VF.mlp); ``approximate=`` is F.gelu's
# spelling ("none" | "tanh"), kept for the GELU-only calls (VF.linear_gelu, VF.mlp's default), and
# maps onto those names here.
ACTIVATIONS = kernels.ACTIVATIONS
APPROXIMATE_TO_ACTIVATION = {"none": "gelu", "tanh": "gelu_tanh"}
QUICK_GELU_ALPHA = kernels.QUICK_GELU_ALPHA.value  # the kernels' constant, as a float for the PyTorch path


def resolve_activation(activation=None, approximate="none", allow_identity=True) -> str:
    """The kernels' activation name from either spelling: ``activation`` (one of ACTIVATIONS; "none"
    only with ``allow_identity``) when given, else GELU with F.gelu's ``approximate``. Giving both
    (``approximate`` other than its default) is an error: one call, one spelling."""
    if activation is None:
        if approximate not in APPROXIMATE_TO_ACTIVATION:
            raise ValueError(f"approximate: expected 'none' or 'tanh', got {approximate!r}")
        return APPROXIMATE_TO_ACTIVATION[approximate]
    allowed = ACTIVATIONS if allow_identity else kernels.GRAD_ACTIVATIONS
    if activation not in allowed:
        raise ValueError(f"activation: expected one of {allowed}, got {activation!r}")
    if approximate != "none":
        raise ValueError(f"activation={activation!r} and approximate={approximate!r}: pass one of them "
                         "(activation='gelu_tanh' is approximate='tanh')")
    return activation


def torch_activation(pre, activation: str):
    """The activation by torch ops (the PyTorch path and the torch backend), any dtype."""
    if activation == "gelu":
        return F.gelu(pre)
    if activation == "gelu_tanh":
        return F.gelu(pre, approximate="tanh")
    if activation == "quick_gelu":
        return pre * torch.sigmoid(QUICK_GELU_ALPHA * pre)
    return pre


# ----------------------------------------------------------------------------- MLP backend


MLP_BACKEND_ENV = "VIT_FAST_MLP_BACKEND"  # "triton" | "torch"; unset: the table below
MLP_BACKENDS = ("triton", "torch")
# (device capability, dtype, activation) -> backend. An entry is a measured win of the Triton path
# over the cuBLAS one on that device; `python benchmarks/mlp.py --quick` re-measures both backends
# (VIT_FAST_MLP_BACKEND), and entries are added or changed from its rows.
MLP_BACKEND_TABLE = {
    ((9, 0), torch.bfloat16, "gelu"): "triton",
    ((9, 0), torch.bfloat16, "gelu_tanh"): "triton",
}
DEFAULT_MLP_BACKEND = "triton"  # devices / dtypes not in the table, and CPU tensors (the interpreter)


@functools.lru_cache(maxsize=None)
def _capability(device_index: int):
    return torch.cuda.get_device_capability(device_index)


def backend_for(capability, dtype, activation) -> str:
    """The table's backend for (capability, dtype, activation); DEFAULT_MLP_BACKEND if not in it."""
    return MLP_BACKEND_TABLE.get((tuple(capability) if capability is not None else None, dtype, activation),
                                 DEFAULT_MLP_BACKEND)


def mlp_backend(x, activation) -> str:
    """"triton" or "torch" for an MLP on ``x`` on the kernel path: VIT_FAST_MLP_BACKEND when set,
    else the table (by x's device capability and dtype)."""
    forced = os.environ.get(MLP_BACKEND_ENV)
    if forced:
        if forced not in MLP_BACKENDS:
            raise ValueError(f"{MLP_BACKEND_ENV}: expected one of {MLP_BACKENDS} (or unset), got {forced!r}")
        return forced
    capability = _capability(x.device.index if x.device.index is not None else torch.cuda.current_device()) \
        if x.device.type == "cuda" else None
    return backend_for(capability, x.dtype, activation)


# ----------------------------------------------------------------------------- launches
# vit_fast.ops docstring, 1.


def _linear_act_fwd_launch(x, weight, bias, residual, activation, save_pre):
    """y = act(x @ weight^T + bias + residual); pre (when ``save_pre``), else [0]."""
    dispatch.record_launch("linear_act_fwd")
    M, N = x.shape[0], weight.shape[0]
    out_dtype = residual.dtype if residual is not None else x.dtype  # residual is x.dtype or float32
    y = torch.empty((M, N), dtype=out_dtype, device=x.device)
    pre = torch.empty((M, N) if save_pre else (0,), dtype=x.dtype, device=x.device)
    with dispatch.device_of(x):
        kernels.linear_act(x, weight, bias, residual, y, pre if save_pre else None, activation)
    return y, pre


def _linear_act_bwd_launch(dy, pre, x, weight, activation, has_bias):
    """The activation backward's kernel + the two GEMMs: (dx, dw, db or [0]) from dy."""
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


def _mlp_fwd_launch(x, w1, b1, w2, b2, residual, activation, save, backend):
    """y = fc2(act(fc1(x))) (+ residual); pre (when ``save``) and h = act(pre), fc2's input."""
    M, hidden, N = x.shape[0], w1.shape[0], w2.shape[0]
    if backend == "triton":
        dispatch.record_launch("mlp_fwd")
        out_dtype = residual.dtype if residual is not None else x.dtype
        h = torch.empty((M, hidden), dtype=x.dtype, device=x.device)
        pre = torch.empty((M, hidden) if save else (0,), dtype=x.dtype, device=x.device)
        y = torch.empty((M, N), dtype=out_dtype, device=x.device)
        with dispatch.device_of(x):
            kernels.linear_act(x, w1, b1, None, h, pre if save else None, activation)
            kernels.linear_act(h, w2, b2, residual, y, None, "none")
        return y, pre, h
    dispatch.record_launch("mlp_torch_fwd")
    pre = F.linear(x, w1, b1)  # cuBLAS (bias in its epilogue)
    h = torch_activation(pre, activation)
    y = F.linear(h, w2, b2)
    if residual is not None:
        y = y + residual
    return y, pre if save else pre.new_empty((0,)), h


def _mlp_bwd_launch(dy, x, w1, w2, pre, h, activation, has_b1, has_b2, backend):
    """(dx, dw1, db1, dw2, db2) from dy; db1 / db2 are [0] without their bias."""
    dy = dy.to(x.dtype)  # a float32 residual makes y (and dy) float32
    M, hidden = dy.shape[0], w1.shape[0]
    db2 = dy.sum(0, dtype=torch.float32).to(w2.dtype) if has_b2 else dy.new_empty((0,), dtype=w2.dtype)
    dw2 = dy.t() @ h  # [C2, hidden]
    dpre = torch.empty((M, hidden), dtype=x.dtype, device=x.device)
    if backend == "triton":
        dispatch.record_launch("mlp_bwd")
        with dispatch.device_of(x):
            db1 = kernels.linear_act_grad(dy, w2.t(), pre, dpre, activation, bias_grad=has_b1)
    else:
        dispatch.record_launch("mlp_torch_bwd")
        dh = dy @ w2  # [M, hidden], cuBLAS
        db_partial = (torch.empty((kernels.db_partial_rows(M), hidden), dtype=torch.float32, device=x.device)
                      if has_b1 else None)
        with dispatch.device_of(x):
            kernels.activation_backward(dh, pre, dpre, activation, db_partial)
        del dh
        db1 = db_partial.sum(0) if has_b1 else None
    db1 = db1.to(w1.dtype) if has_b1 else dy.new_empty((0,), dtype=w1.dtype)
    dw1 = dpre.t() @ x  # [hidden, C]
    dx = dpre @ w1  # [M, C]
    return dx, dw1, db1, dw2, db2


def _swiglu_fwd_launch(x, wg, bg, wx, bx, save):
    """h = silu(x @ wg^T + bg) * (x @ wx^T + bx); pre = g | u (when ``save``), else [0]."""
    dispatch.record_launch("swiglu_fwd")
    M, N = x.shape[0], wg.shape[0]
    h = torch.empty((M, N), dtype=x.dtype, device=x.device)
    pre = torch.empty((M, 2 * N) if save else (0,), dtype=x.dtype, device=x.device)
    with dispatch.device_of(x):
        kernels.swiglu(x, wg, bg, wx, bx, h, pre if save else None)
    return h, pre


def _swiglu_bwd_launch(dh, x, wg, wx, pre, has_bias):
    """(dx, dw = dWg | dWx, db = dbg | dbx or [0]) from dh: one elementwise kernel + cuBLAS GEMMs."""
    dispatch.record_launch("swiglu_bwd")
    M, N = dh.shape
    d = torch.empty((M, 2 * N), dtype=x.dtype, device=x.device)  # dg | du
    db_partial = (torch.empty((kernels.db_partial_rows(M), 2 * N), dtype=torch.float32, device=x.device)
                  if has_bias else None)
    with dispatch.device_of(x):
        kernels.swiglu_backward(dh, pre, d, db_partial)
    dw = d.t() @ x  # [2N, K]: dWg and dWx in one GEMM
    dx = d[:, :N] @ wg  # [M, K]
    dx.addmm_(d[:, N:], wx)  # + du @ Wx, accumulated into the same buffer
    db = db_partial.sum(0).to(wg.dtype) if has_bias else dh.new_empty((0,), dtype=wg.dtype)
    return dx, dw, db


# ----------------------------------------------------------------------------- custom ops
# vit_fast.ops docstring, 2.


@torch.library.custom_op("vit_fast::linear_act_fwd", mutates_args=())
def linear_act_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   residual: Optional[torch.Tensor], activation: str, save_pre: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    return _linear_act_fwd_launch(x, weight, bias, residual, activation, save_pre)


@torch.library.custom_op("vit_fast::linear_act_bwd", mutates_args=())
def linear_act_bwd(dy: torch.Tensor, pre: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, activation: str,
                   has_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _linear_act_bwd_launch(dy, pre, x, weight, activation, has_bias)


@torch.library.custom_op("vit_fast::mlp_fwd", mutates_args=())
def mlp_fwd(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
            b2: Optional[torch.Tensor], residual: Optional[torch.Tensor], activation: str, save: bool, backend: str
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _mlp_fwd_launch(x, w1, b1, w2, b2, residual, activation, save, backend)


@torch.library.custom_op("vit_fast::mlp_bwd", mutates_args=())
def mlp_bwd(dy: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, pre: torch.Tensor,
            h: torch.Tensor, activation: str, has_b1: bool, has_b2: bool, backend: str
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _mlp_bwd_launch(dy, x, w1, w2, pre, h, activation, has_b1, has_b2, backend)


@torch.library.custom_op("vit_fast::swiglu_fwd", mutates_args=())
def swiglu_fwd(x: torch.Tensor, wg: torch.Tensor, bg: Optional[torch.Tensor], wx: torch.Tensor,
               bx: Optional[torch.Tensor], save: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _swiglu_fwd_launch(x, wg, bg, wx, bx, save)


@torch.library.custom_op("vit_fast::swiglu_bwd", mutates_args=())
def swiglu_bwd(dh: torch.Tensor, x: torch.Tensor, wg: torch.Tensor, wx: torch.Tensor, pre: torch.Tensor,
               has_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _swiglu_bwd_launch(dh, x, wg, wx, pre, has_bias)


# ----------------------------------------------------------------------------- fake impls


@linear_act_fwd.register_fake
def _linear_act_fwd_fake(x, weight, bias, residual, activation, save_pre):
    M, N = x.shape[0], weight.shape[0]
    out_dtype = residual.dtype if residual is not None else x.dtype
    return x.new_empty((M, N), dtype=out_dtype), x.new_empty((M, N) if save_pre else (0,))


@linear_act_bwd.register_fake
def _linear_act_bwd_fake(dy, pre, x, weight, activation, has_bias):
    db = weight.new_empty((weight.shape[0],) if has_bias else (0,))
    return x.new_empty(x.shape), weight.new_empty(weight.shape), db


@mlp_fwd.register_fake
def _mlp_fwd_fake(x, w1, b1, w2, b2, residual, activation, save, backend):
    M, hidden, N = x.shape[0], w1.shape[0], w2.shape[0]
    out_dtype = residual.dtype if residual is not None else x.dtype
    return (x.new_empty((M, N), dtype=out_dtype), x.new_empty((M, hidden) if save else (0,)),
            x.new_empty((M, hidden)))


@mlp_bwd.register_fake
def _mlp_bwd_fake(dy, x, w1, w2, pre, h, activation, has_b1, has_b2, backend):
    return (x.new_empty(x.shape), w1.new_empty(w1.shape), w1.new_empty((w1.shape[0],) if has_b1 else (0,)),
            w2.new_empty(w2.shape), w2.new_empty((w2.shape[0],) if has_b2 else (0,)))


@swiglu_fwd.register_fake
def _swiglu_fwd_fake(x, wg, bg, wx, bx, save):
    M, N = x.shape[0], wg.shape[0]
    return x.new_empty((M, N)), x.new_empty((M, 2 * N) if save else (0,))


@swiglu_bwd.register_fake
def _swiglu_bwd_fake(dh, x, wg, wx, pre, has_bias):
    N, K = wg.shape
    return x.new_empty(x.shape), wg.new_empty((2 * N, K)), wg.new_empty((2 * N,) if has_bias else (0,))


# ----------------------------------------------------------------------------- autograd Functions
# vit_fast.ops docstring, 3. The second and third outputs (pre, h) are saved intermediates, not
# results: marked non-differentiable, with grads not materialized, so autograd hands the backward
# no zero-filled [M, N] gradient for them (a 310 MB memset at ViT-B b256).


class LinearActFunction(torch.autograd.Function):
    """Gradients of (x, weight, bias, residual, activation, save_pre); activation "none" needs no
    kernel in the backward: dresidual = dy and three torch matmuls / sums."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, activation, save_pre):
        y, pre = dispatch.op_or_launch(linear_act_fwd, _linear_act_fwd_launch)(x, weight, bias, residual, activation,
                                                                                save_pre)
        ctx.mark_non_differentiable(pre)
        ctx.set_materialize_grads(False)
        ctx.activation = activation
        ctx.has_bias = bias is not None
        ctx.has_residual = residual is not None
        ctx.save_for_backward(x, weight, pre if activation != "none" else None)
        return y, pre

    @staticmethod
    def backward(ctx, dy, _dpre):
        if dy is None:  # y unused by the loss
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
        dx, dw, db = dispatch.op_or_launch(linear_act_bwd, _linear_act_bwd_launch)(dy, pre, x, weight, ctx.activation,
                                                                                    ctx.has_bias)
        return dx, dw, db if ctx.has_bias else None, dresidual, None, None


class MlpFunction(torch.autograd.Function):
    """Gradients of (x, w1, b1, w2, b2, residual, activation, save, backend)."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, residual, activation, save, backend):
        y, pre, h = dispatch.op_or_launch(mlp_fwd, _mlp_fwd_launch)(x, w1, b1, w2, b2, residual, activation, save,
                                                                    backend)
        ctx.mark_non_differentiable(pre, h)
        ctx.set_materialize_grads(False)
        ctx.activation, ctx.backend = activation, backend
        ctx.has_b1, ctx.has_b2, ctx.has_residual = b1 is not None, b2 is not None, residual is not None
        ctx.save_for_backward(x, w1, w2, pre, h)
        return y, pre, h

    @staticmethod
    def backward(ctx, dy, _dpre, _dh):
        if dy is None:  # y unused by the loss
            return (None,) * 9
        x, w1, w2, pre, h = ctx.saved_tensors
        if pre.numel() != h.numel():
            raise RuntimeError("vit_fast::mlp_fwd: backward needs the forward called with save=True")
        dx, dw1, db1, dw2, db2 = dispatch.op_or_launch(mlp_bwd, _mlp_bwd_launch)(
            dy, x, w1, w2, pre, h, ctx.activation, ctx.has_b1, ctx.has_b2, ctx.backend)
        return (dx, dw1, db1 if ctx.has_b1 else None, dw2, db2 if ctx.has_b2 else None,
                dy if ctx.has_residual else None, None, None, None)


class SwigluFunction(torch.autograd.Function):
    """Gradients of (x, wg, bg, wx, bx, save): the bwd op's stacked dw and db split into their halves
    here (a custom op's outputs must not alias each other)."""

    @staticmethod
    def forward(ctx, x, wg, bg, wx, bx, save):
        h, pre = dispatch.op_or_launch(swiglu_fwd, _swiglu_fwd_launch)(x, wg, bg, wx, bx, save)
        ctx.mark_non_differentiable(pre)
        ctx.set_materialize_grads(False)
        ctx.has_bg, ctx.has_bx = bg is not None, bx is not None
        ctx.save_for_backward(x, wg, wx, pre)
        return h, pre

    @staticmethod
    def backward(ctx, dh, _dpre):
        if dh is None:  # h unused by the loss
            return (None,) * 6
        x, wg, wx, pre = ctx.saved_tensors
        N = wg.shape[0]
        if pre.numel() != 2 * dh.numel():
            raise RuntimeError("vit_fast::swiglu_fwd: backward needs the forward called with save=True")
        dx, dw, db = dispatch.op_or_launch(swiglu_bwd, _swiglu_bwd_launch)(  # dh: any strides
            dh, x, wg, wx, pre, ctx.has_bg or ctx.has_bx)
        dbg = db[:N] if ctx.has_bg else None
        dbx = db[N:] if ctx.has_bx else None
        return dx, dw[:N], dbg, dw[N:], dbx, None


# ----------------------------------------------------------------------------- public functions


def _check_weight_bias(x, weight, bias, in_dim, names=("weight", "bias"), in_name=None):
    """weight [N, in_dim] and bias [N] (or None) on x's device; the messages name ``names``.
    ``in_name``: where in_dim comes from (None: x's last dim)."""
    w_name, b_name = names
    check_tensor(w_name, weight, ndim=2)
    if in_dim != weight.shape[1]:
        raise ValueError(f"x: last dim {in_dim} does not match {w_name} [N, K] = {list(weight.shape)} (K)"
                         if in_name is None else
                         f"{w_name}: expected in_features {in_dim} ({in_name}), got shape {list(weight.shape)}")
    if bias is not None:
        check_tensor(b_name, bias, ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{b_name}: expected shape [{weight.shape[0]}] ({w_name}'s out_features), "
                             f"got {list(bias.shape)}")
    for name, t in ((w_name, weight), (b_name, bias)):
        if t is not None and t.device != x.device:
            raise RuntimeError(f"{name}: expected device {x.device} (that of x), got {t.device}")


def _autocast(x, *tensors):
    """x and ``tensors`` (None allowed) in the autocast dtype where autocast is on, as F.linear casts."""
    if torch.is_autocast_enabled(x.device.type) and x.is_floating_point():
        dtype = torch.get_autocast_dtype(x.device.type)
        return (x.to(dtype),) + tuple(t.to(dtype) if t is not None else None for t in tensors)
    return (x,) + tensors


def _check_and_autocast(x, weight, bias):
    """Checks shapes and devices, applies autocast like F.linear, then checks dtypes."""
    check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError(f"x: expected at least 1 dim [..., K], got shape {tuple(x.shape)}")
    _check_weight_bias(x, weight, bias, x.shape[-1])
    x, weight, bias = _autocast(x, weight, bias)
    check_tensor("x", x, dtypes=ANY_FLOAT_DTYPES)
    check_same("x", x, weight=weight, bias=bias)
    return x, weight, bias


def _check_residual(residual, x, n):
    """residual [*x.shape[:-1], n] on x's device, of x's dtype or float32."""
    check_tensor("residual", residual)
    expected = (*x.shape[:-1], n)
    if tuple(residual.shape) != expected:
        raise ValueError(f"residual: expected shape {list(expected)} (x's leading dims, weight's N), "
                         f"got {list(residual.shape)}")
    if residual.device != x.device:
        raise RuntimeError(f"residual: expected device {x.device} (that of x), got {residual.device}")
    if residual.dtype not in (x.dtype, torch.float32):
        raise ValueError(f"residual: expected dtype {x.dtype} (that of x) or float32, got {residual.dtype}")


def _linear_act(x, weight, bias, residual, activation):
    """The kernel path: flatten to [M, K], run the op, restore the leading dims."""
    check_kernel_dtypes(x=x)  # weight and bias share x's dtype; a residual is x's dtype or float32
    N = weight.shape[0]
    x2d = x.reshape(-1, x.shape[-1])
    r2d = residual.reshape(-1, N) if residual is not None else None
    save_pre = activation != "none" and torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias))
    y, _ = LinearActFunction.apply(x2d, weight, bias, r2d, activation, save_pre)
    return y.view(*x.shape[:-1], N)


def linear_gelu(x, weight, bias=None, approximate="none"):
    """GELU(x @ weight^T + bias): x [..., K], weight [N, K], bias [N] -> [..., N].

    The same numbers as ``F.gelu(F.linear(x, weight, bias), approximate=approximate)``, in one
    Triton matmul on the kernel path (bias and GELU on the fp32 accumulator). ``approximate``:
    "none" (erf) or "tanh".
    """
    activation = resolve_activation(None, approximate)
    x, weight, bias = _check_and_autocast(x, weight, bias)
    if not dispatch.use_kernels(x):
        return F.gelu(F.linear(x, weight, bias), approximate=approximate)
    return _linear_act(x, weight, bias, None, activation)


def linear_act(x, weight, bias=None, activation="gelu", residual=None):
    """act(x @ weight^T + bias) (+ residual): x [..., K], weight [N, K], bias [N] -> [..., N].

    ``activation``: "gelu" (erf), "gelu_tanh", "quick_gelu" (x * sigmoid(1.702 x), OpenAI CLIP's
    QuickGELU) or "none"; one Triton matmul on the kernel path, the activation (and its derivative,
    in the backward) on the fp32 accumulator. ``residual`` [..., N] only with activation "none"
    (it is then ``VF.linear``): after an activation it would be ambiguous (added before or after?),
    and the model adds residuals after fc2, which has none.
    """
    activation = resolve_activation(activation)
    if residual is not None and activation != "none":
        raise ValueError(f"residual: only with activation='none' (got activation={activation!r}); "
                         "VF.mlp(..., residual=) adds it after fc2")
    if activation == "none":
        return linear(x, weight, bias, residual)
    x, weight, bias = _check_and_autocast(x, weight, bias)
    if not dispatch.use_kernels(x):
        return torch_activation(F.linear(x, weight, bias), activation)
    return _linear_act(x, weight, bias, None, activation)


def linear(x, weight, bias=None, residual=None):
    """x @ weight^T + bias + residual: x [..., K], weight [N, K], bias [N], residual [..., N] -> [..., N].

    On the kernel path one Triton matmul adds bias and residual on the fp32 accumulator. The
    residual may be x's dtype or float32 (the output takes its dtype, as ``F.linear(...) + r``).
    """
    x, weight, bias = _check_and_autocast(x, weight, bias)
    if residual is not None:
        _check_residual(residual, x, weight.shape[0])
    if not dispatch.use_kernels(x):
        y = F.linear(x, weight, bias)
        return y if residual is None else y + residual
    return _linear_act(x, weight, bias, residual, "none")


def mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual=None, approximate="none", activation=None):
    """fc2(act(fc1(x))) (+ residual): x [..., C], fc1_weight [H, C], fc1_bias [H] or None,
    fc2_weight [C2, H], fc2_bias [C2] or None, residual [..., C2] (x's dtype or float32) -> [..., C2].

    The activation is GELU with F.gelu's ``approximate`` ("none" | "tanh"), or ``activation`` when
    given: "gelu", "gelu_tanh" or "quick_gelu" (CLIP's x * sigmoid(1.702 x)); not both.

    The same numbers as ``F.linear(F.gelu(F.linear(x, w1, b1), approximate=...), w2, b2) + residual``.
    On the kernel path: two Triton matmuls with fused epilogues forward, and a backward whose
    dpre = (dy @ W2) * GELU'(pre) and fc1 bias gradient come out of one matmul's epilogue
    (module docstring); ``VIT_FAST_MLP_BACKEND=torch`` runs the GEMMs as torch matmuls instead.
    Weights and inputs of any strides are read as they are.
    """
    activation = resolve_activation(activation, approximate, allow_identity=False)
    check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError(f"x: expected at least 1 dim [..., C], got shape {tuple(x.shape)}")
    _check_weight_bias(x, fc1_weight, fc1_bias, x.shape[-1], ("fc1_weight", "fc1_bias"))
    _check_weight_bias(x, fc2_weight, fc2_bias, fc1_weight.shape[0], ("fc2_weight", "fc2_bias"),
                       "fc1_weight's out_features")
    x, w1, b1, w2, b2 = _autocast(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    check_tensor("x", x, dtypes=ANY_FLOAT_DTYPES)
    check_same("x", x, fc1_weight=w1, fc1_bias=b1, fc2_weight=w2, fc2_bias=b2)
    N = w2.shape[0]
    if residual is not None:
        _check_residual(residual, x, N)
    if not dispatch.use_kernels(x):
        y = F.linear(torch_activation(F.linear(x, w1, b1), activation), w2, b2)
        return y if residual is None else y + residual
    check_kernel_dtypes(x=x)
    backend = mlp_backend(x, activation)
    x2d = x.reshape(-1, x.shape[-1])
    r2d = residual.reshape(-1, N) if residual is not None else None
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w1, b1, w2, b2))
    y, _, _ = MlpFunction.apply(x2d, w1, b1, w2, b2, r2d, activation, save, backend)
    return y.view(*x.shape[:-1], N)


def swiglu(x, fc1_g_weight, fc1_g_bias, fc1_x_weight, fc1_x_bias):
    """silu(fc1_g(x)) * fc1_x(x), timm's SwiGLU up to its norm and fc2: x [..., C], fc1_g_weight and
    fc1_x_weight [H, C], fc1_g_bias / fc1_x_bias [H] or None -> hidden [..., H] (x's dtype).

    The same numbers as ``F.silu(F.linear(x, wg, bg)) * F.linear(x, wx, bx)``. On the kernel path one
    Triton matmul computes both products over each x tile (two fp32 accumulators) and the gated
    product in its epilogue; the backward is one elementwise kernel (dg, du and both bias gradients,
    deterministic) and cuBLAS GEMMs. The two weights are read as they are (any strides: a packed
    [2H, C] fc1 passes as its two row-halves, no copy). Follow it with the norm (if any) and
    ``VF.linear(h, fc2.weight, fc2.bias, residual=...)``.
    """
    check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError(f"x: expected at least 1 dim [..., C], got shape {tuple(x.shape)}")
    _check_weight_bias(x, fc1_g_weight, fc1_g_bias, x.shape[-1], ("fc1_g_weight", "fc1_g_bias"))
    check_tensor("fc1_x_weight", fc1_x_weight, ndim=2)
    if fc1_x_weight.shape != fc1_g_weight.shape:
        raise ValueError(f"fc1_x_weight: expected the shape of fc1_g_weight {list(fc1_g_weight.shape)}, "
                         f"got {list(fc1_x_weight.shape)}")
    _check_weight_bias(x, fc1_x_weight, fc1_x_bias, x.shape[-1], ("fc1_x_weight", "fc1_x_bias"))
    x, wg, bg, wx, bx = _autocast(x, fc1_g_weight, fc1_g_bias, fc1_x_weight, fc1_x_bias)
    check_tensor("x", x, dtypes=ANY_FLOAT_DTYPES)
    check_same("x", x, fc1_g_weight=wg, fc1_g_bias=bg, fc1_x_weight=wx, fc1_x_bias=bx)
    if not dispatch.use_kernels(x):
        return F.silu(F.linear(x, wg, bg)) * F.linear(x, wx, bx)
    check_kernel_dtypes(x=x)
    N = wg.shape[0]
    x2d = x.reshape(-1, x.shape[-1])
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, wg, bg, wx, bx))
    h, _ = SwigluFunction.apply(x2d, wg, bg, wx, bx, save)
    return h.view(*x.shape[:-1], N)
