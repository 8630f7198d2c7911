"""Linear + bias + GELU and Linear + bias + residual (kernels/mlp.py, vit_fast/ops/mlp.py) and the
drop-in Mlp: every output and gradient against float64, both GELU flavours, ragged tiles, both
matmul kernels (pointer and TMA, the TMA one under the interpreter too), bad inputs."""
import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sm90
from numerics import DTYPE_BOUND, assert_close_to_ref
from opnumerics import (PATHS, check_close, check_compiled, check_op_paths, compare_to_float64, float64_gradcheck,
                        module_fn, no_tf32, require_interpreter, require_kernel_path, rounding_floors, run, select_path)
from vit_fast import dispatch, reference
from vit_fast import functional as VF
from vit_fast.kernels import mlp as kernels
from vit_fast.nn import Mlp
from vit_fast.nn.mlp import gelu_approximate
from vit_fast.ops import mlp as ops_mlp

CPU_DTYPES = [torch.float32, torch.float16]  # tl.dot on bf16 is not trustworthy under the interpreter

# fp32 kernels run exact fp32 dots on a GPU: PyTorch's fp32 matmuls (the same-dtype comparison) must
# not use tf32 either, whatever an earlier test set
pytestmark = pytest.mark.usefixtures(no_tf32.__name__)


def _bound(dtype, device):
    return DTYPE_BOUND[dtype]


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]


def _grads(out, inputs, dy):
    out.backward(dy)
    return [t.grad for t in inputs if t is not None]


LINEAR_ACT_OPS = ("linear_act_fwd", "linear_act_bwd")  # what one fwd + bwd of VF.linear_gelu / linear_act launches
LINEAR_OPS = ("linear_act_fwd",)  # VF.linear: activation "none", whose backward is torch's matmuls (no launch)


def _check_fwd_bwd(name, fn, torch_fn, ref_fn, inputs, device, dtype, ops=LINEAR_ACT_OPS):
    """fn (vit_fast) vs torch_fn (PyTorch, same dtype) vs ref_fn on float64 copies: output and
    every input gradient (opnumerics.compare_to_float64: the dtype's bound, 2x / 3x torch's error +
    the fp32 rounding floor); proves the kernel path ran: each op in ``ops`` launched once."""
    before = dispatch.kernel_launches.copy()
    exact_shape = ref_fn(*(t.double() if t is not None else None for t in inputs)).shape
    dy = torch.randn(exact_shape, device=device)
    names = [f"{name} out"] + [f"{name} d{n}" for n in "x w b r".split()[:len(inputs)]]
    results = compare_to_float64(names, fn, torch_fn, ref_fn, list(inputs), [dy], bound=_bound(dtype, device))
    for op in ops:
        assert dispatch.kernel_launches[op] == before[op] + 1, f"{name}: {op} did not run once"
    out, torch_out, _ = results[f"{name} out"]
    assert out.dtype == torch_out.dtype


def _linear_inputs(shape, K, N, dtype, device, bias=True):
    x = torch.randn(*shape, K, dtype=dtype, device=device)
    w = (torch.randn(N, K, dtype=dtype, device=device) * K**-0.5).to(dtype)
    b = torch.randn(N, dtype=dtype, device=device) if bias else None
    return x, w, b


# ----------------------------------------------------------------------------- linear_gelu

# (leading shape, K, N, bias): ragged against every tile size, a 3-D input, no bias
SHAPES = [((130,), 96, 200, True), ((2, 65), 96, 200, True), ((130,), 96, 200, False), ((1,), 40, 24, True)]


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape,K,N,bias", SHAPES)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_linear_gelu_matches_float64(device, dtype, shape, K, N, bias, approximate):
    x, w, b = _linear_inputs(shape, K, N, dtype, device, bias)
    _check_fwd_bwd(
        f"linear_gelu {approximate} {dtype} {shape}x{K}->{N}",
        lambda x, w, b: VF.linear_gelu(x, w, b, approximate),
        lambda x, w, b: F.gelu(F.linear(x, w, b), approximate=approximate),
        lambda x, w, b: reference.linear_gelu(x, w, b, approximate),
        (x, w, b), device, dtype)


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "quick_gelu"])
@pytest.mark.parametrize("shape,K,N,bias", [SHAPES[1], SHAPES[2]])
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_linear_act_matches_float64(device, dtype, shape, K, N, bias, activation):
    """VF.linear_act: the forward epilogue's activation and activation_backward's derivative (quick_gelu
    among them) against float64, output and every gradient."""
    x, w, b = _linear_inputs(shape, K, N, dtype, device, bias)
    act = _torch_act(activation)
    _check_fwd_bwd(f"linear_act {activation} {dtype} {shape}x{K}->{N}",
                   lambda x, w, b: VF.linear_act(x, w, b, activation), lambda x, w, b: act(F.linear(x, w, b)),
                   lambda x, w, b: act(F.linear(x, w, b)), (x, w, b), device, dtype)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")  # the interpreter's numpy
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_quick_gelu_tails(device, dtype):
    """pre = +-30, +-60, +-100: quick_gelu and its derivative stay finite (exp(-1.702 x) overflows to
    inf at x < ~-52 and must give 0, not NaN) and match float64."""
    pre = torch.tensor([30.0, -30.0, 60.0, -60.0, 100.0, -100.0, 0.0, 1.0] * 2, device=device)
    x = torch.diag(pre).to(dtype).requires_grad_()  # [16, 16]: x @ I^T = diag(pre)
    w = torch.eye(16, dtype=dtype, device=device).requires_grad_()
    y = VF.linear_act(x, w, None, "quick_gelu")
    y.backward(torch.ones_like(y))
    p = pre.double().requires_grad_()
    q = p * torch.sigmoid(1.702 * p)
    q.backward(torch.ones_like(q))
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()
    torch.testing.assert_close(y.diagonal().double(), q.detach().to(dtype).double(), rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(x.grad.diagonal().double(), p.grad.to(dtype).double(), rtol=1e-3, atol=1e-6)


def test_activation_spellings():
    """One map: activation= names pass through, approximate= is F.gelu's, both at once is an error."""
    for name in ops_mlp.ACTIVATIONS:
        assert ops_mlp.resolve_activation(name) == name
    assert ops_mlp.resolve_activation(None, "none") == "gelu"
    assert ops_mlp.resolve_activation(None, "tanh") == "gelu_tanh"
    assert ops_mlp.resolve_activation("quick_gelu", allow_identity=False) == "quick_gelu"
    with pytest.raises(ValueError, match="pass one of them"):
        ops_mlp.resolve_activation("quick_gelu", "tanh")
    with pytest.raises(ValueError, match="activation: expected one of"):
        ops_mlp.resolve_activation("none", allow_identity=False)
    with pytest.raises(ValueError, match="activation: expected one of"):
        ops_mlp.resolve_activation("relu")
    assert kernels.ACTIVATIONS == ops_mlp.ACTIVATIONS == ("none", "gelu", "gelu_tanh", "quick_gelu")


@pytest.mark.parametrize("residual_dtype", ["same", torch.float32])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_linear_residual_matches_float64(device, dtype, bias, residual_dtype):
    x, w, b = _linear_inputs((2, 65), 200, 96, dtype, device, bias)
    r = torch.randn(2, 65, 96, device=device, dtype=dtype if residual_dtype == "same" else residual_dtype)
    _check_fwd_bwd(
        f"linear+residual {dtype} residual {r.dtype}", VF.linear, lambda x, w, b, r: F.linear(x, w, b) + r,
        reference.linear, (x, w, b, r), device, dtype, ops=LINEAR_OPS)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_linear_without_residual(device, dtype):
    x, w, b = _linear_inputs((130,), 96, 200, dtype, device)
    _check_fwd_bwd(f"linear {dtype}", VF.linear, F.linear, reference.linear, (x, w, b), device, dtype, ops=LINEAR_OPS)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_gelu_saturates_exactly(device, dtype, approximate):
    """pre = +-60 (and +-30): GELU gives exactly pre or 0, gradients exactly dy or 0, nothing NaN."""
    pre = torch.tensor([60.0, -60.0, 30.0, -30.0] * 4, device=device)
    x = torch.diag(pre).to(dtype).requires_grad_()  # [16, 16]: x @ I^T = diag(pre)
    w = torch.eye(16, dtype=dtype, device=device).requires_grad_()
    b = torch.zeros(16, dtype=dtype, device=device, requires_grad=True)
    y = VF.linear_gelu(x, w, b, approximate)
    expected = torch.diag(pre.clamp_min(0)).to(dtype)
    assert torch.equal(y.diagonal(), expected.diagonal())
    dy = torch.ones_like(y)
    y.backward(dy)
    for g in (x.grad, w.grad, b.grad):
        assert torch.isfinite(g).all()
    slope = (pre > 0).to(dtype)  # GELU'(+-60) is exactly 1 / 0 in fp32
    assert torch.equal(x.grad.diagonal(), slope)


EMPTY_SHAPES = [(0,), (0, 7), (3, 0)]


@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=str)
@pytest.mark.parametrize("fn", ["linear_gelu", "linear", "linear residual"])
@pytest.mark.parametrize("path", PATHS)
def test_empty_leading_dims_on_every_path(device, monkeypatch, path, fn, shape):
    """Zero rows: an empty result [..., N] of x's dtype, forward and backward, on the kernel path and
    both PyTorch paths; the weight and bias gradients are zeros."""
    device = select_path(path, monkeypatch, device)
    x, w, b = _linear_inputs(shape, 32, 48, torch.float32, device)
    r = torch.zeros(*shape, 48, device=device)
    before = dispatch.kernel_launches.copy()
    call = {"linear_gelu": lambda x, w, b, r: VF.linear_gelu(x, w, b),
            "linear": lambda x, w, b, r: VF.linear(x, w, b),
            "linear residual": lambda x, w, b, r: VF.linear(x, w, b, residual=r)}[fn]
    (y,), grads = run(call, [x, w, b, r], [torch.ones(*shape, 48, device=device)])
    assert y.shape == (*shape, 48) and y.dtype == torch.float32
    assert grads[0].shape == x.shape and torch.equal(grads[1], torch.zeros_like(w))
    assert torch.equal(grads[2], torch.zeros_like(b))
    if path == "kernel":
        assert dispatch.kernel_launches["linear_act_fwd"] == before["linear_act_fwd"] + 1
    else:
        assert dispatch.kernel_launches == before


def test_bf16_under_the_interpreter_raises(device):
    """Triton's interpreter computes bf16 tl.dot wrongly (rel err ~1e10 here): linear and linear_gelu
    say so instead of returning it. (On a GPU bf16 runs: the GPU tests.)"""
    require_interpreter(device)
    x, w, b = (t.bfloat16() for t in _linear_inputs((20,), 32, 48, torch.float32, "cpu"))
    match = "bfloat16 under TRITON_INTERPRET=1: Triton's interpreter computes tl.dot on bf16 wrongly"
    for call in (lambda: VF.linear_gelu(x, w, b), lambda: VF.linear(x, w, b),
                 lambda: VF.linear_act(x, w, b, "quick_gelu"),
                 lambda: VF.linear(x, w, b, residual=torch.zeros(20, 48)),
                 lambda: torch.ops.vit_fast.linear_act_fwd(x, w, b, None, "gelu", False),
                 lambda: kernels.linear_act(x, w, b, None, torch.empty(20, 48, dtype=torch.bfloat16), None, "gelu")):
        with pytest.raises(RuntimeError, match=match):
            call()
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError, match=match):
        VF.linear_gelu(x.float(), w.float(), b.float())


@pytest.mark.parametrize("path", ["torch-forced", "torch-cpu"])
def test_float64_gradcheck_on_the_torch_path(monkeypatch, path):
    select_path(path, monkeypatch, "cpu")
    x, w, b = _linear_inputs((2, 3), 6, 5, torch.float32, "cpu")
    r = torch.randn(2, 3, 5)
    before = dispatch.kernel_launches.copy()
    for approximate in ("none", "tanh"):
        float64_gradcheck(lambda x, w, b: VF.linear_gelu(x, w, b, approximate), [x, w, b])
    for activation in ("quick_gelu", "gelu_tanh"):
        float64_gradcheck(lambda x, w, b: VF.linear_act(x, w, b, activation), [x, w, b])
    float64_gradcheck(lambda x, w, b, r: VF.linear_act(x, w, b, "none", residual=r), [x, w, b, r])
    float64_gradcheck(lambda x, w, b, r: VF.linear(x, w, b, residual=r), [x, w, b, r])
    assert VF.linear(x.double(), w.double()).dtype == torch.float64
    assert dispatch.kernel_launches == before


def test_float64_on_the_kernel_path_names_the_dtype(device):
    require_kernel_path(device)
    x, w, b = (t.double() for t in _linear_inputs((4,), 8, 6, torch.float32, device))
    for call in (lambda: VF.linear_gelu(x, w, b), lambda: VF.linear(x, w, b)):
        with pytest.raises(ValueError, match="x: expected dtype in .* on the kernel path, got float64"):
            call()


WEIGHT_VIEWS = {  # name -> (leaf shape for [N, K] = [200, 96], the view the op gets)
    "contiguous": ((200, 96), lambda t: t),
    "transposed": ((96, 200), lambda t: t.t()),  # strides (1, 200)
    "column-slice": ((200, 192), lambda t: t[:, ::2]),  # strides (192, 2)
    "expanded-rows": ((1, 96), lambda t: t.expand(200, 96)),  # stride 0 over N
}
BIAS_VIEWS = {
    "contiguous": ((200,), lambda t: t),
    "strided": ((400,), lambda t: t[::2]),
    "expanded": ((1,), lambda t: t.expand(200)),
}
VIEW_CASES = [("contiguous", "strided"), ("contiguous", "expanded"), ("transposed", "contiguous"),
              ("column-slice", "strided"), ("expanded-rows", "expanded")]


@pytest.mark.parametrize("fn", ["linear_gelu", "linear"])
@pytest.mark.parametrize("weight_view,bias_view", VIEW_CASES)
def test_weight_and_bias_views(device, weight_view, bias_view, fn):
    """x a column slice, weight and bias strided / transposed / expanded views of leaves: read
    through their strides (bias copied when strided), forward and every gradient against float64,
    the weight and bias gradients landing in the leaves."""
    (w_shape, w_view), (b_shape, b_view) = WEIGHT_VIEWS[weight_view], BIAS_VIEWS[bias_view]
    x = torch.randn(130, 192, device=device)[:, ::2]  # [130, 96], row stride 192, column stride 2
    w = torch.randn(w_shape, device=device) * 96**-0.5
    b = torch.randn(b_shape, device=device)
    if fn == "linear_gelu":
        ours = lambda x, w, b: VF.linear_gelu(x, w_view(w), b_view(b))  # noqa: E731
        theirs = lambda x, w, b: F.gelu(F.linear(x, w_view(w), b_view(b)))  # noqa: E731
        exact = lambda x, w, b: reference.linear_gelu(x, w_view(w), b_view(b))  # noqa: E731
    else:
        ours = lambda x, w, b: VF.linear(x, w_view(w), b_view(b))  # noqa: E731
        theirs = exact = lambda x, w, b: F.linear(x, w_view(w), b_view(b))  # noqa: E731
    _check_fwd_bwd(f"{fn} weight {weight_view} bias {bias_view}", ours, theirs, exact, (x, w, b), device,
                   torch.float32, ops=LINEAR_ACT_OPS if fn == "linear_gelu" else LINEAR_OPS)


def test_force_torch_path(monkeypatch, device):
    x, w, b = _linear_inputs((5,), 32, 48, torch.float32, device)
    monkeypatch.setenv(dispatch.FORCE_TORCH_ENV, "1")
    before = dispatch.kernel_launches.copy()
    torch.testing.assert_close(VF.linear_gelu(x, w, b, "tanh"), F.gelu(F.linear(x, w, b), approximate="tanh"))
    assert dispatch.kernel_launches == before


def test_autocast_casts_like_f_linear(device):
    """Under autocast fp32 x / weight / bias run in the autocast dtype (as F.linear); a float32
    residual keeps float32 (as F.linear(...) + r)."""
    dtype = torch.float16 if device == "cpu" else torch.bfloat16
    x, w, b = _linear_inputs((130,), 96, 200, torch.float32, device)
    r = torch.randn(130, 200, device=device)
    with torch.autocast(device, dtype=dtype):
        y, y_torch = VF.linear_gelu(x, w, b, "tanh"), F.gelu(F.linear(x, w, b), approximate="tanh")
        z, z_torch = VF.linear(x, w, b, residual=r), F.linear(x, w, b) + r
    assert y.dtype == y_torch.dtype == dtype and z.dtype == z_torch.dtype == torch.float32
    gelu_ref = lambda x, w, b: reference.linear_gelu(x, w, b, "tanh")  # noqa: E731
    (floor,), _ = rounding_floors(gelu_ref, [x, w, b])
    check_close("autocast linear_gelu", y, y_torch, gelu_ref(x.double(), w.double(), b.double()), DTYPE_BOUND[dtype],
                floor=floor)
    (floor,), _ = rounding_floors(reference.linear, [x, w, b, r])
    check_close("autocast linear+residual", z, z_torch, reference.linear(x.double(), w.double(), b.double(), r.double()),
                DTYPE_BOUND[dtype], floor=floor)


# ----------------------------------------------------------------------------- the fused MLP

MLP_BACKENDS = ["triton", "torch"]
MLP_LAUNCHES = {"triton": ("mlp_fwd", "mlp_bwd"), "torch": ("mlp_torch_fwd", "mlp_torch_bwd")}


def _act_kwargs(act):
    """VF.mlp's keyword for `act`: F.gelu's approximate ("none" | "tanh") or an activation name."""
    return dict(approximate=act) if act in ("none", "tanh") else dict(activation=act)


def _torch_act(act):
    """`act` (either spelling) by torch ops: F.gelu, or x * sigmoid(1.702 x) for quick_gelu."""
    name = ops_mlp.APPROXIMATE_TO_ACTIVATION.get(act, act)
    return lambda t: ops_mlp.torch_activation(t, name)


def _mlp_ref(approximate):
    """float64 (or same-dtype torch) math of the MLP: F.linear, the activation, F.linear, + residual."""
    act = _torch_act(approximate)

    def fn(x, w1, b1, w2, b2, r=None):
        y = F.linear(act(F.linear(x, w1, b1)), w2, b2)
        return y if r is None else y + r
    return fn


def _mlp_inputs(shape, C, hidden, dtype, device, bias=True, residual_dtype=None, C2=None):
    C2 = C2 or C
    x, w1, b1 = _linear_inputs(shape, C, hidden, dtype, device, bias)
    _, w2, b2 = _linear_inputs((1,), hidden, C2, dtype, device, bias)
    r = torch.randn(*shape, C2, device=device, dtype=residual_dtype) if residual_dtype is not None else None
    return x, w1, b1, w2, b2, r


def _check_mlp(name, inputs, approximate, backend, device, monkeypatch, dtype, view=None):
    """VF.mlp's output and every input gradient (x, w1, b1, w2, b2, residual) against float64 through
    opnumerics.compare_to_float64; proves the chosen backend's forward and backward ran once each and
    the two-op path did not run. ``view`` maps the leaves to what the op gets (strided views)."""
    monkeypatch.setenv(ops_mlp.MLP_BACKEND_ENV, backend)
    view = view or (lambda *t: t)
    ref = _mlp_ref(approximate)
    ours = lambda *t: VF.mlp(*view(*t), **_act_kwargs(approximate))  # noqa: E731
    theirs = lambda *t: ref(*view(*t))  # noqa: E731
    names = [f"{name} out"] + [f"{name} d{n}" for n in ("x", "w1", "b1", "w2", "b2", "r")]
    before = dispatch.kernel_launches.copy()
    exact_shape = theirs(*(t.double() if t is not None else None for t in inputs)).shape
    dy = torch.randn(exact_shape, device=device)
    results = compare_to_float64(names, ours, theirs, theirs, list(inputs), [dy], bound=_bound(dtype, device))
    fwd, bwd = MLP_LAUNCHES[backend]
    assert dispatch.kernel_launches[fwd] == before[fwd] + 1, "the forward did not run"
    assert dispatch.kernel_launches[bwd] == before[bwd] + 1, "the backward did not run"
    for op in ("linear_act_fwd", "linear_act_bwd"):  # not the two-op path
        assert dispatch.kernel_launches[op] == before[op]
    out, torch_out, _ = results[f"{name} out"]
    assert out.dtype == torch_out.dtype
    return results


# (leading shape, C, hidden, bias, residual): M not a multiple of the tile (197, 130), C and hidden
# not powers of two, hidden = 4 C, no bias, no residual, a float32 residual
MLP_CASES = [((197,), 100, 200, True, "same"), ((2, 65), 48, 192, True, "same"), ((130,), 100, 200, False, None),
             ((2, 65), 48, 192, True, torch.float32)]


@pytest.mark.parametrize("backend", MLP_BACKENDS)
@pytest.mark.parametrize("approximate", ["none", "tanh", "quick_gelu"])
@pytest.mark.parametrize("case", MLP_CASES, ids=lambda c: f"{c[0]}x{c[1]}-{c[2]}-bias{int(c[3])}-r{c[4]}")
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_mlp_matches_float64(device, monkeypatch, dtype, case, approximate, backend):
    shape, C, hidden, bias, residual = case
    residual_dtype = dtype if residual == "same" else residual
    inputs = _mlp_inputs(shape, C, hidden, dtype, device, bias, residual_dtype)
    _check_mlp(f"mlp {backend} {approximate} {dtype} {shape}x{C}-{hidden}", inputs, approximate, backend, device,
               monkeypatch, dtype)


MLP_VIEWS = {  # name -> leaves (x, w1, b1, w2, b2, r) for C = 100, hidden = 200 -> the views the op gets
    "transposed": (((130, 200), (100, 200), (200,), (200, 100), (100,), (130, 100)),
                   lambda x, w1, b1, w2, b2, r: (x[:, ::2], w1.t(), b1, w2.t(), b2, r)),
    "strided": (((2, 65, 300), (200, 200), (400,), (100, 400), (1,), (65, 2, 100)),
                lambda x, w1, b1, w2, b2, r: (x[..., 1::3], w1[:, ::2], b1[::2], w2[:, 1::2], b2.expand(100),
                                              r.transpose(0, 1))),
    "expanded-rows": (((130, 100), (1, 100), (200,), (1, 200), (100,), (130, 100)),
                      lambda x, w1, b1, w2, b2, r: (x, w1.expand(200, 100), b1, w2.expand(100, 200), b2, r)),
}


@pytest.mark.parametrize("backend", MLP_BACKENDS)
@pytest.mark.parametrize("case", list(MLP_VIEWS))
def test_mlp_strided_views(device, monkeypatch, case, backend):
    """x, weights, biases and residual as strided / transposed / expanded views of leaves: read
    through their strides, forward and every gradient against float64, landing in the leaves."""
    shapes, view = MLP_VIEWS[case]
    inputs = [torch.randn(s, device=device) for s in shapes]
    inputs[1] = inputs[1] * 100**-0.5
    inputs[3] = inputs[3] * 200**-0.5
    _check_mlp(f"mlp {backend} views {case}", inputs, "none", backend, device, monkeypatch, torch.float32, view=view)


@pytest.mark.parametrize("backend", MLP_BACKENDS)
@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=str)
@pytest.mark.parametrize("path", PATHS)
def test_mlp_empty_leading_dims(device, monkeypatch, path, shape, backend):
    """Zero rows: an empty [..., C] result, forward and backward, on every path and backend; the
    weight, bias and residual gradients are zeros / empty."""
    monkeypatch.setenv(ops_mlp.MLP_BACKEND_ENV, backend)
    device = select_path(path, monkeypatch, device)
    inputs = _mlp_inputs(shape, 32, 48, torch.float32, device, residual_dtype=torch.float32)
    before = dispatch.kernel_launches.copy()
    (y,), grads = run(lambda *t: VF.mlp(*t), list(inputs), [torch.ones(*shape, 32, device=device)])
    assert y.shape == (*shape, 32) and y.dtype == torch.float32
    assert grads[0].shape == inputs[0].shape and grads[5].shape == inputs[5].shape
    for g, t in zip(grads[1:5], inputs[1:5]):
        assert torch.equal(g, torch.zeros_like(t))
    if path == "kernel":
        fwd, bwd = MLP_LAUNCHES[backend]
        assert dispatch.kernel_launches[fwd] == before[fwd] + 1
        assert dispatch.kernel_launches[bwd] == before[bwd] + 1
    else:
        assert dispatch.kernel_launches == before


def test_mlp_bf16_under_the_interpreter_raises(device, monkeypatch):
    """The Triton backend's matmuls (forward and the fused backward) refuse bf16 under the interpreter."""
    require_interpreter(device)
    monkeypatch.setenv(ops_mlp.MLP_BACKEND_ENV, "triton")
    x, w1, b1, w2, b2, _ = (t.bfloat16() if t is not None else None
                            for t in _mlp_inputs((20,), 32, 48, torch.float32, "cpu"))
    match = "bfloat16 under TRITON_INTERPRET=1: Triton's interpreter computes tl.dot on bf16 wrongly"
    with pytest.raises(RuntimeError, match=match):
        VF.mlp(x, w1, b1, w2, b2)
    with pytest.raises(RuntimeError, match=match):
        kernels.linear_act_grad(x, w2.t(), torch.zeros(20, 48, dtype=torch.bfloat16),
                                torch.empty(20, 48, dtype=torch.bfloat16), "gelu")
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError, match=match):
        VF.mlp(*(t.float() for t in (x, w1, b1, w2, b2)))


@pytest.mark.parametrize("path", ["torch-forced", "torch-cpu"])
def test_mlp_float64_gradcheck_on_the_torch_path(monkeypatch, path):
    select_path(path, monkeypatch, "cpu")
    x, w1, b1, w2, b2, r = _mlp_inputs((2, 3), 6, 10, torch.float32, "cpu", residual_dtype=torch.float32)
    before = dispatch.kernel_launches.copy()
    for approximate in ("none", "tanh"):
        float64_gradcheck(lambda *t: VF.mlp(*t, approximate=approximate), [x, w1, b1, w2, b2, r])
    float64_gradcheck(lambda *t: VF.mlp(*t, activation="quick_gelu"), [x, w1, b1, w2, b2, r])
    float64_gradcheck(lambda x, w1, w2: VF.mlp(x, w1, None, w2, None), [x, w1, w2])
    assert VF.mlp(x.double(), w1.double(), None, w2.double(), None).dtype == torch.float64
    assert dispatch.kernel_launches == before


def test_mlp_float64_on_the_kernel_path_names_the_dtype(device):
    require_kernel_path(device)
    x, w1, b1, w2, b2, _ = (t.double() if t is not None else None
                            for t in _mlp_inputs((4,), 8, 12, torch.float32, device))
    with pytest.raises(ValueError, match="x: expected dtype in .* on the kernel path, got float64"):
        VF.mlp(x, w1, b1, w2, b2)


@pytest.mark.parametrize("backend", MLP_BACKENDS)
def test_mlp_autocast_casts_like_f_linear(device, monkeypatch, backend):
    """Under autocast the MLP runs in the autocast dtype (as F.linear); a float32 residual keeps float32."""
    monkeypatch.setenv(ops_mlp.MLP_BACKEND_ENV, backend)
    dtype = torch.float16 if device == "cpu" else torch.bfloat16
    inputs = _mlp_inputs((130,), 96, 200, torch.float32, device, residual_dtype=torch.float32)
    with torch.autocast(device, dtype=dtype):
        y, y_torch = VF.mlp(*inputs, approximate="tanh"), _mlp_ref("tanh")(*inputs)
    assert y.dtype == y_torch.dtype == torch.float32
    ref = _mlp_ref("tanh")
    (floor,), _ = rounding_floors(ref, list(inputs))
    check_close("autocast mlp", y, y_torch, ref(*(t.double() for t in inputs)), DTYPE_BOUND[dtype], floor=floor)


def test_mlp_backend_selection(monkeypatch):
    """VIT_FAST_MLP_BACKEND forces a backend; unset, the table by (capability, dtype, activation),
    the default for anything not in it; a bad value raises naming the variable."""
    x = torch.zeros(2, 4)
    monkeypatch.delenv(ops_mlp.MLP_BACKEND_ENV, raising=False)
    assert ops_mlp.mlp_backend(x, "gelu") == ops_mlp.DEFAULT_MLP_BACKEND == "triton"  # CPU: the default
    for key, backend in ops_mlp.MLP_BACKEND_TABLE.items():
        assert ops_mlp.backend_for(*key) == backend and backend in ops_mlp.MLP_BACKENDS
    assert ops_mlp.backend_for((9, 0), torch.bfloat16, "gelu") == "triton"  # H100: measured faster
    assert ops_mlp.backend_for((7, 5), torch.float16, "gelu") == ops_mlp.DEFAULT_MLP_BACKEND  # not in the table
    monkeypatch.setitem(ops_mlp.MLP_BACKEND_TABLE, ((8, 0), torch.float16, "gelu_tanh"), "torch")
    assert ops_mlp.backend_for((8, 0), torch.float16, "gelu_tanh") == "torch"
    assert ops_mlp.backend_for((8, 0), torch.float16, "gelu") == ops_mlp.DEFAULT_MLP_BACKEND
    for forced in ops_mlp.MLP_BACKENDS:
        monkeypatch.setenv(ops_mlp.MLP_BACKEND_ENV, forced)
        assert ops_mlp.mlp_backend(x, "gelu") == forced
    monkeypatch.setenv(ops_mlp.MLP_BACKEND_ENV, "cublas")
    with pytest.raises(ValueError, match="VIT_FAST_MLP_BACKEND: expected one of"):
        ops_mlp.mlp_backend(x, "gelu")


MLP_BAD_INPUTS = [
    (dict(x=torch.randn(4, 7)), ValueError, "x: last dim 7 does not match fc1_weight"),
    (dict(fc1_weight=torch.randn(12)), ValueError, "fc1_weight: expected a 2-D"),
    (dict(fc1_bias=torch.randn(5)), ValueError, "fc1_bias: expected shape"),
    (dict(fc2_weight=torch.randn(8, 11)), ValueError, "fc2_weight: expected in_features 12 .fc1_weight's"),
    (dict(fc2_bias=torch.randn(7)), ValueError, "fc2_bias: expected shape"),
    (dict(fc2_weight=torch.randn(8, 12, dtype=torch.float16)), ValueError, "fc2_weight: expected dtype"),
    (dict(fc2_weight=torch.randn(8, 12, device="meta")), RuntimeError, "fc2_weight: expected device"),
    (dict(residual=torch.randn(4, 5)), ValueError, "residual: expected shape"),
    (dict(residual=torch.randn(4, 8, dtype=torch.float16)), ValueError, "residual: expected dtype"),
    (dict(approximate="erf"), ValueError, "approximate"),
    (dict(activation="none"), ValueError, "activation: expected one of"),
    (dict(activation="quick_gelu", approximate="tanh"), ValueError, "pass one of them"),
]


@pytest.mark.parametrize("kwargs,error,match", MLP_BAD_INPUTS, ids=[b[2][:30] for b in MLP_BAD_INPUTS])
def test_mlp_bad_inputs(kwargs, error, match):
    x, w1, b1, w2, b2, _ = _mlp_inputs((4,), 8, 12, torch.float32, "cpu")
    args = dict(x=x, fc1_weight=w1, fc1_bias=b1, fc2_weight=w2, fc2_bias=b2)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        VF.mlp(**args)


@pytest.mark.parametrize("backend", MLP_BACKENDS)
def test_mlp_opcheck(device, backend):
    """The custom ops' registration (schema, fake impls, dispatch); their gradients are MlpFunction's
    (test_function_paths_match, test_torch_compile_holds_the_custom_ops)."""
    x, w1, b1, w2, b2, r = _mlp_inputs((20,), 32, 48, torch.float32, device, residual_dtype=torch.float32)
    torch.library.opcheck(torch.ops.vit_fast.mlp_fwd, (x, w1, b1, w2, b2, r, "gelu_tanh", True, backend))
    torch.library.opcheck(torch.ops.vit_fast.mlp_fwd, (x, w1, None, w2, None, None, "gelu", False, backend))
    pre = torch.randn(20, 48, device=device)
    h, dy = F.gelu(pre), torch.randn(20, 32, device=device)
    args = (x, w1, w2, pre, h, "gelu")
    torch.library.opcheck(torch.ops.vit_fast.mlp_bwd, (dy, *args, True, True, backend))
    torch.library.opcheck(torch.ops.vit_fast.mlp_bwd, (dy, *args, False, False, backend))
    torch.library.opcheck(torch.ops.vit_fast.mlp_bwd, (dy, *args[:-1], "quick_gelu", True, True, backend))


@pytest.mark.slow
def test_mlp_torch_compile_fullgraph(device):
    """The default backend (inductor) around vit_fast::mlp_fwd / mlp_bwd: the eager numbers."""
    inputs = _mlp_inputs((2, 9), 32, 64, torch.float32, device, residual_dtype=torch.float32)

    def block_mlp(x, w1, b1, w2, b2, r):
        return VF.mlp(x, w1, b1, w2, b2, residual=r, approximate="tanh")

    check_compiled(block_mlp, list(inputs), [torch.ones(2, 9, 32, device=device)], launches=["mlp_fwd", "mlp_bwd"],
                   backend="inductor", exact=False)


# ----------------------------------------------------------------------------- SwiGLU


def _swiglu_ref(x, wg, bg, wx, bx):
    """timm's SwiGLU up to its norm / fc2, by torch ops (float64 copies: the reference)."""
    return F.silu(F.linear(x, wg, bg)) * F.linear(x, wx, bx)


def _swiglu_inputs(shape, C, hidden, dtype, device, bias_g=True, bias_x=True):
    x, wg, bg = _linear_inputs(shape, C, hidden, dtype, device, bias_g)
    _, wx, bx = _linear_inputs((1,), C, hidden, dtype, device, bias_x)
    return x, wg, bg, wx, bx


def _check_swiglu(name, inputs, device, dtype, view=None):
    """VF.swiglu's output and every input gradient against float64 (opnumerics); the fused forward
    and backward ran once each."""
    view = view or (lambda *t: t)
    ours = lambda *t: VF.swiglu(*view(*t))  # noqa: E731
    theirs = lambda *t: _swiglu_ref(*view(*t))  # noqa: E731
    before = dispatch.kernel_launches.copy()
    exact_shape = theirs(*(t.double() if t is not None else None for t in inputs)).shape
    dy = torch.randn(exact_shape, device=device)
    names = [f"{name} out"] + [f"{name} d{n}" for n in ("x", "wg", "bg", "wx", "bx")]
    results = compare_to_float64(names, ours, theirs, theirs, list(inputs), [dy], bound=_bound(dtype, device))
    for op in ("swiglu_fwd", "swiglu_bwd"):
        assert dispatch.kernel_launches[op] == before[op] + 1, f"{op} did not run"
    out, torch_out, _ = results[f"{name} out"]
    assert out.dtype == torch_out.dtype
    return results


# (leading shape, C, hidden, bias_g, bias_x): ragged M (197, 130) against the tiles, C and hidden not
# powers of two (a masked K tail), no bias, one bias only
SWIGLU_CASES = [((197,), 100, 200, True, True), ((2, 65), 48, 136, True, True), ((130,), 100, 200, False, False),
                ((130,), 96, 200, False, True)]


@pytest.mark.parametrize("case", SWIGLU_CASES, ids=lambda c: f"{c[0]}x{c[1]}-{c[2]}-bg{int(c[3])}-bx{int(c[4])}")
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_swiglu_matches_float64(device, dtype, case):
    shape, C, hidden, bias_g, bias_x = case
    inputs = _swiglu_inputs(shape, C, hidden, dtype, device, bias_g, bias_x)
    _check_swiglu(f"swiglu {dtype} {shape}x{C}-{hidden}", inputs, device, dtype)


SWIGLU_VIEWS = {  # name -> leaves (x, wg, bg, wx, bx) for C = 100, hidden = 200 -> the views the op gets
    # EVA's GluMlp-style packed fc1 [2H, C]: the two row-halves, no copy; x a column slice
    "packed-fc1": (((130, 200), (400, 100), (400,), (1, 1), (1,)),
                   lambda x, w, b, _w, _b: (x[:, ::2], w[:200], b[:200], w[200:], b[200:])),
    "transposed": (((2, 65, 300), (100, 200), (400,), (100, 200), (1,)),
                   lambda x, wg, bg, wx, bx: (x[..., 1::3], wg.t(), bg[::2], wx.t(), bx.expand(200))),
}


@pytest.mark.parametrize("case", list(SWIGLU_VIEWS))
def test_swiglu_strided_views(device, case):
    """x, weights and biases as strided / transposed / expanded views of leaves (a packed fc1 split in
    two): read through their strides, forward and every gradient against float64, landing in the leaves."""
    shapes, view = SWIGLU_VIEWS[case]
    inputs = [torch.randn(s, device=device) for s in shapes]
    inputs[1] = inputs[1] * 100**-0.5
    inputs[3] = inputs[3] * 100**-0.5
    results = _check_swiglu(f"swiglu views {case}", inputs, device, torch.float32, view=view)
    if case == "packed-fc1":  # both halves' gradients land in the one packed leaf
        assert results[f"swiglu views {case} dwg"][0].shape == (400, 100)


@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=str)
@pytest.mark.parametrize("path", PATHS)
def test_swiglu_empty_leading_dims(device, monkeypatch, path, shape):
    """Zero rows: an empty [..., H] result, forward and backward, on every path; zero weight and bias grads."""
    device = select_path(path, monkeypatch, device)
    inputs = _swiglu_inputs(shape, 32, 48, torch.float32, device)
    before = dispatch.kernel_launches.copy()
    (y,), grads = run(VF.swiglu, list(inputs), [torch.ones(*shape, 48, device=device)])
    assert y.shape == (*shape, 48) and y.dtype == torch.float32
    assert grads[0].shape == inputs[0].shape
    for g, t in zip(grads[1:], inputs[1:]):
        assert torch.equal(g, torch.zeros_like(t))
    if path == "kernel":
        assert dispatch.kernel_launches["swiglu_fwd"] == before["swiglu_fwd"] + 1
        assert dispatch.kernel_launches["swiglu_bwd"] == before["swiglu_bwd"] + 1
    else:
        assert dispatch.kernel_launches == before


def test_swiglu_bf16_under_the_interpreter_raises(device):
    require_interpreter(device)
    x, wg, bg, wx, bx = (t.bfloat16() for t in _swiglu_inputs((20,), 32, 48, torch.float32, "cpu"))
    match = "bfloat16 under TRITON_INTERPRET=1: Triton's interpreter computes tl.dot on bf16 wrongly"
    for call in (lambda: VF.swiglu(x, wg, bg, wx, bx),
                 lambda: torch.ops.vit_fast.swiglu_fwd(x, wg, bg, wx, bx, False),
                 lambda: kernels.swiglu(x, wg, bg, wx, bx, torch.empty(20, 48, dtype=torch.bfloat16))):
        with pytest.raises(RuntimeError, match=match):
            call()
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError, match=match):
        VF.swiglu(*(t.float() for t in (x, wg, bg, wx, bx)))


@pytest.mark.parametrize("path", ["torch-forced", "torch-cpu"])
def test_swiglu_float64_gradcheck_on_the_torch_path(monkeypatch, path):
    select_path(path, monkeypatch, "cpu")
    x, wg, bg, wx, bx = _swiglu_inputs((2, 3), 6, 10, torch.float32, "cpu")
    before = dispatch.kernel_launches.copy()
    float64_gradcheck(VF.swiglu, [x, wg, bg, wx, bx])
    float64_gradcheck(lambda x, wg, wx: VF.swiglu(x, wg, None, wx, None), [x, wg, wx])
    assert VF.swiglu(x.double(), wg.double(), None, wx.double(), None).dtype == torch.float64
    assert dispatch.kernel_launches == before


def test_swiglu_float64_on_the_kernel_path_names_the_dtype(device):
    require_kernel_path(device)
    inputs = [t.double() for t in _swiglu_inputs((4,), 8, 12, torch.float32, device)]
    with pytest.raises(ValueError, match="x: expected dtype in .* on the kernel path, got float64"):
        VF.swiglu(*inputs)


def test_swiglu_autocast_casts_like_f_linear(device):
    dtype = torch.float16 if device == "cpu" else torch.bfloat16
    inputs = _swiglu_inputs((130,), 96, 200, torch.float32, device)
    with torch.autocast(device, dtype=dtype):
        y, y_torch = VF.swiglu(*inputs), _swiglu_ref(*inputs)
    assert y.dtype == y_torch.dtype == dtype
    (floor,), _ = rounding_floors(_swiglu_ref, list(inputs))
    check_close("autocast swiglu", y, y_torch, _swiglu_ref(*(t.double() for t in inputs)), DTYPE_BOUND[dtype],
                floor=floor)


SWIGLU_BAD_INPUTS = [
    (dict(x=torch.randn(4, 7)), ValueError, "x: last dim 7 does not match fc1_g_weight"),
    (dict(fc1_g_weight=torch.randn(12)), ValueError, "fc1_g_weight: expected a 2-D"),
    (dict(fc1_x_weight=torch.randn(10, 8)), ValueError, "fc1_x_weight: expected the shape of fc1_g_weight"),
    (dict(fc1_x_bias=torch.randn(5)), ValueError, "fc1_x_bias: expected shape"),
    (dict(fc1_g_bias=torch.randn(12, dtype=torch.float16)), ValueError, "fc1_g_bias: expected dtype"),
    (dict(fc1_x_weight=torch.randn(12, 8, device="meta")), RuntimeError, "fc1_x_weight: expected device"),
]


@pytest.mark.parametrize("kwargs,error,match", SWIGLU_BAD_INPUTS, ids=[b[2][:30] for b in SWIGLU_BAD_INPUTS])
def test_swiglu_bad_inputs(kwargs, error, match):
    x, wg, bg, wx, bx = _swiglu_inputs((4,), 8, 12, torch.float32, "cpu")
    args = dict(x=x, fc1_g_weight=wg, fc1_g_bias=bg, fc1_x_weight=wx, fc1_x_bias=bx)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        VF.swiglu(**args)


def test_swiglu_opcheck(device):
    x, wg, bg, wx, bx = _swiglu_inputs((20,), 32, 48, torch.float32, device)
    torch.library.opcheck(torch.ops.vit_fast.swiglu_fwd, (x, wg, bg, wx, bx, True))
    torch.library.opcheck(torch.ops.vit_fast.swiglu_fwd, (x, wg, None, wx, None, False))
    pre, dh = torch.randn(20, 96, device=device), torch.randn(20, 48, device=device)
    for has_bias in (True, False):
        torch.library.opcheck(torch.ops.vit_fast.swiglu_bwd, (dh, x, wg, wx, pre, has_bias))


@pytest.mark.slow
def test_swiglu_torch_compile_fullgraph(device):
    """EVA-02's MLP as the family wires it (swiglu, LayerNorm (scale_mlp), fc2 with the residual) under
    the default backend (inductor): the eager numbers."""
    x, wg, bg, wx, bx = _swiglu_inputs((2, 9), 32, 64, torch.float32, device)
    _, w2, b2 = _linear_inputs((1,), 64, 32, torch.float32, device)

    def eva_mlp(x, wg, bg, wx, bx, w2, b2):
        h = F.layer_norm(VF.swiglu(x, wg, bg, wx, bx), (64,))
        return VF.linear(h, w2, b2, residual=x)

    check_compiled(eva_mlp, [x, wg, bg, wx, bx, w2, b2], [torch.ones(2, 9, 32, device=device)],
                   launches=["swiglu_fwd", "swiglu_bwd", "linear_act_fwd"], backend="inductor", exact=False)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_swiglu_kernels_write_every_element(device, dtype):
    """swiglu_kernel (7 ragged row tiles x 4 ragged column tiles, a masked K tail) and
    swiglu_backward_kernel (2 row programs, a ragged tail) on NaN-poisoned outputs vs float64;
    two backward runs bit-identical (the bias partials are summed in a fixed order)."""
    M, C, hidden = 197, 100, 200
    x, wg, bg, wx, bx = _swiglu_inputs((M,), C, hidden, dtype, device)
    h = torch.full((M, hidden), float("nan"), device=device, dtype=dtype)
    pre = torch.full((M, 2 * hidden), float("nan"), device=device)  # float32: no rounding of g | u
    kernels.swiglu(x, wg, bg, wx, bx, h, pre)
    g, u = F.linear(x.double(), wg.double(), bg.double()), F.linear(x.double(), wx.double(), bx.double())
    torch.testing.assert_close(pre.double(), torch.cat([g, u], 1), rtol=1e-5, atol=1e-5)
    bound = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(h.double(), F.silu(g) * u, rtol=bound, atol=bound)
    M2 = 300  # > BWD_ROWS_PER_PROGRAM: two row programs
    dh, pre2 = torch.randn(M2, hidden, device=device), torch.randn(M2, 2 * hidden, device=device) * 3
    gg, uu = (t.double().requires_grad_() for t in pre2.split(hidden, 1))
    (F.silu(gg) * uu).backward(dh.double())
    runs = []
    for _ in range(2):
        d = torch.full((M2, 2 * hidden), float("nan"), device=device)
        partial = torch.full((kernels.db_partial_rows(M2), 2 * hidden), float("nan"), device=device)
        kernels.swiglu_backward(dh, pre2, d, partial)
        torch.testing.assert_close(d.double(), torch.cat([gg.grad, uu.grad], 1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(partial.double().sum(0), torch.cat([gg.grad.sum(0), uu.grad.sum(0)]),
                                   rtol=1e-5, atol=1e-4)
        runs.append((d, partial))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


# ----------------------------------------------------------------------------- launchers

TMA_CONFIGS = [
    kernels.MatmulConfig(32, 64, 32, GROUP_M=4, num_warps=4, num_stages=1),
    kernels.MatmulConfig(32, 64, 32, GROUP_M=2, num_warps=4, num_stages=1, EPILOGUE_SPLIT=2),
    kernels.MatmulConfig(64, 32, 16, GROUP_M=8, num_warps=4, num_stages=1, FLATTEN=True, WARP_SPECIALIZE=True),
]


@pytest.mark.parametrize("config", TMA_CONFIGS, ids=["plain", "split_epilogue", "flatten_ws"])
@pytest.mark.parametrize("activation", kernels.ACTIVATIONS)
def test_tma_kernel_writes_every_element(device, activation, config):
    """The persistent TMA kernel (on CPU by the interpreter; on a GPU it needs sm_90), 3 programs
    walking 20 ragged tiles: NaN-poisoned outputs, bias and residual, against float64."""
    if device == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA kernel needs sm_90+")
    x, w, b = _linear_inputs((130,), 96, 200, torch.float32, device)
    r = torch.randn(130, 200, device=device)
    out, pre = (torch.full((130, 200), float("nan"), device=device) for _ in range(2))
    kernels.linear_act(x, w, b, r, out, pre, activation, kernel="tma", config=config, num_programs=3)
    exact = reference.linear(x.double(), w.double(), b.double(), r.double())
    act = functools.partial(ops_mlp.torch_activation, activation=activation)
    torch.testing.assert_close(pre.double(), exact, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.double(), act(exact), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", kernels.ACTIVATIONS)
def test_pointer_kernel_writes_every_element(device, activation):
    x, w, b = _linear_inputs((130,), 96, 200, torch.float16, device)
    out = torch.full((130, 200), float("nan"), dtype=torch.float16, device=device)
    pre = torch.full((130, 200), float("nan"), device=device)
    kernels.linear_act(x, w, b, None, out, pre, activation, kernel="pointer")
    exact = reference.linear(x.double(), w.double(), b.double())
    act = functools.partial(ops_mlp.torch_activation, activation=activation)
    torch.testing.assert_close(pre.double(), exact, rtol=1e-5, atol=1e-5)  # pre_out in float32: no rounding
    torch.testing.assert_close(out.double(), act(exact), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("activation", kernels.GRAD_ACTIVATIONS)
def test_activation_backward_writes_every_element(device, activation):
    """dpre and the bias-gradient partials, NaN-poisoned, over 2 row programs with a ragged tail."""
    M, N = 300, 200
    dy, pre = torch.randn(M, N, device=device), torch.randn(M, N, device=device) * 4
    dpre = torch.full((M, N), float("nan"), device=device)
    partial = torch.full((kernels.db_partial_rows(M), N), float("nan"), device=device)
    kernels.activation_backward(dy, pre, dpre, activation, partial)
    p = pre.double().requires_grad_()
    ops_mlp.torch_activation(p, activation).backward(dy.double())
    torch.testing.assert_close(dpre.double(), p.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(partial.double().sum(0), p.grad.sum(0), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("activation", kernels.GRAD_ACTIVATIONS)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_linear_act_grad_writes_every_element(device, dtype, activation):
    """The fused backward matmul's "act_grad" epilogue: dpre = (dy @ W2) * act'(pre) with W2 [C, hidden]
    read through W2.t()'s strides, and the bias-gradient partials (one row per row tile, rows past M
    left out), NaN-poisoned output, 7 ragged row tiles x 4 ragged column tiles, K = 100 (a masked
    K tail); float64 reference; two runs bit-identical."""
    M, C, hidden = 197, 100, 200
    dy = torch.randn(M, C, device=device).to(dtype)
    w2 = (torch.randn(C, hidden, device=device) * C**-0.5).to(dtype)
    pre = (torch.randn(M, hidden, device=device) * 3).to(dtype)
    p = pre.double().requires_grad_()
    ops_mlp.torch_activation(p, activation).backward(dy.double() @ w2.double())
    bound = 1e-5 if dtype == torch.float32 else 2e-3
    runs = []
    for _ in range(2):
        dpre = torch.full((M, hidden), float("nan"), device=device, dtype=dtype)
        db = kernels.linear_act_grad(dy, w2.t(), pre, dpre, activation)
        assert db.dtype == torch.float32 and db.shape == (hidden,)
        torch.testing.assert_close(dpre.double(), p.grad, rtol=bound, atol=bound)
        torch.testing.assert_close(db.double(), p.grad.sum(0), rtol=bound, atol=bound * 10)
        runs.append((dpre, db))
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    assert kernels.act_grad_partial_rows(M, kernels.default_config("pointer", dy, hidden)) == -(-M // 32)
    assert kernels.linear_act_grad(dy, w2.t(), pre, dpre, activation, bias_grad=False) is None


def test_linear_act_grad_rejects_identity_activation():
    with pytest.raises(ValueError, match="activation"):
        kernels.linear_act_grad(torch.zeros(2, 3), torch.zeros(4, 3), torch.zeros(2, 4), torch.zeros(2, 4), "none")


def test_kernel_selection():
    x, w = torch.randn(64, 96), torch.randn(200, 96)
    assert kernels.select_kernel(x, w, torch.empty(64, 200)) == "pointer"  # CPU: never TMA
    assert kernels._tma_ready(x) and kernels._tma_ready(w)
    assert not kernels._tma_ready(torch.randn(64, 97, dtype=torch.float16)[:, :96])  # 194-byte rows
    assert not kernels._tma_ready(torch.randn(64, 100)[:, 1:97])  # base 4 bytes off
    assert not kernels._tma_ready(torch.randn(96, 64).t())  # column-major


@pytest.mark.slow
def test_kernels_compile_for_hopper(tmp_path):
    """Every tabled config (the small-M tiles and TMA kernel included; the pointer forward with quick_gelu, the TMA one with
    gelu_tanh), the fused MLP backward's "act_grad" epilogue with each pointer config (gelu, gelu_tanh
    and quick_gelu at 16 bits), and the activation backward kernel compile for sm_90 with this Triton, no
    GPU needed, and fit an H100's shared memory; the bf16 "act_grad" build keeps its tiles in
    registers (no local-memory stack); SwiGLU's two-accumulator forward (both table entries, the 16-bit
    one without spills) and its elementwise backward likewise."""
    out = sm90.run_script(sm90.script("mlp"), tmp_path)
    table = [*kernels.CONFIGS, *kernels.SMALL_M_CONFIGS]  # the big tiles and the small-M ones
    assert out.count("shared") == len(table) + 2  # + swiglu_backward_kernel, activation_backward_kernel
    assert out.count("swiglu ") == len(kernels.SWIGLU_CONFIGS)
    assert out.count("act_grad ") == sum((3 if size == 2 else 1) for kernel, size in table if kernel == "pointer")


# ----------------------------------------------------------------------------- registration


def test_opcheck(device):
    """The custom ops' registration (schema, fake impls, dispatch); their gradients are
    LinearActFunction's (test_function_paths_match, test_torch_compile_holds_the_custom_ops)."""
    x, w, b = _linear_inputs((20,), 32, 48, torch.float32, device)
    r = torch.randn(20, 48, device=device)
    torch.library.opcheck(torch.ops.vit_fast.linear_act_fwd, (x, w, b, None, "gelu_tanh", True))
    torch.library.opcheck(torch.ops.vit_fast.linear_act_fwd, (x, w, None, r, "none", False))
    torch.library.opcheck(torch.ops.vit_fast.linear_act_fwd, (x, w, b, None, "quick_gelu", True))
    dy, pre = torch.randn(20, 48, device=device), torch.randn(20, 48, device=device)
    torch.library.opcheck(torch.ops.vit_fast.linear_act_bwd, (dy, pre, x, w, "gelu", True))
    torch.library.opcheck(torch.ops.vit_fast.linear_act_bwd, (dy, pre, x, w, "quick_gelu", True))


def _saved_are_not_differentiable(function, n_outputs):
    """function.apply, checking that its outputs past the first (saved intermediates) need no grad."""
    def call(*args):
        outs = function.apply(*args)
        assert len(outs) == n_outputs and not any(t.requires_grad for t in outs[1:])
        return outs
    return call


def _function_cases(device):
    """name -> (Function call on 2-D inputs, inputs, upstream gradients, custom ops, launches)."""
    x, w, b = _linear_inputs((20,), 32, 48, torch.float32, device)
    r, dy = torch.randn(20, 48, device=device), torch.randn(20, 48, device=device)
    mlp_inputs = list(_mlp_inputs((20,), 32, 48, torch.float32, device, residual_dtype=torch.float32))
    linear_act = _saved_are_not_differentiable(ops_mlp.LinearActFunction, 2)
    mlp = _saved_are_not_differentiable(ops_mlp.MlpFunction, 3)
    swiglu = _saved_are_not_differentiable(ops_mlp.SwigluFunction, 2)
    return {
        # activation "none": its backward is torch's matmuls (no bwd op, no launch)
        "linear_act gelu": (lambda *t: linear_act(*t, None, "gelu", True), [x, w, b], [dy],
                            ["linear_act_fwd", "linear_act_bwd"], ["linear_act_fwd", "linear_act_bwd"]),
        "linear residual": (lambda *t: linear_act(*t, "none", False), [x, w, b, r], [dy], ["linear_act_fwd"],
                            ["linear_act_fwd"]),
        "mlp triton": (lambda *t: mlp(*t, "gelu", True, "triton"), mlp_inputs, [torch.randn(20, 32, device=device)],
                       ["mlp_fwd", "mlp_bwd"], ["mlp_fwd", "mlp_bwd"]),
        "mlp torch": (lambda *t: mlp(*t, "gelu", True, "torch"), mlp_inputs, [torch.randn(20, 32, device=device)],
                      ["mlp_fwd", "mlp_bwd"], ["mlp_torch_fwd", "mlp_torch_bwd"]),
        "swiglu": (lambda *t: swiglu(*t, True), list(_swiglu_inputs((20,), 32, 48, torch.float32, device)), [dy],
                   ["swiglu_fwd", "swiglu_bwd"], ["swiglu_fwd", "swiglu_bwd"]),
    }


@pytest.mark.parametrize("case", ["linear_act gelu", "linear residual", "mlp triton", "mlp torch", "swiglu"])
def test_function_paths_match(device, monkeypatch, case):
    """Each Function's eager path (launch functions: the custom op's dispatch costs host time) and its
    traced path (the custom ops, as under torch.compile) run the same code: bit-identical outputs and
    gradients, each launching once, and the saved intermediates (pre, h) need no gradient."""
    fn, inputs, grads_out, ops, launches = _function_cases(device)[case]
    check_op_paths(monkeypatch, fn, inputs, grads_out, [f"vit_fast::{op}" for op in ops], launches)


def _public_cases(device):
    """name -> (public call, inputs, upstream gradient, fwd ops, bwd ops, launches, MLP backend)."""
    x, w, b = _linear_inputs((2, 9), 32, 64, torch.float32, device)
    r = torch.randn(2, 9, 64, device=device)
    dy = torch.randn(2, 9, 64, device=device)
    mlp_inputs = list(_mlp_inputs((2, 9), 32, 64, torch.float32, device, residual_dtype=torch.float32))
    mlp = (lambda *t: VF.mlp(*t, approximate="tanh"), mlp_inputs, [torch.randn(2, 9, 32, device=device)],
           ["mlp_fwd"], ["mlp_bwd"])
    return {
        "linear_gelu": (lambda x, w, b: VF.linear_gelu(x, w, b, "tanh"), [x, w, b], [dy], ["linear_act_fwd"],
                        ["linear_act_bwd"], None, None),
        "linear_act quick_gelu": (lambda x, w, b: VF.linear_act(x, w, b, "quick_gelu"), [x, w, b], [dy],
                                  ["linear_act_fwd"], ["linear_act_bwd"], None, None),
        "linear residual": (lambda x, w, b, r: VF.linear(x, w, b, residual=r), [x, w, b, r], [dy],
                            ["linear_act_fwd"], [], None, None),
        "mlp triton": (*mlp, None, "triton"),
        "mlp torch": (*mlp, ["mlp_torch_fwd", "mlp_torch_bwd"], "torch"),
        "swiglu": (VF.swiglu, list(_swiglu_inputs((2, 9), 32, 64, torch.float32, device)), [dy], ["swiglu_fwd"],
                   ["swiglu_bwd"], None, None),
    }


@pytest.mark.slow
@pytest.mark.parametrize("case", ["linear_gelu", "linear_act quick_gelu", "linear residual", "mlp triton",
                                  "mlp torch", "swiglu"])
def test_torch_compile_holds_the_custom_ops(device, monkeypatch, case):
    """torch.compile(fullgraph=True, aot_eager) of the public function: the forward graph calls the
    fwd custom op, the backward graph the bwd op (none for a plain linear: torch's matmuls), and
    outputs and gradients are eager's, bit for bit."""
    fn, inputs, grads_out, fwd_ops, bwd_ops, launches, backend = _public_cases(device)[case]
    if backend is not None:
        monkeypatch.setenv(ops_mlp.MLP_BACKEND_ENV, backend)
    check_compiled(fn, inputs, grads_out, fwd_ops, bwd_ops, launches)


@pytest.mark.slow
def test_torch_compile_fullgraph(device):
    """The default backend (inductor) around linear_gelu and a linear with the residual: the eager numbers."""
    x, w1, b1 = _linear_inputs((2, 9), 32, 64, torch.float32, device)
    _, w2, b2 = _linear_inputs((1,), 64, 32, torch.float32, device)

    def mlp(x, w1, b1, w2, b2):
        return VF.linear(VF.linear_gelu(x, w1, b1, "tanh"), w2, b2, residual=x)

    check_compiled(mlp, [x, w1, b1, w2, b2], [torch.ones(2, 9, 32, device=device)],
                   launches=["linear_act_fwd", "linear_act_fwd", "linear_act_bwd"], backend="inductor", exact=False)


def _bad(**kw):
    x, w, b = _linear_inputs((4,), 8, 6, torch.float32, "cpu")
    args = dict(x=x, weight=w, bias=b)
    args.update(kw)
    return args


BAD_INPUTS = [
    ("linear_gelu", _bad(x=torch.randn(4, 7)), ValueError, "last dim 7"),
    ("linear_gelu", _bad(weight=torch.randn(48)), ValueError, "weight: expected a 2-D"),
    ("linear_gelu", _bad(weight=torch.randn(6, 8, 1)), ValueError, "weight: expected a 2-D"),
    ("linear_gelu", _bad(bias=torch.randn(5)), ValueError, "bias: expected shape"),
    ("linear_gelu", _bad(bias=torch.randn(1, 6)), ValueError, "bias: expected a 1-D"),
    ("linear_gelu", _bad(weight=torch.randn(6, 8, dtype=torch.float16)), ValueError, "weight: expected dtype"),
    ("linear_gelu", _bad(bias=torch.randn(6, dtype=torch.float64)), ValueError, "bias: expected dtype"),
    ("linear_gelu", _bad(weight=torch.randn(6, 8, device="meta")), RuntimeError, "weight: expected device"),
    ("linear_gelu", _bad(x=torch.ones(4, 8, dtype=torch.int32), weight=torch.ones(6, 8, dtype=torch.int32),
                         bias=None), ValueError, "x: expected dtype"),
    ("linear_gelu", _bad(x=[[1.0] * 8]), TypeError, "x: expected a torch.Tensor"),
    ("linear_gelu", _bad(approximate="erf"), ValueError, "approximate"),
    ("linear_act", _bad(activation="relu"), ValueError, "activation: expected one of"),
    ("linear_act", _bad(activation="quick_gelu", residual=torch.randn(4, 6)), ValueError,
     "residual: only with activation='none'"),
    ("linear_act", _bad(activation="none", residual=torch.randn(4, 5)), ValueError, "residual: expected shape"),
    ("linear", _bad(residual=torch.randn(4, 5)), ValueError, "residual: expected shape"),
    ("linear", _bad(residual=torch.randn(4, 6, dtype=torch.float16)), ValueError, "residual: expected dtype"),
    ("linear", _bad(residual=torch.randn(4, 6, device="meta")), RuntimeError, "residual: expected device"),
]


@pytest.mark.parametrize("fn,kwargs,error,match", BAD_INPUTS, ids=[b[3] for b in BAD_INPUTS])
def test_bad_inputs(fn, kwargs, error, match):
    with pytest.raises(error, match=match):
        getattr(VF, fn)(**kwargs)


WITHOUT_SAVED = {  # op -> (its leaves, its Function called with the save flag off, what the error names)
    "linear_act": (lambda device: _linear_inputs((4,), 8, 6, torch.float32, device),
                   lambda x, w, b: ops_mlp.LinearActFunction.apply(x, w, b, None, "gelu", False), "save_pre=True"),
    "mlp": (lambda device: _mlp_inputs((4,), 8, 12, torch.float32, device)[:5],
            lambda *t: ops_mlp.MlpFunction.apply(*t, None, "gelu", False, "triton"), "save=True"),
    "swiglu": (lambda device: _swiglu_inputs((4,), 8, 12, torch.float32, device),
               lambda *t: ops_mlp.SwigluFunction.apply(*t, False), "save=True"),
}


@pytest.mark.parametrize("op", list(WITHOUT_SAVED))
def test_backward_without_saved_intermediates(device, op):
    """The backward of a forward that saved nothing (no grad was expected) says which flag to set."""
    make, call, match = WITHOUT_SAVED[op]
    out = call(*(t.requires_grad_() for t in make(device)))[0]
    with pytest.raises(RuntimeError, match=match):
        out.sum().backward()


# ----------------------------------------------------------------------------- Mlp


class GELUTanh(nn.Module):  # stands in for timm.layers.GELUTanh (matched by class name)
    def forward(self, x):
        return F.gelu(x, approximate="tanh")


class TimmGELU(nn.Module):  # stands in for timm.layers.GELU (erf), matched by name and module
    def forward(self, x):
        return F.gelu(x)


TimmGELU.__name__ = "GELU"
TimmGELU.__module__ = "timm.layers.activations"

ACT_LAYERS = [
    ("gelu", "none"), ("gelu_tanh", "tanh"), ("GELU", "none"), (nn.GELU, "none"), (nn.GELU(), "none"),
    (nn.GELU(approximate="tanh"), "tanh"), (functools.partial(nn.GELU, approximate="tanh"), "tanh"),
    (GELUTanh, "tanh"), (GELUTanh(), "tanh"), (TimmGELU, "none"),
]


@pytest.mark.parametrize("act_layer,approximate", ACT_LAYERS, ids=[str(a[0]) for a in ACT_LAYERS])
def test_act_layer_spellings(act_layer, approximate):
    assert gelu_approximate(act_layer) == approximate
    assert Mlp(8, 16, act_layer=act_layer).act.approximate == approximate


@pytest.mark.parametrize("act_layer", ["relu", nn.ReLU, nn.SiLU(), nn.Linear, None, 1.0],
                         ids=["relu", "ReLU", "SiLU()", "Linear", "None", "float"])
def test_unknown_act_layer_raises(act_layer):
    with pytest.raises(ValueError, match="act_layer"):
        Mlp(8, 16, act_layer=act_layer)


@pytest.mark.parametrize("act_layer", ["gelu", "gelu_tanh"])
def test_mlp_matches_reference(device, act_layer):
    ref = reference.Mlp(96, 200, act_layer=act_layer).to(device)
    mlp = Mlp(96, 200, act_layer=act_layer).to(device)
    assert list(mlp.state_dict()) == list(ref.state_dict()) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    mlp.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 65, 96, device=device)
    names = [f"Mlp {act_layer} out", f"Mlp {act_layer} dx", *(f"Mlp {act_layer} d{n}" for n, _ in ref.named_parameters())]
    # functional_call swaps the parameters for the inputs given: ref on float64 copies is the float64 reference
    compare_to_float64(names, module_fn(mlp), module_fn(ref), module_fn(ref), [x, *ref.parameters()],
                       [torch.randn(2, 65, 96, device=device)], bound=_bound(torch.float32, device))


def test_mlp_dropout_in_training(device):
    """drop > 0 in training drops (the same masks as the reference for the same RNG state); eval does not."""
    ref = reference.Mlp(32, 64, drop=0.5).to(device)
    mlp = Mlp(32, 64, drop=0.5).to(device)
    mlp.load_state_dict(ref.state_dict())
    x = torch.randn(8, 32, device=device)
    torch.manual_seed(1)
    ours = mlp(x)
    torch.manual_seed(1)
    theirs = ref(x)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    mlp.eval()
    ref.eval()
    assert not torch.allclose(ours, mlp(x))
    torch.testing.assert_close(mlp(x), ref(x), rtol=1e-5, atol=1e-5)


def test_mlp_constructor_options(device):
    mlp = Mlp(16, 24, 8, norm_layer=nn.LayerNorm, bias=(True, False), drop=(0.0, 0.1)).to(device)
    assert mlp.fc2.bias is None and mlp.drop2.p == 0.1 and isinstance(mlp.norm, nn.LayerNorm)
    assert list(mlp.state_dict()) == ["fc1.weight", "fc1.bias", "norm.weight", "norm.bias", "fc2.weight"]
    mlp.eval()
    x = torch.randn(3, 16, device=device)
    expected = F.linear(mlp.norm(F.gelu(mlp.fc1(x))), mlp.fc2.weight)
    torch.testing.assert_close(mlp(x), expected, rtol=1e-5, atol=1e-5)
    assert Mlp(16).fc1.out_features == 16 and Mlp(16).fc2.out_features == 16
    with pytest.raises(ValueError, match="use_conv"):
        Mlp(16, use_conv=True)


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_vit_shapes(dtype, approximate):
    """ViT-B's fc1 (768 -> 3072, 4096 tokens) with GELU and fc2 (3072 -> 768) with the residual.
    fp32 runs exact fp32 dots, against PyTorch's fp32 without tf32 (the no_tf32 fixture)."""
    x, w, b = _linear_inputs((16, 256), 768, 3072, dtype, "cuda")
    _check_fwd_bwd(f"fc1 gelu {approximate} {dtype}", lambda x, w, b: VF.linear_gelu(x, w, b, approximate),
                   lambda x, w, b: F.gelu(F.linear(x, w, b), approximate=approximate),
                   lambda x, w, b: reference.linear_gelu(x, w, b, approximate), (x, w, b), "cuda", dtype)
    h, w2, b2 = _linear_inputs((16, 256), 3072, 768, dtype, "cuda")
    _check_fwd_bwd(f"fc2 residual {dtype}", VF.linear, lambda x, w, b, r: F.linear(x, w, b) + r,
                   reference.linear, (h, w2, b2, torch.randn_like(x)), "cuda", dtype, ops=LINEAR_OPS)


GPU_CONFIGS = [("pointer", None), ("tma", None),
               ("tma", kernels.MatmulConfig(128, 128, 64, GROUP_M=8, num_warps=8, num_stages=3, EPILOGUE_SPLIT=2)),
               ("tma", kernels.MatmulConfig(128, 128, 64, GROUP_M=8, num_warps=8, num_stages=4, WARP_SPECIALIZE=True)),
               ("tma", kernels.MatmulConfig(128, 128, 64, GROUP_M=8, num_warps=8, num_stages=4, FLATTEN=True))]


@pytest.mark.gpu
@pytest.mark.parametrize("kernel,config", GPU_CONFIGS, ids=["pointer", "tma", "tma_split", "tma_ws", "tma_flatten"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_kernels_ragged(kernel, config, dtype):
    """Both kernels (TMA needs sm_90), NaN-poisoned, ragged M and N, bias + residual + GELU."""
    if kernel == "tma" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA kernel needs sm_90+")
    x, w, b = _linear_inputs((1000,), 768, 1544, dtype, "cuda")
    r = torch.randn(1000, 1544, device="cuda", dtype=dtype)
    out, pre = torch.full_like(r, float("nan")), torch.full_like(r, float("nan"))
    kernels.linear_act(x, w, b, r, out, pre, "gelu_tanh", kernel=kernel, config=config)
    exact = reference.linear(x.double(), w.double(), b.double(), r.double())
    assert_close_to_ref(f"{kernel} pre", pre, (F.linear(x, w, b) + r), exact, DTYPE_BOUND[dtype])
    assert_close_to_ref(f"{kernel} out", out, F.gelu(F.linear(x, w, b) + r, approximate="tanh"),
                        F.gelu(exact, approximate="tanh"), DTYPE_BOUND[dtype])


@pytest.mark.gpu
def test_gpu_unaligned_and_odd_shapes():
    """K = 100 (200-byte bf16 rows: no TMA), N = 197, 3-D input: the pointer kernel on any GPU."""
    x, w, b = _linear_inputs((3, 197), 100, 197, torch.bfloat16, "cuda")
    assert kernels.select_kernel(x.view(-1, 100), w, torch.empty(591, 197, device="cuda")) == "pointer"
    _check_fwd_bwd("unaligned bf16", VF.linear_gelu, lambda x, w, b: F.gelu(F.linear(x, w, b)),
                   reference.linear_gelu, (x, w, b), "cuda", torch.bfloat16)


@pytest.mark.gpu
def test_gpu_int64_offsets():
    """M * N > 2^31 elements: rows past the int32 range land where they should (both kernels)."""
    M, K, N = 600_000, 64, 4096
    x, w, b = _linear_inputs((M,), K, N, torch.bfloat16, "cuda")
    tail = slice(M - 300, M)
    for kernel in ("pointer", "tma") if torch.cuda.get_device_capability()[0] >= 9 else ("pointer",):
        out = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
        out[tail] = float("nan")
        kernels.linear_act(x, w, b, None, out, None, "gelu", kernel=kernel)
        exact = reference.linear_gelu(x[tail].double(), w.double(), b.double())
        assert_close_to_ref(f"{kernel} tail rows", out[tail], F.gelu(F.linear(x[tail], w, b)), exact,
                            DTYPE_BOUND[torch.bfloat16])
        del out


@pytest.mark.gpu
def test_gpu_autocast_bf16():
    test_autocast_casts_like_f_linear("cuda")


@pytest.mark.gpu
def test_gpu_deterministic_backward():
    x, w, b = _linear_inputs((4096,), 768, 3072, torch.bfloat16, "cuda")
    grads = []
    for _ in range(2):
        xs, ws, bs = _leaves(x, w, b)
        VF.linear_gelu(xs, ws, bs).backward(torch.ones(4096, 3072, device="cuda", dtype=torch.bfloat16))
        grads.append((xs.grad, ws.grad, bs.grad))
    for a, c in zip(*grads):
        assert torch.equal(a, c)


@pytest.mark.gpu
@pytest.mark.parametrize("act_layer", ["gelu", "gelu_tanh"])
@pytest.mark.slow
def test_gpu_mlp_compile_fullgraph(act_layer):
    mlp = Mlp(768, 3072, act_layer=act_layer).cuda().to(torch.bfloat16)
    x = torch.randn(8, 197, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    eager = mlp(x)
    compiled = torch.compile(mlp, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager)
    (g_eager,) = torch.autograd.grad(eager.sum(), x)
    (g_compiled,) = torch.autograd.grad(compiled.sum(), x)
    torch.testing.assert_close(g_compiled, g_eager)
    torch.library.opcheck(torch.ops.vit_fast.linear_act_fwd,
                          (x.detach().view(-1, 768)[:512], mlp.fc1.weight.detach(), mlp.fc1.bias.detach(), None,
                           "gelu", True))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", MLP_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_mlp_vit_shapes(monkeypatch, dtype, backend):
    """ViT-B's MLP (768 -> 3072 -> 768, 2 x 197 x 8 tokens: ragged against the 128-row tiles) + residual,
    both backends, every gradient against float64; the fused backward's launch counted."""
    inputs = _mlp_inputs((8, 197), 768, 3072, dtype, "cuda", residual_dtype=dtype)
    _check_mlp(f"gpu mlp {backend} {dtype}", inputs, "none", backend, "cuda", monkeypatch, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", MLP_BACKENDS)
def test_gpu_mlp_deterministic_backward(monkeypatch, backend):
    """Weight and bias gradients (and dx) bit-identical run to run: no atomics anywhere."""
    monkeypatch.setenv(ops_mlp.MLP_BACKEND_ENV, backend)
    inputs = _mlp_inputs((4096,), 768, 3072, torch.bfloat16, "cuda", residual_dtype=torch.bfloat16)
    dy = torch.randn(4096, 768, device="cuda", dtype=torch.bfloat16)
    grads = []
    for _ in range(2):
        leaves = _leaves(*inputs)
        grads.append(_grads(VF.mlp(*leaves), leaves, dy))
    for a, c in zip(*grads):
        assert torch.equal(a, c)


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_mlp_compile_and_capture():
    """torch.compile fullgraph of VF.mlp on bf16 ViT-B tokens, and its fwd+bwd captured in a CUDA graph."""
    inputs = _mlp_inputs((2, 197), 768, 3072, torch.bfloat16, "cuda", residual_dtype=torch.bfloat16)
    eager_leaves, compiled_leaves = _leaves(*inputs), _leaves(*inputs)
    eager = VF.mlp(*eager_leaves)
    compiled = torch.compile(VF.mlp, fullgraph=True)(*compiled_leaves)
    torch.testing.assert_close(compiled, eager)
    dy = torch.randn_like(eager)
    for a, b in zip(_grads(compiled, compiled_leaves, dy), _grads(eager, eager_leaves, dy)):
        torch.testing.assert_close(a, b)
    leaves = _leaves(*inputs)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.autograd.grad(VF.mlp(*leaves), leaves, dy)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = torch.autograd.grad(VF.mlp(*leaves), leaves, dy)
    graph.replay()
    fresh = _leaves(*inputs)
    for a, b in zip(captured, torch.autograd.grad(VF.mlp(*fresh), fresh, dy)):
        assert torch.equal(a, b)  # the same kernels on the same inputs, deterministic


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_gpu_second_device():
    x, w, b = _linear_inputs((300,), 96, 200, torch.bfloat16, "cuda:1")
    y = VF.linear_gelu(x, w, b)
    assert y.device == torch.device("cuda:1")
    torch.testing.assert_close(y, F.gelu(F.linear(x, w, b)), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("kernel", ["pointer", "tma"])
@pytest.mark.parametrize("size", [2, 4])
def test_small_outputs_take_the_small_m_tiles(kernel, size):
    """ViT-B on an H100-sized device (132 SMs): batch 1's fc1 and fc2 (M = 197) would not fill one wave
    of the table's tiles, so they take SMALL_M_CONFIGS; batch 256 (M = 50432) keeps the big tile."""
    big, small = kernels.CONFIGS[(kernel, size)], kernels.SMALL_M_CONFIGS[(kernel, size)]
    assert small.BLOCK_M < big.BLOCK_M
    for n in (768, 3072):
        assert kernels.table_config(kernel, size, 197, n, 132) is small
        assert kernels.table_config(kernel, size, 50432, n, 132) is big
    # exactly one wave of big tiles stays big
    rows = 132 // (-(-768 // big.BLOCK_N))
    assert kernels.table_config(kernel, size, rows * big.BLOCK_M, 768, rows * (-(-768 // big.BLOCK_N))) is big
