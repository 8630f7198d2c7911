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

``--cuda-graph`` (off by default) replays the training step of each full batch from one CUDA
graph (``vit_fast.capture_train_step``): AdamW built with ``capturable=True`` and a tensor
learning rate that the schedule updates in place; bf16 autocast under ``--amp`` (there is no
fp16 mode, whose gradient scaler could not be captured); the last partial batch of an epoch, or
one that lost unreadable files, runs eagerly, so nothing is dropped. It needs ``--optimizer
adamw`` and one process; without CUDA it has no effect (one note line) and the run trains eagerly.

Command-line mistakes (a bad value, a missing or unusable file, an unavailable device) are one
line ``prog: error: ...`` and exit status 2, before any work starts.

This module is the command: its arguments and ``main``. The run itself is ``vit_fast.fit``, the
epochs ``vit_fast.loop``, the optimizer and schedule ``vit_fast.optimization``, devices and the
process group ``vit_fast.devices``, and the run's files ``vit_fast.run_files``.
"""
import argparse
import ast
import logging
import sys
from pathlib import Path

import vit_fast
from vit_fast import data
from vit_fast.cli import duration, float_in, nonnegative_int, positive_int, usage_error
from vit_fast.devices import DEFAULT_DIST_TIMEOUT_S, device_problem, init_distributed, shutdown_distributed, world_size
from vit_fast.fit import fit
from vit_fast.configs import CONFIGS
from vit_fast.optimization import OPTIMIZER_DEFAULTS
from vit_fast.run_files import CheckpointError, SaveError, load_run

# the arguments that fix the architecture: a resumed run must not change them
ARCHITECTURE_ARGS = ("model", "img_size", "model_arg")
DEFAULTS = dict(
    data=None, model="vit_base_patch16_224", model_arg={}, img_size=None, epochs=10, batch_size=64, lr=None,
    weight_decay=None, optimizer="adamw", warmup_epochs=1.0, label_smoothing=0.1, weights=None, freeze_epochs=0,
    amp=False, no_augment=False, workers=data.DEFAULT_WORKERS, device=None, seed=0, out=None,
    dist_timeout=DEFAULT_DIST_TIMEOUT_S, cuda_graph=False,
)


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
    p.add_argument("--cuda-graph", dest="cuda_graph", action=argparse.BooleanOptionalAction,
                   help="replay each full batch's training step from one CUDA graph (no launch gaps; the last "
                        "partial batch runs eagerly); needs --optimizer adamw and one process; no effect without "
                        "CUDA (default off until a GPU run shows it faster; --no-cuda-graph turns off a resumed "
                        "run's)")
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
            checkpoint = load_run(given["resume"])
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
    if args["cuda_graph"] and args["optimizer"] != "adamw":
        usage_error(parser, f"argument --cuda-graph: needs --optimizer adamw (a captured step reads the learning "
                            f"rate from a GPU tensor, which {args['optimizer']}'s step reads back on the host)")
    if args["cuda_graph"] and world_size() > 1:
        usage_error(parser, f"argument --cuda-graph: one process only ({world_size()} started): DDP's gradient "
                            "all-reduce is not captured here; train without --cuda-graph")


def main(argv=None):
    logging.basicConfig(format="%(levelname)s: %(message)s")
    args, checkpoint = resolve_args(argv)
    rank, world, device = init_distributed(args.device, args.dist_timeout)
    try:
        fit(args, checkpoint, rank, world, device)
    except (data.DataError, SaveError) as err:
        raise SystemExit(f"error: {err}") from None
    finally:
        shutdown_distributed(world)


if __name__ == "__main__":
    sys.exit(main())
