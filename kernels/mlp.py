"""Triton kernels for Linear + bias (+ residual) + GELU, and the GELU backward, with their launchers.

Forward: y = act(x @ W^T + b (+ r)), one matmul whose epilogue adds the bias and the residual and
applies the activation on the fp32 accumulator before the only store. W is read in nn.Linear's
[N, K] layout through its strides (no transposed copy). Two kernels compute it:
- ``linear_act_kernel``: pointer loads, one program per output tile, grouped tile order. Any
  GPU, any strides; the default under Triton's interpreter (the tests run both kernels there).
- ``linear_act_tma_kernel``: Hopper (sm_90+): TMA tensor descriptors for X, W and the stores, one
  persistent program per SM walking the tiles in the same grouped order. Needs 16-byte aligned
  bases and row strides; ``select_kernel`` falls back to the pointer kernel otherwise.
fp32 inputs run exact fp32 dots (``input_precision="ieee"``, CUDA cores, not tf32 tensor cores), like
PyTorch's default ``torch.backends.cuda.matmul.allow_tf32 = False``: fp32 results carry fp32 error.
fp16 / bf16 run on tensor cores (Triton's default "tf32" setting, which only affects fp32 operands).

Backward, two ways:
- ``linear_act_grad`` (the fused MLP's backward, ``vit_fast.ops.mlp.mlp``): the pointer kernel in
  its ``EPILOGUE="act_grad"`` mode computes dpre = (dy @ W2) * act'(pre) as ONE matmul: dy [M, C]
  is the [M, K] operand, fc2's weight W2 [C, hidden] is the [N = hidden, K = C] operand read
  through its transposed strides (no copy), and the epilogue multiplies the fp32 accumulator by
  act'(pre[m, n]), reading the saved pre tile, before the only store. The same epilogue writes the
  column sums of its dpre tile (fp32, rows past M masked out) into a partials buffer
  [cdiv(M, BLOCK_M), hidden]: row pid_m, columns of the tile; the caller's ``sum(0)`` over it is the
  fc1 bias gradient, in a fixed order (deterministic, no atomics). The dy @ W2 product never
  reaches memory: at ViT-B b256 bf16 that is one [50432, 3072] write and read (2 x 310 MB) fewer
  than cuBLAS + ``activation_backward``. The TMA kernel has no such mode: ``linear_act_grad``
  always takes the pointer kernel (W2 read transposed has a unit stride on N, not on K, which a
  TMA block of [BLOCK_N, BLOCK_K] would need).
- ``activation_backward`` (``linear_gelu``'s own backward, and the MLP's cuBLAS backend): dpre =
  dy * act'(pre) as an elementwise pass after a separate dy @ W GEMM, and, per program, the column
  sums of dpre (fp32) for the bias gradient, reduced afterwards by the caller in a fixed order.

SwiGLU (EVA-02's MLP input half, timm's ``SwiGLU``: fc1_g and fc1_x, two nn.Linear over the same x):
- ``swiglu_kernel``: h = silu(x @ Wg^T + bg) * (x @ Wx^T + bx) as ONE pointer-kernel matmul with two
  fp32 accumulators: each K step loads the x tile once and the matching Wg and Wx tiles (both read
  in nn.Linear's [N, K] layout through their own strides), and the epilogue forms the gated product
  before the only store of h. timm's two parameters stay as they are: a single GEMM over a packed
  [Wg; Wx] weight would need that concatenation copied on every call (or a re-laid-out parameter,
  which breaks state_dict compatibility); two accumulators read the two tensors in place, and x,
  the big operand (M = B * N rows), is read once either way. With a gradient the epilogue also
  writes g and u (the two pre-activations) into one [M, 2N] buffer (g in columns [0, N), u in
  [N, 2N)) for the backward: what eager autograd saves, no recomputed GEMM.
- ``swiglu_backward_kernel``: from dh and that buffer, one elementwise pass writes d = [dg | du]
  ([M, 2N], dg = dh * u * silu'(g), du = dh * silu(g)) and per-row-program fp32 column sums of it
  (both bias gradients, reduced afterwards in a fixed order: deterministic). The weight gradients
  are then ONE GEMM d^T @ x ([2N, K]: rows [0, N) are dWg, [N, 2N) dWx) and dx = dg @ Wg + du @ Wx.
  No TMA variant yet (the pointer kernel on every GPU).

Activations (constexpr strings): "none", "gelu" (exact, erf), "gelu_tanh" (tanh approximation) and
"quick_gelu" (OpenAI CLIP's x * sigmoid(1.702 x)); the public spellings map onto these in
``vit_fast.ops.mlp`` (``resolve_activation``).
"""
import dataclasses

import torch
import triton
import triton.language as tl

from .host import cdiv, dot_precision, reject_bf16_dots_under_interpreter, sm_count, unit_stride_param

try:  # host-side TMA descriptors (in Triton 3.6 and 3.9 alike)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None

ACTIVATIONS = ("none", "gelu", "gelu_tanh", "quick_gelu")
GRAD_ACTIVATIONS = ACTIVATIONS[1:]  # the ones with a derivative kernel ("none" has none)

SQRT_HALF = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1 / sqrt(2 pi)
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi)
GELU_TANH_CUBIC = tl.constexpr(0.044715)
TWO_LOG2E = tl.constexpr(2.8853900817779268)  # 2 / ln 2: exp(-2|z|) = exp2(-TWO_LOG2E |z|)
LOG2E = tl.constexpr(1.4426950408889634)  # exp(z) = exp2(z * LOG2E)
QUICK_GELU_ALPHA = tl.constexpr(1.702)  # quick_gelu(x) = x * sigmoid(1.702 x)


# ----------------------------------------------------------------------------- elementwise math


@triton.jit
def _tanh(z):
    # exp(-2|z|) lies in (0, 1], so nothing overflows; |z| > ~9 gives exactly +-1 (GELU(+-60) = 60 / 0)
    e = tl.exp2(tl.abs(z) * -TWO_LOG2E)
    t = (1.0 - e) / (1.0 + e)
    return tl.where(z < 0, -t, t)


@triton.jit
def _sigmoid(z):
    # 1 / (1 + exp(-z)) on fp32: exp(-z) overflows to inf for z < ~-88 and gives exactly 0, never NaN
    return 1.0 / (1.0 + tl.exp2(z * -LOG2E))


@triton.jit
def _gelu_tanh_inner(pre):
    # (tensor first in every product with a constexpr: constexpr * tensor does not stay a tensor in the interpreter)
    return (pre + pre * pre * pre * GELU_TANH_CUBIC) * SQRT_2_OVER_PI


@triton.jit
def _activation(pre, ACTIVATION: tl.constexpr):
    """act(pre) on fp32."""
    if ACTIVATION == "gelu":
        return 0.5 * pre * (1.0 + tl.math.erf(pre * SQRT_HALF))
    elif ACTIVATION == "gelu_tanh":
        return 0.5 * pre * (1.0 + _tanh(_gelu_tanh_inner(pre)))
    elif ACTIVATION == "quick_gelu":
        return pre * _sigmoid(pre * QUICK_GELU_ALPHA)
    else:
        return pre


@triton.jit
def _activation_grad(pre, ACTIVATION: tl.constexpr):
    """d act / d pre on fp32 (the activation is never "none" here)."""
    if ACTIVATION == "gelu":
        cdf = 0.5 * (1.0 + tl.math.erf(pre * SQRT_HALF))
        return cdf + pre * INV_SQRT_2PI * tl.exp(-0.5 * pre * pre)
    elif ACTIVATION == "quick_gelu":
        # d/dx x s(a x) = s + a x s (1 - s); s (1 - s) -> 0 faster than x grows: 0 or 1 at the tails
        s = _sigmoid(pre * QUICK_GELU_ALPHA)
        return s + pre * QUICK_GELU_ALPHA * s * (1.0 - s)
    else:
        t = _tanh(_gelu_tanh_inner(pre))
        dinner = (pre * pre * (3.0 * GELU_TANH_CUBIC) + 1.0) * SQRT_2_OVER_PI
        return 0.5 * (1.0 + t) + 0.5 * pre * (1.0 - t * t) * dinner


# ----------------------------------------------------------------------------- forward kernels


@triton.jit
def _grouped_tile(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Tile id -> (row tile, column tile), GROUP_M row tiles at a time, so consecutive programs
    share X row blocks (and W column blocks) in L2."""
    tiles_per_group = GROUP_M * num_pid_n
    first_m = (tile_id // tiles_per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile_id % tiles_per_group) % group_rows
    pid_n = (tile_id % tiles_per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def _tile_offsets(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's output tile of the pointer kernels (grouped order, _grouped_tile) -> (pid_m,
    offs_m, offs_n, rows, cols): its row and column indices, and the same clamped to row / column 0
    past the edges (int64), which the loads read instead of masking every load; the stores are masked."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.where(offs_m < M, offs_m, 0).to(tl.int64)
    cols = tl.where(offs_n < N, offs_n, 0).to(tl.int64)
    return pid_m, offs_m, offs_n, rows, cols


@triton.jit
def _load_k_step(ptrs, offs_k, k_left, EVEN_K: tl.constexpr):
    """One K step's tile at ptrs; unless EVEN_K, zero where offs_k (the step's K indices, broadcast along
    the tile's K axis) >= k_left (the K left from this step)."""
    if EVEN_K:
        tile = tl.load(ptrs)
    else:
        tile = tl.load(ptrs, mask=offs_k < k_left, other=0.0)
    return tile


@triton.jit
def _bias_residual(acc, b_ptr, r_ptr, offs_m, offs_n, M, N, stride_rm, stride_rn,
                   HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """acc [BM, BN] fp32 + b[offs_n] + r[offs_m, offs_n] (masked at the edges)."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    if HAS_RESIDUAL:
        r_ptrs = r_ptr + offs_m.to(tl.int64)[:, None] * stride_rm + offs_n[None, :] * stride_rn
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        acc += tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32)
    return acc


@triton.jit
def linear_act_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # [N, K] (nn.Linear's weight), read as W^T [K, N] through its strides
    b_ptr,  # [N] (read only if HAS_BIAS)
    r_ptr,  # [M, N] residual (read only if HAS_RESIDUAL)
    y_ptr,  # [M, N] out: act(pre); "act_grad": dpre = acc * act'(pre)
    pre_ptr,  # [M, N] pre = x @ W^T + b (+ r), kept for the backward (written only if SAVE_PRE);
              # "act_grad": the saved pre, read (same strides as y)
    db_ptr,  # "act_grad" with HAS_BIAS: [cdiv(M, BLOCK_M), N] fp32 out, column sums of dpre per row tile
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_rm, stride_rn, stride_ym, stride_yn,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, SAVE_PRE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (exact fp32 dots), "tf32" (the default) otherwise
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no mask in the main loop
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EPILOGUE: tl.constexpr,  # "act": y = act(acc + b (+ r)); "act_grad": y = acc * act'(pre), HAS_BIAS: the
                             # bias-gradient partials to db_ptr (no bias, no residual added)
):
    pid_m, offs_m, offs_n, rows, cols = _tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + cols[None, :] * stride_wn  # [BLOCK_K, BLOCK_N]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        a = _load_k_step(x_ptrs, offs_k[None, :], K - k * BLOCK_K, EVEN_K)
        b = _load_k_step(w_ptrs, offs_k[:, None], K - k * BLOCK_K, EVEN_K)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    out_offs = offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :] * stride_yn
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if EPILOGUE == "act_grad":
        pre = tl.load(pre_ptr + out_offs, mask=mask, other=0.0).to(tl.float32)
        dpre = acc * _activation_grad(pre, ACTIVATION)
        tl.store(y_ptr + out_offs, dpre.to(y_ptr.dtype.element_ty), mask=mask)
        if HAS_BIAS:
            # rows past M hold row 0's products (the clamped loads): they must not enter the sums
            col_sums = tl.sum(tl.where(offs_m[:, None] < M, dpre, 0.0), axis=0)
            tl.store(db_ptr + pid_m * N + offs_n, col_sums, mask=offs_n < N)
    else:
        acc = _bias_residual(acc, b_ptr, r_ptr, offs_m, offs_n, M, N, stride_rm, stride_rn, HAS_BIAS,
                             HAS_RESIDUAL)
        if SAVE_PRE:
            tl.store(pre_ptr + out_offs, acc.to(pre_ptr.dtype.element_ty), mask=mask)
        tl.store(y_ptr + out_offs, _activation(acc, ACTIVATION).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _tma_epilogue(acc, y_desc, pre_desc, b_ptr, r_ptr, off_m, off_n, M, N, stride_rm, stride_rn,
                  ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                  SAVE_PRE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] fp32 at (off_m, off_n) -> bias, residual, activation, TMA stores
    (the descriptors clip what falls outside [M, N])."""
    offs_m = off_m + tl.arange(0, BLOCK_M)
    offs_n = off_n + tl.arange(0, BLOCK_N)
    acc = _bias_residual(acc, b_ptr, r_ptr, offs_m, offs_n, M, N, stride_rm, stride_rn, HAS_BIAS, HAS_RESIDUAL)
    if SAVE_PRE:
        pre_desc.store([off_m, off_n], acc.to(pre_desc.dtype))
    y_desc.store([off_m, off_n], _activation(acc, ACTIVATION).to(y_desc.dtype))


@triton.jit
def linear_act_tma_kernel(
    x_desc,  # [M, K], blocks [BLOCK_M, BLOCK_K]
    w_desc,  # [N, K], blocks [BLOCK_N, BLOCK_K]
    y_desc,  # [M, N] out, blocks [BLOCK_M, BLOCK_N // EPILOGUE_SPLIT]
    pre_desc,  # [M, N] pre, blocks as y_desc (y_desc again, unused, unless SAVE_PRE)
    b_ptr,  # [N] (read only if HAS_BIAS)
    r_ptr,  # [M, N] residual (read only if HAS_RESIDUAL)
    M, N, K, stride_rm, stride_rn,
    num_programs,  # the launch grid: min(SMs, tiles)
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, SAVE_PRE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # as in linear_act_kernel
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EPILOGUE_SPLIT: tl.constexpr,  # 1, or 2: store the tile as two [BLOCK_M, BLOCK_N / 2] halves (less smem)
    FLATTEN: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,  # tl.range options for the tile loop
):
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    # the epilogue's tile index has its own counter: with FLATTEN the pipeliner must not carry one
    # value into both the loads and the epilogue (as in Triton's persistent-matmul tutorial)
    tile_id_epilogue = tl.program_id(0) - num_programs
    for tile_id in tl.range(tl.program_id(0), num_pid_m * num_pid_n, num_programs, flatten=FLATTEN,
                            warp_specialize=WARP_SPECIALIZE):
        pid_m, pid_n = _grouped_tile(tile_id, num_pid_m, num_pid_n, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            a = x_desc.load([pid_m * BLOCK_M, ki * BLOCK_K])  # [BLOCK_M, BLOCK_K], zero past the edges
            b = w_desc.load([pid_n * BLOCK_N, ki * BLOCK_K])  # [BLOCK_N, BLOCK_K]
            acc = tl.dot(a, b.T, acc, input_precision=DOT_PRECISION)

        tile_id_epilogue += num_programs
        pid_m, pid_n = _grouped_tile(tile_id_epilogue, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        if EPILOGUE_SPLIT == 2:
            acc0, acc1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
            _tma_epilogue(acc0, y_desc, pre_desc, b_ptr, r_ptr, off_m, off_n, M, N, stride_rm, stride_rn,
                          ACTIVATION, HAS_BIAS, HAS_RESIDUAL, SAVE_PRE, BLOCK_M, BLOCK_N // 2)
            _tma_epilogue(acc1, y_desc, pre_desc, b_ptr, r_ptr, off_m, off_n + BLOCK_N // 2, M, N, stride_rm,
                          stride_rn, ACTIVATION, HAS_BIAS, HAS_RESIDUAL, SAVE_PRE, BLOCK_M, BLOCK_N // 2)
        else:
            _tma_epilogue(acc, y_desc, pre_desc, b_ptr, r_ptr, off_m, off_n, M, N, stride_rm, stride_rn,
                          ACTIVATION, HAS_BIAS, HAS_RESIDUAL, SAVE_PRE, BLOCK_M, BLOCK_N)


# ----------------------------------------------------------------------------- backward kernel


@triton.jit
def activation_backward_kernel(
    dy_ptr,  # [M, N] gradient of y
    pre_ptr,  # [M, N] saved pre-activation
    dpre_ptr,  # [M, N] out: dy * act'(pre)
    db_partial_ptr,  # [cdiv(M, ROWS_PER_PROGRAM), N] fp32 out: column sums of dpre per row program
    M, N, stride_dym, stride_dyn, stride_prem, stride_dprem,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr,
    ROWS_PER_PROGRAM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m = tl.program_id(0) // num_pid_n  # row programs and column blocks share axis 0 (no 65,535 limit)
    pid_n = tl.program_id(0) % num_pid_n
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    # elementwise fp32 sums, reduced over rows once after the loop: a cross-warp reduction (shared
    # memory + barrier) inside the loop would serialize the row blocks' loads
    db = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in tl.static_range(0, ROWS_PER_PROGRAM, BLOCK_M):
        offs_m = (pid_m * ROWS_PER_PROGRAM + start + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask = (offs_m[:, None] < M) & mask_n[None, :]
        dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn, mask=mask, other=0.0)
        pre = tl.load(pre_ptr + offs_m[:, None] * stride_prem + offs_n[None, :], mask=mask, other=0.0)
        dpre = dy.to(tl.float32) * _activation_grad(pre.to(tl.float32), ACTIVATION)  # 0 where masked
        tl.store(dpre_ptr + offs_m[:, None] * stride_dprem + offs_n[None, :],
                 dpre.to(dpre_ptr.dtype.element_ty), mask=mask)
        if HAS_BIAS:
            db += dpre
    if HAS_BIAS:
        tl.store(db_partial_ptr + pid_m * N + offs_n, tl.sum(db, axis=0), mask=mask_n)


# ----------------------------------------------------------------------------- SwiGLU


@triton.jit
def swiglu_kernel(
    x_ptr,  # [M, K]
    wg_ptr,  # [N, K] fc1_g.weight, read through its strides
    bg_ptr,  # [N] fc1_g.bias (read only if HAS_BIAS_G)
    wx_ptr,  # [N, K] fc1_x.weight, read through its strides
    bx_ptr,  # [N] fc1_x.bias (read only if HAS_BIAS_X)
    h_ptr,  # [M, N] out: silu(g) * u
    pre_ptr,  # [M, 2N] out (only if SAVE_PRE): g in columns [0, N), u in [N, 2N); unit column stride
    M, N, K,
    stride_xm, stride_xk, stride_wgn, stride_wgk, stride_wxn, stride_wxk, stride_hm, stride_hn, stride_pm,
    HAS_BIAS_G: tl.constexpr, HAS_BIAS_X: tl.constexpr, SAVE_PRE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    _, offs_m, offs_n, rows, cols = _tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk  # [BLOCK_M, BLOCK_K]
    wg_ptrs = wg_ptr + offs_k[:, None] * stride_wgk + cols[None, :] * stride_wgn  # [BLOCK_K, BLOCK_N]
    wx_ptrs = wx_ptr + offs_k[:, None] * stride_wxk + cols[None, :] * stride_wxn

    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_x = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        a = _load_k_step(x_ptrs, offs_k[None, :], K - k * BLOCK_K, EVEN_K)
        bg = _load_k_step(wg_ptrs, offs_k[:, None], K - k * BLOCK_K, EVEN_K)
        bx = _load_k_step(wx_ptrs, offs_k[:, None], K - k * BLOCK_K, EVEN_K)
        acc_g = tl.dot(a, bg, acc_g, input_precision=DOT_PRECISION)  # one x tile, two products
        acc_x = tl.dot(a, bx, acc_x, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        wg_ptrs += BLOCK_K * stride_wgk
        wx_ptrs += BLOCK_K * stride_wxk

    mask_n = offs_n < N
    if HAS_BIAS_G:
        acc_g += tl.load(bg_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS_X:
        acc_x += tl.load(bx_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    mask = (offs_m[:, None] < M) & mask_n[None, :]
    if SAVE_PRE:
        pre_offs = offs_m.to(tl.int64)[:, None] * stride_pm + offs_n[None, :]
        tl.store(pre_ptr + pre_offs, acc_g.to(pre_ptr.dtype.element_ty), mask=mask)
        tl.store(pre_ptr + pre_offs + N, acc_x.to(pre_ptr.dtype.element_ty), mask=mask)
    h = acc_g * _sigmoid(acc_g) * acc_x
    h_offs = offs_m.to(tl.int64)[:, None] * stride_hm + offs_n[None, :] * stride_hn
    tl.store(h_ptr + h_offs, h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def swiglu_backward_kernel(
    dh_ptr,  # [M, N] gradient of h
    pre_ptr,  # [M, 2N] the forward's g | u, unit column stride
    d_ptr,  # [M, 2N] out: dg | du, unit column stride
    db_partial_ptr,  # [cdiv(M, ROWS_PER_PROGRAM), 2N] fp32 out (if HAS_BIAS): column sums of d per row program
    M, N, stride_dhm, stride_dhn, stride_pm, stride_dm,
    HAS_BIAS: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m = tl.program_id(0) // num_pid_n
    pid_n = tl.program_id(0) % num_pid_n
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    db_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # elementwise sums, reduced once after the loop
    db_x = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in tl.static_range(0, ROWS_PER_PROGRAM, BLOCK_M):
        offs_m = (pid_m * ROWS_PER_PROGRAM + start + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask = (offs_m[:, None] < M) & mask_n[None, :]
        dh = tl.load(dh_ptr + offs_m[:, None] * stride_dhm + offs_n[None, :] * stride_dhn, mask=mask,
                     other=0.0).to(tl.float32)
        pre_ptrs = pre_ptr + offs_m[:, None] * stride_pm + offs_n[None, :]
        g = tl.load(pre_ptrs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(pre_ptrs + N, mask=mask, other=0.0).to(tl.float32)
        s = _sigmoid(g)
        dg = dh * u * (s + g * s * (1.0 - s))  # silu'(g) = s + g s (1 - s); 0 where masked (dh = 0)
        du = dh * (g * s)
        d_ptrs = d_ptr + offs_m[:, None] * stride_dm + offs_n[None, :]
        tl.store(d_ptrs, dg.to(d_ptr.dtype.element_ty), mask=mask)
        tl.store(d_ptrs + N, du.to(d_ptr.dtype.element_ty), mask=mask)
        if HAS_BIAS:
            db_g += dg
            db_x += du
    if HAS_BIAS:
        partial_ptrs = db_partial_ptr + pid_m * 2 * N + offs_n
        tl.store(partial_ptrs, tl.sum(db_g, axis=0), mask=mask_n)
        tl.store(partial_ptrs + N, tl.sum(db_x, axis=0), mask=mask_n)


# ----------------------------------------------------------------------------- launchers


@dataclasses.dataclass(frozen=True)
class MatmulConfig:
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    GROUP_M: int
    num_warps: int
    num_stages: int
    EPILOGUE_SPLIT: int = 1  # TMA kernel only
    FLATTEN: bool = False  # TMA kernel only
    WARP_SPECIALIZE: bool = False  # TMA kernel only


# (kernel, input element bytes) -> tile config on a GPU. Each fits an sm_90 block's shared memory
# (tests/sm90_scripts/mlp.py compiles them without a GPU); 4-byte inputs (exact fp32 dots on CUDA
# cores, no tensor cores) take BLOCK_K 32 for that. WARP_SPECIALIZE stays off: on sm_90 it did not
# change the binary. FLATTEN lets the next tile's loads overlap this tile's epilogue. ("tma", 2) is
# 128x256x64 / 8 warps / 3 stages, the Hopper persistent tile of Triton's tutorial (half the W
# re-reads per FLOP of a 128x128 tile), its epilogue stored in two 128-column halves to fit shared
# memory next to the 3 stages (pre and y). Re-measure with `python benchmarks/mlp.py --sweep`
# (M=50432, K=768, N=3072); benchmarks/NOTES.md has what the entries were chosen from.
CONFIGS = {
    ("pointer", 2): MatmulConfig(128, 128, 64, GROUP_M=8, num_warps=8, num_stages=4),
    ("pointer", 4): MatmulConfig(128, 128, 32, GROUP_M=8, num_warps=8, num_stages=3),
    ("tma", 2): MatmulConfig(128, 256, 64, GROUP_M=8, num_warps=8, num_stages=3, EPILOGUE_SPLIT=2),
    ("tma", 4): MatmulConfig(128, 128, 32, GROUP_M=8, num_warps=8, num_stages=3),
}
# Small M (ViT-B at batch 1-8: M = 197-1576): the tiles above leave most SMs idle (fc2 at batch 1,
# 768 columns: 2 x 3 tiles of 128 x 256 for 132 SMs). When the table's tile gives less than one
# wave, 64-row tiles with at most 128 columns give the device 4-8x the programs. benchmarks/vit.py's
# b1 / b8 rows time them.
SMALL_M_CONFIGS = {
    ("pointer", 2): MatmulConfig(64, 64, 64, GROUP_M=8, num_warps=4, num_stages=4),
    ("pointer", 4): MatmulConfig(64, 64, 32, GROUP_M=8, num_warps=4, num_stages=3),
    ("tma", 2): MatmulConfig(64, 128, 64, GROUP_M=8, num_warps=4, num_stages=4),
    ("tma", 4): MatmulConfig(64, 64, 32, GROUP_M=8, num_warps=4, num_stages=3),
}
# Under the interpreter small tiles are as fast and put tile edges, several K steps and a partial
# tile group inside small test shapes.
INTERPRETER_CONFIG = MatmulConfig(32, 64, 32, GROUP_M=4, num_warps=4, num_stages=1)

# activation_backward: a 256 x 128 slab per program (ViT-B b256: 197 x 24 = 4,728 programs), read as
# 64 x 128 blocks by 8 warps (32 fp32 values per thread per tensor); db partials [cdiv(M, 256), N] fp32
BWD_ROWS_PER_PROGRAM = 256
BWD_BLOCK_M = 64
BWD_BLOCK_N = 128
BWD_NUM_WARPS = 8


def table_config(kernel: str, element_size: int, M: int, N: int, sms: int) -> MatmulConfig:
    """The table's tile for an [M, N] output on a device of ``sms`` SMs: ``SMALL_M_CONFIGS`` when
    ``CONFIGS``' tile would not fill one wave."""
    key = (kernel, min(element_size, 4))
    cfg = CONFIGS[key]
    if cdiv(M, cfg.BLOCK_M) * cdiv(N, cfg.BLOCK_N) < sms:
        return SMALL_M_CONFIGS[key]
    return cfg


def default_config(kernel: str, x: torch.Tensor, N: int) -> MatmulConfig:
    """The config for x [M, K] times an [N, K] weight: the interpreter's, or the table's by size."""
    if x.device.type != "cuda":
        return INTERPRETER_CONFIG
    return table_config(kernel, x.element_size(), x.shape[0], N, sm_count(x.device.index))


def _tma_ready(t) -> bool:
    """A 2-D tensor TMA can address: unit last stride, 16-byte aligned base and row stride."""
    return (t is None or (t.stride(1) == 1 and t.data_ptr() % 16 == 0 and t.stride(0) > 0
                          and (t.stride(0) * t.element_size()) % 16 == 0))


def select_kernel(x, weight, out, pre_out=None) -> str:
    """"tma" on sm_90+ when every TMA-addressed tensor is aligned for it, else "pointer"."""
    if (x.device.type == "cuda" and TensorDescriptor is not None and torch.cuda.get_device_capability(x.device)[0] >= 9
            and x.shape[1] > 0 and all(_tma_ready(t) for t in (x, weight, out, pre_out))):
        return "tma"
    return "pointer"


def linear_act(x, weight, bias, residual, out, pre_out, activation, kernel=None, config=None, num_programs=None):
    """out = act(x @ weight^T + bias + residual); pre_out (optional) gets the value before act.

    x [M, K], weight [N, K] (any strides: read through them, or TMA-addressed when aligned), bias
    [N] or None (any stride: a strided or expanded one is copied, [N] values), residual [M, N] or
    None (any strides), out and pre_out [M, N] (written in their own dtypes). ``kernel`` "pointer" / "tma" and ``config`` default to
    ``select_kernel`` and the config table; ``num_programs`` (TMA kernel) defaults to the SM count.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    reject_bf16_dots_under_interpreter("linear / linear_gelu", linear_act_kernel, x.dtype)
    M, K = x.shape
    N = weight.shape[0]
    if M == 0 or N == 0:
        return out
    bias = unit_stride_param(bias)
    kernel = kernel or select_kernel(x, weight, out, pre_out)
    cfg = config or default_config(kernel, x, N)
    flags = dict(ACTIVATION=activation, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
                 SAVE_PRE=pre_out is not None, DOT_PRECISION=dot_precision(x.dtype))
    b = bias if bias is not None else out  # placeholders for pointers the kernel does not read
    r = residual if residual is not None else out
    r_strides = residual.stride() if residual is not None else (0, 0)
    if kernel == "tma":
        if K == 0:
            raise ValueError("linear_act: the TMA kernel needs K > 0")
        split_n = cfg.BLOCK_N // cfg.EPILOGUE_SPLIT
        x_desc = TensorDescriptor.from_tensor(x, [cfg.BLOCK_M, cfg.BLOCK_K])
        w_desc = TensorDescriptor.from_tensor(weight, [cfg.BLOCK_N, cfg.BLOCK_K])
        y_desc = TensorDescriptor.from_tensor(out, [cfg.BLOCK_M, split_n])
        pre_desc = TensorDescriptor.from_tensor(pre_out, [cfg.BLOCK_M, split_n]) if pre_out is not None else y_desc
        tiles = cdiv(M, cfg.BLOCK_M) * cdiv(N, cfg.BLOCK_N)
        if num_programs is None:
            num_programs = sm_count(x.device.index) if x.is_cuda else tiles
        num_programs = min(num_programs, tiles)
        linear_act_tma_kernel[(num_programs,)](
            x_desc, w_desc, y_desc, pre_desc, b, r, M, N, K, *r_strides, num_programs, **flags,
            BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M,
            EPILOGUE_SPLIT=cfg.EPILOGUE_SPLIT, FLATTEN=cfg.FLATTEN, WARP_SPECIALIZE=cfg.WARP_SPECIALIZE,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return out
    if out.stride() != (pre_out if pre_out is not None else out).stride():
        raise ValueError("linear_act: out and pre_out must have the same strides")
    grid = (cdiv(M, cfg.BLOCK_M) * cdiv(N, cfg.BLOCK_N),)
    linear_act_kernel[grid](
        x, weight, b, r, out, pre_out if pre_out is not None else out, out, M, N, K,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), *r_strides, out.stride(0), out.stride(1),
        **flags, EVEN_K=K % cfg.BLOCK_K == 0,
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M, EPILOGUE="act",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def act_grad_partial_rows(M: int, config: MatmulConfig) -> int:
    """Rows of the fp32 bias-gradient partials buffer ``linear_act_grad`` fills: one per row tile."""
    return cdiv(M, config.BLOCK_M)


def linear_act_grad(dy, weight, pre, dpre, activation, bias_grad=True, config=None):
    """dpre = (dy @ weight^T) * act'(pre) in one matmul (the pointer kernel's "act_grad" epilogue);
    returns the bias gradient of the layer that produced ``pre`` (fp32 [N], the column sums of
    dpre, reduced from per-row-tile partials in a fixed order), or None without ``bias_grad``.

    dy [M, K] (any strides), weight [N, K] read through its strides: for an MLP's fc2 weight W2
    [C, hidden] pass ``W2.t()`` ([hidden, C], strides (1, hidden): no copy); pre and dpre [M, N]
    with the same strides; activation one of ``GRAD_ACTIVATIONS``. Always the pointer kernel (module
    docstring); ``config`` defaults to the pointer kernel's table entry.
    """
    if activation not in GRAD_ACTIVATIONS:
        raise ValueError(f"activation: expected one of {GRAD_ACTIVATIONS}, got {activation!r}")
    reject_bf16_dots_under_interpreter("mlp backward", linear_act_kernel, dy.dtype)
    if pre.stride() != dpre.stride():
        raise ValueError("linear_act_grad: pre and dpre must have the same strides")
    M, K = dy.shape
    N = weight.shape[0]
    cfg = config or default_config("pointer", dy, N)
    rows = act_grad_partial_rows(M, cfg)
    db_partial = torch.empty((rows, N), dtype=torch.float32, device=dy.device) if bias_grad else None
    if M > 0 and N > 0:
        grid = (cdiv(M, cfg.BLOCK_M) * cdiv(N, cfg.BLOCK_N),)
        linear_act_kernel[grid](
            dy, weight, dpre, dpre, dpre, pre, db_partial if bias_grad else dpre, M, N, K,
            dy.stride(0), dy.stride(1), weight.stride(0), weight.stride(1), 0, 0, dpre.stride(0), dpre.stride(1),
            ACTIVATION=activation, HAS_BIAS=bias_grad, HAS_RESIDUAL=False, SAVE_PRE=False,
            DOT_PRECISION=dot_precision(dy.dtype), EVEN_K=K % cfg.BLOCK_K == 0,
            BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M, EPILOGUE="act_grad",
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return db_partial.sum(0) if bias_grad else None  # M = 0: no rows, zeros


def db_partial_rows(M: int) -> int:
    """Rows of the fp32 bias-gradient partials buffer ``activation_backward`` fills."""
    return cdiv(M, BWD_ROWS_PER_PROGRAM)


def activation_backward(dy, pre, dpre, activation, db_partial=None):
    """dpre = dy * act'(pre); db_partial [db_partial_rows(M), N] fp32 (optional) gets the column
    sums of dpre per row program (the bias gradient is ``db_partial.sum(0)``).

    dy, pre, dpre [M, N] with unit last stride; activation one of ``GRAD_ACTIVATIONS``.
    """
    if activation not in GRAD_ACTIVATIONS:
        raise ValueError(f"activation: expected one of {GRAD_ACTIVATIONS}, got {activation!r}")
    return _elementwise_backward(activation_backward_kernel, dy, pre, dpre, db_partial, BWD_BLOCK_N,
                                 ACTIVATION=activation)


def _elementwise_backward(kernel, grad, pre, out, db_partial, block_n, **constexprs):
    """The launch both elementwise backward kernels share (``activation_backward_kernel``,
    ``swiglu_backward_kernel``: the same leading parameters): grad [M, N] read through its strides,
    pre and out through their row strides; one program per BWD_ROWS_PER_PROGRAM-row slab and
    ``block_n``-column block, each writing its row of db_partial (optional). Nothing to launch when
    M or N is 0: db_partial is zeroed (its sum is then the zero bias gradient). Returns out."""
    M, N = grad.shape
    if M == 0 or N == 0:
        if db_partial is not None:
            db_partial.zero_()
        return out
    kernel[(db_partial_rows(M) * cdiv(N, block_n),)](
        grad, pre, out, db_partial if db_partial is not None else out, M, N,
        grad.stride(0), grad.stride(1), pre.stride(0), out.stride(0), **constexprs,
        HAS_BIAS=db_partial is not None, ROWS_PER_PROGRAM=BWD_ROWS_PER_PROGRAM, BLOCK_M=BWD_BLOCK_M,
        BLOCK_N=block_n, num_warps=BWD_NUM_WARPS)
    return out


# SwiGLU's two-accumulator matmul: twice linear_act_kernel's accumulator registers per tile (and two
# weight tiles per stage in shared memory), so the 16-bit tile is 128 x 64 (x 2 products: the work
# of a 128 x 128 tile), the fp32 one 64 x 64, so both fit an sm_90 block's shared memory
# (tests/sm90_scripts/mlp.py prints their registers and spills).
SWIGLU_CONFIGS = {
    2: MatmulConfig(128, 64, 64, GROUP_M=8, num_warps=8, num_stages=3),
    4: MatmulConfig(64, 64, 32, GROUP_M=8, num_warps=4, num_stages=3),
}
# swiglu_backward: two inputs of [M, N] and one of [M, 2N] per element pair, two accumulators: half
# activation_backward's block width (64 x 64 blocks over 256-row slabs)
SWIGLU_BWD_BLOCK_N = 64


def swiglu_config(x: torch.Tensor) -> MatmulConfig:
    if x.device.type != "cuda":
        return INTERPRETER_CONFIG
    return SWIGLU_CONFIGS[min(x.element_size(), 4)]


def swiglu(x, wg, bg, wx, bx, out, pre_out=None, config=None):
    """out = silu(x @ wg^T + bg) * (x @ wx^T + bx); pre_out [M, 2N] (optional, unit column stride)
    gets g | u, the two pre-activations.

    x [M, K], wg and wx [N, K] (any strides), bg / bx [N] or None (strided ones are copied), out
    [M, N] (any strides). ``config`` defaults to ``swiglu_config``.
    """
    reject_bf16_dots_under_interpreter("swiglu", swiglu_kernel, x.dtype)
    M, K = x.shape
    N = wg.shape[0]
    if M == 0 or N == 0:
        return out
    if pre_out is not None and (tuple(pre_out.shape) != (M, 2 * N) or pre_out.stride(1) != 1):
        raise ValueError(f"swiglu: pre_out must be [{M}, {2 * N}] with a unit column stride")
    bg, bx = unit_stride_param(bg), unit_stride_param(bx)
    cfg = config or swiglu_config(x)
    grid = (cdiv(M, cfg.BLOCK_M) * cdiv(N, cfg.BLOCK_N),)
    swiglu_kernel[grid](
        x, wg, bg if bg is not None else out, wx, bx if bx is not None else out, out,
        pre_out if pre_out is not None else out, M, N, K,
        x.stride(0), x.stride(1), wg.stride(0), wg.stride(1), wx.stride(0), wx.stride(1), out.stride(0),
        out.stride(1), pre_out.stride(0) if pre_out is not None else 0,
        HAS_BIAS_G=bg is not None, HAS_BIAS_X=bx is not None, SAVE_PRE=pre_out is not None,
        DOT_PRECISION=dot_precision(x.dtype), EVEN_K=K % cfg.BLOCK_K == 0,
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def swiglu_backward(dh, pre, d, db_partial=None):
    """d = [dg | du] ([M, 2N]) from dh [M, N] (any strides) and pre = the forward's [g | u] ([M, 2N]);
    db_partial [db_partial_rows(M), 2N] fp32 (optional) gets per-row-program column sums of d (the
    two bias gradients are ``db_partial.sum(0)`` split at N). pre and d: unit column stride."""
    if pre.stride(1) != 1 or d.stride(1) != 1:
        raise ValueError("swiglu_backward: pre and d need a unit column stride")
    return _elementwise_backward(swiglu_backward_kernel, dh, pre, d, db_partial, SWIGLU_BWD_BLOCK_N)
