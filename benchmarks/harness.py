"""What every benchmark shares: the device's measured ceilings, timing, the table and the files.

Each `benchmarks/<op>.py` builds rows (dicts), prints them with `print_table` and saves them with
`write_results`, which writes `benchmarks/results/<device>/<op>.json`, `.csv` and a PNG bar chart.
"""
import csv
import datetime
import json
import os
import platform
import subprocess

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def has_gpu() -> bool:
    return torch.cuda.is_available()


def device_name() -> str:
    return torch.cuda.get_device_name() if has_gpu() else f"CPU ({platform.processor() or platform.machine()})"


def device_slug() -> str:
    return "".join(c if c.isalnum() else "-" for c in device_name()).strip("-").lower()


def environment() -> dict:
    info = {"device": device_name(), "date": datetime.date.today().isoformat(), "torch": torch.__version__}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def _git(*args):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def stamp() -> dict:
    """Where a result came from: `environment()` plus the commit (`git rev-parse --short HEAD`),
    `dirty` (tracked files changed since that commit: the numbers may not be the commit's), the
    UTC time, the CUDA version torch was built with and the host's Python."""
    info = environment()
    commit = _git("rev-parse", "--short", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    info.update(commit=commit, dirty=None if status is None else bool(status),
                time_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                cuda=torch.version.cuda, python=platform.python_version())
    return info


def bench_ms(fn, warmup=25, rep=100) -> float:
    """Median milliseconds of `fn()` on the GPU (triton.testing.do_bench: CUDA events, L2 flushed)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def bench_stats(fn, warmup=25, rep=100) -> dict:
    """min, median and max milliseconds of `fn()` on the GPU, from one do_bench run (its quantiles)."""
    from triton.testing import do_bench

    lo, mid, hi = do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.0, 0.5, 1.0])
    return {"min_ms": lo, "ms": mid, "max_ms": hi}


def kernel_summary(kernels, wall_us, host_us, top=15) -> dict:
    """Device-time breakdown of one call from its kernels' (name, start_us, end_us) intervals.

    busy_us: the union of the kernel intervals (time the device ran anything); span_us: first
    kernel start to last kernel end; gaps_us = span - busy, the device idle between kernels;
    wall_us: the call as the caller saw it, synchronized; host_us: the call's own Python/launch time
    (no sync: how long the host took to enqueue it). Top kernels by summed device time.
    """
    kernels = sorted((s, e, n) for n, s, e in kernels)
    busy, span, end = 0.0, 0.0, None
    for s, e, _ in kernels:
        if end is None or s > end:
            busy += e - s
            end = e
        elif e > end:
            busy += e - end
            end = e
    if kernels:
        span = max(e for _, e, _ in kernels) - kernels[0][0]
    by_name = {}
    for s, e, n in kernels:
        total, count = by_name.get(n, (0.0, 0))
        by_name[n] = (total + e - s, count + 1)
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][0])
    return {"kernels": len(kernels), "busy_us": busy, "span_us": span, "gaps_us": span - busy, "wall_us": wall_us,
            "host_us": host_us,
            "top": [{"name": n[:120], "us": t, "calls": c, "pct_busy": 100 * t / busy if busy else 0.0}
                    for n, (t, c) in ranked[:top]]}


def profile_kernels(fn, top=15) -> dict:
    """`kernel_summary` of one `fn()` on the GPU under torch.profiler (warm: call `fn` before)."""
    import time

    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        fn()
        host_us = (time.perf_counter() - t0) * 1e6
        torch.cuda.synchronize()
        wall_us = (time.perf_counter() - t0) * 1e6
    kernels = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
               if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    summary = kernel_summary(kernels, wall_us, host_us, top)
    summary["note"] = "host_us and wall_us include the profiler's own overhead"
    return summary


def bench_graph_ms(fn, warmup=25, rep=100) -> float:
    """Median milliseconds of `fn`'s kernels replayed from a captured CUDA graph.

    `bench_ms` times what a caller sees, host launch path included: where that path is longer than
    the kernels (small ops, autograd), the GPU idles between launches and the row times Python.
    Replaying a graph leaves one launch per call, so this is the device time of the kernels (L2
    still flushed between calls). `fn` must be capturable: no host syncs, no CPU-side results.
    Raises whatever the capture raises; callers report it and go on.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream (lazy inits, autotuning, compiles)
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
        return bench_ms(graph.replay, warmup=warmup, rep=rep)
    finally:
        del graph
        torch.cuda.empty_cache()


def graph_ms_or_none(label, fn, warmup=25, rep=100):
    """`bench_graph_ms`, or None (said once, with the reason) when `fn` cannot be captured."""
    try:
        return bench_graph_ms(fn, warmup=warmup, rep=rep)
    except Exception as e:  # e.g. a peer with a host sync: its eager time still stands
        print(f"{label}: no CUDA-graph time ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"[:200])
        torch.cuda.synchronize()
        return None


def bench_cpu_ms(fn, reps=5) -> float:
    """Median wall-clock milliseconds on the CPU, after one warm-up call."""
    import time

    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def peak_memory_mib(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


_CEILINGS = {}


def ceilings() -> dict:
    """The device's bf16 matmul TFLOP/s (8192^3) and copy GB/s (bytes read + written), measured now."""
    if not _CEILINGS:
        n = 8192
        a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        ms = bench_ms(lambda: a @ b)
        src = torch.randn(256 * 2**20, device="cuda", dtype=torch.float32)  # 1 GiB
        dst = torch.empty_like(src)
        copy_ms = bench_ms(lambda: dst.copy_(src))
        _CEILINGS["matmul_tflops"] = 2 * n**3 / ms / 1e9
        _CEILINGS["copy_gbps"] = 2 * src.numel() * 4 / copy_ms / 1e6
        del a, b, src, dst
        torch.cuda.empty_cache()
    return dict(_CEILINGS)


def print_table(rows, columns=None, title=None):
    if not rows:
        return
    columns = columns or list(rows[0])
    fmt = [lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)]
    cells = [[fmt[0](r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    if title:
        print(f"\n{title}")
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def write_results(op: str, rows, plot_key=None, label_keys=("shape", "impl"), extra=None):
    """Save rows as JSON (with `stamp()`, the ceilings and `extra`, a dict of more top-level entries) and
    CSV; a PNG of `plot_key` if matplotlib is there."""
    out_dir = os.path.join(RESULTS_DIR, device_slug())
    os.makedirs(out_dir, exist_ok=True)
    meta = stamp()
    if has_gpu():
        meta["ceilings"] = ceilings()
    with open(os.path.join(out_dir, f"{op}.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows, **(extra or {})}, f, indent=1)
    columns = sorted({c for r in rows for c in r}, key=lambda c: min(list(r).index(c) for r in rows if c in r))
    with open(os.path.join(out_dir, f"{op}.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    if plot_key:
        _plot(os.path.join(out_dir, f"{op}.png"), op, rows, plot_key, label_keys, meta["device"])
    return out_dir


def _plot(path, op, rows, key, label_keys, device):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [r for r in rows if isinstance(r.get(key), (int, float))]
    if not rows:
        return
    labels = [" ".join(str(r.get(k, "")) for k in label_keys) for r in rows]
    fig, ax = plt.subplots(figsize=(10, max(3, 0.28 * len(rows))))
    ax.barh(range(len(rows)), [r[key] for r in rows])
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(key)
    ax.set_title(f"{op} on {device}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
