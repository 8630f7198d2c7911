"""The whole ViT end to end: inference latency and throughput, training steps, vit_fast against timm, bf16.

    python benchmarks/vit.py               # ViT-S/16, B/16, L/16 at 224 and B/16 at 384
    python benchmarks/vit.py --quick       # ViT-B/16 only, fewer compiled rows (a short GPU lease)
    python benchmarks/vit.py --no-compile  # no torch.compile rows (each compile costs ~0.5 min)

Side by side in one run, each model:
- inference, bf16 weights, eval, no grad, bf16 normalized images in, at batch 1, 8, 32 and the
  model's throughput batch (256; ViT-L 128): timm eager (SDPA attention), torch.compile(timm)
  (default, and mode="reduce-overhead": CUDA graphs), vit_fast eager, vit_fast through
  `vit_fast.inference` (its forward replayed from a CUDA graph), torch.compile(vit_fast); in the
  full run also timm through `vit_fast.inference`; one more vit_fast row at the throughput batch
  takes uint8 images and normalizes them inside its patch embedding;
- training step, fp32 weights, AMP bf16 autocast, fused AdamW, forward + backward + optimizer step,
  ViT-B/16 b128 and ViT-L/16 b64: timm eager, torch.compile(timm), vit_fast eager, vit_fast with
  the step captured in a CUDA graph (`vit_fast.capture_train_step`, AdamW capturable=True),
  torch.compile(vit_fast); in the full run also timm's step captured the same way.
Each row: ms (median of triton's do_bench, L2 flushed) with min_ms and max_ms from the same run,
images/s, MFU = forward FLOPs (x3 for a training step) per second / the measured bf16 matmul peak
(FLOPs = 2 x MACs; ViT-B/16 forward: 17.56 GMACs per image), ratios to timm eager, to
torch.compile(timm) and to its reduce-overhead mode at the same batch, peak_gib (most allocated
during the row, weights, optimizer state and graph pools in) and reserved_gib (the allocator's
peak reservation, what the device gave up). Plus a torch.profiler breakdown of one ViT-B/16
vit_fast forward at b256, eager and replayed: top kernels by device time, device busy time
against the kernels' span, the synchronized wall time and the host's enqueue time.
Without timm installed, the reference model with SDPA attention stands in for timm, labelled
"timm-style (reference+SDPA)" (the source column). The loop, timing, table and files are
harness.run_benchmark's: a case per model and mode, its batches the third axis (the batch column),
each impl's inference model built once for its batches. Results: benchmarks/results/<device>/vit.json
(stamped with the commit, dirty flag, device, date, torch and Triton), .csv and .png.
Without a GPU: says what it could not measure, times a tiny ViT forward on the CPU (PyTorch
path, eager and through `vit_fast.inference`, which runs CPU tensors eagerly), writes no files,
exits 0.
"""
import gc
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import vit_fast  # noqa: E402
from vit_fast import dispatch, reference  # noqa: E402

try:
    import timm
except ImportError:  # the reference model with SDPA attention stands in (timm_model)
    timm = None

# (model name, throughput batch): batches that fill an H100 (the goals are set at them)
MODELS = [("vit_small_patch16_224", 256), ("vit_base_patch16_224", 256), ("vit_large_patch16_224", 128),
          ("vit_base_patch16_384", 256),
          ("vit_large_patch14_clip_224", 256), ("vit_so400m_patch14_siglip_384", 64)]  # the family's encoders
LATENCY_BATCHES = (1, 8, 32)
TRAIN = [("vit_base_patch16_224", 128), ("vit_large_patch16_224", 64)]
QUICK = ("vit_base_patch16_224",)
INFER_IMPLS = ("timm eager", "timm compile", "timm compile ro", "timm graph", "vit_fast", "vit_fast graph",
               "vit_fast compile")
TRAIN_IMPLS = ("timm eager", "timm compile", "timm captured", "vit_fast", "vit_fast captured", "vit_fast compile")
CPU_BATCH = 4  # the no-GPU forward timing's
OPTIONS = {"--quick": "ViT-B/16 only; compiled inference rows only at the batch each goal is judged at; no compiled "
                      "training rows", "--no-compile": "no torch.compile rows"}
NOT_MEASURED = ("nothing of vit_fast's GPU performance is measured here (no inference latency or throughput, no "
                "CUDA-graph replay, no torch.compile, no training step, no peak memory, no kernel profile); timing a "
                "tiny ViT forward on the CPU (PyTorch path) instead")
UINT8_IMPL = "vit_fast (uint8 in)"  # takes uint8 images, normalized inside its patch embedding
PROFILE = ("vit_base_patch16_224", 256)
COLUMNS = ["model", "mode", "impl", "batch", "ms", "min_ms", "max_ms", "img_s", "mfu_pct", "peak_gib", "reserved_gib",
           "x_timm", "x_timm_compile", "x_timm_ro", "source", "error"]


def forward_macs(name, num_classes=1000):
    """Multiply-accumulates of one image's forward: patch embedding, blocks (linears and attention), head."""
    cfg = {"img_size": 224, "mlp_ratio": 4.0, "class_token": True, **reference.CONFIGS[name]}
    e, p = cfg["embed_dim"], cfg["patch_size"]
    patches = (cfg["img_size"] // p) ** 2
    n = patches + int(cfg["class_token"])
    hidden = int(e * cfg["mlp_ratio"])
    per_block = 4 * n * e * e + 2 * n * e * hidden + 2 * n * n * e  # qkv 3NE^2, proj NE^2, MLP 2NEh; QK^T, AV
    return patches * 3 * p * p * e + cfg["depth"] * per_block + e * num_classes


class SdpaAttention(reference.Attention):
    """The reference Attention through F.scaled_dot_product_attention, as timm's (the stand-in without timm)."""

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))


def timm_model(name):
    """timm's model when timm is importable, else the reference model with SDPA attention."""
    if timm is None:
        model = reference.create_reference(name)
        for block in model.blocks:
            old = block.attn
            block.attn = SdpaAttention(old.qkv.in_features, old.num_heads, qkv_bias=old.qkv.bias is not None)
            block.attn.load_state_dict(old.state_dict())
        return model
    return timm.create_model(name, pretrained=False)


def source(impl):
    """Where `impl`'s model comes from: timm (its version), the stand-in without timm, or vit_fast."""
    if not impl.startswith("timm"):
        return "vit_fast"
    return f"timm {timm.__version__}" if timm is not None else "timm-style (reference+SDPA)"


def build(impl, name):
    """`impl`'s model (timm's or vit_fast's) on the device, fp32."""
    return (timm_model(name) if impl.startswith("timm") else vit_fast.MODELS[name]()).to(harness.DEVICE)


def images(batch, img_size, dtype):
    x = torch.randint(0, 256, (batch, 3, img_size, img_size), dtype=torch.uint8, device=harness.DEVICE)
    return x if dtype == torch.uint8 else (x.to(dtype) / 127.5 - 1)


def inference_batches(impl, big, quick):
    """The batches a row set runs at. --quick keeps each compiled peer to the goal it is judged by:
    default compile at the throughput batch, reduce-overhead at the latency batches."""
    if impl == UINT8_IMPL or (quick and impl in ("timm compile", "vit_fast compile")):
        return (big,)
    if impl == "timm compile ro":
        return LATENCY_BATCHES if quick else (*LATENCY_BATCHES, big)
    return (*LATENCY_BATCHES, big)


class InferenceModel:
    """The inference model (bf16, eval, compiled as the impl says) of one (impl, model name) at a time,
    kept across its batches: built on first use, dropped (with dynamo's caches and the cached blocks)
    before another is built, so a row's memory peaks hold its own model alone."""

    def __init__(self):
        self.key = self.model = None

    def get(self, impl, name):
        if self.key != (impl, name):
            self.release()
            with torch.inference_mode(False):  # parameters, not inference tensors
                model = build(impl, name).bfloat16().eval()
                if impl == "timm compile ro":
                    model = torch.compile(model, mode="reduce-overhead", dynamic=False)
                elif impl.endswith("compile"):
                    model = torch.compile(model, dynamic=False)
                self.model = model
            self.key = (impl, name)
        return self.model

    def release(self):
        self.key = self.model = None
        gc.collect()
        torch._dynamo.reset()
        harness.free()


def inference_peer(models, impl, name, big, quick):
    """make(case, batch) -> one forward of `impl` at `batch` (compiled / captured and warmed up first)."""
    img_size = reference.CONFIGS[name].get("img_size", 224)

    def make(case, batch):
        if batch not in inference_batches(impl, big, quick):
            return None
        model = models.get(impl, name)
        harness.reset_peak_memory()  # again, after the swap: the previous impl's model is no part of this row
        x = images(batch, img_size, torch.uint8 if impl == UINT8_IMPL else torch.bfloat16)
        fn = vit_fast.inference(model) if impl.endswith("graph") else model  # a runner (graph pool) per row
        fn(x)  # compile / capture and warm up outside the timing
        fn(x)
        return lambda: fn(x)
    return harness.Peer(make, torch.inference_mode)


def training_peer(models, impl, name):
    """make(case, batch) -> one training step of `impl`: AMP bf16 forward, backward, fused AdamW step."""
    img_size = reference.CONFIGS[name].get("img_size", 224)

    def make(case, batch):
        models.release()  # the previous row's model and graphs, before this row's peaks start
        harness.reset_peak_memory()
        model = build(impl, name).train()
        x = images(batch, img_size, torch.float32)
        y = torch.randint(0, 1000, (batch,), device=harness.DEVICE)
        if impl.endswith("captured"):
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True, capturable=True)
            captured = vit_fast.capture_train_step(model, optimizer, F.cross_entropy, x, y, amp_dtype=torch.bfloat16)
            if not captured.graphed:
                raise RuntimeError("capture_train_step did not capture the step")

            def step():
                captured(x, y)
        else:
            model = torch.compile(model) if impl.endswith("compile") else model
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

            def step():
                with torch.autocast(torch.device(harness.DEVICE).type, dtype=torch.bfloat16):
                    loss = F.cross_entropy(model(x), y)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        step()  # compile, and allocate the optimizer state
        step()
        return step
    return make


def cases_and_peers(quick, compile_rows):
    """The cases (one per model and mode: inference at its batches, train at its batch) and a function
    case -> its peers."""
    keep = (lambda impl: True) if compile_rows else (lambda impl: "compile" not in impl)
    reps = {"inference": dict(warmup=50 if quick else 100, rep=200 if quick else 500),
            "train": dict(warmup=100 if quick else 200, rep=300 if quick else 1000)}
    cases = [{"columns": {"model": name, "mode": "inference"}, "modes": (*LATENCY_BATCHES, big), "big": big,
              "reps": reps["inference"]} for name, big in MODELS if not quick or name in QUICK]
    cases += [{"columns": {"model": name, "mode": "train"}, "modes": (batch,), "reps": reps["train"]}
              for name, batch in TRAIN if not quick or name in QUICK]
    models = InferenceModel()

    def peers(case):
        name = case["columns"]["model"]
        if case["columns"]["mode"] == "inference":
            impls = [impl for impl in (*INFER_IMPLS, UINT8_IMPL) if keep(impl) and not (quick and impl == "timm graph")]
            return {impl: inference_peer(models, impl, name, case["big"], quick) for impl in impls}
        # --quick: no compiled or timm-captured training rows (their compiles do not fit a short lease)
        impls = [impl for impl in TRAIN_IMPLS
                 if keep(impl) and not (quick and (impl.endswith("compile") or impl == "timm captured"))]
        return {impl: training_peer(models, impl, name) for impl in impls}
    return cases, peers, models


def run_gpu(quick, compile_rows):
    peak_tflops = harness.ceilings()["matmul_tflops"]
    print(f"{harness.device_name()}: bf16 matmul peak {peak_tflops:.0f} TFLOP/s (measured now)")
    assert round(forward_macs("vit_base_patch16_224") / 1e9, 2) == 17.56
    cases, peers, models = cases_and_peers(quick, compile_rows)

    def throughput(case, batch, row):  # MFU: forward FLOPs (x3 for a training step) per second / peak
        flops = 2 * forward_macs(case["columns"]["model"]) * (3 if case["columns"]["mode"] == "train" else 1)
        img_s = batch / row["ms"] * 1e3
        return {"img_s": img_s, "mfu_pct": 100 * img_s * flops / (peak_tflops * 1e12), "source": source(row["impl"])}

    rows = harness.run_benchmark(
        "vit", cases, peers, mode_key="batch", measure=("peak_gib",), graph=False, derive=throughput,
        ratios={"x_timm": lambda impl: impl == "timm eager", "x_timm_compile": lambda impl: impl == "timm compile",
                "x_timm_ro": lambda impl: impl == "timm compile ro"},
        after_case=lambda case: models.release(), write=False, columns=COLUMNS,
        title="ViT end to end, bf16 (inference: bf16 weights; train: AMP + fused AdamW; "
              "x_*: img/s over that peer's at the same batch)")
    profile = None
    try:
        profile = profile_forward(*PROFILE)
    except Exception as err:
        print(f"profile: {type(err).__name__}: {err}"[:200])
    summarize(rows)
    out_dir = harness.write_results("vit", rows, plot_key="img_s", label_keys=("model", "mode", "impl", "batch"),
                                    extra={"profile": profile})
    print("results in", out_dir)
    return rows


def profile_forward(name, batch):
    """torch.profiler breakdown of one vit_fast forward, eager and replayed from its graph."""
    model = build("vit_fast", name).bfloat16().eval()
    x = images(batch, reference.CONFIGS[name].get("img_size", 224), torch.bfloat16)
    runner = vit_fast.inference(model)
    result = {"model": name, "batch": batch}
    with torch.inference_mode():
        for label, fn in (("eager", lambda: model(x)), ("graph", lambda: runner(x))):
            try:
                fn()
                fn()
                result[label] = harness.profile_kernels(fn)
                s = result[label]
                print(f"profile {name} b{batch} {label}: {s['kernels']} kernels, device busy {s['busy_us']:.0f} us "
                      f"of a {s['span_us']:.0f} us span (gaps {s['gaps_us']:.0f}), wall {s['wall_us']:.0f} us, "
                      f"host enqueue {s['host_us']:.0f} us", flush=True)
                for k in s["top"][:8]:
                    print(f"    {k['us']:9.1f} us {k['pct_busy']:5.1f}%  x{k['calls']:<3d} {k['name'][:90]}")
            except Exception as err:
                result[label] = {"error": f"{type(err).__name__}: {err}"[:200]}
                print(f"profile {label}: {result[label]['error']}")
    return result


def summarize(rows):
    """The ViT-B/16 rows against its goals."""
    def get(mode, impl, batch):
        for r in rows:
            if (r["model"], r["mode"], r["impl"], r["batch"]) == ("vit_base_patch16_224", mode, impl, batch):
                return r if isinstance(r.get("img_s"), float) else None
        return None

    def ratio(r, key):
        return f"{r[key]:.2f}x" if r and isinstance(r.get(key), float) else "n/a"

    for impl in ("vit_fast", "vit_fast graph", "vit_fast compile"):
        r = get("inference", impl, 256)
        if r:
            print(f"ViT-B/16 inference b256 {impl}: {r['img_s']:,.0f} img/s = {ratio(r, 'x_timm')} timm eager, "
                  f"{ratio(r, 'x_timm_compile')} compile(timm) (goal >= 1.30x, >= 1.20x)")
    for b in LATENCY_BATCHES:
        r = get("inference", "vit_fast graph", b)
        if r:
            eager, ro = get("inference", "timm eager", b), get("inference", "timm compile ro", b)
            print(f"ViT-B/16 latency b{b} vit_fast graph: {r['ms']:.3f} ms = "
                  f"{r['ms'] / eager['ms'] if eager else float('nan'):.2f}x timm eager's (goal <= 0.5x), "
                  f"{r['ms'] / ro['ms'] if ro else float('nan'):.2f}x compile(timm, reduce-overhead)'s (goal <= 1.0x)")
    base = get("train", "timm eager", 128)
    timm_peak = f", timm eager {base['peak_gib']:.2f} GiB" if base else ""
    for impl in ("vit_fast", "vit_fast captured", "vit_fast compile"):
        r = get("train", impl, 128)
        if r:
            print(f"ViT-B/16 train b128 {impl}: {r['img_s']:,.0f} img/s = {ratio(r, 'x_timm')} timm eager, "
                  f"{ratio(r, 'x_timm_compile')} compile(timm), peak {r['peak_gib']:.2f} GiB{timm_peak} "
                  "(goal >= 1.25x, >= 1.10x, peak <= timm's)")


def run_cpu():
    os.environ[dispatch.FORCE_TORCH_ENV] = "1"
    torch.manual_seed(0)
    ref = reference.create_reference("vit_tiny_patch16_224").eval()
    model = vit_fast.vit_tiny_patch16_224().eval()
    model.load_state_dict(ref.state_dict())
    runner = vit_fast.inference(model)  # CPU tensors: runs the model eagerly
    x = torch.randn(CPU_BATCH, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(runner(x), model(x), rtol=0, atol=0)
        rows = []
        for impl, m in (("vit_fast (PyTorch path)", model), ("vit_fast.inference (eager on CPU)", runner),
                        ("reference", ref)):
            timed = harness.cpu_ms_columns(lambda: m(x), reps=3)
            rows.append({"model": "vit_tiny_patch16_224", "impl": impl, "batch": len(x), **timed,
                         "img_s": len(x) / timed["cpu_ms"] * 1e3})
    harness.print_table(rows, title=f"CPU forward, fp32 ({harness.device_name()}, {torch.get_num_threads()} threads)")
    s = harness.stamp()
    print(f"commit {s['commit']}{' (dirty)' if s['dirty'] else ''}, torch {s['torch']}, Triton {s['triton']}; "
          "no files written")


def main(argv=None):
    harness.main(argv, __doc__.split("\n\n")[0], OPTIONS, lambda args: run_gpu(args.quick, not args.no_compile),
                 lambda args: run_cpu(), NOT_MEASURED)


if __name__ == "__main__":
    main()
