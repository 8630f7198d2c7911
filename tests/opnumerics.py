"""The op tests' one comparison harness: the op, torch in the same dtype, and float64 math.

Every output and input gradient of an op is held to two bounds against the float64 result:
- the dtype's bound (`numerics.DTYPE_BOUND`: fp32 1e-5, fp16 1e-2, bf16 2e-2), and
- no worse than `factor` x PyTorch's own same-dtype error (2x forward, 3x backward) + a floor.

The floor. Where torch's error is tiny (fp32), "k x torch's error" alone depends on the CPU's
kernels (BLAS blocking, vector widths): a kernel that is as exact as fp32 allows can sit at 4x a
lucky torch run. So the clause gets a floor that measures what fp32 rounding itself costs *this*
computation: the float64 reference run once more on copies of the inputs (and of the upstream
gradients) each multiplied by (1 + d), d uniform in [-u, u], u = 2^-24 (fp32's unit roundoff),
compared with the float64 reference on the exact inputs. That is the problem's sensitivity to
rounding its operands to fp32 once: ~0.6 u for a well-conditioned op, and larger where the
computation amplifies rounding (attention with logits ~100: a rounding of q moves exp(logit) by
~100 u). The kernels compute in fp32 for every input dtype, so the same floor (in fp32 units)
applies to fp16 / bf16, where it is far below torch's own error and changes nothing.
`FLOOR_FACTOR` (32) x that sensitivity allows for an fp32 algorithm rounding intermediates the
input perturbation does not touch. Measured on the kernels (fp32, interpreter): LayerNorm's row
mean (a tree sum over C = 2045, a small mean) is ~12x its sensitivity, attention's dV with
logits ~100 ~27x (the kernel rounds the exp2 argument, ~144, and recomputes P from the LSE, where
torch's softmax subtracts a max that cancels exactly); every other output is below ~5x. For
well-conditioned fp32 outputs the floor is ~1e-6 to 2e-6 relative, below the 1e-5 bound, so a
lost term still fails: `test_attention.py::test_comparison_still_catches_regressions` shows a
missing online-softmax rescale, an injected 1e-3 error, and an injected 5e-6 error (inside the
fp32 bound, > 2x torch's error + the floor) each failing.
"""
import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from numerics import DTYPE_BOUND, FLOOR_FACTOR, FP32_UNIT_ROUNDOFF, rel_err, torch_tf32
from vit_fast import dispatch


@pytest.fixture
def no_tf32():
    """torch's fp32 matmuls in full fp32 (no tf32), as the kernels' fp32 dots are, for a whole test,
    whatever an earlier test set (a module takes it with
    ``pytestmark = pytest.mark.usefixtures("no_tf32")`` after importing it)."""
    with torch_tf32(False):
        yield


def module_fn(module):
    """`module` as a function of (x, *parameters) (in named_parameters order), so its parameters
    are inputs like any other: their gradients are compared and the floor perturbs them too."""
    names = [n for n, _ in module.named_parameters()]

    def call(x, *params):
        return torch.func.functional_call(module, dict(zip(names, params)), (x,))
    return call


def _as_tuple(outs):
    return outs if isinstance(outs, tuple) else (outs,)


def run(fn, inputs, grads_out):
    """fn(*leaves) and the gradient of every input for output gradients `grads_out` (a None entry:
    that output is left out of the loss). Non-float inputs and None pass through, grads None."""
    leaves = [t.detach().clone().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
              for t in inputs]
    outs = _as_tuple(fn(*leaves))
    pairs = [(o, g.to(o.dtype)) for o, g in zip(outs, grads_out) if g is not None]
    if pairs:
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    grads = [t.grad if isinstance(t, torch.Tensor) and t.requires_grad else None for t in leaves]
    return tuple(o.detach() for o in outs), grads


def to_float64(t):
    return t.detach().double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def perturbed_float64(t, generator):
    """A float64 copy of `t` with each element rounded once more at fp32's unit roundoff
    (multiplied by 1 + d, d uniform in [-u, u]); non-float values pass through."""
    if not (isinstance(t, torch.Tensor) and t.is_floating_point()):
        return t
    d = (torch.rand(t.shape, generator=generator, dtype=torch.float64) * 2 - 1) * FP32_UNIT_ROUNDOFF
    return t.detach().double() * (1 + d.to(t.device))


def rounding_floors(ref_fn, inputs, grads_out=(), exact=None, seed=1234):
    """FLOOR_FACTOR x the rel err of ref_fn on fp32-perturbed float64 inputs vs on the exact ones
    (`exact`: that run's (outputs, grads) when the caller has it): (floors of the outputs, floors of
    the input gradients, None where there is none)."""
    generator = torch.Generator().manual_seed(seed)
    if exact is None:
        exact = run(ref_fn, [to_float64(t) for t in inputs], [to_float64(g) for g in grads_out])
    noisy = run(ref_fn, [perturbed_float64(t, generator) for t in inputs],
                [perturbed_float64(g, generator) for g in grads_out])
    out_floors = [FLOOR_FACTOR * rel_err(n, e) for n, e in zip(noisy[0], exact[0])]
    grad_floors = [FLOOR_FACTOR * rel_err(n, e) if e is not None else None for n, e in zip(noisy[1], exact[1])]
    return out_floors, grad_floors


def check_close(name, out, torch_out, ref, bound, factor=2.0, floor=0.0):
    """`out` within `bound` of float64 `ref`, and no worse than `factor` x torch's error + `floor`."""
    err, torch_err = rel_err(out, ref), rel_err(torch_out, ref)
    print(f"{name}: rel err {err:.2e} (torch same dtype {torch_err:.2e}, floor {floor:.2e})")
    assert err <= bound, f"{name}: rel err {err:.3e} > bound {bound:.1e}"
    assert err <= factor * torch_err + floor, (
        f"{name}: rel err {err:.3e} > {factor} x torch's {torch_err:.3e} + fp32 rounding floor {floor:.3e}")
    return err


def compare_to_float64(names, fn, torch_fn, ref_fn, inputs, grads_out, bound=None, fwd_factor=2.0, bwd_factor=3.0,
                       torch_inputs=None, exclude=(), ours=None):
    """Runs `fn` (vit_fast), `torch_fn` (PyTorch, same dtype) and `ref_fn` (float64 copies) on
    `inputs` with upstream gradients `grads_out`, and checks with `check_close` every output and
    every input gradient: `names` has one entry per output, then one per input (an input without
    a gradient, e.g. None, is skipped). `bound` defaults to DTYPE_BOUND of the first float input's dtype; names in
    `exclude` are not checked (the caller checks them its own way). `torch_inputs` (default:
    `inputs`) lets torch's run see other copies (e.g. a truncated rounding). Returns
    {name: (ours, torch's, float64 ref)}. `ours`: the op's (outputs, input grads) when the caller
    ran it already (then `fn` is not called)."""
    dtype = next(t.dtype for t in inputs if isinstance(t, torch.Tensor) and t.is_floating_point())
    bound = DTYPE_BOUND[dtype] if bound is None else bound
    outs, grads = run(fn, inputs, grads_out) if ours is None else ours
    with torch_tf32(False):  # torch in the kernels' fp32: exact dots
        t_outs, t_grads = run(torch_fn, inputs if torch_inputs is None else torch_inputs, grads_out)
    r_outs, r_grads = run(ref_fn, [to_float64(t) for t in inputs], [to_float64(g) for g in grads_out])
    out_floors, grad_floors = rounding_floors(ref_fn, inputs, grads_out, exact=(r_outs, r_grads))
    results = {}
    rows = [(o, t, r, f, fwd_factor) for o, t, r, f in zip(outs, t_outs, r_outs, out_floors)]
    rows += [(g, tg, rg, f, bwd_factor) for g, tg, rg, f in zip(grads, t_grads, r_grads, grad_floors)]
    assert len(names) == len(rows), (names, len(rows))
    for name, (o, t, r, floor, factor) in zip(names, rows):
        assert (o is None) == (r is None), name
        if o is None:  # an input without a gradient (None, or not a float tensor)
            continue
        assert o.shape == r.shape, (name, o.shape, r.shape)
        results[name] = (o, t, r)
        if name not in exclude:
            check_close(name, o, t, r, bound, factor, floor)
    return results


# ----------------------------------------------------------------------------- where an op runs


def require_kernel_path(device):
    """Skips the test where the ops on ``device`` take the PyTorch path (VIT_FAST_FORCE_TORCH=1, or a
    CPU without the interpreter)."""
    if not dispatch.use_kernels(torch.zeros(1, device=device)):
        pytest.skip("kernel path off (VIT_FAST_FORCE_TORCH=1 or no interpreter)")


def require_interpreter(device):
    """Skips the test unless the kernels run under Triton's interpreter (CPU tensors, TRITON_INTERPRET=1)."""
    if device != "cpu" or not dispatch.use_kernels(torch.zeros(1)):
        pytest.skip("the interpreter is not in use")

PATHS = ["kernel", "torch-forced", "torch-cpu"]


def select_path(path, monkeypatch, device):
    """Makes the ops take `path` for the rest of the test; returns the device to put inputs on.
    "kernel": the Triton kernels (the GPU, or the CPU under the interpreter); "torch-forced":
    VIT_FAST_FORCE_TORCH=1; "torch-cpu": a CPU tensor without the interpreter (TRITON_INTERPRET unset)."""
    from vit_fast import dispatch

    if path == "torch-forced":
        monkeypatch.setenv(dispatch.FORCE_TORCH_ENV, "1")
        return device
    if path == "torch-cpu":
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        return "cpu"
    assert path == "kernel", path
    return device


def float64_gradcheck(fn, inputs):
    """torch.autograd.gradcheck of fn on float64 leaves made from `inputs` (None and non-float pass)."""
    leaves = [t.detach().double().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
              for t in inputs]
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- the autograd Functions' two paths


class _CustomOpLog(TorchDispatchMode):
    """Counts the vit_fast custom ops that pass through the dispatcher (the launch functions do not)."""

    def __init__(self):
        super().__init__()
        self.called = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "vit_fast":
            self.called[func.name()] += 1
        return func(*args, **(kwargs or {}))


def check_op_paths(monkeypatch, fn, inputs, grads_out, ops, launches):
    """An op's autograd Function reaches its kernels two ways (vit_fast.ops docstring): through the
    launch functions in eager mode, through its fwd / bwd custom ops while torch.compile traces.
    Runs ``fn`` (a public function, or the Function's apply) both ways, the second with
    ``torch.compiler.is_compiling`` patched True, and checks: the eager run dispatches no vit_fast
    custom op and the other exactly ``ops`` (e.g. ["vit_fast::mlp_fwd", "vit_fast::mlp_bwd"]); each
    run launches each name in ``launches`` (``dispatch.kernel_launches``) once and nothing else; outputs and input
    gradients bit-identical (the same bodies run). Where the PyTorch path runs (VIT_FAST_FORCE_TORCH=1)
    neither run dispatches or launches anything."""
    if not dispatch.use_kernels(next(t for t in inputs if isinstance(t, torch.Tensor))):
        ops, launches = (), ()
    results = []
    for compiling in (False, True):
        log, before = _CustomOpLog(), dispatch.kernel_launches.copy()
        with monkeypatch.context() as patch, log:
            patch.setattr(torch.compiler, "is_compiling", lambda c=compiling: c)
            outs, grads = run(fn, inputs, grads_out)
        assert log.called == (collections.Counter(ops) if compiling else collections.Counter()), log.called
        launched = dispatch.kernel_launches - before
        assert launched == collections.Counter(launches), (launched, compiling)
        results.append([*outs, *(g for g in grads if g is not None)])
    eager, op_path = results
    assert len(eager) == len(op_path)
    for a, b in zip(eager, op_path):
        assert torch.equal(a, b)


def _recording_aot_eager(graphs):
    """aot_eager (AOT autograd, the graphs run as traced, no decompositions) that keeps the forward
    and backward graphs it is given in ``graphs``."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def keep(kind):
        def compiler(gm, example_inputs):
            graphs[kind].append(gm)
            return make_boxed_func(gm.forward)
        return compiler
    return aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward"))


def vit_fast_calls(graph_module):
    """The vit_fast ops a graph calls, as nodes."""
    return [n for n in graph_module.graph.nodes if n.op == "call_function" and str(n.target).startswith("vit_fast.")]


def check_compiled(fn, inputs, grads_out, fwd_ops=None, bwd_ops=None, launches=None, backend="aot_eager",
                   mode=None, calls=1, exact=True):
    """torch.compile(fn, fullgraph=True) against fn run eagerly (``run``: every output and input
    gradient). ``exact``: bit-identical (aot_eager runs the very ops eager mode runs), else
    torch.testing.assert_close's defaults. With backend "aot_eager" the graphs are kept and must call
    exactly the vit_fast ops ``fwd_ops`` (forward) and ``bwd_ops`` (backward), e.g.
    ["layer_norm_fwd"]: the op stays one opaque node, its launch code is not traced through. Each name
    in ``launches`` (default: fwd_ops + bwd_ops) counts one kernel launch per compiled call, and no
    launch happens while compiling (under mode "reduce-overhead", where replays of the CUDA graph
    launch nothing from Python: at least one call's). Returns the kept graphs."""
    eager = run(fn, inputs, grads_out)
    graphs = {"forward": [], "backward": []}
    compiled = torch.compile(fn, fullgraph=True, dynamic=False, mode=mode,
                             backend=_recording_aot_eager(graphs) if backend == "aot_eager" else backend)
    before = dispatch.kernel_launches.copy()
    for _ in range(calls):  # a second call replays a CUDA graph under reduce-overhead
        got = run(compiled, inputs, grads_out)
    if dispatch.use_kernels(next(t for t in inputs if isinstance(t, torch.Tensor))):
        expected = collections.Counter(launches if launches is not None else [*(fwd_ops or ()), *(bwd_ops or ())])
        for name, n in expected.items():
            count = dispatch.kernel_launches[name] - before[name]
            assert count == n * calls if mode in (None, "default") else count >= n, (name, count)
        if backend == "aot_eager":
            for kind, want in (("forward", fwd_ops or ()), ("backward", bwd_ops or ())):
                assert len(graphs[kind]) == 1, (kind, len(graphs[kind]))
                names = collections.Counter(str(n.target).split(".")[1] for n in vit_fast_calls(graphs[kind][0]))
                assert names == collections.Counter(want), (kind, names)
    for a, b in zip([*got[0], *got[1]], [*eager[0], *eager[1]]):
        assert (a is None) == (b is None)
        if a is None:
            continue
        if exact:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b)
    return graphs
