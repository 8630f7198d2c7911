"""Fused Linear + bias + GELU and the whole MLP, bf16, at ViT-S/B/L/H shapes, against the peers.

    python benchmarks/mlp.py            # every shape, torch.compile default and max-autotune
    python benchmarks/mlp.py --quick    # ViT-B only, no max-autotune (fits a short GPU lease)
    python benchmarks/mlp.py --quick --max-autotune   # ViT-B only, with the max-autotune peer
    python benchmarks/mlp.py --sweep    # tile configs of both matmul kernels at M=50432, 768 -> 3072
    python benchmarks/mlp.py --fused-mlp   # only the fused-MLP rows (VF.mlp, both backends) at ViT-B b128/b256

Peers in the same run: eager (cuBLAS F.linear + a separate F.gelu), cuBLAS F.linear alone (the
GEMM's own speed), cuBLASLt's fused GELU(tanh) epilogue (``torch._addmm_activation``),
torch.compile (default, and max-autotune without --quick), and a timm-style eager Mlp. The
fused-MLP rows (every run, ViT-B b128 and b256) time ``VF.mlp`` fc2(GELU(fc1(x))) + residual, fwd
and fwd+bwd, on both of its backends (VIT_FAST_MLP_BACKEND=triton: the fused backward epilogue;
=torch: cuBLAS GEMMs + the elementwise GELU backward kernel) against the two-op path (linear_gelu +
linear(residual=)) and eager torch (F.linear, F.gelu, F.linear, + residual), each as ``ms`` (eager
call) and ``graph_ms`` (replayed from a CUDA graph: the kernels alone). TFLOP/s
count 2*M*K*N per matmul (x3 for forward+backward), % of the device's measured bf16 matmul peak.
Without a GPU: says so, checks the kernels under Triton's interpreter, times the CPU paths (no
files written), exits 0.
"""
import argparse
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

# (name, M = batch * tokens, K = embed dim, N = MLP hidden dim), as in perf/TARGETS.md
SHAPES = [("ViT-S b256", 256 * 197, 384, 1536), ("ViT-B b256", 256 * 197, 768, 3072),
          ("ViT-L b128", 128 * 197, 1024, 4096), ("ViT-H/14 b128", 128 * 257, 1280, 5120)]
QUICK_SHAPES = [SHAPES[1]]
SWEEP_SHAPE = (256 * 197, 768, 3072)


def _row(shape, impl, mode, ms, flops, peak, eager_ms=None, **extra):
    tflops = flops / ms / 1e9
    row = dict(shape=shape, impl=f"{impl} [{mode}]", ms=round(ms, 4), tflops=round(tflops, 1),
               pct_peak=round(100 * tflops / peak, 1))
    if eager_ms is not None:
        row["vs_eager"] = round(eager_ms / ms, 3)
    row.update(extra)
    return row


def _grad_fn(fn, inputs):
    """fn(*inputs) forward + backward with a fixed output gradient."""
    dy = torch.randn_like(fn(*inputs))
    return lambda: torch.autograd.grad(fn(*inputs), inputs, dy)


def bench_shape(name, M, K, N, quick, peak, max_autotune):
    dt, dev = torch.bfloat16, "cuda"
    x = torch.randn(M, K, device=dev, dtype=dt)
    w1, b1 = torch.randn(N, K, device=dev, dtype=dt) * K**-0.5, torch.randn(N, device=dev, dtype=dt)
    w2, b2 = torch.randn(K, N, device=dev, dtype=dt) * N**-0.5, torch.randn(K, device=dev, dtype=dt)
    shape = f"{name} {M}x{K}->{N}"
    gemm = 2.0 * M * K * N
    rows = []

    # fc1 + GELU, forward (inference: no pre saved)
    fwd = {}
    for approximate in ("none", "tanh"):
        fwd[f"vit_fast gelu({approximate})"] = lambda a=approximate: VF.linear_gelu(x, w1, b1, a)
        fwd[f"eager gelu({approximate})"] = lambda a=approximate: F.gelu(F.linear(x, w1, b1), approximate=a)
    fwd["cuBLASLt gelu(tanh) epilogue"] = lambda: torch._addmm_activation(b1, x, w1.t(), use_gelu=True)
    fwd["cuBLAS linear alone"] = lambda: F.linear(x, w1, b1)
    eager_fc1 = lambda x, w, b: F.gelu(F.linear(x, w, b))  # noqa: E731
    compiled = {"torch.compile gelu(none)": torch.compile(eager_fc1)}
    if max_autotune and K == 768:  # max-autotune compiles for minutes: the ViT-B shape only
        compiled["torch.compile max-autotune gelu(none)"] = torch.compile(eager_fc1, mode="max-autotune-no-cudagraphs")
    for impl, fn in compiled.items():
        fwd[impl] = lambda fn=fn: fn(x, w1, b1)
    with torch.no_grad():
        times = {impl: harness.bench_ms(fn) for impl, fn in fwd.items()}
    for impl, ms in times.items():
        eager_ms = times["eager gelu(tanh)" if "tanh" in impl else "eager gelu(none)"]
        rows.append(_row(shape, impl, "fc1 fwd", ms, gemm, peak, eager_ms))

    # fc1 + GELU, forward + backward
    leaves = [t.clone().requires_grad_() for t in (x, w1, b1)]
    fb = {"vit_fast gelu(none)": _grad_fn(VF.linear_gelu, leaves), "eager gelu(none)": _grad_fn(eager_fc1, leaves)}
    times = {impl: harness.bench_ms(fn) for impl, fn in fb.items()}
    for impl, ms in times.items():
        rows.append(_row(shape, impl, "fc1 fwd+bwd", ms, 3 * gemm, peak, times["eager gelu(none)"],
                         peak_mib=round(harness.peak_memory_mib(fb[impl]), 1)))

    # fc2 + residual, forward
    h, r = torch.randn(M, N, device=dev, dtype=dt), torch.randn(M, K, device=dev, dtype=dt)
    res = {"vit_fast linear(residual)": lambda: VF.linear(h, w2, b2, residual=r),
           "eager linear + add": lambda: F.linear(h, w2, b2) + r,
           "cuBLAS addmm(residual) + bias": lambda: torch.addmm(r, h, w2.t()).add_(b2)}
    with torch.no_grad():
        times = {impl: harness.bench_ms(fn) for impl, fn in res.items()}
    for impl, ms in times.items():
        rows.append(_row(shape, impl, "fc2+residual fwd", ms, gemm, peak, times["eager linear + add"]))

    # the whole Mlp (fc1 -> GELU -> fc2), forward and forward + backward
    ours, eager = Mlp(K, N).to(dev, dt), reference.Mlp(K, N).to(dev, dt)
    ours.load_state_dict(eager.state_dict())
    mlps = {"vit_fast.nn.Mlp": ours, "eager timm-style Mlp": eager}
    if not quick:
        mlps["torch.compile(eager Mlp)"] = torch.compile(eager)
    x3 = x.view(-1, 197 if M % 197 == 0 else 257, K)
    with torch.no_grad():
        times = {impl: harness.bench_ms(lambda m=m: m(x3)) for impl, m in mlps.items()}
    for impl, ms in times.items():
        rows.append(_row(shape, impl, "Mlp fwd", ms, 2 * gemm, peak, times["eager timm-style Mlp"]))
    xg = x3.clone().requires_grad_()
    times = {}
    for impl, m in mlps.items():
        dy = torch.randn_like(x3)
        step = lambda m=m, dy=dy: torch.autograd.grad(m(xg), [xg, *m.parameters()], dy)  # noqa: E731
        times[impl] = (harness.bench_ms(step), harness.peak_memory_mib(step))
    for impl, (ms, mib) in times.items():
        rows.append(_row(shape, impl, "Mlp fwd+bwd", ms, 6 * gemm, peak, times["eager timm-style Mlp"][0],
                         peak_mib=round(mib, 1)))
    return rows


# ViT-B's MLP (C 768 -> hidden 3072 -> 768) at the training batch sizes
FUSED_MLP_SHAPES = [("ViT-B b128", 128 * 197, 768, 3072), ("ViT-B b256", 256 * 197, 768, 3072)]


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


def bench_fused_mlp(name, M, C, H, peak, dt=torch.bfloat16, dev="cuda"):
    """VF.mlp (both backends) vs the two-op path vs eager, fc2(GELU(fc1(x))) + residual, bf16."""
    x = torch.randn(M, C, device=dev, dtype=dt)
    w1, b1 = torch.randn(H, C, device=dev, dtype=dt) * C**-0.5, torch.randn(H, device=dev, dtype=dt)
    w2, b2 = torch.randn(C, H, device=dev, dtype=dt) * H**-0.5, torch.randn(C, device=dev, dtype=dt)
    r = torch.randn(M, C, device=dev, dtype=dt)
    impls = {  # name -> (backend env, fn(x, w1, b1, w2, b2, r))
        "vit_fast mlp (triton: fused bwd epilogue)": ("triton", lambda *t: VF.mlp(*t)),
        "vit_fast mlp (torch: cuBLAS + GELU-bwd kernel)": ("torch", lambda *t: VF.mlp(*t)),
        "two-op linear_gelu + linear(residual)": (
            None, lambda x, w1, b1, w2, b2, r: VF.linear(VF.linear_gelu(x, w1, b1), w2, b2, residual=r)),
        "eager F.linear, F.gelu, F.linear, + r": (
            None, lambda x, w1, b1, w2, b2, r: F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2) + r),
    }
    eager = "eager F.linear, F.gelu, F.linear, + r"
    shape = f"{name} {M}x{C}->{H}->{C}"
    gemm = 2.0 * M * C * H
    rows = []
    leaves = [t.clone().requires_grad_() for t in (x, w1, b1, w2, b2, r)]
    dy = torch.randn_like(r)
    times = {}
    for impl, (backend, fn) in impls.items():
        with _mlp_backend_env(backend):
            def fwd(fn=fn):
                with torch.no_grad():
                    return fn(x, w1, b1, w2, b2, r)

            def step(fn=fn):
                return torch.autograd.grad(fn(*leaves), leaves, dy)
            for mode, f in (("MLP+residual fwd", fwd), ("MLP+residual fwd+bwd", step)):
                times[impl, mode] = (harness.bench_ms(f), harness.graph_ms_or_none(f"  {impl} {mode}", f),
                                     harness.peak_memory_mib(f))
    for (impl, mode), (ms, graph_ms, mib) in times.items():
        eager_ms, eager_graph = times[eager, mode][:2]
        flops = 2 * gemm if mode.endswith("fwd") else 6 * gemm
        row = _row(shape, impl, mode, ms, flops, peak, eager_ms, graph_ms=round(graph_ms, 4) if graph_ms else "n/a",
                   graph_vs_eager=round(eager_graph / graph_ms, 3) if graph_ms and eager_graph else "n/a",
                   peak_mib=round(mib, 1))
        rows.append(row)
    return rows


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


def sweep(peak):
    M, K, N = SWEEP_SHAPE
    dt = torch.bfloat16
    x = torch.randn(M, K, device="cuda", dtype=dt)
    w, b = torch.randn(N, K, device="cuda", dtype=dt) * K**-0.5, torch.randn(N, device="cuda", dtype=dt)
    out = torch.empty(M, N, device="cuda", dtype=dt)
    eager_ms = harness.bench_ms(lambda: F.gelu(F.linear(x, w, b)))
    expected = F.gelu(F.linear(x.float(), w.float(), b.float()))
    rows = []
    kinds = ["pointer", "tma"] if kernels.select_kernel(x, w, out) == "tma" else ["pointer"]
    for kernel in kinds:
        for cfg in SWEEP[kernel]:
            fn = lambda cfg=cfg: kernels.linear_act(x, w, b, None, out, None, "gelu", kernel=kernel, config=cfg)  # noqa
            label = (f"{kernel} {cfg.BLOCK_M}x{cfg.BLOCK_N}x{cfg.BLOCK_K} w{cfg.num_warps} s{cfg.num_stages}"
                     + (f" split{cfg.EPILOGUE_SPLIT} flat{int(cfg.FLATTEN)} ws{int(cfg.WARP_SPECIALIZE)}"
                        if kernel == "tma" else ""))
            try:
                fn()
                err = ((out.float() - expected).norm() / expected.norm()).item()
                ms = harness.bench_ms(fn)
            except Exception as e:  # a config that does not compile or fit: reported, not fatal
                rows.append(dict(shape=f"{M}x{K}->{N}", impl=label, status=f"failed: {type(e).__name__}: {e}"[:120]))
                continue
            rows.append(_row(f"{M}x{K}->{N}", label, "sweep", ms, 2.0 * M * K * N, peak, eager_ms,
                             rel_err=f"{err:.1e}", status="ok" if err < 2e-2 else "WRONG"))
    harness.print_table(rows, ["impl", "ms", "tflops", "pct_peak", "vs_eager", "rel_err", "status"],
                        title=f"fc1+GELU(erf) bf16 tile sweep at {M}x{K}->{N}, eager {eager_ms:.3f} ms")
    for kernel in kinds:
        good = [r for r in rows if r.get("status") == "ok" and r["impl"].startswith(kernel)]
        if good:
            best = min(good, key=lambda r: r["ms"])
            print(f"best {kernel}: {best['impl']}  {best['ms']} ms = {best['vs_eager']}x eager "
                  f"(set kernels/mlp.py CONFIGS[('{kernel}', 2)])")
    harness.write_results("mlp_sweep", rows)


def cpu_check():
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
                         cpu_ms=round(harness.bench_cpu_ms(lambda a=approximate: VF.linear_gelu(x, w, b, a)), 2)))
        rows.append(dict(shape="130x96->200 fp32", impl=f"eager gelu({approximate}), CPU", kernel_ran=False,
                         cpu_ms=round(harness.bench_cpu_ms(lambda a=approximate: F.gelu(F.linear(x, w, b),
                                                                                          approximate=a)), 2)))
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="ViT-B shape only, no max-autotune")
    parser.add_argument("--max-autotune", action="store_true",
                        help="with --quick: keep the torch.compile max-autotune peer (always on without --quick)")
    parser.add_argument("--sweep", action="store_true", help="tile sweep of both kernels at M=50432, 768 -> 3072")
    parser.add_argument("--fused-mlp", action="store_true",
                        help="only the fused-MLP rows (VF.mlp both backends, two-op path, eager) at ViT-B b128/b256")
    args = parser.parse_args()
    if not harness.has_gpu():
        print("no CUDA GPU: fused Linear+GELU / Mlp / fused-MLP GPU timings not measured; "
              "checking the kernels under Triton's interpreter instead")
        cpu_check()
        return
    if hasattr(harness, "stamp"):
        print("stamp:", harness.stamp())
    peak = harness.ceilings()["matmul_tflops"]
    print(f"{harness.device_name()}: measured bf16 matmul peak {peak:.0f} TFLOP/s")
    if args.sweep:
        sweep(peak)
        return
    rows = []
    if not args.fused_mlp:
        for name, M, K, N in QUICK_SHAPES if args.quick else SHAPES:
            rows += bench_shape(name, M, K, N, args.quick, peak, args.max_autotune or not args.quick)
            torch.cuda.empty_cache()
        harness.print_table(rows, ["shape", "impl", "ms", "tflops", "pct_peak", "vs_eager", "peak_mib"],
                            title="Linear + GELU / Mlp, bf16 (vs_eager > 1: faster than eager)")
    fused = []
    for name, M, C, H in FUSED_MLP_SHAPES:
        fused += bench_fused_mlp(name, M, C, H, peak)
        torch.cuda.empty_cache()
    harness.print_table(fused, ["shape", "impl", "ms", "graph_ms", "tflops", "vs_eager", "graph_vs_eager", "peak_mib"],
                        title="fused MLP fc2(GELU(fc1(x))) + residual, bf16 (vs_eager > 1: faster than eager)")
    rows += fused
    print("results in", harness.write_results("mlp_fused" if args.fused_mlp else "mlp", rows, plot_key="tflops"))


if __name__ == "__main__":
    main()
