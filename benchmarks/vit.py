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
"timm-style (reference+SDPA)". Results: benchmarks/results/<device>/vit.json (stamped with the
commit, dirty flag, device, date, torch and Triton), .csv and .png.
Without a GPU: says what it could not measure, times a tiny ViT forward on the CPU (PyTorch
path, eager and through `vit_fast.inference`, which runs CPU tensors eagerly), writes no files,
exits 0.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import vit_fast  # noqa: E402
from vit_fast import dispatch, reference  # noqa: E402

# (model name, throughput batch): batches that fill an H100, as in perf/TARGETS.md
MODELS = [("vit_small_patch16_224", 256), ("vit_base_patch16_224", 256), ("vit_large_patch16_224", 128),
          ("vit_base_patch16_384", 256),
          ("vit_large_patch14_clip_224", 256), ("vit_so400m_patch14_siglip_384", 64)]  # the family's encoders
LATENCY_BATCHES = (1, 8, 32)
TRAIN = [("vit_base_patch16_224", 128), ("vit_large_patch16_224", 64)]
QUICK = ("vit_base_patch16_224",)
INFER_IMPLS = ("timm eager", "timm compile", "timm compile ro", "timm graph", "vit_fast", "vit_fast graph",
               "vit_fast compile")
TRAIN_IMPLS = ("timm eager", "timm compile", "timm captured", "vit_fast", "vit_fast captured", "vit_fast compile")
PROFILE = ("vit_base_patch16_224", 256)


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
    """(timm's model, its label): timm when importable, else the reference model with SDPA attention."""
    try:
        import timm
    except ImportError:
        model = reference.create_reference(name)
        for block in model.blocks:
            old = block.attn
            block.attn = SdpaAttention(old.qkv.in_features, old.num_heads, qkv_bias=old.qkv.bias is not None)
            block.attn.load_state_dict(old.state_dict())
        return model, "timm-style (reference+SDPA)"
    return timm.create_model(name, pretrained=False), f"timm {timm.__version__}"


def build(impl, name):
    model, label = timm_model(name) if impl.startswith("timm") else (vit_fast.MODELS[name](), "vit_fast")
    return model.cuda(), label


def images(batch, img_size, dtype):
    x = torch.randint(0, 256, (batch, 3, img_size, img_size), dtype=torch.uint8, device="cuda")
    return x if dtype == torch.uint8 else (x.to(dtype) / 127.5 - 1)


def inference_batches(impl, big, quick):
    """The batches a row set runs at. --quick keeps each compiled peer to the goal it is judged by:
    default compile at the throughput batch, reduce-overhead at the latency batches."""
    if quick and impl in ("timm compile", "vit_fast compile"):
        return (big,)
    if impl == "timm compile ro":
        return LATENCY_BATCHES if quick else (*LATENCY_BATCHES, big)
    return (*LATENCY_BATCHES, big)


def _reset_memory():
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def _memory():
    torch.cuda.synchronize()
    return {"peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "reserved_gib": torch.cuda.max_memory_reserved() / 2**30}


def inference_rows(impl, name, big, quick, uint8=False):
    """Rows of one inference implementation, one per batch; a failing batch becomes an error row."""
    model, label = build(impl, name)
    model = model.bfloat16().eval()
    if impl == "timm compile ro":
        model = torch.compile(model, mode="reduce-overhead", dynamic=False)
    elif impl.endswith("compile"):
        model = torch.compile(model, dynamic=False)
    img_size = reference.CONFIGS[name].get("img_size", 224)
    reps = dict(warmup=50 if quick else 100, rep=200 if quick else 500)
    out = []
    for batch in ((big,) if uint8 else inference_batches(impl, big, quick)):
        try:
            _reset_memory()
            x = images(batch, img_size, torch.uint8 if uint8 else torch.bfloat16)
            fn = vit_fast.inference(model) if impl.endswith("graph") else model
            with torch.inference_mode():
                fn(x)  # compile / capture and warm up outside the timing
                fn(x)
                stats = harness.bench_stats(lambda: fn(x), **reps)
            out.append({"batch": batch, "source": label, **stats, **_memory()})
            del fn
        except Exception as err:  # one failing row must not cost the rest of a GPU lease
            out.append({"batch": batch, "source": label, "error": f"{type(err).__name__}: {err}"[:200]})
    return out


def training_row(impl, name, batch, quick):
    _reset_memory()
    model, label = build(impl, name)
    model.train()
    img_size = reference.CONFIGS[name].get("img_size", 224)
    x = images(batch, img_size, torch.float32)
    y = torch.randint(0, 1000, (batch,), device="cuda")
    if impl.endswith("captured"):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True, capturable=True)
        captured = vit_fast.capture_train_step(model, optimizer, F.cross_entropy, x, y, amp_dtype=torch.bfloat16)
        assert captured.graphed

        def step():
            captured(x, y)
    else:
        model = torch.compile(model) if impl.endswith("compile") else model
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    step()  # compile, and allocate the optimizer state
    step()
    stats = harness.bench_stats(step, warmup=100 if quick else 200, rep=300 if quick else 1000)
    return {"batch": batch, "source": label, **stats, **_memory()}


def finish_row(r, name, mode, impl, flops_per_image, peak_tflops):
    r.update(model=name, mode=mode, impl=impl)
    if "ms" in r:
        r["img_s"] = r["batch"] / r["ms"] * 1e3
        r["mfu_pct"] = 100 * r["img_s"] * flops_per_image / (peak_tflops * 1e12)
        print(f"{name} {mode} {impl} b{r['batch']}: {r['ms']:.3f} ms (min {r['min_ms']:.3f}, max {r['max_ms']:.3f}), "
              f"{r['img_s']:,.0f} img/s, MFU {r['mfu_pct']:.1f}%, peak {r['peak_gib']:.2f} GiB "
              f"(reserved {r['reserved_gib']:.2f})", flush=True)
    else:
        print(f"{name} {mode} {impl} b{r['batch']}: {r['error']}", flush=True)
    return r


def add_ratios(rows):
    """Each row's img/s over timm eager's, torch.compile(timm)'s and its reduce-overhead mode's, same model,
    mode and batch (a latency ratio is the inverse)."""
    base = {(r["model"], r["mode"], r["batch"], r["impl"]): r["img_s"] for r in rows if r.get("img_s")}
    for r in rows:
        if r.get("img_s"):
            for peer, key in (("timm eager", "x_timm"), ("timm compile", "x_timm_compile"),
                              ("timm compile ro", "x_timm_ro")):
                ref = base.get((r["model"], r["mode"], r["batch"], peer))
                r[key] = r["img_s"] / ref if ref else ""


def profile_forward(name, batch):
    """torch.profiler breakdown of one vit_fast forward, eager and replayed from its graph."""
    model = vit_fast.MODELS[name]().cuda().bfloat16().eval()
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


def run_gpu(quick, compile_rows):
    peak_tflops = harness.ceilings()["matmul_tflops"]
    print(f"{harness.device_name()}: bf16 matmul peak {peak_tflops:.0f} TFLOP/s (measured now)")
    assert round(forward_macs("vit_base_patch16_224") / 1e9, 2) == 17.56
    keep = (lambda impl: "compile" not in impl) if not compile_rows else (lambda impl: True)
    rows = []
    for name, big in MODELS:
        if quick and name not in QUICK:
            continue
        flops = 2 * forward_macs(name)
        jobs = [(impl, False) for impl in INFER_IMPLS if keep(impl) and not (quick and impl == "timm graph")]
        for impl, uint8 in jobs + [("vit_fast", True)]:
            label = impl + (" (uint8 in)" if uint8 else "")
            try:
                found = inference_rows(impl, name, big, quick, uint8)
            except Exception as err:
                found = [{"batch": big, "error": f"{type(err).__name__}: {err}"[:200]}]
            rows += [finish_row(r, name, "inference", label, flops, peak_tflops) for r in found]
            torch._dynamo.reset()
            torch.cuda.empty_cache()
    for name, batch in TRAIN:
        if quick and name not in QUICK:
            continue
        flops = 2 * forward_macs(name)
        # --quick: no compiled or timm-captured training rows (their compiles do not fit a short lease)
        for impl in TRAIN_IMPLS:
            if not keep(impl) or (quick and (impl.endswith("compile") or impl == "timm captured")):
                continue
            try:
                r = training_row(impl, name, batch, quick)
            except Exception as err:
                r = {"batch": batch, "error": f"{type(err).__name__}: {err}"[:200]}
            rows.append(finish_row(r, name, "train", impl, 3 * flops, peak_tflops))
            torch._dynamo.reset()
            torch.cuda.empty_cache()
    add_ratios(rows)
    profile = None
    try:
        profile = profile_forward(*PROFILE)
    except Exception as err:
        print(f"profile: {type(err).__name__}: {err}"[:200])
    columns = ["model", "mode", "impl", "batch", "ms", "min_ms", "max_ms", "img_s", "mfu_pct", "peak_gib",
               "reserved_gib", "x_timm", "x_timm_compile", "x_timm_ro", "error"]
    harness.print_table(rows, columns, title="ViT end to end, bf16 (inference: bf16 weights; train: AMP + fused AdamW)")
    summarize(rows)
    out_dir = harness.write_results("vit", rows, plot_key="img_s", label_keys=("model", "mode", "impl", "batch"),
                                    extra={"profile": profile})
    print("results in", out_dir)


def summarize(rows):
    """The ViT-B/16 rows against the goals in perf/TARGETS.md."""
    def get(mode, impl, batch):
        for r in rows:
            if (r["model"], r["mode"], r["impl"], r["batch"]) == ("vit_base_patch16_224", mode, impl, batch):
                return r if r.get("img_s") else None
        return None

    def ratio(r, key):
        return f"{r[key]:.2f}x" if r and r.get(key) else "n/a"

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
    print("no CUDA GPU: nothing of vit_fast's GPU performance is measured here (no inference latency or "
          "throughput, no CUDA-graph replay, no torch.compile, no training step, no peak memory, no kernel "
          "profile); timing a tiny ViT forward on the CPU (PyTorch path) instead")
    os.environ[dispatch.FORCE_TORCH_ENV] = "1"
    torch.manual_seed(0)
    ref = reference.create_reference("vit_tiny_patch16_224").eval()
    model = vit_fast.vit_tiny_patch16_224().eval()
    model.load_state_dict(ref.state_dict())
    runner = vit_fast.inference(model)  # CPU tensors: runs the model eagerly
    x = torch.randn(4, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(runner(x), model(x), rtol=0, atol=0)
        rows = []
        for impl, m in (("vit_fast (PyTorch path)", model), ("vit_fast.inference (eager on CPU)", runner),
                        ("reference", ref)):
            ms = harness.bench_cpu_ms(lambda: m(x), reps=3)
            rows.append({"model": "vit_tiny_patch16_224", "impl": impl, "batch": len(x), "ms": ms,
                         "img_s": len(x) / ms * 1e3})
    harness.print_table(rows, title=f"CPU forward, fp32 ({harness.device_name()}, {torch.get_num_threads()} threads)")
    s = harness.stamp()
    print(f"commit {s['commit']}{' (dirty)' if s['dirty'] else ''}, torch {s['torch']}, Triton {s['triton']}; "
          "no files written")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="ViT-B/16 only; compiled inference rows only at the batch each goal is judged at; "
                             "no compiled training rows")
    parser.add_argument("--no-compile", action="store_true", help="no torch.compile rows")
    args = parser.parse_args()
    if harness.has_gpu():
        run_gpu(args.quick, not args.no_compile)
    else:
        run_cpu()


if __name__ == "__main__":
    main()
