"""LayerNorm and add + LayerNorm kernels: forward and every gradient against float64, the launch
configurations, registration (opcheck, torch.compile), the drop-in module and bad inputs.

On CPU the kernels run under Triton's interpreter (fp32, fp16); `pytest -m gpu` adds bf16, the
widths 1280 / 8192, more than 65,535 rows, determinism and torch.compile on a GPU.
"""
import pytest
import torch
import torch.nn.functional as F
from numerics import DTYPE_BOUND
from opnumerics import (PATHS, check_close, check_compiled, check_op_paths, compare_to_float64, float64_gradcheck,
                        module_fn, require_kernel_path, rounding_floors, run, select_path, vit_fast_calls)

import sm90

import vit_fast
from vit_fast import dispatch, reference
from vit_fast import functional as VF
from vit_fast.kernels import layer_norm as kernels
from vit_fast.ops import layer_norm as ops

FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32


def make_x(shape, dtype, device, mean_offset=0.0, layout="contiguous"):
    """Unit-variance values around mean_offset in `shape`, laid out as asked:
    'contiguous'; 'rowstride', a slice of wider rows (read in place through its row stride);
    'copy', leading dims that do not collapse into one stride (the launcher copies it)."""
    *lead, C = shape
    if layout == "contiguous":
        x = torch.randn(shape, device=device) + mean_offset
    elif layout == "rowstride":
        x = (torch.randn(*lead, C + 24, device=device) + mean_offset)[..., 3:C + 3]
    else:
        assert len(lead) == 2, "'copy' transposes the two leading dims"
        x = (torch.randn(lead[1], lead[0], C, device=device) + mean_offset).transpose(0, 1)
    return x.to(dtype)


def make_affine(C, affine, dtype, device):
    weight = torch.randn(C, device=device).to(dtype) if affine in ("both", "weight") else None
    bias = torch.randn(C, device=device).to(dtype) if affine in ("both", "bias") else None
    return weight, bias


def check_against_float64(names, fn_kernel, fn_torch, fn_ref, inputs, grads_out, torch_inputs=None):
    """The kernel path, PyTorch in the same dtype and float64 math on the same inputs: every
    output and every input gradient within the dtype's bound and 2x (3x for gradients) torch's
    error + the fp32 rounding floor (opnumerics.compare_to_float64); outputs and gradients in the
    inputs' dtype, outputs contiguous on the kernel path."""
    dtype = inputs[0].dtype
    results = compare_to_float64(names, fn_kernel, fn_torch, fn_ref, inputs, grads_out, torch_inputs=torch_inputs)
    on_kernels = dispatch.use_kernels(inputs[0])
    for name, (ours, _, _) in results.items():
        assert ours.dtype == dtype, name
        if not name.startswith("d"):  # an output
            assert ours.is_contiguous() or not on_kernels, name
    return results


def assert_kernel_ran(before, device, *ops_):
    """The kernel path ran each op once since `before` (unless VIT_FAST_FORCE_TORCH turned it off)."""
    if dispatch.use_kernels(torch.zeros(1, device=device)):
        for op in ops_:
            assert dispatch.kernel_launches[op] == before[op] + 1, op


# shape, dtype, affine, eps, mean offset, layout
LAYER_NORM_CASES = [
    ((2, 197, 768), FP32, "both", 1e-6, 0.0, "contiguous"),
    ((2, 197, 768), FP16, "both", 1e-6, 0.0, "rowstride"),
    ((394, 100), FP32, "both", 1e-5, 0.0, "rowstride"),
    ((394, 100), FP16, "weight", 1e-6, 0.0, "contiguous"),
    ((2, 197, 384), FP32, "none", 1e-5, 0.0, "copy"),
    ((2, 197, 384), FP16, "none", 1e-6, 0.0, "contiguous"),
    ((197, 384), FP32, "bias", 1e-6, 0.0, "contiguous"),
    ((1, 768), FP32, "weight", 1e-5, 0.0, "contiguous"),
    ((1, 100), FP16, "both", 1e-5, 0.0, "contiguous"),
    ((394, 768), FP32, "both", 1e-6, 1e4, "contiguous"),
    ((2, 197, 100), FP32, "none", 1e-5, 1e4, "copy"),
    ((8, 1280), FP32, "both", 1e-6, 0.0, "rowstride"),
    ((4, 8192), FP32, "both", 1e-6, 0.0, "contiguous"),
    ((0, 768), FP32, "both", 1e-6, 0.0, "contiguous"),
    ((2, 0, 384), FP16, "none", 1e-6, 0.0, "contiguous"),
]


def skip_offset_on_torch_path(device, mean_offset):
    if mean_offset and not dispatch.use_kernels(torch.zeros(1, device=device)):
        pytest.skip("PyTorch path (VIT_FAST_FORCE_TORCH=1): its fp32 mean is off by half an ulp at 1e4")


def _layer_norm_check(device, shape, dtype, affine, eps, mean_offset, layout):
    skip_offset_on_torch_path(device, mean_offset)
    x = make_x(shape, dtype, device, mean_offset, layout)
    weight, bias = make_affine(shape[-1], affine, dtype, device)
    dy = torch.randn(shape, device=device).to(dtype)
    before = dispatch.kernel_launches.copy()
    check_against_float64(
        ["y", "dx", "dweight", "dbias"],
        lambda x, w, b: VF.layer_norm(x, w, b, eps),
        lambda x, w, b: F.layer_norm(x, (shape[-1],), w, b, eps),
        lambda x, w, b: reference.layer_norm(x, w, b, eps),
        [x, weight, bias], [dy])
    assert_kernel_ran(before, device, "layer_norm_fwd", "layer_norm_bwd")


@pytest.mark.parametrize("shape,dtype,affine,eps,mean_offset,layout", LAYER_NORM_CASES)
def test_layer_norm_matches_float64(device, shape, dtype, affine, eps, mean_offset, layout):
    _layer_norm_check(device, shape, dtype, affine, eps, mean_offset, layout)


# shape, dtype, affine, eps, mean offset, layout, whether s is used (ds given) or not (ds None)
ADD_LAYER_NORM_CASES = [
    ((2, 197, 768), FP32, "both", 1e-6, 0.0, "contiguous", True),
    ((2, 197, 768), FP16, "both", 1e-6, 0.0, "contiguous", True),
    ((394, 100), FP32, "weight", 1e-5, 0.0, "rowstride", False),
    ((2, 197, 384), FP16, "none", 1e-6, 0.0, "copy", True),
    ((2, 197, 384), FP32, "bias", 1e-5, 0.0, "copy", False),
    ((1, 768), FP32, "both", 1e-6, 1e4, "contiguous", True),
    ((394, 768), FP32, "both", 1e-6, 1e4, "rowstride", False),
    ((0, 384), FP32, "both", 1e-6, 0.0, "contiguous", True),
]


def _add_layer_norm_check(device, shape, dtype, affine, eps, mean_offset, layout, s_used):
    skip_offset_on_torch_path(device, mean_offset)
    x = make_x(shape, dtype, device, mean_offset, layout)
    residual = make_x(shape, dtype, device, 0.0, layout)
    if mean_offset:  # on the 2^-10 grid of fp32 values near 1e4, so s = x + residual is exact and
        residual = (residual * 1024).round() / 1024  # y's error is the LayerNorm's alone
    weight, bias = make_affine(shape[-1], affine, dtype, device)
    dy = torch.randn(shape, device=device).to(dtype)
    ds = torch.randn(shape, device=device).to(dtype) if s_used else None
    before = dispatch.kernel_launches.copy()

    def add_then_ln(x, r, w, b):
        s = x + r
        return F.layer_norm(s, (shape[-1],), w, b, eps), s

    check_against_float64(
        ["y", "s", "dx", "dresidual", "dweight", "dbias"],
        lambda x, r, w, b: VF.add_layer_norm(x, r, w, b, eps),
        add_then_ln,
        lambda x, r, w, b: reference.add_layer_norm(x, r, w, b, eps),
        [x, residual, weight, bias], [dy, ds])
    assert_kernel_ran(before, device, "add_layer_norm_fwd", "add_layer_norm_bwd")


@pytest.mark.parametrize("shape,dtype,affine,eps,mean_offset,layout,s_used", ADD_LAYER_NORM_CASES)
def test_add_layer_norm_matches_float64(device, shape, dtype, affine, eps, mean_offset, layout, s_used):
    _add_layer_norm_check(device, shape, dtype, affine, eps, mean_offset, layout, s_used)


def test_only_s_used_gives_ds_as_the_gradient(device):
    """When y is left out of the loss the whole gradient of x and residual is ds."""
    x, r = (torch.randn(3, 100, device=device, requires_grad=True) for _ in range(2))
    ds = torch.randn(3, 100, device=device)
    _, s = VF.add_layer_norm(x, r, None, None)
    s.backward(ds)
    torch.testing.assert_close(x.grad, ds, rtol=0, atol=0)
    torch.testing.assert_close(r.grad, ds, rtol=0, atol=0)


# shape, dtype, layout, which outputs feed the loss
STREAM_CASES = [
    ((2, 197, 768), FP32, "contiguous", "both"),
    ((394, 100), FP16, "rowstride", "both"),
    ((394, 100), FP32, "contiguous", "y"),
    ((394, 100), FP32, "contiguous", "s"),
]


@pytest.mark.parametrize("shape,dtype,layout,used", STREAM_CASES)
@pytest.mark.parametrize("path", PATHS)
def test_add_layer_norm_without_residual_passes_the_stream(device, monkeypatch, path, shape, dtype, layout, used):
    """residual None: (LN(x), x) with the stream's gradient added to dx by the LayerNorm backward
    itself (one layer_norm_bwd launch, no add_layer_norm launches); the same numbers as torch's
    LN(x) beside x used twice."""
    device = select_path(path, monkeypatch, device)
    x = make_x(shape, dtype, device, 0.0, layout)
    weight, bias = make_affine(shape[-1], "both", dtype, device)
    dy = torch.randn(shape, device=device).to(dtype) if used in ("both", "y") else None
    ds = torch.randn(shape, device=device).to(dtype) if used in ("both", "s") else None
    before = dispatch.kernel_launches.copy()

    def ln_and_stream(x, w, b):
        return F.layer_norm(x, (shape[-1],), w, b, 1e-6), x * 1  # x * 1: a second consumer of x, as a later op

    results = check_against_float64(
        ["y", "s", "dx", "dweight", "dbias"], lambda x, w, b: VF.add_layer_norm(x, None, w, b),
        ln_and_stream, ln_and_stream, [x, weight, bias], [dy, ds])
    if path == "kernel" and used != "s":
        assert dispatch.kernel_launches["layer_norm_fwd"] == before["layer_norm_fwd"] + 1
        assert dispatch.kernel_launches["layer_norm_bwd"] == before["layer_norm_bwd"] + 1
        assert dispatch.kernel_launches["add_layer_norm_fwd"] == before["add_layer_norm_fwd"]
    torch.testing.assert_close(results["s"][0], x, rtol=0, atol=0)


def test_stream_gradient_joins_dx_in_the_kernel(device):
    """On the kernel path the stream comes back as x itself (a view, no copy) and x has one autograd
    consumer: its gradient is formed inside the LayerNorm backward, with no accumulation pass."""
    x = torch.randn(4, 64, device=device, requires_grad=True)
    y, s = VF.add_layer_norm(x, None, None, None)
    assert s.data_ptr() == x.data_ptr()
    assert y.grad_fn is s.grad_fn  # one node produces both, so x feeds autograd once
    (y.sum() + (s * 2).sum()).backward()
    x64 = x.detach().double().requires_grad_()
    (F.layer_norm(x64, (64,), eps=1e-6).sum() + (x64 * 2).sum()).backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)


def test_mixed_precision_reads_each_dtype_and_rounds_once(device):
    """fp16 x + fp32 residual with fp32 weights, y asked in fp16 (what a block under autocast feeds
    its next Linear): the numbers of torch upcasting first, s = x.float() + residual exactly and
    y = LN(s) in fp32 rounded once; each gradient in its input's dtype, against float64."""
    shape = (3, 7, 100)
    x, dy = (torch.randn(shape, device=device).to(FP16) for _ in range(2))
    r, ds = (torch.randn(shape, device=device) for _ in range(2))
    w, b = torch.randn(100, device=device), torch.randn(100, device=device)
    before = dispatch.kernel_launches.copy()
    (y, s), grads = run(lambda x, r, w, b: VF.add_layer_norm(x, r, w, b, 1e-6, out_dtype=FP16), [x, r, w, b], [dy, ds])
    assert_kernel_ran(before, device, "add_layer_norm_fwd", "add_layer_norm_bwd")
    assert (y.dtype, s.dtype) == (FP16, FP32) and [g.dtype for g in grads] == [FP16, FP32, FP32, FP32]
    torch.testing.assert_close(s, x.float() + r, rtol=0, atol=0)

    def upcast_then_ln(x, r, w, b):
        s = x.float() + r
        return F.layer_norm(s, (100,), w, b, 1e-6).to(FP16), s

    (t_y, _), t_grads = run(upcast_then_ln, [x, r, w, b], [dy, ds])
    (r_y, _), r_grads = run(lambda x, r, w, b: reference.add_layer_norm(x, r, w, b, 1e-6),
                            [t.double() for t in (x, r, w, b)], [dy.double(), ds.double()])
    floors, grad_floors = rounding_floors(lambda x, r, w, b: reference.add_layer_norm(x, r, w, b, 1e-6),
                                          [x, r, w, b], [dy, ds])
    check_close("y fp16", y, t_y, r_y, DTYPE_BOUND[FP16], floor=floors[0])
    for name, g, t_g, r_g, floor in zip(["dx fp16", "dresidual", "dweight", "dbias"], grads, t_grads, r_grads,
                                        grad_floors):
        check_close(name, g, t_g, r_g, DTYPE_BOUND[g.dtype], factor=3.0, floor=floor)


def test_out_dtype_is_the_fp32_result_rounded_once(device):
    x, dy = torch.randn(4, 9, 100, device=device), torch.randn(4, 9, 100, device=device).to(FP16)
    w, b = torch.randn(100, device=device), torch.randn(100, device=device)
    (y,), (dx, dw, db) = run(lambda x, w, b: VF.layer_norm(x, w, b, out_dtype=FP16), [x, w, b], [dy])
    (want,), want_grads = run(lambda x, w, b: F.layer_norm(x, (100,), w, b, 1e-6).to(FP16), [x, w, b], [dy])
    assert y.dtype == FP16 and (dx.dtype, dw.dtype, db.dtype) == (FP32, FP32, FP32)
    torch.testing.assert_close(y, want, rtol=1e-3, atol=1e-3)  # an fp32 LN a few ulps off rounds to 1 fp16 ulp
    for got, expected in zip((dx, dw, db), want_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- launchers


def _width_in(max_c):
    """A width just under a table bucket's bound (not a power of two unless the bound is tiny)."""
    return max_c - 3


@pytest.mark.parametrize("max_c,rows_per_program,num_warps",
                         [(max_c, max(1, rows // k), warps) for max_c, rows, warps in kernels.HOPPER_FWD_CONFIGS
                          for k in ((1, 2) if rows > 1 else (1,))])
def test_fwd_launch_configs_write_every_element(device, max_c, rows_per_program, num_warps):
    """Every tabled forward configuration (LN's, and add + LN's half the rows), into NaN-poisoned
    outputs, against float64."""
    C, n_rows = _width_in(max_c), 37
    x, residual = torch.randn(n_rows, C, device=device), torch.randn(n_rows, C, device=device)
    weight, bias = make_affine(C, "both", FP32, device)
    y, s = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
    _, _, mean, rstd = kernels.layer_norm_fwd(x, weight, bias, 1e-6, residual=residual, y=y, s=s,
                                              rows_per_program=rows_per_program, num_warps=num_warps)
    def stats(x, residual, weight, bias):  # y, s, mean, rstd as torch computes them in x's dtype
        s = x + residual
        var, mean = torch.var_mean(s, -1, unbiased=False)
        return F.layer_norm(s, (C,), weight, bias, 1e-6), s, mean, (var + 1e-6).rsqrt()

    inputs = [x, residual, weight, bias]
    torch_outs = stats(*inputs)
    ref_outs = stats(*(t.double() for t in inputs))
    floors, _ = rounding_floors(stats, inputs)
    for name, out, t_out, ref, floor in zip(("y", "s", "mean", "rstd"), (y, s, mean, rstd), torch_outs, ref_outs,
                                            floors):
        check_close(name, out, t_out, ref, DTYPE_BOUND[FP32], floor=floor)


def _ln_grads(x, weight, bias, dy, eps=1e-6):
    """(dx, dweight, dbias) of F.layer_norm in x's dtype, and the fp32 rounding floors of the three."""
    (_,), grads = run(lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b, eps), [x, weight, bias], [dy])
    _, floors = rounding_floors(lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b, eps), [x, weight, bias], [dy])
    return grads, floors


@pytest.mark.parametrize("max_c,rows_per_program,num_warps", [  # the widest entry takes ~7 s on the interpreter
    pytest.param(*cfg[:3], marks=pytest.mark.slow) if cfg[0] > 8192 else cfg[:3] for cfg in kernels.HOPPER_BWD_CONFIGS])
def test_bwd_launch_configs_write_every_element(device, max_c, rows_per_program, num_warps):
    """Every tabled backward configuration (3 programs looping over the rows, each prefetching
    the next block, the last prefetch past the end), into a NaN-poisoned dx, against float64: dx
    (with ds), dweight, dbias."""
    C, n_rows = _width_in(max_c), 37
    s, dy, ds = (torch.randn(n_rows, C, device=device) for _ in range(3))
    weight, bias = make_affine(C, "both", FP32, device)
    _, _, mean, rstd = kernels.layer_norm_fwd(s, weight, bias, 1e-6)
    dx = torch.full_like(s, float("nan"))
    _, dweight, dbias = kernels.layer_norm_bwd(dy, s, weight, mean, rstd, ds=ds, dx=dx,
                                               rows_per_program=rows_per_program, num_warps=num_warps,
                                               num_programs=3)
    (t_dx, t_dw, t_db), floors = _ln_grads(s, weight, bias, dy)
    (r_dx, r_dw, r_db), _ = _ln_grads(s.double(), weight.double(), bias.double(), dy.double())
    for name, out, t_out, ref, floor in (("dx", dx, t_dx + ds, r_dx + ds.double(), floors[0]),
                                         ("dweight", dweight, t_dw, r_dw, floors[1]),
                                         ("dbias", dbias, t_db, r_db, floors[2])):
        check_close(name, out, t_out, ref, DTYPE_BOUND[FP32], floor=floor)


@pytest.mark.slow
def test_bwd_sums_more_partial_rows_than_one_block(device):
    """150 programs' partial rows (more than PARAMS_BLOCK_P, with a ragged last block) summed into
    dweight and dbias, and only dbias when no weight is given."""
    C, n_rows = 100, 300
    x, dy = torch.randn(n_rows, C, device=device), torch.randn(n_rows, C, device=device)
    weight, bias = make_affine(C, "both", FP32, device)
    _, _, mean, rstd = kernels.layer_norm_fwd(x, weight, bias, 1e-6)
    assert 150 > kernels.PARAMS_BLOCK_P and 150 % kernels.PARAMS_BLOCK_P
    _, dweight, dbias = kernels.layer_norm_bwd(dy, x, weight, mean, rstd, rows_per_program=1, num_programs=150)
    _, no_dweight, dbias_alone = kernels.layer_norm_bwd(dy, x, None, mean, rstd, rows_per_program=1,
                                                        num_programs=150)
    (_, t_dw, t_db), floors = _ln_grads(x, weight, bias, dy)
    (_, r_dw, r_db), _ = _ln_grads(x.double(), weight.double(), bias.double(), dy.double())
    assert no_dweight is None
    for name, out, t_out, ref, floor in (("dweight", dweight, t_dw, r_dw, floors[1]), ("dbias", dbias, t_db, r_db, floors[2]),
                                         ("dbias alone", dbias_alone, t_db, r_db, floors[2])):
        check_close(name, out, t_out, ref, DTYPE_BOUND[FP32], floor=floor)


@pytest.mark.parametrize("make,in_place", [
    (lambda: torch.randn(4, 120)[:, 10:110], True),
    (lambda: torch.randn(2, 3, 120)[..., 10:110], True),
    (lambda: torch.randn(4, 6, 100)[:, 1:5], False),
    (lambda: torch.randn(3, 4, 100).transpose(0, 1), False),
    (lambda: torch.randn(100, 12).t(), False),
])
def test_rows_view_reads_in_place_when_the_rows_collapse(make, in_place):
    x = make()
    rows = kernels.rows_view(x)
    assert rows.shape == (x.numel() // 100, 100) and rows.stride(1) == 1
    assert (rows.data_ptr() == x.data_ptr()) == in_place
    torch.testing.assert_close(rows, x.reshape(-1, 100), rtol=0, atol=0)


@pytest.mark.slow
def test_tables_compile_for_hopper_without_spills(tmp_path):
    """Every forward (plain and add + LN) and backward (with and without ds) table entry compiles for
    sm_90 at its widest C, bf16, with this Triton, no GPU needed, fits an H100's shared memory and
    keeps its rows in registers up to C = 4096, as the tables' comment says; the backward's 16-bit
    programs per SM all fit in one wave."""
    stdout = sm90.run_script(sm90.script("layer_norm"), tmp_path)
    assert stdout.count("registers") == 2 * (len(kernels.HOPPER_FWD_CONFIGS) + len(kernels.HOPPER_BWD_CONFIGS))


# ----------------------------------------------------------------------------- registration


def _opcheck_samples(device):
    """The custom ops' registration (schema, fake impls, dispatch); their gradients are the Functions'
    (test_function_paths_match, test_torch_compile_holds_the_custom_ops)."""
    x, r = torch.randn(3, 5, 100, device=device), torch.randn(3, 5, 100, device=device)
    w, b = torch.randn(100, device=device), torch.randn(100, device=device)
    dy, ds = torch.randn(3, 5, 100, device=device), torch.randn(3, 5, 100, device=device)
    x16 = torch.randn(3, 5, 100, device=device, dtype=FP16)
    _, mean, rstd = ops.layer_norm_fwd(x, w, b, 1e-6, FP32)
    _, s, s_mean, s_rstd = ops.add_layer_norm_fwd(x, r, w, None, 1e-6, FP32)
    return [
        (ops.layer_norm_fwd, (x, w, b, 1e-6, FP32)),
        (ops.layer_norm_fwd, (x, None, None, 1e-5, FP32)),
        (ops.layer_norm_fwd, (x16, w, b, 1e-6, FP16)),  # mixed precision: fp16 x, fp32 weights, fp16 y
        (ops.layer_norm_bwd, (dy, x, w, mean, rstd, True, True)),
        (ops.layer_norm_bwd, (dy, x, None, mean, rstd, False, False)),
        (ops.add_layer_norm_fwd, (x, r, w, b, 1e-6, FP32)),
        (ops.add_layer_norm_fwd, (x, r, None, None, 1e-5, FP32)),
        (ops.add_layer_norm_fwd, (x16, r, w, b, 1e-6, FP16)),  # fp16 x + fp32 residual: s fp32
        (ops.add_layer_norm_bwd, (dy, ds, s, w, s_mean, s_rstd, True, False)),
        (ops.add_layer_norm_bwd, (dy, None, s, None, s_mean, s_rstd, False, True)),
    ]


@pytest.mark.parametrize("index", range(10))
def test_opcheck(device, index):
    op, args = _opcheck_samples(device)[index]
    torch.library.opcheck(op, args)


def _op_cases(device):
    """name -> (public call, inputs, upstream gradients, fwd op, bwd op) for each Function and the
    stream with both outputs used, with s alone used, and with a frozen weight (no dweight asked)."""
    x, r = torch.randn(3, 5, 100, device=device), torch.randn(3, 5, 100, device=device)
    w, b = torch.randn(100, device=device), torch.randn(100, device=device)
    dy, ds = torch.randn(3, 5, 100, device=device), torch.randn(3, 5, 100, device=device)
    return {
        "layer_norm": (lambda x, w, b: ops.layer_norm(x, w, b, 1e-5), [x, w, b], [dy], "layer_norm"),
        "add_layer_norm": (lambda x, r, w: ops.add_layer_norm(x, r, w, None), [x, r, w], [dy, ds], "add_layer_norm"),
        "add_layer_norm s only": (lambda x, r, w, b: ops.add_layer_norm(x, r, w, b), [x, r, w, b], [None, ds],
                                  "add_layer_norm"),
        "stream": (lambda x, w, b: ops.add_layer_norm(x, None, w, b), [x, w, b], [dy, ds], "layer_norm"),
        "frozen weight": (lambda x: ops.layer_norm(x, w, b), [x], [dy], "layer_norm"),
    }


@pytest.mark.parametrize("case", ["layer_norm", "add_layer_norm", "add_layer_norm s only", "stream", "frozen weight"])
def test_function_paths_match(device, monkeypatch, case):
    """Each Function's eager path (launch functions) and its traced path (the custom ops, as under
    torch.compile) give bit-identical outputs and every gradient, each launching once (fp32: the
    stream's gradient added in the kernel or after it rounds the same)."""
    fn, inputs, grads_out, op = _op_cases(device)[case]
    check_op_paths(monkeypatch, fn, inputs, grads_out, [f"vit_fast::{op}_fwd", f"vit_fast::{op}_bwd"],
                   [f"{op}_fwd", f"{op}_bwd"])


@pytest.mark.slow
@pytest.mark.parametrize("case", ["layer_norm", "add_layer_norm", "add_layer_norm s only", "stream", "frozen weight"])
def test_torch_compile_holds_the_custom_ops(device, case):
    """torch.compile(fullgraph=True, aot_eager) of the public function: the forward graph calls the
    fwd custom op, the backward graph the bwd op, with compute_dweight / compute_dbias from
    ctx.needs_input_grad, and outputs and gradients are eager's, bit for bit."""
    fn, inputs, grads_out, op = _op_cases(device)[case]
    graphs = check_compiled(fn, inputs, grads_out, [f"{op}_fwd"], [f"{op}_bwd"])
    (bwd,) = vit_fast_calls(graphs["backward"][0])
    assert bwd.args[-2:] == ((False, False) if case == "frozen weight" else (True, case != "add_layer_norm"))


def test_eager_function_path_skips_gradients_not_asked_for(device):
    """Only x needs a gradient: dweight / dbias are not computed, weight and bias get none."""
    require_kernel_path(device)
    x = torch.randn(4, 64, device=device, requires_grad=True)
    w, b = torch.randn(64, device=device), torch.randn(64, device=device)
    calls = []
    real = kernels.layer_norm_bwd
    try:
        kernels.layer_norm_bwd = lambda *a, **k: calls.append(a[6:8]) or real(*a, **k)
        ops.layer_norm(x, w, b).sum().backward()
        ops.add_layer_norm(x, x.detach(), w, b)[0].sum().backward()
    finally:
        kernels.layer_norm_bwd = real
    assert calls == [(False, False), (False, False)]
    assert w.grad is None and b.grad is None and x.grad is not None


def _compiled_matches_eager(device, dtype, shape, mode=None):
    """A block-like step (add + LN, then LN of y + s) under torch.compile(fullgraph=True) (the default
    backend, inductor) against the same ops run eagerly: outputs and every input gradient, each
    kernel launched by every compiled call."""
    C = shape[-1]
    x, r = (torch.randn(shape, device=device).to(dtype) for _ in range(2))
    w1, b1, w2 = (torch.randn(C, device=device).to(dtype) for _ in range(3))
    grads_out = [torch.randn(shape, device=device).to(dtype) for _ in range(2)]

    def step(x, r, w1, b1, w2):
        y, s = VF.add_layer_norm(x, r, w1, b1)
        return VF.layer_norm(y + s, w2, None, 1e-5), s

    check_compiled(step, [x, r, w1, b1, w2], grads_out, launches=["layer_norm_fwd", "add_layer_norm_bwd"],
                   backend="inductor", mode=mode, calls=2, exact=False)


@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager(device):
    _compiled_matches_eager(device, FP32, (2, 7, 100))


# ----------------------------------------------------------------------------- module


@pytest.mark.parametrize("kwargs", [
    dict(normalized_shape=768),
    dict(normalized_shape=(384,), eps=1e-6),
    dict(normalized_shape=100, elementwise_affine=False),
    dict(normalized_shape=100, bias=False),
    dict(normalized_shape=(5, 100)),
])
def test_module_is_a_drop_in_for_torch_layer_norm(device, kwargs):
    ours, theirs = vit_fast.nn.LayerNorm(**kwargs).to(device), torch.nn.LayerNorm(**kwargs).to(device)
    assert isinstance(ours, torch.nn.LayerNorm)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    for p in theirs.parameters():
        p.data.normal_()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(3, 5, *theirs.normalized_shape[-1:], device=device)
    dy = torch.randn_like(x)
    reference_module = torch.nn.LayerNorm(**kwargs).to(device).double()
    reference_module.load_state_dict(theirs.state_dict())
    before = dispatch.kernel_launches.copy()
    names = ["y", "dx", *(f"d{n}" for n, _ in ours.named_parameters())]
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    check_against_float64(names, module_fn(ours), module_fn(theirs), module_fn(reference_module),
                          [x, *theirs.parameters()], [dy])
    assert_kernel_ran(before, device, "layer_norm_fwd", "layer_norm_bwd")


def test_module_rejects_wrong_trailing_dims():
    with pytest.raises(ValueError, match=r"x: expected trailing dims \(5, 100\)"):
        vit_fast.nn.LayerNorm((5, 100))(torch.randn(2, 4, 100))


# ----------------------------------------------------------------------------- bad inputs

_X = torch.randn(4, 100)


@pytest.mark.parametrize("call,error,match", [
    (lambda: VF.layer_norm(_X.numpy()), TypeError, "x: expected a torch.Tensor"),
    (lambda: VF.layer_norm(_X, torch.ones(99)), ValueError, r"weight: expected shape \(100,\)"),
    (lambda: VF.layer_norm(_X, None, torch.ones(4, 100)), ValueError, r"bias: expected shape \(100,\)"),
    (lambda: VF.layer_norm(_X, torch.ones(100, dtype=FP16)), ValueError, "weight: expected dtype torch.float32"),
    (lambda: VF.layer_norm(_X, torch.ones(100, device="meta")), RuntimeError, "weight: expected device cpu"),
    (lambda: VF.layer_norm(_X, [1.0] * 100), TypeError, "weight: expected a torch.Tensor"),
    (lambda: VF.layer_norm(torch.randn(4, 0)), ValueError, "x: expected a tensor"),
    (lambda: VF.add_layer_norm(_X, _X[:2]), ValueError, r"residual: expected the shape of x \(4, 100\)"),
    (lambda: VF.add_layer_norm(_X.half(), _X.half(), torch.ones(100)), ValueError,
     r"weight: expected dtype torch.float16 \(that of x \+ residual\)"),
    (lambda: VF.layer_norm(_X, out_dtype=torch.int32), ValueError, "out_dtype: expected one of"),
    (lambda: VF.add_layer_norm(_X, [0.0]), TypeError, "residual: expected a torch.Tensor"),
    (lambda: VF.add_layer_norm(_X, _X, torch.ones(100), torch.ones(101)), ValueError, r"bias: expected shape"),
])
def test_bad_inputs_raise_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_kernel_path_rejects_what_the_kernels_do_not_cover(device):
    require_kernel_path(device)
    with pytest.raises(ValueError, match="x: expected dtype in"):
        VF.layer_norm(torch.randn(2, 100, dtype=torch.float64, device=device))
    with pytest.raises(ValueError, match=f"x: the kernels normalize 1 <= C <= {kernels.MAX_C}"):
        VF.layer_norm(torch.randn(1, kernels.MAX_C + 1, device=device))


# ----------------------------------------------------------------------------- parameter views, paths, dtypes

PARAM_VIEWS = {  # leaf -> the [C] view the op gets (the gradient must land in the leaf)
    "strided": (lambda C: (2 * C,), lambda t: t[::2]),
    "expanded": (lambda C: (1,), lambda t, C=None: t.expand(C)),
    "offset-slice": (lambda C: (C + 5,), lambda t: t[5:]),
}


def _param_leaf_and_view(kind, C, dtype, device):
    shape, view = PARAM_VIEWS[kind]
    leaf = torch.randn(shape(C), device=device).to(dtype)
    return leaf, (lambda t: view(t, C)) if kind == "expanded" else view


@pytest.mark.parametrize("kind", list(PARAM_VIEWS))
@pytest.mark.parametrize("fn", ["layer_norm", "add_layer_norm"])
@pytest.mark.parametrize("path", ["kernel", "torch-forced"])
def test_weight_and_bias_views_forward_and_backward(device, monkeypatch, path, fn, kind):
    """weight / bias as strided, expanded (stride 0) and offset views of leaves: the numbers of
    torch on the same views, and dweight / dbias land in the leaves (against float64)."""
    device = select_path(path, monkeypatch, device)
    C, shape = 100, (3, 7, 100)
    (w_leaf, view), (b_leaf, _) = (_param_leaf_and_view(kind, C, FP32, device) for _ in range(2))
    x, r, dy = (torch.randn(shape, device=device) for _ in range(3))
    before = dispatch.kernel_launches.copy()
    if fn == "layer_norm":
        check_against_float64(["y", "dx", "dweight leaf", "dbias leaf"],
                              lambda x, w, b: VF.layer_norm(x, view(w), view(b)),
                              lambda x, w, b: F.layer_norm(x, (C,), view(w), view(b), 1e-6),
                              lambda x, w, b: reference.layer_norm(x, view(w), view(b)), [x, w_leaf, b_leaf], [dy])
        assert_kernel_ran(before, device, "layer_norm_fwd", "layer_norm_bwd")
    else:
        check_against_float64(["y", "s", "dx", "dresidual", "dweight leaf", "dbias leaf"],
                              lambda x, r, w, b: VF.add_layer_norm(x, r, view(w), view(b)),
                              lambda x, r, w, b: (F.layer_norm(x + r, (C,), view(w), view(b), 1e-6), x + r),
                              lambda x, r, w, b: reference.add_layer_norm(x, r, view(w), view(b)),
                              [x, r, w_leaf, b_leaf], [dy, dy])
        assert_kernel_ran(before, device, "add_layer_norm_fwd", "add_layer_norm_bwd")
    if path == "kernel":
        assert dispatch.use_kernels(x)


def _bf16_truncated(t):
    """t (fp32) rounded to bf16 toward zero, as Triton's interpreter casts fp32 to bf16 (a GPU rounds
    to nearest); the gradient passes straight through."""
    truncated = (t.detach().float().view(torch.int32) & ~0xFFFF).view(torch.float32)
    return (t + (truncated - t).detach()).to(BF16)


@pytest.mark.parametrize("fn", ["layer_norm", "add_layer_norm"])
def test_bf16_on_the_kernel_path(device, fn):
    """LayerNorm has no tl.dot, so bf16 is right under the interpreter too: within bf16's bound of
    float64, and no worse than torch computing in fp32 and rounding to bf16 the way this backend
    does (toward zero under the interpreter: its fp32 -> bf16 cast truncates)."""
    require_kernel_path(device)
    shape, C = (4, 197, 384), 384
    x, r, dy = (torch.randn(shape, device=device).to(BF16) for _ in range(3))
    w, b = make_affine(C, "both", BF16, device)
    interpreted = device == "cpu"
    round_y = _bf16_truncated if interpreted else (lambda t: t.to(BF16))
    before = dispatch.kernel_launches.copy()
    if fn == "layer_norm":
        check_against_float64(["y", "dx", "dweight", "dbias"], lambda x, w, b: VF.layer_norm(x, w, b),
                              lambda x, w, b: round_y(F.layer_norm(x.float(), (C,), w.float(), b.float(), 1e-6)),
                              lambda x, w, b: reference.layer_norm(x, w, b), [x, w, b], [dy])
    else:
        check_against_float64(["y", "s", "dx", "dresidual", "dweight", "dbias"],
                              lambda x, r, w, b: VF.add_layer_norm(x, r, w, b),
                              lambda x, r, w, b: (round_y(F.layer_norm((x + r).float(), (C,), w.float(), b.float(),
                                                                       1e-6)), x + r),
                              lambda x, r, w, b: reference.add_layer_norm(x, r, w, b), [x, r, w, b], [dy, dy])
    assert_kernel_ran(before, device, f"{fn}_fwd", f"{fn}_bwd")


@pytest.mark.parametrize("path", PATHS)
def test_mixed_dtypes_with_out_dtype_on_every_path(device, monkeypatch, path):
    """The README's `VF.layer_norm(x_bf16, w_fp32, b_fp32, out_dtype=torch.bfloat16)` works on the CPU
    too: math in fp32, y rounded once to bf16; each gradient in its input's dtype."""
    device = select_path(path, monkeypatch, device)
    x, dy = torch.randn(4, 9, 100, device=device).to(BF16), torch.randn(4, 9, 100, device=device).to(BF16)
    w, b = torch.randn(100, device=device), torch.randn(100, device=device)
    before = dispatch.kernel_launches.copy()
    (y,), grads = run(lambda x, w, b: VF.layer_norm(x, w, b, out_dtype=BF16), [x, w, b], [dy])
    assert y.dtype == BF16 and [g.dtype for g in grads] == [BF16, FP32, FP32]
    if path == "kernel":
        assert_kernel_ran(before, device, "layer_norm_fwd", "layer_norm_bwd")
    else:
        torch.testing.assert_close(y, F.layer_norm(x.float(), (100,), w, b, 1e-6).to(BF16), rtol=0, atol=0)
    (ref_y,), ref_grads = run(reference.layer_norm, [x.double(), w.double(), b.double()], [dy.double()])
    check_close("y", y, y, ref_y, DTYPE_BOUND[BF16])
    for name, g, ref in zip(["dx", "dweight", "dbias"], grads, ref_grads):
        check_close(name, g, g, ref, DTYPE_BOUND[BF16])
    (y2, s), _ = run(lambda x, r, w: VF.add_layer_norm(x, r, w, None, out_dtype=BF16), [x, x, w], [dy, None])
    assert y2.dtype == BF16 and s.dtype == BF16


EMPTY_SHAPES = [(0, 100), (2, 0, 100), (0, 3, 100)]


@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=str)
@pytest.mark.parametrize("fn", ["layer_norm", "add_layer_norm", "layer_norm out_dtype"])
@pytest.mark.parametrize("path", PATHS)
def test_empty_leading_dims_on_every_path(device, monkeypatch, path, fn, shape):
    """Zero rows: an empty y (and s) of the right shape and dtype, forward and backward, on the
    kernel path and both PyTorch paths; dweight / dbias come back as zeros."""
    device = select_path(path, monkeypatch, device)
    x, r = torch.randn(shape, device=device), torch.randn(shape, device=device)
    w, b = torch.randn(100, device=device), torch.randn(100, device=device)
    before = dispatch.kernel_launches.copy()
    if fn == "add_layer_norm":
        (y, s), grads = run(lambda x, r, w, b: VF.add_layer_norm(x, r, w, b), [x, r, w, b], [torch.ones(shape)] * 2)
        assert s.shape == shape and s.dtype == FP32
    else:
        out_dtype = FP16 if fn == "layer_norm out_dtype" else None
        (y,), grads = run(lambda x, w, b: VF.layer_norm(x, w, b, out_dtype=out_dtype), [x, w, b], [torch.ones(shape)])
        assert y.dtype == (out_dtype or FP32)
    assert y.shape == shape
    for g, t in zip(grads, [x, r, w, b] if fn == "add_layer_norm" else [x, w, b]):
        assert g.shape == t.shape and g.dtype == t.dtype and not g.any()
    op = "add_layer_norm" if fn == "add_layer_norm" else "layer_norm"
    if path == "kernel":
        assert_kernel_ran(before, device, f"{op}_fwd", f"{op}_bwd")
    else:
        assert dispatch.kernel_launches == before


@pytest.mark.parametrize("path", ["torch-forced", "torch-cpu"])
def test_float64_gradcheck_on_the_torch_path(monkeypatch, path):
    """float64 runs on the PyTorch path (CPU without the interpreter, VIT_FAST_FORCE_TORCH=1):
    gradcheck of x, residual, weight, bias."""
    select_path(path, monkeypatch, "cpu")
    x, r, w, b = torch.randn(3, 2, 8), torch.randn(3, 2, 8), torch.randn(8), torch.randn(8)
    before = dispatch.kernel_launches.copy()
    float64_gradcheck(lambda x, w, b: VF.layer_norm(x, w, b, 1e-5), [x, w, b])
    float64_gradcheck(lambda x, r, w, b: VF.add_layer_norm(x, r, w, b, 1e-5), [x, r, w, b])
    assert VF.layer_norm(x.double(), w.double()).dtype == torch.float64
    assert dispatch.kernel_launches == before


def test_float64_on_the_kernel_path_names_the_dtype(device):
    require_kernel_path(device)
    x = torch.randn(2, 100, device=device)
    with pytest.raises(ValueError, match="x: expected dtype in .* on the kernel path, got float64 .*PyTorch path"):
        VF.layer_norm(x.double(), torch.ones(100, device=device, dtype=torch.float64))
    with pytest.raises(ValueError, match="weight: expected dtype in .* on the kernel path, got float64"):
        VF.layer_norm(x, torch.ones(100, device=device, dtype=torch.float64), out_dtype=FP32)
    with pytest.raises(ValueError, match="out_dtype: expected one of .* on the kernel path, got torch.float64"):
        VF.layer_norm(x, out_dtype=torch.float64)


# ----------------------------------------------------------------------------- GPU only

GPU_CASES = [(shape, dtype) for dtype in (FP32, FP16, BF16)
             for shape in ((4, 197, 384), (4, 197, 768), (2, 197, 1024), (2, 197, 1280), (64, 8192), (394, 100))]


@pytest.mark.gpu
@pytest.mark.parametrize("shape,dtype", GPU_CASES)
def test_gpu_layer_norm_matches_float64(shape, dtype):
    _layer_norm_check("cuda", shape, dtype, "both", 1e-6, 0.0, "rowstride")


@pytest.mark.gpu
@pytest.mark.parametrize("shape,dtype", GPU_CASES)
def test_gpu_add_layer_norm_matches_float64(shape, dtype):
    _add_layer_norm_check("cuda", shape, dtype, "both", 1e-6, 0.0, "contiguous", True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_gpu_more_rows_than_a_grid_dimension(dtype):
    _layer_norm_check("cuda", (70_000, 768), dtype, "both", 1e-6, 0.0, "contiguous")
    _add_layer_norm_check("cuda", (70_000, 384), dtype, "weight", 1e-5, 0.0, "contiguous", True)


@pytest.mark.gpu
@pytest.mark.parametrize("affine,layout", [("none", "copy"), ("weight", "rowstride"), ("both", "contiguous")])
def test_gpu_mean_far_from_zero_and_layouts(affine, layout):
    _layer_norm_check("cuda", (4, 197, 768), FP32, affine, 1e-5, 1e4, layout)
    _add_layer_norm_check("cuda", (4, 197, 768), FP32, affine, 1e-6, 1e4, layout, False)


@pytest.mark.gpu
@pytest.mark.parametrize("fn", ["layer_norm", "add_layer_norm"])
def test_gpu_weight_gradients_are_bit_identical_run_to_run(fn):
    x, r, dy = (torch.randn(50432, 768, device="cuda", dtype=BF16) for _ in range(3))
    weight, bias = make_affine(768, "both", BF16, "cuda")
    call = (lambda x, r, w, b: VF.layer_norm(x, w, b)) if fn == "layer_norm" else \
        (lambda x, r, w, b: VF.add_layer_norm(x, r, w, b)[0])
    runs = [run(call, [x, r, weight, bias], [dy])[1] for _ in range(3)]
    for grads in runs[1:]:
        assert torch.equal(grads[2], runs[0][2]) and torch.equal(grads[3], runs[0][3])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [FP32, BF16])
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
@pytest.mark.slow
def test_gpu_torch_compile_fullgraph_matches_eager(dtype, mode):
    _compiled_matches_eager("cuda", dtype, (8, 197, 768), mode)


@pytest.mark.gpu
def test_gpu_autocast_runs_in_fp32_as_torch_does():
    """bf16 activations, fp32 parameters under autocast: torch's layer_norm runs (and returns) fp32."""
    x, r = (torch.randn(4, 197, 768, device="cuda", dtype=BF16) for _ in range(2))
    module = vit_fast.nn.LayerNorm(768).cuda()
    for p in module.parameters():
        p.data.normal_()
    with torch.autocast("cuda", dtype=BF16):
        y, y_torch = module(x), F.layer_norm(x, (768,), module.weight, module.bias, module.eps)
        (fused, s), s_torch = VF.add_layer_norm(x, r.float(), module.weight, module.bias), x.float() + r.float()
    assert y.dtype == y_torch.dtype == FP32 and s.dtype == s_torch.dtype
    torch.testing.assert_close(y, y_torch)
    torch.testing.assert_close(fused, F.layer_norm(s_torch, (768,), module.weight, module.bias, 1e-6))
    with torch.autocast("cuda", dtype=BF16):  # out_dtype: what a Linear after it would round y to
        y16 = VF.layer_norm(x, module.weight, module.bias, module.eps, out_dtype=BF16)
        fused16, s16 = VF.add_layer_norm(x, r.float(), module.weight, module.bias, out_dtype=BF16)
    assert (y16.dtype, fused16.dtype, s16.dtype) == (BF16, BF16, FP32)
    torch.testing.assert_close(y16, y_torch.to(BF16))
    torch.testing.assert_close(fused16, fused.to(BF16))


@pytest.mark.gpu
def test_gpu_second_device_stays_there():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    _layer_norm_check("cuda:1", (2, 197, 768), BF16, "both", 1e-6, 0.0, "contiguous")
    x = torch.randn(4, 768, device="cuda:1")
    assert VF.add_layer_norm(x, x)[0].device == x.device
