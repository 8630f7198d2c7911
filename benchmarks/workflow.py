"""The classification workflow's throughput: loader, model-only training step, end to end.

    python benchmarks/workflow.py [--quick] [--workers N]

Writes a folder of synthetic photo-sized JPEGs (500x375, 10 classes), then measures, as ms per
batch (min / median / max; images/s from the median):
  - loader: the training DataLoader alone (Pillow JPEG decode + random resized crop + flip, uint8,
    in N worker processes), as ``vit_fast.train`` builds it, over up to 5 runs of 3 or more
    consecutive batches after its first;
  - model-only step: ``vit_fast.loop.train_step`` (the eager step ``vit_fast.train`` runs) on a
    uint8 batch already on the device (do_bench on a GPU, 10 timed calls on the CPU); on a GPU also
    the step replayed from a CUDA graph (``vit_fast.capture_train_step``, what ``--cuda-graph`` runs);
  - end to end: ``vit_fast.train.main`` on the folder (same model, batch, N workers), each epoch
    after the first (which compiles kernels and starts the workers) as its images/s: 3 epochs on a
    GPU, 1 on the CPU (min = median = max there); on a GPU also with ``--cuda-graph``;
and says which part limits the end-to-end number: the slower of the loader and the step, and how
much of it end to end keeps (of_slower_part; of_model_only, of_eager_step, of_eager_end_to_end
likewise). The loop, timing, table and files are harness.run_benchmark's; results go to
benchmarks/results/<device>/workflow.json stamped with the commit (``harness.stamp()``: commit,
dirty, time, versions), on the CPU too.

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
TRAIN_PER_CLASS = {"gpu": {False: 400, True: 160}, "cpu": {False: 16, True: 8}}  # training images, by --quick
# the loader row is timed in up to 5 runs of at least 3 consecutive batches: workers hand batches over in bursts
LOADER_RUNS, LOADER_RUN_BATCHES = 5, 3
# end-to-end epochs measured after the first; one on the CPU, where an epoch takes ~20 s
GPU_MEASURED_EPOCHS, CPU_MEASURED_EPOCHS = 3, 1
LOADER, STEP, CAPTURED_STEP = "loader", "model-only train step", "model-only train step, CUDA graph"
END_TO_END, END_TO_END_GRAPH = "vit_fast.train end to end", "vit_fast.train end to end --cuda-graph"
SLOWER_PART = "the slower of the loader and the step"
NOT_MEASURED = ["ViT-B/16 b128 bf16 (the GPU setup)", "the CUDA-graph captured step", "end to end with --cuda-graph",
                f"more than {CPU_MEASURED_EPOCHS} end-to-end epoch(s) (min = median = max there)"]  # without a GPU
RELATIONS = {  # row -> {column: the part whose images/s the row's is divided by}
    CAPTURED_STEP: {"of_eager_step": STEP},
    END_TO_END: {"of_model_only": STEP, "of_slower_part": SLOWER_PART},
    END_TO_END_GRAPH: {"of_model_only": CAPTURED_STEP, "of_eager_end_to_end": END_TO_END}}


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


def loader_samples(root, img, batch, workers, batches):
    """The training DataLoader alone: ms per batch of each of LOADER_RUNS runs of consecutive batches,
    after its first batch."""
    train_dir = root / "train"
    samples = data.scan_split(train_dir, data.find_classes(train_dir))
    dataset = data.ImageDataset(samples, img, augment=True)
    sampler = data.EpochSampler(torch.utils.data.RandomSampler(dataset, generator=torch.Generator().manual_seed(0)))
    loader = data.make_loader(dataset, batch, workers, sampler)
    it = iter(loader)
    next(it)  # workers started, first batch decoded
    runs = max(1, min(LOADER_RUNS, batches // LOADER_RUN_BATCHES))
    per_run = batches // runs
    ms = []
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(per_run):
            next(it)
        ms.append((time.perf_counter() - start) / per_run * 1e3)
    return harness.Samples(ms)


def train_step(setup, device, captured=False):
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
        return lambda: step(images, labels)
    return lambda: loop.train_step(model, optimizer, images, labels, device, amp, 0.1)


def end_to_end_samples(root, setup, workers, device, measured_epochs, *extra):
    """vit_fast.train.main on the folder for 1 + measured_epochs epochs: ms per batch of each epoch after
    the first (which compiles kernels and starts the workers), from its images/s."""
    name, kwargs, img, batch, amp = setup
    run = root / ("run" + "".join(extra))
    argv = ["--data", str(root), "--model", name, "--img-size", str(img), "--batch-size", str(batch),
            "--epochs", str(1 + measured_epochs), "--workers", str(workers), "--device", device.type,
            "--out", str(run), *extra]
    argv += [arg for key, value in kwargs.items() for arg in ("--model-arg", f"{key}={value}")]
    if amp:
        argv.append("--amp")
    with contextlib.redirect_stdout(io.StringIO()):
        train.main(argv)
    with open(run / "metrics.csv", newline="") as f:
        epochs = list(csv.DictReader(f))[1:]
    return harness.Samples([batch / float(e["images_per_s"]) * 1e3 for e in epochs])


def images_per_s(rows):
    """{impl: images/s} of the rows that ran, the loader's row under LOADER."""
    return {LOADER if r["impl"].startswith(LOADER) else r["impl"]: r["images_per_s"]
            for r in rows if isinstance(r.get("images_per_s"), float)}


def relate(rows):
    """Each row's images/s over those of the parts it is made of (RELATIONS)."""
    ips = images_per_s(rows)
    if LOADER in ips and STEP in ips:
        ips[SLOWER_PART] = min(ips[LOADER], ips[STEP])
    for r in rows:
        for column, part in RELATIONS.get(r["impl"], {}).items():
            if r["impl"] in ips and part in ips:
                r[column] = ips[r["impl"]] / ips[part]


def describe(setup):
    name, kwargs, img, batch, amp = setup
    return f"{name}{''.join(f' {k}={v}' for k, v in kwargs.items())} {img}px {'bf16' if amp else 'fp32'}"


def main(argv=None):
    options = {"--quick": "fewer images",
               "--workers": dict(type=int, default=host_cores(), help="decoding processes (default: this host's cores)")}
    harness.main(argv, __doc__.split("\n\n")[0], options, run, run,
                 f"a tiny CPU version ({describe(CPU_SETUP)} b{CPU_SETUP[3]}); not measured: {', '.join(NOT_MEASURED)}")


def run(args):
    """The rows on this machine's setup (GPU_SETUP, or CPU_SETUP without a GPU), the limiter, the files."""
    gpu = harness.has_gpu()
    device = torch.device(harness.DEVICE if gpu else "cpu")
    setup = GPU_SETUP if gpu else CPU_SETUP
    _, _, img, batch, _ = setup
    stamp = harness.stamp()
    print(f"commit {stamp['commit']}{' (dirty: uncommitted changes)' if stamp['dirty'] else ''}, {stamp['device']}, "
          f"{args.workers} loader workers of {host_cores()} cores")
    not_measured = [] if gpu else NOT_MEASURED
    per_class = TRAIN_PER_CLASS["gpu" if gpu else "cpu"][args.quick]
    epochs = GPU_MEASURED_EPOCHS if gpu else CPU_MEASURED_EPOCHS
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_folder(root, per_class, 2, args.workers)
        batches = max(1, per_class * CLASSES // batch - 1)
        peers = {f"{LOADER} ({IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} jpeg -> {img}px), {args.workers} workers":
                 lambda case, mode: loader_samples(root, img, batch, args.workers, batches),
                 STEP: lambda case, mode: train_step(setup, device)}
        if gpu:
            peers[CAPTURED_STEP] = lambda case, mode: train_step(setup, device, captured=True)
        peers[END_TO_END] = lambda case, mode: end_to_end_samples(root, setup, args.workers, device, epochs)
        if gpu:
            peers[END_TO_END_GRAPH] = lambda case, mode: end_to_end_samples(root, setup, args.workers, device,
                                                                            epochs, "--cuda-graph")
        rows = harness.run_benchmark(
            "workflow", [{"shape": describe(setup)}], peers, (batch,), mode_key="batch", graph=False,
            timer=harness.bench_stats if gpu else harness.bench_cpu_stats,
            reps=dict(warmup=200, rep=1000) if gpu else dict(reps=10),  # 10 on the CPU: a shared host is noisy
            derive=lambda case, b, row: {"images_per_s": b / row["ms"] * 1e3}, relate=relate, write=False,
            columns=["shape", "impl", "batch", "ms", "min_ms", "max_ms", "images_per_s", "of_eager_step",
                     "of_model_only", "of_slower_part", "of_eager_end_to_end", "error"],
            title="classification workflow throughput (ms per batch; images_per_s from the median)")
    ips = images_per_s(rows)
    if not {LOADER, STEP, END_TO_END} <= set(ips):
        raise SystemExit("the loader, the step or the end-to-end run did not run: see the rows above")
    loader, step, end_to_end = ips[LOADER], ips[STEP], ips[END_TO_END]
    slower = min(loader, step)
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
