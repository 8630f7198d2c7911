"""The classification workflow's throughput (issue 10): loader, model-only train step, end to end.

    python benchmarks/workflow.py [--quick] [--workers N]

Writes a folder of synthetic ImageNet-sized JPEGs (500x375, 10 classes), then measures
  - loader: images/s of the training DataLoader alone (Pillow JPEG decode + random resized crop
    + flip, uint8, in N worker processes);
  - model only: ViT-B/16 at 224, batch 128, bf16 autocast + fused AdamW, one training step on a
    uint8 batch already on the GPU (what benchmarks/vit.py times);
  - end to end: `python -m vit_fast.train` (same model, batch, --amp, N workers), the images/s of
    its second epoch (the first compiles the kernels and starts the workers),
and says which part limits the end-to-end number. Without a GPU only the loader is measured.
"""
import argparse
import csv
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

from vit_fast import data, train  # noqa: E402

CLASSES = 10
IMAGE_SIZE = (500, 375)  # a typical ImageNet photo
MODEL, IMG, BATCH = "vit_base_patch16_224", 224, 128


def write_jpeg(args):
    path, seed = args
    rng = np.random.default_rng(seed)
    h, w = IMAGE_SIZE[1], IMAGE_SIZE[0]
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * (1 + seed % 3), y * (1 + seed % 5), x + y], axis=-1) % 256
    pixels = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)  # photo-like entropy
    Image.fromarray(pixels).save(path, quality=90)


def make_folder(root, per_class_train, per_class_val):
    jobs = []
    for split, count in (("train", per_class_train), ("val", per_class_val)):
        for c in range(CLASSES):
            folder = root / split / f"class_{c:02d}"
            folder.mkdir(parents=True)
            jobs += [(folder / f"{i}.jpg", len(jobs)) for i in range(count)]
    with ProcessPoolExecutor() as pool:
        list(pool.map(write_jpeg, jobs, chunksize=64))


def loader_images_per_s(root, workers, batches):
    train_dir = root / "train"
    samples = data.scan_split(train_dir, data.find_classes(train_dir))
    dataset = data.ImageDataset(samples, IMG, augment=True)
    sampler = data.EpochSampler(torch.utils.data.RandomSampler(dataset, generator=torch.Generator().manual_seed(0)))
    loader = data.make_loader(dataset, BATCH, workers, sampler)
    it = iter(loader)
    next(it)  # workers started, first batch decoded
    start, images = time.perf_counter(), 0
    for _, batch in zip(range(batches), it):
        images += batch.images.shape[0]
    return images / (time.perf_counter() - start)


def model_only_images_per_s():
    model = train.build_model(MODEL, 1000, IMG).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    images = torch.randint(0, 256, (BATCH, IMG, IMG, 3), dtype=torch.uint8, device="cuda").permute(0, 3, 1, 2)
    labels = torch.randint(0, 1000, (BATCH,), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(images).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return BATCH / harness.bench_ms(step, warmup=500, rep=2000) * 1e3


def end_to_end_images_per_s(root, workers):
    run = root / "run"
    train.main(["--data", str(root), "--model", MODEL, "--img-size", str(IMG), "--batch-size", str(BATCH),
                "--epochs", "2", "--amp", "--workers", str(workers), "--out", str(run)])
    with open(run / "metrics.csv", newline="") as f:
        return float(list(csv.DictReader(f))[-1]["images_per_s"])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer images")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="decoding processes")
    args = p.parse_args()
    gpu = harness.has_gpu()
    if not gpu:
        print("no CUDA GPU: model-only and end-to-end training images/s not measured; "
              "measuring the CPU loader (JPEG decode + augment) only")
    per_class = (160 if args.quick else 400) if gpu else 40
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_folder(root, per_class, 4)
        rows = [{"shape": f"{IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} jpeg -> {IMG}", "impl": f"loader, {args.workers} workers",
                 "images_per_s": loader_images_per_s(root, args.workers, per_class * CLASSES // BATCH - 1)}]
        if gpu:
            model_only = model_only_images_per_s()
            end_to_end = end_to_end_images_per_s(root, args.workers)
            rows += [{"shape": f"{MODEL} b{BATCH} bf16", "impl": "model-only train step", "images_per_s": model_only},
                     {"shape": f"{MODEL} b{BATCH} bf16", "impl": "vit_fast.train end to end", "images_per_s": end_to_end,
                      "of_model_only": end_to_end / model_only}]
    harness.print_table(rows, title="classification workflow throughput")
    if gpu:
        limiter = "the loader (JPEG decode on the CPU)" if rows[0]["images_per_s"] < model_only else "the model step"
        print(f"end to end keeps {end_to_end / model_only:.0%} of the model-only step; limited by {limiter}")
    harness.write_results("workflow", rows, plot_key="images_per_s")


if __name__ == "__main__":
    main()
