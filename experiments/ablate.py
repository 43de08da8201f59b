"""Tokenizer ablation grid: the paper's Tables 6-8, Fig. 3 and the causal/full projection switch.

    python -m experiments.ablate --grid cpu --base-preset debug --out-dir runs/ablate     (seeds 0-4)
    python -m experiments.ablate --grid paper --base-preset large --launcher deepspeed --ngpu 8 \
        --data.shards '/data/{00000000..00140146}.tar' --eval-images IMAGENET_VAL --zeroshot-dir IMAGENET_VAL \
        --classnames imagenet --inception-weights external/weights-inception-2015-12-05-6726825d.pth \
        --loss.lpips-weights external/lpips_with_vgg.pth --gan.dino-weights external/dinov2_vits14_pretrain.pth
    bash launch/ablate.sh --grid paper ...            (same flags; NGPU, LAUNCHER from the environment)

Every cell is the base preset with ONE switch (REFERENCE.md 1.4 and 3.5):
    base              MCQ K x V (the preset's), attention projection, full attention, recon + contrastive
    mcq-8x.. mcq-2x.. MCQ with 8 / 4 / 2 sub-codebooks at the same total entries N = K*V  (Table 8)
    single-1xN        one codebook of N entries                                             (Table 8)
    rq-KxV            residual quantization with the base's code shape and latent width     (Table 7)
    linear-proj       linear instead of attention projections                               (Fig. 3)
    causal-proj       raster-causal projection attention (Feb 2025 release)                 (REFERENCE 3.5)
    recon-only        no contrastive loss: reconstruction metrics are reported              (Table 6)
    contrastive-only  no pixel losses, no GAN: zero-shot accuracy is reported               (Table 6)
Resolution generalisation is not a training switch: every cell is evaluated at its training
resolution S and at 2S (columns `psnr` and `psnr@2x`), the encoder being resolution-agnostic.

Each (cell, seed) is trained by `unitok.train` in a subprocess (no launcher: single process with a
private process group; `--launcher deepspeed`: `deepspeed --num_gpus NGPU --module unitok.train`)
and evaluated by `unitok.evaluate` (in this process without a launcher, through the launcher
otherwise): PSNR/SSIM/codebook usage on `--eval-images` at 1x and 2x, rFID/IS with
`--inception-weights`, zero-shot top-1/top-5 on `--zeroshot-dir` and a linear probe's top-1 on the
frozen image features of `--probe-dir` (default: the zero-shot folder; unitok.evaluate.linear_probe).
Arguments this CLI does not know (`--data.shards ...`, `--loss.lpips-weights ...`) are passed to
every training run, before the cell's own switch, so they cannot undo it; --preset, --run-dir,
--seed, --total-steps and --resume are set per run and refused there. Every cell's arguments are
checked by unitok.train's parser before anything runs.

Without `--data.shards`, synthetic data is written under OUT_DIR/data (experiments.synthetic, the
demo's shapes world): training shards, a held-out eval folder and a zero-shot ImageFolder, all
rendered at 2S px so that the 1x evaluation sees the same downsampling as training and the 2x
evaluation sees native pixels. The zero-shot classes are whole scenes, "<colour> <shape> on a
<background> background" (6 x 3 x 3 = 54 classes, chance 1.9 % top-1): a caption names the
background colour too, so a class "red circle" is ambiguous to the tiny text tower (with the
earlier 8-colour world, a first try with 24 such classes scored below chance, 2.6 % vs 4.2 %,
where the scene classes gave 14.9 % for the same model). The zero-shot folder holds 24 images per
class so that the linear probe, which uses the same folder, trains on 12 and tests on 12 of each.

Claims (experiments/ablate_grid.py `paper_claims`, tested by experiments/ablate_stats.py): each of
the paper's findings is a one-sided comparison of two cells on one metric, e.g. Table 8's "8
sub-codebooks beat 4" is mcq-8x32 > base on psnr (rFID), zero-shot and probe top-1. Over the seeds,
results.md's second table gives both sides' mean +- std, the difference with its 90 % CI (the interval of
the two one-sided tests at 0.05), a one-sided Welch p and a verdict: reproduced, contradicted or not resolved
at this scale (and after Holm). Table 6's joint vs contrastive-only, where the paper claims no direction, is
reported as a difference with a two-sided p and no verdict.

Layout (resumable: a (cell, seed) is finished when its result.json exists; a half-trained one
resumes with `--resume auto`). A result, or a half-trained run, of other arguments or of another world
size (the ranks of a run, from --launcher, --ngpu and --launcher-args as deepspeed's runner reads them, with
its own code, before any run starts: a command line it would refuse is an error then; the global batch is
the local batch x ranks) is an error, not reused; every run of the grid is checked before any starts, and one
error names them all. fingerprint.json holds the arguments a run was started with; result.json also records
the run's world size (an earlier version's result without it takes it from its checkpoint or its log's
"ranks:" line, else is used with a warning), global batch and git SHA, and results.md warns of a cell that
pools more than one SHA. A run that fails (its training or evaluation) does not stop the others: failed.json
in its folder records the error, the exit code, the log and the launch settings (launcher flags, world size),
results.md marks the seed, and once the other runs are done the grid exits non-zero naming the failures. A
rerun skips the runs that failed under its arguments and launch settings, so that a failure that repeats costs
no time (one of other launcher flags runs again); --retry-failed runs them again (a transient out-of-memory),
resuming from their last checkpoint. A job stopped by a signal is no failure (Ctrl-C, which reaches the jobs
too, or a scheduler's SIGTERM: exit codes -2, -15, 130, 143, 138): nothing is recorded, no queued run starts,
and a rerun resumes it. A SIGINT or SIGTERM sent to the harness alone, or its death (kill -9), stops its jobs
as well: they get SIGTERM, save and exit (runtime/guard.py); the deepspeed runner alone passes no signal on.
    OUT_DIR/cells/<cell>/seed<k>/{fingerprint.json, train/, train.log, train_seconds.json, eval_1x/, eval_2x/,
                                  eval.log, result.json | failed.json}
    OUT_DIR/results.{json,md,png}   statistics over seeds, claim tests, tables and plot (ablate_report.py): every
                                    finished result under OUT_DIR with this run's settings, of any seed and of
                                    any cell of the grid, so a --cells or --seeds rerun keeps the others' rows
    OUT_DIR/log.txt                 the harness's log

CPU grid budget (`--grid cpu`: debug preset, 32 px, batch 32, 1000 steps, 8192 synthetic samples,
no GAN and no LPIPS, which need pretrained weights). 9 cells x 5 seeds = 45 runs (issue 16 asks for
>= 5 seeds; the claim tests need >= 2 a side); the target is at most 60 min on the 2-core machine.
`--jobs 2` runs two cells at once with one torch thread each: these tiny models use a second thread
poorly (one run: 427 samples/s with 2 threads, 345 with 1), so two one-thread runs train 1.6x the
samples/s of one two-thread run. Three things keep a run short: the fused AdamW kernel (`--optim.fused`:
the debug tokenizer's 49408 x 32 text embedding is 93 % of its parameters, and the default AdamW loop over
it took a third of a training step), the contrastive-only cell not running the decoder and the
recon-only cell not running the text tower (unitok.train skips a part no loss reads), and one evaluation
process per run for both scales. Measured (`--jobs 2`, idle AVX-512 host): ~120 s per run before them
(~107 s training, 13 s evaluation; 45 runs in 46 min, 2026-12-02), ~85 s after (77-82 s training, 7-8 s
evaluation; see benchmarks/README.md for the whole grid's time).
Why 1000 steps: the earlier grid (500 steps, 3 seeds, the former 168-class world) had zero-shot top-1
at 4-15 % (chance 0.6 %), with spreads too wide to order cells; at 1000 steps on the 54-class world
the base cell reaches 45-50 % zero-shot (chance 1.9 %) and ~60 % probe top-1. 500 steps on this world
was not measured. Other jobs on the machine slow every run several-fold.

The paper grid (`--grid paper`, not run here) uses the released preset with Table 8 at N = 16384
(1x16384, 2x8192, 4x4096, 8x2048, as in the paper) and needs real data, LPIPS and DINO weights.
The paper does not state its ablation schedule: the default of 10,000 steps is an assumption,
set `--steps`; the 5 default seeds make it 45 training runs, set `--seeds`.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from experiments.ablate_grid import Cell, Grid, load_grid
from experiments.ablate_report import claims_table, markdown_table, write_outputs
from runtime.launch import deepspeed_cmd, free_port, run_logged, stop_jobs
from runtime.run import write_json_atomic

RECON_KEYS = ("psnr", "ssim", "mean_usage_pct", "mean_perplexity", "rfid", "is")
ZEROSHOT_KEYS = ("zeroshot_top1", "zeroshot_top5", "probe_top1")  # understanding: zero-shot and linear probe
COUNT_KEYS = ("zeroshot_classes", "probe_classes")
SYNTH_SHARDS, SYNTH_PER_SHARD = 16, 512          # 8192 training samples
SYNTH_EVAL_IMAGES, SYNTH_ZS_PER_CLASS = 128, 24  # reconstruction images; zero-shot (and probe) images per class
RESERVED = ("--preset", "--run-dir", "--seed", "--total-steps", "--resume")  # one value per (cell, seed)


@dataclass
class AblateConfig:
    """A run of the ablation grid. Arguments it does not know are unitok.train overrides for every run."""

    grid: str = "cpu"
    """cpu, paper, or a YAML/JSON grid file (experiments/ablate_grid.py)."""
    base_preset: str | None = None
    """Model preset of every cell; None: the grid's (cpu: debug, paper: large)."""
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    """Training seeds; every cell is trained once per seed (the claim tests need >= 2). The results also count
    the finished seeds under --out-dir that this run leaves out (same settings)."""
    steps: int | None = None
    """Optimizer steps per run; None: the grid's."""
    cells: tuple[str, ...] = ()
    """Run only these cells of the grid; none given: all. results.{json,md,png} still summarise every finished
    result of the grid's cells under --out-dir written with this run's settings, so a rerun of a few cells keeps
    the other cells' rows and claims."""
    out_dir: str = "runs/ablate"
    """Output folder; a rerun resumes it."""
    launcher: Literal["none", "deepspeed"] = "none"
    """none: one process per run; deepspeed: `deepspeed --num_gpus NGPU` per run."""
    ngpu: int = 8
    """GPUs per run with --launcher deepspeed."""
    launcher_args: str = ""
    """Extra deepspeed launcher flags, e.g. --launcher-args='--hostfile H'."""
    eval_images: str | None = None
    """Reconstruction eval folder; None: synthetic images."""
    zeroshot_dir: str | None = None
    """Zero-shot ImageFolder; None: the synthetic scene classes."""
    probe_dir: str | None = None
    """Linear-probe ImageFolder (>= 2 images per class); None: the zero-shot folder."""
    classnames: Literal["folders", "imagenet"] = "folders"
    """Zero-shot class names: the folder names, or ImageNet's for an ImageNet val folder."""
    inception_weights: str | None = None
    """Local Inception weights for rFID/IS (not computed without)."""
    eval_batch_size: int = 64
    """Evaluation batch size."""
    jobs: int = 1
    """Runs at once (launcher none): each run's training and evaluation get (usable cores) // jobs torch threads.
    Tiny models use one core poorly: on 2 cores, 2 one-thread runs train 1.6x the samples/s of one two-thread run."""
    retry_failed: bool = False
    """Run again the runs that failed before (their folder holds failed.json; training resumes from its last
    checkpoint), e.g. after a transient out-of-memory. Without it a rerun skips them, so that a failure that
    repeats (a diverging run) costs no time; they stay marked in results.md and the run exits non-zero."""
    dry_run: bool = False
    """Validate (the arguments, and the runs already under --out-dir) and print the training commands only."""

    def __post_init__(self):
        self.seeds, self.cells = tuple(self.seeds), tuple(self.cells)
        if self.jobs < 1:
            raise ValueError(f"--jobs must be >= 1, got {self.jobs}")
        if self.jobs > 1 and self.launcher != "none":
            raise ValueError("--jobs > 1 needs --launcher none (a launched run takes every GPU it is given)")
        if self.steps is not None and self.steps <= 0:
            raise ValueError("--steps must be positive")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"--seeds must be distinct integers, got {list(self.seeds)}")
        if self.ngpu <= 0 or self.eval_batch_size <= 0:
            raise ValueError("--ngpu and --eval-batch-size must be positive")


# ---- data ------------------------------------------------------------------------------------
def synthetic_paths(out_dir: Path) -> dict[str, str]:
    """Where `prepare_synthetic` puts the training shards (a brace pattern) and the eval folders."""
    from experiments.synthetic import numbered_pattern

    root = out_dir / "data"
    return {"shards": str(root / "shards" / numbered_pattern(SYNTH_SHARDS)),
            "eval_images": str(root / "eval"), "zeroshot_dir": str(root / "zeroshot")}


def prepare_synthetic(out_dir: Path, train_size: int, log) -> None:
    """Training shards + eval folders under out_dir/data, rendered at 2x the training size (idempotent)."""
    from experiments.synthetic import write_eval_folders, write_shards

    root = out_dir / "data"
    size = 2 * train_size
    marker = root / "READY.json"
    spec = {"world": "experiments.synthetic", "shards": SYNTH_SHARDS, "per_shard": SYNTH_PER_SHARD, "size": size,
            "eval": SYNTH_EVAL_IMAGES, "zs_per_class": SYNTH_ZS_PER_CLASS}
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return
    shutil.rmtree(root, ignore_errors=True)  # other sizes or another world: no stale class folders
    t = time.time()
    write_shards(root / "shards", SYNTH_SHARDS, SYNTH_PER_SHARD, size=size, seed=0)
    _, zs = write_eval_folders(root, size, SYNTH_EVAL_IMAGES, SYNTH_ZS_PER_CLASS)
    marker.write_text(json.dumps(spec))
    n_cls = sum(1 for _ in zs.iterdir())
    log.info(f"synthetic data: {SYNTH_SHARDS * SYNTH_PER_SHARD} training samples, {SYNTH_EVAL_IMAGES} eval images, "
             f"{SYNTH_ZS_PER_CLASS} x {n_cls} zero-shot images at {size} px under {root} ({time.time() - t:.1f} s)")


# ---- running ---------------------------------------------------------------------------------
def check_train_args(argv: list[str], where: str):
    """Parse with unitok.train's own parser; any problem becomes a ValueError naming `where`."""
    from unitok.train import parse_config

    buf = io.StringIO()
    try:
        with contextlib.redirect_stderr(buf), contextlib.redirect_stdout(buf):
            return parse_config(argv)
    except SystemExit:
        raise ValueError(f"{where}: unitok.train rejects {shlex.join(argv)}\n{buf.getvalue().strip()}") from None
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise ValueError(f"{where}: {e}") from None


@dataclass
class Plan:
    """Everything a run of the grid needs, resolved once."""

    grid: Grid
    out_dir: Path
    steps: int
    seeds: list[int]
    user_args: list[str]
    eval_images: str | None
    zeroshot_dir: str | None
    probe_dir: str | None
    classnames: str
    inception_weights: str | None
    eval_batch_size: int
    launcher: str
    ngpu: int
    launcher_args: list[str]
    train_size: int = 0
    jobs: int = 1
    world_size: int = 1
    """Ranks of each training run (`launch_world_size`): the global batch is the local batch x grad_accum x this,
    so a result of another world size is not this grid's."""
    run_cells: list[Cell] = field(default_factory=list)
    """The cells this run trains (--cells); the summary also shows the grid's other cells that have results."""

    def env(self) -> dict[str, str] | None:
        """The environment of a run's jobs: None (job_env's default) for one run at a time; with --jobs N,
        (usable cores) // N torch threads each, so that N runs share the cores instead of oversubscribing them."""
        if self.jobs == 1:
            return None
        from runtime.distributed import local_cores
        from runtime.launch import job_env

        return {**job_env(), "OMP_NUM_THREADS": str(max(1, local_cores() // self.jobs))}

    def launch(self) -> dict[str, Any]:
        """How a run is launched, which the training arguments do not hold: failed.json records it, so that a
        failure of other launcher settings is run again."""
        if self.launcher == "none":
            return {"launcher": "none", "world_size": 1}
        return {"launcher": self.launcher, "ngpu": self.ngpu, "launcher_args": self.launcher_args,
                "world_size": self.world_size}

    def train_argv(self, cell: Cell, seed: int) -> list[str]:
        """grid args < user args < the cell's switch (tyro: the last occurrence wins)."""
        run_dir = self.out_dir / "cells" / cell.name / f"seed{seed}" / "train"
        return ["--preset", self.grid.base_preset, "--run-dir", str(run_dir), "--seed", str(seed),
                "--total-steps", str(self.steps), "--save-every", str(max(1, self.steps // 3)), "--resume", "auto",
                *self.grid.train_args, *self.user_args, *cell.args]

    def eval_argv(self, export: Path, out: Path, scale: int) -> list[str]:
        argv = ["--tokenizer", str(export), "--images", self.eval_images, "--size", str(self.train_size * scale),
                "--batch-size", str(self.eval_batch_size), "--out", str(out)]
        if scale == 1:
            if self.zeroshot_dir:
                argv += ["--zeroshot-dir", self.zeroshot_dir, "--classnames", self.classnames]
            if self.probe_dir:
                argv += ["--probe-dir", self.probe_dir]
            if self.inception_weights:
                argv += ["--inception-weights", self.inception_weights]
        return argv

    def fingerprint(self, cell: Cell, seed: int) -> dict[str, Any]:
        """What decides a result; paths under out_dir are written relative so the folder can move. unitok.train's
        --debug.* fault injection (kill or NaN at a step) is left out: a run killed by it resumes without it."""
        def rel(a):
            return a.replace(str(self.out_dir), "$OUT") if isinstance(a, str) else a

        argv, debug = [], False
        for a in self.train_argv(cell, seed):
            debug = a.startswith("--debug.") if a.startswith("--") else debug  # a flag and its values
            if not debug:
                argv.append(rel(a))
        return {"train_argv": argv,
                "eval": {"scales": list(self.grid.eval_scales), "images": rel(self.eval_images),
                         "zeroshot_dir": rel(self.zeroshot_dir), "probe_dir": rel(self.probe_dir),
                         "classnames": self.classnames,
                         "inception_weights": self.inception_weights, "train_size": self.train_size}}


def _job(plan: Plan, module: str, argv: list[str]) -> tuple[list[str], int]:
    """The command of one training or evaluation job and its master port."""
    port = free_port()
    if plan.launcher == "none":  # one process; its private process group uses the port (see run_logged)
        return [sys.executable, "-m", module, *argv], port
    # unitok.evaluate's parser does not take the launcher's --local_rank (LOCAL_RANK is in the env anyway)
    extra = ["--no_local_rank"] if module == "unitok.evaluate" else []
    return deepspeed_cmd(module, argv, plan.ngpu, port, launcher_args=[*plan.launcher_args, *extra]), port


def launch_world_size(plan: Plan) -> int:
    """The ranks of a training run: 1 without a launcher; with deepspeed, what its runner makes of the training
    command `_job` builds, by runner.main's own steps up to the launch (its parser, hostfile reader and host
    filters): a later --num_gpus wins over --ngpu's, --num_nodes takes the hostfile's first N hosts, argparse takes
    abbreviations (--hostf, -HFILE). A command line that deepspeed would refuse is a ValueError naming the flag
    here, before any run: at launch it was every run's failure."""
    if plan.launcher == "none":
        return 1
    from deepspeed.accelerator import get_accelerator
    from deepspeed.launcher import runner

    cmd, _ = _job(plan, "unitok.train", [])
    flags = f"--ngpu {plan.ngpu} --launcher-args={shlex.join(plan.launcher_args)!r}"
    buf = io.StringIO()
    try:
        with contextlib.redirect_stderr(buf), contextlib.redirect_stdout(buf):
            args = runner.parse_args(cmd[1:])
    except SystemExit:
        said = buf.getvalue().strip().splitlines()[-1]  # argparse's usage, then "PROG: error: WHAT"
        raise ValueError(f"{flags}: deepspeed's launcher rejects them: {said.partition('error: ')[2]}") from None
    try:  # fetch_hostfile's own test (None); a missing file's warning is the launch's to give
        pool = runner.fetch_hostfile(args.hostfile) if os.path.isfile(args.hostfile) else None
    except ValueError as e:
        raise ValueError(f"{flags}: deepspeed refuses the hostfile {args.hostfile} (--hostfile): {e}") from None
    if not pool and not (args.include or args.exclude or args.num_nodes > 1 or args.num_gpus > 0):
        if visible := os.environ.get(get_accelerator().visible_devices_envs()[0], ""):
            args.include = f"localhost:{visible}"  # runner.main: one node's visible devices
    if (args.num_nodes >= 0 or args.num_gpus >= 0) and (args.include or args.exclude):
        raise ValueError(f"{flags}: deepspeed refuses --include/--exclude beside --num_gpus or --num_nodes, and "
                         "experiments.ablate always gives it --num_gpus (--ngpu): set the GPUs per node with --ngpu "
                         "and the nodes with --hostfile and --num_nodes")
    if not pool:
        if args.num_nodes > 1:
            raise ValueError(f"{flags}: deepspeed refuses --num_nodes {args.num_nodes} without a hostfile of that many "
                             f"hosts (--hostfile; {args.hostfile} is not a file)")
        if not (count := get_accelerator().device_count()):
            raise ValueError(f"{flags}: deepspeed finds no GPU here and no hostfile ({args.hostfile}, --hostfile) "
                             "names other hosts: it refuses the launch")
        pool = {"localhost": count}
    try:
        active = runner.parse_inclusion_exclusion(pool, args.include, args.exclude)
    except ValueError as e:
        raise ValueError(f"{flags}: deepspeed refuses --include/--exclude: {e}") from None
    active = runner.apply_num_nodes_and_gpus(active, args.num_nodes, args.num_gpus)
    return sum(len(slots) for slots in active.values())


def run_world_size(run_dir: Path) -> int | None:
    """The ranks that wrote a run's latest checkpoint (each writes its rank%05d.pt there, runtime/checkpoint.py);
    None without a checkpoint."""
    from runtime.checkpoint import CheckpointManager

    ckpt = CheckpointManager(run_dir).latest()
    ranks = len(list(ckpt.glob("rank?????.pt"))) if ckpt is not None else 0
    return ranks or None


def logged_world_size(run_dir: Path) -> int | None:
    """The ranks of a run's last start from the trainer's "ranks:" line (runtime/run.py: rank_layout's "node 0
    (host a): ranks [0, 1] local [0, 1]; node 1 ..."), in its log.txt or else the harness's train.log beside it;
    None without one. For a finished run whose checkpoints were deleted (a grid needs only the exports)."""
    for log in (run_dir / "log.txt", run_dir.parent / "train.log"):
        lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
        if starts := [line for line in lines if "ranks: node " in line]:
            return sum(len(re.findall(r"\d+", r)) for r in re.findall(r"\): ranks \[([^\]]*)\]", starts[-1])) or None
    return None


def run_facts(run_dir: Path) -> dict[str, Any]:
    """What a result records of its training beside the arguments: `world_size` (its checkpoint's, else its log's),
    `global_batch` (local batch x grad_accum x world size) and `git_sha` (train/config.json, written by the
    trainer at the run's last start: the code that finished it); None where the run folder does not have it."""
    path = run_dir / "config.json"
    saved = read_json(path, f"delete {run_dir.parent} to start that run over") if path.is_file() else {}
    cfg, world = saved.get("config") or {}, run_world_size(run_dir) or logged_world_size(run_dir)
    local = (cfg.get("data") or {}).get("local_batch_size")
    return {"world_size": world, "global_batch": local * cfg.get("grad_accum", 1) * world if local and world else None,
            "git_sha": saved.get("git_sha")}


def _trained(run_dir: Path, total_steps: int) -> bool:
    """The final checkpoint and the export both exist. With the checkpoint alone (killed while exporting), the
    training command is run again: it resumes at the final step, trains nothing and exports."""
    from runtime.checkpoint import step_name

    latest = run_dir / "latest"
    done = latest.is_file() and latest.read_text().strip() == step_name(total_steps)
    return done and (run_dir / "export" / "model.safetensors").is_file()


# every scale's evaluation in one subprocess (--jobs > 1): its imports (torch, open_clip: ~4.5 s on the CPU
# machine) are paid once per run instead of once per scale
_EVAL_ALL = "import json, sys\nfrom unitok.evaluate import main\nfor argv in json.loads(sys.argv[1]):\n    main(argv)"


def evaluate_cell(plan: Plan, export: Path, cell_dir: Path) -> dict[str, Any]:
    """unitok.evaluate at every scale -> flat metrics (`psnr`, `psnr@2x`, `zeroshot_top1`, `probe_top1`, ...)."""
    outs = {s: cell_dir / f"eval_{s}x" for s in plan.grid.eval_scales}
    argvs = [plan.eval_argv(export, out, s) for s, out in outs.items()]
    log, what = cell_dir / "eval.log", f"evaluation of {export}"
    if plan.launcher != "none":  # one launch per scale
        for argv in argvs:
            cmd, port = _job(plan, "unitok.evaluate", argv)
            run_logged(cmd, port, log, what=what, env=plan.env())
    elif plan.jobs > 1:  # a process of its own, with the run's share of the cores
        run_logged([sys.executable, "-c", _EVAL_ALL, json.dumps(argvs)], free_port(), log, what=what, env=plan.env())
    else:  # in this process
        from unitok.evaluate import main

        with open(log, "a") as f, contextlib.redirect_stdout(f):
            for argv in argvs:
                f.write(f"$ python -m unitok.evaluate {shlex.join(argv)}\n")
                main(argv)
    metrics: dict[str, Any] = {}
    for s, out in outs.items():
        m = json.loads((out / "metrics.json").read_text())
        suffix = "" if s == 1 else f"@{s}x"
        for k in (*RECON_KEYS, *ZEROSHOT_KEYS, *COUNT_KEYS):
            if k in m and (s == 1 or k in ("psnr", "ssim")):
                metrics[k + suffix] = m[k]
    return metrics


def read_json(path: Path, advice: str) -> Any:
    """A harness file; a corrupt one (a truncated copy, a full disk) is a ValueError naming it, with `advice`."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); {advice}") from None


def read_result(path: Path) -> dict[str, Any]:
    """A (cell, seed)'s result.json. One written before results recorded `world_size`, `global_batch` and
    `git_sha` gets them from its run folder (`run_facts`)."""
    result = read_json(path, "delete it to evaluate that run again (its training in train/ is kept)")
    return result if "world_size" in result else {**run_facts(path.parent / "train"), **result}


def fingerprint_diff(old: dict[str, Any] | None, new: dict[str, Any]) -> str:
    """What differs between two fingerprints, e.g. '--loss.clip 0 -> 1' (a flag's last value: tyro's)."""
    def flags(argv):
        out, flag = {}, None
        for a in argv:
            if a.startswith("--"):
                flag, _, v = a.partition("=")
                out[flag] = [v] if v else []
            elif flag:
                out[flag].append(a)
        return {k: " ".join(v) or "(set)" for k, v in out.items()}

    old = old or {}
    a, b = flags(old.get("train_argv", [])), flags(new["train_argv"])
    diffs = [f"{k} {a.get(k, '(absent)')} -> {b.get(k, '(absent)')}" for k in sorted(a.keys() | b.keys())
             if a.get(k) != b.get(k)]
    ea, eb = old.get("eval", {}), new["eval"]
    diffs += [f"eval {k} {ea.get(k)} -> {eb.get(k)}" for k in sorted(ea.keys() | eb.keys()) if ea.get(k) != eb.get(k)]
    return "; ".join(diffs) or "the order of the training arguments"


def result_mismatch(plan: Plan, cell: Cell, seed: int, result: dict[str, Any]) -> str | None:
    """How a finished result differs from what this run would write for (cell, seed), or None: other arguments
    (the fingerprint), or another world size, which the arguments do not hold (--launcher, --ngpu,
    --launcher-args) and which sets the global batch. A result that cannot say its world size (an earlier
    version's, its checkpoints and logs deleted) is a warning: refused, it asked to delete finished training."""
    fp = plan.fingerprint(cell, seed)
    if result.get("fingerprint") != fp:
        return f"other arguments than this run's ({fingerprint_diff(result.get('fingerprint'), fp)})"
    if result.get("world_size") is None:  # an earlier experiments.ablate's, its checkpoints and logs deleted
        from runtime.distributed import warn_once

        warn_once(f"the result of cell {cell.name} seed {seed} does not say on how many ranks it trained (no "
                  f"checkpoint or log left); it is taken as of this run's world size ({plan.world_size})")
    elif result["world_size"] != plan.world_size:
        return (f"another world size than this run's ({result['world_size']} -> {plan.world_size} ranks: "
                "--launcher, --ngpu, --launcher-args)")
    return None


def reuse_problem(plan: Plan, cell: Cell, seed: int) -> str | None:
    """Why the folder of (cell, seed) cannot serve this run, or None: a result, or a half-trained (or failed)
    run, of other arguments or of another world size. A corrupt harness file is a ValueError."""
    cell_dir = plan.out_dir / "cells" / cell.name / f"seed{seed}"
    result_path = cell_dir / "result.json"
    if result_path.is_file():
        if why := result_mismatch(plan, cell, seed, read_result(result_path)):
            return f"{result_path} was written with {why}; use another --out-dir or delete {cell_dir}"
        return None
    run_dir = cell_dir / "train"
    # a run killed before its result resumes only under the arguments it was started with (the grid file may
    # have changed since): they are written before training starts
    fp_path = cell_dir / "fingerprint.json"
    if not run_dir.exists():
        return None
    if not fp_path.is_file():
        return (f"{run_dir} has no {fp_path.name} (started by an earlier experiments.ablate), so its arguments "
                f"cannot be checked against this run's; delete {cell_dir} to start that run over")
    fp, started = plan.fingerprint(cell, seed), read_json(fp_path, f"delete {cell_dir} to start that run over")
    if started != fp:
        return (f"{fp_path}: {run_dir} was started with other arguments than this run's "
                f"({fingerprint_diff(started, fp)}); rerun with those, or delete {cell_dir} to start that run over")
    ranks = run_world_size(run_dir)
    if ranks not in (None, plan.world_size):  # the trainer refuses it too, once started
        return (f"{run_dir} was started on {ranks} ranks and this run has {plan.world_size} (--launcher, --ngpu, "
                f"--launcher-args); rerun with those, or delete {cell_dir} to start that run over")
    return None


def check_reusable(plan: Plan, runs: list[tuple[Cell, int]]) -> None:
    """Every run's folder against the plan, before any run starts: one changed setting, found when the queue
    reached its cell, stopped the grid after the runs before it had trained. One error names every problem."""
    problems = []
    for cell, seed in runs:
        try:
            problems.append(reuse_problem(plan, cell, seed))
        except ValueError as e:  # a corrupt file
            problems.append(str(e))
    problems = [p for p in problems if p]
    if problems:
        raise ValueError(f"{len(problems)} of the {len(runs)} runs do not match this run's settings:\n  - "
                         + "\n  - ".join(problems))


INTERRUPTED_EXIT_CODES = (-2, -15, 130, 143, 138)
"""A job's exit by a signal, no fault of the run: killed by SIGINT or SIGTERM (-2, -15; Ctrl-C reaches the
harness's jobs too), 128 + SIGINT (130), and the trainers' own stop on SIGTERM or SIGUSR1 (143, 138: they saved at
the end of their step, and `--resume auto` continues; runtime/loop.py)."""


def _exit_code(message: str) -> int | None:
    """The exit code in runtime.launch's message of a job that failed, or None (another error)."""
    m = re.search(r"failed with exit code (-?\d+)", message)
    return int(m[1]) if m else None


class RunFailed(RuntimeError):
    """A (cell, seed)'s training or evaluation failed: the grid goes on with its other runs, and failed.json in
    the run's folder records it (`record`) with the launch settings it failed under (`Plan.launch`)."""

    def __init__(self, message: str, log: Path, launch: dict[str, Any]):
        super().__init__(message)
        self.log, self.launch, self.exit_code = log, launch, _exit_code(message)

    def record(self) -> dict[str, Any]:
        return {"error": str(self).splitlines()[0], "exit_code": self.exit_code, "log": str(self.log),
                "launch": self.launch}


class RunInterrupted(RuntimeError):
    """A (cell, seed)'s job was stopped by a signal (`INTERRUPTED_EXIT_CODES`): not a failure, so nothing is
    recorded (a failed.json marked Ctrl-C'd runs failed, and a rerun skipped them); it stops the grid, as Ctrl-C
    does, and a rerun resumes the run."""


@contextlib.contextmanager
def _stage(cell_dir: Path, log: str, launch: dict[str, Any]):
    """A run's training or evaluation: an error inside becomes RunFailed naming the stage's log, written to
    cell_dir/failed.json; a job stopped by a signal is RunInterrupted and leaves no failed.json (that of an
    earlier failure goes: the run is resumed, --retry-failed, and a rerun resumes it again)."""
    try:
        yield
    except Exception as e:
        message = str(e) or type(e).__name__
        if (code := _exit_code(message)) in INTERRUPTED_EXIT_CODES:
            (cell_dir / "failed.json").unlink(missing_ok=True)
            what = message.partition(" failed with exit code")[0]  # runtime.launch's "WHAT failed with exit code N"
            raise RunInterrupted(f"{what} was stopped by a signal (exit code {code}), not recorded as a failure; a "
                                 f"rerun resumes it (log {cell_dir / log})") from e
        failed = RunFailed(message, cell_dir / log, launch)
        write_json_atomic(cell_dir / "failed.json", failed.record())
        raise failed from e


def failed_run(cell_dir: Path) -> dict[str, Any] | None:
    """A run's failed.json, if it failed and did not finish since."""
    path = cell_dir / "failed.json"
    if not path.is_file() or (cell_dir / "result.json").is_file():
        return None
    return read_json(path, f"delete it (that run is then trained again with {cell_dir / 'train'})")


def run_cell(plan: Plan, cell: Cell, seed: int) -> tuple[dict[str, Any], bool]:
    """Train (or resume) and evaluate one (cell, seed); -> (result, ran). Finished ones are read back. A failed
    training or evaluation raises RunFailed."""
    if problem := reuse_problem(plan, cell, seed):
        raise ValueError(problem)
    cell_dir = plan.out_dir / "cells" / cell.name / f"seed{seed}"
    result_path = cell_dir / "result.json"
    if result_path.is_file():
        return read_result(result_path), False
    cell_dir.mkdir(parents=True, exist_ok=True)
    run_dir = cell_dir / "train"
    fp = plan.fingerprint(cell, seed)
    if not run_dir.exists():  # before training starts: a killed run resumes only under these (reuse_problem)
        write_json_atomic(cell_dir / "fingerprint.json", fp)
    seconds_path = cell_dir / "train_seconds.json"  # a re-evaluation (result.json deleted) keeps the figure
    t0 = time.time()
    if not _trained(run_dir, plan.steps):
        with _stage(cell_dir, "train.log", plan.launch()):
            cmd, port = _job(plan, "unitok.train", plan.train_argv(cell, seed))
            run_logged(cmd, port, cell_dir / "train.log", what=f"training of cell {cell.name} seed {seed}",
                       env=plan.env())
            if not (run_dir / "export" / "model.safetensors").is_file():
                raise RuntimeError(f"training of cell {cell.name} seed {seed} wrote no export; "
                                   f"see {cell_dir / 'train.log'}")
        write_json_atomic(seconds_path, {"train_seconds": round(time.time() - t0, 2)})
    facts = run_facts(run_dir)
    if facts["world_size"] is None:  # re-evaluated, its checkpoints and logs deleted
        from runtime.distributed import warn_once

        warn_once(f"{run_dir}: no checkpoint or log says on how many ranks it trained; its result is taken as of "
                  f"this run's world size ({plan.world_size})")
    elif facts["world_size"] != plan.world_size:  # a launch other than deepspeed's runner resolved here: stop
        raise ValueError(f"training of cell {cell.name} seed {seed} ran on {facts['world_size']} ranks where this "
                         f"run expects {plan.world_size}: set the GPUs per node (--ngpu, or --num_gpus in "
                         "--launcher-args) and the nodes (--hostfile, --num_nodes) to what the launch used (a rerun "
                         "with them uses this training)")
    t1 = time.time()
    with _stage(cell_dir, "eval.log", plan.launch()):
        metrics = evaluate_cell(plan, run_dir / "export", cell_dir)
    t2 = time.time()
    last = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line][-1]
    train_seconds = (read_json(seconds_path, "delete it (the training time is then not recorded)")["train_seconds"]
                     if seconds_path.is_file() else None)  # None: trained by an earlier experiments.ablate
    metrics.update(train_loss=last["loss"], train_clip=last.get("clip"), train_seconds=train_seconds,
                   eval_seconds=round(t2 - t1, 2))
    from runtime.distributed import describe_host

    result = {"cell": cell.name, "group": cell.group, "seed": seed, "args": cell.args, "report": list(cell.report),
              "metrics": metrics, "fingerprint": fp, **facts,
              "host": describe_host()}  # where its seconds were measured
    write_json_atomic(result_path, result)  # whole or not at all: the marker of a finished cell
    (cell_dir / "failed.json").unlink(missing_ok=True)  # a retry that succeeded
    return result, True


def finished_results(plan: Plan, skip: set[tuple[str, int]], log) -> list[dict[str, Any]]:
    """The finished results under out_dir of the grid's (cell, seed)s outside `skip` (this run's), written with
    this run's settings (`result_mismatch`): a --cells or --seeds rerun summarised only itself and dropped the
    other cells' claims."""
    found, other = [], []
    for cell in plan.grid.cells:
        for path in sorted((plan.out_dir / "cells" / cell.name).glob("seed*/result.json")):
            m = re.fullmatch(r"seed(-?\d+)", path.parent.name)
            if not m or (cell.name, int(m[1])) in skip:
                continue
            result = read_result(path)
            (other if result_mismatch(plan, cell, int(m[1]), result) else found).append(result)
    if other:
        log.info(f"results leave out {len(other)} finished run(s) under {plan.out_dir} with other settings")
    return found


def failed_runs(plan: Plan) -> dict[tuple[str, int], dict[str, Any]]:
    """(cell, seed) -> failed.json of the grid's runs under out_dir that failed with this run's arguments and
    launch settings (`Plan.launch`). A failure under other ones is not this run's to skip: a launcher flag that
    deepspeed refused failed every run, and once fixed, each was still skipped as failed before."""
    failed = {}
    for cell in plan.grid.cells:
        for fp_path in sorted((plan.out_dir / "cells" / cell.name).glob("seed*/fingerprint.json")):
            m = re.fullmatch(r"seed(-?\d+)", fp_path.parent.name)
            record = failed_run(fp_path.parent) if m else None
            started = record and read_json(fp_path, f"delete {fp_path.parent} to start that run over")
            if started and started == plan.fingerprint(cell, int(m[1])) and record.get("launch") == plan.launch():
                failed[cell.name, int(m[1])] = record
    return failed


# ---- entry -----------------------------------------------------------------------------------
def metric_keys(grid: Grid) -> set[str]:
    """The per-seed metric keys `evaluate_cell` can give (psnr and ssim also at every other scale, `psnr@2x`)."""
    return {*RECON_KEYS, *ZEROSHOT_KEYS, *(f"{k}@{s}x" for k in ("psnr", "ssim") for s in grid.eval_scales if s != 1)}


def make_plan(args: AblateConfig, user_args: list[str], log) -> Plan:
    """Resolve the grid, the data and every cell's arguments; validate them all before any training."""
    grid = load_grid(args.grid, args.base_preset)
    unknown = [c for c in args.cells if c not in {x.name for x in grid.cells}]
    if unknown:
        raise ValueError(f"--cells {unknown} not in grid {grid.name!r}: {[c.name for c in grid.cells]}")
    known = metric_keys(grid)
    for c in grid.claims:
        if c.metric not in known:
            raise ValueError(f"--grid {args.grid}: claim {c.name!r}: metric {c.metric!r} is not a result of this "
                             f"grid; choose from {sorted(known)}")
    if user_args and not user_args[0].startswith("--"):
        raise ValueError(f"unexpected argument {user_args[0]!r}: unitok.train overrides start with '--'")
    out_dir = Path(args.out_dir).resolve()
    for p in (args.eval_images, args.zeroshot_dir, args.probe_dir):
        if p and not Path(p).is_dir():
            raise ValueError(f"folder not found: {p}")
    if args.inception_weights:
        from unitok.evaluate import check_local_weights

        check_local_weights(args.inception_weights)

    def absolute(p):
        return str(Path(p).resolve()) if p else None

    plan = Plan(grid, out_dir, args.steps or grid.steps, list(args.seeds), list(user_args),
                absolute(args.eval_images), absolute(args.zeroshot_dir), absolute(args.probe_dir), args.classnames,
                absolute(args.inception_weights), args.eval_batch_size, args.launcher, args.ngpu,
                shlex.split(args.launcher_args), jobs=args.jobs,
                run_cells=[c for c in grid.cells if not args.cells or c.name in args.cells])
    plan.world_size = launch_world_size(plan)
    for where, args_ in [("grid train_args", grid.train_args), ("arguments", user_args),
                         *[(f"cell {c.name!r}", c.args) for c in plan.run_cells]]:
        flags = {a.split("=")[0].replace("_", "-") for a in args_}
        taken = sorted(flags & set(RESERVED))
        if taken:
            raise ValueError(f"{where}: {taken} are set by experiments.ablate (use --steps, --seeds, --base-preset, "
                             "--out-dir)")
    given = [a.split("=")[0].replace("_", "-") for a in (*grid.train_args, *user_args)]
    if grid.needs_user_data and "--data.shards" not in given:  # before the parser, whose errors are about weights
        raise ValueError(f"grid {grid.name!r} needs real data: pass --data.shards PATTERN (and --eval-images, "
                         "--zeroshot-dir)")
    base = check_train_args(plan.train_argv(Cell("base", "x"), plan.seeds[0]), "base arguments")
    plan.train_size = base.data.img_size
    synthetic = not base.data.shards
    if synthetic:
        paths = synthetic_paths(out_dir)
        plan.user_args = ["--data.shards", paths["shards"], *plan.user_args]
        plan.eval_images = plan.eval_images or paths["eval_images"]
        plan.zeroshot_dir = plan.zeroshot_dir or paths["zeroshot_dir"]
    elif not plan.eval_images:
        raise ValueError("with --data.shards, give --eval-images DIR for the reconstruction metrics")
    elif not plan.zeroshot_dir:
        from runtime.distributed import warn_once

        warn_once("no --zeroshot-dir: zero-shot accuracy is not measured")
    plan.probe_dir = plan.probe_dir or plan.zeroshot_dir
    for cell in plan.run_cells:
        cfg = check_train_args(plan.train_argv(cell, plan.seeds[0]), f"cell {cell.name!r}")
        if cfg.data.img_size != plan.train_size:
            raise ValueError(f"cell {cell.name!r} changes the training resolution; cells must share it")
    if synthetic and not args.dry_run:
        prepare_synthetic(out_dir, plan.train_size, log)
    return plan


def run(args: AblateConfig, user_args: list[str]) -> dict[str, Any]:
    """Run (or resume) the grid; returns the summary. Runs that fail do not stop the others: the grid ends with
    a RuntimeError naming them, after the results are written."""
    from runtime.log import setup_logging

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = setup_logging(out_dir)
    plan = make_plan(args, user_args, log)
    todo = [(c, s) for c in plan.run_cells for s in plan.seeds]
    log.info(f"grid {plan.grid.name}: {len(plan.run_cells)} cells x {len(plan.seeds)} seeds = {len(todo)} runs, "
             f"preset {plan.grid.base_preset}, {plan.steps} steps, launcher {plan.launcher} with {plan.world_size} "
             f"rank(s) per run, out {plan.out_dir}")
    check_reusable(plan, todo)
    if args.dry_run:
        for c, s in todo:
            cmd, _ = _job(plan, "unitok.train", plan.train_argv(c, s))
            log.info(f"[dry run] {c.name} seed {s}: {shlex.join(cmd)}")
        return {}
    failed = failed_runs(plan)
    skipped = [] if args.retry_failed else [(c, s) for c, s in todo if (c.name, s) in failed]
    if skipped:
        log.info(f"skipping {len(skipped)} run(s) that failed before (--retry-failed runs them again): "
                 + ", ".join(f"{c.name} seed {s}" for c, s in skipped))
    queue = [x for x in todo if x not in skipped]
    done: dict[int, dict[str, Any]] = {}
    n_ended = 0
    others = finished_results(plan, {(c.name, s) for c, s in todo}, log)
    t_start = time.time()

    def ended(cell: Cell, seed: int, line: str) -> None:  # under the lock
        nonlocal n_ended
        n_ended += 1
        log.info(f"[{n_ended}/{len(queue)}] {cell.name} seed {seed}: {line}")
        write_outputs(plan, others + [done[j] for j in sorted(done)], list(failed))

    def one(i: int) -> None:
        if stop.is_set():  # taken from the queue after the grid was stopped (the one worker of --jobs 1 took the
            return         # next run at once, and trained it to its end before the error was raised)
        cell, seed = queue[i]
        t = time.time()
        try:
            result, ran = run_cell(plan, cell, seed)
        except RunFailed as e:
            if interrupted.is_set():  # Ctrl-C reached its job too, whatever exit code its launcher made of it
                (e.log.parent / "failed.json").unlink(missing_ok=True)
                return
            with lock:
                failed[cell.name, seed] = e.record()
                ended(cell, seed, f"FAILED: {e.record()['error']} (see {e.log}); the other runs go on")
            return
        except BaseException:
            stop.set()  # before the error leaves this worker, so that no queued run starts
            raise
        m = result["metrics"]
        shown = " ".join(f"{k} {m[k]:.2f}" for k in ("psnr", "psnr@2x", "zeroshot_top1", "probe_top1") if k in m)
        train = "?" if m["train_seconds"] is None else f"{m['train_seconds']:.0f}"  # trained by an earlier version
        how = (f"done in {time.time() - t:.0f} s (train {train} s, eval {m['eval_seconds']:.0f} s)"
               if ran else "finished before, skipped")
        with lock:
            failed.pop((cell.name, seed), None)  # retried (--retry-failed)
            done[i] = result
            ended(cell, seed, f"{how} | {shown}")

    import threading
    from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

    lock = threading.Lock()
    stop, interrupted = threading.Event(), threading.Event()  # no queued run starts; Ctrl-C
    # threads only wait on subprocesses (jobs > 1 evaluates in a subprocess too). A run that fails (RunFailed) is
    # recorded and the queue goes on: with --jobs 1 the next queued run starts. Any other error, of whichever run
    # (a launch whose world size was misread, a job stopped by a signal, a fault of this harness), stops new runs
    # (awaited in order, a later run's error went unseen while an earlier one trained), the ones already started
    # finish, and it is raised
    with ThreadPoolExecutor(max_workers=plan.jobs) as pool:
        futures = [pool.submit(one, i) for i in range(len(queue))]
        try:
            wait(futures, return_when=FIRST_EXCEPTION)
        except BaseException:  # Ctrl-C: no queued run starts (leaving `with` waited for every queued run)
            interrupted.set()
            stop.set()
            pool.shutdown(wait=False, cancel_futures=True)
            stop_jobs()  # a SIGINT sent to this process alone reached no job: the others' threads waited on
            log.info("interrupted: no queued run starts, and the runs going now are not recorded as failed; a rerun "
                     "resumes them")
            raise
        error = next((f for f in futures if f.done() and not f.cancelled() and f.exception() is not None), None)
        if error is not None:
            for g in futures:
                g.cancel()
            raise error.exception()
    summary = write_outputs(plan, others + [done[j] for j in sorted(done)], list(failed))
    from runtime.distributed import describe_host

    log.info(f"grid done in {time.time() - t_start:.0f} s on {describe_host()} -> {plan.out_dir / 'results.md'}\n"
             + markdown_table(summary) + "\n" + claims_table(summary))
    if failures := [(c, s) for c, s in todo if (c.name, s) in failed]:
        def why(c: Cell, s: int) -> str:
            r = failed[c.name, s]
            before = "skipped, failed before: " if (c, s) in skipped else ""
            code = "" if r["exit_code"] is None else f"exit code {r['exit_code']}, "
            return f"{c.name} seed {s} ({before}{code}log {r['log']})"

        raise RuntimeError(f"{len(failures)} of the {len(todo)} runs failed: "
                           f"{'; '.join(why(c, s) for c, s in failures)}. Their folders hold failed.json and "
                           "results.md marks them, beside the other runs' results. A rerun skips them; "
                           "--retry-failed runs them again (training resumes from its last checkpoint)")
    return summary


def parse_args(argv: list[str] | None = None) -> tuple[AblateConfig, list[str]]:
    """-> (the harness's config, unitok.train overrides)."""
    import tyro

    return tyro.cli(AblateConfig, args=argv, description=__doc__, return_unknown_args=True)


def main(argv: list[str] | None = None) -> None:
    """CLI entry point; user errors and failed runs end with one line, not a traceback."""
    try:
        run(*parse_args(argv))
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        raise SystemExit(f"experiments.ablate: error: {e}") from None


if __name__ == "__main__":
    main()
