"""LayerNorm and residual-add + LayerNorm at ViT shapes [B*N, C], against the peers.

    python benchmarks/layer_norm.py             # 4 widths x bf16, fp32; every peer
    python benchmarks/layer_norm.py --quick     # bf16; torch.compile peers at ViT-B only (short lease)
    python benchmarks/layer_norm.py --sweep [--widths 384,768,1024,1280] [--sweep-kinds fwd,bwd,residual]
                                               # launch configs (default C = 768 bf16): the forward and
                                               # backward at [rows of SHAPES, C], and the residual
                                               # forward (add + LN) at [50432, C]

Peers in the same run: F.layer_norm (eager), torch.compile(F.layer_norm), Liger-Kernel and apex
when importable; for add + LN: eager add then F.layer_norm, torch.compile of the same, and
vit_fast's own add then layer_norm (unfused). Modes: forward (no autograd), backward alone (a
retained graph), forward + backward. GB/s count the bytes that must move (forward: read x, write
y; backward: read x and dy, write dx; add + LN reads x and residual and writes y and s, its
backward reads dy, ds and s and writes the one gradient of x and residual; weight and bias and
their gradients once; the fp32 mean / rstd, 8 bytes a row, are not counted), as % of the
device's measured copy bandwidth. Each mode is timed twice: `ms` as called (Python, autograd and
launches included: what an eager caller sees) and `graph_ms` replayed from a CUDA graph (the kernels
alone, which the bandwidth goals are about); where the two differ, the row is launch-bound.
The residual sweep (add_layer_norm's forward: reads x and residual, writes y and s) times every
launch config at ViT b256's 50432 rows per width, judged on graph_ms against copy bandwidth
(bytes = 2 reads + 2 writes per element, in the dtype; target >= 85% of copy) and against add then
LayerNorm unfused (eager, torch.compile, vit_fast's layer_norm after a torch add); the best config
per width goes to layer_norm_residual_sweep.json ("best") for kernels/layer_norm.py's table. The
loop, timing (median, min, max), table and files (benchmarks/results/<device>/, stamped) are
harness.run_benchmark's.
Without a GPU: says so, checks the kernels under Triton's interpreter, times the CPU PyTorch path
(no files written), exits 0.
"""
import functools
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
from vit_fast.kernels import layer_norm as kernels  # noqa: E402

EPS = 1e-6
# (name, rows = batch * tokens, C): the shapes the goals are set at
SHAPES = [("ViT-S b256", 256 * 197, 384), ("ViT-B b256", 256 * 197, 768),
          ("ViT-L b128", 128 * 197, 1024), ("ViT-H/14 b128", 128 * 257, 1280)]
COMPILE_PEERS_QUICK = "ViT-B b256"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# The goals at [50432, 768] bf16: LN forward >= 85% of copy, backward >= 70%, fwd+bwd <= 0.21 ms
# (2x F.layer_norm); add_layer_norm <= 0.110 ms (torch.compile's) and at most 4/5 of eager add + LN
# (it moves 4 tensors to eager's 5).
TARGET_FWD_PCT, TARGET_BWD_PCT, TARGET_FWD_BWD_MS, TARGET_ADD_LN_MS = 85.0, 70.0, 0.21, 0.110
TARGET_SHAPE = "ViT-B b256"  # the shape those goals are judged at
RESIDUAL_ROWS = 197 * 256  # ViT b256's rows, at every width of the residual sweep
TARGET_RESIDUAL_PCT = 85.0  # of copy, graph_ms, at every width; and faster than every unfused add + LN
UNFUSED = ("eager add + F.layer_norm", "torch.compile(add + F.layer_norm)", "vit_fast add + layer_norm (unfused)")
CPU_CHECK_SHAPE, CPU_TIMING_ROWS = (2, 197, 768), 8 * 197  # the no-GPU check and CPU timing
EAGER = ("F.layer_norm", "eager add + F.layer_norm")  # vs_eager's base, per op
OPTIONS = {
    "--quick": "bf16 only; torch.compile peers at ViT-B only", "--sweep": "launch-config sweep of the kernels",
    "--widths": dict(default="768", help="widths C for --sweep, comma-separated (default 768)"),
    "--sweep-kinds": dict(default="fwd,bwd,residual", help="which kernels --sweep times: fwd, bwd, residual "
                                                           "(add + LN forward), comma-separated")}
NOT_MEASURED = ("LayerNorm / add + LayerNorm GPU timings not measured; checking the kernels under Triton's "
                "interpreter instead")


def layer_norm_peers(C, compile_peers):
    peers = {"vit_fast": lambda x, w, b: VF.layer_norm(x, w, b, EPS),
             "F.layer_norm": lambda x, w, b: F.layer_norm(x, (C,), w, b, EPS)}
    if compile_peers:
        peers["torch.compile(F.layer_norm)"] = torch.compile(peers["F.layer_norm"], dynamic=False)
    try:
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction

        peers["Liger-Kernel"] = lambda x, w, b: LigerLayerNormFunction.apply(x, w, b, EPS)
    except ImportError:
        pass
    try:
        from apex.normalization.fused_layer_norm import fused_layer_norm_affine

        peers["apex"] = lambda x, w, b: fused_layer_norm_affine(x, w, b, (C,), EPS)
    except ImportError:
        pass
    return peers


def add_layer_norm_peers(C, compile_peers):
    def add_then_ln(x, r, w, b):
        s = x + r
        return F.layer_norm(s, (C,), w, b, EPS), s

    def vit_fast_unfused(x, r, w, b):
        s = x + r
        return VF.layer_norm(s, w, b, EPS), s

    peers = {"vit_fast add_layer_norm": lambda x, r, w, b: VF.add_layer_norm(x, r, w, b, EPS),
             "eager add + F.layer_norm": add_then_ln, "vit_fast add + layer_norm (unfused)": vit_fast_unfused}
    if compile_peers:
        peers["torch.compile(add + F.layer_norm)"] = torch.compile(add_then_ln, dynamic=False)
    return peers


def _peer(fn):
    return lambda inp, mode: harness.autograd_mode(mode, fn, inp["inputs"], inp["grads"], no_grad_fwd=True)


def _setup(case):
    """The case's leaves (x, [residual,] weight, bias; requiring grad) and output gradients."""
    n_rows, C, dtype = case["n_rows"], case["C"], DTYPES[case["columns"]["dtype"]]
    x, r, dy, ds = (torch.randn(n_rows, C, device=harness.DEVICE, dtype=dtype) for _ in range(4))
    w, b = (torch.randn(C, device=harness.DEVICE, dtype=dtype) for _ in range(2))
    inputs = [x, r, w, b] if case["columns"]["op"] == "add_layer_norm" else [x, w, b]
    return {"inputs": [t.requires_grad_() for t in inputs],
            "grads": [dy, ds] if case["columns"]["op"] == "add_layer_norm" else [dy]}


def _peers(case):
    make = layer_norm_peers if case["columns"]["op"] == "layer_norm" else add_layer_norm_peers
    return {impl: _peer(fn) for impl, fn in make(case["C"], case["compile"]).items()}


def _nbytes(case, mode):
    """Bytes that must move (see the module docstring): activations and parameters, in the dtype."""
    es = torch.finfo(DTYPES[case["columns"]["dtype"]]).bits // 8
    act, par = case["n_rows"] * case["C"] * es, case["C"] * es
    fwd, bwd = ((2 * act + 2 * par, 3 * act + 3 * par) if case["columns"]["op"] == "layer_norm"
                else (4 * act + 2 * par, 4 * act + 3 * par))
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def bench(dtypes, quick):
    cases = [{"shape": f"{name} [{n_rows},{C}]", "columns": {"dtype": dtype, "op": op}, "n_rows": n_rows, "C": C,
              "compile": not quick or name == COMPILE_PEERS_QUICK}
             for dtype in dtypes for name, n_rows, C in SHAPES for op in ("layer_norm", "add_layer_norm")]
    return harness.run_benchmark(
        "layer_norm", cases, _peers, harness.MODES, setup=_setup, nbytes=_nbytes,
        ratios={"vs_eager": lambda impl: impl in EAGER}, after_case=lambda case: torch._dynamo.reset(), write=False,
        columns=["shape", "dtype", "op", "impl", "mode", "ms", "min_ms", "max_ms", "gbps", "pct_copy", "vs_eager",
                 "graph_ms", "graph_gbps", "graph_pct_copy", "graph_vs_eager", "error"],
        title="LayerNorm / add + LayerNorm (GB/s of bytes that must move; vs_eager > 1: faster)")


def _timed(row, key):
    return isinstance(row.get(key), float)


def report_targets(rows):
    """The goals at ViT-B [50432, 768] bf16, met or missed, as called (eager, launch path
    included) and as kernels alone (CUDA-graph replay); returned as {timing: [{what, met, goal}]}."""
    pick = {(r["op"], r["mode"], r["impl"]): r for r in rows
            if r["shape"].startswith(TARGET_SHAPE + " [") and r["dtype"] == "bf16"}
    fwd, bwd = pick.get(("layer_norm", "fwd", "vit_fast")), pick.get(("layer_norm", "bwd", "vit_fast"))
    fwd_bwd = pick.get(("layer_norm", "fwd+bwd", "vit_fast"))
    fused = pick.get(("add_layer_norm", "fwd", "vit_fast add_layer_norm"))
    eager = pick.get(("add_layer_norm", "fwd", "eager add + F.layer_norm"))
    if not (fwd and bwd and fwd_bwd and fused and eager):
        return {}
    print(f"\ntargets at {TARGET_SHAPE} bf16:")
    judged = {}
    for timing, prefix in (("as called", ""), ("kernels alone (CUDA graph)", "graph_")):
        ms, pct = prefix + "ms", prefix + "pct_copy"
        if not all(_timed(r, ms) for r in (fwd, bwd, fwd_bwd, fused, eager)):
            print(f"  {timing}: not measured")
            continue
        checks = [(f"LN fwd {fwd[pct]}% of copy", fwd[pct] >= TARGET_FWD_PCT, f">= {TARGET_FWD_PCT}%"),
                  (f"LN bwd {bwd[pct]}% of copy", bwd[pct] >= TARGET_BWD_PCT, f">= {TARGET_BWD_PCT}%"),
                  (f"LN fwd+bwd {fwd_bwd[ms]} ms", fwd_bwd[ms] <= TARGET_FWD_BWD_MS, f"<= {TARGET_FWD_BWD_MS} ms"),
                  (f"add_layer_norm fwd {fused[ms]} ms", fused[ms] <= TARGET_ADD_LN_MS, f"<= {TARGET_ADD_LN_MS} ms"),
                  (f"add_layer_norm fwd / eager add + LN = {fused[ms] / eager[ms]:.2f}",
                   fused[ms] <= 0.8 * eager[ms], "<= 0.80 (the bytes it saves)")]
        print(f"  {timing}:")
        judged[timing] = _say(checks)
    return judged


def _say(checks):
    for what, ok, goal in checks:
        print(f"    {'met   ' if ok else 'MISSED'} {what} (goal {goal})")
    return [{"what": what, "met": bool(ok), "goal": goal} for what, ok, goal in checks]


def _sweep_configs(block_c):
    """Candidate (rows per program, num_warps, programs per SM) per mode, spanning the elements per
    thread that fit in registers (the backward keeps about twice as many values live). One-warp
    backward rows need no block barriers (offline sm_90 compile at C = 768: 219 registers, no
    spills, 9 programs per SM) against 14 barriers at 2 warps: both are candidates. The residual
    forward takes the forward's."""
    fwd = [(r, nw, None) for r in (1, 2, 4, 8, 16) for nw in (1, 2, 4, 8, 16) if 4 <= r * block_c // (32 * nw) <= 128]
    bwd = [(r, nw, p) for r in (1, 2, 4) for nw in (1, 2, 4, 8, 16, 32) for p in (4, 8, 12, 16)
           if 2 <= r * block_c // (32 * nw) <= 32]
    return {"fwd": fwd, "bwd": bwd, "residual": fwd}


def _config_label(mode, cfg):
    return f"rows {cfg[0]}, warps {cfg[1]}" + (f", programs/SM {cfg[2]}" if mode == "bwd" else "")


def sweep_configs(shape, mode, configs, launch, want, nbytes, copy_gbps):
    """Every config of one kernel: correctness against `want` and its kernels alone (graph replay);
    prints the 5 fastest; returns (rows, the fastest correct row or None)."""
    rows = []
    for cfg in configs:
        label, fn = _config_label(mode, cfg), functools.partial(launch, *cfg)
        row = dict(shape=shape, mode=mode, config=label)
        try:
            err = max(harness.rel_err(g, w) for g, w in zip(harness.as_tuple(fn()), want))
            stats = harness.time_config(f"{mode} {shape} {label}", fn, warmup=10, rep=50)
        except Exception as e:  # a config that does not compile or fit: reported, not fatal
            stats, err = None, f"{type(e).__name__}"
        if stats is None:
            rows.append({**row, "status": f"failed: {err if isinstance(err, str) else 'timing'}"})
            continue
        gbps = nbytes / stats["ms"] / 1e6
        rows.append({**row, "graph_min_ms": round(stats["min_ms"], 4), "graph_ms": round(stats["ms"], 4),
                     "graph_max_ms": round(stats["max_ms"], 4), "gbps": round(gbps),
                     "pct_copy": round(100 * gbps / copy_gbps, 1), "rel_err": f"{err:.1e}",
                     "status": "ok" if err < 2e-2 else "WRONG", "cfg": cfg})
    good = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: r["graph_ms"])
    harness.print_table([{k: v for k, v in r.items() if k != "cfg"} for r in good[:5]],
                        title=f"{mode} {shape}: the 5 fastest of {len(configs)}")
    return rows, (good[0] if good else None)


def sweep_plain(C, kinds, copy_gbps, best):
    """The forward and backward kernels' configs at [rows of SHAPES, C] bf16."""
    n_rows = next((n for _, n, c in SHAPES if c == C), 256 * 197)
    x, dy = (torch.randn(n_rows, C, device=harness.DEVICE, dtype=torch.bfloat16) for _ in range(2))
    w, b = (torch.randn(C, device=harness.DEVICE, dtype=torch.bfloat16) for _ in range(2))
    y, dx = torch.empty_like(x), torch.empty_like(x)
    _, _, mean, rstd = kernels.layer_norm_fwd(x, w, b, EPS)
    xr = x.float().requires_grad_()
    ref_y = F.layer_norm(xr, (C,), w.float(), b.float(), EPS)
    ref_y.backward(dy.float())
    sm_count = harness.sm_count()

    def launch_fwd(r, nw, _):
        return kernels.layer_norm_fwd(x, w, b, EPS, y=y, rows_per_program=r, num_warps=nw)[0]

    def launch_bwd(r, nw, p):
        return kernels.layer_norm_bwd(dy, x, w, mean, rstd, dx=dx, rows_per_program=r, num_warps=nw,
                                      num_programs=p * sm_count)[0]

    act, shape, rows = n_rows * C * 2, f"[{n_rows},{C}] bf16", []
    modes = {"fwd": (launch_fwd, [ref_y.detach()], 2 * act), "bwd": (launch_bwd, [xr.grad], 3 * act)}
    for mode, configs in _sweep_configs(1 << (C - 1).bit_length()).items():
        if mode not in modes or mode not in kinds:
            continue
        found, top = sweep_configs(shape, mode, configs, *modes[mode], copy_gbps)
        rows += found
        if top:
            r, nw, p = top["cfg"]
            entry = f"({C}, {r}, {nw})" if mode == "fwd" else f"({C}, {r}, {nw}, {p})"
            best.setdefault(str(C), {})[mode] = dict(config=top["config"], graph_ms=top["graph_ms"],
                                                     pct_copy=top["pct_copy"], entry=entry)
            print(f"best {mode} at C={C}: {top['config']}, {top['pct_copy']}% of copy -> "
                  f"kernels/layer_norm.py HOPPER_{mode.upper()}_CONFIGS entry {entry}")
    return rows


def sweep_residual(C, copy_gbps, best):
    """add_layer_norm's forward at [50432, C] bf16: every config, then the unfused peers, judged on graph_ms."""
    n_rows, dtype = RESIDUAL_ROWS, torch.bfloat16
    x, res = (torch.randn(n_rows, C, device=harness.DEVICE, dtype=dtype) for _ in range(2))
    w, b = (torch.randn(C, device=harness.DEVICE, dtype=dtype) for _ in range(2))
    y, s = torch.empty_like(x), torch.empty_like(x)
    ref_s = x.float() + res.float()
    ref_y = F.layer_norm(ref_s, (C,), w.float(), b.float(), EPS)
    nbytes, shape = 4 * n_rows * C * x.element_size(), f"[{n_rows},{C}] bf16"  # 2 reads + 2 writes

    def launch(r, nw, _):
        return kernels.layer_norm_fwd(x, w, b, EPS, residual=res, y=y, s=s, rows_per_program=r, num_warps=nw)[:2]

    table = kernels.fwd_config(C, x.device, has_residual=True)
    configs = _sweep_configs(1 << (C - 1).bit_length())["residual"]
    configs += [] if (*table, None) in configs else [(*table, None)]
    rows, top = sweep_configs(shape, "residual", configs, launch, [ref_y, ref_s], nbytes, copy_gbps)
    peers = harness.run_benchmark(
        "layer_norm_residual", [{"shape": shape, "columns": {"op": "add_layer_norm"}}],
        {impl: _peer(fn) for impl, fn in add_layer_norm_peers(C, True).items()}, ("fwd",),
        setup=lambda case: {"inputs": [x, res, w, b], "grads": None}, nbytes=lambda case, mode: nbytes,
        after_case=lambda case: torch._dynamo.reset(), write=False,
        columns=["shape", "impl", "mode", "ms", "min_ms", "max_ms", "graph_ms", "graph_gbps", "graph_pct_copy",
                 "error"],
        title=f"add + LayerNorm {shape}, forward: the peers (graph_*: kernels alone)")
    for row in peers:
        row["mode"] = "residual peer"
    unfused = {r["impl"]: r["graph_ms"] for r in peers if r["impl"] in UNFUSED and _timed(r, "graph_ms")}
    table_row = next((r for r in rows if r.get("cfg") == (*table, None) and r["status"] == "ok"), None)
    entry = dict(table_config=f"rows {table[0]}, warps {table[1]}",
                 table_graph_ms=table_row and table_row["graph_ms"], unfused_graph_ms=unfused)
    print(f"\nresidual forward at C={C} (graph_ms, kernels alone):")
    if top:
        fastest_unfused = min(unfused.values()) if unfused else None
        entry.update(rows_per_program=top["cfg"][0], num_warps=top["cfg"][1], config=top["config"],
                     graph_ms=top["graph_ms"], pct_copy=top["pct_copy"],
                     entry=f"({C}, {top['cfg'][0]}, {top['cfg'][1]})")
        checks = [(f"best {top['config']}: {top['pct_copy']}% of copy", top["pct_copy"] >= TARGET_RESIDUAL_PCT,
                   f">= {TARGET_RESIDUAL_PCT}%")]
        if fastest_unfused:
            checks.append((f"best {top['graph_ms']} ms vs fastest unfused add + LN {fastest_unfused} ms",
                           top["graph_ms"] < fastest_unfused, "faster"))
        entry["judged"] = _say(checks)
        print(f"  table's config ({entry['table_config']}): {entry['table_graph_ms']} ms; best -> "
              f"fwd_config(C={C}, has_residual=True) = ({top['cfg'][0]}, {top['cfg'][1]})")
    else:
        print("  no config ran")
    best[str(C)] = entry
    return rows + peers


def sweep(widths, kinds, copy_gbps):
    """The launch-config sweeps; plain (fwd, bwd) and residual results go to separate files."""
    plain, residual, best_plain, best_residual = [], [], {}, {}
    for C in widths:
        if {"fwd", "bwd"} & set(kinds):
            plain += sweep_plain(C, kinds, copy_gbps, best_plain)
        if "residual" in kinds:
            residual += sweep_residual(C, copy_gbps, best_residual)
        harness.free()
    for op, rows, best in (("layer_norm_sweep", plain, best_plain),
                           ("layer_norm_residual_sweep", residual, best_residual)):
        if rows:
            for row in rows:
                row.pop("cfg", None)
            print("results in", harness.write_results(op, rows, extra={"best": best}))


def cpu_check(args=None):
    """No GPU: the kernels under Triton's interpreter against float64, and the CPU PyTorch path's times."""
    C = CPU_CHECK_SHAPE[-1]
    x, r, dy, ds = (torch.randn(*CPU_CHECK_SHAPE) for _ in range(4))
    w, b = torch.randn(C), torch.randn(C)
    rows, worst = [], 0.0
    for op, fn, ref_fn, inputs, grads in (
            ("layer_norm", VF.layer_norm, reference.layer_norm, [x, w, b], [dy]),
            ("add_layer_norm", VF.add_layer_norm, reference.add_layer_norm, [x, r, w, b], [dy, ds])):
        before = dispatch.kernel_launches[f"{op}_fwd"] + dispatch.kernel_launches[f"{op}_bwd"]
        leaves = [t.clone().requires_grad_() for t in inputs]
        outs = harness.as_tuple(fn(*leaves))
        got = [*outs, *torch.autograd.grad(outs, leaves, grads)]
        ran = dispatch.kernel_launches[f"{op}_fwd"] + dispatch.kernel_launches[f"{op}_bwd"] == before + 2
        ref_leaves = [t.double().requires_grad_() for t in inputs]
        ref_outs = harness.as_tuple(ref_fn(*ref_leaves))
        want = [*ref_outs, *torch.autograd.grad(ref_outs, ref_leaves, [g.double() for g in grads])]
        err = max(harness.rel_err(g, ref) for g, ref in zip(got, want))
        worst = max(worst, err)
        rows.append(dict(shape=f"[{x.numel() // C},{C}] fp32", impl=f"vit_fast {op} fwd+bwd, interpreter",
                         kernel_ran=ran, max_rel_err=f"{err:.1e}"))
    xc = torch.randn(CPU_TIMING_ROWS, C)
    for impl, fn in (("F.layer_norm fwd", lambda: F.layer_norm(xc, (C,), w, b, EPS)),
                     ("eager add + F.layer_norm fwd", lambda: F.layer_norm(xc + xc, (C,), w, b, EPS))):
        rows.append(dict(shape=f"[{CPU_TIMING_ROWS},{C}] fp32", impl=f"{impl}, CPU PyTorch path",
                         **harness.cpu_ms_columns(fn)))
    harness.print_table(rows, columns=["shape", "impl", "kernel_ran", "max_rel_err", "cpu_min_ms", "cpu_ms",
                                       "cpu_max_ms"],
                        title="CPU: interpreter correctness and the CPU PyTorch path (not GPU numbers)")
    if worst > 1e-5:
        raise SystemExit(f"vit_fast layer norm disagrees with float64 under the interpreter (rel err {worst:.1e})")


def run_gpu(args):
    copy_gbps = harness.ceilings()["copy_gbps"]
    print(f"{harness.device_name()}: measured copy bandwidth {copy_gbps:.0f} GB/s")
    if args.sweep:
        return sweep([int(c) for c in args.widths.split(",")], args.sweep_kinds.split(","), copy_gbps)
    rows = bench(("bf16",) if args.quick else tuple(DTYPES), args.quick)
    targets = report_targets(rows)
    print("results in", harness.write_results("layer_norm", rows, plot_key="pct_copy", extra={"targets": targets},
                                              label_keys=("shape", "dtype", "op", "mode", "impl")))


def main(argv=None):
    harness.main(argv, __doc__, OPTIONS, run_gpu, cpu_check, NOT_MEASURED)


if __name__ == "__main__":
    main()
