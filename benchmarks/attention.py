"""Fused attention (vit_fast's main job) against every peer, bf16, at ViT shapes and long sequences.

    python benchmarks/attention.py            # every shape
    python benchmarks/attention.py --quick    # ViT-B/16, ViT-B@384, ViT-H/14, N=1024/4096 (a short GPU lease)
    python benchmarks/attention.py --sweep    # kernel tile configs at [256,12,197,64], [128,16,257,80], [64,12,577,64]

Peers in the same run, forward / backward / forward+backward: SDPA with each backend forced
(flash, efficient, cuDNN, math; a backend that refuses a shape shows n/a), eager softmax(QK^T)V,
flash-attn where installed. TFLOP/s count 4*B*H*N^2*D for the forward (2.5x that for the backward),
% of the device's measured bf16 matmul peak; peak memory above the inputs; host_ms, the CPU time to
enqueue one call (where it reaches ms, the row is launch-bound, not kernel-bound); graph_ms, the same
call replayed from a CUDA graph (the kernels alone, launch gaps gone). Then the whole module:
a timm-style Attention (qkv Linear, reshape/permute, SDPA, transpose, proj; eager and torch.compile)
against vit_fast.nn.Attention at [256,197,768], 12 heads.
Without a GPU: says so, checks the kernels under Triton's interpreter on a small ViT shape, times
the CPU paths against SDPA on the CPU (no files written), exits 0.
"""
import argparse
import os
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels on CPU tensors

import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from vit_fast import dispatch, reference  # noqa: E402
from vit_fast import functional as VF  # noqa: E402
from vit_fast.kernels import attention as kernels  # noqa: E402
from vit_fast.nn import Attention  # noqa: E402

# (name, B, H, N, D): batches that fill an H100, as in perf/TARGETS.md
SHAPES = [
    ("ViT-S/16 b256", 256, 6, 197, 64),
    ("ViT-B/16 b256", 256, 12, 197, 64),
    ("ViT-L/16 b128", 128, 16, 197, 64),
    ("ViT-S/16@384 b64", 64, 6, 577, 64),
    ("ViT-B/16@384 b64", 64, 12, 577, 64),
    ("ViT-L/16@384 b32", 32, 16, 577, 64),
    ("ViT-H/14 b128", 128, 16, 257, 80),
    ("N=1024 D=64", 32, 16, 1024, 64),
    ("N=1024 D=128", 32, 8, 1024, 128),
    ("N=2048 D=64", 16, 16, 2048, 64),
    ("N=4096 D=64", 8, 16, 4096, 64),
    ("N=4096 D=128", 8, 8, 4096, 128),
]
QUICK = ("ViT-B/16 b256", "ViT-B/16@384 b64", "ViT-H/14 b128", "N=1024 D=64", "N=4096 D=64")
# N = 577 (ViT@384, 0.71x cuDNN in the first run) shares the D = 64 table row with N = 197: if its best
# tiles differ, the table needs a sequence-length split
SWEEP_SHAPES = [("ViT-B/16 b256", 256, 12, 197, 64), ("ViT-H/14 b128", 128, 16, 257, 80),
                ("ViT-B/16@384 b64", 64, 12, 577, 64)]
MODULE_SHAPE = (256, 197, 768, 12)  # B, N, dim, heads
DEVICE = "cuda"
# worst relative error vs float64 the interpreter check accepts, by dtype (as tests/numerics.py)
CPU_CHECK_BOUND = {torch.float32: 1e-5, torch.float16: 1e-2}


class TimmStyleAttention(nn.Module):
    """timm's Attention as it runs in timm (fused_attn=True): the baseline module."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


# ----------------------------------------------------------------------------- GPU


def attention_impls():
    """name -> (context factory or None, fn(q, k, v) on [B, H, N, D])."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    impls = {"vit_fast": (None, VF.attention)}
    for name, backend in (("sdpa flash", SDPBackend.FLASH_ATTENTION), ("sdpa efficient", SDPBackend.EFFICIENT_ATTENTION),
                          ("sdpa cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa math", SDPBackend.MATH)):
        impls[name] = (lambda b=backend: sdpa_kernel(b), F.scaled_dot_product_attention)
    impls["eager softmax(QK^T)V"] = (None, reference.attention)
    try:
        from flash_attn import flash_attn_func

        impls["flash_attn"] = (None, lambda q, k, v: flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2))
    except ImportError:
        pass
    return impls


def _host_ms(fn, calls=20):
    """Host milliseconds per call to enqueue `fn` (no sync inside the loop; 20 calls stay far below the
    launch-queue depth). do_bench times each call between events with no sync, so a row whose host_ms
    reaches its ms is launch-bound: it measures Python + launch overhead, not the kernels."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - start) / calls * 1e3
    torch.cuda.synchronize()
    return host


def _time_modes(label, fn, inputs, quick):
    """{mode: (ms, peak MiB, host ms, CUDA-graph ms or None)} for forward, backward (autograd graph
    kept), forward+backward."""
    reps = dict(warmup=10, rep=40) if quick else dict(warmup=25, rep=100)
    out = fn(*inputs)
    do = torch.randn_like(out)
    fwd = lambda: fn(*inputs)  # noqa: E731
    bwd = lambda: torch.autograd.grad(out, inputs, do, retain_graph=True)  # noqa: E731
    fwd_bwd = lambda: torch.autograd.grad(fn(*inputs), inputs, do)  # noqa: E731
    return {mode: (harness.bench_ms(f, **reps), harness.peak_memory_mib(f), _host_ms(f),
                   harness.graph_ms_or_none(f"  {label} {mode}", f, **reps))
            for mode, f in (("fwd", fwd), ("bwd", bwd), ("fwd+bwd", fwd_bwd))}


def bench_attention(shapes, quick, peak):
    rows = []
    for name, B, H, N, D in shapes:
        q, k, v = (torch.randn(B, H, N, D, device=DEVICE, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        fwd_flops = 4 * B * H * N * N * D
        flops = {"fwd": fwd_flops, "bwd": 2.5 * fwd_flops, "fwd+bwd": 3.5 * fwd_flops}
        shape_rows = []
        for impl, (context, fn) in attention_impls().items():
            try:
                with context() if context else torch.enable_grad():
                    times = _time_modes(f"{name} {impl}", fn, (q, k, v), quick)
            except (RuntimeError, torch.OutOfMemoryError) as e:  # a backend that refuses the shape
                print(f"  {name} {impl}: n/a ({str(e).splitlines()[0][:90]})")
                times = None
            torch.cuda.empty_cache()
            for mode in flops:
                row = dict(shape=f"{name} [{B},{H},{N},{D}]", impl=impl, mode=mode)
                if times is None:
                    row.update(ms="n/a", tflops="n/a", pct_peak="n/a", peak_mib="n/a", host_ms="n/a", graph_ms="n/a")
                else:
                    ms, mib, host, graph_ms = times[mode]
                    tflops = flops[mode] / ms / 1e9
                    row.update(ms=round(ms, 4), tflops=round(tflops, 1), pct_peak=round(100 * tflops / peak, 1),
                               peak_mib=round(mib, 1), host_ms=round(host, 3),
                               graph_ms=round(graph_ms, 4) if graph_ms else "n/a")
                shape_rows.append(row)
        for mode in flops:  # each impl against the fastest SDPA backend at this shape and mode, both timings
            for key in ("ms", "graph_ms"):
                timed = [r for r in shape_rows if r["mode"] == mode and r[key] != "n/a"]
                sdpa = [r[key] for r in timed if r["impl"].startswith("sdpa")]
                for r in timed:
                    r[key.replace("ms", "vs_best_sdpa")] = round(min(sdpa) / r[key], 3) if sdpa else "n/a"
        rows += shape_rows
        del q, k, v
        torch.cuda.empty_cache()
    return rows


def bench_module(quick, peak):
    B, N, dim, heads = MODULE_SHAPE
    x = torch.randn(B, N, dim, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    timm_style = TimmStyleAttention(dim, heads).to(DEVICE, torch.bfloat16)
    fused = Attention(dim, heads, qkv_bias=True).to(DEVICE, torch.bfloat16)
    fused.load_state_dict(timm_style.state_dict())
    modules = {"timm-style eager": timm_style, "timm-style torch.compile": torch.compile(timm_style),
               "vit_fast.nn.Attention": fused}
    if not quick:
        modules["vit_fast.nn.Attention torch.compile"] = torch.compile(fused)
    reps = dict(warmup=10, rep=40) if quick else dict(warmup=25, rep=100)
    dy = torch.randn_like(x)
    attn_flops = 4 * B * heads * N * N * (dim // heads)
    linear_flops = 2 * B * N * dim * 4 * dim  # qkv (3 dim) + proj (dim)
    flops = {"fwd": attn_flops + linear_flops, "fwd+bwd": 3.5 * attn_flops + 3 * linear_flops}
    rows = []
    for impl, mod in modules.items():
        fns = {"fwd": lambda m=mod: m(x), "fwd+bwd": lambda m=mod: m(x).backward(dy)}
        for mode, fn in fns.items():
            fn()  # compile / warm up
            ms = harness.bench_ms(fn, **reps)
            graph_ms = harness.graph_ms_or_none(f"  module {impl} {mode}", fn, **reps)
            tflops = flops[mode] / ms / 1e9
            rows.append(dict(shape=f"module [{B},{N},{dim}] h{heads}", impl=impl, mode=mode, ms=round(ms, 4),
                             tflops=round(tflops, 1), pct_peak=round(100 * tflops / peak, 1),
                             peak_mib=round(harness.peak_memory_mib(fn), 1),
                             graph_ms=round(graph_ms, 4) if graph_ms else "n/a"))
    for mode in ("fwd", "fwd+bwd"):
        for key in ("ms", "graph_ms"):
            timed = [r for r in rows if r["mode"] == mode and r[key] != "n/a"]
            timm = [r[key] for r in timed if r["impl"].startswith("timm")]
            for r in timed:
                r[key.replace("ms", "vs_best_timm")] = round(min(timm) / r[key], 3) if timm else "n/a"
    return rows


def _sweep_candidates():
    C = kernels.Config
    fwd = [C(m, n, w, s) for m, n, w, s in [
        (128, 32, 4, 3), (128, 64, 4, 3), (128, 32, 8, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 32, 4, 3),
        (64, 64, 4, 3), (128, 32, 4, 4), (128, 64, 8, 2), (64, 128, 4, 3)]]
    dkdv = [C(m, n, w, s) for m, n, w, s in [
        (32, 128, 4, 3), (32, 128, 8, 3), (64, 128, 8, 3), (32, 64, 4, 3), (16, 128, 4, 3), (64, 64, 4, 3),
        (32, 128, 4, 2)]]
    dq = [C(m, n, w, s) for m, n, w, s in [
        (128, 32, 4, 3), (128, 64, 8, 3), (64, 32, 4, 3), (64, 64, 4, 3), (128, 32, 8, 3), (128, 64, 4, 2)]]
    single = [C(m, 256, w, s) for m, w, s in [(32, 8, 3), (16, 8, 3), (16, 4, 3), (64, 8, 2), (32, 8, 2)]]
    return fwd, dkdv, dq, single


def sweep():
    """Times kernel configs (coordinate descent for the backward) and prints the best per shape."""
    fwd_cands, dkdv_cands, dq_cands, single_cands = _sweep_candidates()
    for name, B, H, N, D in SWEEP_SHAPES:
        q, k, v, do = (torch.randn(B, H, N, D, device=DEVICE, dtype=torch.bfloat16) for _ in range(4))
        o, lse = torch.empty_like(q), torch.empty(B, H, N, device=DEVICE)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        scale = D**-0.5
        flops = 4 * B * H * N * N * D

        def timed(label, fn):  # kernels alone (CUDA-graph replay): launch cost is not the config's
            try:
                ms = harness.bench_graph_ms(fn)
            except Exception as e:  # out of shared memory / registers: not a candidate
                print(f"  {label}: failed ({type(e).__name__})")
                return float("inf")
            print(f"  {label}: {ms:.4f} ms")
            return ms

        print(f"\n== sweep {name} [{B},{H},{N},{D}] bf16 ==")
        fwd = {c: timed(f"fwd {c}", lambda c=c: kernels.attention_fwd(q, k, v, o, lse, scale, c)) for c in fwd_cands}
        best_fwd = min(fwd, key=fwd.get)
        kernels.attention_fwd(q, k, v, o, lse, scale)

        def bwd(cfgs):
            return lambda: kernels.attention_bwd(do, q, k, v, o, lse, dq, dk, dv, scale, cfgs)

        dq_default = kernels.config("dq", D, torch.bfloat16)
        dkdv = {c: timed(f"bwd dkdv {c} + dq default", bwd((c, dq_default))) for c in dkdv_cands}
        best_dkdv = min(dkdv, key=dkdv.get)
        dqs = {c: timed(f"bwd dkdv best + dq {c}", bwd((best_dkdv, c))) for c in dq_cands}
        best_dq = min(dqs, key=dqs.get)
        singles = {c: timed(f"bwd single pass {c}", bwd((c, None))) for c in single_cands if N <= c.block_n}
        show = lambda c: f"Config{tuple(c)}"  # noqa: E731  as written in kernels/attention.py's table
        bd = kernels.block_d(D)
        print(f"best fwd    {show(best_fwd)}: {fwd[best_fwd]:.4f} ms = {flops / fwd[best_fwd] / 1e9:.0f} TFLOP/s")
        print(f"best bwd    {show(best_dkdv)} + {show(best_dq)}: {dqs[best_dq]:.4f} ms")
        print(f'table rows: ("fwd", {bd}): {show(best_fwd)}, ("dkdv", {bd}): {show(best_dkdv)}, '
              f'("dq", {bd}): {show(best_dq)}')
        if singles:
            best_single = min(singles, key=singles.get)
            faster = singles[best_single] < dqs[best_dq]
            print(f"best single {show(best_single)}: {singles[best_single]:.4f} ms, "
                  f"{'faster' if faster else 'slower'} than two passes"
                  + (f": SINGLE_PASS_CONFIGS[{bd}] = {show(best_single)}" if faster else ""))


def run_gpu(quick):
    peak = harness.ceilings()["matmul_tflops"]
    print(f"{harness.device_name()}: measured bf16 matmul peak {peak:.0f} TFLOP/s")
    shapes = [s for s in SHAPES if s[0] in QUICK] if quick else SHAPES
    rows = bench_attention(shapes, quick, peak)
    harness.print_table(rows, ["shape", "impl", "mode", "ms", "tflops", "pct_peak", "peak_mib", "host_ms",
                               "vs_best_sdpa", "graph_ms", "graph_vs_best_sdpa"],
                        title="attention, bf16 (vs_best_sdpa > 1: faster than every SDPA backend; host_ms ~ ms: "
                              "launch-bound; graph_*: kernels alone, replayed from a CUDA graph)")
    module_rows = bench_module(quick, peak)
    harness.print_table(module_rows, ["shape", "impl", "mode", "ms", "tflops", "pct_peak", "peak_mib", "vs_best_timm",
                                      "graph_ms", "graph_vs_best_timm"],
                        title="Attention module, bf16 (vs_best_timm > 1: faster than timm-style eager and compiled)")
    out_dir = harness.write_results("attention", rows + module_rows, plot_key="tflops",
                                    label_keys=("shape", "impl", "mode"))
    print(f"\nresults written to {out_dir}")


# ----------------------------------------------------------------------------- CPU


def run_cpu():
    """Kernels under the interpreter vs float64 on a small ViT shape; CPU timings of the PyTorch paths."""
    B, H, N, D = 2, 3, 197, 64  # ViT-Ti/16: 3 heads of 64
    rows = []
    for dtype in (torch.float32, torch.float16):
        q, k, v = (torch.randn(B, H, N, D, dtype=dtype, requires_grad=True) for _ in range(3))
        do = torch.randn(B, H, N, D, dtype=dtype)
        launches = dispatch.kernel_launches["attention_fwd"]
        out = VF.attention(q, k, v)
        grads = torch.autograd.grad(out, (q, k, v), do)
        assert dispatch.kernel_launches["attention_fwd"] == launches + 1, "the Triton kernels did not run"
        ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
        ref_out = reference.attention(*ref)
        ref_grads = torch.autograd.grad(ref_out, ref, do.double())
        for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads)):
            err = ((got.double() - want).norm() / want.norm()).item()
            rows.append(dict(check=f"interpreter {str(dtype)[6:]} {name}", rel_err_vs_fp64=f"{err:.1e}",
                             bound=f"{CPU_CHECK_BOUND[dtype]:.0e}"))
            assert err <= CPU_CHECK_BOUND[dtype], f"attention kernels: {dtype} {name} rel err {err:.2e}"
    harness.print_table(rows, title=f"Triton kernels under the interpreter, [{B},{H},{N},{D}], vs float64")

    os.environ[dispatch.FORCE_TORCH_ENV] = "1"  # time vit_fast's CPU path (PyTorch), not the interpreter
    torch.manual_seed(0)
    Bm, Nm, dim, heads = 8, 197, 384, 6  # ViT-S/16, batch 8
    x = torch.randn(Bm, Nm, dim)
    q, k, v = (torch.randn(Bm, heads, Nm, dim // heads) for _ in range(3))
    qkv = torch.randn(Bm, Nm, 3 * dim)
    timm_style = TimmStyleAttention(dim, heads)
    fused = Attention(dim, heads, qkv_bias=True)
    fused.load_state_dict(timm_style.state_dict())
    cases = [
        (f"SDPA [{Bm},{heads},{Nm},{dim // heads}]", lambda: F.scaled_dot_product_attention(q, k, v)),
        (f"eager softmax(QK^T)V [{Bm},{heads},{Nm},{dim // heads}]", lambda: reference.attention(q, k, v)),
        (f"vit_fast attention [{Bm},{heads},{Nm},{dim // heads}]", lambda: VF.attention(q, k, v)),
        (f"vit_fast attention_packed [{Bm},{Nm},{3 * dim}]", lambda: VF.attention_packed(qkv, heads)),
        (f"timm-style Attention [{Bm},{Nm},{dim}]", lambda: timm_style(x)),
        (f"vit_fast.nn.Attention [{Bm},{Nm},{dim}]", lambda: fused(x)),
    ]
    with torch.no_grad():
        timings = [dict(impl=name, cpu_ms=round(harness.bench_cpu_ms(fn), 2)) for name, fn in cases]
    harness.print_table(timings, title=f"CPU forward, fp32, {torch.get_num_threads()} threads (PyTorch paths)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    parser.add_argument("--sweep", action="store_true", help="time kernel tile configs and print the best")
    args = parser.parse_args()
    if not harness.has_gpu():
        print("no CUDA GPU: attention timings not measured; checking the Triton kernels under the interpreter "
              "and timing the CPU paths instead")
        run_cpu()
        return
    if args.sweep:
        sweep()
    else:
        run_gpu(args.quick)


if __name__ == "__main__":
    main()
