"""Softmax attention: torch.library ops over the Triton kernels, autograd, input checks, dispatch.

Ops (forward returns the fp32 log-sum-exp the backward recomputes the probabilities from):
  vit_fast::attention_fwd(q, k, v, scale) -> (o [B,H,N,D], lse [B,H,N])
  vit_fast::attention_bwd(do, q, k, v, o, lse, scale) -> (dq, dk, dv)
  vit_fast::attention_packed_fwd(qkv [B,N,3*H*D], num_heads, scale) -> (o [B,N,H*D], lse [B,H,N])
  vit_fast::attention_packed_bwd(do, qkv, o, lse, num_heads, scale) -> dqkv [B,N,3*H*D]
The packed ops read q, k, v as strided views of qkv (timm's order: reshape(B, N, 3, H, D)), write O
in [B, N, H, D] order (the layout the output projection reads, no transpose copy) and write
dq, dk, dv straight into one dqkv buffer.
"""
import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from vit_fast import dispatch
from vit_fast.kernels import attention as kernels
from vit_fast.ops.checks import (ANY_FLOAT_DTYPES, check_kernel_dtypes, check_last_dim_contiguous, check_same,
                                  check_tensor)


def _split_packed(qkv: torch.Tensor, num_heads: int):
    """[B, N, 3*H*D] -> q, k, v views [B, H, N, D] (no copies)."""
    return qkv.unflatten(-1, (3, num_heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)


def _heads_view(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, N, H*D] -> [B, H, N, D] view."""
    return x.unflatten(-1, (num_heads, -1)).transpose(1, 2)


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    # upstream gradients may come expanded (stride 0), e.g. from out.sum()
    return t if t.stride(-1) == 1 else t.contiguous()


# ----------------------------------------------------------------------------- [B, H, N, D] ops
# Each op's body is a plain function (_*_impl) called both by the custom op (what torch.compile
# traces and opcheck tests) and by the eager torch.autograd.Function fast path (see the public
# functions below).


def _attention_fwd_impl(q, k, v, scale):
    dispatch.record_launch("attention_fwd")
    B, H, N, _ = q.shape
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(B, H, N, dtype=torch.float32, device=q.device)
    with dispatch.device_of(q):
        kernels.attention_fwd(q, k, v, o, lse, scale)
    return o, lse


def _attention_bwd_impl(do, q, k, v, o, lse, scale):
    dispatch.record_launch("attention_bwd")
    dq, dk, dv = (torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
    with dispatch.device_of(q):
        kernels.attention_bwd(do, q, k, v, o, lse, dq, dk, dv, scale)
    return dq, dk, dv


# custom_op, not triton_op: wrap_triton cannot run under Triton's interpreter on fake/functional
# tensors, so CI could not opcheck a triton_op.


@torch.library.custom_op("vit_fast::attention_fwd", mutates_args=())
def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _attention_fwd_impl(q, k, v, scale)


@attention_fwd.register_fake
def _(q, k, v, scale):
    B, H, N, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(B, H, N, dtype=torch.float32)


@torch.library.custom_op("vit_fast::attention_bwd", mutates_args=())
def attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                  lse: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _attention_bwd_impl(do, q, k, v, o, lse, scale)


@attention_bwd.register_fake
def _(do, q, k, v, o, lse, scale):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _setup_attention(ctx, inputs, output):
    q, k, v, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # no zeros kernel for lse's unused gradient; dO always arrives


def _attention_grads(bwd, ctx, do):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = bwd(_unit_last_stride(do), q, k, v, o, lse, ctx.scale)
    return dq, dk, dv, None


def _backward_attention(ctx, do, _dlse):
    return _attention_grads(attention_bwd, ctx, do)


attention_fwd.register_autograd(_backward_attention, setup_context=_setup_attention)


class _AttentionFn(torch.autograd.Function):
    """Eager twin of vit_fast::attention_fwd + its registered autograd: same bodies, no custom-op dispatch."""

    # forward(ctx, ...) rather than a separate setup_context: apply() would inspect.signature-bind the args
    @staticmethod
    def forward(ctx, q, k, v, scale):
        output = _attention_fwd_impl(q, k, v, scale)
        _setup_attention(ctx, (q, k, v, scale), output)
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, do, _dlse):
        return _attention_grads(_attention_bwd_impl, ctx, do)


# ----------------------------------------------------------------------------- packed [B, N, 3*H*D] ops


def _attention_packed_fwd_impl(qkv, num_heads, scale):
    dispatch.record_launch("attention_packed_fwd")
    B, N, C3 = qkv.shape
    q, k, v = _split_packed(qkv, num_heads)
    o = qkv.new_empty(B, N, C3 // 3)
    lse = torch.empty(B, num_heads, N, dtype=torch.float32, device=qkv.device)
    with dispatch.device_of(qkv):
        kernels.attention_fwd(q, k, v, _heads_view(o, num_heads), lse, scale)
    return o, lse


def _attention_packed_bwd_impl(do, qkv, o, lse, num_heads, scale):
    dispatch.record_launch("attention_packed_bwd")
    dqkv = torch.empty_like(qkv, memory_format=torch.contiguous_format)  # every element is written
    with dispatch.device_of(qkv):
        kernels.attention_bwd(_heads_view(do, num_heads), *_split_packed(qkv, num_heads), _heads_view(o, num_heads),
                              lse, *_split_packed(dqkv, num_heads), scale)
    return dqkv


@torch.library.custom_op("vit_fast::attention_packed_fwd", mutates_args=())
def attention_packed_fwd(qkv: torch.Tensor, num_heads: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _attention_packed_fwd_impl(qkv, num_heads, scale)


@attention_packed_fwd.register_fake
def _(qkv, num_heads, scale):
    B, N, C3 = qkv.shape
    return qkv.new_empty(B, N, C3 // 3), qkv.new_empty(B, num_heads, N, dtype=torch.float32)


@torch.library.custom_op("vit_fast::attention_packed_bwd", mutates_args=())
def attention_packed_bwd(do: torch.Tensor, qkv: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, num_heads: int,
                         scale: float) -> torch.Tensor:
    return _attention_packed_bwd_impl(do, qkv, o, lse, num_heads, scale)


@attention_packed_bwd.register_fake
def _(do, qkv, o, lse, num_heads, scale):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


def _setup_attention_packed(ctx, inputs, output):
    qkv, num_heads, scale = inputs
    o, lse = output
    ctx.save_for_backward(qkv, o, lse)
    ctx.num_heads, ctx.scale = num_heads, scale
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # as in _setup_attention


def _attention_packed_grads(bwd, ctx, do):
    qkv, o, lse = ctx.saved_tensors
    return bwd(_unit_last_stride(do), qkv, o, lse, ctx.num_heads, ctx.scale), None, None


def _backward_attention_packed(ctx, do, _dlse):
    return _attention_packed_grads(attention_packed_bwd, ctx, do)


attention_packed_fwd.register_autograd(_backward_attention_packed, setup_context=_setup_attention_packed)


class _AttentionPackedFn(torch.autograd.Function):
    """Eager twin of vit_fast::attention_packed_fwd + its registered autograd (as _AttentionFn)."""

    @staticmethod
    def forward(ctx, qkv, num_heads, scale):
        output = _attention_packed_fwd_impl(qkv, num_heads, scale)
        _setup_attention_packed(ctx, (qkv, num_heads, scale), output)
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, do, _dlse):
        return _attention_packed_grads(_attention_packed_bwd_impl, ctx, do)


# ----------------------------------------------------------------------------- public functions


def _check_head_dim(name: str, head_dim: int):
    if not 1 <= head_dim <= kernels.MAX_HEAD_DIM:
        raise ValueError(f"{name}: head dim {head_dim} is not supported (1 to {kernels.MAX_HEAD_DIM})")


def _check_scale(scale, head_dim: int) -> float:
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a Python float or None, got {type(scale).__name__}")
    return float(scale)


# Kernel path: torch.compile traces the custom ops; eager calls take the autograd.Function twin. The
# custom-op plumbing (custom_op __call__, torch._library autograd_impl, the dynamo-disable wrapper,
# redispatch) made eager calls launch-bound: on the H100 host_ms 0.254 ms per call vs SDPA's 0.03,
# and attention_packed fwd+bwd ~400 us host cost with launches stubbed (benchmarks/host_overhead.py).


def attention(q, k, v, scale=None):
    """softmax(scale * q k^T) v: q [B, H, N_Q, D], k and v [B, H, N_KV, D] -> [B, H, N_Q, D].

    The math of ``F.scaled_dot_product_attention(q, k, v, scale=scale)``; scale defaults to D**-0.5.
    """
    check_tensor("q", q, ndim=4, dtypes=ANY_FLOAT_DTYPES)
    check_tensor("k", k, ndim=4)
    check_tensor("v", v, ndim=4)
    check_same("q", q, k=k, v=v)
    B, H, n_q, head_dim = q.shape
    if k.shape[:2] != (B, H) or k.shape[3] != head_dim:
        raise ValueError(f"k: expected shape [{B}, {H}, N_KV, {head_dim}] to match q {tuple(q.shape)}, "
                         f"got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if n_q == 0 or k.shape[2] == 0:
        raise ValueError(f"q, k: expected at least one token, got N_Q={n_q}, N_KV={k.shape[2]}")
    _check_head_dim("q", head_dim)
    scale = _check_scale(scale, head_dim)
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_last_dim_contiguous(name, t)
    if not dispatch.use_kernels(q):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    check_kernel_dtypes(q=q)  # k and v share q's dtype
    if torch.compiler.is_compiling():
        return attention_fwd(q, k, v, scale)[0]
    return _AttentionFn.apply(q, k, v, scale)[0]


def attention_packed(qkv, num_heads, scale=None):
    """Attention over timm's packed qkv: [B, N, 3*H*D] (reshape(B, N, 3, H, D) order) -> [B, N, H*D]."""
    check_tensor("qkv", qkv, ndim=3, dtypes=ANY_FLOAT_DTYPES)
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads: expected a positive int, got {num_heads!r}")
    B, N, C3 = qkv.shape
    if C3 % (3 * num_heads) != 0:
        raise ValueError(f"qkv: last dim {C3} is not 3 * num_heads ({num_heads}) * head_dim")
    if N == 0:
        raise ValueError(f"qkv: expected at least one token, got shape {tuple(qkv.shape)}")
    head_dim = C3 // (3 * num_heads)
    _check_head_dim("qkv", head_dim)
    scale = _check_scale(scale, head_dim)
    check_last_dim_contiguous("qkv", qkv)
    if not dispatch.use_kernels(qkv):
        q, k, v = _split_packed(qkv, num_heads)
        # C3 // 3, not -1: reshape cannot infer a dim of an empty (B = 0) tensor
        return F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2).reshape(B, N, C3 // 3)
    check_kernel_dtypes(qkv=qkv)
    if torch.compiler.is_compiling():
        return attention_packed_fwd(qkv, num_heads, scale)[0]
    return _AttentionPackedFn.apply(qkv, num_heads, scale)[0]
