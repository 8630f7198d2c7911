"""Patch embedding (the C++/CUDA extension vit_fast._C) against float64 math.

Every check compares three results (opnumerics.check_close, with its fp32 rounding floor): the
op, the eager PyTorch pipeline in the same dtype (`vit_fast.reference.patch_embed`, the oracle) and that
pipeline on float64 copies. The library's own PyTorch path (`vit_fast.ops.patch_embed.torch_patch_embed`,
taken with VIT_FAST_FORCE_TORCH=1 or without the extension) is checked against the oracle too.
Outputs the op allocates start as NaN (deterministic mode fills torch.empty / at::empty), so an
element the kernels never write fails the check.
"""
import contextlib
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from numerics import DTYPE_BOUND, assert_close_to_ref, rel_err
from opnumerics import check_close, float64_gradcheck, rounding_floors
from vit_fast import dispatch, reference
from vit_fast import functional as VF
from vit_fast.nn import PatchEmbed
from vit_fast.ops import patch_embed as patch_embed_op

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(autouse=True)
def _poison_uninitialized_memory():
    enabled, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)  # warn_only: cuBLAS would otherwise refuse
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*deterministic.*")
        yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def make_case(B, C, H, W, p, E, dtype, *, layout="contiguous", uint8=False, bias=True, cls=True, pos=True,
              device="cpu", requires_grad=False):
    """Inputs of one call as a dict of functional.patch_embed's arguments."""
    if uint8:
        x = torch.randint(0, 256, (B, C, H, W), dtype=torch.uint8, device=device)
    else:
        x = torch.randn(B, C, H, W, dtype=dtype, device=device) + 2.0
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":  # every other column of a wider image: W stride 2
        x = torch.stack([x, torch.zeros_like(x)], dim=-1).flatten(-2)[..., ::2]
    elif layout == "transposed":  # H and W strides swapped
        x = x.transpose(2, 3).contiguous().transpose(2, 3)
    L = (H // p) * (W // p)
    make = dict(dtype=dtype, device=device)
    case = dict(
        x=x.requires_grad_(requires_grad and not uint8),
        weight=(torch.randn(E, C, p, p, **make) * (C * p * p) ** -0.5).requires_grad_(requires_grad),
        bias=torch.randn(E, **make).requires_grad_(requires_grad) if bias else None,
        cls_token=torch.randn(1, 1, E, **make).requires_grad_(requires_grad) if cls else None,
        pos_embed=torch.randn(1, L + cls, E, **make).requires_grad_(requires_grad) if pos else None,
    )
    if uint8:
        case["mean"], case["std"] = IMAGENET_MEAN[:C], IMAGENET_STD[:C]
    return case


def run_reference(case, dtype=None):
    """The eager pipeline on `case`, in `dtype` (float copies; uint8 x stays uint8)."""
    args = {k: v.detach().to(dtype).requires_grad_(v.requires_grad)
            if isinstance(v, torch.Tensor) and v.is_floating_point() and dtype else v for k, v in case.items()}
    out = reference.patch_embed(args["x"], args["weight"], args.get("bias"), args.get("cls_token"),
                                args.get("pos_embed"), args.get("mean"), args.get("std"))
    return out, args


def grads_of(out, args, grad_out):
    names = [k for k, v in args.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    return dict(zip(names, torch.autograd.grad(out, [args[k] for k in names], grad_out.to(out.dtype))))


def case_floors(case, grad_out=None):
    """opnumerics.rounding_floors of the pipeline on `case`: (output floor, {input name: grad floor})."""
    names = [k for k, v in case.items() if isinstance(v, torch.Tensor)]
    rest = {k: v for k, v in case.items() if k not in names}

    def pipeline(*tensors):
        args = dict(zip(names, tensors), **rest)
        return reference.patch_embed(args["x"], args["weight"], args.get("bias"), args.get("cls_token"),
                                     args.get("pos_embed"), args.get("mean"), args.get("std"))
    (floor,), grad_floors = rounding_floors(pipeline, [case[k] for k in names],
                                            [grad_out] if grad_out is not None else [])
    return floor, dict(zip(names, grad_floors))


def check_case(name, case, bound, backward=False):
    out = VF.patch_embed(**case)
    torch_out, torch_args = run_reference(case)
    ref, ref_args = run_reference(case, torch.float64)
    assert out.shape == ref.shape and out.dtype == case["weight"].dtype
    grad_out = torch.randn_like(ref) if backward else None
    floor, grad_floors = case_floors(case, grad_out)
    check_close(name, out, torch_out, ref, bound, floor=floor)
    if backward:
        ours, theirs, exact = (grads_of(o, a, grad_out) for o, a in
                               ((out, case), (torch_out, torch_args), (ref, ref_args)))
        assert set(ours) == set(exact) and ours
        for k in exact:
            assert ours[k].shape == case[k].shape and ours[k].dtype == case[k].dtype
            check_close(f"{name} d{k}", ours[k], theirs[k], exact[k], bound, factor=3.0, floor=grad_floors[k])


# ----------------------------------------------------------------------------- CPU: the C++ path

SHAPES = [  # B, C, H, W, p, E, x layout
    (2, 3, 32, 32, 16, 64, "contiguous"),
    (2, 3, 32, 48, 16, 64, "channels_last"),
    (3, 3, 28, 35, 7, 100, "contiguous"),
    (2, 1, 28, 42, 14, 48, "channels_last"),
    (2, 3, 64, 32, 32, 64, "sliced"),
    (1, 3, 42, 28, 14, 100, "transposed"),
    (2, 1, 16, 16, 16, 32, "contiguous"),  # a single patch
    # H, W not multiples of p: the remainder dropped, as Conv2d(stride = p) (timm's so400m/14 at 384 px)
    (2, 3, 34, 47, 14, 40, "contiguous"),
    (2, 3, 33, 30, 16, 24, "channels_last"),
    (1, 2, 31, 17, 16, 16, "sliced"),
]
EXTRAS = [  # bias, cls, pos
    (True, True, True),
    (False, False, False),
    (True, False, True),
    (False, True, False),
]


@pytest.mark.parametrize("uint8", [False, True], ids=["float", "uint8"])
@pytest.mark.parametrize("bias,cls,pos", EXTRAS, ids=lambda v: str(int(v)))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_and_grads_fp32(shape, bias, cls, pos, uint8):
    B, C, H, W, p, E, layout = shape
    case = make_case(B, C, H, W, p, E, torch.float32, layout=layout, uint8=uint8, bias=bias, cls=cls, pos=pos,
                     requires_grad=True)
    check_case(f"{shape} uint8={uint8}", case, DTYPE_BOUND[torch.float32], backward=True)


@pytest.mark.parametrize("uint8", [False, True], ids=["float", "uint8"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[2], SHAPES[3]], ids=str)
def test_forward_and_grads_dtypes(shape, dtype, uint8):
    B, C, H, W, p, E, layout = shape
    case = make_case(B, C, H, W, p, E, dtype, layout=layout, uint8=uint8, requires_grad=True)
    check_case(f"{shape} {dtype} uint8={uint8}", case, DTYPE_BOUND[dtype], backward=True)


def test_mean_and_std_as_tensors_of_any_shape():
    case = make_case(2, 3, 32, 32, 16, 64, torch.float32, uint8=True)
    case["mean"] = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    case["std"] = torch.tensor(IMAGENET_STD, dtype=torch.float64)
    check_case("tensor mean/std", case, DTYPE_BOUND[torch.float32])


def test_float_x_ignores_mean_and_std():
    """As in the reference: floating-point images count as normalized already."""
    case = make_case(2, 3, 32, 48, 16, 64, torch.float32)
    plain = VF.patch_embed(**case)
    torch.testing.assert_close(VF.patch_embed(**case, mean=IMAGENET_MEAN, std=IMAGENET_STD), plain, rtol=0, atol=0)
    x, w = case["x"], case["weight"]
    direct = torch.ops.vit_fast.patch_embed_fwd(x, w, case["bias"], case["cls_token"], case["pos_embed"],
                                            torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD))
    torch.testing.assert_close(direct, plain, rtol=0, atol=0)


@pytest.mark.parametrize("uint8", [False, True], ids=["float", "uint8"])
def test_autocast_runs_in_the_autocast_dtype(uint8):
    """As F.conv2d: float32 weights (and float x) cast to the autocast dtype, gradients back in float32."""
    case = make_case(2, 3, 32, 48, 16, 64, torch.float32, uint8=uint8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = VF.patch_embed(**case)
    assert out.dtype == torch.bfloat16
    cast = {k: v.detach().bfloat16() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in case.items()}
    torch.testing.assert_close(out, VF.patch_embed(**cast), rtol=0, atol=0)
    out.sum().backward()
    for k in ("weight", "bias", "cls_token", "pos_embed") + (() if uint8 else ("x",)):
        assert case[k].grad.dtype == torch.float32 and case[k].grad.abs().sum() > 0, k


def test_only_some_gradients():
    """Frozen weight, x without grad: just the gradients asked for come back."""
    case = make_case(2, 3, 32, 48, 16, 64, torch.float32, requires_grad=True)
    case["x"].requires_grad_(False)
    case["weight"].requires_grad_(False)
    case["bias"].requires_grad_(False)
    out = VF.patch_embed(**case)
    out.sum().backward()
    assert case["cls_token"].grad.eq(2.0).all() and case["pos_embed"].grad.eq(2.0).all()


PE_PATHS = ["extension", "torch-forced"]


@pytest.mark.parametrize("uint8", [False, True], ids=["float", "uint8"])
@pytest.mark.parametrize("path", PE_PATHS)
def test_empty_batch_on_every_path(monkeypatch, path, uint8):
    """B = 0: an empty [0, T, E] in the weight's dtype and zero gradients, on the C++ path and the
    PyTorch pipeline (VIT_FAST_FORCE_TORCH=1)."""
    if path == "torch-forced":
        monkeypatch.setenv(dispatch.FORCE_TORCH_ENV, "1")
    case = make_case(0, 3, 32, 48, 16, 64, torch.float32, uint8=uint8, requires_grad=True)
    before = dispatch.kernel_launches.copy()
    out = VF.patch_embed(**case)
    assert out.shape == (0, 7, 64) and out.dtype == torch.float32
    out.sum().backward()
    for k in ("weight", "bias", "cls_token", "pos_embed") + (() if uint8 else ("x",)):
        assert case[k].grad.shape == case[k].shape and not case[k].grad.any(), k
    launched = dispatch.kernel_launches["patch_embed_fwd"] - before["patch_embed_fwd"]
    assert launched == (1 if path == "extension" else 0)


PARAM_VIEWS = {  # name -> (leaf from the case's tensor, the view the op gets)
    "weight transposed": ("weight", lambda t: t.transpose(2, 3).contiguous(), lambda t: t.transpose(2, 3)),
    "weight strided": ("weight", lambda t: torch.stack([t, t], -1).flatten(-2), lambda t: t[..., ::2]),
    "bias strided": ("bias", lambda t: torch.stack([t, t], -1).flatten(), lambda t: t[::2]),
    "bias expanded": ("bias", lambda t: t[:1], lambda t: t.expand(64)),
    "cls expanded": ("cls_token", lambda t: t[..., :1], lambda t: t.expand(1, 1, 64)),
    "pos strided": ("pos_embed", lambda t: torch.stack([t, t], -1).flatten(-2), lambda t: t[..., ::2]),
    "pos expanded": ("pos_embed", lambda t: t[:, :1], lambda t: t.expand(1, 7, 64)),
}


@pytest.mark.parametrize("view", list(PARAM_VIEWS))
@pytest.mark.parametrize("path", PE_PATHS)
def test_parameter_views_forward_and_backward(monkeypatch, path, view):
    """weight / bias / cls_token / pos_embed as strided, transposed or expanded views of leaves,
    mean / std as strided views: the numbers of the pipeline on the same views, and the gradients
    land in the leaves (against float64)."""
    if path == "torch-forced":
        monkeypatch.setenv(dispatch.FORCE_TORCH_ENV, "1")
    key, make_leaf, make_view = PARAM_VIEWS[view]
    case = make_case(2, 3, 32, 48, 16, 64, torch.float32, uint8=True)
    leaf = make_leaf(case[key]).detach()
    case["mean"] = torch.tensor([IMAGENET_MEAN, (9.0,) * 3]).t().flatten()[::2]  # stride 2
    case["std"] = torch.tensor(IMAGENET_STD[:1]).expand(3)  # stride 0
    names = [k for k in ("weight", "bias", "cls_token", "pos_embed") if k != key]
    rest = {k: case[k] for k in ("x", "mean", "std")}

    def call(fn, leaf, *others):
        args = dict(zip(names, others), **{key: make_view(leaf)})
        return fn(rest["x"], args["weight"], args["bias"], cls_token=args["cls_token"], pos_embed=args["pos_embed"],
                  mean=rest["mean"], std=rest["std"])

    def pipeline(fn_name):
        fn = VF.patch_embed if fn_name == "ours" else (lambda x, w, b, cls_token, pos_embed, mean, std: reference.patch_embed(
            x, w, b, cls_token, pos_embed, mean.to(w.dtype), std.to(w.dtype)))
        return lambda *ts: call(fn, *ts)

    from opnumerics import compare_to_float64
    compare_to_float64([f"{view} out", f"d{key} leaf", *(f"d{k}" for k in names)], pipeline("ours"),
                       pipeline("torch"), pipeline("torch"), [leaf, *(case[k] for k in names)],
                       [torch.randn(2, 7, 64) + 1.0])  # + 1: the expanded leaves' sums do not cancel


@pytest.mark.parametrize("uint8", [False, True], ids=["float", "uint8"])
@pytest.mark.parametrize("path", PE_PATHS)
def test_float64_gradcheck(monkeypatch, path, uint8):
    """float64 on both CPU paths (the C++ op takes it; so does the pipeline): gradcheck of every input."""
    if path == "torch-forced":
        monkeypatch.setenv(dispatch.FORCE_TORCH_ENV, "1")
    case = make_case(2, 2, 8, 12, 4, 5, torch.float64, uint8=uint8)
    x = case.pop("x")
    norm = {k: case.pop(k) for k in ("mean", "std") if k in case}
    keys = list(case)
    if uint8:
        float64_gradcheck(lambda *ts: VF.patch_embed(x, *ts[:2], cls_token=ts[2], pos_embed=ts[3], **norm),
                          [case[k] for k in keys])
    else:
        float64_gradcheck(lambda x, *ts: VF.patch_embed(x, *ts[:2], cls_token=ts[2], pos_embed=ts[3]),
                          [x, *(case[k] for k in keys)])


def test_poisoning_is_active():
    """The premise of the NaN checks above: torch.empty / at::empty return NaN in these tests."""
    assert torch.empty(8).isnan().all()


def test_cpu_runs_the_extension():
    """The C++ op ran (profiled by name: one GEMM, no convolution) and the launch counter saw it."""
    case = make_case(2, 3, 32, 32, 16, 64, torch.float32, requires_grad=True)
    before = dict(dispatch.kernel_launches)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        VF.patch_embed(**case).sum().backward()
    names = {event.name for event in prof.events()}
    assert {"vit_fast::patch_embed_fwd", "vit_fast::patch_embed_bwd", "aten::addmm"} <= names
    assert not any("conv" in name for name in names)
    for op in ("patch_embed_fwd", "patch_embed_bwd"):
        assert dispatch.kernel_launches[op] == before.get(op, 0) + 1


@contextlib.contextmanager
def _refusing_the_oracle(monkeypatch):
    """vit_fast.reference.patch_embed made to fail inside the block: the library's PyTorch pipeline
    (vit_fast.ops.patch_embed.torch_patch_embed) must be its own, not the oracle it is checked against."""
    def refuse(*args, **kwargs):
        raise AssertionError("the library's patch_embed called vit_fast.reference.patch_embed")

    with monkeypatch.context() as patched:
        patched.setattr(reference, "patch_embed", refuse)
        yield


def test_force_torch_runs_the_pipeline(monkeypatch):
    """VIT_FAST_FORCE_TORCH=1: the library's own pipeline (no vit_fast:: op, no launch), whose tokens
    and gradients match the oracle's."""
    monkeypatch.setenv(dispatch.FORCE_TORCH_ENV, "1")
    case = make_case(2, 3, 32, 32, 16, 64, torch.float32, requires_grad=True)
    before = dispatch.kernel_launches["patch_embed_fwd"]
    with _refusing_the_oracle(monkeypatch):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            out = VF.patch_embed(**case)
    assert not any(event.name.startswith("vit_fast::") for event in prof.events())
    assert dispatch.kernel_launches["patch_embed_fwd"] == before
    expected, args = run_reference(case)
    torch.testing.assert_close(out, expected)
    g = torch.randn_like(out)
    for (name, got), want in zip(grads_of(out, case, g).items(), grads_of(expected, args, g).values()):
        torch.testing.assert_close(got, want, msg=name)


def test_missing_extension_warns_once_and_runs_the_pipeline(monkeypatch):
    monkeypatch.setattr(patch_embed_op, "HAS_EXTENSION", False)
    monkeypatch.setattr(patch_embed_op, "EXTENSION_ERROR", ImportError("simulated"))
    monkeypatch.setattr(patch_embed_op, "_warned_missing_extension", False)
    case = make_case(2, 3, 32, 32, 16, 64, torch.float32, uint8=True)
    before = dispatch.kernel_launches["patch_embed_fwd"]
    with _refusing_the_oracle(monkeypatch):
        with pytest.warns(RuntimeWarning, match="vit_fast._C is not available .simulated.; patch_embed runs the PyTorch") \
                as caught:
            out = VF.patch_embed(**case)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            VF.patch_embed(**case)
    message = str(caught[0].message)
    assert "build_ext" not in message, message  # how the extension is obtained now: installs, else first use
    assert "python setup.py develop" in message and "--no-build-isolation" in message, message
    assert "compiled on first use" in message, message
    assert dispatch.kernel_launches["patch_embed_fwd"] == before
    torch.testing.assert_close(out, run_reference(case)[0])


def test_extension_is_built_and_shares_the_namespace():
    """vit_fast._C is importable, and its TORCH_LIBRARY coexists with Python custom ops in vit_fast."""
    import vit_fast._C  # noqa: F401

    assert patch_embed_op.HAS_EXTENSION, patch_embed_op.EXTENSION_ERROR

    @torch.library.custom_op("vit_fast::test_patch_embed_namespace_probe", mutates_args=())
    def probe(x: torch.Tensor) -> torch.Tensor:
        return x + 1

    case = make_case(1, 3, 16, 16, 16, 8, torch.float32, bias=False, cls=False, pos=False)
    assert torch.ops.vit_fast.test_patch_embed_namespace_probe(torch.zeros(2)).eq(1).all()
    assert torch.ops.vit_fast.patch_embed_fwd(case["x"], case["weight"]).shape == (1, 1, 8)


@pytest.mark.parametrize("uint8", [False, True], ids=["float", "uint8"])
def test_opcheck(uint8):
    case = make_case(2, 3, 32, 48, 16, 24, torch.float32, layout="channels_last", uint8=uint8, requires_grad=True)
    x, w, b, cls, pos = (case[k] for k in ("x", "weight", "bias", "cls_token", "pos_embed"))
    mean, std = (torch.tensor(case[k]) if uint8 else None for k in ("mean", "std"))
    torch.library.opcheck(torch.ops.vit_fast.patch_embed_fwd.default, (x, w, b, cls, pos, mean, std))
    defaults = (None, None, None, mean, std) if uint8 else ()  # the schema's defaults: no bias, cls or pos
    torch.library.opcheck(torch.ops.vit_fast.patch_embed_fwd.default, (x.detach(), w.detach(), *defaults))
    grad_out = torch.randn(2, 7, 24)
    mask = [not uint8, True, True, True, True]
    torch.library.opcheck(torch.ops.vit_fast.patch_embed_bwd.default,
                          (grad_out, x.detach(), w.detach(), mean, std, mask))


@pytest.mark.slow
def test_compile_fullgraph_cpu():
    case = make_case(2, 3, 32, 48, 16, 64, torch.float32, layout="channels_last", uint8=True, requires_grad=True)
    compiled = torch.compile(VF.patch_embed, fullgraph=True)
    out = compiled(**case)
    grads = torch.autograd.grad(out.square().sum(), [case["weight"], case["pos_embed"]])
    eager = VF.patch_embed(**case)
    eager_grads = torch.autograd.grad(eager.square().sum(), [case["weight"], case["pos_embed"]])
    torch.testing.assert_close(out, eager)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)


# ----------------------------------------------------------------------------- bad inputs

def _bad(**changes):
    """A valid uint8 case (C=3, 32x48, p=16, E=64, cls, pos) with `changes` applied."""
    case = make_case(2, 3, 32, 48, 16, 64, torch.float32, uint8=True)
    case.update(changes)
    return case


BAD_INPUTS = [
    ("x rank 3", _bad(x=torch.zeros(3, 32, 48, dtype=torch.uint8)), ValueError, r"x of rank 4 \[B, C, H, W\]"),
    ("weight rank 2", _bad(weight=torch.randn(64, 768)), ValueError, r"weight \[E, C, p, p\].*square kernel"),
    ("weight not square", _bad(weight=torch.randn(64, 3, 16, 8)), ValueError, r"square kernel\), got shape \[64, 3, 16, 8\]"),
    ("weight int", _bad(weight=torch.zeros(64, 3, 16, 16, dtype=torch.int32)), ValueError,
     "weight of dtype float32, float16, bfloat16 or float64, got Int"),
    ("x int32", _bad(x=torch.zeros(2, 3, 32, 48, dtype=torch.int32)), ValueError,
     "x of dtype float32, float16, bfloat16, float64 or uint8, got Int"),
    ("x float64, weight float32", _bad(x=torch.randn(2, 3, 32, 48, dtype=torch.float64)), ValueError,
     "floating-point x of the weight's dtype Float, got Double"),
    ("channels", _bad(x=torch.zeros(2, 1, 32, 48, dtype=torch.uint8)), ValueError,
     r"x has 1 channels but weight \[E, C, p, p\] = \[64, 3, 16, 16\] expects 3"),
    ("H below p", _bad(x=torch.zeros(2, 3, 15, 48, dtype=torch.uint8)), ValueError,
     "H and W of at least the patch size 16, got H = 15, W = 48"),
    ("W below p", _bad(x=torch.zeros(2, 3, 32, 9, dtype=torch.uint8)), ValueError,
     "at least the patch size 16, got H = 32, W = 9"),
    ("empty image", _bad(x=torch.zeros(2, 3, 0, 48, dtype=torch.uint8)), ValueError, "at least the patch size"),
    ("uint8 without mean", _bad(mean=None), ValueError, r"uint8 x needs mean and std, one value per channel \(3\).*mean is missing"),
    ("uint8 without std", _bad(std=None), ValueError, "uint8 x needs mean and std.*std is missing"),
    ("mean of 2 values", _bad(mean=(0.5, 0.5)), ValueError, r"mean with one value per channel \(3\), got shape \[2\]"),
    ("std of 4 values", _bad(std=torch.ones(4)), ValueError, r"std with one value per channel \(3\), got shape \[4\]"),
    ("mean integer tensor", _bad(mean=torch.ones(3, dtype=torch.int64)), ValueError, "mean of a floating dtype"),
    ("mean not numbers", _bad(mean=("a", "b", "c")), TypeError, "mean: expected a sequence of numbers or a tensor"),
    ("bias shape", _bad(bias=torch.zeros(63)), ValueError, r"bias of shape \[64\], got \[63\]"),
    ("bias dtype", _bad(bias=torch.zeros(64, dtype=torch.float64)), ValueError, "bias of the weight's dtype Float, got Double"),
    ("cls shape", _bad(cls_token=torch.zeros(1, 64)), ValueError, r"cls_token of shape \[1, 1, 64\], got \[1, 64\]"),
    ("cls dtype", _bad(cls_token=torch.zeros(1, 1, 64, dtype=torch.float16)), ValueError, "cls_token of the weight's dtype"),
    ("pos without the cls row", _bad(pos_embed=torch.zeros(1, 6, 64)), ValueError,
     r"pos_embed of shape \[1, 7, 64\] \(6 patches \+ the class token\), got \[1, 6, 64\]"),
    ("pos with a cls row but no cls", _bad(cls_token=None, pos_embed=torch.zeros(1, 7, 64)), ValueError,
     r"pos_embed of shape \[1, 6, 64\] \(6 patches, no class token\), got \[1, 7, 64\]"),
    ("pos dtype", _bad(pos_embed=torch.zeros(1, 7, 64, dtype=torch.bfloat16)), ValueError, "pos_embed of the weight's dtype"),
    ("x not a tensor", _bad(x=[[1.0]]), TypeError, "x: expected a torch.Tensor, got list"),
    ("weight not a tensor", _bad(weight=None), TypeError, "weight: expected a torch.Tensor, got NoneType"),
]


@pytest.mark.parametrize("case,error,match", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_raise_clear_errors(case, error, match):
    with pytest.raises(error, match=match):
        VF.patch_embed(**case)


def test_bad_backward_inputs_raise_clear_errors():
    x, w = torch.randn(2, 3, 32, 48), torch.randn(64, 3, 16, 16)
    with pytest.raises(ValueError, match=r"grad_out of shape \[2, 6 or 7, 64\], got \[2, 8, 64\]"):
        torch.ops.vit_fast.patch_embed_bwd(torch.zeros(2, 8, 64), x, w, None, None, [True] * 5)
    with pytest.raises(ValueError, match="grad_out of the weight's dtype Float, got Double"):
        torch.ops.vit_fast.patch_embed_bwd(torch.zeros(2, 6, 64, dtype=torch.float64), x, w, None, None,
                                                [True] * 5)
    with pytest.raises(ValueError, match="a cls_token gradient needs grad_out with the class row"):
        torch.ops.vit_fast.patch_embed_bwd(torch.zeros(2, 6, 64), x, w, None, None, [False] * 3 + [True, False])


@pytest.mark.parametrize("path", ["extension", "torch"])
def test_remainder_dropped_as_conv2d_on_both_paths(monkeypatch, path):
    """H, W not multiples of p: the same tokens and gradients as F.conv2d(stride = p), which drops the
    last H % p rows and W % p columns (their gradient is zero), on the C++ op and the PyTorch path."""
    if path == "torch":
        monkeypatch.setenv(dispatch.FORCE_TORCH_ENV, "1")
    before = dispatch.kernel_launches["patch_embed_fwd"]
    x = torch.randn(2, 3, 384 // 8 + 2, 39, dtype=torch.float64, requires_grad=True)  # 50 x 39, p = 14: 3 x 2
    w = torch.randn(16, 3, 14, 14, dtype=torch.float64, requires_grad=True)
    b = torch.randn(16, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(1, 6, 16, dtype=torch.float64, requires_grad=True)
    out = VF.patch_embed(x, w, b, pos_embed=pos)
    expected = F.conv2d(x, w, b, stride=14).flatten(2).transpose(1, 2) + pos
    assert out.shape == (2, 6, 16)
    torch.testing.assert_close(out, expected)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, w, b, pos), g)
    for got, want in zip(grads, torch.autograd.grad(expected, (x, w, b, pos), g)):
        torch.testing.assert_close(got, want)
    assert grads[0][:, :, 42:].abs().max() == 0 and grads[0][:, :, :, 28:].abs().max() == 0
    assert dispatch.kernel_launches["patch_embed_fwd"] - before == (1 if path == "extension" else 0)


def test_module_strict_size_drops_the_remainder_as_timm():
    """timm's PatchEmbed: img_size 384, p 14, strict_img_size -> 27 x 27 patches (the conv drops 6 pixels);
    strict_img_size=False without dynamic_img_pad asserts divisibility; dynamic_img_pad pads."""
    module = PatchEmbed(img_size=384, patch_size=14, embed_dim=8).double()
    assert module.grid_size == (27, 27) and module.num_patches == 729
    x = torch.randn(1, 3, 384, 384, dtype=torch.float64)
    torch.testing.assert_close(module(x), module.proj(x).flatten(2).transpose(1, 2))
    loose = PatchEmbed(img_size=384, patch_size=14, embed_dim=8, strict_img_size=False)
    with pytest.raises(ValueError, match="divisible by the patch size 14"):
        loose(x.float())


# ----------------------------------------------------------------------------- nn.PatchEmbed

def test_module_matches_timm_layout_and_reference():
    module = PatchEmbed(img_size=(32, 48), patch_size=16, in_chans=3, embed_dim=64)
    assert (module.img_size, module.patch_size, module.grid_size, module.num_patches) == ((32, 48), (16, 16), (2, 3), 6)
    ref = reference.PatchEmbed(img_size=224, patch_size=16, in_chans=3, embed_dim=64)
    shapes = {k: v.shape for k, v in module.state_dict().items()}
    assert shapes == {k: v.shape for k, v in ref.state_dict().items()} == {
        "proj.weight": (64, 3, 16, 16), "proj.bias": (64,)}
    module.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 48)
    ref_out = ref.double()(x.double())
    out = module(x)
    assert_close_to_ref("PatchEmbed", out, ref.float()(x), ref_out, DTYPE_BOUND[torch.float32])


def test_module_uint8_with_mean_and_std():
    module = PatchEmbed(img_size=32, patch_size=16, embed_dim=64, bias=False)
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    expected = reference.patch_embed(x, module.proj.weight.double(), None, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    out = module(x, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    assert_close_to_ref("PatchEmbed uint8", out, reference.patch_embed(x, module.proj.weight, None, mean=IMAGENET_MEAN,
                        std=IMAGENET_STD), expected, DTYPE_BOUND[torch.float32])


@pytest.mark.parametrize("uint8", [False, True], ids=["float", "uint8"])
def test_module_dynamic_img_pad(uint8):
    """timm pads the (normalized) image with zeros on the bottom and right up to a multiple of p."""
    module = PatchEmbed(img_size=None, patch_size=16, embed_dim=32, dynamic_img_pad=True).double()
    x = torch.randint(0, 256, (2, 3, 30, 40), dtype=torch.uint8) if uint8 else torch.randn(2, 3, 30, 40).double()
    norm = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD) if uint8 else {}
    out = module(x, **norm)
    x_float = patch_embed_op.normalize_uint8(x, IMAGENET_MEAN, IMAGENET_STD, torch.float64) if uint8 else x
    expected = module.proj(F.pad(x_float, (0, 8, 0, 2))).flatten(2).transpose(1, 2)
    assert out.shape == (2, 6, 32)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("fmt", ["NCHW", "NHWC", "NCL", "NLC"])
def test_module_output_formats(fmt):
    module = PatchEmbed(img_size=(32, 48), patch_size=16, embed_dim=8, output_fmt=fmt).double()
    x = torch.randn(2, 3, 32, 48, dtype=torch.float64)
    grid = module.proj(x)  # [B, E, 2, 3]
    expected = {"NCHW": grid, "NHWC": grid.permute(0, 2, 3, 1), "NCL": grid.flatten(2),
                "NLC": grid.flatten(2).transpose(1, 2)}[fmt]
    torch.testing.assert_close(module(x), expected)


def test_module_norm_layer_and_flatten_false():
    module = PatchEmbed(img_size=32, patch_size=16, embed_dim=8, norm_layer=nn.LayerNorm).double()
    assert set(module.state_dict()) == {"proj.weight", "proj.bias", "norm.weight", "norm.bias"}
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(module(x), module.norm(module.proj(x).flatten(2).transpose(1, 2)))
    grid = PatchEmbed(img_size=32, patch_size=16, embed_dim=8, flatten=False).double()
    grid.load_state_dict({k: v for k, v in module.state_dict().items() if k.startswith("proj")})
    torch.testing.assert_close(grid(x), module.proj(x))


def test_module_bad_inputs():
    with pytest.raises(ValueError, match=r"patch_size: expected a square patch, got \(16, 8\)"):
        PatchEmbed(patch_size=(16, 8))
    with pytest.raises(ValueError, match="output_fmt: expected one of"):
        PatchEmbed(output_fmt="NHCW")
    with pytest.raises(ValueError, match=r"x: expected images of size \(32, 32\), got \(32, 48\)"):
        PatchEmbed(img_size=32, patch_size=16, embed_dim=8)(torch.randn(1, 3, 32, 48))
    with pytest.raises(ValueError, match=r"x: expected H and W divisible by the patch size 16, got \(32, 40\)"):
        PatchEmbed(img_size=32, patch_size=16, embed_dim=8, strict_img_size=False)(torch.randn(1, 3, 32, 40))


# ----------------------------------------------------------------------------- GPU: the CUDA path

GPU_SHAPES = [  # B, C, H, W, p, E, layout; E = 100 takes narrower epilogue vectors than 768 / 1280 / 192
    (8, 3, 224, 224, 16, 768, "channels_last"),
    (4, 3, 224, 224, 14, 1280, "contiguous"),
    (3, 3, 28, 35, 7, 100, "sliced"),
    (2, 1, 64, 96, 32, 192, "transposed"),
    (2, 3, 384, 384, 14, 1152, "contiguous"),  # SigLIP so400m/14: 27 x 27 patches, 6 pixels dropped
]
GPU_DTYPES = [  # weight dtype, uint8 x
    (torch.float32, False), (torch.float16, False), (torch.bfloat16, False),
    (torch.bfloat16, True), (torch.float32, True), (torch.float64, False),
]


def _gpu_bound(dtype):
    return DTYPE_BOUND["tf32"] if dtype == torch.float32 else DTYPE_BOUND[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,uint8", GPU_DTYPES, ids=lambda v: str(v))
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_gpu_forward_and_grads(shape, dtype, uint8):
    B, C, H, W, p, E, layout = shape
    case = make_case(B, C, H, W, p, E, dtype, layout=layout, uint8=uint8, device="cuda", requires_grad=True)
    check_case(f"cuda {shape} {dtype} uint8={uint8}", case, _gpu_bound(dtype), backward=True)


@pytest.mark.gpu
@pytest.mark.parametrize("bias,cls,pos", EXTRAS, ids=lambda v: str(int(v)))
def test_gpu_extras_and_misaligned_pos(bias, cls, pos):
    case = make_case(4, 3, 64, 48, 16, 200, torch.bfloat16, uint8=True, bias=bias, cls=cls, pos=pos, device="cuda",
                     requires_grad=True)
    if pos:  # contiguous but 2 bytes off a 16-byte boundary: the epilogue falls back to narrower vectors
        flat = torch.randn(1 + case["pos_embed"].numel(), dtype=torch.bfloat16, device="cuda")
        case["pos_embed"] = flat[1:].view_as(case["pos_embed"]).requires_grad_()
    check_case(f"cuda extras {bias, cls, pos}", case, DTYPE_BOUND[torch.bfloat16], backward=True)


@pytest.mark.gpu
def test_gpu_runs_the_cuda_kernels():
    case = make_case(2, 3, 32, 48, 16, 64, torch.bfloat16, uint8=True, device="cuda")
    with torch.profiler.profile() as prof:
        VF.patch_embed(**case)
        torch.cuda.synchronize()
    kernels = {e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}
    assert any("gather_patches_kernel" in k for k in kernels), kernels
    assert any("add_pos_and_cls_kernel" in k for k in kernels), kernels
    assert not any("conv" in k.lower() for k in kernels), kernels


@pytest.mark.gpu
def test_gpu_large_tensors_use_int64_offsets():
    """x and the patch matrix both pass 2^31 elements; the last images land beyond that offset."""
    B = 14_300  # 14,300 * 3*224*224 > 2^31
    x = torch.randint(0, 256, (B, 3, 224, 224), dtype=torch.uint8, device="cuda")
    w = torch.randn(16, 3, 16, 16, dtype=torch.bfloat16, device="cuda") * 0.05
    pos = torch.randn(1, 197, 16, dtype=torch.bfloat16, device="cuda")
    cls = torch.randn(1, 1, 16, dtype=torch.bfloat16, device="cuda")
    out = VF.patch_embed(x, w, None, cls_token=cls, pos_embed=pos, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    tail = reference.patch_embed(x[-3:], w.double(), None, cls.double(), pos.double(), IMAGENET_MEAN, IMAGENET_STD)
    assert rel_err(out[-3:], tail) <= DTYPE_BOUND[torch.bfloat16]


@pytest.mark.gpu
def test_gpu_empty_batch():
    case = make_case(0, 3, 32, 48, 16, 64, torch.bfloat16, device="cuda", requires_grad=True)
    out = VF.patch_embed(**case)
    assert out.shape == (0, 7, 64)
    out.sum().backward()
    assert not case["weight"].grad.any()


@pytest.mark.gpu
def test_gpu_device_mismatch_raises():
    case = make_case(2, 3, 32, 48, 16, 64, torch.float32, device="cuda")
    case["pos_embed"] = case["pos_embed"].cpu()
    with pytest.raises(RuntimeError, match="expected pos_embed on x's device cuda:0, got cpu"):
        VF.patch_embed(**case)
    case = make_case(2, 3, 32, 48, 16, 64, torch.float32, uint8=True)
    case["x"] = case["x"].cuda()
    with pytest.raises(RuntimeError, match="expected weight on x's device cuda:0, got cpu"):
        VF.patch_embed(**case)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_gpu_second_device():
    case = make_case(2, 3, 64, 48, 16, 64, torch.bfloat16, uint8=True, device="cuda:1", requires_grad=True)
    out = VF.patch_embed(**case)
    assert out.device == torch.device("cuda:1")
    check_case("cuda:1", case, DTYPE_BOUND[torch.bfloat16], backward=True)


@pytest.mark.gpu
def test_gpu_opcheck():
    case = make_case(2, 3, 32, 48, 16, 24, torch.bfloat16, layout="channels_last", requires_grad=True, device="cuda")
    args = tuple(case[k] for k in ("x", "weight", "bias", "cls_token", "pos_embed"))
    torch.library.opcheck(torch.ops.vit_fast.patch_embed_fwd.default, (*args, None, None))
    grad_out = torch.randn(2, 7, 24, dtype=torch.bfloat16, device="cuda")
    torch.library.opcheck(torch.ops.vit_fast.patch_embed_bwd.default,
                          (grad_out, args[0].detach(), args[1].detach(), None, None, [True] * 5))


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
@pytest.mark.slow
def test_gpu_compile_fullgraph(mode):
    case = make_case(8, 3, 224, 224, 16, 768, torch.bfloat16, layout="channels_last", uint8=True, device="cuda",
                     requires_grad=True)
    case["mean"] = torch.tensor(IMAGENET_MEAN, device="cuda")  # device tensors: nothing to copy in a CUDA graph
    case["std"] = torch.tensor(IMAGENET_STD, device="cuda")
    compiled = torch.compile(VF.patch_embed, fullgraph=True, mode=mode)
    for _ in range(3):  # reduce-overhead records the graph on a later call
        out = compiled(**case)
    eager = VF.patch_embed(**case)
    torch.testing.assert_close(out, eager)
    grads = torch.autograd.grad(out.float().square().sum(), [case["weight"], case["cls_token"]])
    eager_grads = torch.autograd.grad(eager.float().square().sum(), [case["weight"], case["cls_token"]])
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)
