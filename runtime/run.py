"""Run-folder bookkeeping shared by both trainers: start-up, the per-step metrics file, test kills."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any


def start_run(config: dict[str, Any], run_dir: str | os.PathLike, seed: int, timeout_min: float):
    """init_distributed + rank-0 logging + the resolved config and git SHA in run_dir/config.json."""
    from runtime.checkpoint import git_sha
    from runtime.distributed import init_distributed, is_main_process, rank_layout
    from runtime.log import setup_logging

    info = init_distributed(seed, timeout_min)
    layout = rank_layout()
    log = setup_logging(run_dir)
    log.info("ranks: %s", layout)
    if is_main_process():
        Path(run_dir, "config.json").write_text(json.dumps({"config": config, "git_sha": git_sha()}, indent=2))
    return info, log


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    """One JSON line per optimizer step (rank 0): the exact per-step record resume tests compare."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(path: Path, step: int) -> None:
    """Drop lines of steps after `step` (written by a run that crashed before its next checkpoint)."""
    if path.is_file():
        keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in keep))


def kill_self() -> None:
    """A real kill -9 (no cleanup, no flush), for crash-recovery tests."""
    os.kill(os.getpid(), signal.SIGKILL)
