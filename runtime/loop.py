"""The training loop both stages share, and the flags that drive it.

A task (`unitok.train.TokenizerTask`, `mllm.train.MllmTask`) builds its DeepSpeed engines and its data
loader, and from one micro batch returns named losses. `fit()` owns everything around that, once for
both stages (in the spirit of torchtitan's Trainer and litgpt's fit):

- stepping: `grad_accum` micro batches per optimizer step, the loader restarted when it runs out;
- the NaN/inf guard: a non-finite loss on any rank drops that micro batch on every rank (no backward,
  no engine step, so DeepSpeed's accumulation counters stay aligned) and takes the next one;
  `--nan-policy stop`, or 20 bad micro batches in a row, ends the run with exit code 3;
- the per-step record (`run_dir/metrics.jsonl`, rank 0: losses averaged over its micro batches, a
  task's per-token losses weighted by their token counts over every rank's micro batches (`Task.weighted`;
  the counts are all ranks'), grad norm, lr, a hash of rank 0's batches), the log line every `log_every`
  steps, the metric sink;
- checkpoints every `save_every` steps and at the end (runtime/checkpoint.py's contract: each engine
  under its tag, then per-rank state `{data, rng, world_size, task}` and `trainer_state.json`);
- stop signals (runtime/run.py's STOP_SIGNALS: SIGTERM, SIGUSR1; one rank's is enough): the step in
  progress finishes, every rank saves a checkpoint at it, and the run exits with 128 + the signal (143 for
  SIGTERM), so that `--resume auto` continues from that step (in the last step the signal is ignored: the
  run completes);
- resume (`--resume auto` continues exactly: engines, data position, RNG, task state);
- fault injection for the reliability tests (`--debug.*`), and the task's end-of-run hook (export).

The task interface is the `Task` base class below.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator, Literal

import torch

MAX_BAD_IN_A_ROW = 20


@dataclass
class DebugConfig:
    """Fault injection for the reliability tests (all off by default)."""

    kill_at_step: int = -1
    """SIGKILL this process right after finishing this step (and its checkpoint, if one is due)."""
    kill_during_save: bool = False
    """With kill_at_step: SIGKILL in the middle of that step's checkpoint instead (before it is complete)."""
    nan_at_step: int = -1
    """Make the loss NaN on the first micro batch of this step (tests the NaN guard)."""
    raise_at_step: int = -1
    """Raise an error before the first micro batch of this step (tests a crashed run's teardown)."""


@dataclass
class RunConfig:
    """Flags both trainers share: one name and one meaning in both (trainers may change a default)."""

    run_dir: str = "runs/run"
    """Output folder: config.json, log, metrics.jsonl, checkpoints, export."""
    total_steps: int = 1000
    """Optimizer steps of the whole run."""
    grad_accum: int = 1
    """Micro batches per optimizer step."""
    ds_config: str = "zero2"
    """DeepSpeed config: a name in ds_configs/ (zero2, zero3, zero3_offload) or a path (the tokenizer: ZeRO 0-2)."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """auto: bf16 on GPU, fp32 on CPU. An explicit bf16 runs bf16 on CPU too, for testing (one warning)."""
    seed: int = 0
    """Base seed (each rank uses seed + rank)."""
    resume: str = "auto"
    """auto (latest complete checkpoint in run_dir, if any), none (a new run: refused where run_dir holds
    checkpoints), or a checkpoint folder (a step folder, or a run folder: its latest)."""
    save_every: int = 500
    """Checkpoint every N steps (and at the end)."""
    keep_last: int = 3
    """Checkpoints kept."""
    log_every: int = 10
    """Steps between log lines (and metric-sink points)."""
    metrics: Literal["none", "tensorboard", "wandb"] = "none"
    """Metrics sink (wandb honours WANDB_MODE=offline)."""
    nan_policy: Literal["skip", "stop"] = "skip"
    """On a non-finite loss: skip that micro batch on all ranks, or stop the run (exit code 3)."""
    export: bool = True
    """Write run_dir/export at the end."""
    save_final: bool = True
    """Checkpoint the last step (benchmarks turn it off, with --no-export: a 1B model's ZeRO-3 state is 12 GB)."""
    compile: str | None = None
    """torch.compile backend for every repeated block (runtime/compile.py): inductor, or aot_eager to
    debug; the first steps pay the compile time. None: eager."""
    dist_timeout_min: float = 30.0
    """Minutes a collective waits for a missing rank before the run fails (the process-group timeout).
    A rank that dies is noticed at once (its connections close) and stops the job; a node that drops off
    the network is noticed only after this."""
    debug: DebugConfig = field(default_factory=DebugConfig)
    """Fault injection for tests."""

    reshards_on_resume: ClassVar[bool] = False
    """True: a checkpoint of another number of ranks loads its consolidated weights (and the data restarts)."""
    new_stream_hint: ClassVar[str] = ""
    """How to go on with other data settings than the checkpoint's (appended to the refusal)."""

    @staticmethod
    def stream_flags(config: dict[str, Any]) -> dict[str, Any]:
        """The flags (as `--name`) that place the data stream's saved position, read from a resolved config
        dict (`dataclasses.asdict`): an exact resume needs the checkpoint's values."""
        return {}

    def __post_init__(self):
        for name in ("total_steps", "grad_accum", "save_every", "keep_last", "log_every", "dist_timeout_min"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.export and not self.save_final:
            raise ValueError("--no-save-final needs --no-export (the MLLM's export is made from the last checkpoint)")


class Interrupted(Exception):
    """A stop signal reached some rank: every rank saved at `step`; `fit` exits with 128 + `signum`."""

    def __init__(self, signum: int, step: int):
        super().__init__(signum, step)
        self.signum, self.step = signum, step


class StopRun(RuntimeError):
    """Raised by a task to end the run on a non-finite value; `fit` logs it and exits with code 3."""


def finite_everywhere(x: torch.Tensor) -> bool:
    """True when `x` is finite on every rank (a collective: all ranks must call it)."""
    import torch.distributed as dist

    from runtime.distributed import get_world_size

    bad = (~torch.isfinite(x.detach().float())).any().float().reshape(1)
    if get_world_size() > 1:
        dist.all_reduce(bad)
    return bad.item() == 0


def scalars(out: dict[str, Any]) -> dict[str, float]:
    """The 0-d tensor (or float) entries of a task's output, as floats (not the private "_" ones)."""
    return {k: float(v.detach() if isinstance(v, torch.Tensor) else v) for k, v in out.items()
            if not k.startswith("_") and (isinstance(v, float) or (isinstance(v, torch.Tensor) and v.dim() == 0))}


def step_means(micro: list[dict[str, float]], weighted: dict[str, str]) -> dict[str, float | int | None]:
    """One optimizer step's record from its micro batches' scalars: the plain mean of each term, except a
    term named in `weighted` (term -> count key), which is averaged over its count (a micro batch with no
    image tokens logs image_loss 0, and a plain mean would count that 0). A count is summed; a weighted term
    whose counts sum to 0 is None (logged as null and left out of the log line and the sink). A term that some
    micro batches lack (a skipped discriminator update) is the mean over those that have it."""
    counts = set(weighted.values())
    out: dict[str, float | int | None] = {}
    for k in dict.fromkeys(k for m in micro for k in m):
        if k in counts:
            out[k] = int(sum(m.get(k, 0) for m in micro))
        elif k in weighted:
            n = sum(m.get(weighted[k], 0) for m in micro)
            out[k] = sum(m.get(k, 0.0) * m.get(weighted[k], 0) for m in micro) / n if n > 0 else None
        else:
            have = [m[k] for m in micro if k in m]
            out[k] = sum(have) / len(have)
    return out


def all_rank_means(record: dict[str, Any], weighted: dict[str, str]) -> dict[str, float | int | None]:
    """The weighted terms of this rank's step record over every rank's tokens, and their counts summed (a
    collective: all ranks call it every step). Rank 0's alone were 1/world of the tokens, and null on a step
    where rank 0 had none of a kind (an image loss at 64 ranks whenever rank 0's micro batches were text)."""
    from runtime.distributed import all_reduce_sum

    terms = list(weighted)
    flat = []
    for t in terms:
        n, v = record.get(weighted[t]) or 0, record.get(t)
        flat += [v * n if v is not None and n else 0.0, float(n)]
    x = all_reduce_sum(torch.tensor(flat, dtype=torch.float64))
    out: dict[str, float | int | None] = {}
    for i, t in enumerate(terms):
        total, n = x[2 * i:2 * i + 2].tolist()
        out[t], out[weighted[t]] = (total / n if n > 0 else None), int(n)
    return out


class Task:
    """What a stage gives the loop. Subclasses set `engines` (checkpoint tag -> DeepSpeed engine; the
    first is the main one: its lr and grad norm are logged) and `loader` (iterable, with
    state_dict/load_state_dict), and implement `forward`, `backward` and `count`."""

    engines: dict[str, Any]
    loader: Any
    project = "unitok"
    """Metric-sink project name."""
    weighted: dict[str, str] = {}
    """Per-token terms of `forward`'s output -> the count key (also in the output) that weights them in
    the step's record (`step_means`)."""

    def forward(self, batch: Any, step: int) -> dict[str, Any]:
        """One micro batch: {"loss": objective, other 0-d tensors (logged), anything else or named "_..."
        (task-private)}."""
        raise NotImplementedError

    def backward(self, out: dict[str, Any], batch: Any, step: int) -> dict[str, Any]:
        """Backward and engine steps for a finite loss; returns more 0-d terms to log (may raise StopRun)."""
        raise NotImplementedError

    def discard(self, out: dict[str, Any]) -> None:
        """`forward`'s micro batch is dropped (a non-finite loss on some rank; every rank drops it): undo what the
        forward changed besides the graph. Default: nothing."""

    def count(self, batch: Any) -> tuple[int, int]:
        """(samples, tokens) in this rank's micro batch, for the throughput figures (tokens may be 0)."""
        raise NotImplementedError

    def batch_hash(self, batch: Any) -> str:
        """A short digest of the micro batch; resume tests compare it step by step."""
        raise NotImplementedError

    def after_step(self, step: int, record: dict[str, Any], batch: Any, out: dict[str, Any]) -> None:
        """After each optimizer step, with the last micro batch and its output; may add to `record`."""

    def on_log(self, step: int, record: dict[str, Any], tokens_per_s: float) -> tuple[str, dict[str, float]]:
        """At log steps, on every rank (it may be a collective): (suffix of the log line, where a newline
        starts another log line; extra sink metrics). May add entries to `record`, which is written to
        metrics.jsonl afterwards."""
        return "", {}

    def state_dict(self) -> dict[str, Any]:
        """Task-private per-rank state saved with each checkpoint (e.g. a dedicated RNG)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def save_extra(self, tmp: Path) -> None:
        """Write extra files into a checkpoint folder being assembled (all ranks call it)."""

    def load_checkpoint(self, ckpt: Path, rank_state: dict[str, Any], step: int, log) -> bool:
        """Load the engines from `ckpt`. True: exact resume (the loop then restores data, RNG and task
        state); False: weights only (the task has logged what restarts)."""
        from runtime.distributed import get_world_size

        saved = int(rank_state.get("world_size", get_world_size()))
        if saved != get_world_size():
            raise ValueError(f"{ckpt} was written by {saved} ranks and this run has {get_world_size()}; "
                             "resume with the same number of ranks")
        for tag in self.engines:  # DeepSpeed's own error for a missing tag is a bare AssertionError
            if not (ckpt / tag).is_dir():
                has = sorted(p.name for p in ckpt.iterdir() if p.is_dir())
                raise ValueError(f"{ckpt} holds no state of the {tag!r} engine (it has {has}): the run that wrote it "
                                 f"ran without it (the tokenizer's 'disc': --gan.no-enabled); resume with its settings")
        for tag, engine in self.engines.items():
            try:
                engine.load_checkpoint(str(ckpt), tag=tag)
            except Exception as e:  # DeepSpeed's errors for a changed ZeRO stage or precision name neither
                raise RuntimeError(f"cannot load the {tag!r} engine from {ckpt} ({type(e).__name__}: {e})"
                                   f"{_settings_changed(ckpt, getattr(self, 'cfg', None))}") from e
        return True

    def finish(self, run_dir: Path, ckpts, trained: bool, log) -> None:
        """End of the run (every rank): export and final reports. `trained` is False when this
        invocation ran no step (a resume at the final step)."""


def _settings_changed(ckpt: Path, cfg) -> str:
    """'; it was written with --ds-config A --precision B, this run has ...' where they differ, else ''."""
    import json

    try:
        saved = json.loads((ckpt / "trainer_state.json").read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    flags = ("ds_config", "precision")
    if cfg is None or all(saved.get(f) == getattr(cfg, f, None) for f in flags):
        return ""

    def fmt(get):
        return " ".join(f"--{f.replace('_', '-')} {get(f)}" for f in flags)
    return (f"; it was written with {fmt(saved.get)} and this run has {fmt(lambda f: getattr(cfg, f))}: a resume "
            "loads the optimizer state as it was saved, so give the checkpoint's settings (or continue from an "
            "export: the MLLM's --init-from)")


def _batches(loader) -> Iterator[Any]:
    """The loader's batches, restarting it whenever it runs out."""
    while True:
        yield from loader


def run(cfg: RunConfig, build) -> dict[str, Any]:
    """A whole run: start-up (process group, the run folder's lock, logging), `build(cfg, info, log) -> Task`,
    `fit`, then the teardown of the process group it created (its threads stop here, not in the interpreter's
    finalisation: runtime.distributed); a caller's group is theirs to keep."""
    import dataclasses

    import torch.distributed as dist

    from runtime.checkpoint import CheckpointManager
    from runtime.distributed import end_job
    from runtime.log import error_to_file
    from runtime.run import start_run, unlock_run_dir

    caller_group = dist.is_initialized()
    # a bad --resume fails before anything starts
    resume_from = CheckpointManager(cfg.run_dir, cfg.keep_last).resolve(cfg.resume)
    resolved = dataclasses.asdict(cfg)
    info, log = start_run(cfg.run_dir, cfg.seed, cfg.dist_timeout_min)
    try:
        try:
            if resume_from is not None:
                refuse_unresumable(cfg, resolved, resume_from, info.world_size)
            task = build(cfg, info, log)
        except Exception as e:
            log.error(f"the run failed to start: {type(e).__name__}: {e}")
            error_to_file(e)
            raise
        stopped = None
        try:
            last = fit(cfg, task, info, log, resolved)  # ends with a barrier on every rank
        except SystemExit as stop:  # a stop every rank agreed on (a stop signal, --nan-policy): all of them are here
            stopped = (stop.code,)  # not the exception: its traceback holds fit's frame, and through it the task
        except Exception as e:  # log.txt ended at the last step line: say so there, with the traceback
            log.error(f"the run failed: {type(e).__name__}: {e}")
            error_to_file(e)
            raise
        finally:  # also on a crash, whose traceback keeps the task until the at-exit end_job lets it go
            _destroy_engines(task)
        del task  # with no reference left here, end_job's collection frees the engines and then the group
    finally:
        unlock_run_dir(cfg.run_dir)
    if not caller_group:
        end_job()
    if stopped is not None:
        raise SystemExit(*stopped)
    return last


def refuse_unresumable(cfg: RunConfig, resolved: dict[str, Any], ckpt: Path, world_size: int) -> None:
    """Refuse, before any model is built, a resume that the loaders or the engines would refuse only once
    built (minutes for a 7B model): another number of ranks where the trainer cannot reshard, or other data
    flags than the checkpoint's where the data stream continues exactly."""
    from runtime.checkpoint import CheckpointManager

    saved_world = int(CheckpointManager.load_rank_state(ckpt).get("world_size", world_size))
    if saved_world != world_size:
        if cfg.reshards_on_resume:
            return  # weights only: the data stream restarts, so its flags may change
        raise ValueError(f"{ckpt} was written by {saved_world} ranks and this run has {world_size}; "
                         "resume with the same number of ranks")
    try:
        saved = CheckpointManager.load_trainer_state(ckpt).get("config") or {}
        was = cfg.stream_flags(saved)
    except (KeyError, TypeError):  # a checkpoint of an older version without these flags: the loader checks
        return
    now = cfg.stream_flags(resolved)
    if diff := [f"{k} {_plain(now[k])} (the checkpoint has {_plain(was[k])})" for k in now
                if was.get(k) is not None and _plain(was[k]) != _plain(now[k])]:
        raise ValueError(f"--resume {ckpt}: the data stream continues at its saved position, which these flags "
                         f"place: {', '.join(diff)}. Resume with the checkpoint's values{cfg.new_stream_hint}")


def _destroy_engines(task: Task) -> None:
    """DeepSpeed's `destroy` removes the hooks its optimizers leave on autograd nodes: through them, C++
    would keep every engine, ZeRO-3 parameter and process group alive to the interpreter's exit."""
    for engine in task.engines.values():
        engine.destroy()


def fit(cfg: RunConfig, task: Task, info, log, run_config: dict[str, Any]) -> dict[str, Any]:
    """Train (or resume) to `cfg.total_steps`; returns the last step's record."""
    from runtime.run import StopSignals

    signals = StopSignals()
    batches = _batches(task.loader)  # lazy: _fit restores the loader's position before the first batch
    try:
        return _fit(cfg, task, info, log, run_config, signals, batches)
    except StopRun as e:
        log.error(f"{e}; stopping, the last good checkpoint is kept")
        sys.exit(3)
    except Interrupted as e:
        import signal

        log.warning(f"{signal.Signals(e.signum).name}: stopped after step {e.step}, its checkpoint is saved; "
                    f"exit code {128 + e.signum} (--resume auto continues from it)")
        sys.exit(128 + e.signum)
    finally:
        batches.close()  # on an error too: ends the loader's workers, which Python's exit would wait for
        signals.restore()


def _plain(v):
    return list(v) if isinstance(v, (list, tuple)) else v  # JSON gives lists where the config has tuples


def _follow_changed_flags(saved: dict[str, Any], now: dict[str, Any], task: Task, log) -> None:
    """A resume restores the optimizer and schedule as saved (DeepSpeed's load); the schedule and optimizer flags
    given now that differ from the checkpoint's take effect from this step, each with a warning. `--optim.*` apply
    to the first engine (the model; the tokenizer's discriminator has its own `--gan.*`); `--total-steps`,
    `--optim.warmup-frac` and `--optim.end-ratio` to every engine's schedule."""
    changed = {k: (saved[k], now[k]) for k in ("total_steps", "grad_accum") if k in saved and saved[k] != now[k]}
    so, no = saved.get("optim") or {}, now.get("optim") or {}
    changed |= {f"optim.{k}": (so[k], no[k]) for k in ("lr", "betas", "eps", "weight_decay", "warmup_frac", "end_ratio")
                if k in so and so[k] is not None and _plain(so[k]) != _plain(no[k])}
    if not changed:
        return
    log.warning("resumed with flags that differ from the checkpoint's, in effect from this step: " + ", ".join(
        f"--{k.replace('_', '-')} {new} (was {was})" for k, (was, new) in changed.items())
        + ("; --grad-accum changes the global batch" if "grad_accum" in changed else ""))
    for i, engine in enumerate(task.engines.values()):
        sched, groups = engine.lr_scheduler, engine.optimizer.param_groups
        if i == 0:
            if "optim.lr" in changed and sched is not None:
                ratio = no["lr"] / so["lr"]
                sched.base_lrs = [b * ratio for b in sched.base_lrs]
            for g in groups:
                if "optim.weight_decay" in changed and g["weight_decay"] == so["weight_decay"]:
                    g["weight_decay"] = no["weight_decay"]  # (the no-decay group keeps 0)
                if "optim.betas" in changed:
                    g["betas"] = tuple(no["betas"])
                if "optim.eps" in changed:
                    g["eps"] = no["eps"]
        if sched is not None:  # the saved rates are the old schedule's: the new one's now (its lambdas are new)
            for g, base, fn in zip(groups, sched.base_lrs, sched.lr_lambdas):
                g["lr"] = base * fn(sched.last_epoch)


def _fit(cfg: RunConfig, task: Task, info, log, run_config: dict[str, Any], signals, batches) -> dict[str, Any]:
    from runtime.checkpoint import CheckpointManager, git_sha, rng_state, set_rng_state, step_name
    from runtime.compile import graph_counts
    from runtime.distributed import barrier, is_main_process
    from runtime.log import MetricSink, Progress, format_line, memory_gb
    from runtime.run import append_metrics, kill_self, truncate_metrics, write_json_atomic

    run_dir = Path(cfg.run_dir)
    ckpts = CheckpointManager(run_dir, cfg.keep_last)
    step = 0
    resume_from = ckpts.resolve(cfg.resume)
    if resume_from is not None:
        rank_state = ckpts.load_rank_state(resume_from)
        trainer_state = ckpts.load_trainer_state(resume_from)
        step = int(trainer_state["step"])
        if task.load_checkpoint(resume_from, rank_state, step, log):
            task.loader.load_state_dict(rank_state["data"])
            set_rng_state(rank_state["rng"])
            task.load_state_dict(rank_state.get("task", rank_state))  # checkpoints before the shared loop: top level
            _follow_changed_flags(trainer_state.get("config") or {}, run_config, task, log)
        log.info(f"resumed from {resume_from} at step {step}")
        if later := [s for s in ckpts.complete_steps() if s > step]:
            log.warning(f"{run_dir} holds {len(later)} checkpoints after step {step} (up to {step_name(later[-1])}), "
                        "of the run this one rewinds: each is replaced when this run reaches its step")
            if is_main_process():  # --resume auto after a crash continues this run, not the one it rewinds
                ckpts.point_latest(resume_from)
    metrics_file = run_dir / "metrics.jsonl"
    if is_main_process():
        # written once the checkpoint has loaded: a refused resume leaves the run's own settings in place
        write_json_atomic(run_dir / "config.json", {"config": run_config, "git_sha": git_sha()})
        if unreadable := truncate_metrics(metrics_file, step):  # drop lines of steps that were lost with a crash
            log.warning(f"{metrics_file}: dropped {unreadable} lines that do not parse (a write cut short)")
    sink = MetricSink(cfg.metrics, run_dir, run_config, project=task.project, start_step=step)
    progress = Progress(step, cfg.total_steps, info.device)
    main_engine = next(iter(task.engines.values()))
    kill = cfg.debug

    def save(at: int) -> None:
        def write(tmp: Path) -> None:
            for i, (tag, engine) in enumerate(task.engines.items()):
                engine.save_checkpoint(str(tmp), tag=tag)
                if i == 0 and kill.kill_during_save and at == kill.kill_at_step:
                    kill_self()
            task.save_extra(tmp)
        ckpts.save(at, write, {"data": task.loader.state_dict(), "rng": rng_state(), "world_size": info.world_size,
                               "task": task.state_dict()},
                   {"step": at, "config": run_config, "git_sha": git_sha()})
        log.info(f"saved {step_name(at)}")

    last: dict[str, Any] = {}
    bad_in_row = 0
    while step < cfg.total_steps:
        micro_scalars: list[dict[str, float]] = []
        hashes, samples, tokens, skipped = [], 0, 0, 0
        lr = float(main_engine.get_lr()[0])  # the rate this step's update uses (the scheduler steps after it)
        while len(micro_scalars) < cfg.grad_accum:
            batch = next(batches)
            if step + 1 == kill.raise_at_step:
                raise RuntimeError(f"--debug.raise-at-step {kill.raise_at_step}: the injected error")
            out = task.forward(batch, step)
            if step + 1 == kill.nan_at_step and not micro_scalars and bad_in_row == 0:
                out["loss"] = out["loss"] * float("nan")
            if not finite_everywhere(out["loss"]):
                bad = {k: v for k, v in scalars(out).items() if not math.isfinite(v)}
                log.warning(f"step {step + 1}: non-finite loss on some rank (here: {bad}); micro batch skipped on "
                            "every rank")
                task.discard(out)
                bad_in_row += 1
                skipped += 1
                if cfg.nan_policy == "stop" or bad_in_row >= MAX_BAD_IN_A_ROW:
                    raise StopRun(f"{bad_in_row} non-finite micro batch(es) in a row (--nan-policy {cfg.nan_policy})")
                continue
            out.update(task.backward(out, batch, step))
            bad_in_row = 0
            micro_scalars.append(scalars(out))
            n, t = task.count(batch)
            samples, tokens = samples + n, tokens + t
            hashes.append(task.batch_hash(batch))
        step += 1
        progress.update(samples, tokens)  # this rank's: summed over ranks when the rates are logged
        record: dict[str, Any] = {"step": step, **step_means(micro_scalars, task.weighted)}
        if info.world_size > 1 and task.weighted:
            record.update(all_rank_means(record, task.weighted))
        norm = main_engine.get_global_grad_norm()
        # None where DeepSpeed keeps no norm (ZeRO 0); a non-finite norm means DeepSpeed skipped the update
        record["grad_norm"] = float(norm) if norm is not None and math.isfinite(norm) else None
        if norm is not None and not math.isfinite(norm):
            log.warning(f"step {step}: non-finite gradient norm on a finite loss; the optimizer skipped this update")
            if cfg.nan_policy == "stop":
                raise StopRun(f"step {step}: non-finite gradient norm (--nan-policy stop)")
        record["lr"] = lr
        if skipped:
            record["skipped_micro_batches"] = skipped  # (non-finite loss; replaced by the next micro batches)
        task.after_step(step, record, batch, out)
        if cfg.compile:
            record.update(graph_counts())
        record["data_hash"] = "".join(hashes)
        if step % cfg.log_every == 0 or step == cfg.total_steps:
            sps, tps, eta = progress.rates(step)
            shown = {k: v for k, v in record.items() if isinstance(v, float)}
            suffix, extra = task.on_log(step, record, tps)
            line = format_line(step, cfg.total_steps, shown, sps, tps if tokens else None, memory_gb(info.device), eta)
            for part in (line + suffix).split("\n"):
                log.info(part)
            sink.log({**shown, "samples_per_s": sps, **({"tokens_per_s": tps} if tokens else {}), **extra}, step)
        if is_main_process():
            append_metrics(metrics_file, record)
        saved = (step % cfg.save_every == 0 or step == cfg.total_steps) and (cfg.save_final or step < cfg.total_steps)
        if saved:
            save(step)
        stop = signals.agreed(info.device)
        if stop and step < cfg.total_steps:
            if not saved:
                save(step)
            barrier()
            sink.close()
            raise Interrupted(stop, step)
        if step == kill.kill_at_step:
            kill_self()
        last = record
    progress.close()
    task.finish(run_dir, ckpts, bool(last), log)
    barrier()
    sink.close()
    return last
