"""LayerNorm and residual-add + LayerNorm over the last dim: Triton kernels and their launchers.

Forward: each program normalizes ROWS_PER_PROGRAM rows held whole in registers (BLOCK_C = the
next power of two >= C, masked), statistics in fp32, and saves mean and rstd (fp32, one per row)
for the backward. With a residual it also writes s = x + residual (the next residual stream) and
normalizes s as stored, so y is exactly LN(s) and the backward can rebuild it from s.

Backward: a fixed set of programs (a few per SM, all resident at once) each loops over the row
blocks pid, pid + num_programs, ...; it loads the next block's x and dy (and ds) before it works on
the current one, so the loads of one block are in flight while the previous one is reduced, and
it keeps its dweight / dbias partial sums in fp32 registers. Each program writes one partial row
to a [num_programs, C] buffer that a second small kernel sums in a fixed order straight into the
gradients' dtype: no atomics, so the weight gradients are bit-identical run after run.

Rows are any leading dims: an input whose last dim has unit stride and whose leading dims collapse
into one (a slice, a contiguous tensor) is read in place through its row stride; anything else
(a transposed last dim, an expanded dy) costs one contiguous copy. C is limited to MAX_C = 16384: a
row is held in registers, and wider rows would spill most of it to local memory.
"""
import torch
import triton
import triton.language as tl

from .host import cdiv, next_power_of_2, sm_count, unit_stride_param

MAX_C = 16384

# Hopper (sm_90) launch configurations by width. Memory-bound kernels: what matters is enough bytes
# in flight per SM without spilling the row out of registers and without block-wide barriers. Up to
# C = 1024 every entry is the same 1-warp tile of 2048 elements, rows = 2048 // BLOCK_C (64 values
# per thread, no spills on sm_90; many such programs per SM keep ~50 KB of loads in flight;
# reductions are warp shuffles, no barriers). Wider rows take 2 or more warps each. Most entries
# follow from that tile rather than from a measurement of their own (benchmarks/NOTES.md);
# `python benchmarks/layer_norm.py --sweep --widths 384,768,1024,1280` re-measures them on the card.
# Forward, (max C, rows per program, num_warps).
HOPPER_FWD_CONFIGS = (
    (128, 16, 1),
    (256, 8, 1),
    (512, 4, 1),
    (1024, 2, 1),
    (2048, 1, 2),
    (4096, 1, 4),
    (8192, 1, 8),
    (MAX_C, 1, 32),
)
# Forward with a residual (add + LN): two loads and two stores per element, so half the rows of
# that tile (32 elements per thread, ~70 registers, no spills): as many or more programs per SM,
# with twice the bytes each (the plain forward's tile was slower with a residual: benchmarks/
# NOTES.md). `--sweep-kinds residual` of the same benchmark times them.
# Backward, (max C, rows per block, num_warps, programs per SM for (16-bit, 16-bit with ds, fp32,
# fp32 with ds)). It keeps more live than the forward (x, dy and the next block's x, dy, ds, x-hat,
# w * dy, and weight, dweight, dbias per column), so it takes 16 elements per thread and one row
# per block from C = 512 up. Its grid is one wave of persistent programs: programs per SM is how
# many fit in an SM's 64K registers at the sm_90 build's register count (tests/sm90_scripts/
# layer_norm.py prints the counts and checks the fit; no spills up to C = 4096). A program more
# than fits would run as a second wave and double the time, so these are upper bounds, not tuning
# knobs. At C = 768 bf16 that is ~24 KB of x and dy in flight per SM at all times (the
# prefetch). Above C = 4096 a few values spill (correct, slower).
HOPPER_BWD_CONFIGS = (
    (128, 4, 1, (12, 12, 12, 8)),
    (256, 2, 1, (16, 16, 16, 12)),
    (512, 1, 1, (16, 12, 12, 12)),
    (1024, 1, 2, (8, 6, 6, 4)),
    (2048, 1, 4, (4, 3, 3, 2)),
    (4096, 1, 8, (1, 1, 1, 1)),
    (8192, 1, 16, (1, 1, 1, 1)),
    (MAX_C, 1, 32, (1, 1, 1, 1)),
)
# Under Triton's interpreter a program costs a fixed overhead per operation, so big tiles and few
# programs are fastest; rows per program is capped so the row mask is still exercised.
INTERPRETER_TILE_ELEMENTS = 8192
INTERPRETER_MAX_ROWS = 16
INTERPRETER_BWD_PROGRAMS = 4
# The sum of the backward's [num_programs, C] partial rows (a few MB, still in L2): narrow column
# blocks so C = 768 gets 24 programs, PARAMS_BLOCK_P partial rows per step (16 fp32 values per
# thread and operand at 4 warps).
PARAMS_BLOCK_C = 32
PARAMS_BLOCK_P = 64


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
def load_bwd_row_block(rows, cols, col_mask, n_rows, x_ptr, dy_ptr, ds_ptr, mean_ptr, rstd_ptr,
                       x_row_stride, dy_row_stride, ds_row_stride, HAS_DS: tl.constexpr):
    """The backward's inputs for rows [R] x cols [BLOCK_C], in their own dtypes (ds is dy's stand-in
    without HAS_DS), and the [R, BLOCK_C] mask of the elements that exist."""
    row_mask = rows < n_rows
    mask = row_mask[:, None] & col_mask[None, :]
    x = tl.load(x_ptr + rows[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0)
    dy = tl.load(dy_ptr + rows[:, None] * dy_row_stride + cols[None, :], mask=mask, other=0.0)
    if HAS_DS:
        ds = tl.load(ds_ptr + rows[:, None] * ds_row_stride + cols[None, :], mask=mask, other=0.0)
    else:
        ds = dy
    mean = tl.load(mean_ptr + rows, mask=row_mask, other=0.0)
    rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
    return x, dy, ds, mean, rstd, mask


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
    # Row blocks pid, pid + num_programs, ...; rows in int64 (large tensors). The loop body loads
    # block i + 1 (x, dy, ds, mean, rstd) before it reduces block i: a load only blocks at its first
    # use, so the next block's bytes are in flight during this block's reductions and stores.
    rows = pid.to(tl.int64) * ROWS_PER_PROGRAM + tl.arange(0, ROWS_PER_PROGRAM)  # [R]
    row_step = num_programs.to(tl.int64) * ROWS_PER_PROGRAM
    x_next, dy_next, ds_next, mean_next, rstd_next, mask = load_bwd_row_block(
        rows, cols, col_mask, n_rows, x_ptr, dy_ptr, ds_ptr, mean_ptr, rstd_ptr,
        x_row_stride, dy_row_stride, ds_row_stride, HAS_DS)
    for _ in range(pid, tl.cdiv(n_rows, ROWS_PER_PROGRAM), num_programs):
        x, dy, ds, mean, rstd = x_next.to(tl.float32), dy_next.to(tl.float32), ds_next, mean_next, rstd_next
        out_offsets = rows[:, None] * C + cols[None, :]
        out_mask = mask
        rows += row_step  # past the last block the mask is all false: nothing is read there
        x_next, dy_next, ds_next, mean_next, rstd_next, mask = load_bwd_row_block(
            rows, cols, col_mask, n_rows, x_ptr, dy_ptr, ds_ptr, mean_ptr, rstd_ptr,
            x_row_stride, dy_row_stride, ds_row_stride, HAS_DS)
        # The saved fp32 mean is off by up to half its ulp; re-centre on the exact differences
        # (as the forward does) so x-hat stays exact for rows far from zero.
        diff = tl.where(out_mask, x - mean[:, None], 0.0)
        xc = tl.where(out_mask, diff - (tl.sum(diff, axis=1) / C)[:, None], 0.0)
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
            dx += ds.to(tl.float32)
        tl.store(dx_ptr + out_offsets, dx.to(dx_ptr.dtype.element_ty), mask=out_mask)
        if COMPUTE_DWEIGHT:
            dweight_acc += dy * xhat
        if COMPUTE_DBIAS:
            dbias_acc += dy
    if COMPUTE_DWEIGHT:
        tl.store(dweight_partial_ptr + pid * C + cols, tl.sum(dweight_acc, axis=0), mask=col_mask)
    if COMPUTE_DBIAS:
        tl.store(dbias_partial_ptr + pid * C + cols, tl.sum(dbias_acc, axis=0), mask=col_mask)


@triton.jit
def layer_norm_bwd_params_kernel(
    dweight_partial_ptr,  # [n_partials, C] fp32 (read when COMPUTE_DWEIGHT)
    dbias_partial_ptr,  # [n_partials, C] fp32 (read when COMPUTE_DBIAS)
    dweight_ptr,  # [C] out (written when COMPUTE_DWEIGHT)
    dbias_ptr,  # [C] out (written when COMPUTE_DBIAS)
    n_partials,
    C,
    COMPUTE_DWEIGHT: tl.constexpr,
    COMPUTE_DBIAS: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """dweight and dbias = the column sums of the backward's partial rows, in a fixed order (one
    launch for both, written in the gradients' dtype)."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    dweight_acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    dbias_acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for first in range(0, n_partials, BLOCK_P):
        parts = first + tl.arange(0, BLOCK_P)
        mask = (parts < n_partials)[:, None] & col_mask[None, :]
        offsets = parts[:, None] * C + cols[None, :]
        if COMPUTE_DWEIGHT:
            dweight_acc += tl.load(dweight_partial_ptr + offsets, mask=mask, other=0.0)
        if COMPUTE_DBIAS:
            dbias_acc += tl.load(dbias_partial_ptr + offsets, mask=mask, other=0.0)
    if COMPUTE_DWEIGHT:
        tl.store(dweight_ptr + cols, tl.sum(dweight_acc, axis=0).to(dweight_ptr.dtype.element_ty), mask=col_mask)
    if COMPUTE_DBIAS:
        tl.store(dbias_ptr + cols, tl.sum(dbias_acc, axis=0).to(dbias_ptr.dtype.element_ty), mask=col_mask)


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


def _interpreter_rows(block_c: int) -> int:
    return max(1, min(INTERPRETER_MAX_ROWS, INTERPRETER_TILE_ELEMENTS // block_c))


def fwd_config(C: int, device: torch.device, has_residual: bool = False):
    """(rows per program, num_warps) for the forward at width C (with a residual: add + LN)."""
    if device.type != "cuda":
        return _interpreter_rows(next_power_of_2(C)), 1
    rows, warps = next((rows, warps) for max_c, rows, warps in HOPPER_FWD_CONFIGS if C <= max_c)
    return (max(1, rows // 2) if has_residual else rows), warps


def bwd_config(C: int, device: torch.device, dtype: torch.dtype = torch.bfloat16, has_ds: bool = False):
    """(rows per program, num_warps, number of programs) for the backward at width C."""
    if device.type != "cuda":
        return _interpreter_rows(next_power_of_2(C)), 1, INTERPRETER_BWD_PROGRAMS
    rows, warps, per_sm = next(cfg[1:] for cfg in HOPPER_BWD_CONFIGS if C <= cfg[0])
    per_sm = per_sm[2 * (dtype == torch.float32) + has_ds]
    return rows, warps, per_sm * sm_count(device.index if device.index is not None else torch.cuda.current_device())


def layer_norm_fwd(x, weight, bias, eps, residual=None, y=None, s=None, rows_per_program=None, num_warps=None,
                   y_dtype=None):
    """LN over the last dim of ``x`` (of ``x + residual`` when given) -> (y, s or None, mean, rstd).

    x, residual: [..., C] of the same shape, any float dtypes (each read in its own, math in fp32);
    weight, bias: [C] or None, any float dtype, any stride. s comes out in the promoted dtype of x and residual,
    y in ``y_dtype`` (default: s's dtype, or x's without a residual), both contiguous in x's shape
    (pass preallocated ones to reuse them); mean and rstd as [rows] fp32. rows_per_program /
    num_warps override the tuned configuration (for sweeps).
    """
    C = x.shape[-1]
    check_width(C)
    stream_dtype = torch.promote_types(x.dtype, residual.dtype) if residual is not None else x.dtype
    y = torch.empty(x.shape, dtype=y_dtype or stream_dtype, device=x.device) if y is None else y
    if residual is not None and s is None:
        s = torch.empty(x.shape, dtype=stream_dtype, device=x.device)
    n_rows = x.numel() // C
    mean = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if n_rows == 0:
        return y, s, mean, rstd
    default_rows, default_warps = fwd_config(C, x.device, residual is not None)
    rows_per_program = rows_per_program or default_rows
    weight, bias = unit_stride_param(weight), unit_stride_param(bias)
    x2 = rows_view(x)
    r2 = rows_view(residual) if residual is not None else x2
    layer_norm_fwd_kernel[(cdiv(n_rows, rows_per_program),)](
        x2, r2, y, s if s is not None else y,
        weight if weight is not None else x2, bias if bias is not None else x2,
        mean, rstd,
        n_rows, C, x2.stride(0), r2.stride(0), eps,
        HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        ROWS_PER_PROGRAM=rows_per_program, BLOCK_C=next_power_of_2(C),
        num_warps=num_warps or default_warps,
    )
    return y, s, mean, rstd


def param_grad_dtype(x, weight):
    """The dtype of dweight and dbias: weight's (fp32 parameters under autocast), else x's."""
    return weight.dtype if weight is not None else x.dtype


def layer_norm_bwd(dy, x, weight, mean, rstd, ds=None, compute_dweight=True, compute_dbias=True, dx=None,
                   rows_per_program=None, num_warps=None, num_programs=None):
    """Gradients of y = LN(x) -> (dx, dweight or None, dbias or None); with ``ds`` (the gradient
    of s = x + residual, for add + LN) dx = ds + dLN/dx, which is also the residual's gradient.

    dy, x, ds: [..., C], any float dtypes (dx comes in x's); weight: [C] or None; mean, rstd:
    [rows] fp32 from the forward. dweight is computed only when compute_dweight and weight is
    given; dbias when compute_dbias. dweight and dbias come in `param_grad_dtype`, reduced in fp32
    over a fixed number of programs (deterministic).
    """
    C = x.shape[-1]
    check_width(C)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if dx is None else dx
    compute_dweight = compute_dweight and weight is not None
    n_rows = x.numel() // C
    default_rows, default_warps, default_programs = bwd_config(C, x.device, x.dtype, ds is not None)
    rows_per_program = rows_per_program or default_rows
    param_dtype = param_grad_dtype(x, weight)
    dweight = torch.empty(C, dtype=param_dtype, device=x.device) if compute_dweight else None
    dbias = torch.empty(C, dtype=param_dtype, device=x.device) if compute_dbias else None
    if n_rows == 0:
        for grad in (dweight, dbias):
            if grad is not None:
                grad.zero_()
        return dx, dweight, dbias
    num_programs = min(num_programs or default_programs, cdiv(n_rows, rows_per_program))
    dweight_partial = torch.empty((num_programs, C), dtype=torch.float32, device=x.device) if compute_dweight else None
    dbias_partial = torch.empty((num_programs, C), dtype=torch.float32, device=x.device) if compute_dbias else None
    weight = unit_stride_param(weight)
    x2, dy2 = rows_view(x), rows_view(dy)
    ds2 = rows_view(ds) if ds is not None else x2
    layer_norm_bwd_kernel[(num_programs,)](
        dy2, x2, ds2, weight if weight is not None else x2, mean, rstd,
        dx, dweight_partial if compute_dweight else dx, dbias_partial if compute_dbias else dx,
        n_rows, C, dy2.stride(0), x2.stride(0), ds2.stride(0),
        HAS_DS=ds is not None, HAS_WEIGHT=weight is not None,
        COMPUTE_DWEIGHT=compute_dweight, COMPUTE_DBIAS=compute_dbias,
        ROWS_PER_PROGRAM=rows_per_program, BLOCK_C=next_power_of_2(C),
        num_warps=num_warps or default_warps,
    )
    if compute_dweight or compute_dbias:
        block_c = min(PARAMS_BLOCK_C, next_power_of_2(C))
        partial = dweight_partial if compute_dweight else dbias_partial
        layer_norm_bwd_params_kernel[(cdiv(C, block_c),)](
            partial, dbias_partial if compute_dbias else partial,
            dweight if compute_dweight else dbias, dbias if compute_dbias else dweight,
            num_programs, C, COMPUTE_DWEIGHT=compute_dweight, COMPUTE_DBIAS=compute_dbias,
            BLOCK_P=PARAMS_BLOCK_P, BLOCK_C=block_c, num_warps=4,
        )
    return dx, dweight, dbias
