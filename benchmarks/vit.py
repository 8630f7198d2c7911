"""The whole ViT end to end: inference and training throughput, vit_fast against timm, bf16.

    python benchmarks/vit.py            # ViT-S/16, B/16, L/16 at 224 and B/16 at 384
    python benchmarks/vit.py --quick    # ViT-B/16 only, no compiled training rows (a short GPU lease)

Each model, side by side in one run: vit_fast eager, vit_fast under torch.compile, timm eager
(SDPA attention) and torch.compile(timm). Without timm installed, the reference model with SDPA
attention stands in for timm, labelled "timm-style (reference+SDPA)".
- inference: bf16 weights, eval, no grad, batch 256 (ViT-L: 128), bf16 normalized images in; one
  more vit_fast row takes the uint8 images and normalizes them inside its patch embedding;
- training step: fp32 weights, AMP bf16 autocast, fused AdamW, batch 128, forward + backward +
  optimizer step; peak memory = the most allocated during a step (weights and optimizer state in).
images/s, MFU = forward FLOPs (x3 for a training step) per second / the measured bf16 matmul peak
(FLOPs = 2 x MACs; ViT-B/16 forward: 17.56 GMACs per image), ratios to timm eager and to
torch.compile(timm); graph_img_s, each inference row replayed from a CUDA graph (launch gaps gone:
where it is well above img_s, the host's launch path costs throughput at that batch). Without a GPU: says so, times a tiny ViT forward on the CPU (PyTorch path),
writes no files, exits 0.
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

# (model name, inference batch): batches that fill an H100, as in perf/TARGETS.md
MODELS = [("vit_small_patch16_224", 256), ("vit_base_patch16_224", 256), ("vit_large_patch16_224", 128),
          ("vit_base_patch16_384", 256)]
QUICK = ("vit_base_patch16_224",)
TRAIN_BATCH = 128
IMPLS = ("timm eager", "timm compile", "vit_fast", "vit_fast compile")


def forward_macs(name, num_classes=1000):
    """Multiply-accumulates of one image's forward: patch embedding, blocks (linears and attention), head."""
    cfg = {"img_size": 224, **reference.CONFIGS[name]}
    e, p = cfg["embed_dim"], cfg["patch_size"]
    patches = (cfg["img_size"] // p) ** 2
    n = patches + 1
    per_block = 12 * n * e * e + 2 * n * n * e  # qkv 3NE^2, proj NE^2, MLP 8NE^2; QK^T and AV N^2 E each
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


def maybe_compile(impl, model):
    return torch.compile(model) if impl.endswith("compile") else model


def images(batch, img_size, dtype):
    x = torch.randint(0, 256, (batch, 3, img_size, img_size), dtype=torch.uint8, device="cuda")
    return x if dtype == torch.uint8 else (x.to(dtype) / 127.5 - 1)


def measure_inference(impl, name, batch, img_size, quick, uint8=False):
    model, label = build(impl, name)
    model = maybe_compile(impl, model.bfloat16().eval())
    x = images(batch, img_size, torch.uint8 if uint8 else torch.bfloat16)
    reps = dict(warmup=50 if quick else 100, rep=200 if quick else 500)
    with torch.no_grad():
        model(x)  # compile (when compiling) and warm up outside the timing
        ms = harness.bench_ms(lambda: model(x), **reps)
        graph_ms = harness.graph_ms_or_none(f"{name} {impl}", lambda: model(x), **reps)
        peak = torch.cuda.memory_allocated() / 2**20 + harness.peak_memory_mib(lambda: model(x))
    return ms, graph_ms, peak / 1024, label


def measure_training(impl, name, img_size, quick):
    model, label = build(impl, name)
    model = maybe_compile(impl, model.train())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = images(TRAIN_BATCH, img_size, torch.float32)
    y = torch.randint(0, 1000, (TRAIN_BATCH,), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # compile, and allocate the optimizer state
    ms = harness.bench_ms(step, warmup=100 if quick else 200, rep=300 if quick else 1000)
    peak = torch.cuda.memory_allocated() / 2**20 + harness.peak_memory_mib(step)
    return ms, peak / 1024, label


def row(name, mode, impl, label, batch, ms, peak_gib, flops_per_image, peak_tflops):
    img_s = batch / ms * 1e3
    return {"model": name, "mode": mode, "impl": impl, "source": label, "batch": batch, "ms": ms, "img_s": img_s,
            "mfu_pct": 100 * img_s * flops_per_image / (peak_tflops * 1e12), "peak_gib": peak_gib}


def add_ratios(rows):
    """Each row's img/s over timm eager's and torch.compile(timm)'s for the same model and mode."""
    base = {(r["model"], r["mode"], r["impl"]): r["img_s"] for r in rows if r.get("img_s")}
    for r in rows:
        if r.get("img_s"):
            for peer, key in (("timm eager", "x_timm"), ("timm compile", "x_timm_compile")):
                ref = base.get((r["model"], r["mode"], peer))
                r[key] = r["img_s"] / ref if ref else ""


def run_gpu(quick):
    peak_tflops = harness.ceilings()["matmul_tflops"]
    print(f"{harness.device_name()}: bf16 matmul peak {peak_tflops:.0f} TFLOP/s (measured now)")
    assert round(forward_macs("vit_base_patch16_224") / 1e9, 2) == 17.56
    rows = []
    for name, batch in MODELS:
        if quick and name not in QUICK:
            continue
        img_size = reference.CONFIGS[name].get("img_size", 224)
        flops = 2 * forward_macs(name)
        jobs = [("inference", impl, False) for impl in IMPLS] + [("inference", "vit_fast", True)]
        # --quick: the training goals compare with timm eager only; skipping two compiles fits a short lease
        jobs += [("train", impl, False) for impl in IMPLS if not (quick and impl.endswith("compile"))]
        for mode, impl, uint8 in jobs:
            label_impl = impl + (" (uint8 in)" if uint8 else "")
            try:
                if mode == "inference":
                    ms, graph_ms, peak, label = measure_inference(impl, name, batch, img_size, quick, uint8)
                    rows.append(row(name, mode, label_impl, label, batch, ms, peak, flops, peak_tflops))
                    rows[-1]["graph_img_s"] = batch / graph_ms * 1e3 if graph_ms else ""
                else:
                    ms, peak, label = measure_training(impl, name, img_size, quick)
                    rows.append(row(name, mode, label_impl, label, TRAIN_BATCH, ms, peak, 3 * flops, peak_tflops))
                r = rows[-1]
                print(f"{name} {mode} {label_impl}: {r['img_s']:,.0f} img/s, {r['ms']:.2f} ms, "
                      f"MFU {r['mfu_pct']:.1f}%, peak {r['peak_gib']:.2f} GiB", flush=True)
            except Exception as err:  # one failing peer must not cost the rest of a GPU lease
                error = f"{type(err).__name__}: {err}"[:200]
                rows.append({"model": name, "mode": mode, "impl": label_impl, "error": error})
                print(f"{name} {mode} {label_impl}: {error}")
            torch._dynamo.reset()
            torch.cuda.empty_cache()
    add_ratios(rows)
    columns = ["model", "mode", "impl", "batch", "ms", "img_s", "mfu_pct", "peak_gib", "x_timm", "x_timm_compile",
               "graph_img_s"]
    harness.print_table(rows, columns, title="ViT end to end, bf16 (inference: bf16 weights; train: AMP + fused AdamW)")
    for r in rows:
        if r["model"] == "vit_base_patch16_224" and r["impl"] == "vit_fast" and r.get("img_s"):
            goal = ">= 1.3x timm eager, >= 1.05x compile(timm)" if r["mode"] == "inference" else \
                ">= 1.2x timm eager, peak <= timm's"
            print(f"ViT-B/16 {r['mode']}: {r['img_s']:,.0f} img/s = {r['x_timm'] or 0:.2f}x timm eager, "
                  f"{r['x_timm_compile'] or 0:.2f}x compile(timm), peak {r['peak_gib']:.2f} GiB (goal {goal})")
    print("results in", harness.write_results("vit", rows, plot_key="img_s", label_keys=("model", "mode", "impl")))


def run_cpu():
    print("no CUDA GPU: vit_fast's end-to-end throughput is not measured; timing a tiny ViT forward on the "
          "CPU (PyTorch path) instead")
    os.environ[dispatch.FORCE_TORCH_ENV] = "1"
    torch.manual_seed(0)
    ref = reference.create_reference("vit_tiny_patch16_224").eval()
    model = vit_fast.vit_tiny_patch16_224().eval()
    model.load_state_dict(ref.state_dict())
    x = torch.randn(4, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-4)
        rows = []
        for impl, m in (("vit_fast (PyTorch path)", model), ("reference", ref)):
            ms = harness.bench_cpu_ms(lambda: m(x), reps=3)
            rows.append({"model": "vit_tiny_patch16_224", "impl": impl, "batch": len(x), "ms": ms,
                         "img_s": len(x) / ms * 1e3})
    harness.print_table(rows, title=f"CPU forward, fp32 ({harness.device_name()}, {torch.get_num_threads()} threads)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="ViT-B/16 only, no compiled training rows")
    args = parser.parse_args()
    if harness.has_gpu():
        run_gpu(args.quick)
    else:
        run_cpu()


if __name__ == "__main__":
    main()
