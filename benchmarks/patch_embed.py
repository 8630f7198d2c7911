"""Patch embedding: uint8 images (channels_last, as decoders produce them) -> tokens with cls and pos.

GPU: vit_fast (gather + cuBLAS GEMM + epilogue) against the eager pipeline (to float, normalize,
conv2d, flatten, transpose, cat cls, add pos: `vit_fast.reference.patch_embed`), its
torch.compile, and cuDNN's conv2d alone on already-normalized input; forward and forward+backward
(weight, bias, cls and pos gradients); milliseconds, images/s, and GB/s of the bytes the op must
move (uint8 images in, tokens out, weights) as a fraction of the measured copy bandwidth.
No GPU: times the C++ CPU path against the eager CPU pipeline on a small batch.

    python benchmarks/patch_embed.py [--quick]
"""
import argparse

import torch
import torch.nn.functional as F

import harness
from vit_fast import functional as VF
from vit_fast import reference

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

CONFIGS = [  # name, batch, image size, patch, embed dim
    ("ViT-B/16 b256", 256, 224, 16, 768),
    ("ViT-L/16 b128", 128, 224, 16, 1024),
    ("ViT-H/14 b128", 128, 224, 14, 1280),
    ("ViT-B/16@384 b64", 64, 384, 16, 768),
]


def make_inputs(batch, img, patch, dim, dtype, device, requires_grad=False):
    tokens = (img // patch) ** 2 + 1
    x = torch.randint(0, 256, (batch, 3, img, img), dtype=torch.uint8, device=device)
    params = dict(
        weight=torch.randn(dim, 3, patch, patch, dtype=dtype, device=device) * 0.02,
        bias=torch.randn(dim, dtype=dtype, device=device) * 0.02,
        cls_token=torch.randn(1, 1, dim, dtype=dtype, device=device) * 1e-6,
        pos_embed=torch.randn(1, tokens, dim, dtype=dtype, device=device) * 0.02,
    )
    for p in params.values():
        p.requires_grad_(requires_grad)
    # mean/std as device tensors: a Python tuple would cost a host-to-device copy per call
    norm = dict(mean=torch.tensor(IMAGENET_MEAN, device=device), std=torch.tensor(IMAGENET_STD, device=device))
    return x.contiguous(memory_format=torch.channels_last), params, norm


def vit_fast_fn(x, params, norm):
    return VF.patch_embed(x, params["weight"], params["bias"], cls_token=params["cls_token"],
                          pos_embed=params["pos_embed"], mean=norm["mean"], std=norm["std"])


def eager_fn(x, params, norm):
    return reference.patch_embed(x, params["weight"], params["bias"], params["cls_token"], params["pos_embed"],
                                 norm["mean"], norm["std"])


def bytes_moved(x, params, batch, tokens, dim):
    """What any implementation must read and write: uint8 images, weights, tokens out."""
    weights = sum(p.numel() * p.element_size() for p in params.values())
    return x.numel() * x.element_size() + weights + batch * tokens * dim * params["weight"].element_size()


def run_gpu(configs, device="cuda"):
    """Times every implementation; each row is printed as soon as it is measured, and one that
    fails is reported and skipped, so the rows before it still reach the table and the files."""
    ceil = harness.ceilings()
    print(f"{harness.device_name()}: bf16 matmul {ceil['matmul_tflops']:.0f} TFLOP/s, copy {ceil['copy_gbps']:.0f} GB/s")
    eager_compiled = torch.compile(eager_fn)
    rows, failures = [], []
    for name, batch, img, patch, dim in configs:
        tokens = (img // patch) ** 2 + 1
        x, params, norm = make_inputs(batch, img, patch, dim, torch.bfloat16, device)
        x_float = ((x / 255 - norm["mean"].view(1, 3, 1, 1)) / norm["std"].view(1, 3, 1, 1)).to(torch.bfloat16)
        limit_bytes = bytes_moved(x, params, batch, tokens, dim)
        shape = f"{name} [{batch},3,{img},{img}] -> [{batch},{tokens},{dim}]"
        torch.testing.assert_close(vit_fast_fn(x, params, norm).float(), eager_fn(x, params, norm).float(),
                                   rtol=5e-2, atol=5e-2)
        forward = {
            "vit_fast": lambda: vit_fast_fn(x, params, norm),
            "eager": lambda: eager_fn(x, params, norm),
            "torch.compile": lambda: eager_compiled(x, params, norm),
            "cuDNN conv2d alone": lambda: F.conv2d(x_float, params["weight"], params["bias"], stride=patch),
        }
        timings = _measure(shape, "fwd", forward, batch, failures)
        timings["bytes-moved limit"] = limit_bytes / ceil["copy_gbps"] / 1e6
        rows += _rows(shape, "fwd", timings, batch, limit_bytes, ceil)

        # New leaf tensors in a new dict, not requires_grad_() on the forward's: torch.compile takes a
        # tensor in an unchanged dict as unchanged and would rerun its no-grad forward graph.
        train_params = {key: p.detach().clone().requires_grad_(True) for key, p in params.items()}
        grad_out = torch.randn(batch, tokens, dim, dtype=torch.bfloat16, device=device)
        leaves = list(train_params.values())

        def train_step(fn):
            return lambda: torch.autograd.grad(fn(x, train_params, norm), leaves, grad_out)

        train = {impl: train_step(fn) for impl, fn in
                 (("vit_fast", vit_fast_fn), ("eager", eager_fn), ("torch.compile", eager_compiled))}
        rows += _rows(shape, "fwd+bwd", _measure(shape, "fwd+bwd", train, batch, failures), batch, None, ceil)
        del x, x_float, params, train_params, grad_out, leaves
        torch.cuda.empty_cache()
    harness.print_table(rows, title="patch embedding, uint8 channels_last images -> bf16 tokens with cls and pos")
    print(f"results in {harness.write_results('patch_embed', rows, plot_key='img_per_s', label_keys=('shape', 'mode', 'impl'))}")
    if failures:
        raise SystemExit("failed: " + "; ".join(failures))


def _measure(shape, mode, fns, batch, failures):
    """{impl: ms} of the implementations that ran; prints each as it is measured."""
    timings = {}
    for impl, fn in fns.items():
        try:
            timings[impl] = harness.bench_ms(fn)
        except Exception as error:  # noqa: BLE001  (reported, and the other rows still run)
            failures.append(f"{shape} {mode} {impl}: {type(error).__name__}: {error}")
            print(f"{shape} {mode} {impl}: FAILED {type(error).__name__}: {error}", flush=True)
            continue
        print(f"{shape} {mode} {impl}: {timings[impl]:.3f} ms, {batch / timings[impl] * 1e3:,.0f} img/s", flush=True)
    return timings


def _rows(shape, mode, timings, batch, limit_bytes, ceil):
    rows = []
    for impl, ms in timings.items():
        row = dict(shape=shape, mode=mode, impl=impl, ms=ms, img_per_s=batch / ms * 1e3,
                   x_vs_eager=timings["eager"] / ms if "eager" in timings else None,
                   x_vs_compile=timings["torch.compile"] / ms if "torch.compile" in timings else None)
        if limit_bytes is not None:
            row["GB_per_s"] = limit_bytes / ms / 1e6
            row["pct_of_copy"] = 100 * row["GB_per_s"] / ceil["copy_gbps"]
        rows.append(row)
    return rows


def run_cpu(quick):
    print("no CUDA GPU: H100 numbers not measured; timing the C++ CPU path against the eager CPU pipeline instead")
    batch = 4 if quick else 16
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        x, params, norm = make_inputs(batch, 224, 16, 768, dtype, "cpu")
        shape = f"ViT-B/16 [{batch},3,224,224] uint8 -> [{batch},197,768] {str(dtype).replace('torch.', '')}"
        timings = {"vit_fast (C++)": harness.bench_cpu_ms(lambda: vit_fast_fn(x, params, norm)),
                   "eager": harness.bench_cpu_ms(lambda: eager_fn(x, params, norm))}
        rows += [dict(shape=shape, impl=impl, ms=ms, img_per_s=batch / ms * 1e3, x_vs_eager=timings["eager"] / ms)
                 for impl, ms in timings.items()]
    harness.print_table(rows, title=f"patch embedding on {harness.device_name()}, {torch.get_num_threads()} threads")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="ViT-B/16 b256 only (GPU) / batch 4 (CPU)")
    args = parser.parse_args()
    if harness.has_gpu():
        run_gpu(CONFIGS[:1] if args.quick else CONFIGS)
    else:
        run_cpu(args.quick)


if __name__ == "__main__":
    main()
