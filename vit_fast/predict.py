"""Classify images with a trained classifier.

    python -m vit_fast.predict --weights RUN/best.pt IMAGE [IMAGE ...] [--topk K] [--json OUT.json]

Prints one line per image: its top-k classes with probabilities. An IMAGE may be a folder (its
images, recursively). A file that cannot be read, or a folder without images, gets an error line
on stderr; the others are still classified, and the exit status is then 1. Nothing to classify at
all, a bad --weights file or another command-line mistake: one ``error:`` line, exit status 2.
"""
import argparse
import logging
import sys
from pathlib import Path

from vit_fast import data
from vit_fast.cli import nonnegative_int, positive_int, usage_error
from vit_fast.loop import run_inference
from vit_fast.run_files import SaveError, load_for_command, write_json


def build_parser():
    p = argparse.ArgumentParser(prog="python -m vit_fast.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files, or folders of them")
    p.add_argument("--weights", required=True, help="RUN/best.pt or RUN/last.pt written by vit_fast.train")
    p.add_argument("--topk", type=positive_int, default=5, help="classes shown per image (at most the class count)")
    p.add_argument("--json", metavar="OUT.json", help='write [{"path": ..., "topk": [{"class": ..., "prob": ...}]}]')
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--workers", type=nonnegative_int, default=0,
                   help="decoding processes (default 0: decode in this one)")
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast on a GPU (ignored on a CPU)")
    return p


def expand(paths):
    """(files, folders without images): files as given (readable or not: a bad one is reported when
    decoded), folders -> their images."""
    files, empty = [], []
    for path in map(Path, paths):
        found = data.list_images(path) if path.is_dir() else [path]
        if not found:
            empty.append(path)
        files += found
    return [str(f) for f in files], empty


def main(argv=None):
    logging.basicConfig(format="%(levelname)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    files, empty = expand(args.images)
    kinds = "/".join(e[1:] for e in data.IMAGE_EXTENSIONS)
    if not files:
        usage_error(parser, f"no images found in {', '.join(map(str, empty))} (looked for {kinds} files)")
    model, checkpoint, device = load_for_command(parser, args.weights, args.device, args.amp)
    classes = checkpoint["classes"]
    k = min(args.topk, len(classes))
    for folder in empty:
        print(f"error: {folder}: no images found (looked for {kinds} files)", file=sys.stderr)
    dataset = data.ImageDataset([(path, -1) for path in files], checkpoint["img_size"])
    loader = data.make_loader(dataset, args.batch_size, args.workers, range(len(dataset)), device.type == "cuda")
    predictions, failures = [], len(empty)
    for logits, batch in run_inference(model, loader, device, args.amp):
        for path, reason in batch.skipped:
            print(f"error: {path}: cannot read image ({reason})", file=sys.stderr)
        failures += len(batch.skipped)
        if logits is None:  # every file of the batch was unreadable
            continue
        probs, indices = logits.softmax(dim=1).topk(k, dim=1)
        for path, p_row, i_row in zip(batch.paths, probs.tolist(), indices.tolist()):
            topk = [{"class": classes[i], "prob": p} for p, i in zip(p_row, i_row)]
            predictions.append({"path": path, "topk": topk})
            print(f"{path}: " + ", ".join(f"{t['class']} {t['prob']:.4f}" for t in topk))
    if args.json:
        try:
            write_json(predictions, args.json)
        except SaveError as err:
            raise SystemExit(f"error: {err}") from None
    if failures:
        unread = failures - len(empty)
        print(f"{unread} of {len(dataset)} images could not be read"
              + (f"; {len(empty)} folder(s) without images" if empty else ""), file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
