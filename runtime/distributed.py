"""The one distributed helper: understands deepspeed, torchrun, SLURM and MPI environments.

`init_distributed()` reads the launcher's environment, picks NCCL on GPUs and gloo on CPU (one
warning), initialises torch.distributed (and DeepSpeed's comm layer on top of it), and seeds
`base + rank`. Everything else asks `is_main_process()`, `get_rank()`, `get_world_size()`.
"""
from __future__ import annotations

import os
import random
import warnings
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    """Where this process sits."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str


def _env_int(*names: str, default: int | None = None) -> int | None:
    for n in names:
        if n in os.environ and os.environ[n] != "":
            return int(os.environ[n])
    return default


def launcher_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from deepspeed/torchrun, SLURM or MPI variables; (0, 1, 0) alone."""
    rank = _env_int("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK", default=0)
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", default=1)
    local = _env_int("LOCAL_RANK", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", default=0)
    return rank, world, local


def init_distributed(seed: int = 0, timeout_min: int = 30) -> DistInfo:
    """Initialise the process group once (idempotent) and seed `seed + rank`."""
    rank, world, local = launcher_env()
    if torch.cuda.is_available():
        backend, device = "nccl", torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        backend, device = "gloo", torch.device("cpu")
        warn_once("no GPU: using the gloo backend and fp32 on CPU")
    if not dist.is_initialized():
        # Expose what torch's env:// rendezvous needs when SLURM/MPI launched us, or when we run alone
        # (DeepSpeed engines need a process group even with one rank: a private one on loopback).
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world))
        os.environ.setdefault("LOCAL_RANK", str(local))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500" if world > 1 else str(_free_port()))
        dist.init_process_group(backend, timeout=timedelta(minutes=timeout_min))
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    if backend == "gloo":
        _unlink_shm_workspace(rank, world)
    seed_everything(seed + rank)
    return DistInfo(rank, world, local, device, backend)


def _unlink_shm_workspace(rank: int, world: int) -> None:
    """Remove the name of DeepSpeed's CPU all-reduce workspace once every rank has mapped it.

    DeepSpeed's shared-memory all-reduce (deepspeed/ops/csrc/cpu/comm/shm.cpp, used when every rank
    is on one node, LOCAL_SIZE == WORLD_SIZE) creates one 69 MB /dev/shm file per rank and never
    unlinks it: each CPU run, finished or killed, left world_size x 69 MB of RAM behind until
    reboot, and a test suite's worth filled a 24 GiB machine until the OOM killer stopped a run.
    `shm_initialize` returns only after a rank has mapped all its peers' files, so after a barrier
    the names are no longer needed; the mappings live on until the processes exit.
    """
    if _env_int("LOCAL_SIZE") != world:
        return
    dist.barrier()
    name = "deepspeed_allreduce_buffer_{}_{}_{}_{}".format(
        os.getuid(), os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""), rank)
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except FileNotFoundError:
        pass


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """The only rank test used elsewhere."""
    return get_rank() == 0


def barrier() -> None:
    if get_world_size() > 1:
        dist.barrier()


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (a no-op alone)."""
    if get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= get_world_size()
    return x


_WARNED: set[str] = set()


def warn_once(msg: str) -> None:
    """Warn once per process per message (settings that are ignored or fall back)."""
    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(msg, stacklevel=2)
