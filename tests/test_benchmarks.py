"""The benchmarks' GPU code paths run on the CPU with CUDA timing mocked, and their no-GPU paths.

Every GPU call of a benchmark goes through benchmarks/harness.py (`bench_stats`,
`graph_ms_or_none`, `bench_graph_stats`, `host_ms`, `peak_memory_mib`, `reset_peak_memory`,
`peak_memory_gib`, `profile_kernels`, `ceilings`, `sync`, `sm_count`) and its tensors are made on
`harness.DEVICE`; the `mock_gpu` fixture replaces those with CPU stand-ins that call each timed
function once (so every peer and mode really runs, on the PyTorch path) and return fixed times.
That proves the loops, the rows, the table, the ratios and the files, not any GPU number.
"""
import csv
import importlib.util
import json
import os
import sys

import pytest
import torch

from vit_fast import dispatch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)
import harness  # noqa: E402

STATS = {"min_ms": 0.9, "ms": 1.0, "max_ms": 1.25}
GRAPH_MS = 0.5
GRAPH_STATS = {"min_ms": 0.45, "ms": GRAPH_MS, "max_ms": 0.6}
PEAKS = {"peak_gib": 1.5, "reserved_gib": 2.0}
PROFILE = {"kernels": 3, "busy_us": 9.0, "span_us": 10.0, "gaps_us": 1.0, "wall_us": 12.0, "host_us": 5.0,
           "top": [{"name": "k", "us": 9.0, "calls": 3, "pct_busy": 100.0}]}
CEILINGS = {"matmul_tflops": 100.0, "copy_gbps": 1000.0}


def load(name):
    if f"bench_{name}" not in sys.modules:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(BENCH, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[f"bench_{name}"] = module
    return sys.modules[f"bench_{name}"]


def _ran(value):
    def fake(fn, *args, **kwargs):
        fn()
        return value() if callable(value) else value
    return fake


@pytest.fixture
def mock_gpu(monkeypatch, tmp_path):
    """The benchmark thinks it has a GPU: CPU tensors, PyTorch paths, fixed times, files under tmp_path."""
    for name, value in (("has_gpu", lambda: True), ("DEVICE", "cpu"), ("device_name", lambda: "Mock GPU"),
                        ("RESULTS_DIR", str(tmp_path)), ("ceilings", lambda: dict(CEILINGS)),
                        ("bench_stats", _ran(lambda: dict(STATS))),
                        ("bench_graph_stats", _ran(lambda: dict(GRAPH_STATS))),
                        ("graph_ms_or_none", lambda label, fn, **kw: _ran(GRAPH_MS)(fn)),
                        ("host_ms", _ran(0.01)), ("peak_memory_mib", _ran(2.0)), ("sync", lambda: None),
                        ("reset_peak_memory", lambda: None), ("peak_memory_gib", lambda: dict(PEAKS)),
                        ("profile_kernels", _ran(lambda: dict(PROFILE))), ("sm_count", lambda: 2)):
        monkeypatch.setattr(harness, name, value)
    monkeypatch.setattr(torch, "compile", lambda fn=None, **kwargs: fn)  # no inductor builds in a unit test
    monkeypatch.setenv(dispatch.FORCE_TORCH_ENV, "1")
    return os.path.join(str(tmp_path), "mock-gpu")


def results(out_dir, op):
    with open(os.path.join(out_dir, f"{op}.json")) as f:
        data = json.load(f)
    assert {"commit", "dirty", "device", "date", "time_utc", "torch", "triton", "python"} <= set(data["meta"])
    assert data["meta"]["device"] == "Mock GPU" and data["meta"]["ceilings"] == CEILINGS
    assert os.path.exists(os.path.join(out_dir, f"{op}.csv"))
    with open(os.path.join(out_dir, f"{op}.csv"), newline="") as f:
        assert all(row["commit"] == str(data["meta"]["commit"]) for row in csv.DictReader(f))
    timed = 0
    for r in data["rows"]:  # each timing as min / median / max: "ms" (as called) or, alone, "graph_ms"
        key = "ms" if "ms" in r else "graph_ms"
        if isinstance(r.get(key), float) and r.get("impl") != "bytes-moved limit":
            assert r[key.replace("ms", "min_ms")] <= r[key] <= r[key.replace("ms", "max_ms")], r
            timed += 1
    assert timed
    return data


def rows_of(rows, **match):
    return [r for r in rows if all(r.get(k) == v for k, v in match.items())]


def test_attention_gpu_path(mock_gpu, monkeypatch, capsys):
    bench = load("attention")
    monkeypatch.setattr(bench, "SHAPES", [("tiny", 1, 2, 17, 16), ("SigLIP-like", 1, 2, 9, 72),
                                          ("too wide", 1, 1, 4, 160)])
    monkeypatch.setattr(bench, "MODULE_SHAPE", (1, 9, 32, 2))
    bench.main([])
    out = capsys.readouterr().out
    rows = results(mock_gpu, "attention")["rows"]
    peers = set(bench.attention_peers())
    for shape in ("tiny [1,2,17,16]", "SigLIP-like [1,2,9,72]", "too wide [1,1,4,160]"):
        assert {(r["impl"], r["mode"]) for r in rows_of(rows, shape=shape)} == {
            (p, m) for p in peers for m in ("fwd", "bwd", "fwd+bwd")}
    timed = rows_of(rows, shape="tiny [1,2,17,16]", impl="vit_fast", mode="fwd+bwd")[0]
    assert (timed["ms"], timed["min_ms"], timed["max_ms"], timed["graph_ms"]) == (1.0, 0.9, 1.25, 0.5)
    assert timed["host_ms"] == 0.01 and timed["peak_mib"] == 2.0
    assert timed["tflops"] == round(3.5 * 4 * 2 * 17 * 17 * 16 / 1e9, 1) and timed["vs_best_sdpa"] == 1.0
    assert isinstance(rows_of(rows, shape="SigLIP-like [1,2,9,72]", impl="vit_fast", mode="fwd")[0]["ms"], float)
    wide = rows_of(rows, shape="too wide [1,1,4,160]", impl="vit_fast", mode="fwd")[0]
    assert wide["ms"] == "n/a" and "head dim 160 is not supported" in wide["error"]  # listed with the reason
    module = rows_of(rows, shape="module [1,9,32] h2")
    assert {r["impl"] for r in module} == {"timm-style eager", "timm-style torch.compile", "vit_fast.nn.Attention",
                                           "vit_fast.nn.Attention torch.compile"}
    assert {r["mode"] for r in module} == {"fwd", "fwd+bwd"} and all(r["vs_best_timm"] == 1.0 for r in module)
    assert "attention, bf16" in out and "Attention module, bf16" in out and "results written to" in out


def test_attention_table_has_the_vit_family():
    bench = load("attention")
    shapes = {name: (B, H, N, D) for name, B, H, N, D in bench.SHAPES}
    assert shapes["CLIP ViT-L/14 b32"] == (32, 16, 257, 64) and shapes["CLIP ViT-L/14 b256"] == (256, 16, 257, 64)
    assert shapes["SigLIP so400m/14@384 b32"][1:] == (16, 729, 72)
    assert shapes["DINOv2-L/14 reg4 b256"][1:] == (16, 261, 64)
    assert not {n for n in shapes if n.startswith(("CLIP", "SigLIP", "DINOv2"))} & set(bench.QUICK)


def test_layer_norm_gpu_path_and_targets(mock_gpu, monkeypatch, capsys):
    bench = load("layer_norm")
    monkeypatch.setattr(bench, "SHAPES", [("ViT-B b256", 6, 32), ("other", 4, 48)])
    bench.main(["--quick"])
    out = capsys.readouterr().out
    data = results(mock_gpu, "layer_norm")
    rows = data["rows"]
    for shape in ("ViT-B b256 [6,32]", "other [4,48]"):
        for op, peers in (("layer_norm", {"vit_fast", "F.layer_norm"}),
                          ("add_layer_norm", {"vit_fast add_layer_norm", "eager add + F.layer_norm",
                                              "vit_fast add + layer_norm (unfused)"})):
            if shape.startswith("ViT-B"):  # torch.compile peers only at ViT-B under --quick
                peers |= {"torch.compile(F.layer_norm)" if op == "layer_norm" else "torch.compile(add + F.layer_norm)"}
            found = rows_of(rows, shape=shape, op=op, dtype="bf16")
            assert {r["impl"] for r in found} >= peers and {r["mode"] for r in found} == {"fwd", "bwd", "fwd+bwd"}
    row = rows_of(rows, shape="ViT-B b256 [6,32]", op="add_layer_norm", impl="vit_fast add_layer_norm", mode="fwd")[0]
    assert row["gbps"] == round((4 * 6 * 32 * 2 + 2 * 32 * 2) / 1.0 / 1e6) and row["graph_vs_eager"] == 1.0
    assert set(data["targets"]) == {"as called", "kernels alone (CUDA graph)"}
    assert "targets at ViT-B b256 bf16" in out and "MISSED LN fwd" in out


def test_layer_norm_sweeps(mock_gpu, monkeypatch, capsys):
    bench = load("layer_norm")
    monkeypatch.setattr(bench, "SHAPES", [("tiny", 4, 64)])
    monkeypatch.setattr(bench, "RESIDUAL_ROWS", 5)
    few = {"fwd": [(1, 1, None), (2, 1, None)], "bwd": [(1, 1, 4), (2, 1, 8)], "residual": [(1, 1, None), (4, 2, None)]}
    monkeypatch.setattr(bench, "_sweep_configs", lambda block_c: {k: list(v) for k, v in few.items()})
    bench.main(["--sweep", "--widths", "64"])
    out = capsys.readouterr().out
    plain = results(mock_gpu, "layer_norm_sweep")
    assert {(r["mode"], r["config"]) for r in plain["rows"]} == {
        ("fwd", "rows 1, warps 1"), ("fwd", "rows 2, warps 1"),
        ("bwd", "rows 1, warps 1, programs/SM 4"), ("bwd", "rows 2, warps 1, programs/SM 8")}
    assert all(r["status"] == "ok" for r in plain["rows"]) and set(plain["best"]["64"]) == {"fwd", "bwd"}
    residual = results(mock_gpu, "layer_norm_residual_sweep")
    configs = [r for r in residual["rows"] if r["mode"] == "residual"]
    assert len(configs) >= 2 and all(r["status"] == "ok" for r in configs)  # the table's config is appended if new
    assert {r["impl"] for r in residual["rows"] if r["mode"] == "residual peer"} >= set(bench.UNFUSED)
    best = residual["best"]["64"]
    assert best["pct_copy"] == round(100 * 4 * 5 * 64 * 2 / GRAPH_MS / 1e6 / CEILINGS["copy_gbps"], 1)
    assert set(best["unfused_graph_ms"]) == set(bench.UNFUSED) and best["entry"].startswith("(64, ")
    assert [j["goal"] for j in best["judged"]] == [">= 85.0%", "faster"]
    assert "residual forward at C=64" in out and "fwd_config(C=64, has_residual=True)" in out


def test_patch_embed_gpu_path(mock_gpu, monkeypatch, capsys):
    bench = load("patch_embed")
    bench.run_gpu([("ViT-B/16 b256", 2, 32, 16, 64)])
    out = capsys.readouterr().out
    rows = results(mock_gpu, "patch_embed")["rows"]
    shape = "ViT-B/16 b256 [2,3,32,32] -> [2,5,64]"
    assert {r["impl"] for r in rows_of(rows, shape=shape, mode="fwd")} == {
        "vit_fast", "eager", "torch.compile", "cuDNN conv2d alone", "bytes-moved limit"}
    assert {r["impl"] for r in rows_of(rows, shape=shape, mode="fwd+bwd")} == {"vit_fast", "eager", "torch.compile"}
    fwd = rows_of(rows, shape=shape, mode="fwd", impl="vit_fast")[0]
    assert fwd["img_per_s"] == 2000.0 and fwd["x_vs_eager"] == 1.0 and fwd["gbps"] == round(
        bench.bytes_moved(2, 32, 16, 64) / 1e6)
    assert "MISSED ViT-B/16 b256 fwd vit_fast x_vs_eager" in out


@pytest.mark.parametrize("name, argv, message", [
    ("attention", [], "no CUDA GPU: attention timings not measured"),
    ("layer_norm", [], "no CUDA GPU: LayerNorm / add + LayerNorm GPU timings not measured"),
    ("patch_embed", ["--quick"], "no CUDA GPU: GPU numbers not measured"),
    ("mlp", [], "no CUDA GPU: fused Linear+GELU / Mlp / fused-MLP GPU timings not measured"),
    ("vit", [], "no CUDA GPU: nothing of vit_fast's GPU performance is measured here")])
def test_no_gpu_path(name, argv, message, monkeypatch, capsys, tmp_path):
    """Without a GPU each says what it did not measure, runs its CPU check and timings, writes nothing."""
    bench = load(name)
    monkeypatch.setattr(harness, "has_gpu", lambda: False)
    monkeypatch.setattr(harness, "RESULTS_DIR", str(tmp_path))
    monkeypatch.setenv(dispatch.FORCE_TORCH_ENV, "0")  # the interpreter checks run the kernels (restored after)
    small = {"attention": {"CPU_CHECK_SHAPE": (1, 2, 17, 16), "CPU_TIMING_SHAPE": (1, 9, 32, 2)},
             "layer_norm": {"CPU_CHECK_SHAPE": (1, 5, 32), "CPU_TIMING_ROWS": 8},
             "patch_embed": {"CPU_CONFIG": (32, 16, 64)}, "mlp": {}, "vit": {"CPU_BATCH": 1}}[name]
    for attr, value in small.items():
        monkeypatch.setattr(bench, attr, value)
    bench.main(argv)  # returns: exit status 0
    out = capsys.readouterr().out
    assert out.startswith(message) and ("cpu_ms" in out or "img_per_s" in out)
    assert "min_ms" in out and "max_ms" in out  # min / median / max of the CPU timings
    assert not os.listdir(tmp_path)


def test_add_ratios_takes_the_fastest_base():
    rows = [{"shape": "s", "mode": "fwd", "impl": "a", "ms": 2.0, "graph_ms": 1.0},
            {"shape": "s", "mode": "fwd", "impl": "sdpa x", "ms": 4.0, "graph_ms": "n/a"},
            {"shape": "s", "mode": "fwd", "impl": "sdpa y", "ms": 3.0, "graph_ms": 2.0},
            {"shape": "s", "mode": "bwd", "impl": "a", "ms": 1.0, "graph_ms": 1.0}]
    harness.add_ratios(rows, {"vs": lambda impl: impl.startswith("sdpa")})
    assert [r["vs"] for r in rows] == [1.5, 0.75, 1.0, "n/a"]
    assert [r.get("graph_vs") for r in rows] == [2.0, None, 1.0, "n/a"]


def test_mlp_gpu_path(mock_gpu, monkeypatch, capsys):
    bench = load("mlp")
    monkeypatch.setattr(bench, "SHAPES", [("ViT-B b1", 197, 768, 64)])  # K = 768: the max-autotune peer too
    monkeypatch.setattr(bench, "FUSED_MLP_SHAPES", [("ViT-B b1", 197, 32, 64)])
    bench.main([])
    out = capsys.readouterr().out
    rows = results(mock_gpu, "mlp")["rows"]
    shape, fused = "ViT-B b1 197x768->64", "ViT-B b1 197x32->64->32"
    expected = {  # (shape, part) -> {(impl, mode)}
        (shape, "fc1 gelu(none)"): {("vit_fast gelu(none)", m) for m in ("fwd", "fwd+bwd")}
        | {("eager gelu(none)", m) for m in ("fwd", "fwd+bwd")}
        | {("cuBLAS linear alone", "fwd"), ("torch.compile gelu(none)", "fwd"),
           ("torch.compile max-autotune gelu(none)", "fwd")},
        (shape, "fc1 gelu(tanh)"): {("vit_fast gelu(tanh)", "fwd"), ("eager gelu(tanh)", "fwd"),
                                    ("cuBLASLt gelu(tanh) epilogue", "fwd")},
        (shape, "fc2+residual"): {("vit_fast linear(residual)", "fwd"), ("eager linear + add", "fwd"),
                                  ("cuBLAS addmm(residual) + bias", "fwd")},
        (shape, "Mlp"): {(impl, m) for impl in ("vit_fast.nn.Mlp", "eager timm-style Mlp", "torch.compile(eager Mlp)")
                         for m in ("fwd", "fwd+bwd")},
        (fused, "MLP+residual"): {(impl, m) for impl in bench._peers({"columns": {"part": "MLP+residual"}}, False, False)
                                  for m in ("fwd", "fwd+bwd")}}
    for (s, part), found in expected.items():
        assert {(r["impl"], r["mode"]) for r in rows_of(rows, shape=s, part=part)} == found
    assert all("error" not in r for r in rows)
    row = rows_of(rows, shape=shape, part="fc1 gelu(none)", impl="vit_fast gelu(none)", mode="fwd+bwd")[0]
    assert (row["ms"], row["min_ms"], row["max_ms"], row["graph_ms"], row["peak_mib"]) == (1.0, 0.9, 1.25, 0.5, 2.0)
    assert row["tflops"] == round(3 * 2 * 197 * 768 * 64 / 1e9, 1) and row["vs_eager"] == 1.0
    mlp = rows_of(rows, shape=fused, part="MLP+residual", mode="fwd+bwd")
    assert all(r["tflops"] == round(6 * 197 * 32 * 64 / 1e9, 1) and r["graph_vs_eager"] == 1.0 for r in mlp)
    assert "Linear + GELU, fc2 + residual, Mlp and the fused MLP" in out

    bench.main(["--fused-mlp"])
    assert {r["part"] for r in results(mock_gpu, "mlp_fused")["rows"]} == {"MLP+residual"}


def test_mlp_sweep(mock_gpu, monkeypatch, capsys):
    bench = load("mlp")
    monkeypatch.setattr(bench, "SWEEP_SHAPE", (64, 32, 64))
    monkeypatch.setattr(bench, "SWEEP_DTYPE", torch.float16)  # the interpreter refuses bf16 dots
    configs = [bench.kernels.MatmulConfig(32, 32, 32, GROUP_M=8, num_warps=4, num_stages=2),
               bench.kernels.MatmulConfig(64, 32, 32, GROUP_M=8, num_warps=4, num_stages=2)]
    monkeypatch.setattr(bench, "SWEEP", {"pointer": configs})
    monkeypatch.setenv(dispatch.FORCE_TORCH_ENV, "0")  # the configs' kernels run, under the interpreter
    bench.main(["--sweep"])
    out = capsys.readouterr().out
    rows = results(mock_gpu, "mlp_sweep")["rows"]
    assert [r["impl"] for r in rows] == [bench.SWEEP_EAGER, "pointer 32x32x32 w4 s2", "pointer 64x32x32 w4 s2"]
    assert all(r["status"] == "ok" and float(r["rel_err"]) < 2e-2 for r in rows[1:]) and rows[1]["vs_eager"] == 1.0
    assert "best pointer: pointer 32x32x32 w4 s2" in out


def test_vit_gpu_path(mock_gpu, monkeypatch, capsys):
    bench = load("vit")
    tiny = "vit_tiny_patch16_224"
    for attr, value in (("MODELS", [(tiny, 2)]), ("TRAIN", [(tiny, 2)]), ("LATENCY_BATCHES", (1,)),
                        ("PROFILE", (tiny, 1))):
        monkeypatch.setattr(bench, attr, value)
    bench.main(["--no-compile"])
    out = capsys.readouterr().out
    data = results(mock_gpu, "vit")
    rows = data["rows"]
    inference = {(r["impl"], r["batch"]) for r in rows_of(rows, model=tiny, mode="inference")}
    assert inference == {(impl, b) for impl in ("timm eager", "timm graph", "vit_fast", "vit_fast graph")
                         for b in (1, 2)} | {(bench.UINT8_IMPL, 2)}
    assert {r["impl"] for r in rows_of(rows, model=tiny, mode="train", batch=2)} == {
        "timm eager", "timm captured", "vit_fast", "vit_fast captured"}
    row = rows_of(rows, mode="inference", impl="vit_fast graph", batch=2)[0]
    assert (row["ms"], row["min_ms"], row["max_ms"], row["peak_gib"], row["reserved_gib"]) == (1.0, 0.9, 1.25, 1.5, 2.0)
    assert row["img_s"] == 2000.0 and row["x_timm"] == 1.0 and row["source"] == "vit_fast"
    mfu = 100 * 2000.0 * 2 * bench.forward_macs(tiny) / (CEILINGS["matmul_tflops"] * 1e12)
    assert row["mfu_pct"] == round(mfu, 1)
    train = rows_of(rows, mode="train", impl="vit_fast", batch=2)[0]
    assert train["mfu_pct"] == round(3 * mfu, 1) and train["x_timm"] == 1.0
    for r in rows_of(rows, mode="train"):  # the CPU has no CUDA graph: said as the row's error
        assert ("error" in r) == r["impl"].endswith("captured")
    assert row["x_timm_ro"] == "n/a"  # --no-compile: no reduce-overhead rows to compare with
    assert rows_of(rows, mode="inference", impl="timm eager", batch=1)[0]["source"].startswith("timm")
    assert data["profile"]["eager"] == PROFILE and data["profile"]["graph"] == PROFILE
    assert "ViT end to end, bf16" in out and "ViT-B/16" not in out  # no ViT-B rows to sum up


def _tiny_workflow(bench, monkeypatch):
    monkeypatch.setattr(bench, "TRAIN_PER_CLASS", {"gpu": {True: 2}, "cpu": {True: 2}})
    monkeypatch.setattr(bench, "IMAGE_SIZE", (40, 30))
    for attr in ("GPU_SETUP", "CPU_SETUP"):
        monkeypatch.setattr(bench, attr, ("vit_tiny_patch16_224", {"depth": 1}, 32, 4, False))


def test_workflow_gpu_path(mock_gpu, monkeypatch, capsys):
    bench = load("workflow")
    _tiny_workflow(bench, monkeypatch)
    monkeypatch.setattr(bench, "GPU_MEASURED_EPOCHS", 2)
    bench.main(["--quick", "--workers", "0"])
    out = capsys.readouterr().out
    data = results(mock_gpu, "workflow")
    rows = {r["impl"].split(" (")[0]: r for r in data["rows"]}
    assert set(rows) == {"loader", bench.STEP, bench.CAPTURED_STEP, bench.END_TO_END, bench.END_TO_END_GRAPH}
    assert all("error" not in r and r["min_ms"] <= r["ms"] <= r["max_ms"] for r in rows.values())
    step, captured = rows[bench.STEP], rows[bench.CAPTURED_STEP]
    assert step["images_per_s"] == 4000.0 and captured["of_eager_step"] == 1.0  # both timed by the mock: 1 ms
    end_to_end, graphed = rows[bench.END_TO_END], rows[bench.END_TO_END_GRAPH]
    # the ratios come from the unrounded images/s: equal to those of the rounded columns to 3 digits
    assert end_to_end["of_model_only"] == pytest.approx(end_to_end["images_per_s"] / 4000.0, abs=2e-3)
    assert graphed["of_eager_end_to_end"] == pytest.approx(graphed["images_per_s"] / end_to_end["images_per_s"],
                                                           rel=1e-3, abs=2e-3)
    assert data["not_measured"] == [] and data["limited_by"] in ("loader", "step")
    assert "end to end:" in out and "not measured" not in out


def test_workflow_cpu_path(monkeypatch, capsys, tmp_path):
    """Without a GPU the tiny CPU version runs, says what it did not measure, and still writes its stamped files."""
    bench = load("workflow")
    _tiny_workflow(bench, monkeypatch)
    monkeypatch.setattr(harness, "has_gpu", lambda: False)
    monkeypatch.setattr(harness, "RESULTS_DIR", str(tmp_path))
    monkeypatch.setenv(dispatch.FORCE_TORCH_ENV, "1")
    bench.main(["--quick", "--workers", "0"])
    out = capsys.readouterr().out
    assert "no CUDA GPU: a tiny CPU version" in out and "not measured without a GPU: ViT-B/16" in out
    (device,) = os.listdir(tmp_path)
    with open(os.path.join(tmp_path, device, "workflow.json")) as f:
        data = json.load(f)
    assert data["meta"]["commit"] is not None or data["meta"]["dirty"] is None
    assert {r["impl"].split(" (")[0] for r in data["rows"]} == {"loader", bench.STEP, bench.END_TO_END}
    assert all(r["min_ms"] <= r["ms"] <= r["max_ms"] for r in data["rows"])
    assert "the CUDA-graph captured step" in data["not_measured"]
