"""The epochs: one pass of training over a loader, and the evaluation passes.

`train_one_epoch` runs each batch's step (eagerly, or replayed from a CUDA graph under
``--cuda-graph``, see `CapturedStep`), keeps the loss and top-1 sums on the device (no host
sync per step) and shows running means in a tqdm bar. `validate` sums loss, top-1 and top-k
over a split; `run_inference` is the eval-mode loop ``evaluate`` and ``predict`` share. With
several processes the sums are all-reduced once per epoch.
"""
import math
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from vit_fast import data
from vit_fast.devices import all_reduce_sum, autocast
from vit_fast.graphs import capture_train_step
from vit_fast.optimization import current_lr

CAPTURABLE_WARNING = "This instance was constructed with capturable=True"  # an eager step of a capturable optimizer


def epoch_seed(seed, epoch, rank):
    """The torch RNG seed (dropout, drop path) of one epoch on one process."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def topk_correct(logits, labels, k):
    """(top-1 hits, top-k hits) of a batch."""
    top = logits.topk(k, dim=1).indices  # [B, k]
    hits = top == labels[:, None]
    return hits[:, 0].sum(), hits.any(dim=1).sum()


# ----------------------------------------------------------------------------- the training step


def train_step(model, optimizer, images, labels, device, amp, label_smoothing, placeholder=False,
               zero_in_place=False):
    """One eager step: forward, the mean loss's backward, ``optimizer.step()``.

    Returns (the loss summed over the batch, top-1 hits), detached, on the device. ``placeholder``:
    the batch is a blank stand-in whose loss counts 0 (its gradient is zero). ``zero_in_place``:
    the gradients are zeroed rather than set to None, so they stay the tensors a captured step
    writes (see `CapturedStep`).
    """
    with autocast(device, amp):
        logits = model(images)
    # a sum over the batch / its size (a placeholder's loss counts 0)
    loss_sum = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing, reduction="sum")
    if placeholder:
        loss_sum = loss_sum * 0
    optimizer.zero_grad(set_to_none=not zero_in_place)
    (loss_sum / labels.numel()).backward()
    optimizer.step()
    return loss_sum.detach(), (logits.argmax(1) == labels).sum()


def can_capture(device):
    """Whether ``--cuda-graph`` captures on ``device`` (CUDA only; elsewhere the flag has no effect)."""
    return device.type == "cuda"


class CapturedStep:
    """``--cuda-graph``: the step of a full batch replayed from one CUDA graph, other batches eagerly.

    The graph is captured (`vit_fast.capture_train_step`: warm-up on the batch, capture, the
    warm-up undone) at the first batch of ``batch_size`` images, and replayed for every later
    batch of that shape: forward, loss, backward and the optimizer step in one launch. A batch
    of another shape (the last partial batch of an epoch, a batch that lost unreadable files)
    runs the same step eagerly, its gradients zeroed in place so the graph's stay where it writes
    them; nothing is dropped, so an epoch sees the same images and the schedule the same steps
    as without the flag. ``amp`` is bf16 autocast (no gradient scaler: it cannot be captured).
    The optimizer must be capturable with a tensor learning rate (`vit_fast.optimization`).
    A new phase (``--freeze-epochs`` changing which parameters train) needs a new CapturedStep.
    """

    def __init__(self, model, optimizer, batch_size, device, amp, label_smoothing):
        self.model, self.optimizer, self.batch_size = model, optimizer, batch_size
        self.device, self.amp, self.label_smoothing = device, amp, label_smoothing
        self.step = None
        self.shape = None
        self.outputs = {}  # the captured step's loss sum and top-1 hits: rewritten by each replay

    def _loss(self, logits, labels):
        loss_sum = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing, reduction="sum")
        self.outputs["loss_sum"] = loss_sum.detach()
        self.outputs["hits"] = (logits.argmax(1) == labels).sum()
        return loss_sum / labels.numel()

    def __call__(self, images, labels):
        """(loss sum, top-1 hits) of one step on the batch, detached, on the device."""
        if self.step is None and images.shape[0] == self.batch_size:
            self.step = capture_train_step(self.model, self.optimizer, self._loss, images, labels,
                                           amp_dtype=torch.bfloat16 if self.amp else None)
            self.shape = images.shape
        if self.step is not None and images.shape == self.shape:
            self.step(images, labels)
            return self.outputs["loss_sum"], self.outputs["hits"]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=CAPTURABLE_WARNING)
            return train_step(self.model, self.optimizer, images, labels, self.device, self.amp,
                              self.label_smoothing, zero_in_place=self.step is not None)


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


def train_one_epoch(model, loader, optimizer, scheduler, args, device, epoch, rank, world, warned, captured=None):
    """Returns [loss sum, top-1 hits, images, skipped files] summed over processes, and images/s.

    A batch whose every file was unreadable is skipped: no forward, no optimizer step (the
    schedule still advances, so the learning rate stays a function of the position in the epoch).
    With several processes each must run every step's gradient all-reduce, so a process with an
    empty batch runs one blank placeholder image whose loss counts 0 (its gradient is zero).
    ``captured``: a `CapturedStep` that runs the steps (``--cuda-graph``, one process), else eager.
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
        if captured is not None and not empty:
            loss_sum, hits = captured(images, labels)
        else:
            loss_sum, hits = train_step(model, optimizer, images, labels, device, args.amp, args.label_smoothing,
                                        placeholder=empty)
        scheduler.step()
        if empty:
            continue
        sums += torch.stack([loss_sum.double(), hits.double()])
        seen += labels.numel()
        if rank == 0:
            loss, top1 = means.update(sums, seen)
            bar.set_postfix(loss=f"{loss:.4f}", acc=f"{top1:.3f}",
                            img_s=f"{seen * world / (time.perf_counter() - start):.0f}",
                            lr=f"{current_lr(optimizer, scheduler):.2e}", refresh=False)
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
