"""Fused Linear + bias + GELU and the whole MLP, bf16, at ViT-S/B/L/H shapes, against the peers.

    python benchmarks/mlp.py            # every shape, torch.compile default and max-autotune
    python benchmarks/mlp.py --quick    # ViT-B only, no max-autotune (fits a short GPU lease)
    python benchmarks/mlp.py --quick --max-autotune   # ViT-B only, with the max-autotune peer
    python benchmarks/mlp.py --sweep    # tile configs of both matmul kernels at M=50432, 768 -> 3072
    python benchmarks/mlp.py --fused-mlp   # only the fused-MLP rows (VF.mlp, both backends) at ViT-B b128/b256

Each shape's rows come in parts (the `part` column), each part's peers in the same run:
fc1 + GELU(erf), fwd and fwd+bwd: vit_fast, eager (cuBLAS F.linear + a separate F.gelu), forward
also cuBLAS F.linear alone (the GEMM's own speed) and torch.compile (default, and max-autotune
without --quick, ViT-B only); fc1 + GELU(tanh), fwd: vit_fast, eager, cuBLASLt's fused GELU(tanh)
epilogue (``torch._addmm_activation``); fc2 + residual, fwd: vit_fast, eager, cuBLAS addmm; the Mlp
module, fwd and fwd+bwd: vit_fast.nn.Mlp, a timm-style eager Mlp, its torch.compile (not --quick).
The fused-MLP part (every run, ViT-B b128 and b256) times ``VF.mlp`` fc2(GELU(fc1(x))) + residual,
fwd and fwd+bwd, on both of its backends (VIT_FAST_MLP_BACKEND=triton: the fused backward
epilogue; =torch: cuBLAS GEMMs + the elementwise GELU backward kernel) against the two-op path
(linear_gelu + linear(residual=)) and eager torch (F.linear, F.gelu, F.linear, + residual).
Forwards run under no_grad (inference). Every row: ``ms`` (median of do_bench, with min_ms and
max_ms), ``graph_ms`` (replayed from a CUDA graph: the kernels alone), peak_mib (memory one call
allocates), vs_eager (> 1: faster than the part's eager peer). TFLOP/s count 2*M*K*N per matmul (x3
for forward+backward), % of the device's measured bf16 matmul peak. The loop, timing, table and
files (benchmarks/results/<device>/mlp.json, mlp_fused.json with --fused-mlp, mlp_sweep.json;
stamped with the commit) are harness.run_benchmark's.
Without a GPU: says so, checks the kernels under Triton's interpreter, times the CPU paths (no
files written), exits 0.
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels on CPU tensors

import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from vit_fast import dispatch, reference  # noqa: E402
from vit_fast import functional as VF  # noqa: E402
from vit_fast.kernels import mlp as kernels  # noqa: E402
from vit_fast.nn import Mlp  # noqa: E402

# (name, M = batch * tokens, K = embed dim, N = MLP hidden dim): the shapes the goals are set at
SHAPES = [("ViT-S b256", 256 * 197, 384, 1536), ("ViT-B b256", 256 * 197, 768, 3072),
          ("ViT-L b128", 128 * 197, 1024, 4096), ("ViT-H/14 b128", 128 * 257, 1280, 5120)]
QUICK_SHAPES = [SHAPES[1]]
SWEEP_SHAPE, SWEEP_DTYPE = (256 * 197, 768, 3072), torch.bfloat16
# ViT-B's MLP (C 768 -> hidden 3072 -> 768) at the training batch sizes
FUSED_MLP_SHAPES = [("ViT-B b128", 128 * 197, 768, 3072), ("ViT-B b256", 256 * 197, 768, 3072)]


PARTS = {  # part -> number of M x K x N GEMMs in its forward (a backward counts twice that)
    "fc1 gelu(none)": 1, "fc1 gelu(tanh)": 1, "fc2+residual": 1, "Mlp": 2, "MLP+residual": 2}
# vs_eager's base in each part
EAGER = ("eager gelu(none)", "eager gelu(tanh)", "eager linear + add", "eager timm-style Mlp",
         "eager F.linear, F.gelu, F.linear, + r")
COLUMNS = ["shape", "part", "impl", "mode", "ms", "min_ms", "max_ms", "tflops", "pct_peak", "vs_eager", "graph_ms",
           "graph_vs_eager", "peak_mib", "error"]
TOKENS = (197, 257)  # tokens per image of the shapes' M, for the Mlp module's [B, N, C] input
OPTIONS = {"--quick": "ViT-B shape only, no max-autotune",
           "--max-autotune": "with --quick: keep the torch.compile max-autotune peer (always on without --quick)",
           "--sweep": "tile sweep of both kernels at M=50432, 768 -> 3072",
           "--fused-mlp": "only the fused-MLP rows (VF.mlp both backends, two-op path, eager) at ViT-B b128/b256"}
NOT_MEASURED = ("fused Linear+GELU / Mlp / fused-MLP GPU timings not measured; checking the kernels under Triton's "
                "interpreter instead")


class _mlp_backend_env:
    """VIT_FAST_MLP_BACKEND set to `backend` inside the block (None: left as it is), restored after."""

    def __init__(self, backend):
        self.backend, self.saved = backend, None

    def __enter__(self):
        from vit_fast.ops import mlp as ops_mlp

        self.name = ops_mlp.MLP_BACKEND_ENV
        self.saved = os.environ.get(self.name)
        if self.backend is not None:
            os.environ[self.name] = self.backend

    def __exit__(self, *exc):
        if self.saved is None:
            os.environ.pop(self.name, None)
        else:
            os.environ[self.name] = self.saved


def _setup(case):
    """bf16 leaves x [M, K], fc1 (w1, b1), fc2 (w2, b2), the residual r [M, K], fc2's input h [M, N]; for
    the Mlp part the two modules (same weights) and x as [B, tokens, K]."""
    M, K, N = case["dims"]
    dt, dev = torch.bfloat16, harness.DEVICE
    t = dict(x=torch.randn(M, K, device=dev, dtype=dt), w1=torch.randn(N, K, device=dev, dtype=dt) * K**-0.5,
             b1=torch.randn(N, device=dev, dtype=dt), w2=torch.randn(K, N, device=dev, dtype=dt) * N**-0.5,
             b2=torch.randn(K, device=dev, dtype=dt), r=torch.randn(M, K, device=dev, dtype=dt))
    for leaf in t.values():
        leaf.requires_grad_()
    t["h"] = torch.randn(M, N, device=dev, dtype=dt)
    if case["columns"]["part"] == "Mlp":
        ours, eager = Mlp(K, N).to(dev, dt), reference.Mlp(K, N).to(dev, dt)
        ours.load_state_dict(eager.state_dict())
        t.update(ours=ours, eager=eager)
        tokens = next(n for n in TOKENS if M % n == 0)
        t["x3"] = t["x"].detach().view(-1, tokens, K).requires_grad_()
    return t


def _fn_peer(fn, args, modes=("fwd",)):
    """make(tensors, mode) timing fn(*tensors[args]) in `modes`: the forward under no_grad (inference),
    fwd+bwd the gradients of every argument that is a leaf."""
    def make(t, mode):
        return harness.autograd_mode(mode, fn, [t[a] for a in args], no_grad_fwd=True) if mode in modes else None
    return make


def _module_peer(module_of):
    """make(tensors, mode) timing the module `module_of(tensors)` on x3; fwd+bwd: dx and every parameter's."""
    def make(t, mode):
        module, x = module_of(t), t["x3"]
        if mode == "fwd":
            def forward():
                with torch.no_grad():
                    return module(x)
            return forward
        dy = torch.randn_like(x)
        return lambda: torch.autograd.grad(module(x), [x, *module.parameters()], dy)
    return make


def _eager_fc1(x, w, b):
    return F.gelu(F.linear(x, w, b))


def _eager_mlp(x, w1, b1, w2, b2, r):
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2) + r


def _two_op_mlp(x, w1, b1, w2, b2, r):
    return VF.linear(VF.linear_gelu(x, w1, b1), w2, b2, residual=r)


def _peers(case, quick, max_autotune):
    """The part's peers (module docstring)."""
    part, fc1, both = case["columns"]["part"], ("x", "w1", "b1"), ("fwd", "fwd+bwd")
    if part == "fc1 gelu(none)":
        peers = {"vit_fast gelu(none)": _fn_peer(VF.linear_gelu, fc1, both),
                 "eager gelu(none)": _fn_peer(_eager_fc1, fc1, both),
                 "cuBLAS linear alone": _fn_peer(F.linear, fc1),
                 "torch.compile gelu(none)": _fn_peer(torch.compile(_eager_fc1), fc1)}
        if max_autotune and case["dims"][1] == 768:  # max-autotune compiles for minutes: the ViT-B shape only
            peers["torch.compile max-autotune gelu(none)"] = _fn_peer(
                torch.compile(_eager_fc1, mode="max-autotune-no-cudagraphs"), fc1)
        return peers
    if part == "fc1 gelu(tanh)":
        return {"vit_fast gelu(tanh)": _fn_peer(lambda x, w, b: VF.linear_gelu(x, w, b, "tanh"), fc1),
                "eager gelu(tanh)": _fn_peer(lambda x, w, b: F.gelu(F.linear(x, w, b), approximate="tanh"), fc1),
                "cuBLASLt gelu(tanh) epilogue": _fn_peer(
                    lambda x, w, b: torch._addmm_activation(b, x, w.t(), use_gelu=True), fc1)}
    if part == "fc2+residual":
        fc2 = ("h", "w2", "b2", "r")
        return {"vit_fast linear(residual)": _fn_peer(lambda h, w, b, r: VF.linear(h, w, b, residual=r), fc2),
                "eager linear + add": _fn_peer(lambda h, w, b, r: F.linear(h, w, b) + r, fc2),
                "cuBLAS addmm(residual) + bias": _fn_peer(lambda h, w, b, r: torch.addmm(r, h, w.t()).add_(b), fc2)}
    if part == "Mlp":
        peers = {"vit_fast.nn.Mlp": _module_peer(lambda t: t["ours"]),
                 "eager timm-style Mlp": _module_peer(lambda t: t["eager"])}
        if not quick:
            peers["torch.compile(eager Mlp)"] = _module_peer(lambda t: torch.compile(t["eager"]))
        return peers
    mlp = ("x", "w1", "b1", "w2", "b2", "r")
    return {"vit_fast mlp (triton: fused bwd epilogue)": harness.Peer(
                _fn_peer(VF.mlp, mlp, both), lambda: _mlp_backend_env("triton")),
            "vit_fast mlp (torch: cuBLAS + GELU-bwd kernel)": harness.Peer(
                _fn_peer(VF.mlp, mlp, both), lambda: _mlp_backend_env("torch")),
            "two-op linear_gelu + linear(residual)": _fn_peer(_two_op_mlp, mlp, both),
            "eager F.linear, F.gelu, F.linear, + r": _fn_peer(_eager_mlp, mlp, both)}


def _flops(case, mode):
    M, K, N = case["dims"]
    return PARTS[case["columns"]["part"]] * 2.0 * M * K * N * (3 if mode == "fwd+bwd" else 1)


def bench(shapes, fused_shapes, quick, max_autotune, op):
    """The parts at `shapes` and the fused MLP at `fused_shapes`: rows, table and `op`'s files."""
    cases = [{"shape": f"{name} {M}x{K}->{N}", "columns": {"part": part}, "dims": (M, K, N)}
             for name, M, K, N in shapes for part in PARTS if part != "MLP+residual"]
    cases += [{"shape": f"{name} {M}x{C}->{H}->{C}", "columns": {"part": "MLP+residual"}, "dims": (M, C, H)}
              for name, M, C, H in fused_shapes]
    return harness.run_benchmark(
        op, cases, lambda case: _peers(case, quick, max_autotune), ("fwd", "fwd+bwd"), setup=_setup, flops=_flops,
        measure=("peak_mib",), ratios={"vs_eager": lambda impl: impl in EAGER},
        after_case=lambda case: torch._dynamo.reset(), columns=COLUMNS, plot_key="tflops",
        label_keys=("shape", "part", "impl", "mode"),
        title="Linear + GELU, fc2 + residual, Mlp and the fused MLP, bf16 (vs_eager > 1: faster than eager; "
              "graph_*: kernels alone, replayed from a CUDA graph)")


SWEEP = {
    "pointer": [kernels.MatmulConfig(bm, bn, bk, GROUP_M=8, num_warps=w, num_stages=s) for bm, bn, bk, w, s in (
        (128, 128, 64, 4, 4), (128, 128, 64, 8, 4), (128, 128, 64, 8, 5), (128, 256, 64, 8, 3),
        (256, 128, 64, 8, 3), (128, 128, 128, 8, 3), (64, 256, 64, 4, 4))],
    "tma": [kernels.MatmulConfig(bm, bn, bk, GROUP_M=8, num_warps=8, num_stages=s, EPILOGUE_SPLIT=split,
                                 FLATTEN=flat, WARP_SPECIALIZE=ws) for bm, bn, bk, s, split, flat, ws in (
        (128, 128, 64, 3, 1, False, False), (128, 128, 64, 4, 1, False, False), (128, 128, 64, 4, 2, False, False),
        (128, 128, 64, 4, 1, False, True), (128, 128, 64, 4, 2, False, True), (128, 128, 64, 4, 1, True, False),
        (128, 128, 64, 4, 2, True, False), (128, 256, 64, 3, 2, False, False), (128, 256, 64, 3, 2, False, True),
        (128, 128, 128, 3, 2, False, False), (256, 128, 64, 3, 2, False, False))],
}
SWEEP_EAGER = "eager F.linear + F.gelu"


def _config_label(kernel, cfg):
    return (f"{kernel} {cfg.BLOCK_M}x{cfg.BLOCK_N}x{cfg.BLOCK_K} w{cfg.num_warps} s{cfg.num_stages}"
            + (f" split{cfg.EPILOGUE_SPLIT} flat{int(cfg.FLATTEN)} ws{int(cfg.WARP_SPECIALIZE)}"
               if kernel == "tma" else ""))


def sweep():
    """Every tile config of the kernels at SWEEP_SHAPE (checked against float32 first), against eager."""
    M, K, N = SWEEP_SHAPE
    dt, dev = SWEEP_DTYPE, harness.DEVICE
    x = torch.randn(M, K, device=dev, dtype=dt)
    w, b = torch.randn(N, K, device=dev, dtype=dt) * K**-0.5, torch.randn(N, device=dev, dtype=dt)
    out = torch.empty(M, N, device=dev, dtype=dt)
    expected = F.gelu(F.linear(x.float(), w.float(), b.float()))
    errors = {}  # config label -> rel err of its output, found when it is built

    def config_peer(kernel, cfg, label):
        def make(case, mode):
            fn = lambda: kernels.linear_act(x, w, b, None, out, None, "gelu", kernel=kernel, config=cfg)  # noqa: E731
            fn()
            errors[label] = harness.rel_err(out, expected)
            return fn
        return make

    kinds = ["pointer", "tma"] if kernels.select_kernel(x, w, out) == "tma" else ["pointer"]
    peers = {SWEEP_EAGER: lambda case, mode: lambda: F.gelu(F.linear(x, w, b))}
    for kernel in kinds:
        for cfg in SWEEP[kernel]:
            label = _config_label(kernel, cfg)
            peers[label] = config_peer(kernel, cfg, label)

    def status(case, mode, row):
        err = errors.get(row["impl"])
        return {} if err is None else {"rel_err": f"{err:.1e}", "status": "ok" if err < 2e-2 else "WRONG"}

    rows = harness.run_benchmark(
        "mlp_sweep", [{"shape": f"{M}x{K}->{N}"}], peers, ("fwd",), flops=lambda case, mode: 2.0 * M * K * N,
        ratios={"vs_eager": lambda impl: impl == SWEEP_EAGER}, derive=status, graph=False,
        columns=["impl", "ms", "min_ms", "max_ms", "tflops", "pct_peak", "vs_eager", "rel_err", "status", "error"],
        title=f"fc1+GELU(erf) {str(dt)[6:]} tile sweep at {M}x{K}->{N} (a failed config: n/a with its error)")
    for kernel in kinds:
        good = [r for r in rows if r.get("status") == "ok" and r["impl"].startswith(kernel)]
        if good:
            best = min(good, key=lambda r: r["ms"])
            print(f"best {kernel}: {best['impl']}  {best['ms']} ms = {best['vs_eager']}x eager "
                  f"(set kernels/mlp.py CONFIGS[('{kernel}', 2)])")
    return rows


def cpu_check(args=None):
    """No GPU: the fused kernels under Triton's interpreter against float64, and CPU timings."""
    x, w, b = torch.randn(130, 96), torch.randn(200, 96) * 96**-0.5, torch.randn(200)
    rows, errs = [], []
    for approximate in ("none", "tanh"):
        before = dispatch.kernel_launches["linear_act_fwd"]
        y = VF.linear_gelu(x, w, b, approximate)
        ran = dispatch.kernel_launches["linear_act_fwd"] > before
        ref = reference.linear_gelu(x.double(), w.double(), b.double(), approximate)
        errs.append(((y.double() - ref).norm() / ref.norm()).item())
        rows.append(dict(shape="130x96->200 fp32", impl=f"vit_fast gelu({approximate}), interpreter",
                         kernel_ran=ran, rel_err=f"{errs[-1]:.1e}",
                         **harness.cpu_ms_columns(lambda a=approximate: VF.linear_gelu(x, w, b, a))))
        rows.append(dict(shape="130x96->200 fp32", impl=f"eager gelu({approximate}), CPU", kernel_ran=False,
                         **harness.cpu_ms_columns(lambda a=approximate: F.gelu(F.linear(x, w, b), approximate=a))))
    # the fused MLP, both backends: output and dx against float64, the backend's kernels counted
    x, r = torch.randn(130, 96, requires_grad=True), torch.randn(130, 96)
    w2, b2 = torch.randn(96, 200) * 200**-0.5, torch.randn(96)
    exact_x = x.detach().double().requires_grad_()
    exact = F.linear(F.gelu(F.linear(exact_x, w.double(), b.double())), w2.double(), b2.double()) + r.double()
    (exact_dx,) = torch.autograd.grad(exact, exact_x, torch.ones_like(exact))
    for backend in ("triton", "torch"):
        with _mlp_backend_env(backend):
            before = dispatch.kernel_launches.copy()
            y = VF.mlp(x, w, b, w2, b2, residual=r)
            (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
            ran = {k: v - before[k] for k, v in dispatch.kernel_launches.items() if v != before[k]}
        err = max(((y.double() - exact).norm() / exact.norm()).item(), ((dx.double() - exact_dx).norm()
                                                                           / exact_dx.norm()).item())
        errs.append(err)
        rows.append(dict(shape="130x96->200->96 fp32", impl=f"vit_fast mlp ({backend}) fwd+bwd, interpreter",
                         kernel_ran=" ".join(sorted(ran)), rel_err=f"{err:.1e}"))
    harness.print_table(rows, title="CPU: interpreter correctness (timings are not performance numbers)")
    if max(errs) > 1e-5:
        raise SystemExit("vit_fast linear_gelu / mlp disagrees with float64 under the interpreter")


def run_gpu(args):
    print(f"{harness.device_name()}: measured bf16 matmul peak {harness.ceilings()['matmul_tflops']:.0f} TFLOP/s")
    if args.sweep:
        return sweep()
    shapes = [] if args.fused_mlp else QUICK_SHAPES if args.quick else SHAPES
    return bench(shapes, FUSED_MLP_SHAPES, args.quick, args.max_autotune or not args.quick,
                 "mlp_fused" if args.fused_mlp else "mlp")


def main(argv=None):
    harness.main(argv, __doc__, OPTIONS, run_gpu, cpu_check, NOT_MEASURED)


if __name__ == "__main__":
    main()
