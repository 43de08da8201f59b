"""Helpers to run the real `deepspeed` launcher from tests."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ds_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def leaked_shm(port: int) -> list[Path]:
    """DeepSpeed CPU all-reduce workspaces left in /dev/shm by the job on `port` (should be none)."""
    return sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def _launch(cmd: list[str], port: int, timeout: int, check: bool) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=ROOT, env=ds_env(), capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}")
    leaked = leaked_shm(port)
    for f in leaked:  # never let one failure fill the machine's RAM for the tests after it
        f.unlink(missing_ok=True)
    assert not leaked, f"{' '.join(cmd)} left {[f.name for f in leaked]} in /dev/shm"
    return p


def torchrun_module(module: str, args: list[str], num_ranks: int = 2, timeout: int = 300,
                    check: bool = True) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node N -m MODULE ARGS` (standalone rendezvous on 127.0.0.1); output captured."""
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(num_ranks), "--master_addr",
           "127.0.0.1", "--master_port", str(port), "-m", module, *args]
    return _launch(cmd, port, timeout, check)


def deepspeed_script(script: Path, args: list[str], num_ranks: int = 2, timeout: int = 300) -> None:
    """`deepspeed --num_gpus N SCRIPT ARGS` on CPU ranks; raises with the output tail if it fails."""
    port = free_port()
    launcher = Path(sys.executable).parent / "deepspeed"
    _launch([str(launcher), "--num_gpus", str(num_ranks), "--master_port", str(port), str(script), *args],
            port, timeout, check=True)


def deepspeed_module(module: str, args: list[str], num_ranks: int = 2, timeout: int = 300,
                     check: bool = True) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus N --module MODULE ARGS` on CPU ranks; output captured.

    Also fails when the job left DeepSpeed's shared-memory workspace behind in /dev/shm.
    """
    port = free_port()
    launcher = Path(sys.executable).parent / "deepspeed"
    return _launch([str(launcher), "--num_gpus", str(num_ranks), "--master_port", str(port), "--module", module,
                    *args], port, timeout, check)
