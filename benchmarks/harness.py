"""What every benchmark shares: the device's measured ceilings, timing, the table and the files.

Each `benchmarks/<op>.py` builds rows (dicts), prints them with `print_table` and saves them with
`write_results`, which writes `benchmarks/results/<device>/<op>.json`, `.csv` and a PNG bar chart.
"""
import csv
import datetime
import json
import os
import platform

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


def bench_ms(fn, warmup=25, rep=100) -> float:
    """Median milliseconds of `fn()` on the GPU (triton.testing.do_bench: CUDA events, L2 flushed)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


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


def write_results(op: str, rows, plot_key=None, label_keys=("shape", "impl")):
    """Save rows as JSON (with environment and ceilings) and CSV; a PNG of `plot_key` if matplotlib is there."""
    out_dir = os.path.join(RESULTS_DIR, device_slug())
    os.makedirs(out_dir, exist_ok=True)
    meta = environment()
    if has_gpu():
        meta["ceilings"] = ceilings()
    with open(os.path.join(out_dir, f"{op}.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
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
