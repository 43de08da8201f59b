"""Start jobs through the real launchers (deepspeed, torchrun) and check what they leave behind.

The tests, the demo and the ablation grid all launch here, so every launch gets the same command
line, environment and leak check. DeepSpeed's CPU shared-memory all-reduce op creates one 69 MB
/dev/shm workspace per rank whose name holds the job's master port
(`deepspeed_allreduce_buffer_*_{port}_*`) and never removes it; runtime.distributed keeps that op
from starting. A workspace found when a job ends is removed and then reported as an error, so that
one faulty run cannot fill the machine's RAM for the runs after it.

    port = free_port()
    run_logged(deepspeed_cmd("unitok.train", args, 2, port), port, "train.log")   # output to a log file
    p = deepspeed_module("unitok.train", args)                                    # CPU ranks, output captured
"""
from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

from runtime.distributed import GROUP_OUTLIVED
from runtime.distributed import _free_port as free_port  # a port for --master_port; public here

ROOT = Path(__file__).resolve().parents[1]
"""The checkout: jobs run with it first on PYTHONPATH."""
RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
"""Set by an enclosing job; a launched job must not inherit them."""


# ---- environment -------------------------------------------------------------------------------
def job_env(cpu: bool | None = None) -> dict[str, str]:
    """This process's environment for a launched job.

    Drops the rank variables of an enclosing job, puts the checkout first on PYTHONPATH and turns
    wandb and tokenizer threads off unless set. `cpu` (None: when CUDA is missing) selects
    DeepSpeed's CPU accelerator unless DS_ACCELERATOR is set; DeepSpeed would otherwise look for CUDA.
    """
    env = dict(os.environ)
    for k in RANK_VARS:
        env.pop(k, None)
    if cpu is None:
        import torch

        cpu = not torch.cuda.is_available()
    if cpu:
        env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("WANDB_MODE", "disabled")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def ds_env() -> dict[str, str]:
    """The environment of test jobs: CPU ranks with one OpenMP thread each, wandb off, only this checkout
    on PYTHONPATH, whatever the caller's environment says."""
    env = job_env(cpu=True)
    env.update(DS_ACCELERATOR="cpu", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT))
    return env


# ---- command lines -----------------------------------------------------------------------------
def deepspeed_cmd(target: str | Path, args: Sequence[str], num_ranks: int, port: int, *, module: bool = True,
                  launcher_args: Sequence[str] = ()) -> list[str]:
    """`deepspeed --num_gpus N --master_port PORT [LAUNCHER_ARGS] [--module] TARGET ARGS` (this venv's launcher)."""
    exe = Path(sys.executable).parent / "deepspeed"
    return [str(exe) if exe.exists() else "deepspeed", "--num_gpus", str(num_ranks), "--master_port", str(port),
            *launcher_args, *(["--module"] if module else []), str(target), *args]


def torchrun_cmd(module: str, args: Sequence[str], num_ranks: int, port: int) -> list[str]:
    """`torchrun --nproc_per_node N -m MODULE ARGS` with a standalone rendezvous on 127.0.0.1:PORT."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(num_ranks), "--master_addr",
            "127.0.0.1", "--master_port", str(port), "-m", module, *args]


# ---- running -----------------------------------------------------------------------------------
def leaked_shm(port: int) -> list[Path]:
    """DeepSpeed CPU all-reduce workspaces left in /dev/shm by the job on `port` (should be none)."""
    return sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def _sweep_shm(port: int) -> list[str]:
    """Remove what the job on `port` leaked in /dev/shm -> the removed names."""
    leaked = leaked_shm(port)
    for f in leaked:
        f.unlink(missing_ok=True)
    return [f.name for f in leaked]


def _raise_on_failure(what: str, returncode: int, output: Callable[[], str], leaked: list[str],
                      outlived: bool = False) -> None:
    if returncode != 0:
        also = f"; it also left {leaked} in /dev/shm (removed)" if leaked else ""
        raise RuntimeError(f"{what} failed with exit code {returncode}{also}\n{output()}")
    if leaked:
        raise RuntimeError(f"{what} left {leaked} in /dev/shm (removed now): DeepSpeed's CPU all-reduce "
                           "shared-memory op must not start (runtime.distributed._skip_shm_allreduce_op)")
    if outlived:
        raise RuntimeError(f"{what}: a rank's gloo threads outlived end_job (something still held its process "
                           f"group; the exit may abort a rank: runtime.distributed.end_job)\n{output()}")


def run_captured(cmd: list[str], port: int, *, timeout: float | None = None, check: bool = True,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a job from the checkout with its output captured (env: `ds_env()` by default).

    `check`: a non-zero exit raises RuntimeError with the output tails. A leaked /dev/shm workspace
    of `port` always raises, after it is removed (also after a timeout), and so does a job that succeeded
    with a rank whose process group outlived its end (`end_job`'s warning).
    """
    # its own session: on a timeout the whole job goes (subprocess.run kills only the launcher, and its ranks
    # ran on, orphaned, taking the cores and ports of whatever came next)
    job = subprocess.Popen(cmd, cwd=ROOT, env=ds_env() if env is None else env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = job.communicate(timeout=timeout)
    except BaseException:  # the timeout, or Ctrl-C (the terminal's SIGINT does not reach the job's own session)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)
        job.communicate()
        raise
    finally:
        leaked = _sweep_shm(port)
    p = subprocess.CompletedProcess(cmd, job.returncode, out, err)
    _raise_on_failure(shlex.join(cmd), p.returncode if check else 0,
                      lambda: f"{p.stdout[-4000:]}\n{p.stderr[-4000:]}", leaked,
                      p.returncode == 0 and GROUP_OUTLIVED in p.stdout + p.stderr)
    return p


_running: set[subprocess.Popen] = set()
"""run_logged's guards now running (of every thread)."""
_running_lock = threading.Lock()
_stopped = threading.Event()
"""Set by stop_jobs(): no further job starts in this process."""


class JobsStopped(RuntimeError):
    """run_logged after stop_jobs(): the job was not started."""


def stop_jobs() -> None:
    """Ask every job run_logged is running (in any thread) to stop, as a scheduler would: its guard sends SIGTERM
    to each of its processes (the trainers save and exit); and start no further one (a thread going on from a
    run's training to its evaluation raises JobsStopped). For a caller interrupted on its main thread while other
    threads wait on jobs (Ctrl-C reaches the jobs too; a SIGINT sent to the caller's pid alone does not)."""
    with _running_lock:
        _stopped.set()
        jobs = list(_running)
    for p in jobs:
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(signal.SIGTERM)


def _kill_tree(pid: int) -> None:
    """kill -9 the process `pid` and everything below it (gone already: nothing to do)."""
    import psutil

    try:
        victims = [*psutil.Process(pid).children(recursive=True), psutil.Process(pid)]
    except psutil.NoSuchProcess:
        return
    for v in victims:
        with contextlib.suppress(psutil.NoSuchProcess):
            v.kill()


def _stop_and_wait(p: subprocess.Popen) -> None:
    """Stop a guarded job and wait for all of it (the guard exits last); a second Ctrl-C kills it at once."""
    try:
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(signal.SIGTERM)
        p.wait()
    except BaseException:
        _kill_tree(p.pid)
        p.wait()
        raise


def _tail(log_file: Path, offset: int, p: subprocess.Popen, echo: Callable[[str], None]) -> int:
    """Pass each line the job appends to `log_file` after `offset` to `echo` until it exits -> its exit code."""
    with open(log_file, "rb") as r:
        r.seek(offset)
        pending = b""
        while True:
            done = p.poll() is not None  # read once more after the exit: what the job wrote last
            chunk = r.read()
            *lines, pending = (pending + chunk).split(b"\n")  # whole lines: a character may span two reads
            for line in lines:
                echo(line.decode(errors="replace") + "\n")
            if done:
                if pending:
                    echo(pending.decode(errors="replace"))
                return p.returncode
            if not chunk:
                time.sleep(0.1)


def run_logged(cmd: list[str], port: int, log_file: str | Path, *, what: str | None = None,
               echo: Callable[[str], None] | None = None, cwd: str | Path | None = None,
               env: dict[str, str] | None = None) -> None:
    """Run a job with its output appended to `log_file` after a `$ CMD` line (env: `job_env()` by default).

    `echo` also receives every output line (console progress). A non-zero exit raises RuntimeError
    naming `what` with the log's last lines; a leaked /dev/shm workspace of `port` raises after it is
    removed. MASTER_PORT is set to `port`: a launcher sets the same from --master_port, and a job
    without one uses it for its private process group, which the leak check then finds.
    The job runs under runtime/guard.py: when this process dies (kill -9 included: the guard's PR_SET_PDEATHSIG)
    or this call is interrupted (Ctrl-C, `stop_jobs()`), every process of the job gets SIGTERM and this call
    returns once all are gone.
    """
    log_file = Path(log_file)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    env = {**(job_env() if env is None else env), "MASTER_PORT": str(port)}
    with open(log_file, "a") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        start = f.tell()  # now: the job shares the file's offset, and moves it as it writes
        # by its path and isolated (-I): the guard needs only the standard library, whatever the job's PYTHONPATH.
        # The job writes to the log file itself, echoed or not: through a pipe, its ranks' next print after this
        # process died raised BrokenPipeError, in the middle of the save its stop asks for.
        with _running_lock:
            if _stopped.is_set():
                raise JobsStopped(f"{what or shlex.join(cmd)} was not started: the jobs were stopped (stop_jobs)")
            p = subprocess.Popen([sys.executable, "-I", str(ROOT / "runtime" / "guard.py"), "--parent",
                                  str(os.getpid()), *cmd], cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
            _running.add(p)
        try:
            if echo is None:
                returncode = p.wait()
            else:
                returncode = _tail(log_file, start, p, echo)
        except BaseException:
            _stop_and_wait(p)
            raise
        finally:
            with _running_lock:
                _running.discard(p)
            leaked = _sweep_shm(port)

    def tail() -> str:
        lines = log_file.read_text(errors="replace").splitlines()[-25:]
        return f"full log {log_file}; last lines:\n" + "\n".join(lines)

    _raise_on_failure(what or shlex.join(cmd), returncode, tail, leaked)


# ---- CPU-rank launches (tests) -----------------------------------------------------------------
def deepspeed_module(module: str, args: list[str], num_ranks: int = 2, timeout: float = 300,
                     check: bool = True) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus N --module MODULE ARGS` on CPU ranks (`ds_env()`); output captured."""
    port = free_port()
    return run_captured(deepspeed_cmd(module, args, num_ranks, port), port, timeout=timeout, check=check)


def deepspeed_script(script: str | Path, args: list[str], num_ranks: int = 2,
                     timeout: float = 300) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus N SCRIPT ARGS` on CPU ranks (`ds_env()`); raises with the output tails if it fails."""
    port = free_port()
    return run_captured(deepspeed_cmd(script, args, num_ranks, port, module=False), port, timeout=timeout)


def torchrun_module(module: str, args: list[str], num_ranks: int = 2, timeout: float = 300,
                    check: bool = True) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node N -m MODULE ARGS` on CPU ranks (`ds_env()`); output captured."""
    port = free_port()
    return run_captured(torchrun_cmd(module, args, num_ranks, port), port, timeout=timeout, check=check)


class NodeLaunch:
    """launch/SCRIPT started once per simulated node on this machine: DeepSpeed's no-ssh multi-node mode
    (the same hostfile, NODE_RANK=0..N-1, 127.0.0.1 as node 0), each node one launcher process."""

    def __init__(self, script: str, args: Sequence[str], workdir: Path, nodes: int = 2, ranks_per_node: int = 1):
        workdir.mkdir(parents=True, exist_ok=True)
        self.hostfile = workdir / "hostfile"
        self.hostfile.write_text("".join(f"node-{chr(97 + n)} slots={ranks_per_node}\n" for n in range(nodes)))
        self.port = free_port()
        env = {**ds_env(), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               "HOSTFILE": str(self.hostfile), "NNODES": str(nodes), "NGPU": str(ranks_per_node),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(self.port)}
        self.procs = [subprocess.Popen(["bash", str(ROOT / "launch" / script), *args], cwd=ROOT,
                                       env={**env, "NODE_RANK": str(n)}, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True) for n in range(nodes)]

    def rank_pids(self, node: int) -> list[int]:
        """The rank processes node `node`'s launcher started (the launcher's python descendants below it)."""
        import psutil

        kids = psutil.Process(self.procs[node].pid).children(recursive=True)
        return [k.pid for k in kids if "--local_rank" in " ".join(k.cmdline())]

    def wait(self, timeout: float = 300) -> list[tuple[int, str]]:
        """(exit code, output) per node; on a timeout every process is killed and TimeoutExpired raised.
        A leaked /dev/shm workspace raises after it is removed, and so does an outlived process group on a node
        that succeeded."""
        try:
            outs = [p.communicate(timeout=timeout)[0] for p in self.procs]
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        finally:
            leaked = _sweep_shm(self.port)
        _raise_on_failure("multi-node launch", 0, lambda: "\n".join(out[-4000:] for out in outs), leaked,
                          any(GROUP_OUTLIVED in out for p, out in zip(self.procs, outs) if p.returncode == 0))
        return [(p.returncode, out) for p, out in zip(self.procs, outs)]

    def kill(self) -> None:
        """kill -9 every launcher and rank of every node."""
        for p in self.procs:
            _kill_tree(p.pid)
