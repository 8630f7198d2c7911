"""Fused attention (vit_fast's main job) against every peer, bf16, at ViT shapes and long sequences.

    python benchmarks/attention.py            # every shape, with CLIP ViT-L/14, SigLIP so400m/14@384, DINOv2-L/14 reg4
    python benchmarks/attention.py --quick    # ViT-B/16, ViT-B@384, ViT-H/14, N=1024/4096 (a short GPU lease)
    python benchmarks/attention.py --sweep    # kernel tile configs at [256,12,197,64], [128,16,257,80], [64,12,577,64]

Peers in the same run, forward / backward / forward+backward: SDPA with each backend forced
(flash, efficient, cuDNN, math; a backend that refuses a shape shows n/a), eager softmax(QK^T)V,
flash-attn where installed. TFLOP/s count 4*B*H*N^2*D for the forward (2.5x that for the backward),
% of the device's measured bf16 matmul peak; peak memory above the inputs; host_ms, the CPU time to
enqueue one call (where it reaches ms, the row is launch-bound, not kernel-bound); graph_ms, the same
call replayed from a CUDA graph (the kernels alone, launch gaps gone). Then the whole module:
a timm-style Attention (qkv Linear, reshape/permute, SDPA, transpose, proj; eager and torch.compile)
against vit_fast.nn.Attention at [256,197,768], 12 heads. The loop, timing (median, min, max), table
and files (benchmarks/results/<device>/attention.json, stamped; .csv, .png) are harness.run_benchmark's.
Without a GPU: says so, checks the kernels under Triton's interpreter on a small ViT shape, times
the CPU paths against SDPA on the CPU (no files written), exits 0.
"""
import os
import sys

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

# (name, B, H, N, D): batches that fill an H100 (the shapes the goals are set at); then the ViT family (not in
# --quick): CLIP ViT-L/14 at 224 (256 patches + class token), SigLIP so400m/14 at 384 (27^2 = 729
# patches, no class token; 16 heads of 72: the kernels take it as 64 + a masked 16-wide chunk,
# kernels.attention.head_chunks), DINOv2-L/14 with 4 registers (1 + 4 + 256 = 261). A head dim the
# kernels refuse shows as an n/a row with the reason.
SHAPES = [
    ("ViT-S/16 b256", 256, 6, 197, 64),
    ("ViT-B/16 b256", 256, 12, 197, 64),
    ("ViT-L/16 b128", 128, 16, 197, 64),
    ("ViT-S/16@384 b64", 64, 6, 577, 64),
    ("ViT-B/16@384 b64", 64, 12, 577, 64),
    ("ViT-L/16@384 b32", 32, 16, 577, 64),
    ("ViT-H/14 b128", 128, 16, 257, 80),
    ("CLIP ViT-L/14 b32", 32, 16, 257, 64),
    ("CLIP ViT-L/14 b256", 256, 16, 257, 64),
    ("SigLIP so400m/14@384 b32", 32, 16, 729, 72),
    ("SigLIP so400m/14@384 b128", 128, 16, 729, 72),
    ("DINOv2-L/14 reg4 b32", 32, 16, 261, 64),
    ("DINOv2-L/14 reg4 b256", 256, 16, 261, 64),
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
REPS = {True: dict(warmup=10, rep=40), False: dict(warmup=25, rep=100)}  # do_bench's, by --quick
# worst relative error vs float64 the interpreter check accepts, by dtype (as tests/numerics.py)
CPU_CHECK_SHAPE = (2, 3, 197, 64)  # B, H, N, D: ViT-Ti/16, 3 heads of 64 (the interpreter check)
CPU_TIMING_SHAPE = (8, 197, 384, 6)  # B, N, dim, heads: ViT-S/16, batch 8 (the CPU timings)
CPU_CHECK_BOUND = {torch.float32: 1e-5, torch.float16: 1e-2}
OPTIONS = {"--quick": "fewer shapes and repetitions", "--sweep": "time kernel tile configs and print the best"}
NOT_MEASURED = ("attention timings not measured; checking the Triton kernels under the interpreter and timing the "
                "CPU paths instead")


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


def attention_peers():
    """name -> harness.Peer timing fn(q, k, v) on [B, H, N, D] in each mode (an SDPA backend forced by its context)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def peer(fn, context=None):
        return harness.Peer(lambda qkv, mode: harness.autograd_mode(mode, fn, qkv), context)

    peers = {"vit_fast": peer(VF.attention)}
    for name, backend in (("sdpa flash", SDPBackend.FLASH_ATTENTION), ("sdpa efficient", SDPBackend.EFFICIENT_ATTENTION),
                          ("sdpa cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa math", SDPBackend.MATH)):
        peers[name] = peer(F.scaled_dot_product_attention, lambda b=backend: sdpa_kernel(b))
    peers["eager softmax(QK^T)V"] = peer(reference.attention)
    try:
        from flash_attn import flash_attn_func

        peers["flash_attn"] = peer(lambda q, k, v: flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2))
    except ImportError:
        pass
    return peers


def attention_flops(case, mode):
    B, H, N, D = case["dims"]
    return {"fwd": 1, "bwd": 2.5, "fwd+bwd": 3.5}[mode] * 4 * B * H * N * N * D


def bench_attention(shapes, quick):
    cases = [{"shape": f"{name} [{B},{H},{N},{D}]", "dims": (B, H, N, D)} for name, B, H, N, D in shapes]
    return harness.run_benchmark(
        "attention", cases, attention_peers(), harness.MODES, flops=attention_flops, measure=("host_ms", "peak_mib"),
        setup=lambda case: [torch.randn(*case["dims"], device=harness.DEVICE, dtype=torch.bfloat16,
                                        requires_grad=True) for _ in range(3)],
        ratios={"vs_best_sdpa": lambda impl: impl.startswith("sdpa")}, reps=REPS[quick], write=False,
        columns=["shape", "impl", "mode", "ms", "min_ms", "max_ms", "tflops", "pct_peak", "peak_mib", "host_ms",
                 "vs_best_sdpa", "graph_ms", "graph_pct_peak", "graph_vs_best_sdpa", "error"],
        title="attention, bf16 (vs_best_sdpa > 1: faster than every SDPA backend; host_ms ~ ms: launch-bound; "
              "graph_*: kernels alone, replayed from a CUDA graph)")


def bench_module(quick):
    B, N, dim, heads = MODULE_SHAPE
    timm_style = TimmStyleAttention(dim, heads).to(harness.DEVICE, torch.bfloat16)
    fused = Attention(dim, heads, qkv_bias=True).to(harness.DEVICE, torch.bfloat16)
    fused.load_state_dict(timm_style.state_dict())
    modules = {"timm-style eager": timm_style, "timm-style torch.compile": torch.compile(timm_style),
               "vit_fast.nn.Attention": fused}
    if not quick:
        modules["vit_fast.nn.Attention torch.compile"] = torch.compile(fused)

    def peer(module):
        def make(x, mode):
            dy = torch.randn_like(x)
            fn = (lambda: module(x)) if mode == "fwd" else (lambda: module(x).backward(dy))
            fn()  # compile / warm up
            return fn
        return make

    attn_flops = 4 * B * heads * N * N * (dim // heads)
    linear_flops = 2 * B * N * dim * 4 * dim  # qkv (3 dim) + proj (dim)
    flops = {"fwd": attn_flops + linear_flops, "fwd+bwd": 3.5 * attn_flops + 3 * linear_flops}
    return harness.run_benchmark(
        "attention", [{"shape": f"module [{B},{N},{dim}] h{heads}"}], {impl: peer(m) for impl, m in modules.items()},
        ("fwd", "fwd+bwd"), flops=lambda case, mode: flops[mode], measure=("peak_mib",), reps=REPS[quick],
        setup=lambda case: torch.randn(B, N, dim, device=harness.DEVICE, dtype=torch.bfloat16, requires_grad=True),
        ratios={"vs_best_timm": lambda impl: impl.startswith("timm")}, write=False,
        columns=["shape", "impl", "mode", "ms", "min_ms", "max_ms", "tflops", "pct_peak", "peak_mib", "vs_best_timm",
                 "graph_ms", "graph_vs_best_timm", "error"],
        title="Attention module, bf16 (vs_best_timm > 1: faster than timm-style eager and compiled)")


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


def sweep(args=None):
    """Times kernel configs (coordinate descent for the backward) and prints the best per shape."""
    fwd_cands, dkdv_cands, dq_cands, single_cands = _sweep_candidates()
    for name, B, H, N, D in SWEEP_SHAPES:
        q, k, v, do = (torch.randn(B, H, N, D, device=harness.DEVICE, dtype=torch.bfloat16) for _ in range(4))
        o, lse = torch.empty_like(q), torch.empty(B, H, N, device=harness.DEVICE)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        scale = D**-0.5
        flops = 4 * B * H * N * N * D

        def best(label, candidates, launch):  # {config: median ms} of the ones that ran, and the fastest
            times = {c: harness.time_config(f"{label} {c}", launch(c)) for c in candidates}
            times = {c: stats["ms"] for c, stats in times.items() if stats is not None}
            return times, (min(times, key=times.get) if times else None)

        def bwd(cfgs):
            return lambda: kernels.attention_bwd(do, q, k, v, o, lse, dq, dk, dv, scale, cfgs)

        print(f"\n== sweep {name} [{B},{H},{N},{D}] bf16 ==")
        fwd, best_fwd = best("fwd", fwd_cands, lambda c: lambda: kernels.attention_fwd(q, k, v, o, lse, scale, c))
        kernels.attention_fwd(q, k, v, o, lse, scale)
        dq_default = kernels.config("dq", D, torch.bfloat16)
        _, best_dkdv = best("bwd dq default + dkdv", dkdv_cands, lambda c: bwd((c, dq_default)))
        dqs, best_dq = best("bwd dkdv best + dq", dq_cands, lambda c: bwd((best_dkdv or kernels.config(
            "dkdv", D, torch.bfloat16), c)))
        singles, best_single = best("bwd single pass", [c for c in single_cands if N <= c.block_n],
                                    lambda c: bwd((c, None)))
        if None in (best_fwd, best_dkdv, best_dq):
            print("no candidate ran")
            continue
        show = lambda c: f"Config{tuple(c)}"  # noqa: E731  as written in kernels/attention.py's table
        bd = kernels.block_d(D)
        print(f"best fwd    {show(best_fwd)}: {fwd[best_fwd]:.4f} ms = {flops / fwd[best_fwd] / 1e9:.0f} TFLOP/s")
        print(f"best bwd    {show(best_dkdv)} + {show(best_dq)}: {dqs[best_dq]:.4f} ms")
        print(f'table rows: ("fwd", {bd}): {show(best_fwd)}, ("dkdv", {bd}): {show(best_dkdv)}, '
              f'("dq", {bd}): {show(best_dq)}')
        if best_single is not None:
            faster = singles[best_single] < dqs[best_dq]
            print(f"best single {show(best_single)}: {singles[best_single]:.4f} ms, "
                  f"{'faster' if faster else 'slower'} than two passes"
                  + (f": SINGLE_PASS_CONFIGS[{bd}] = {show(best_single)}" if faster else ""))


def run_gpu(args):
    if args.sweep:
        return sweep(args)
    print(f"{harness.device_name()}: measured bf16 matmul peak {harness.ceilings()['matmul_tflops']:.0f} TFLOP/s")
    shapes = [s for s in SHAPES if s[0] in QUICK] if args.quick else SHAPES
    rows = bench_attention(shapes, args.quick) + bench_module(args.quick)
    out_dir = harness.write_results("attention", rows, plot_key="tflops", label_keys=("shape", "impl", "mode"))
    print(f"\nresults written to {out_dir}")


# ----------------------------------------------------------------------------- CPU


def run_cpu(args=None):
    """Kernels under the interpreter vs float64 on a small ViT shape; CPU timings of the PyTorch paths."""
    B, H, N, D = CPU_CHECK_SHAPE
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
            err = harness.rel_err(got, want)
            rows.append(dict(check=f"interpreter {str(dtype)[6:]} {name}", rel_err_vs_fp64=f"{err:.1e}",
                             bound=f"{CPU_CHECK_BOUND[dtype]:.0e}"))
            assert err <= CPU_CHECK_BOUND[dtype], f"attention kernels: {dtype} {name} rel err {err:.2e}"
    harness.print_table(rows, title=f"Triton kernels under the interpreter, [{B},{H},{N},{D}], vs float64")

    os.environ[dispatch.FORCE_TORCH_ENV] = "1"  # time vit_fast's CPU path (PyTorch), not the interpreter
    torch.manual_seed(0)
    Bm, Nm, dim, heads = CPU_TIMING_SHAPE
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
        harness.cpu_timings(cases, f"CPU forward, fp32, {torch.get_num_threads()} threads (PyTorch paths)")


def main(argv=None):
    harness.main(argv, __doc__.splitlines()[0], OPTIONS, run_gpu, run_cpu, NOT_MEASURED)


if __name__ == "__main__":
    main()
