"""What every benchmark shares: the command line, the device's measured ceilings, timing, the table and the files.

`run_benchmark(op, cases, peers, modes, flops=..., nbytes=...)` owns the loop every benchmark runs:
every case (a shape; a model) x peer (name -> factory of the callable to time) x mode (fwd / bwd /
fwd+bwd; vit.py's batch sizes), each timed with `triton.testing.do_bench` (median, min and max) and
replayed from a CUDA graph (`graph_ms`), as TFLOP/s or GB/s and % of the ceilings measured in the
same run (`ceilings()`), with ratios to named peers; it prints the table and writes
`benchmarks/results/<device>/<op>.json` (stamped with `stamp()`: commit, dirty, device, date,
versions), `.csv` (each row with the commit) and a PNG bar chart (`write_results`). Rows that are
not one op's timing go through the same loop: a peer that measures itself returns `Samples` (a
data loader, a whole training run), `timer` swaps do_bench for `bench_cpu_stats` where the CPU is
what is measured, measure="peak_gib" adds the allocator's peaks of a whole row (weights, optimizer
state and graph pools in). The attention and layer_norm launch-config sweeps build their rows
themselves (`time_config`) and use `print_table` and `write_results`.
All GPU work goes through this module's functions (`bench_stats`, `bench_graph_stats`,
`graph_ms_or_none`, `host_ms`, `peak_memory_mib`, `reset_peak_memory`, `peak_memory_gib`,
`profile_kernels`, `ceilings`, `sync`) and tensors are made on `DEVICE`, so a test can run a
benchmark's GPU path on the CPU by replacing those (tests/test_benchmarks.py).
"""
import argparse
import contextlib
import csv
import datetime
import json
import os
import platform
import subprocess
import time
from typing import Callable, NamedTuple, Optional

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DEVICE = "cuda"  # where the GPU paths make their tensors (a test sets "cpu")


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


def bench_graph_stats(fn, warmup=25, rep=100) -> dict:
    """min, median and max milliseconds (`bench_stats`) of `fn`'s kernels replayed from a captured CUDA graph.

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
        return bench_stats(graph.replay, warmup=warmup, rep=rep)
    finally:
        del graph
        torch.cuda.empty_cache()


def graph_ms_or_none(label, fn, warmup=25, rep=100):
    """The median of `bench_graph_stats`, or None (said once, with the reason) when `fn` cannot be captured."""
    try:
        return bench_graph_stats(fn, warmup=warmup, rep=rep)["ms"]
    except Exception as e:  # e.g. a peer with a host sync: its eager time still stands
        print(f"{label}: no CUDA-graph time ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"[:200])
        torch.cuda.synchronize()
        return None


def summarize_ms(samples) -> dict:
    """min, median and max of per-call milliseconds, as `bench_stats` reports them."""
    ordered = sorted(samples)
    return {"min_ms": ordered[0], "ms": ordered[len(ordered) // 2], "max_ms": ordered[-1]}


def bench_cpu_stats(fn, reps=5) -> dict:
    """min, median and max wall-clock milliseconds of `fn()` on the CPU, after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return summarize_ms(times)


def sync():
    torch.cuda.synchronize()


def sm_count() -> int:
    return torch.cuda.get_device_properties(0).multi_processor_count


def free():
    """Drop cached GPU memory between cases (a no-op without CUDA)."""
    torch.cuda.empty_cache()


def host_ms(fn, calls=20) -> float:
    """Host milliseconds per call to enqueue `fn` (no sync inside the loop; 20 calls stay far below the
    launch-queue depth). do_bench times each call between events with no sync, so a row whose host_ms
    reaches its ms is launch-bound: it measures Python + launch overhead, not the kernels."""
    fn()
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - start) / calls * 1e3
    sync()
    return host


def time_config(label, fn, warmup=25, rep=100):
    """A sweep candidate's kernels alone (CUDA-graph replay: launch cost is no config's) as
    `bench_graph_stats`, or None, said, when it does not compile or fit (out of shared memory, registers)."""
    try:
        stats = bench_graph_stats(fn, warmup=warmup, rep=rep)
    except Exception as e:
        print(f"  {label}: failed ({type(e).__name__})")
        return None
    print(f"  {label}: {stats['ms']:.4f} ms (min {stats['min_ms']:.4f}, max {stats['max_ms']:.4f})")
    return stats


def rel_err(got, want) -> float:
    """||got - want|| / ||want|| in float64."""
    want = want.double()
    return ((got.double() - want).norm() / want.norm()).item()


def cpu_ms_columns(fn, reps=5) -> dict:
    """cpu_min_ms, cpu_ms (median) and cpu_max_ms of `fn()` on the CPU (`bench_cpu_stats`), rounded."""
    stats = bench_cpu_stats(fn, reps)
    return {"cpu_min_ms": round(stats["min_ms"], 3), "cpu_ms": round(stats["ms"], 3),
            "cpu_max_ms": round(stats["max_ms"], 3)}


def cpu_timings(cases, title, key="impl") -> list:
    """[{key: name, cpu_min_ms, cpu_ms, cpu_max_ms}] of (name, fn) cases (`cpu_ms_columns`), printed under `title`."""
    rows = [{key: name, **cpu_ms_columns(fn)} for name, fn in cases]
    print_table(rows, title=title)
    return rows


def main(argv, description, options, gpu, cpu, missing):
    """A benchmark's command line, then `gpu(args)` on a CUDA machine; else says what was not measured
    (`missing`) and runs `cpu(args)`. options: {flag: help} for an on/off flag, {flag: add_argument
    keywords} for the others; `description` is printed as written."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, spec in options.items():
        parser.add_argument(flag, **({"action": "store_true", "help": spec} if isinstance(spec, str) else spec))
    args = parser.parse_args(argv)
    if has_gpu():
        return gpu(args)
    print(f"no CUDA GPU: {missing}")
    return cpu(args)


def peak_memory_mib(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def reset_peak_memory():
    """Start a row's allocator peaks from what is allocated now (cached free blocks returned first)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def peak_memory_gib() -> dict:
    """The allocator's peaks since `reset_peak_memory()`: most allocated and most reserved, GiB."""
    torch.cuda.synchronize()
    return {"peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "reserved_gib": torch.cuda.max_memory_reserved() / 2**30}


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
    CSV (each row stamped with the commit and the dirty flag: a CSV has no header block); a PNG of
    `plot_key` if matplotlib is there."""
    out_dir = os.path.join(RESULTS_DIR, device_slug())
    os.makedirs(out_dir, exist_ok=True)
    meta = stamp()
    if has_gpu():
        meta["ceilings"] = ceilings()
    with open(os.path.join(out_dir, f"{op}.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows, **(extra or {})}, f, indent=1)
    stamped = [{**r, "commit": meta["commit"], "dirty": meta["dirty"]} for r in rows]
    columns = sorted({c for r in stamped for c in r}, key=lambda c: min(list(r).index(c) for r in stamped if c in r))
    with open(os.path.join(out_dir, f"{op}.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(stamped)
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


# ----------------------------------------------------------------------------- the shared loop

MODES = ("fwd", "bwd", "fwd+bwd")


class Peer(NamedTuple):
    """make(inputs, mode) -> the zero-arg callable to time, or None where the peer has no such mode;
    context() -> a context manager held while it is built and timed (e.g. an SDPA backend)."""
    make: Callable
    context: Optional[Callable] = None


def as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def autograd_mode(mode, fn, inputs, grads=None, no_grad_fwd=False):
    """The callable timing `mode` of `fn(*inputs)`, differentiated w.r.t. the inputs that require grad:
    "fwd" (autograd recording, or under no_grad with no_grad_fwd), "bwd" (the backward alone: one
    forward kept, retain_graph), "fwd+bwd". grads: the outputs' gradients (default: randn like them)."""
    if mode == "fwd":
        if not no_grad_fwd:
            return lambda: fn(*inputs)

        def forward():
            with torch.no_grad():
                return fn(*inputs)
        return forward
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    outs = as_tuple(fn(*inputs))
    grads = list(grads) if grads is not None else [torch.randn_like(o) for o in outs]
    if mode == "bwd":
        return lambda: torch.autograd.grad(outs, leaves, grads, retain_graph=True)
    if mode == "fwd+bwd":
        return lambda: torch.autograd.grad(as_tuple(fn(*inputs)), leaves, grads)
    raise ValueError(f"mode {mode!r}: expected one of {MODES}")


def _round(row):
    digits = {"ms": 4, "min_ms": 4, "max_ms": 4, "graph_ms": 4, "host_ms": 4, "peak_mib": 1, "peak_gib": 3,
              "reserved_gib": 3, "tflops": 1, "graph_tflops": 1, "gbps": 0, "graph_gbps": 0}
    for key, value in row.items():
        if isinstance(value, float):
            row[key] = round(value, digits.get(key, 1 if "pct" in key else 3))
    return row


class Samples(NamedTuple):
    """What a peer that times itself returns instead of a callable: its per-call milliseconds (e.g. a
    data loader's batches, a training run's epochs as ms per step), summarized as min / median / max."""
    ms: list


def _measure(label, fn, timer, reps, measure, graph):
    """ms (median), min_ms, max_ms from `timer`; graph_ms (None: not capturable) where `graph`; host_ms,
    peak_mib, peak_gib (the row's allocator peaks, make included) if asked."""
    if isinstance(fn, Samples):
        return summarize_ms(fn.ms)
    found = timer(fn, **reps)
    if graph:
        found["graph_ms"] = graph_ms_or_none(label, fn, **reps)
    if "host_ms" in measure:
        found["host_ms"] = host_ms(fn)
    if "peak_mib" in measure:
        found["peak_mib"] = peak_memory_mib(fn)
    if "peak_gib" in measure:
        found.update(peak_memory_gib())
    return found


def _timed_row(row, label, peer, inputs, mode, timer, reps, measure, graph):
    """`row` with the measurement of `peer` in `mode`, or None where the peer has no such mode; the
    callable is dropped on return, before the next peer builds (its memory is not the next row's)."""
    try:
        with peer.context() if peer.context else contextlib.nullcontext():
            if "peak_gib" in measure:
                reset_peak_memory()
            fn = peer.make(inputs, mode)
            if fn is None:
                return None
            row.update(_measure(label, fn, timer, reps, measure, graph))
    except Exception as e:  # a peer that refuses the shape, or runs out of memory: said, not fatal
        message = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:160]
        print(f"  {label}: n/a ({message})", flush=True)
        row.update(ms="n/a", error=message, **({"graph_ms": "n/a"} if graph else {}))
        sync()
        return row
    said = f"  {label}: {row['ms']:.4f} ms (min {row['min_ms']:.4f}, max {row['max_ms']:.4f})"
    if graph:
        row["graph_ms"] = "n/a" if row.get("graph_ms") is None else row["graph_ms"]
        said += ", graph " + (f"{row['graph_ms']:.4f} ms" if isinstance(row["graph_ms"], float) else row["graph_ms"])
    print(said, flush=True)
    return row


def _throughput(row, work, ceiling, unit, pct):
    """unit (TFLOP/s or GB/s) and % of the ceiling, as called and as kernels alone (graph_*)."""
    for prefix in ("", "graph_"):
        ms = row.get(prefix + "ms")
        if isinstance(ms, float) and ms > 0 and work:
            rate = work / ms / (1e9 if unit == "tflops" else 1e6)
            row[prefix + unit] = rate
            if ceiling:
                row[prefix + pct] = 100 * rate / ceiling


def add_ratios(rows, ratios, group=("shape", "mode")):
    """For each (name, is_base) in `ratios`: row[name] = fastest base row's ms / the row's ms in the same
    `group` (> 1: faster than every base), and graph_<name> the same on graph_ms; "n/a" without a base."""
    groups = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in group), []).append(r)
    for name, is_base in ratios.items():
        for members in groups.values():
            for key, out in (("ms", name), ("graph_ms", "graph_" + name)):
                timed = [r for r in members if isinstance(r.get(key), float)]
                base = [r[key] for r in timed if is_base(r["impl"])]
                for r in timed:
                    r[out] = min(base) / r[key] if base else "n/a"
    return rows


def run_benchmark(op, cases, peers, modes=MODES, *, setup=None, flops=None, nbytes=None, ratios=None,
                  measure=(), reps=None, derive=None, relate=None, limit_row=False, after_case=None, columns=None,
                  title=None, write=True, plot_key=None, label_keys=("shape", "impl", "mode"), extra=None,
                  mode_key="mode", graph=True, timer=None):
    """Every case x peer x mode, timed, as rows; printed as a table and (write=True) written as `op`'s files.

    cases: dicts with "shape" (the row's label; optional) and "columns" (a dict of more leading columns
      of each of the case's rows), "modes" and "reps" (the case's own, instead of `modes` / `reps`) and
      whatever `setup` and the peers read. setup(case) -> the inputs handed to the peers, made once per
      case (freed after it); default: the case itself.
    peers: {name: Peer or make(inputs, mode)}, or a function case -> that dict; make returns the
      callable to time, None (no such mode), or `Samples` it measured itself.
    modes: the third axis, in the column `mode_key` (e.g. vit.py's batch sizes under "batch").
    flops / nbytes: (case, mode) -> the work of one call (or None): tflops and pct_peak of the matmul
      ceiling, gbps and pct_copy of the copy ceiling, and graph_* of the same on graph_ms.
    ratios: {column: impl -> bool}: the fastest such peer's time / each row's (`add_ratios`).
    measure: also "host_ms" (`host_ms`), "peak_mib" (`peak_memory_mib`), "peak_gib" (`peak_memory_gib`
      of the whole row, reset before make). reps: the timer's keywords (do_bench's warmup / rep).
    graph: also time each callable replayed from a CUDA graph (graph_ms). timer: fn -> min_ms / ms /
      max_ms; default `bench_stats` (do_bench), `bench_cpu_stats` where the CPU is what is timed.
    derive(case, mode, row) -> more columns of a timed row; relate(case_rows): columns relating a
      case's rows to each other, set in place after the ratios. limit_row: a "bytes-moved limit" row
      per case and mode with nbytes: the time at copy bandwidth. after_case(case): cleanup hook.
    A peer or mode that fails is a row with ms "n/a" and its error, said when it happens.
    Returns the rows.
    """
    timer = timer or bench_stats
    ceil = ceilings() if flops or nbytes else {}
    rows = []
    for case in cases:
        inputs = setup(case) if setup else case
        case_peers = peers(case) if callable(peers) else peers
        case_modes, case_reps = case.get("modes", modes), case.get("reps", reps or {})
        leading = {**({"shape": case["shape"]} if "shape" in case else {}), **case.get("columns", {})}
        case_rows = []
        for impl, peer in case_peers.items():
            peer = peer if isinstance(peer, Peer) else Peer(peer)
            for mode in case_modes:
                label = " ".join(str(v) for v in (*leading.values(), impl, mode))
                row = _timed_row({**leading, "impl": impl, mode_key: mode}, label, peer, inputs, mode, timer,
                                 case_reps, measure, graph)
                if row is not None:
                    case_rows.append(row)
        if limit_row and nbytes and ceil:
            for mode in case_modes:
                work = nbytes(case, mode)
                if work and any(r[mode_key] == mode for r in case_rows):
                    case_rows.append({**leading, "impl": "bytes-moved limit", mode_key: mode,
                                      "ms": work / ceil["copy_gbps"] / 1e6})
        for row in case_rows:
            if not isinstance(row.get("ms"), float):
                continue
            if flops:
                _throughput(row, flops(case, row[mode_key]), ceil.get("matmul_tflops"), "tflops", "pct_peak")
            if nbytes:
                _throughput(row, nbytes(case, row[mode_key]), ceil.get("copy_gbps"), "gbps", "pct_copy")
            if derive:
                row.update(derive(case, row[mode_key], row))
        add_ratios(case_rows, ratios or {}, group=(mode_key,))
        if relate:
            relate(case_rows)
        rows += [_round(r) for r in case_rows]
        del inputs
        if after_case:
            after_case(case)
        free()
    print_table(rows, columns and [c for c in columns if any(c in r for r in rows)], title)
    if write:
        print("results in", write_results(op, rows, plot_key=plot_key, label_keys=label_keys, extra=extra))
    return rows
