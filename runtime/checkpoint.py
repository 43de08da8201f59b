"""The checkpoint contract (STYLE.md rule 13): atomic step folders, a `latest` pointer, keep-last-k.

Layout:
    run_dir/step-00001234/          everything needed to continue
        <deepspeed engine folders>  model + optimizer (+ scheduler) state per engine
        rank00000.pt ...            per-rank RNG states and data-loader position
        trainer_state.json          step, config, git SHA, metrics
    run_dir/latest                  text file naming the newest COMPLETE step folder
A step is first written to `run_dir/.tmp-step-00001234/` and renamed into place by rank 0 after a
barrier, so a kill -9 during a save leaves the previous checkpoint and `latest` untouched. The
`latest` pointer is replaced atomically (write + os.replace) last. A shared filesystem is assumed
for multi-node runs.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from runtime.distributed import barrier, get_rank, is_main_process

STEP_RE = re.compile(r"^step-(\d{8})$")


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def git_sha() -> str:
    """The repository's HEAD commit, or 'unknown'."""
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                                       stderr=subprocess.DEVNULL, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as tensors/plain types (loadable with weights_only)."""
    import random

    py = random.getstate()
    np_state = np.random.get_state()
    state = {"python": [py[0], list(py[1]), py[2]],
             "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():  # this rank's GPU only: a resume may see fewer GPUs per rank (srun one per task)
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy(), *n[2:]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if isinstance(cuda, (list, tuple)):  # older versions: one state per GPU the rank saw, its own at its local
            from runtime.distributed import launcher_env  # rank (restoring them all failed with fewer GPUs visible)

            local = launcher_env()[2]
            cuda = cuda[local] if local < len(cuda) else None
            if cuda is None:
                from runtime.distributed import warn_once

                warn_once("the checkpoint holds no GPU RNG state for this rank's local rank: its GPU draws (dropout, "
                          "drop path) restart rather than continue")
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)


class CheckpointManager:
    """Save, find and prune step folders under `run_dir`."""

    def __init__(self, run_dir: str | os.PathLike, keep_last: int = 3):
        if keep_last < 1:
            raise ValueError("keep_last must be >= 1")
        self.run_dir = Path(run_dir)
        self.keep_last = keep_last

    # ---- discovery -------------------------------------------------------------------------
    def complete_steps(self) -> list[int]:
        """Steps with a finished folder (temporary folders are ignored)."""
        if not self.run_dir.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.run_dir.iterdir() if (m := STEP_RE.match(p.name)) and p.is_dir())

    def latest(self) -> Path | None:
        """The folder named by `latest`, falling back to the newest complete folder."""
        ptr = self.run_dir / "latest"
        if ptr.is_file():
            cand = self.run_dir / ptr.read_text().strip()
            if cand.is_dir():
                return cand
        steps = self.complete_steps()
        return self.run_dir / step_name(steps[-1]) if steps else None

    def resolve(self, resume: str | None) -> Path | None:
        """`auto` -> latest or None; a step folder, or a run folder (its latest) -> that checkpoint; None/'none' ->
        None, refused when run_dir holds checkpoints (starting over there would mix two runs and drop the
        earlier run's metrics)."""
        if resume in (None, "", "none"):
            if steps := self.complete_steps():
                raise FileExistsError(f"--resume none: {self.run_dir} holds checkpoints of an earlier run (up to "
                                      f"{step_name(steps[-1])}); --resume auto continues it, and a new run needs "
                                      "another --run-dir (or that folder deleted)")
            return None
        if resume == "auto":
            return self.latest()
        p = Path(resume)
        if not p.is_dir():
            raise FileNotFoundError(f"--resume {resume}: no such checkpoint folder")
        if not (p / "trainer_state.json").is_file() and (run_latest := CheckpointManager(p).latest()) is not None:
            p = run_latest  # a run folder: its latest checkpoint
        if not (p / "trainer_state.json").is_file():
            raise FileNotFoundError(f"--resume {resume}: {p} is not a checkpoint (no trainer_state.json) and holds "
                                    "no step folders")
        if not p.resolve().is_relative_to(self.run_dir.resolve()) and (steps := self.complete_steps()):
            raise FileExistsError(f"--resume {resume}: {p} is another run's checkpoint, and {self.run_dir} holds "
                                  f"checkpoints of its own (up to {step_name(steps[-1])}): continuing the other run "
                                  "here would mix the two; give a new --run-dir")
        return p

    # ---- saving ----------------------------------------------------------------------------
    def tmp_dir(self, step: int) -> Path:
        return self.run_dir / f".tmp-{step_name(step)}"

    def save(self, step: int, write: Callable[[Path], None], rank_state: dict[str, Any],
             trainer_state: dict[str, Any]) -> Path:
        """Collective. `write(tmp_dir)` writes the engines' state (every rank calls it)."""
        tmp = self.tmp_dir(step)
        if is_main_process():
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        try:
            write(tmp)
            torch.save(rank_state, tmp / f"rank{get_rank():05d}.pt")
        except Exception as e:  # a full disk surfaces as torch's "unexpected pos" or an iostream error
            if is_main_process():
                shutil.rmtree(tmp, ignore_errors=True)  # it would keep the disk full for the next start
            free = shutil.disk_usage(self.run_dir).free / 2**30
            raise RuntimeError(f"saving {step_name(step)} in {self.run_dir} failed ({free:.1f} GiB free there): "
                               f"{type(e).__name__}: {e}; the previous checkpoint and `latest` are kept") from e
        barrier()
        final = self.run_dir / step_name(step)
        if is_main_process():
            (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2, default=str))
            if final.exists():  # re-saving the same step (e.g. after a resume): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            self.point_latest(final)
            self._prune(step)
        barrier()
        return final

    def point_latest(self, ckpt: Path) -> None:
        """Name `ckpt` in `latest` (atomically)."""
        ptr_tmp = self.run_dir / ".latest.tmp"
        ptr_tmp.write_text(ckpt.name)
        os.replace(ptr_tmp, self.run_dir / "latest")

    def _prune(self, saved: int) -> None:
        """Keep the last `keep_last` steps up to the one just saved. Steps after it are those of a run resumed
        from an earlier checkpoint (`--resume <step folder>`); they are replaced as this run reaches them, and
        pruning them by number first would delete the step just saved."""
        steps = [s for s in self.complete_steps() if s <= saved]
        for s in steps[:-self.keep_last]:
            shutil.rmtree(self.run_dir / step_name(s), ignore_errors=True)
        for p in self.run_dir.glob(".tmp-step-*"):  # leftovers of interrupted saves
            shutil.rmtree(p, ignore_errors=True)

    # ---- loading ---------------------------------------------------------------------------
    @staticmethod
    def load_rank_state(ckpt: Path) -> dict[str, Any]:
        """This rank's RNG and data state (falls back to rank 0's when resuming on fewer ranks)."""
        f = ckpt / f"rank{get_rank():05d}.pt"
        if not f.is_file():
            f = ckpt / "rank00000.pt"
        return torch.load(f, map_location="cpu", weights_only=True)

    @staticmethod
    def load_trainer_state(ckpt: Path) -> dict[str, Any]:
        return json.loads((ckpt / "trainer_state.json").read_text())
