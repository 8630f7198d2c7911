"""LayerNorm and residual-add + LayerNorm over the last dim: Triton kernels and their launchers.

Forward: each program normalizes ROWS_PER_PROGRAM rows held whole in registers (BLOCK_C = the
next power of two >= C, masked), statistics in fp32, and saves mean and rstd (fp32, one per row)
for the backward. With a residual it also writes s = x + residual (the next residual stream) and
normalizes s as stored, so y is exactly LN(s) and the backward can rebuild it from s.

Backward: dx in one pass per row from the saved statistics; dweight / dbias as per-program fp32
partial sums over a fixed set of programs (each loops over its rows), written to a
[num_programs, C] buffer and summed over programs by torch: no atomics, so the weight gradients
are bit-identical run after run.

Rows are any leading dims: an input whose last dim has unit stride and whose leading dims collapse
into one (a slice, a contiguous tensor) is read in place through its row stride; anything else
(a transposed last dim, an expanded dy) costs one contiguous copy. C is limited to MAX_C = 16384: a
row is held in registers, and wider rows would spill most of it to local memory.
"""
import functools

import torch
import triton
import triton.language as tl

MAX_C = 16384

# Hopper (H100) launch configurations by width, (max C, rows per program, num_warps). Memory-bound:
# what matters is enough bytes in flight per SM without spilling the row out of registers, i.e.
# elements per thread (rows * BLOCK_C / (32 * warps)) around 16-64 and many small programs per SM.
# Measured (H200, textbook kernel, TARGETS.md): C=768 -> 2 rows / 1 warp (83% of copy), C=1280 ->
# 1 row / 2 warps (78%), C=384 -> 2 rows / 1 warp, C=1024 -> 8 rows / 8 warps (70%). The other rows
# extend the same rule, checked for no register spills in sm_90 builds; `python
# benchmarks/layernorm.py --sweep` re-measures them on the card.
HOPPER_FWD_CONFIGS = (
    (128, 8, 2),
    (256, 4, 2),
    (512, 2, 1),
    (768, 2, 1),
    (1024, 8, 8),
    (2048, 1, 2),
    (4096, 1, 4),
    (8192, 1, 8),
    (MAX_C, 1, 32),
)
# Backward, (max C, rows per program, num_warps, programs per SM). It keeps more of the row live
# (x, dy, x-hat, w*dy and the two weight-gradient accumulators: ~5 registers per element), so it
# takes fewer elements per thread than the forward; its programs loop over rows, so programs per SM
# is set to what fits on an SM at once (sm_90 register counts), which sets the bytes in flight.
# Above C = 4096 the row no longer fits in registers without a few spills (correct, slower).
HOPPER_BWD_CONFIGS = (
    (128, 8, 8, 4),
    (256, 4, 8, 5),
    (512, 2, 8, 5),
    (1024, 1, 8, 5),
    (2048, 1, 16, 2),
    (4096, 1, 16, 1),
    (MAX_C, 1, 32, 1),
)
# Under Triton's interpreter a program costs a fixed overhead per operation, so big tiles and few
# programs are fastest; rows per program is capped so the row mask is still exercised.
INTERPRETER_TILE_ELEMENTS = 8192
INTERPRETER_MAX_ROWS = 16
INTERPRETER_BWD_PROGRAMS = 4


@triton.jit
def layer_norm_fwd_kernel(
    x_ptr,  # [n_rows, C], row stride x_row_stride, unit column stride
    residual_ptr,  # [n_rows, C], row stride residual_row_stride (read when HAS_RESIDUAL)
    y_ptr,  # [n_rows, C] out, contiguous
    s_ptr,  # [n_rows, C] out x + residual, contiguous (written when HAS_RESIDUAL)
    weight_ptr,  # [C] (read when HAS_WEIGHT)
    bias_ptr,  # [C] (read when HAS_BIAS)
    mean_ptr,  # [n_rows] fp32 out
    rstd_ptr,  # [n_rows] fp32 out
    n_rows,
    C,
    x_row_stride,
    residual_row_stride,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ROWS_PER_PROGRAM: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS_PER_PROGRAM + tl.arange(0, ROWS_PER_PROGRAM)  # [R]
    cols = tl.arange(0, BLOCK_C)  # [BLOCK_C]
    row_mask = rows < n_rows
    col_mask = cols < C
    mask = row_mask[:, None] & col_mask[None, :]
    x = tl.load(x_ptr + rows[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    out_offsets = rows[:, None] * C + cols[None, :]
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + rows[:, None] * residual_row_stride + cols[None, :], mask=mask, other=0.0)
        s = (x + r.to(tl.float32)).to(s_ptr.dtype.element_ty)
        tl.store(s_ptr + out_offsets, s, mask=mask)
        x = s.to(tl.float32)
    # Two passes over the row in registers. The fp32 mean of a row far from zero is itself off by
    # up to half an ulp (5e-4 at 1e4), which would shift every output by that much; so the mean is
    # corrected by the mean of the differences x - mean, which are exact there (Sterbenz).
    mean = tl.sum(x, axis=1) / C
    diff = tl.where(mask, x - mean[:, None], 0.0)
    correction = tl.sum(diff, axis=1) / C
    xc = tl.where(mask, diff - correction[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / C
    rstd = tl.math.rsqrt(var + eps)
    tl.store(mean_ptr + rows, mean + correction, mask=row_mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)
    y = xc * rstd[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + out_offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def layer_norm_bwd_kernel(
    dy_ptr,  # [n_rows, C], row stride dy_row_stride, unit column stride
    x_ptr,  # [n_rows, C], row stride x_row_stride: the forward's input (s for add + LN)
    ds_ptr,  # [n_rows, C], row stride ds_row_stride: gradient of s (read when HAS_DS)
    weight_ptr,  # [C] (read when HAS_WEIGHT)
    mean_ptr,  # [n_rows] fp32, from the forward
    rstd_ptr,  # [n_rows] fp32, from the forward
    dx_ptr,  # [n_rows, C] out, contiguous
    dweight_partial_ptr,  # [num_programs, C] fp32 out (written when COMPUTE_DWEIGHT)
    dbias_partial_ptr,  # [num_programs, C] fp32 out (written when COMPUTE_DBIAS)
    n_rows,
    C,
    dy_row_stride,
    x_row_stride,
    ds_row_stride,
    HAS_DS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    COMPUTE_DWEIGHT: tl.constexpr,
    COMPUTE_DBIAS: tl.constexpr,
    ROWS_PER_PROGRAM: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_C)
    col_mask = cols < C
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    dweight_acc = tl.zeros([ROWS_PER_PROGRAM, BLOCK_C], dtype=tl.float32)
    dbias_acc = tl.zeros([ROWS_PER_PROGRAM, BLOCK_C], dtype=tl.float32)
    # Row blocks pid, pid + num_programs, ...; the first row is carried in int64 (large tensors).
    first_row = pid.to(tl.int64) * ROWS_PER_PROGRAM
    for _ in range(pid, tl.cdiv(n_rows, ROWS_PER_PROGRAM), num_programs):
        rows = first_row + tl.arange(0, ROWS_PER_PROGRAM)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(x_ptr + rows[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows[:, None] * dy_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=row_mask, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
        # The saved fp32 mean is off by up to half its ulp; re-centre on the exact differences
        # (as the forward does) so x-hat stays exact for rows far from zero.
        diff = tl.where(mask, x - mean[:, None], 0.0)
        xc = tl.where(mask, diff - (tl.sum(diff, axis=1) / C)[:, None], 0.0)
        xhat = xc * rstd[:, None]
        if HAS_WEIGHT:
            wdy = dy * w
        else:
            wdy = dy
        # dx = rstd * (w*dy - mean(w*dy * x-hat) * x-hat - mean(w*dy))
        c1 = tl.sum(wdy * xhat, axis=1) / C
        c2 = tl.sum(wdy, axis=1) / C
        dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DS:
            dx += tl.load(ds_ptr + rows[:, None] * ds_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + rows[:, None] * C + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if COMPUTE_DWEIGHT:
            dweight_acc += dy * xhat
        if COMPUTE_DBIAS:
            dbias_acc += dy
        first_row += num_programs * ROWS_PER_PROGRAM
    if COMPUTE_DWEIGHT:
        tl.store(dweight_partial_ptr + pid * C + cols, tl.sum(dweight_acc, axis=0), mask=col_mask)
    if COMPUTE_DBIAS:
        tl.store(dbias_partial_ptr + pid * C + cols, tl.sum(dbias_acc, axis=0), mask=col_mask)


def rows_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` [..., C] as [rows, C] with unit column stride: a view when the leading dims collapse
    into one row stride, else one contiguous copy."""
    C = t.shape[-1]
    if t.stride(-1) == 1 or C == 1:
        try:
            return t.view(-1, C)
        except RuntimeError:  # leading dims do not collapse into one stride
            pass
    return t.contiguous().view(-1, C)


def check_width(C: int) -> None:
    if not 1 <= C <= MAX_C:
        raise ValueError(f"x: the kernels normalize 1 <= C <= {MAX_C} channels (a row is held in registers), got C={C}")


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _interpreter_rows(block_c: int) -> int:
    return max(1, min(INTERPRETER_MAX_ROWS, INTERPRETER_TILE_ELEMENTS // block_c))


def fwd_config(C: int, device: torch.device):
    """(rows per program, num_warps) for the forward at width C."""
    if device.type != "cuda":
        return _interpreter_rows(triton.next_power_of_2(C)), 1
    return next((rows, warps) for max_c, rows, warps in HOPPER_FWD_CONFIGS if C <= max_c)


def bwd_config(C: int, device: torch.device):
    """(rows per program, num_warps, number of programs) for the backward at width C."""
    if device.type != "cuda":
        return _interpreter_rows(triton.next_power_of_2(C)), 1, INTERPRETER_BWD_PROGRAMS
    rows, warps, per_sm = next(cfg[1:] for cfg in HOPPER_BWD_CONFIGS if C <= cfg[0])
    return rows, warps, per_sm * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def layer_norm_fwd(x, weight, bias, eps, residual=None, y=None, s=None, rows_per_program=None, num_warps=None):
    """LN over the last dim of ``x`` (of ``x + residual`` when given) -> (y, s or None, mean, rstd).

    x, residual: [..., C] (same shape and dtype); weight, bias: [C] or None. y and s come out
    contiguous in x's shape and dtype (pass preallocated ones to reuse them), mean and rstd as
    [rows] fp32. rows_per_program / num_warps override the tuned configuration (for sweeps).
    """
    C = x.shape[-1]
    check_width(C)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device) if y is None else y
    if residual is not None and s is None:
        s = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    n_rows = x.numel() // C
    mean = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if n_rows == 0:
        return y, s, mean, rstd
    default_rows, default_warps = fwd_config(C, x.device)
    rows_per_program = rows_per_program or default_rows
    x2 = rows_view(x)
    r2 = rows_view(residual) if residual is not None else x2
    layer_norm_fwd_kernel[(triton.cdiv(n_rows, rows_per_program),)](
        x2, r2, y, s if s is not None else y,
        weight if weight is not None else x2, bias if bias is not None else x2,
        mean, rstd,
        n_rows, C, x2.stride(0), r2.stride(0), eps,
        HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        ROWS_PER_PROGRAM=rows_per_program, BLOCK_C=triton.next_power_of_2(C),
        num_warps=num_warps or default_warps,
    )
    return y, s, mean, rstd


def layer_norm_bwd(dy, x, weight, mean, rstd, ds=None, compute_dweight=True, compute_dbias=True, dx=None,
                   rows_per_program=None, num_warps=None, num_programs=None):
    """Gradients of y = LN(x) -> (dx, dweight or None, dbias or None); with ``ds`` (the gradient
    of s = x + residual, for add + LN) dx = ds + dLN/dx, which is also the residual's gradient.

    dy, x, ds: [..., C]; weight: [C] or None; mean, rstd: [rows] fp32 from the forward. dweight is
    computed only when compute_dweight and weight is given; dbias when compute_dbias. dweight and
    dbias come in x's dtype, reduced in fp32 over a fixed number of programs (deterministic).
    """
    C = x.shape[-1]
    check_width(C)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if dx is None else dx
    compute_dweight = compute_dweight and weight is not None
    n_rows = x.numel() // C
    default_rows, default_warps, default_programs = bwd_config(C, x.device)
    rows_per_program = rows_per_program or default_rows
    num_programs = min(num_programs or default_programs, triton.cdiv(n_rows, rows_per_program))
    partial_shape = (num_programs, C)
    dweight_partial = torch.empty(partial_shape, dtype=torch.float32, device=x.device) if compute_dweight else None
    dbias_partial = torch.empty(partial_shape, dtype=torch.float32, device=x.device) if compute_dbias else None
    if n_rows > 0:
        x2, dy2 = rows_view(x), rows_view(dy)
        ds2 = rows_view(ds) if ds is not None else x2
        layer_norm_bwd_kernel[(num_programs,)](
            dy2, x2, ds2, weight if weight is not None else x2, mean, rstd,
            dx, dweight_partial if compute_dweight else dx, dbias_partial if compute_dbias else dx,
            n_rows, C, dy2.stride(0), x2.stride(0), ds2.stride(0),
            HAS_DS=ds is not None, HAS_WEIGHT=weight is not None,
            COMPUTE_DWEIGHT=compute_dweight, COMPUTE_DBIAS=compute_dbias,
            ROWS_PER_PROGRAM=rows_per_program, BLOCK_C=triton.next_power_of_2(C),
            num_warps=num_warps or default_warps,
        )
    dweight = dweight_partial.sum(0).to(x.dtype) if compute_dweight else None
    dbias = dbias_partial.sum(0).to(x.dtype) if compute_dbias else None
    return dx, dweight, dbias
