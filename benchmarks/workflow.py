"""The classification workflow's throughput: loader, model-only training step, end to end.

    python benchmarks/workflow.py [--quick] [--workers N]

Writes a folder of synthetic photo-sized JPEGs (500x375, 10 classes), then measures, in images/s:
  - loader: the training DataLoader alone (Pillow JPEG decode + random resized crop + flip, uint8,
    in N worker processes), as ``vit_fast.train`` builds it;
  - model-only step: ``vit_fast.loop.train_step`` (the eager step ``vit_fast.train`` runs) on a
    uint8 batch already on the device; on a GPU also the step replayed from a CUDA graph
    (``vit_fast.capture_train_step``, what ``--cuda-graph`` runs);
  - end to end: ``vit_fast.train.main`` on the folder (same model, batch, N workers), the images/s
    of its second epoch (the first compiles kernels and starts the workers); on a GPU also with
    ``--cuda-graph``;
and says which part limits the end-to-end number: the slower of the loader and the step, and how
much of it end to end keeps. Results go to benchmarks/results/<device>/workflow.json stamped with
the commit (``harness.stamp()``: commit, dirty, time, versions).

On a GPU: ViT-B/16 at 224, batch 128, bf16 autocast, fused AdamW. Without one: a tiny CPU
version (ViT-Ti/16 cut to 2 blocks at 64 px, batch 16, fp32) that proves the pipeline runs and
says which side limits on this host; the GPU rows (ViT-B/16 numbers, the captured step,
``--cuda-graph`` end to end) are not measured and are said to be missing.
"""
import argparse
import contextlib
import csv
import io
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import vit_fast  # noqa: E402
from vit_fast import data, loop, optimization, run_files, train  # noqa: E402

CLASSES = 10
IMAGE_SIZE = (500, 375)  # a typical ImageNet photo
# (model, --model-arg values, image size, batch, bf16) on a GPU and on the CPU
GPU_SETUP = ("vit_base_patch16_224", {}, 224, 128, True)
CPU_SETUP = ("vit_tiny_patch16_224", {"depth": 2}, 64, 16, False)


def host_cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def write_jpeg(args):
    path, seed = args
    rng = np.random.default_rng(seed)
    h, w = IMAGE_SIZE[1], IMAGE_SIZE[0]
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * (1 + seed % 3), y * (1 + seed % 5), x + y], axis=-1) % 256
    pixels = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)  # photo-like entropy
    Image.fromarray(pixels).save(path, quality=90)


def make_folder(root, per_class_train, per_class_val, workers):
    jobs = []
    for split, count in (("train", per_class_train), ("val", per_class_val)):
        for c in range(CLASSES):
            folder = root / split / f"class_{c:02d}"
            folder.mkdir(parents=True)
            jobs += [(folder / f"{i}.jpg", len(jobs)) for i in range(count)]
    with ProcessPoolExecutor(max(1, workers)) as pool:
        list(pool.map(write_jpeg, jobs, chunksize=64))


def loader_images_per_s(root, img, batch, workers, batches):
    train_dir = root / "train"
    samples = data.scan_split(train_dir, data.find_classes(train_dir))
    dataset = data.ImageDataset(samples, img, augment=True)
    sampler = data.EpochSampler(torch.utils.data.RandomSampler(dataset, generator=torch.Generator().manual_seed(0)))
    loader = data.make_loader(dataset, batch, workers, sampler)
    it = iter(loader)
    next(it)  # workers started, first batch decoded
    start, images = time.perf_counter(), 0
    for _, b in zip(range(batches), it):
        images += b.images.shape[0]
    return images / (time.perf_counter() - start)


def model_only_images_per_s(setup, device, captured=False):
    """The training step alone on a uint8 batch already on ``device`` (as vit_fast.train runs it)."""
    name, kwargs, img, batch, amp = setup
    torch.manual_seed(0)
    model = run_files.build_model(name, 1000, img, kwargs).to(device).train()
    opts = argparse.Namespace(optimizer="adamw", lr=1e-4, weight_decay=0.05)
    optimizer = optimization.make_optimizer(model, opts, device, capturable=captured)
    images = torch.randint(0, 256, (batch, img, img, 3), dtype=torch.uint8, device=device).permute(0, 3, 1, 2)
    labels = torch.randint(0, 1000, (batch,), device=device)
    if captured:
        optimization.use_tensor_lr(optimizer, device)
        step = vit_fast.capture_train_step(model, optimizer, lambda logits, y: F.cross_entropy(logits.float(), y),
                                           images, labels, amp_dtype=torch.bfloat16 if amp else None)
        return batch / harness.bench_ms(lambda: step(images, labels), warmup=200, rep=1000) * 1e3

    def eager():
        loop.train_step(model, optimizer, images, labels, device, amp, 0.1)

    if device.type == "cuda":
        return batch / harness.bench_ms(eager, warmup=200, rep=1000) * 1e3
    return batch / harness.bench_cpu_ms(eager, reps=10) * 1e3  # median of 10: a shared host is noisy


def end_to_end_images_per_s(root, setup, workers, device, *extra):
    """vit_fast.train.main on the folder for 2 epochs: the second epoch's images/s."""
    name, kwargs, img, batch, amp = setup
    run = root / ("run" + "".join(extra))
    argv = ["--data", str(root), "--model", name, "--img-size", str(img), "--batch-size", str(batch),
            "--epochs", "2", "--workers", str(workers), "--device", device.type, "--out", str(run), *extra]
    argv += [arg for key, value in kwargs.items() for arg in ("--model-arg", f"{key}={value}")]
    if amp:
        argv.append("--amp")
    with contextlib.redirect_stdout(io.StringIO()):
        train.main(argv)
    with open(run / "metrics.csv", newline="") as f:
        return float(list(csv.DictReader(f))[-1]["images_per_s"])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer images")
    p.add_argument("--workers", type=int, default=host_cores(), help="decoding processes (default: this host's cores)")
    args = p.parse_args()
    gpu = harness.has_gpu()
    device = torch.device("cuda" if gpu else "cpu")
    setup = GPU_SETUP if gpu else CPU_SETUP
    name, kwargs, img, batch, amp = setup
    shape = f"{name}{''.join(f' {k}={v}' for k, v in kwargs.items())} {img}px b{batch} {'bf16' if amp else 'fp32'}"
    stamp = harness.stamp()
    print(f"commit {stamp['commit']}{' (dirty: uncommitted changes)' if stamp['dirty'] else ''}, {stamp['device']}, "
          f"{args.workers} loader workers of {host_cores()} cores")
    not_measured = []
    if not gpu:
        not_measured = ["ViT-B/16 b128 bf16 (the GPU setup)", "the CUDA-graph captured step",
                        "end to end with --cuda-graph"]
        print(f"no CUDA GPU: a tiny CPU version ({shape}); not measured: {', '.join(not_measured)}")
    per_class = ((160 if args.quick else 400) if gpu else (8 if args.quick else 16))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_folder(root, per_class, 2, args.workers)
        loader = loader_images_per_s(root, img, batch, args.workers, max(1, per_class * CLASSES // batch - 1))
        rows = [{"shape": f"{IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} jpeg -> {img}", "impl": f"loader, {args.workers} workers",
                 "images_per_s": loader}]
        step = model_only_images_per_s(setup, device)
        rows.append({"shape": shape, "impl": "model-only train step", "images_per_s": step})
        if gpu:
            captured = model_only_images_per_s(setup, device, captured=True)
            rows.append({"shape": shape, "impl": "model-only train step, CUDA graph", "images_per_s": captured,
                         "of_eager_step": captured / step})
        end_to_end = end_to_end_images_per_s(root, setup, args.workers, device)
        slower = min(loader, step)
        rows.append({"shape": shape, "impl": "vit_fast.train end to end", "images_per_s": end_to_end,
                     "of_model_only": end_to_end / step, "of_slower_part": end_to_end / slower})
        if gpu:
            graphed = end_to_end_images_per_s(root, setup, args.workers, device, "--cuda-graph")
            rows.append({"shape": shape, "impl": "vit_fast.train end to end --cuda-graph", "images_per_s": graphed,
                         "of_model_only": graphed / captured, "of_eager_end_to_end": graphed / end_to_end})
    for row in rows:
        row["commit"] = stamp["commit"]
    harness.print_table(rows, title="classification workflow throughput")
    limiter = (f"data loading (the loader gives {loader:.0f} img/s, the step takes {step:.0f})" if loader < step
               else f"the training step (it takes {step:.0f} img/s, the loader gives {loader:.0f})")
    print(f"end to end: {end_to_end:.0f} img/s, {end_to_end / slower:.0%} of the slower part; limited by {limiter}")
    if end_to_end < 0.8 * slower:
        where = ("here the loader's workers and the step share the same CPU cores, which the separate rows do not"
                 if not gpu else "host-to-device copies, the Python loop and the wait for the next batch")
        print(f"neither part alone explains the gap to {slower:.0f} img/s: it goes between them, which this "
              f"benchmark does not split ({where})")
    if not gpu:
        print(f"not measured without a GPU: {', '.join(not_measured)}")
    out = harness.write_results("workflow", rows, plot_key="images_per_s",
                                extra={"limited_by": "loader" if loader < step else "step",
                                       "not_measured": not_measured})
    print(f"results: {out}/workflow.json")


if __name__ == "__main__":
    main()
