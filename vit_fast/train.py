"""Train a ViT classifier on a folder of labelled images.

    python -m vit_fast.train --data DATA --model vit_base_patch16_224 --weights vit_b16.npz --out RUN
    torchrun --nproc_per_node=K -m vit_fast.train ...       # data-parallel (DDP) on K GPUs or processes
    python -m vit_fast.train --resume RUN/last.pt           # continue at the next epoch

DATA holds ``train/<class>/*`` and ``val/<class>/*`` (or ``test/``), see ``vit_fast.data``. Each
epoch trains (a tqdm bar with loss, accuracy, images/s and learning rate), validates, and writes
RUN/last.pt (everything ``--resume``, ``evaluate`` and ``predict`` need), RUN/best.pt (the best
val top-1 so far: model and metadata), RUN/metrics.csv (one row per epoch) and RUN/curves.png.

Determinism: the data order, each image's augmentation and the dropout masks are seeded per
epoch from ``--seed``, so a resumed run gives the same result as an uninterrupted one.
``--amp`` is bf16 autocast on a GPU (no gradient scaler is needed for bf16: the checkpoint's
``scaler`` is None); on a CPU it is ignored with a note, the model runs fp32.

The learning-rate schedule is defined in epochs (warmup over ``--warmup-epochs``, cosine decay to
0 at ``--epochs``): a run resumed with another batch size or process count continues it at the
epoch it stopped, said in one line. Checkpoints hold tensors, numbers, strings, lists and dicts
only and are read with ``torch.load(weights_only=True)``: a file carrying other Python objects is
refused, never run. last.pt also holds the rows of metrics.csv, which is rewritten from it.

Command-line mistakes (a bad value, a missing or unusable file, an unavailable device) are one
line ``prog: error: ...`` and exit status 2, before any work starts.
"""
import argparse
import ast
import contextlib
import csv
import errno
import logging
import math
import os
import pickle
import re
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import vit_fast
from vit_fast import data
from vit_fast.reference import CONFIGS

METRIC_COLUMNS = ["epoch", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "lr", "images_per_s"]
# the arguments that fix the architecture: a resumed run must not change them
ARCHITECTURE_ARGS = ("model", "img_size", "model_arg")
DEFAULTS = dict(
    data=None, model="vit_base_patch16_224", model_arg={}, img_size=None, epochs=10, batch_size=64, lr=None,
    weight_decay=None, optimizer="adamw", warmup_epochs=1.0, label_smoothing=0.1, weights=None, freeze_epochs=0,
    amp=False, no_augment=False, workers=data.DEFAULT_WORKERS, device=None, seed=0, out=None,
    dist_timeout=600.0,
)
# per optimizer: (lr, weight decay) when not given
OPTIMIZER_DEFAULTS = {"adamw": (5e-4, 0.05), "sgd": (0.01, 0.0)}
CHECKPOINT_KEYS = ("model", "classes", "model_name", "model_kwargs", "img_size")

log = logging.getLogger("vit_fast.train")


# ----------------------------------------------------------------------------- arguments


class UsageError(SystemExit):
    """A command-line mistake: exit status 2 (argparse's); ``str()`` is the message, already printed."""

    def __init__(self, message):
        super().__init__(2)
        self.message = message

    def __str__(self):
        return self.message


def usage_error(parser, message):
    """Print ``prog: error: message`` (one line, as argparse does) and exit with status 2."""
    print(f"{parser.prog}: error: {message}", file=sys.stderr)
    raise UsageError(message)


class CheckpointError(ValueError):
    """A --weights / --resume file that cannot be used; the message names the file."""


class SaveError(OSError):
    """A run file that could not be written (disk full, permissions); the message names the path."""


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def nonnegative_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def float_in(low, high=math.inf, low_open=False, high_open=True):
    """An argparse type: a finite float in [low, high) (ends open or closed as asked)."""
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if not (math.isfinite(value) and above and below):
            lo, hi = "(" if low_open else "[", ")" if high_open else "]"
            raise argparse.ArgumentTypeError(f"expected a number in {lo}{low:g}, {high:g}{hi}, got {text!r}")
        return value
    return parse


DURATION_UNITS = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}


def duration(text):
    """'600', '600s', '10m', '10min', '1h' -> seconds (a positive float)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*", text.lower())
    if not match or match[2] not in DURATION_UNITS or float(match[1]) <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive duration in seconds or minutes (600, 600s, 10m, "
                                         f"10min), got {text!r}")
    return float(match[1]) * DURATION_UNITS[match[2]]


def device_problem(name):
    """None when ``name`` is a device this torch can use now, else what is wrong with it."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        return f"expected cpu, cuda or cuda:N, got {name!r}"
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        return f"expected cpu, cuda or cuda:N, got {name!r}"
    if not torch.cuda.is_available():
        why = "a CPU-only build" if torch.version.cuda is None else "no CUDA GPU is visible"
        return f"{name!r} asked for, but CUDA is not available (torch {torch.__version__}: {why}); use --device cpu"
    if device.index is not None and device.index >= torch.cuda.device_count():
        return f"{name!r} asked for, but this machine has {torch.cuda.device_count()} CUDA device(s)"
    return None


def parse_model_arg(text):
    """'depth=6' -> ('depth', 6): values are Python literals where they parse, else strings."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def build_parser():
    # no defaults in the parser: what the user typed is told apart from DEFAULTS and a resumed run's arguments
    p = argparse.ArgumentParser(prog="python -m vit_fast.train", argument_default=argparse.SUPPRESS,
                                description="Train a ViT classifier on DATA/train/<class>/*, validating on DATA/val.")
    p.add_argument("--data", help="folder with train/<class>/* and val/<class>/* (or test/<class>/*)")
    p.add_argument("--model", choices=sorted(vit_fast.model.MODELS), metavar="NAME",
                   help=f"a vit_fast factory: {', '.join(sorted(vit_fast.model.MODELS))} (default {DEFAULTS['model']})")
    p.add_argument("--model-arg", dest="model_arg", action="append", type=parse_model_arg, metavar="KEY=VALUE",
                   help="extra keyword for the factory, repeatable (e.g. drop_path_rate=0.1, depth=6)")
    p.add_argument("--img-size", dest="img_size", type=positive_int,
                   help="training resolution, a multiple of the patch size (default: the model's)")
    p.add_argument("--epochs", type=positive_int, help=f"(default {DEFAULTS['epochs']})")
    p.add_argument("--batch-size", dest="batch_size", type=positive_int,
                   help=f"per process (default {DEFAULTS['batch_size']})")
    p.add_argument("--lr", type=float_in(0, low_open=True),
                   help="peak learning rate (default 5e-4 for adamw, 0.01 for sgd)")
    p.add_argument("--weight-decay", dest="weight_decay", type=float_in(0), help="(default 0.05 for adamw, 0 for sgd)")
    p.add_argument("--optimizer", choices=sorted(OPTIMIZER_DEFAULTS), help="(default adamw; sgd has momentum 0.9)")
    p.add_argument("--warmup-epochs", dest="warmup_epochs", type=float_in(0),
                   help=f"linear warmup, then cosine decay to 0, per step (default {DEFAULTS['warmup_epochs']})")
    p.add_argument("--label-smoothing", dest="label_smoothing", type=float_in(0, 1),
                   help=f"(default {DEFAULTS['label_smoothing']})")
    p.add_argument("--weights", help="pretrained timm .pth/.safetensors or Google .npz (head replaced for new classes)")
    p.add_argument("--freeze-epochs", dest="freeze_epochs", type=nonnegative_int,
                   help="train only the head for the first N epochs, then everything (default 0)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast on a GPU (ignored on a CPU)")
    p.add_argument("--no-augment", dest="no_augment", action="store_true",
                   help="train on the centre crop, without random resized crop and flip")
    p.add_argument("--workers", type=nonnegative_int,
                   help=f"decoding processes per training process (default {DEFAULTS['workers']})")
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--seed", type=int, help=f"(default {DEFAULTS['seed']})")
    p.add_argument("--out", help="run folder (default runs/<model>; with --resume, the checkpoint's folder)")
    p.add_argument("--resume", help="RUN/last.pt: continue that run at its next epoch (best.pt lacks the "
                                    "optimizer state: start a new run from it with --weights)")
    p.add_argument("--dist-timeout", dest="dist_timeout", type=duration, metavar="SECONDS",
                   help="with several processes (torchrun): how long one waits for the others at a collective "
                        "(gradient all-reduce, epoch sums) before the run fails, instead of the backend's 30 "
                        "minutes; seconds, or with a unit: 300s, 5m, 5min (default 10m)")
    return p


def resolve_args(argv):
    """The run's arguments: DEFAULTS, overridden by the resumed run's, overridden by what was typed."""
    parser = build_parser()
    given = vars(parser.parse_args(argv))
    if "model_arg" in given:
        given["model_arg"] = dict(given["model_arg"])
    checkpoint = None
    args = dict(DEFAULTS)
    if "resume" in given:
        try:
            checkpoint = load_checkpoint(given["resume"])
        except CheckpointError as err:
            usage_error(parser, f"argument --resume: {err}")
        if "optimizer" not in checkpoint or "scheduler" not in checkpoint:
            # a fresh optimizer would not continue the run (AdamW's moments, the schedule's position):
            # the file's weights can start a new run instead
            usage_error(parser, f"argument --resume: {given['resume']} holds the model only, not the optimizer "
                                f"state a resume needs (best.pt does not keep it); resume from "
                                f"{Path(given['resume']).with_name('last.pt')}, or start a new run from these "
                                f"weights with --weights {given['resume']}")
        saved = checkpoint["args"]
        for key in ARCHITECTURE_ARGS:
            if key in given and given[key] != saved[key]:
                flag = "--" + key.replace("_", "-")
                usage_error(parser, f"--resume {given['resume']} is a {saved['model']} run with {flag} "
                                    f"{saved[key]}; this run asks for {flag} {given[key]}. Resume with the same "
                                    "model, or start a new run.")
        args.update(saved)
        args["out"] = str(Path(given["resume"]).parent)
    args.update(given)
    if args["data"] is None:
        parser.error("--data is required")
    lr, weight_decay = OPTIMIZER_DEFAULTS[args["optimizer"]]
    args["lr"] = lr if args["lr"] is None else args["lr"]
    args["weight_decay"] = weight_decay if args["weight_decay"] is None else args["weight_decay"]
    args["out"] = args["out"] or str(Path("runs") / args["model"])
    check_args(parser, args, resumed=checkpoint is not None)
    return argparse.Namespace(**args), checkpoint


def check_args(parser, args, resumed):
    """What argparse cannot see alone, checked before any work: usage errors name the argument."""
    patch = args["model_arg"].get("patch_size", CONFIGS[args["model"]]["patch_size"])
    if args["img_size"] is not None and isinstance(patch, int) and args["img_size"] % patch:
        usage_error(parser, f"argument --img-size: expected a multiple of {args['model']}'s patch size {patch}, "
                            f"got {args['img_size']}")
    if args["device"] is not None and (problem := device_problem(args["device"])):
        usage_error(parser, f"argument --device: {problem}")
    if args["weights"] is not None and not resumed:
        weights = Path(args["weights"])
        if not weights.is_file():
            usage_error(parser, f"argument --weights: {weights}: file not found")
        if weights.suffix.lower() not in (".npz", ".pth", ".pt", ".bin", ".safetensors"):
            usage_error(parser, f"argument --weights: {weights}: expected a .pth, .pt, .bin, .safetensors "
                                f"(timm) or .npz (Google) file")


# ----------------------------------------------------------------------------- model and checkpoints


def build_model(name, num_classes, img_size=None, model_kwargs=None, weights=None):
    """A vit_fast model for ``num_classes``, from pretrained ``weights`` when given."""
    return vit_fast.create_model(name, checkpoint=weights, num_classes=num_classes, img_size=img_size,
                                 **(model_kwargs or {}))


def load_checkpoint(path):
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


def load_trained_model(path, device_name=None, amp=False):
    """(model in eval mode, checkpoint dict, device) from a RUN/best.pt or RUN/last.pt.

    Raises CheckpointError for an unusable file and ValueError for an unusable ``device_name``.
    """
    if device_name is not None and (problem := device_problem(device_name)):
        raise ValueError(problem)
    device = pick_device(device_name)
    checkpoint = load_checkpoint(path)
    note_amp(amp, device)
    try:
        model = build_model(checkpoint["model_name"], len(checkpoint["classes"]), checkpoint["img_size"],
                            checkpoint["model_kwargs"])
        model.load_state_dict(checkpoint["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: cannot build the model it describes ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''})") from None
    return model.to(device).eval(), checkpoint, device


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


# ----------------------------------------------------------------------------- devices and processes


def pick_device(name=None):
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def note_amp(amp, device):
    if amp and device.type != "cuda":
        print("note: --amp is bf16 autocast on a GPU; on the CPU the model runs fp32")


def autocast(device, amp):
    """bf16 autocast on a GPU when ``amp``; plain fp32 elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda")


def init_distributed(device_name, timeout_s=DEFAULTS["dist_timeout"]):
    """(rank, world size, device); under torchrun, one process group (NCCL on GPUs, gloo on CPUs).

    ``timeout_s``: how long a collective waits for the other processes before it fails (a frozen
    rank then stops the run in minutes, not the backend's default 30).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_name)
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), world, device


def all_reduce_sum(values, world):
    if world > 1:
        dist.all_reduce(values)
    return values


def epoch_seed(seed, epoch, rank):
    """The torch RNG seed (dropout, drop path) of one epoch on one process."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


# ----------------------------------------------------------------------------- optimization


def make_optimizer(model, args, device):
    """Weight decay on matrices only (not on biases, norms, position embedding or class token)."""
    decay, no_decay = [], []
    exempt = model.no_weight_decay()
    for name, param in model.named_parameters():
        (decay if param.ndim >= 2 and name not in exempt else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=args.lr, momentum=0.9)
    return torch.optim.AdamW(groups, lr=args.lr, fused=device.type == "cuda")


def set_schedule_position(scheduler, step):
    """Put a LambdaLR at ``step`` (its ``last_epoch``), the learning rates set as its own step would."""
    scheduler.last_epoch = step
    lrs = [base_lr * factor(step) for factor, base_lr in zip(scheduler.lr_lambdas, scheduler.base_lrs)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


def warmup_cosine(warmup_steps, total_steps):
    """LR factor at a step: linear warmup to 1, then cosine decay to 0 at ``total_steps``."""
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))))
    return factor


def set_head_only(model, head_only):
    """Freeze everything but the head (``head_only``), or unfreeze everything."""
    head = {id(p) for p in model.head.parameters()}
    for param in model.parameters():
        param.requires_grad_(not head_only or id(param) in head)


def topk_correct(logits, labels, k):
    """(top-1 hits, top-k hits) of a batch."""
    top = logits.topk(k, dim=1).indices  # [B, k]
    hits = top == labels[:, None]
    return hits[:, 0].sum(), hits.any(dim=1).sum()


# ----------------------------------------------------------------------------- epochs


class RunningMeans:
    """The epoch's running loss and top-1 for the progress bar, refreshed every step.

    The sums stay on the device. On a CPU they are read directly; on a GPU each step queues a
    copy into pinned host memory behind a CUDA event, and the bar shows the newest copy that has
    landed: it trails by the steps the host has queued ahead of the GPU (usually a few), and
    never costs a host sync, so the host keeps queueing work ahead. The epoch's summary line
    has the exact values.
    """

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.shown = (math.nan, math.nan)
        if self.cuda:
            self.host = torch.zeros(2, dtype=torch.float64, pin_memory=True)
            self.event = torch.cuda.Event()
            self.in_flight = None  # images seen when the copy in flight was queued

    def update(self, sums, seen):
        """(mean loss, top-1) over the images of the epoch so far, as far as the host knows."""
        if not self.cuda:
            loss, hits = sums.tolist()
            if seen:
                self.shown = (loss / seen, hits / seen)
            return self.shown
        if self.in_flight is not None and self.event.query():
            loss, hits = self.host.tolist()
            if self.in_flight:
                self.shown = (loss / self.in_flight, hits / self.in_flight)
            self.in_flight = None
        if self.in_flight is None:
            self.host.copy_(sums, non_blocking=True)
            self.event.record()
            self.in_flight = seen
        return self.shown


def train_one_epoch(model, loader, optimizer, scheduler, args, device, epoch, rank, world, warned):
    """Returns [loss sum, top-1 hits, images, skipped files] summed over processes, and images/s.

    A batch whose every file was unreadable is skipped: no forward, no optimizer step (the
    schedule still advances, so the learning rate stays a function of the position in the epoch).
    With several processes each must run every step's gradient all-reduce, so a process with an
    empty batch runs one blank placeholder image whose loss counts 0 (its gradient is zero).
    """
    model.train()
    torch.manual_seed(epoch_seed(args.seed, epoch, rank))
    loader.sampler.set_epoch(epoch)
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, top-1 hits: on the device, no sync per step
    seen = skipped = 0
    means = RunningMeans(device)
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=rank != 0, dynamic_ncols=True, leave=True)
    start = time.perf_counter()
    for batch in bar:
        skipped += data.report_skipped(batch.skipped, warned)
        empty = batch.labels.numel() == 0
        if empty and world == 1:
            with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()" when the first batch is empty
                warnings.simplefilter("ignore", UserWarning)
                scheduler.step()
            continue
        if empty:
            images = torch.zeros(1, *batch.images.shape[1:], dtype=batch.images.dtype, device=device)
            labels = torch.zeros(1, dtype=torch.int64, device=device)
        else:
            images = batch.images.to(device, non_blocking=True)
            labels = batch.labels.to(device, non_blocking=True)
        with autocast(device, args.amp):
            logits = model(images)
        # a sum over the batch / its size (a placeholder's loss counts 0)
        loss_sum = F.cross_entropy(logits.float(), labels, label_smoothing=args.label_smoothing, reduction="sum")
        if empty:
            loss_sum = loss_sum * 0
        optimizer.zero_grad(set_to_none=True)
        (loss_sum / labels.numel()).backward()
        optimizer.step()
        scheduler.step()
        if empty:
            continue
        sums += torch.stack([loss_sum.detach().double(), (logits.argmax(1) == labels).sum().double()])
        seen += labels.numel()
        if rank == 0:
            loss, top1 = means.update(sums, seen)
            bar.set_postfix(loss=f"{loss:.4f}", acc=f"{top1:.3f}",
                            img_s=f"{seen * world / (time.perf_counter() - start):.0f}",
                            lr=f"{optimizer.param_groups[0]['lr']:.2e}", refresh=False)
    totals = all_reduce_sum(torch.cat([sums, torch.tensor([seen, skipped], dtype=torch.float64, device=device)]), world)
    return totals.tolist(), totals[2].item() / (time.perf_counter() - start)


def run_inference(model, loader, device, amp):
    """Yields (fp32 logits [B, classes], batch) over a loader, in eval mode, without gradients.

    A batch whose every file was unreadable is not run: it comes with logits None (its
    ``batch.skipped`` still names the files).
    """
    model.eval()
    with torch.no_grad():
        for batch in loader:
            if batch.labels.numel() == 0:
                yield None, batch
                continue
            with autocast(device, amp):
                logits = model(batch.images.to(device, non_blocking=True))
            yield logits.float(), batch


def validate(model, loader, device, amp, num_classes, world, warned):
    """[loss sum, top-1 hits, top-k hits, images, skipped files] summed over processes."""
    k = min(5, num_classes)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, top-1 hits, top-k hits
    seen = skipped = 0
    for logits, batch in run_inference(model, loader, device, amp):
        skipped += data.report_skipped(batch.skipped, warned)
        if logits is None:
            continue
        labels = batch.labels.to(device)
        top1, topk = topk_correct(logits, labels, k)
        sums += torch.stack([F.cross_entropy(logits, labels, reduction="sum").double(), top1.double(), topk.double()])
        seen += labels.numel()
    counts = torch.tensor([seen, skipped], dtype=torch.float64, device=device)
    return all_reduce_sum(torch.cat([sums, counts]), world).tolist()


# ----------------------------------------------------------------------------- run files


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


# ----------------------------------------------------------------------------- the run


def fit(args, checkpoint, rank, world, device):
    out = Path(args.out)
    train_dir, val_dir = data.dataset_splits(args.data)
    classes = data.find_classes(train_dir)
    train_samples = data.scan_split(train_dir, classes)
    val_samples = data.scan_split(val_dir, classes)
    if not train_samples:
        raise data.DataError(f"{train_dir}: no images in any class folder")
    if checkpoint is not None and checkpoint["classes"] != classes:
        raise SystemExit(f"error: {args.resume} was trained on classes {checkpoint['classes']}; "
                         f"{train_dir} has {classes}")

    torch.manual_seed(args.seed)  # the new head's initialization
    weights = None if checkpoint is not None else args.weights
    try:
        model = build_model(args.model, len(classes), args.img_size, args.model_arg, weights)
    # a bad --weights file or --model-arg
    except (OSError, TypeError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise SystemExit(f"error: cannot build {args.model} with --model-arg {args.model_arg} and --weights "
                         f"{weights}: {err}") from None
    args.img_size = args.img_size or model.patch_embed.img_size[0]
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
    model.to(device)
    if rank == 0:
        note_amp(args.amp, device)

    train_set = data.ImageDataset(train_samples, args.img_size, augment=not args.no_augment, seed=args.seed)
    val_set = data.ImageDataset(val_samples, args.img_size)
    train_sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True,
                                                        seed=args.seed)
    pin = device.type == "cuda"
    train_loader = data.make_loader(train_set, args.batch_size, args.workers, data.EpochSampler(train_sampler), pin)
    # validation is split without padding (DistributedSampler repeats samples), so its sums are exact
    val_loader = data.make_loader(val_set, args.batch_size, args.workers, range(rank, len(val_set), world), pin)

    optimizer = make_optimizer(model, args, device)
    steps = len(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(round(args.warmup_epochs * steps), args.epochs * steps))
    start_epoch, best_top1, history = 0, -1.0, []
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        start_epoch, best_top1 = checkpoint["epoch"], checkpoint["best_top1"]
        # the schedule is kept in epochs: at the resumed epoch's first step in this run's steps per
        # epoch (the same step as saved unless the batch size or the process count changed)
        saved_steps = checkpoint.get("steps_per_epoch") or scheduler.last_epoch // max(1, start_epoch)
        set_schedule_position(scheduler, start_epoch * steps)
        history = checkpoint.get("metrics")
        if history is None:  # a last.pt from before the history was kept in it
            history = read_metrics(out / "metrics.csv", start_epoch)
        if rank == 0 and saved_steps != steps:
            saved = checkpoint["args"]
            was = (f"batch size {saved.get('batch_size')} x {checkpoint.get('world_size', '?')} process(es)")
            print(f"resume: {steps} steps per epoch (batch size {args.batch_size} x {world} process(es)) where "
                  f"{args.resume} ran {saved_steps} ({was}); the learning-rate schedule is kept in epochs "
                  f"(warmup {args.warmup_epochs:g}, cosine to 0 at epoch {args.epochs}) and continues at epoch "
                  f"{start_epoch}, lr {optimizer.param_groups[0]['lr']:.3g} (not rescaled for the batch size)")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        print(f"{args.model} at {args.img_size}px, {len(classes)} classes, {len(train_set)} train / "
              f"{len(val_set)} val images ({val_dir.name}), {world} process(es) on {device}"
              + (f" (collective timeout {args.dist_timeout:g} s)" if world > 1 else "") + f", run folder {out}")
        if checkpoint is not None:
            write_metrics(out / "metrics.csv", history)  # the CSV agrees with last.pt from here on
            if history:
                plot_curves(out / "metrics.csv", out / "curves.png")
        if start_epoch >= args.epochs:
            print(f"{getattr(args, 'resume', out / 'last.pt')} already finished its {args.epochs} epochs; "
                  "nothing to do")

    meta = {"classes": classes, "model_name": args.model, "model_kwargs": args.model_arg, "img_size": args.img_size,
            "args": plain({key: value for key, value in vars(args).items() if key != "resume"}),
            "steps_per_epoch": steps, "world_size": world}
    warned = set()
    train_model, head_only = None, None
    for epoch in range(start_epoch, args.epochs):
        if head_only != (epoch < args.freeze_epochs):
            head_only = epoch < args.freeze_epochs
            set_head_only(model, head_only)
            # DDP syncs the gradients of the parameters that train when it is built: rebuild it per phase
            train_model = model if world == 1 else DistributedDataParallel(model)
        (loss, hits, seen, train_skipped), images_per_s = train_one_epoch(
            train_model, train_loader, optimizer, scheduler, args, device, epoch, rank, world, warned)
        val_loss, val_top1, val_topk, val_seen, val_skipped = validate(
            model, val_loader, device, args.amp, len(classes), world, warned)
        if rank != 0:
            continue
        row = {"epoch": epoch + 1, "train_loss": loss / max(seen, 1), "train_top1": hits / max(seen, 1),
               "val_loss": val_loss / max(val_seen, 1), "val_top1": val_top1 / max(val_seen, 1),
               "val_top5": val_topk / max(val_seen, 1), "lr": float(optimizer.param_groups[0]["lr"]),
               "images_per_s": float(images_per_s)}
        summary = (f"epoch {epoch + 1}/{args.epochs}: train loss {row['train_loss']:.4f} top-1 {row['train_top1']:.2%} "
                   f"({int(seen)} images{', head only' if head_only else ''}) | val loss {row['val_loss']:.4f} "
                   f"top-1 {row['val_top1']:.2%} top-{min(5, len(classes))} {row['val_top5']:.2%} | "
                   f"{images_per_s:.0f} img/s | lr {row['lr']:.2e}")
        if train_skipped or val_skipped:
            summary += f" | skipped unreadable images: {int(train_skipped)} train, {int(val_skipped)} val"
        print(summary)
        best_top1 = max(best_top1, row["val_top1"])
        history = [*history, row]
        state = {"model": model.state_dict(), "epoch": epoch + 1, "best_top1": best_top1, **meta}
        if row["val_top1"] == best_top1:
            save_atomic({**state, "val_top1": row["val_top1"]}, out / "best.pt")
        save_atomic({**state, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "scaler": None, "metrics": history}, out / "last.pt")
        # after last.pt: a death between the two leaves a CSV one row short, rewritten from last.pt on resume
        write_metrics(out / "metrics.csv", history)
        plot_curves(out / "metrics.csv", out / "curves.png")


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


def main(argv=None):
    logging.basicConfig(format="%(levelname)s: %(message)s")
    args, checkpoint = resolve_args(argv)
    rank, world, device = init_distributed(args.device, args.dist_timeout)
    try:
        fit(args, checkpoint, rank, world, device)
    except (data.DataError, SaveError) as err:
        raise SystemExit(f"error: {err}") from None
    finally:
        if world > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
