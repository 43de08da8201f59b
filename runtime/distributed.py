"""The one distributed helper: understands deepspeed, torchrun, SLURM and MPI environments.

`init_distributed()` reads the launcher's environment, picks NCCL on GPUs and gloo on CPU (one
warning), initialises torch.distributed (and DeepSpeed's comm layer on top of it), and seeds
`base + rank`. Everything else asks `is_main_process()`, `get_rank()`, `get_world_size()`.
"""
from __future__ import annotations

import atexit
import functools
import gc
import os
import random
import shutil
import sys
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable

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


def _slurm(*names: str) -> tuple[str, ...]:
    """`names` inside a SLURM job step (srun sets SLURM_STEP_ID), else none: the batch script and an salloc
    shell carry SLURM_PROCID / SLURM_NTASKS / SLURM_NTASKS_PER_NODE of the whole allocation, and a lone
    process there (an evaluation, a one-rank trainer) waited for N - 1 ranks that never came."""
    return names if "SLURM_STEP_ID" in os.environ else ()


def launcher_env(local_default: int | None = 0) -> tuple[int, int, int | None]:
    """(rank, world_size, local_rank) from deepspeed/torchrun, MPI or SLURM-step variables; (0, 1, 0) alone.
    mpirun inside an allocation: its own variables, not the allocation's. `local_default` is the local rank
    when no variable sets one (None lets a caller tell unset from 0)."""
    rank = _env_int("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", *_slurm("SLURM_PROCID"), default=0)
    world = _env_int("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", *_slurm("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"),
                     default=1)
    local = _env_int("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", *_slurm("SLURM_LOCALID"),
                     default=local_default)
    return rank, world, local


def rendezvous(env, world: int) -> tuple[str, str]:
    """(address, port) of rank 0 where no launcher set MASTER_ADDR: loopback alone or on one node; under a
    SLURM step (`srun python -m ...`) the step's first node and a port from the job id. mpirun across nodes
    passes no address on (DeepSpeed's --launcher openmpi neither): refused, since every node would wait on its
    own loopback until the timeout."""
    if world == 1:
        return "127.0.0.1", str(_free_port())
    if "SLURM_STEP_ID" in env and (nodes := env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")):
        from runtime.slurm import expand_nodelist

        return expand_nodelist(nodes)[0], str(10000 + int(env.get("SLURM_JOB_ID", "0") or 0) % 20000)
    local = env.get("OMPI_COMM_WORLD_LOCAL_SIZE")
    if local is not None and local != env.get("OMPI_COMM_WORLD_SIZE"):
        raise RuntimeError(f"mpirun started {env.get('OMPI_COMM_WORLD_SIZE')} ranks on several nodes and set no "
                           "MASTER_ADDR: pass node 0's address and a free port (mpirun -x MASTER_ADDR=HOST -x "
                           "MASTER_PORT=PORT), or start one deepspeed launcher per node (launch/deepspeed_env.sh)")
    return "127.0.0.1", "29500"


def _export_rendezvous(rank: int, world: int, local: int) -> None:
    """What torch's env:// rendezvous needs, where SLURM/MPI launched us or we run alone (DeepSpeed engines need
    a process group even with one rank: a private one on loopback)."""
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(world))
    os.environ.setdefault("LOCAL_RANK", str(local))
    if "MASTER_ADDR" not in os.environ:
        os.environ["MASTER_ADDR"], port = rendezvous(os.environ, world)
        os.environ.setdefault("MASTER_PORT", port)
    os.environ.setdefault("MASTER_PORT", "29500" if world > 1 else str(_free_port()))


def init_distributed(seed: int = 0, timeout_min: float = 30) -> DistInfo:
    """Initialise the process group once (idempotent) and seed `seed + rank`; collectives (and the
    rendezvous) fail after `timeout_min` minutes without the missing rank."""
    rank, world, local = launcher_env()
    if torch.cuda.is_available():
        backend, device = "nccl", torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        backend, device = "gloo", torch.device("cpu")
        warn_once("no GPU: using the gloo backend on CPU")
        share_cpu_cores()
    if not dist.is_initialized():
        _import_group_default_modules()
        _export_rendezvous(rank, world, local)
        dist.init_process_group(backend, timeout=timedelta(minutes=timeout_min))
        atexit.register(_end_job_at_exit)
    import deepspeed

    if backend == "gloo":
        _skip_shm_allreduce_op()
    # DeepSpeed 0.19's ZeRO-3 gathers and reduce-scatters through the two collectives torch 2.14 deprecates
    # for `all_gather_single` / `reduce_scatter_single` (the same calls underneath): a FutureWarning per rank
    # at every checkpoint that the user cannot act on. Only those two messages are hidden.
    warnings.filterwarnings("ignore", r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is "
                            "deprecated", FutureWarning)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    seed_everything(seed + rank)
    return DistInfo(rank, world, local, device, backend)


def share_cpu_cores() -> int:
    """Give each rank on this machine its share of the cores when OMP_NUM_THREADS is unset; returns
    torch's thread count.

    torch starts one OpenMP thread per core in every process. torchrun sets OMP_NUM_THREADS=1 for
    several local ranks, the deepspeed launcher sets nothing (unless --bind_cores_to_rank), so N CPU
    ranks ran N x cores threads that spin against each other: the demo's tokenizer on 2 ranks of a
    2-core machine trained 64 samples/s this way and 140 with one thread per rank. An explicit
    OMP_NUM_THREADS is the user's choice and is kept."""
    local = _env_int("LOCAL_SIZE", "LOCAL_WORLD_SIZE", *_slurm("SLURM_NTASKS_PER_NODE"), default=1)
    if "OMP_NUM_THREADS" not in os.environ and local > 1:
        torch.set_num_threads(max(1, min(torch.get_num_threads(), local_cores() // local)))
    return torch.get_num_threads()


def local_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS reports one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def describe_host() -> str:
    """What a timed job ran on: the GPU model and count, or the CPU model, the vector ISA torch dispatches to
    and the cores this process may use (the project's CPU hosts of one class differ in ISA and speed)."""
    import platform

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} x{torch.cuda.device_count()}"
    info = "/proc/cpuinfo"
    lines = open(info).read().splitlines() if os.path.isfile(info) else []
    names = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")]
    cpu = names[0] if names else platform.processor() or platform.machine()
    return f"{cpu}, {torch.backends.cpu.get_cpu_capability()}, {local_cores()} cores"


def _import_group_default_modules() -> None:
    """Import, before the default process group exists, the modules whose functions take
    `group=GroupMember.WORLD` as a default argument.

    Such a default is evaluated once, at import: imported after `init_process_group`, it holds the live
    group for the life of the process (torch.distributed.nn.functional, which torch._dynamo imports, has
    ten such functions; DeepSpeed's TorchBackend.barrier and monitored_barrier two). Then
    `destroy_process_group` cannot free the group: its gloo threads run on until the interpreter's
    finalisation destroys it, where a rank once died with "terminate called without an active exception"
    after its work was done (the two-node evaluation test, under load). Imported first, the defaults
    hold None (tests/test_distributed.py checks that the threads are gone after `end_job`).
    """
    import deepspeed.comm.torch  # noqa: F401
    import torch.distributed.nn.functional  # noqa: F401


def _skip_shm_allreduce_op() -> None:
    """Keep DeepSpeed from building and starting its CPU shared-memory all-reduce op.

    DeepSpeed's comm layer JIT-compiles `deepspeed_shm_comm` (deepspeed/ops/csrc/cpu/comm/shm.cpp)
    on CPU and calls it only from `inference_all_reduce` (tensor-parallel inference), which nothing
    here uses: training and ZeRO-3 collectives go through torch.distributed (gloo). Building it cost
    about 45 s of C++ compilation per fresh cache (twice on a clean CI machine: the multi-node launch
    builds with another command line), needed a compiler on users' CPU machines, and its start-up
    left one 69 MB /dev/shm file per rank that it never unlinks (a suite's worth filled a 24 GiB
    machine). `deepspeed.ops.__compatible_ops__` is computed once per process and kept in the module
    (deepspeed/ops/__init__.py says edits to it persist); marking the op incompatible makes
    `build_shm_op()` return None, and the comm layer then falls back to torch.distributed.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def job_barrier(world: int, timeout_min: float) -> None:
    """Barrier of a file-writing job whose ranks need no collective before their work ends (extraction,
    image packing). The gloo group is created at the first call, after each rank's own work, so both the
    rendezvous and the barrier wait up to `timeout_min` for the slowest rank (ranks may finish hours
    apart; torch's default 30 minutes would fail a job that is only uneven). gloo: the group carries no
    tensors, and works on CPU and GPU nodes alike."""
    if world > 1:
        if not dist.is_initialized():
            _import_group_default_modules()
            _export_rendezvous(*launcher_env())
            dist.init_process_group("gloo", timeout=timedelta(minutes=timeout_min))
            atexit.register(_end_job_at_exit)
        dist.barrier()


GROUP_OUTLIVED = "gloo threads outlive the process group"
"""In end_job's warning; the test launches (runtime.launch) fail on it."""


def end_job() -> None:
    """Tear down the process groups (a job_barrier's or init_distributed's, DeepSpeed's) before the
    interpreter exits, and free them: call after the last collective. The two also register it to run at
    exit (`_end_job_at_exit`), where it does nothing after an explicit call.

    `destroy_process_group` unregisters a gloo group but its threads only stop when the last Python
    reference to it goes. Anything left to the interpreter's finalisation can kill a rank after its work
    is done: a gloo worker then drops a tensor, needs the GIL of an interpreter being torn down, and the
    process aborts with "terminate called without an active exception" (pytorch/pytorch#190489; seen once
    in CI on rank 1 of a ZeRO-3 MLLM run, after its export). DeepSpeed keeps such references in module
    globals (below), so they are dropped here, and a warning names any gloo thread still alive.
    """
    if not dist.is_initialized():
        return
    ds_comm = sys.modules.get("deepspeed.comm")
    if ds_comm is not None and ds_comm.is_initialized():
        ds_comm.destroy_process_group()  # also drops deepspeed.utils.groups' references (_WORLD_GROUP, ...)
    else:
        dist.destroy_process_group()
    _release_zero3_references()
    gc.collect()  # engines, models and ZeRO-3 parameters (ds_process_group) live in reference cycles
    left = gloo_threads()
    if left:
        warn_once(f"{len(left)} {GROUP_OUTLIVED} ({', '.join(sorted(set(left)))}): something still holds it, "
                  "and the interpreter's exit may abort this process")


def _end_job_at_exit() -> None:
    """end_job at the interpreter's exit, for a command that did not call it or crashed. The traceback of a
    crash, already printed, is kept in sys.last_* and holds the frames (and the engines) of the failed call:
    dropped first, so that the group is freed here and the rank exits with its error, not an abort."""
    for name in ("last_exc", "last_type", "last_value", "last_traceback"):
        if hasattr(sys, name):
            setattr(sys, name, None)
    end_job()


def _release_zero3_references() -> None:
    """Drop the references DeepSpeed's ZeRO-3 keeps in module globals for the life of the process: the
    wrapped top module stays on `parameter_offload.FWD_MODULE_STACK` (pushed at set-up, never popped), and
    `PartitionedParameterCoordinator.__params_to_release` is a class-level `lru_cache` keyed by the
    coordinator and submodules. Both keep every ZeRO-3 parameter, whose `ds_process_group` is the group."""
    offload = sys.modules.get("deepspeed.runtime.zero.parameter_offload")
    if offload is not None:
        offload.FWD_MODULE_STACK.clear()
    coord = sys.modules.get("deepspeed.runtime.zero.partitioned_param_coordinator")
    if coord is not None:
        for fn in vars(coord.PartitionedParameterCoordinator).values():  # the cache sits under an nvtx wrapper
            for inner in [fn, *(c.cell_contents for c in getattr(fn, "__closure__", None) or ())]:
                if isinstance(inner, functools._lru_cache_wrapper):
                    inner.cache_clear()


def gloo_threads() -> list[str]:
    """Names of this process's gloo threads (torch names them pt_gloo_* and gloo_*; Linux only)."""
    task = "/proc/self/task"
    if not os.path.isdir(task):
        return []
    names = []
    for t in os.listdir(task):
        try:
            with open(f"{task}/{t}/comm") as f:
                names.append(f.read().strip())
        except OSError:  # the thread ended meanwhile
            pass
    return [n for n in names if "gloo" in n]


def rank_layout() -> str:
    """Where every rank runs, gathered on all ranks: "node 0 (host a): ranks [0, 1] local [0, 1]; node 1 ...".

    The node index is the launcher's (DeepSpeed CROSS_RANK, torchrun GROUP_RANK, SLURM_NODEID), so a
    multi-node launch can be checked from rank 0's log alone; alone: one node.
    """
    import socket

    node = _env_int("CROSS_RANK", "GROUP_RANK", "SLURM_NODEID", default=0)
    me = (node, socket.gethostname(), get_rank(), _env_int("LOCAL_RANK", default=0))
    everyone = [me]
    if get_world_size() > 1:
        everyone = [None] * get_world_size()
        dist.all_gather_object(everyone, me)
    parts = []
    for n in sorted({e[0] for e in everyone}):
        mine = sorted((e for e in everyone if e[0] == n), key=lambda e: e[2])
        hosts = ",".join(sorted({e[1] for e in mine}))
        parts.append(f"node {n} (host {hosts}): ranks {[e[2] for e in mine]} local {[e[3] for e in mine]}")
    return "; ".join(parts)


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


def clear_outputs(paths) -> None:
    """Rank 0 removes these files and folders (an earlier run's outputs that a scorer would read with this
    run's: torch-fidelity and the benchmarks' scripts read whole folders); then every rank waits, so that none
    writes into them first."""
    if is_main_process():
        for p in map(Path, paths):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
    barrier()


def rank0_verdict(problem: str | None) -> str | None:
    """Rank 0's `problem` on every rank (a check only rank 0 makes), so that all of them stop with it."""
    if get_world_size() > 1:
        box = [problem]
        dist.broadcast_object_list(box, src=0)
        problem = box[0]
    return problem


def check_shared_outputs(count: Callable[[], int], expected: int, folder: str | os.PathLike, flag: str,
                         wait_s: float = 60) -> None:
    """Every rank wrote its share of `expected` files into `folder`, which rank 0 then reads whole (torch-fidelity,
    a benchmark's scorer): RuntimeError on every rank when `count()`, called on rank 0, finds fewer. Where `folder`
    was not shared, ranks of other nodes wrote theirs on their own disk, and FID was computed over rank 0's node's
    images alone, without a word. Rank 0 counts again for up to `wait_s` seconds first: an NFS client may list
    another node's new files only once its attribute cache expires (acdirmax, 60 s by default)."""
    import time

    problem = None
    if is_main_process():
        deadline = time.monotonic() + wait_s
        while (n := count()) != expected and time.monotonic() < deadline:
            time.sleep(2)
    if is_main_process() and n != expected:
        problem = (f"{folder} holds {n} of the {expected} files the ranks wrote: the other ranks' are not there. "
                   f"{flag} must be a folder every node shares (ranks of other nodes wrote theirs on their own "
                   "disk); rank 0 reads them all")
    if problem := rank0_verdict(problem):
        raise RuntimeError(problem)


def collective_device() -> torch.device:
    """Where a tensor for a collective must be: the current GPU under NCCL (which has no CPU tensors: "No backend
    type associated with device type cpu"), else the CPU."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum a CPU tensor over ranks in place (through the GPU under NCCL); a no-op alone."""
    if get_world_size() > 1:
        y = x.to(collective_device())
        dist.all_reduce(y)
        if y is not x:
            x.copy_(y.cpu())
    return x


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (a no-op alone)."""
    if get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= get_world_size()
    return x


_WARNED: set[str] = set()


def warn_once(msg: str) -> None:
    """Warn once per process per message (settings that are ignored or fall back), in log.txt too."""
    if msg not in _WARNED:
        _WARNED.add(msg)
        from runtime.log import note_to_file

        note_to_file(msg)  # first: log.py's warnings hook then knows it is written
        warnings.warn(msg, stacklevel=2)
