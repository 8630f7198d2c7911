"""Where the workflow runs: the device, bf16 autocast, and the torchrun process group.

One process is one device. Under ``torchrun`` (``WORLD_SIZE`` > 1) `init_distributed` joins the
process group (NCCL on GPUs, gloo on CPUs) and each process takes the GPU of its ``LOCAL_RANK``;
`all_reduce_sum` is the only collective the workflow runs besides DDP's gradient all-reduce.
"""
import os
from datetime import timedelta

import torch
import torch.distributed as dist

DEFAULT_DIST_TIMEOUT_S = 600.0  # how long a collective waits for the other processes (not the backend's 30 min)


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


def world_size():
    """The number of processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device_name, timeout_s=DEFAULT_DIST_TIMEOUT_S):
    """(rank, world size, device); under torchrun, one process group (NCCL on GPUs, gloo on CPUs).

    ``timeout_s``: how long a collective waits for the other processes before it fails (a frozen
    rank then stops the run in minutes, not the backend's default 30).
    """
    world = world_size()
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


def shutdown_distributed(world):
    if world > 1:
        dist.destroy_process_group()
