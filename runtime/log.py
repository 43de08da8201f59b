"""Rank-0 logging: console + run_dir/log.txt, one fixed-format metrics line, optional sinks.

The fixed line: `step 120/1000 | loss 1.2345 | l1 0.1 ... | grad_norm 3.2 | lr 1.0e-04 | 12.3 samples/s |
456 tok/s | mem 1.2G | eta 0:10:00`. A tqdm progress bar appears only on an interactive terminal.
Sinks: none, tensorboard (offline by nature) or wandb (offline when WANDB_MODE=offline).
"""
from __future__ import annotations

import datetime
import logging
import os
import resource
import sys
import time
import traceback
import uuid
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from runtime.distributed import is_main_process

_LOGGER_NAME = "unitok_mllm"
_NOTES: list[str] = []  # warn_once's messages from before log.txt was opened (start-up's)


def setup_logging(run_dir: str | os.PathLike | None) -> logging.Logger:
    """Console + file handler on rank 0; warnings only elsewhere."""
    log = logging.getLogger(_LOGGER_NAME)
    log.handlers.clear()
    log.propagate = False
    fmt = logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if is_main_process():
        log.setLevel(logging.INFO)
        h = logging.StreamHandler(sys.stdout)
        h.setFormatter(fmt)
        log.addHandler(h)
        if run_dir is not None:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            fh = logging.FileHandler(Path(run_dir) / "log.txt")
            fh.setFormatter(fmt)
            log.addHandler(fh)
            for msg in _NOTES:
                note_to_file(msg)
            _warnings_to_file()
    else:
        log.setLevel(logging.WARNING)
        log.addHandler(logging.StreamHandler(sys.stderr))
    return log


def note_to_file(msg: str) -> None:
    """A warning (already on stderr) into rank 0's log.txt too, or kept until setup_logging opens it."""
    if msg not in _NOTES:
        _NOTES.append(msg)
    _to_file(logging.WARNING, f"warning: {msg}")


def error_to_file(exc: BaseException) -> None:
    """An exception's traceback into rank 0's log.txt (the console gets it from the interpreter, once)."""
    tb = "".join(traceback.format_exception(exc)).rstrip()
    _to_file(logging.ERROR, tb)


def _to_file(level: int, text: str) -> None:
    log = get_logger()
    for h in log.handlers:
        if isinstance(h, logging.FileHandler):
            h.handle(log.makeRecord(log.name, level, __file__, 0, text, None, None))


def _warnings_to_file() -> None:
    """Python warnings (the libraries': transformers, deepspeed, torch) into log.txt as well as stderr, as
    shown (the warnings filters still decide which); they reached the console only, lost with a detached job's
    stderr. Installed once per process."""
    shown = warnings.showwarning
    if getattr(shown, "_unitok_log", False):
        return

    def showwarning(message, category, filename, lineno, file=None, line=None):
        shown(message, category, filename, lineno, file, line)
        if str(message) not in _NOTES:  # warn_once's are written by note_to_file
            _to_file(logging.WARNING, f"warning: {category.__name__}: {message} ({filename}:{lineno})")

    showwarning._unitok_log = True
    warnings.showwarning = showwarning


def get_logger() -> logging.Logger:
    return logging.getLogger(_LOGGER_NAME)


def memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated, or this process's peak RSS on CPU, in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def format_line(step: int, total: int, metrics: dict[str, float], samples_s: float, tokens_s: float | None,
                mem_gb: float, eta_s: float) -> str:
    """The fixed-format log line."""
    parts = [f"step {step}/{total}"]
    for k, v in metrics.items():
        parts.append(f"{k} {v:.2e}" if k == "lr" else f"{k} {v:.4f}")
    parts.append(f"{samples_s:.2f} samples/s")
    if tokens_s is not None:
        parts.append(f"{tokens_s:.0f} tok/s")
    parts.append(f"mem {mem_gb:.2f}G")
    parts.append(f"eta {datetime.timedelta(seconds=int(max(eta_s, 0)))}")
    return " | ".join(parts)


def wandb_run_id(run_dir: str | os.PathLike) -> str:
    """The run folder's wandb id, made on its first start and kept in `run_dir/wandb_id` so that a resume continues
    the same wandb run. Not the folder's name: names repeat (each ablation cell's `seed0/train`, every experiment's
    `stage1`), and a run resuming another's wandb run has its steps dropped (they must increase)."""
    path = Path(run_dir) / "wandb_id"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(uuid.uuid4().hex[:16])
    return path.read_text().strip()


class MetricSink:
    """none | tensorboard | wandb; rank 0 only. Imports lazily. A best-effort copy of metrics.jsonl's log steps:
    a kill -9 can lose what the writer had not flushed (an offline wandb run's whole history), and wandb keeps a
    resumed run's values for steps it already has (the steps after a checkpoint, replayed)."""

    def __init__(self, kind: str, run_dir: str | os.PathLike, config: dict[str, Any], project: str,
                 start_step: int = 0):
        if kind not in ("none", "tensorboard", "wandb"):
            raise ValueError(f"metrics sink must be none, tensorboard or wandb, got {kind!r}")
        self.kind = kind if is_main_process() else "none"
        self._tb = self._wandb = None
        if self.kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            # a resume replays the steps after its checkpoint: purge_step hides the earlier events of those steps
            self._tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=start_step + 1 if start_step else None)
            self._tb.add_text("config", f"```\n{config}\n```")
        elif self.kind == "wandb":
            import wandb

            self._wandb = wandb.init(project=project, dir=str(run_dir), config=config, resume="allow",
                                     id=wandb_run_id(run_dir), name=Path(run_dir).name)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


class Progress:
    """Throughput/ETA bookkeeping and a tqdm bar on interactive terminals (rank 0)."""

    def __init__(self, start_step: int, total_steps: int, device=None):
        self.start_step, self.total, self.device = start_step, total_steps, device
        self.t0 = self.t_last = time.perf_counter()
        self.samples = self.tokens = 0
        self.bar = None
        if is_main_process() and sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, leave=False)

    def update(self, samples: int, tokens: int = 0) -> None:
        self.samples += samples
        self.tokens += tokens
        if self.bar is not None:
            self.bar.update(1)

    def rates(self, step: int) -> tuple[float, float, float]:
        """(samples/s, tokens/s, eta seconds) since the last call, over all ranks: a collective (every rank calls it
        at the same steps); each rank's counts differ with packed rows."""
        now = time.perf_counter()
        dt = max(now - self.t_last, 1e-9)
        counts = torch.tensor([self.samples, self.tokens], dtype=torch.float64, device=self.device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(counts)
        sps, tps = float(counts[0]) / dt, float(counts[1]) / dt
        done = step - self.start_step
        eta = (now - self.t0) / max(done, 1) * (self.total - step)
        self.t_last, self.samples, self.tokens = now, 0, 0
        return sps, tps, eta

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
