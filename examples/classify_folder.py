"""Classify every image in a folder with pretrained ViT weights read from a path (no network).

    python examples/classify_folder.py PHOTOS --model vit_base_patch16_224 --weights vit_b16.pth
    python examples/classify_folder.py PHOTOS --model vit_base_patch16_224 --weights ViT-B_16.npz \\
        --labels imagenet_classes.txt --device cuda

--weights: a timm/PyTorch state_dict (.pth, .pt, .bin, .safetensors) or a Google .npz, loaded by
``vit_fast.create_model`` (the head's size comes from the checkpoint). Images are decoded with
Pillow, centre-cropped to the model's size and passed as uint8: the model normalizes them itself
with --mean / --std (0.5 each by default, as timm's augreg and Google's weights expect).
Prints, per image, the top-k classes with their probabilities. A file that cannot be read gets
an error line on stderr, the others are still classified, and the exit status is then 1; a
command-line mistake (a --labels file whose line count is not the model's class count, ...) is
one error line and exit status 2.
"""
import argparse
import pickle
import sys
from pathlib import Path

import torch

import vit_fast
from vit_fast import data
from vit_fast.cli import positive_int
from vit_fast.devices import device_problem


def main(argv=None):
    parser = argparse.ArgumentParser(description="Classify the images in a folder with a pretrained ViT.")
    parser.add_argument("folder", help="folder of images (searched recursively)")
    parser.add_argument("--model", default="vit_base_patch16_224", choices=sorted(vit_fast.MODELS))
    parser.add_argument("--weights", required=True, help="checkpoint path (.pth/.pt/.bin/.safetensors/.npz)")
    parser.add_argument("--labels", help="text file with one class name per line (default: class indices)")
    parser.add_argument("--topk", type=positive_int, default=5)
    parser.add_argument("--mean", type=float, nargs=3, default=(0.5, 0.5, 0.5), help="per-channel mean, 0-1 scale")
    parser.add_argument("--std", type=float, nargs=3, default=(0.5, 0.5, 0.5), help="per-channel std, 0-1 scale")
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if problem := device_problem(args.device):
        parser.error(f"argument --device: {problem}")
    device = torch.device(args.device)
    files = data.list_images(args.folder)
    if not files:
        parser.error(f"{args.folder}: no images ({', '.join(data.IMAGE_EXTENSIONS)})")
    names = None
    if args.labels:
        try:
            names = Path(args.labels).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as err:
            parser.error(f"argument --labels: {args.labels}: cannot read it ({err})")
        while names and not names[-1].strip():  # a trailing blank line is not a class
            names.pop()

    try:
        model = vit_fast.create_model(args.model, checkpoint=args.weights, pixel_mean=args.mean, pixel_std=args.std)
    except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        parser.error(f"argument --weights: {args.weights}: cannot load it into {args.model} "
                     f"({str(err).splitlines()[0] if str(err) else type(err).__name__})")
    if names is not None and len(names) != model.num_classes:
        parser.error(f"argument --labels: {args.labels} has {len(names)} names; the model has "
                     f"{model.num_classes} classes (one name per line, in class order)")
    model = model.to(device).eval()
    img_size = model.patch_embed.img_size[0]
    dataset = data.ImageDataset([(str(path), -1) for path in files], img_size)  # centre crop, uint8
    loader = data.make_loader(dataset, args.batch_size, 0, range(len(dataset)))

    k = min(args.topk, model.num_classes)
    failures = 0
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for batch in loader:
            for path, reason in batch.skipped:
                print(f"error: {path}: cannot read image ({reason})", file=sys.stderr)
            failures += len(batch.skipped)
            if not batch.paths:  # every file of the batch was unreadable
                continue
            probs = model(batch.images.to(device)).float().softmax(dim=1)  # [B, classes]
            top = probs.topk(k, dim=1)
            for path, p, idx in zip(batch.paths, top.values.tolist(), top.indices.tolist()):
                guesses = ", ".join(f"{names[i] if names else i} {q:.1%}" for q, i in zip(p, idx))
                print(f"{path}: {guesses}")
    if failures:
        print(f"{failures} of {len(files)} images could not be read", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
