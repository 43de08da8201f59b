"""Run-folder bookkeeping shared by both trainers: start-up, the per-step metrics file, stop signals, test kills."""
from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path
from typing import Any


def start_run(run_dir: str | os.PathLike, seed: int, timeout_min: float):
    """init_distributed, the run folder's lock (rank 0; every rank stops when another job holds it) and rank-0
    logging. The loop writes run_dir/config.json once a resume has loaded."""
    from runtime.distributed import init_distributed, is_main_process, rank0_verdict, rank_layout
    from runtime.log import setup_logging

    info = init_distributed(seed, timeout_min)
    train_math(info.device)
    layout = rank_layout()
    if problem := rank0_verdict(lock_run_dir(run_dir) if is_main_process() else None):
        raise RuntimeError(problem)
    log = setup_logging(run_dir)
    log.info("ranks: %s", layout)
    return info, log


def train_math(device) -> None:
    """On a GPU, train as both releases do (REFERENCE: the tokenizer's "TF32 on; cudnn.benchmark on", the MLLM's
    --tf32 True): fp32 matmuls and convolutions in TF32 (the fp32 parts: the tokenizer's quantizer path, fp32
    runs), cuDNN picking its fastest convolution for the fixed shapes. Nothing on a CPU."""
    import torch

    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


_LOCKS: dict[Path, Any] = {}  # run folder -> its open lock file, held by this process until `unlock_run_dir`


def lock_run_dir(run_dir: str | os.PathLike) -> str | None:
    """Take run_dir/.lock for this process (fcntl.lockf: POSIX record locks, which NFS v4 honours, and which the
    kernel drops when the process dies, kill -9 included); None, or a refusal naming the holder. Two jobs in one
    run folder (a requeued job whose predecessor still runs, a command started twice) interleave their metrics
    and overwrite each other's checkpoints."""
    import fcntl
    import socket

    path = Path(run_dir).resolve() / ".lock"
    if path in _LOCKS:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        return (f"{run_dir} is in use by another training job ({holder}); wait for it to end or stop it, or give "
                "another --run-dir")
    f.seek(0)
    f.truncate()
    f.write(f"host {socket.gethostname()} pid {os.getpid()}\n")
    f.flush()
    _LOCKS[path] = f
    return None


def unlock_run_dir(run_dir: str | os.PathLike) -> None:
    """Release `lock_run_dir`'s lock (the end of a run in a process that goes on)."""
    if (f := _LOCKS.pop(Path(run_dir).resolve() / ".lock", None)) is not None:
        f.close()


def write_json_atomic(path: Path, obj: Any) -> None:
    """`obj` as indented JSON, whole or not at all (`write_text_atomic`)."""
    write_text_atomic(path, json.dumps(obj, indent=1))


def write_text_atomic(path: Path, text: str) -> None:
    """`text` into `path`, whole or not at all (a temporary file renamed over it): a file that a resumed run
    reads must not be half-written by a kill."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:  # a write that fails (a full disk) leaves no temporary file either
        tmp.unlink(missing_ok=True)


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    """One JSON line per optimizer step (rank 0): the exact per-step record resume tests compare."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(path: Path, step: int) -> int:
    """Drop lines of steps after `step` (written by a run that crashed before its next checkpoint), and lines that
    do not parse (a write cut short by a kill or a full disk); returns how many did not parse. The file is
    replaced atomically."""
    if not path.is_file():
        return 0
    keep, unreadable = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            unreadable += 1
            continue
        if row is not None and row["step"] <= step:
            keep.append(line)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, path)
    finally:  # (a full disk: no empty temporary file left behind)
        tmp.unlink(missing_ok=True)
    return unreadable


def kill_self() -> None:
    """A real kill -9 (no cleanup, no flush), for crash-recovery tests."""
    os.kill(os.getpid(), signal.SIGKILL)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
"""What asks a run to stop: SIGTERM (a scheduler at the time limit or on preemption, `scancel`, the deepspeed
launcher passing on a SIGTERM it received) and SIGUSR1 (SLURM's `--signal=USR1@SECONDS` early warning)."""


class StopSignals:
    """Catches STOP_SIGNALS on the main thread so that the loop can save before exiting: a signal is remembered
    (`received`) and the run stops at the end of its step. Repeats change nothing: a scheduler signals every
    process of the job and deepspeed's launcher then signals its ranks again, so a second SIGTERM is no
    request to hurry; a rank that cannot finish is killed by the launcher (30 s) or the scheduler. Ctrl-C
    (SIGINT) is not caught. `restore()` puts the previous handlers back."""

    def __init__(self) -> None:
        self.received = 0
        self._previous = {}
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            self._previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}

    def _on_signal(self, signum: int, frame) -> None:
        self.received = self.received or signum

    def agreed(self, device) -> int:
        """The signal any rank received (0: none), on every rank (a collective: all ranks must call it, which
        makes one rank's signal enough: deepspeed's launcher signals its ranks one after another)."""
        import torch
        import torch.distributed as dist

        flag = torch.tensor([float(self.received)], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def worker_stop_signals(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: a worker ends on a STOP_SIGNAL only when its rank sends it (torch's worker
    shutdown and Python's exit do, and wait for the worker); sent by anyone else (a scheduler or the deepspeed
    launcher signals the whole process tree) it is ignored, so that the rank can finish its step: torch raises
    in the rank, mid-step, when a worker dies. The worker blocks the signals and a thread reads each one's
    sender (Linux: sigwaitinfo); elsewhere the worker ignores them and ends when its rank closes the loader or
    dies (torch's watchdog)."""
    if not hasattr(signal, "sigwaitinfo"):
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        return
    rank = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # threads started later inherit the mask

    def wait() -> None:
        while True:
            info = signal.sigwaitinfo(STOP_SIGNALS)
            if info.si_pid == rank:
                os._exit(128 + info.si_signo)

    threading.Thread(target=wait, name="stop-signals", daemon=True).start()
