"""Patch embedding: uint8 images (channels_last, as decoders produce them) -> tokens with cls and pos.

GPU: vit_fast (gather + cuBLAS GEMM + epilogue) against the eager pipeline (to float, normalize,
conv2d, flatten, transpose, cat cls, add pos: `vit_fast.reference.patch_embed`), its
torch.compile, and cuDNN's conv2d alone on already-normalized input; forward and forward+backward
(weight, bias, cls and pos gradients); milliseconds, images/s, and GB/s of the bytes the op must
move (uint8 images in, tokens out, weights) as a fraction of the measured copy bandwidth, and the
time those bytes take at copy bandwidth (the "bytes-moved limit" row); graph_ms, each replayed from
a CUDA graph. The loop, timing, table and files are harness.run_benchmark's.
No GPU: says so, times the C++ CPU path against the eager CPU pipeline on a small batch, exits 0.

    python benchmarks/patch_embed.py [--quick]
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from vit_fast import functional as VF  # noqa: E402
from vit_fast import reference  # noqa: E402

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

TARGET = ("ViT-B/16 b256", 10.0, 7.0)  # forward >= 10x eager and >= 7x torch.compile
CPU_CONFIG = (224, 16, 768)  # image size, patch, embed dim of the no-GPU timing (ViT-B/16)
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


def bytes_moved(batch, img, patch, dim, element_size=2):
    """What any implementation must read and write: uint8 images, weights (conv weight, bias, cls, pos), tokens out."""
    tokens = (img // patch) ** 2 + 1
    weights = dim * 3 * patch * patch + dim + dim + tokens * dim
    return batch * 3 * img * img + (weights + batch * tokens * dim) * element_size


def _setup(case):
    """The case's inputs (checked against the eager pipeline first) and its training leaves."""
    batch, img, patch, dim = case["dims"]
    x, params, norm = make_inputs(batch, img, patch, dim, torch.bfloat16, harness.DEVICE)
    torch.testing.assert_close(vit_fast_fn(x, params, norm).float(), eager_fn(x, params, norm).float(),
                               rtol=5e-2, atol=5e-2)
    # New leaf tensors in a new dict, not requires_grad_() on the forward's: torch.compile takes a
    # tensor in an unchanged dict as unchanged and would rerun its no-grad forward graph.
    train = {key: p.detach().clone().requires_grad_(True) for key, p in params.items()}
    x_float = ((x / 255 - norm["mean"].view(1, 3, 1, 1)) / norm["std"].view(1, 3, 1, 1)).to(torch.bfloat16)
    grad_out = torch.randn(batch, (img // patch) ** 2 + 1, dim, dtype=torch.bfloat16, device=harness.DEVICE)
    return dict(x=x, params=params, norm=norm, train=train, x_float=x_float, grad_out=grad_out, stride=patch)


def _peer(fn):
    def make(t, mode):
        if mode == "fwd":
            return lambda: fn(t["x"], t["params"], t["norm"])
        leaves = list(t["train"].values())
        return lambda: torch.autograd.grad(fn(t["x"], t["train"], t["norm"]), leaves, t["grad_out"])
    return make


def _conv_alone(t, mode):
    if mode == "fwd":
        return lambda: F.conv2d(t["x_float"], t["params"]["weight"], t["params"]["bias"], stride=t["stride"])
    return None


def _flops(case, mode):
    batch, img, patch, dim = case["dims"]
    return 2 * batch * (img // patch) ** 2 * 3 * patch * patch * dim if mode == "fwd" else None


def _nbytes(case, mode):
    return bytes_moved(*case["dims"]) if mode == "fwd" else None  # none counted for fwd+bwd


def run_gpu(configs):
    """Every implementation, each row printed as soon as it is measured; one that fails is reported and
    skipped, so the rows before it still reach the table and the files (and the run then exits 1)."""
    ceil = harness.ceilings()
    print(f"{harness.device_name()}: bf16 matmul {ceil['matmul_tflops']:.0f} TFLOP/s, copy {ceil['copy_gbps']:.0f} GB/s")
    compiled = torch.compile(eager_fn)
    cases = [{"shape": f"{name} [{b},3,{img},{img}] -> [{b},{(img // p) ** 2 + 1},{dim}]", "dims": (b, img, p, dim)}
             for name, b, img, p, dim in configs]
    rows = harness.run_benchmark(
        "patch_embed", cases, {"vit_fast": _peer(vit_fast_fn), "eager": _peer(eager_fn),
                               "torch.compile": _peer(compiled), "cuDNN conv2d alone": _conv_alone},
        ("fwd", "fwd+bwd"), setup=_setup, flops=_flops, nbytes=_nbytes, limit_row=True,
        ratios={"x_vs_eager": lambda impl: impl == "eager", "x_vs_compile": lambda impl: impl == "torch.compile"},
        derive=lambda case, mode, row: {"img_per_s": case["dims"][0] / row["ms"] * 1e3},
        columns=["shape", "mode", "impl", "ms", "min_ms", "max_ms", "img_per_s", "x_vs_eager", "x_vs_compile",
                 "tflops", "gbps", "pct_copy", "graph_ms", "graph_x_vs_eager", "graph_x_vs_compile", "error"],
        title="patch embedding, uint8 channels_last images -> bf16 tokens with cls and pos",
        plot_key="img_per_s", label_keys=("shape", "mode", "impl"))
    target = next((r for r in rows if r["shape"].startswith(TARGET[0]) and r["mode"] == "fwd"
                   and r["impl"] == "vit_fast" and isinstance(r.get("x_vs_eager"), float)), None)
    if target and isinstance(target.get("x_vs_compile"), float):
        for key, goal in (("x_vs_eager", TARGET[1]), ("x_vs_compile", TARGET[2])):
            print(f"{'met   ' if target[key] >= goal else 'MISSED'} {TARGET[0]} fwd vit_fast {key} "
                  f"{target[key]:.2f} (goal >= {goal})")
    failures = [f"{r['shape']} {r['mode']} {r['impl']}: {r['error']}" for r in rows if "error" in r]
    if failures:
        raise SystemExit("failed: " + "; ".join(failures))


def run_cpu(quick):
    batch = 4 if quick else 16
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        img, patch, dim = CPU_CONFIG
        x, params, norm = make_inputs(batch, img, patch, dim, dtype, "cpu")
        shape = (f"[{batch},3,{img},{img}] uint8 -> [{batch},{(img // patch) ** 2 + 1},{dim}] "
                 f"{str(dtype).replace('torch.', '')}")
        timings = {"vit_fast (C++)": harness.bench_cpu_stats(lambda: vit_fast_fn(x, params, norm)),
                   "eager": harness.bench_cpu_stats(lambda: eager_fn(x, params, norm))}
        rows += [dict(shape=shape, impl=impl, **stats, img_per_s=batch / stats["ms"] * 1e3,
                      x_vs_eager=timings["eager"]["ms"] / stats["ms"]) for impl, stats in timings.items()]
    harness.print_table(rows, title=f"patch embedding on {harness.device_name()}, {torch.get_num_threads()} threads")


def main(argv=None):
    harness.main(argv, __doc__.splitlines()[0], {"--quick": "ViT-B/16 b256 only (GPU) / batch 4 (CPU)"},
                 lambda args: run_gpu(CONFIGS[:1] if args.quick else CONFIGS), lambda args: run_cpu(args.quick),
                 "GPU numbers not measured; timing the C++ CPU path against the eager CPU pipeline instead")


if __name__ == "__main__":
    main()
