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
"""
import argparse
import ast
import csv
import logging
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import vit_fast
from vit_fast import data

METRIC_COLUMNS = ["epoch", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "lr", "images_per_s"]
# the arguments that fix the architecture: a resumed run must not change them
ARCHITECTURE_ARGS = ("model", "img_size", "model_arg")
DEFAULTS = dict(
    data=None, model="vit_base_patch16_224", model_arg={}, img_size=None, epochs=10, batch_size=64, lr=None,
    weight_decay=None, optimizer="adamw", warmup_epochs=1.0, label_smoothing=0.1, weights=None, freeze_epochs=0,
    amp=False, no_augment=False, workers=data.DEFAULT_WORKERS, device=None, seed=0, out=None,
)
# per optimizer: (lr, weight decay) when not given
OPTIMIZER_DEFAULTS = {"adamw": (5e-4, 0.05), "sgd": (0.01, 0.0)}
CHECKPOINT_KEYS = ("model", "classes", "model_name", "model_kwargs", "img_size")

log = logging.getLogger("vit_fast.train")


# ----------------------------------------------------------------------------- arguments


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
    p.add_argument("--img-size", dest="img_size", type=int, help="training resolution (default: the model's)")
    p.add_argument("--epochs", type=int, help=f"(default {DEFAULTS['epochs']})")
    p.add_argument("--batch-size", dest="batch_size", type=int, help=f"per process (default {DEFAULTS['batch_size']})")
    p.add_argument("--lr", type=float, help="peak learning rate (default 5e-4 for adamw, 0.01 for sgd)")
    p.add_argument("--weight-decay", dest="weight_decay", type=float, help="(default 0.05 for adamw, 0 for sgd)")
    p.add_argument("--optimizer", choices=sorted(OPTIMIZER_DEFAULTS), help="(default adamw; sgd has momentum 0.9)")
    p.add_argument("--warmup-epochs", dest="warmup_epochs", type=float,
                   help=f"linear warmup, then cosine decay to 0, per step (default {DEFAULTS['warmup_epochs']})")
    p.add_argument("--label-smoothing", dest="label_smoothing", type=float,
                   help=f"(default {DEFAULTS['label_smoothing']})")
    p.add_argument("--weights", help="pretrained timm .pth/.safetensors or Google .npz (head replaced for new classes)")
    p.add_argument("--freeze-epochs", dest="freeze_epochs", type=int,
                   help="train only the head for the first N epochs, then everything (default 0)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast on a GPU (ignored on a CPU)")
    p.add_argument("--no-augment", dest="no_augment", action="store_true",
                   help="train on the centre crop, without random resized crop and flip")
    p.add_argument("--workers", type=int,
                   help=f"decoding processes per training process (default {DEFAULTS['workers']})")
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--seed", type=int, help=f"(default {DEFAULTS['seed']})")
    p.add_argument("--out", help="run folder (default runs/<model>; with --resume, the checkpoint's folder)")
    p.add_argument("--resume", help="RUN/last.pt: continue that run at its next epoch")
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
        checkpoint = load_checkpoint(given["resume"])
        saved = checkpoint["args"]
        for key in ARCHITECTURE_ARGS:
            if key in given and given[key] != saved[key]:
                flag = "--" + key.replace("_", "-")
                raise SystemExit(f"error: --resume {given['resume']} is a {saved['model']} run with {flag} "
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
    return argparse.Namespace(**args), checkpoint


# ----------------------------------------------------------------------------- model and checkpoints


def build_model(name, num_classes, img_size=None, model_kwargs=None, weights=None):
    """A vit_fast model for ``num_classes``, from pretrained ``weights`` when given."""
    return vit_fast.create_model(name, checkpoint=weights, num_classes=num_classes, img_size=img_size,
                                 **(model_kwargs or {}))


def load_checkpoint(path):
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"error: {path}: checkpoint not found")
    checkpoint = torch.load(path, map_location="cpu")
    missing = [key for key in CHECKPOINT_KEYS if key not in checkpoint]
    if missing:
        raise SystemExit(f"error: {path}: not a checkpoint written by vit_fast.train (no {', '.join(missing)})")
    return checkpoint


def load_trained_model(path, device_name=None, amp=False):
    """(model in eval mode, checkpoint dict, device) from a RUN/best.pt or RUN/last.pt."""
    device = pick_device(device_name)
    note_amp(amp, device)
    checkpoint = load_checkpoint(path)
    model = build_model(checkpoint["model_name"], len(checkpoint["classes"]), checkpoint["img_size"],
                        checkpoint["model_kwargs"])
    model.load_state_dict(checkpoint["model"])
    return model.to(device).eval(), checkpoint, device


def save_atomic(obj, path):
    """torch.save through a temporary file, so an interrupted save never leaves a broken checkpoint."""
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


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


def init_distributed(device_name):
    """(rank, world size, device); under torchrun, one process group (NCCL on GPUs, gloo on CPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_name)
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
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


def train_one_epoch(model, loader, optimizer, scheduler, args, device, epoch, rank, world, warned):
    """Returns [loss sum, top-1 hits, images, skipped files] summed over processes, and images/s."""
    model.train()
    torch.manual_seed(epoch_seed(args.seed, epoch, rank))
    loader.sampler.set_epoch(epoch)
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, top-1 hits: on the device, no sync per step
    seen = skipped = 0
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=rank != 0, dynamic_ncols=True, leave=True)
    start = time.perf_counter()
    for step, batch in enumerate(bar):
        skipped += data.report_skipped(batch.skipped, warned)
        images = batch.images.to(device, non_blocking=True)
        labels = batch.labels.to(device, non_blocking=True)
        with autocast(device, args.amp):
            logits = model(images)
        # a sum over the batch / its size: a batch whose every file was unreadable gives loss 0, and
        # still steps, so every DDP process runs the same number of steps
        loss_sum = F.cross_entropy(logits.float(), labels, label_smoothing=args.label_smoothing, reduction="sum")
        optimizer.zero_grad(set_to_none=True)
        (loss_sum / max(1, labels.numel())).backward()
        optimizer.step()
        scheduler.step()
        sums += torch.stack([loss_sum.detach().double(), (logits.argmax(1) == labels).sum().double()])
        seen += labels.numel()
        if rank == 0 and (step % 10 == 0 or step == len(loader) - 1):  # reading sums syncs: not every step
            loss, hits = sums.tolist()
            bar.set_postfix(loss=f"{loss / max(seen, 1):.4f}", acc=f"{hits / max(seen, 1):.3f}",
                            img_s=f"{seen * world / (time.perf_counter() - start):.0f}",
                            lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    totals = all_reduce_sum(torch.cat([sums, torch.tensor([seen, skipped], dtype=torch.float64, device=device)]), world)
    return totals.tolist(), totals[2].item() / (time.perf_counter() - start)


def run_inference(model, loader, device, amp):
    """Yields (fp32 logits [B, classes], batch) over a loader, in eval mode, without gradients."""
    model.eval()
    with torch.no_grad():
        for batch in loader:
            with autocast(device, amp):
                logits = model(batch.images.to(device, non_blocking=True))
            yield logits.float(), batch


def validate(model, loader, device, amp, num_classes, world, warned):
    """[loss sum, top-1 hits, top-k hits, images, skipped files] summed over processes."""
    k = min(5, num_classes)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, top-1 hits, top-k hits
    seen = skipped = 0
    for logits, batch in run_inference(model, loader, device, amp):
        labels = batch.labels.to(device)
        top1, topk = topk_correct(logits, labels, k)
        sums += torch.stack([F.cross_entropy(logits, labels, reduction="sum").double(), top1.double(), topk.double()])
        seen += labels.numel()
        skipped += data.report_skipped(batch.skipped, warned)
    counts = torch.tensor([seen, skipped], dtype=torch.float64, device=device)
    return all_reduce_sum(torch.cat([sums, counts]), world).tolist()


# ----------------------------------------------------------------------------- run files


def write_metrics(path, row, resumed_epoch):
    """Append ``row`` to metrics.csv; on the first write of a run, keep only the rows up to the resumed epoch."""
    rows = []
    if resumed_epoch is not None and path.exists():
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["epoch"]) <= resumed_epoch]
    if resumed_epoch is not None or not path.exists():
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, METRIC_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    with open(path, "a", newline="") as f:
        csv.DictWriter(f, METRIC_COLUMNS).writerow(
            {key: value if isinstance(value, int) else f"{value:.6g}" for key, value in row.items()})


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
    fig.savefig(png_path, dpi=100)
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
    except (OSError, TypeError, ValueError, RuntimeError) as err:  # a bad --weights file or --model-arg
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
    start_epoch, best_top1 = 0, -1.0
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        start_epoch, best_top1 = checkpoint["epoch"], checkpoint["best_top1"]
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        print(f"{args.model} at {args.img_size}px, {len(classes)} classes, {len(train_set)} train / "
              f"{len(val_set)} val images ({val_dir.name}), {world} process(es) on {device}, run folder {out}")
        if start_epoch >= args.epochs:
            print(f"{args.resume} already finished its {args.epochs} epochs; nothing to do")

    meta = {"classes": classes, "model_name": args.model, "model_kwargs": args.model_arg, "img_size": args.img_size,
            "args": {key: value for key, value in vars(args).items() if key != "resume"}}
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
               "val_top5": val_topk / max(val_seen, 1), "lr": optimizer.param_groups[0]["lr"],
               "images_per_s": images_per_s}
        summary = (f"epoch {epoch + 1}/{args.epochs}: train loss {row['train_loss']:.4f} top-1 {row['train_top1']:.2%} "
                   f"({int(seen)} images{', head only' if head_only else ''}) | val loss {row['val_loss']:.4f} "
                   f"top-1 {row['val_top1']:.2%} top-{min(5, len(classes))} {row['val_top5']:.2%} | "
                   f"{images_per_s:.0f} img/s | lr {row['lr']:.2e}")
        if train_skipped or val_skipped:
            summary += f" | skipped unreadable images: {int(train_skipped)} train, {int(val_skipped)} val"
        print(summary)
        best_top1 = max(best_top1, row["val_top1"])
        state = {"model": model.state_dict(), "epoch": epoch + 1, "best_top1": best_top1, **meta}
        if row["val_top1"] == best_top1:
            save_atomic({**state, "val_top1": row["val_top1"]}, out / "best.pt")
        save_atomic({**state, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "scaler": None}, out / "last.pt")
        write_metrics(out / "metrics.csv", row, start_epoch if epoch == start_epoch else None)
        plot_curves(out / "metrics.csv", out / "curves.png")


def main(argv=None):
    logging.basicConfig(format="%(levelname)s: %(message)s")
    args, checkpoint = resolve_args(argv)
    rank, world, device = init_distributed(args.device)
    try:
        fit(args, checkpoint, rank, world, device)
    except data.DataError as err:
        raise SystemExit(f"error: {err}") from None
    finally:
        if world > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
