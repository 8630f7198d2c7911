"""The optimizer and learning-rate schedule of a training run.

AdamW (fused on a GPU) or SGD with momentum, weight decay on matrices only; the learning rate
warms up linearly over ``--warmup-epochs`` and decays as a cosine to 0 at ``--epochs``, stepped
per batch by a ``LambdaLR`` and kept in epochs across a resume (`set_schedule_position`).

Under ``--cuda-graph`` the optimizer is built with ``capturable=True`` (its step counts live on
the GPU) and each group's learning rate becomes a 0-dim CUDA tensor (`use_tensor_lr`): the
scheduler fills it in place before each step, and the captured ``optimizer.step()`` reads it
there, so the schedule goes on without recapturing. Checkpoints still hold plain floats
(`optimizer_state`, `scheduler_state`), so a run saved with the flag resumes without it and back.
"""
import math

import torch

# per optimizer: (lr, weight decay) when not given
OPTIMIZER_DEFAULTS = {"adamw": (5e-4, 0.05), "sgd": (0.01, 0.0)}
LR_KEYS = ("lr", "initial_lr")


def make_optimizer(model, args, device, capturable=False):
    """Weight decay on matrices only (not on biases, norms, position embedding or class token).

    ``capturable``: AdamW with ``capturable=True`` on a GPU, so `vit_fast.capture_train_step`
    can capture its step (the option means nothing on a CPU and is not set there).
    """
    decay, no_decay = [], []
    exempt = model.no_weight_decay()
    for name, param in model.named_parameters():
        (decay if param.ndim >= 2 and name not in exempt else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if args.optimizer == "sgd":
        if capturable:
            raise ValueError("a capturable optimizer needs --optimizer adamw (SGD's multi-tensor step reads a "
                             "tensor learning rate on the host)")
        return torch.optim.SGD(groups, lr=args.lr, momentum=0.9)
    if capturable and device.type == "cuda":
        return torch.optim.AdamW(groups, lr=args.lr, fused=True, capturable=True)
    return torch.optim.AdamW(groups, lr=args.lr, fused=device.type == "cuda")


def warmup_cosine(warmup_steps, total_steps):
    """LR factor at a step: linear warmup to 1, then cosine decay to 0 at ``total_steps``."""
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))))
    return factor


def set_schedule_position(scheduler, step):
    """Put a LambdaLR at ``step`` (its ``last_epoch``), the learning rates set as its own step would."""
    scheduler.last_epoch = step
    lrs = [base_lr * factor(step) for factor, base_lr in zip(scheduler.lr_lambdas, scheduler.base_lrs)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)  # in place: a captured step reads this tensor
        else:
            group["lr"] = lr
    scheduler._last_lr = lrs


def use_tensor_lr(optimizer, device):
    """Each group's float learning rate -> a 0-dim tensor on ``device`` holding it: float32 on a GPU
    (what the fused AdamW kernel reads), float64 elsewhere (the float schedule's exact values).

    Call it after the scheduler is built and any state is loaded: the scheduler's base rates stay
    floats (so `current_lr` needs no device read), and its steps fill these tensors in place.
    """
    for group in optimizer.param_groups:
        if not isinstance(group["lr"], torch.Tensor):
            dtype = torch.float32 if device.type == "cuda" else torch.float64
            group["lr"] = torch.tensor(float(group["lr"]), dtype=dtype, device=device)


def current_lr(optimizer, scheduler):
    """The first group's learning rate as a Python float, without a device sync.

    A float lr is read as it is; a tensor one (``--cuda-graph``) is recomputed from the schedule
    (base rate x factor at its position), the value the scheduler last filled it with.
    """
    lr = optimizer.param_groups[0]["lr"]
    if isinstance(lr, torch.Tensor):
        return float(scheduler.base_lrs[0]) * scheduler.lr_lambdas[0](scheduler.last_epoch)
    return lr


def _floats(values):
    return [float(v) if isinstance(v, torch.Tensor) else v for v in values]


def optimizer_state(optimizer):
    """``optimizer.state_dict()`` with tensor learning rates saved as floats (one read per save)."""
    state = optimizer.state_dict()
    state["param_groups"] = [{key: float(value) if key in LR_KEYS and isinstance(value, torch.Tensor) else value
                              for key, value in group.items()} for group in state["param_groups"]]
    return state


def scheduler_state(scheduler):
    """``scheduler.state_dict()`` with its learning rates as floats."""
    state = scheduler.state_dict()
    for key in ("base_lrs", "_last_lr"):
        if key in state:
            state[key] = _floats(state[key])
    return state


def load_optimizer_state(optimizer, state):
    """``optimizer.load_state_dict(state)``, keeping this run's ``capturable`` setting.

    ``load_state_dict`` takes every group option from the file; a run resumed with or without
    ``--cuda-graph`` keeps its own (and the step counts are placed as it needs: on the GPU when
    capturable). Learning rates are loaded as floats; `use_tensor_lr` comes after.
    """
    groups = []
    for own, saved in zip(optimizer.param_groups, state["param_groups"]):
        saved = {key: float(value) if key in LR_KEYS and isinstance(value, torch.Tensor) else value
                 for key, value in saved.items()}
        if "capturable" in own:
            saved["capturable"] = own["capturable"]
        groups.append(saved)
    if len(groups) != len(state["param_groups"]):
        groups = state["param_groups"]  # load_state_dict says what does not match
    optimizer.load_state_dict({**state, "param_groups": groups})


def set_head_only(model, head_only):
    """Freeze everything but the head (``head_only``), or unfreeze everything."""
    head = {id(p) for p in model.head.parameters()}
    for param in model.parameters():
        param.requires_grad_(not head_only or id(param) in head)
