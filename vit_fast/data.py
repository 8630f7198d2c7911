"""Image folders for the classification workflow (``vit_fast.train``, ``evaluate``, ``predict``).

Layout: ``DATA/train/<class>/*`` and ``DATA/val/<class>/*`` (``DATA/test`` when there is no ``val``);
classes are the sorted subfolder names of ``train``. Images are decoded by Pillow in DataLoader
worker processes and stay uint8 (random resized crop and horizontal flip happen on uint8): the
float conversion and the mean/std normalization happen inside the model's fused patch embedding,
on the device.

Bad data: a missing folder, no classes or a single class raise ``DataError`` naming the path; an
empty class folder logs a warning and the class is kept (so class indices stay stable); an image
that cannot be decoded is dropped from its batch, named in a warning (once per file) and counted.

Decoding as image loaders do: the EXIF orientation is applied (a phone photo taken upright comes
out upright, as ``PIL.ImageOps.exif_transpose`` turns it), and 16-bit images (PNG's ``I;16``
modes) are scaled to 8 bits by their high byte (value >> 8) rather than clipped at 255.
"""
import logging
import math
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")  # compared lower-cased: .JPG, .Png, ... count
EVAL_CROP_FRACTION = 0.875  # evaluation view: the centre 87.5% square, resized to img_size (the usual ImageNet eval)
CROP_SCALE = (0.08, 1.0)  # random resized crop: fraction of the image area ...
CROP_RATIO = (3 / 4, 4 / 3)  # ... and aspect ratio of the crop box
DEFAULT_WORKERS = min(8, os.cpu_count() or 1)  # decoding processes per training / evaluating process
EXIF_ORIENTATION = 0x0112
# EXIF orientation -> the transpose that shows the image upright (the table of PIL.ImageOps.exif_transpose)
ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A dataset folder the workflow cannot use; the message names the path."""


# ----------------------------------------------------------------------------- folders


def dataset_splits(data_dir):
    """DATA -> (DATA/train, DATA/val), or DATA/test in place of a missing val."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found")
    train = root / "train"
    if not train.is_dir():
        raise DataError(f"{train}: folder not found (expected {root}/train/<class>/<images>)")
    for name in ("val", "test"):
        if (root / name).is_dir():
            return train, root / name
    raise DataError(f"{root}: no val or test folder beside train (expected {root}/val/<class>/<images>)")


def class_folders(split_dir):
    """The class subfolders of a split, sorted by name; a missing folder or none inside raise."""
    root = Path(split_dir)
    if not root.is_dir():
        raise DataError(f"{root}: folder not found")
    folders = sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name)
    if not folders:
        raise DataError(f"{root}: no class subfolders (expected {root}/<class>/<images>)")
    return folders


def find_classes(train_dir):
    """Class names = the sorted subfolder names of the training folder (at least two)."""
    classes = [d.name for d in class_folders(train_dir)]
    if len(classes) == 1:
        raise DataError(f"{train_dir}: only one class ({classes[0]!r}); a classifier needs at least two class folders")
    return classes


def list_images(folder):
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def scan_split(split_dir, classes):
    """[(path, class index)] for every image under ``split_dir/<class>/``, classes indexed as given.

    A split may lack some classes (an evaluation subset); a class folder that is not among
    ``classes`` raises, an empty one logs a warning.
    """
    index = {name: i for i, name in enumerate(classes)}
    samples = []
    for folder in class_folders(split_dir):
        if folder.name not in index:
            raise DataError(f"{folder}: class {folder.name!r} is not one of the model's classes {classes}")
        files = list_images(folder)
        if not files:
            log.warning("%s: empty class folder (no %s files); class %r kept so class indices stay stable",
                        folder, "/".join(e[1:] for e in IMAGE_EXTENSIONS), folder.name)
        samples += [(str(f), index[folder.name]) for f in files]
    return samples


# ----------------------------------------------------------------------------- decoding and augmentation


def random_resized_crop_box(width, height, rng):
    """(left, top, right, bottom) of a crop with area in CROP_SCALE and aspect ratio in CROP_RATIO."""
    area = width * height
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*CROP_SCALE)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    # no draw fitted (a very elongated image): the whole image, trimmed to the nearest allowed ratio
    aspect = min(max(width / height, CROP_RATIO[0]), CROP_RATIO[1])
    w, h = min(width, round(height * aspect)), min(height, round(width / aspect))
    return (width - w) // 2, (height - h) // 2, (width - w) // 2 + w, (height - h) // 2 + h


def center_crop_box(width, height):
    side = min(width, height) * EVAL_CROP_FRACTION
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


def orientation(img):
    """The EXIF orientation of an opened image (1, upright, when absent or unreadable)."""
    try:
        value = img.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # a damaged EXIF block does not make the pixels unreadable
        return 1
    return value if value in ORIENTATION_TRANSPOSE else 1


def to_rgb(img):
    """8-bit RGB: 16-bit grayscale scaled by its high byte (Pillow's convert would clip it to 255)."""
    if img.mode in SIXTEEN_BIT_MODES or img.mode == "I":  # "I": 32-bit ints, as older Pillows read 16-bit PNGs
        pixels = np.asarray(img).astype(np.int64)
        return Image.fromarray((np.clip(pixels, 0, 65535) >> 8).astype(np.uint8), "L").convert("RGB")
    return img.convert("RGB")


class Batch(NamedTuple):
    images: torch.Tensor  # uint8 [B, 3, S, S], channels_last memory (the decoder's layout; the model reads any strides)
    labels: torch.Tensor  # int64 [B]
    paths: list  # the B decoded files, in batch order
    skipped: list  # (path, reason) of the files of this batch that could not be decoded


class ImageDataset(torch.utils.data.Dataset):
    """(path, label) samples -> uint8 [S, S, 3] images, decoded in whichever process indexes it.

    ``augment`` picks the training view (random resized crop + horizontal flip) over the eval view
    (centre crop). Indexed by ``(index, epoch)`` (see ``EpochSampler``) or a plain index (epoch 0):
    the augmentation of a sample is drawn from (seed, epoch, index) alone, so an epoch's images are
    the same for any worker count and after a resume.
    """

    def __init__(self, samples, img_size, augment=False, seed=0):
        self.samples = list(samples)
        self.img_size = img_size
        self.augment = augment
        self.seed = seed

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        path, label = self.samples[index]
        size = self.img_size
        try:
            with Image.open(path) as img:
                turn = ORIENTATION_TRANSPOSE.get(orientation(img))
                swap = turn in (Image.Transpose.TRANSPOSE, Image.Transpose.TRANSVERSE, Image.Transpose.ROTATE_90,
                                Image.Transpose.ROTATE_270)
                # the crop box is drawn on the upright image: width and height as it will be seen
                width, height = img.size[::-1] if swap else img.size
                if self.augment:
                    rng = np.random.default_rng([self.seed, epoch, index])
                    box = random_resized_crop_box(width, height, rng)
                    flip = rng.random() < 0.5
                else:
                    box, flip = center_crop_box(width, height), False
                # JPEG decodes at 1/2, 1/4 or 1/8 scale for free: take it while the crop keeps >= size pixels
                shrink = min(box[2] - box[0], box[3] - box[1]) / size
                stored = img.size
                if shrink >= 2 and img.draft("RGB", (math.ceil(stored[0] / shrink), math.ceil(stored[1] / shrink))):
                    new_width, new_height = img.size[::-1] if swap else img.size
                    sx, sy = new_width / width, new_height / height
                    box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
                rgb = to_rgb(img)  # the full decode: a truncated or corrupt file fails here
            if turn is not None:
                rgb = rgb.transpose(turn)
        except Exception as err:  # any decoder plugin's failure: a bad file is skipped, never fatal
            return None, label, path, f"{type(err).__name__}: {err}"
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR, box=box)
        if flip:
            rgb = rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.array(rgb, dtype=np.uint8)), label, path, None

    def collate(self, items):
        """DataLoader collate_fn: stack the decoded images, set the undecodable ones aside."""
        good = [item for item in items if item[0] is not None]
        skipped = [(path, reason) for image, _, path, reason in items if image is None]
        if good:
            images = torch.stack([image for image, _, _, _ in good])  # [B, S, S, 3]
        else:
            images = torch.empty(0, self.img_size, self.img_size, 3, dtype=torch.uint8)
        labels = torch.tensor([label for _, label, _, _ in good], dtype=torch.int64)
        return Batch(images.permute(0, 3, 1, 2), labels, [path for _, _, path, _ in good], skipped)


class EpochSampler(torch.utils.data.Sampler):
    """Wraps an index sampler to yield ``(index, epoch)``, carrying the epoch to the workers."""

    def __init__(self, sampler):
        self.sampler = sampler
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self):
        return ((index, self.epoch) for index in self.sampler)

    def __len__(self):
        return len(self.sampler)


def make_loader(dataset, batch_size, workers, sampler, pin_memory=False):
    # its own generator: starting workers draws a seed, which must not move the global RNG that
    # dropout and drop path use (a resumed run starts its workers at another epoch)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=dataset.collate,
        pin_memory=pin_memory, persistent_workers=workers > 0, generator=torch.Generator().manual_seed(0),
    )


def report_skipped(skipped, warned):
    """Warn once per file (``warned``: the paths already named) and return how many were skipped."""
    for path, reason in skipped:
        if path not in warned:
            warned.add(path)
            log.warning("skipped unreadable image %s (%s)", path, reason)
    return len(skipped)
