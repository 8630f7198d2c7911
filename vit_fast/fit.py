"""One training run: data, model, optimizer and schedule, the epochs, and the run files.

`fit` is what ``python -m vit_fast.train`` runs once its arguments are resolved (``vit_fast.train``)
and its process group joined (``vit_fast.devices``): it scans DATA, builds the model (from
``--weights``, or a resumed run's weights), the loaders, the optimizer and the per-step schedule,
then per epoch trains (``vit_fast.loop``), validates, and on rank 0 prints the summary and writes
RUN/best.pt, RUN/last.pt, RUN/metrics.csv and RUN/curves.png (``vit_fast.run_files``).
"""
import pickle
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from vit_fast import data, loop, optimization, run_files
from vit_fast.devices import note_amp


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
        model = run_files.build_model(args.model, len(classes), args.img_size, args.model_arg, weights)
    # a bad --weights file or --model-arg
    except (OSError, TypeError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise SystemExit(f"error: cannot build {args.model} with --model-arg {args.model_arg} and --weights "
                         f"{weights}: {err}") from None
    args.img_size = args.img_size or model.patch_embed.img_size[0]
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
    model.to(device)
    # --cuda-graph: the step of each full batch is replayed from a CUDA graph (one process, CUDA only)
    graphed = bool(args.cuda_graph) and loop.can_capture(device)
    if rank == 0:
        note_amp(args.amp, device)
        if args.cuda_graph and not graphed:
            print(f"note: --cuda-graph has no effect without CUDA; training eagerly on {device}")

    train_set = data.ImageDataset(train_samples, args.img_size, augment=not args.no_augment, seed=args.seed)
    val_set = data.ImageDataset(val_samples, args.img_size)
    train_sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True,
                                                        seed=args.seed)
    pin = device.type == "cuda"
    train_loader = data.make_loader(train_set, args.batch_size, args.workers, data.EpochSampler(train_sampler), pin)
    # validation is split without padding (DistributedSampler repeats samples), so its sums are exact
    val_loader = data.make_loader(val_set, args.batch_size, args.workers, range(rank, len(val_set), world), pin)

    optimizer = optimization.make_optimizer(model, args, device, capturable=graphed)
    steps = len(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, optimization.warmup_cosine(round(args.warmup_epochs * steps), args.epochs * steps))
    start_epoch, best_top1, history = 0, -1.0, []
    if checkpoint is not None:
        optimization.load_optimizer_state(optimizer, checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        start_epoch, best_top1 = checkpoint["epoch"], checkpoint["best_top1"]
        # the schedule is kept in epochs: at the resumed epoch's first step in this run's steps per
        # epoch (the same step as saved unless the batch size or the process count changed)
        saved_steps = checkpoint.get("steps_per_epoch") or scheduler.last_epoch // max(1, start_epoch)
        optimization.set_schedule_position(scheduler, start_epoch * steps)
        history = checkpoint.get("metrics")
        if history is None:  # a last.pt from before the history was kept in it
            history = run_files.read_metrics(out / "metrics.csv", start_epoch)
        if rank == 0 and saved_steps != steps:
            saved = checkpoint["args"]
            was = (f"batch size {saved.get('batch_size')} x {checkpoint.get('world_size', '?')} process(es)")
            print(f"resume: {steps} steps per epoch (batch size {args.batch_size} x {world} process(es)) where "
                  f"{args.resume} ran {saved_steps} ({was}); the learning-rate schedule is kept in epochs "
                  f"(warmup {args.warmup_epochs:g}, cosine to 0 at epoch {args.epochs}) and continues at epoch "
                  f"{start_epoch}, lr {optimizer.param_groups[0]['lr']:.3g} (not rescaled for the batch size)")
    if graphed:  # after the loading: the scheduler fills these tensors, the captured step reads them
        optimization.use_tensor_lr(optimizer, device)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        print(f"{args.model} at {args.img_size}px, {len(classes)} classes, {len(train_set)} train / "
              f"{len(val_set)} val images ({val_dir.name}), {world} process(es) on {device}"
              + (f" (collective timeout {args.dist_timeout:g} s)" if world > 1 else "")
              + (", training step replayed from a CUDA graph" if graphed else "") + f", run folder {out}")
        if checkpoint is not None:
            run_files.write_metrics(out / "metrics.csv", history)  # the CSV agrees with last.pt from here on
            if history:
                run_files.plot_curves(out / "metrics.csv", out / "curves.png")
        if start_epoch >= args.epochs:
            print(f"{getattr(args, 'resume', out / 'last.pt')} already finished its {args.epochs} epochs; "
                  "nothing to do")

    meta = {"classes": classes, "model_name": args.model, "model_kwargs": args.model_arg, "img_size": args.img_size,
            "args": run_files.plain({key: value for key, value in vars(args).items() if key != "resume"}),
            "steps_per_epoch": steps, "world_size": world}
    warned = set()
    train_model, head_only, captured = None, None, None
    for epoch in range(start_epoch, args.epochs):
        if head_only != (epoch < args.freeze_epochs):
            head_only = epoch < args.freeze_epochs
            optimization.set_head_only(model, head_only)
            # DDP syncs the gradients of the parameters that train when it is built: rebuild it per phase
            train_model = model if world == 1 else DistributedDataParallel(model)
            # a graph bakes in which parameters get gradients: capture again per phase
            captured = None
            if graphed:
                captured = loop.CapturedStep(model, optimizer, args.batch_size, device, args.amp,
                                             args.label_smoothing)
        (loss, hits, seen, train_skipped), images_per_s = loop.train_one_epoch(
            train_model, train_loader, optimizer, scheduler, args, device, epoch, rank, world, warned, captured)
        val_loss, val_top1, val_topk, val_seen, val_skipped = loop.validate(
            model, val_loader, device, args.amp, len(classes), world, warned)
        if rank != 0:
            continue
        row = {"epoch": epoch + 1, "train_loss": loss / max(seen, 1), "train_top1": hits / max(seen, 1),
               "val_loss": val_loss / max(val_seen, 1), "val_top1": val_top1 / max(val_seen, 1),
               "val_top5": val_topk / max(val_seen, 1), "lr": float(optimization.current_lr(optimizer, scheduler)),
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
            run_files.save_atomic({**state, "val_top1": row["val_top1"]}, out / "best.pt")
        run_files.save_atomic({**state, "optimizer": optimization.optimizer_state(optimizer),
                               "scheduler": optimization.scheduler_state(scheduler), "scaler": None,
                               "metrics": history}, out / "last.pt")
        # after last.pt: a death between the two leaves a CSV one row short, rewritten from last.pt on resume
        run_files.write_metrics(out / "metrics.csv", history)
        run_files.plot_curves(out / "metrics.csv", out / "curves.png")
