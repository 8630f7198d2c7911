"""The files of a training run: RUN/last.pt, RUN/best.pt, RUN/metrics.csv and RUN/curves.png.

last.pt holds everything ``--resume``, ``evaluate`` and ``predict`` need (the model, its classes
and metadata, the optimizer and schedule state, the metrics history); best.pt the model and
metadata of the best val top-1 so far. `load_run` reads either (``torch.load(weights_only=True)``:
tensors, numbers, strings, lists and dicts only; not to be confused with
``vit_fast.load_checkpoint``, which loads pretrained weights into a model), and
`load_trained_model` rebuilds the model one describes. Every file is written through a
temporary file and a rename (`write_atomic`), so an interrupted or failed write never leaves a
broken one. metrics.csv is rewritten whole from last.pt's history, so the two agree whenever a
run dies; curves.png is drawn from metrics.csv.
"""
import contextlib
import csv
import errno
import json
import os
import pickle
import re
from pathlib import Path

import numpy as np
import torch

import vit_fast
from vit_fast.cli import usage_error
from vit_fast.devices import device_problem, note_amp, pick_device

METRIC_COLUMNS = ["epoch", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "lr", "images_per_s"]
CHECKPOINT_KEYS = ("model", "classes", "model_name", "model_kwargs", "img_size")


class CheckpointError(ValueError):
    """A --weights / --resume file that cannot be used; the message names the file."""


class SaveError(OSError):
    """A run file that could not be written (disk full, permissions); the message names the path."""


# ----------------------------------------------------------------------------- checkpoints


def build_model(name, num_classes, img_size=None, model_kwargs=None, weights=None):
    """A vit_fast model for ``num_classes``, from pretrained ``weights`` when given."""
    return vit_fast.create_model(name, checkpoint=weights, num_classes=num_classes, img_size=img_size,
                                 **(model_kwargs or {}))


def load_run(path):
    """A RUN/best.pt or RUN/last.pt as a dict, read with ``weights_only=True``; CheckpointError names the file.

    A file holding Python objects beyond tensors, numbers, strings, lists and dicts is refused
    unread (its pickle could run code); vit_fast.train writes none.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    expected = "expected RUN/best.pt or RUN/last.pt written by vit_fast.train"
    if path.suffix.lower() in (".safetensors", ".npz"):
        raise CheckpointError(f"{path}: {expected}; a {path.suffix} file holds bare weights without the classes "
                              "(train on them with vit_fast.train --weights, or see examples/classify_folder.py)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        raise CheckpointError(f"{path}: refused: the file holds Python objects other than tensors, numbers, "
                              f"strings, lists and dicts ({found[1] if found else 'not loadable with weights_only'}), "
                              "whose loading could run code; vit_fast.train never writes them") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        reason = "empty file" if path.stat().st_size == 0 else str(err).split(". ")[0] or type(err).__name__
        raise CheckpointError(f"{path}: cannot read it as a torch checkpoint ({reason}); truncated or not a file "
                              f"torch.save wrote? {expected}") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: {expected} (found a {type(checkpoint).__name__}, not a dict)")
    missing = [key for key in CHECKPOINT_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointError(f"{path}: not a checkpoint written by vit_fast.train (no {', '.join(missing)})")
    return checkpoint


def load_for_command(parser, weights, device, amp):
    """``load_trained_model`` for evaluate and predict: a bad ``--device`` or ``--weights`` is one
    usage line (exit status 2), never a traceback. -> (model, checkpoint, device)."""
    if device is not None and (problem := device_problem(device)):
        usage_error(parser, f"argument --device: {problem}")
    try:
        return load_trained_model(weights, device, amp)
    except CheckpointError as err:
        usage_error(parser, f"argument --weights: {err}")


def load_trained_model(path, device_name=None, amp=False):
    """(model in eval mode, checkpoint dict, device) from a RUN/best.pt or RUN/last.pt.

    Raises CheckpointError for an unusable file and ValueError for an unusable ``device_name``.
    """
    if device_name is not None and (problem := device_problem(device_name)):
        raise ValueError(problem)
    device = pick_device(device_name)
    checkpoint = load_run(path)
    note_amp(amp, device)
    try:
        model = build_model(checkpoint["model_name"], len(checkpoint["classes"]), checkpoint["img_size"],
                            checkpoint["model_kwargs"])
        model.load_state_dict(checkpoint["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: cannot build the model it describes ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''})") from None
    return model.to(device).eval(), checkpoint, device


def plain(value):
    """``value`` in the types torch.load(weights_only=True) reads back: paths and numpy scalars made plain."""
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(item) for item in value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


# ----------------------------------------------------------------------------- writing


def write_atomic(path, write):
    """``write(tmp)`` then rename tmp over ``path``: an interrupted write never leaves a broken ``path``.

    A failed write (disk full, no permission, ...) removes the temporary file and raises SaveError
    naming ``path``; the previous ``path``, if any, is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # torch.save reports a failed write as a RuntimeError
        text = str(err)
        full = getattr(err, "errno", None) == errno.ENOSPC or "No space left" in text or "file write failed" in text
        if isinstance(err, OSError) and err.strerror:
            reason = err.strerror
        else:
            reason = text.splitlines()[0] if text else type(err).__name__
        kept = f"; the previous {path.name} is kept" if path.exists() else ""
        raise SaveError(f"cannot write {path}: {reason}{' (is the disk full?)' if full else ''}{kept}") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def save_atomic(obj, path):
    """torch.save through a temporary file, so an interrupted save never leaves a broken checkpoint."""
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


def write_json(obj, path):
    """``obj`` as indented JSON at ``path``, through a temporary file (SaveError names ``path``)."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
    write_atomic(path, write)


# ----------------------------------------------------------------------------- metrics.csv and curves.png


def write_metrics(path, rows):
    """Write metrics.csv from ``rows`` (the run's history, one dict per epoch), replacing the file whole.

    The history lives in last.pt, and the CSV is rewritten from it after each save and on resume,
    so the two agree whenever the process dies.
    """
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, METRIC_COLUMNS)
            writer.writeheader()
            for row in rows:
                writer.writerow({key: value if isinstance(value, (int, str)) else f"{value:.6g}"
                                 for key, value in row.items()})
    write_atomic(path, write)


def read_metrics(path, last_epoch):
    """The rows of an existing metrics.csv up to ``last_epoch`` (for a last.pt without a history)."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [r for r in csv.DictReader(f) if int(r["epoch"]) <= last_epoch]


def plot_curves(metrics_path, png_path):
    """Loss and accuracy against epoch, from metrics.csv (so a resumed run draws all its epochs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    with open(metrics_path, newline="") as f:
        rows = list(csv.DictReader(f))
    epochs = [int(r["epoch"]) for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for key in ("train_loss", "val_loss"):
        ax_loss.plot(epochs, [float(r[key]) for r in rows], marker="o", label=key)
    for key in ("train_top1", "val_top1", "val_top5"):
        ax_acc.plot(epochs, [float(r[key]) for r in rows], marker="o", label=key)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1.02))
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    try:
        write_atomic(png_path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)
