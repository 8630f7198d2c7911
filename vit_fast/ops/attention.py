"""Softmax attention: torch.library ops over the Triton kernels, autograd, input checks, dispatch.

Ops (forward returns the fp32 log-sum-exp the backward recomputes the probabilities from):
  vit_fast::attention_fwd(q, k, v, scale, sin=None, cos=None, num_prefix_tokens=0) -> (o [B,H,N,D], lse [B,H,N])
  vit_fast::attention_bwd(do, q, k, v, o, lse, scale, sin=None, cos=None, num_prefix_tokens=0) -> (dq, dk, dv)
  vit_fast::attention_packed_fwd(qkv [B,N,3*H*D], num_heads, scale, sin=None, cos=None, num_prefix_tokens=0)
      -> (o [B,N,H*D], lse [B,H,N])
  vit_fast::attention_packed_bwd(do, qkv, o, lse, num_heads, scale, sin=None, cos=None, num_prefix_tokens=0)
      -> dqkv [B,N,3*H*D]
sin / cos ([N - num_prefix_tokens, D] each, or both None): rotary position embedding (EVA-02's, timm's
apply_rot_embed_cat with interleaved pairs) of q and k past the prefix tokens, applied by the kernels
where the q / k tiles are loaded, and its transpose applied to dq / dk before they are stored; the
tables get no gradient.
The packed ops read q, k, v as strided views of qkv (timm's order: reshape(B, N, 3, H, D)), write O
in [B, N, H, D] order (the layout the output projection reads, no transpose copy) and write
dq, dk, dv straight into one dqkv buffer.

Launch functions, custom ops, fake impls and autograd Functions follow the package's one pattern
(``vit_fast.ops`` docstring).
"""
from typing import Optional

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


def _rope(sin, cos):
    return None if sin is None else (sin, cos)


# ----------------------------------------------------------------------------- launches
# vit_fast.ops docstring, 1.


def _attention_fwd_launch(q, k, v, scale, sin=None, cos=None, num_prefix_tokens=0):
    dispatch.record_launch("attention_fwd")
    B, H, N, _ = q.shape
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(B, H, N, dtype=torch.float32, device=q.device)
    with dispatch.device_of(q):
        kernels.attention_fwd(q, k, v, o, lse, scale, rope=_rope(sin, cos), num_prefix_tokens=num_prefix_tokens)
    return o, lse


def _attention_bwd_launch(do, q, k, v, o, lse, scale, sin=None, cos=None, num_prefix_tokens=0):
    dispatch.record_launch("attention_bwd")
    dq, dk, dv = (torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
    with dispatch.device_of(q):
        kernels.attention_bwd(do, q, k, v, o, lse, dq, dk, dv, scale, rope=_rope(sin, cos),
                              num_prefix_tokens=num_prefix_tokens)
    return dq, dk, dv


def _attention_packed_fwd_launch(qkv, num_heads, scale, sin=None, cos=None, num_prefix_tokens=0):
    dispatch.record_launch("attention_packed_fwd")
    B, N, C3 = qkv.shape
    q, k, v = _split_packed(qkv, num_heads)
    o = qkv.new_empty(B, N, C3 // 3)
    lse = torch.empty(B, num_heads, N, dtype=torch.float32, device=qkv.device)
    with dispatch.device_of(qkv):
        kernels.attention_fwd(q, k, v, _heads_view(o, num_heads), lse, scale, rope=_rope(sin, cos),
                              num_prefix_tokens=num_prefix_tokens)
    return o, lse


def _attention_packed_bwd_launch(do, qkv, o, lse, num_heads, scale, sin=None, cos=None, num_prefix_tokens=0):
    dispatch.record_launch("attention_packed_bwd")
    dqkv = torch.empty_like(qkv, memory_format=torch.contiguous_format)  # every element is written
    with dispatch.device_of(qkv):
        kernels.attention_bwd(_heads_view(do, num_heads), *_split_packed(qkv, num_heads), _heads_view(o, num_heads),
                              lse, *_split_packed(dqkv, num_heads), scale, rope=_rope(sin, cos),
                              num_prefix_tokens=num_prefix_tokens)
    return dqkv


# ----------------------------------------------------------------------------- custom ops
# vit_fast.ops docstring, 2.


@torch.library.custom_op("vit_fast::attention_fwd", mutates_args=())
def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, sin: Optional[torch.Tensor] = None,
                  cos: Optional[torch.Tensor] = None, num_prefix_tokens: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    return _attention_fwd_launch(q, k, v, scale, sin, cos, num_prefix_tokens)


@torch.library.custom_op("vit_fast::attention_bwd", mutates_args=())
def attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                  lse: torch.Tensor, scale: float, sin: Optional[torch.Tensor] = None,
                  cos: Optional[torch.Tensor] = None, num_prefix_tokens: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _attention_bwd_launch(do, q, k, v, o, lse, scale, sin, cos, num_prefix_tokens)


@torch.library.custom_op("vit_fast::attention_packed_fwd", mutates_args=())
def attention_packed_fwd(qkv: torch.Tensor, num_heads: int, scale: float, sin: Optional[torch.Tensor] = None,
                         cos: Optional[torch.Tensor] = None, num_prefix_tokens: int = 0
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    return _attention_packed_fwd_launch(qkv, num_heads, scale, sin, cos, num_prefix_tokens)


@torch.library.custom_op("vit_fast::attention_packed_bwd", mutates_args=())
def attention_packed_bwd(do: torch.Tensor, qkv: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, num_heads: int,
                         scale: float, sin: Optional[torch.Tensor] = None, cos: Optional[torch.Tensor] = None,
                         num_prefix_tokens: int = 0) -> torch.Tensor:
    return _attention_packed_bwd_launch(do, qkv, o, lse, num_heads, scale, sin, cos, num_prefix_tokens)


# ----------------------------------------------------------------------------- fake impls


@attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, scale, sin=None, cos=None, num_prefix_tokens=0):
    B, H, N, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(B, H, N, dtype=torch.float32)


@attention_bwd.register_fake
def _attention_bwd_fake(do, q, k, v, o, lse, scale, sin=None, cos=None, num_prefix_tokens=0):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


@attention_packed_fwd.register_fake
def _attention_packed_fwd_fake(qkv, num_heads, scale, sin=None, cos=None, num_prefix_tokens=0):
    B, N, C3 = qkv.shape
    return qkv.new_empty(B, N, C3 // 3), qkv.new_empty(B, num_heads, N, dtype=torch.float32)


@attention_packed_bwd.register_fake
def _attention_packed_bwd_fake(do, qkv, o, lse, num_heads, scale, sin=None, cos=None, num_prefix_tokens=0):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


# ----------------------------------------------------------------------------- autograd Functions
# vit_fast.ops docstring, 3. Both return (o, lse); lse is saved for the backward, not a result.


class AttentionFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, scale, sin, cos, num_prefix_tokens):
        o, lse = dispatch.op_or_launch(attention_fwd, _attention_fwd_launch)(q, k, v, scale, sin, cos,
                                                                             num_prefix_tokens)
        ctx.save_for_backward(q, k, v, o, lse, sin, cos)
        ctx.scale, ctx.num_prefix_tokens = scale, num_prefix_tokens
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)  # no zeros kernel for lse's unused gradient; dO always arrives
        return o, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, do, _dlse):
        q, k, v, o, lse, sin, cos = ctx.saved_tensors
        dq, dk, dv = dispatch.op_or_launch(attention_bwd, _attention_bwd_launch)(
            _unit_last_stride(do), q, k, v, o, lse, ctx.scale, sin, cos, ctx.num_prefix_tokens)
        return dq, dk, dv, None, None, None, None


class AttentionPackedFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, qkv, num_heads, scale, sin, cos, num_prefix_tokens):
        o, lse = dispatch.op_or_launch(attention_packed_fwd, _attention_packed_fwd_launch)(
            qkv, num_heads, scale, sin, cos, num_prefix_tokens)
        ctx.save_for_backward(qkv, o, lse, sin, cos)
        ctx.num_heads, ctx.scale, ctx.num_prefix_tokens = num_heads, scale, num_prefix_tokens
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)  # as in AttentionFunction
        return o, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, do, _dlse):
        qkv, o, lse, sin, cos = ctx.saved_tensors
        dqkv = dispatch.op_or_launch(attention_packed_bwd, _attention_packed_bwd_launch)(
            _unit_last_stride(do), qkv, o, lse, ctx.num_heads, ctx.scale, sin, cos, ctx.num_prefix_tokens)
        return dqkv, None, None, None, None, None


# ----------------------------------------------------------------------------- public functions


def _check_head_dim(name: str, head_dim: int):
    if not 1 <= head_dim <= kernels.MAX_HEAD_DIM:
        raise ValueError(f"{name}: head dim {head_dim} is not supported (1 to {kernels.MAX_HEAD_DIM})")


def _check_rope(rope, num_prefix_tokens, ref, n_q, n_kv, head_dim):
    """rope = (sin, cos) [N - num_prefix_tokens, D] each on ref's device, or None -> (sin, cos) or (None, None)."""
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
        raise ValueError(f"num_prefix_tokens: expected an int >= 0, got {num_prefix_tokens!r}")
    if rope is None:
        return None, None
    if not isinstance(rope, (tuple, list)) or len(rope) != 2:
        raise TypeError(f"rope: expected a (sin, cos) pair of tensors, got {type(rope).__name__}")
    sin, cos = rope
    for name, t in (("rope sin", sin), ("rope cos", cos)):
        check_tensor(name, t, ndim=2, dtypes=ANY_FLOAT_DTYPES)
        if t.device != ref.device:
            raise RuntimeError(f"{name}: expected device {ref.device} (that of q), got {t.device}")
        check_last_dim_contiguous(name, t)
    if n_q != n_kv:
        raise ValueError(f"rope: self-attention only (N_Q == N_KV), got N_Q={n_q}, N_KV={n_kv}")
    if head_dim % 2:
        raise ValueError(f"rope: the head dim must be even (pairs are rotated), got {head_dim}")
    if num_prefix_tokens > n_q:
        raise ValueError(f"num_prefix_tokens: {num_prefix_tokens} > N = {n_q}")
    expected = (n_q - num_prefix_tokens, head_dim)
    for name, t in (("sin", sin), ("cos", cos)):
        if tuple(t.shape) != expected:
            raise ValueError(f"rope: {name} must be [N - num_prefix_tokens, D] = {list(expected)}, got {list(t.shape)}")
    return sin, cos


def _rope_torch(x, sin, cos, num_prefix_tokens):
    """timm's EVA rotation by torch ops (the PyTorch path): prefix tokens kept, the rest
    x * cos + rot(x) * sin with rot = [-x1, x0, -x3, x2, ...], back in x's dtype (timm: .type_as(v))."""
    head, tail = x[:, :, :num_prefix_tokens], x[:, :, num_prefix_tokens:]
    rot = torch.stack([-tail[..., 1::2], tail[..., ::2]], -1).reshape(tail.shape)
    return torch.cat([head, (tail * cos + rot * sin).to(x.dtype)], dim=2)


def _check_rope_no_grad(sin, cos):
    if sin is not None and torch.is_grad_enabled() and (sin.requires_grad or cos.requires_grad):
        raise ValueError("rope: the kernels give the sin / cos tables no gradient; pass them detached "
                         "(timm's are buffers)")


def _check_scale(scale, head_dim: int) -> float:
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a Python float or None, got {type(scale).__name__}")
    return float(scale)


def attention(q, k, v, scale=None, rope=None, num_prefix_tokens=0):
    """softmax(scale * q k^T) v: q [B, H, N_Q, D], k and v [B, H, N_KV, D] -> [B, H, N_Q, D].

    The math of ``F.scaled_dot_product_attention(q, k, v, scale=scale)``; scale defaults to D**-0.5.
    ``rope`` = (sin, cos), each [N - num_prefix_tokens, D] (e.g. ``timm_rope.chunk(2, -1)`` of EVA's
    RotaryEmbeddingCat output, read through its strides): q and k of every token past the first
    ``num_prefix_tokens`` rotated as timm's EVA attention does (apply_rot_embed_cat, interleaved
    pairs, result in q's dtype) before the softmax; self-attention only. On the kernel path the
    rotation happens inside the kernels as q / k tiles are loaded (forward and backward), and the
    tables get no gradient.
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
    sin, cos = _check_rope(rope, num_prefix_tokens, q, n_q, k.shape[2], head_dim)
    if not dispatch.use_kernels(q):
        if sin is not None:
            q, k = _rope_torch(q, sin, cos, num_prefix_tokens), _rope_torch(k, sin, cos, num_prefix_tokens)
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    check_kernel_dtypes(q=q, rope_sin=sin, rope_cos=cos)  # k and v share q's dtype
    _check_rope_no_grad(sin, cos)
    return AttentionFunction.apply(q, k, v, scale, sin, cos, num_prefix_tokens)[0]


def attention_packed(qkv, num_heads, scale=None, rope=None, num_prefix_tokens=0):
    """Attention over timm's packed qkv: [B, N, 3*H*D] (reshape(B, N, 3, H, D) order) -> [B, N, H*D].
    ``rope``, ``num_prefix_tokens``: as in ``attention``."""
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
    sin, cos = _check_rope(rope, num_prefix_tokens, qkv, N, N, head_dim)
    if not dispatch.use_kernels(qkv):
        q, k, v = _split_packed(qkv, num_heads)
        if sin is not None:
            q, k = _rope_torch(q, sin, cos, num_prefix_tokens), _rope_torch(k, sin, cos, num_prefix_tokens)
        # C3 // 3, not -1: reshape cannot infer a dim of an empty (B = 0) tensor
        return F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2).reshape(B, N, C3 // 3)
    check_kernel_dtypes(qkv=qkv, rope_sin=sin, rope_cos=cos)
    _check_rope_no_grad(sin, cos)
    return AttentionPackedFunction.apply(qkv, num_heads, scale, sin, cos, num_prefix_tokens)[0]
