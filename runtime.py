"""Where and how a script runs: the runtime flags every stage shares, torchrun's process group, a synced timer."""
import os
import time

import torch
import torch.distributed as dist


def add_runtime_args(p, batch_size, batch_help, seed=0):
    """--device, --amp, --batch-size and --seed, meaning the same in every script: where to run, bf16
    autocast, spots (or patches) per forward step, and the seed of this script's own random numbers."""
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (default: cuda when present)")
    p.add_argument("--amp", action="store_true",
                   help="bf16 autocast (GPUs; about 10x slower on CPUs without bf16 units)")
    p.add_argument("--batch-size", type=int, default=batch_size, help=batch_help)
    p.add_argument("--seed", type=int, default=seed, help=f"seed of this script's random numbers (default {seed})")


def init_distributed(device):
    """Under torchrun, join the process group (NCCL on GPUs, one per process; gloo on CPUs)
    -> (rank, world size, this process's device); a single process gets (0, 1, device)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)                # NCCL's barrier uses the current device
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return rank, world, device


def synced_seconds(dev, f):
    """Wall seconds of f() on `dev`; on a GPU the queued work is finished before and after, since CUDA
    runs asynchronously and the clock would otherwise stop before the kernels do."""
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    f()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0
