"""Evaluate a trained classifier on a folder of class subfolders.

    python -m vit_fast.evaluate --weights RUN/best.pt --data DATA/val [--json OUT.json] [--plot PNG]

Prints top-1 and top-k accuracy (k = min(5, classes)), per-class precision, recall and support,
and the confusion matrix (rows: true class, columns: predicted). The folder's class names must be
among the checkpoint's; it may hold only some of them. Unreadable images are skipped and counted.
``--json`` writes {"top1", "top5", "per_class": {name: {"precision", "recall", "support"}},
"confusion", "classes"}; accuracies are fractions, and "top5" is the top-k accuracy with
k = min(5, classes).
"""
import argparse
import logging
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from vit_fast import data
from vit_fast.cli import nonnegative_int, positive_int, usage_error
from vit_fast.loop import run_inference
from vit_fast.run_files import SaveError, load_for_command, write_atomic, write_json

MAX_PRINTED_CLASSES = 20  # a wider confusion matrix goes to --json / --plot only


def build_parser():
    p = argparse.ArgumentParser(prog="python -m vit_fast.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", required=True, help="RUN/best.pt or RUN/last.pt written by vit_fast.train")
    p.add_argument("--data", required=True, help="folder of class subfolders, e.g. DATA/val")
    p.add_argument("--json", metavar="OUT.json", help="write top1, top5, per_class, confusion and classes")
    p.add_argument("--plot", metavar="PNG", help="draw the confusion matrix")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--workers", type=nonnegative_int, default=data.DEFAULT_WORKERS, help="decoding processes")
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast on a GPU (ignored on a CPU)")
    return p


def per_class_metrics(confusion, classes):
    """{name: {precision, recall, support}} from a [true, predicted] count matrix; 0/0 counts as 0."""
    hits = confusion.diag()
    predicted, support = confusion.sum(0), confusion.sum(1)
    return {name: {"precision": hits[i].item() / predicted[i].item() if predicted[i] else 0.0,
                   "recall": hits[i].item() / support[i].item() if support[i] else 0.0,
                   "support": support[i].item()}
            for i, name in enumerate(classes)}


def print_report(results, k, images, skipped):
    classes, confusion = results["classes"], results["confusion"]
    print(f"{images} images, {len(classes)} classes" + (f", {skipped} unreadable skipped" if skipped else ""))
    print(f"top-1 {results['top1']:.2%}   top-{k} {results['top5']:.2%}")
    width = max(8, *(len(name) for name in classes))
    print(f"{'class':<{width}}  precision  recall  support")
    for name, m in results["per_class"].items():
        print(f"{name:<{width}}  {m['precision']:9.3f}  {m['recall']:6.3f}  {m['support']:7d}")
    if len(classes) > MAX_PRINTED_CLASSES:
        print(f"confusion matrix: {len(classes)} classes, see --json or --plot")
        return
    print("confusion matrix (rows: true class, columns: predicted, in the order above)")
    cell = max(4, len(str(max(max(row) for row in confusion))) + 1)
    for name, row in zip(classes, confusion):
        print(f"{name:<{width}}" + "".join(f"{count:>{cell}}" for count in row))


def plot_confusion(confusion, classes, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(classes)
    side = min(4 + 0.4 * n, 40)
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=90)
    ax.set_yticks(range(n), classes)
    ax.set(xlabel="predicted", ylabel="true class", title="confusion matrix")
    if n <= 30:
        high = max(max(row) for row in confusion)
        for i, row in enumerate(confusion):
            for j, count in enumerate(row):
                ax.text(j, i, count, ha="center", va="center", color="white" if count > high / 2 else "black")
    fig.tight_layout()
    try:  # the format from path's suffix: the temporary file's name ends in .tmp
        write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=100, format=Path(path).suffix[1:] or "png"))
    finally:
        plt.close(fig)


def main(argv=None):
    logging.basicConfig(format="%(levelname)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    model, checkpoint, device = load_for_command(parser, args.weights, args.device, args.amp)
    classes = checkpoint["classes"]
    try:
        samples = data.scan_split(args.data, classes)
    except data.DataError as err:
        usage_error(parser, f"argument --data: {err}")
    if not samples:
        usage_error(parser, f"argument --data: {args.data}: no images in any class folder")

    dataset = data.ImageDataset(samples, checkpoint["img_size"])
    loader = data.make_loader(dataset, args.batch_size, args.workers, range(len(dataset)), device.type == "cuda")
    k = min(5, len(classes))
    confusion = torch.zeros(len(classes), len(classes), dtype=torch.int64)
    topk_hits, skipped, warned = 0, 0, set()
    for logits, batch in run_inference(model, tqdm(loader, desc="evaluate", leave=False), device, args.amp):
        skipped += data.report_skipped(batch.skipped, warned)
        if logits is None:  # every file of the batch was unreadable
            continue
        top = logits.topk(k, dim=1).indices.cpu()  # [B, k]
        topk_hits += (top == batch.labels[:, None]).any(dim=1).sum().item()
        confusion.index_put_((batch.labels, top[:, 0]), torch.ones_like(batch.labels), accumulate=True)
    images = confusion.sum().item()
    if images == 0:
        raise SystemExit(f"error: {args.data}: no readable images")
    results = {"top1": confusion.diag().sum().item() / images, "top5": topk_hits / images,
               "per_class": per_class_metrics(confusion, classes), "confusion": confusion.tolist(),
               "classes": classes}
    print_report(results, k, images, skipped)
    try:
        if args.json:
            write_json(results, args.json)
        if args.plot:
            plot_confusion(results["confusion"], classes, args.plot)
    except SaveError as err:
        raise SystemExit(f"error: {err}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
