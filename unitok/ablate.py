"""Tokenizer ablation grid: the paper's Tables 6-8, Fig. 3 and the causal/full projection switch.

    python -m unitok.ablate --grid cpu --base-preset debug --seeds 0 1 2 --out-dir runs/ablate
    python -m unitok.ablate --grid paper --base-preset large --launcher deepspeed --ngpu 8 \
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
`--inception-weights`, zero-shot top-1/top-5 on `--zeroshot-dir`. Arguments this CLI does not know
(`--data.shards ...`, `--loss.lpips-weights ...`) are passed to every training run, before the cell's
own switch, so they cannot undo it; --preset, --run-dir, --seed, --total-steps and --resume are set
per run and refused there. Every cell's arguments are checked by unitok.train's parser
before anything runs.

Without `--data.shards`, synthetic data is written under OUT_DIR/data (unitok.data shapes): training
shards, a held-out eval folder and a zero-shot ImageFolder, all rendered at 2S px so that the 1x
evaluation sees the same downsampling as training and the 2x evaluation sees native pixels. The
zero-shot classes are whole scenes, "<colour> <shape> on a <background> background" (168 classes,
chance 0.6 % top-1): a caption names two colours, so a class "red circle" is ambiguous to the tiny
text tower (a first try with those 24 classes scored below chance, 2.6 % vs 4.2 %, where the scene
classes gave 14.9 % for the same model).

Layout (resumable: a (cell, seed) is finished when its result.json exists; a half-trained one
resumes with `--resume auto`; a result written with different arguments is an error, not reused):
    OUT_DIR/cells/<cell>/seed<k>/{train/, train.log, eval_1x/, eval_2x/, result.json}
    OUT_DIR/results.json   per cell: mean, std, min, max and the values over seeds
    OUT_DIR/results.md     one markdown table, mean +- std
    OUT_DIR/results.png    reconstruction (PSNR at 1x and 2x, rFID) and zero-shot top-1 per cell

CPU grid budget (`--grid cpu`: debug preset, 32 px, batch 32, 500 steps, 8192 synthetic samples,
no GAN and no LPIPS, which need pretrained weights). 9 cells x 3 seeds = 27 runs; 40 min = 2400 s
allows ~89 s per run. One-cell timing on the 2-core machine (cell `base`, seed 0; `rq-4x64` took the
same): ~4 s process start and model build + ~0.1 s per step (~50 s for 500 steps) + ~1 s of
checkpoints and export + ~4 s of evaluation (128 images at 32 and 64 px, 672 zero-shot images,
168 classes x 80 prompts) = ~59 s per run -> 27 x 59 s = ~27 min, + ~10 s of start and data
generation. The remaining third is margin for other load, and the rate is load-sensitive: two more
timings of the same cell, with other jobs saturating both cores now and then, took 152 s and 164 s
(~2.7x, ~70 min for the grid); on a busy machine use `--steps 200`.

The paper grid (`--grid paper`, not run here) uses the released preset with Table 8 at N = 16384
(1x16384, 2x8192, 4x4096, 8x2048, as in the paper) and needs real data, LPIPS and DINO weights.
The paper does not state its ablation schedule: the default of 10,000 steps is an assumption,
set `--steps`.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import itertools
import json
import os
import random
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPORTS = ("recon", "zeroshot")
RECON_KEYS = ("psnr", "ssim", "mean_usage_pct", "mean_perplexity", "rfid", "is")
ZEROSHOT_KEYS = ("zeroshot_top1", "zeroshot_top5")
CPU_STEPS, PAPER_STEPS = 500, 10_000
SYNTH_SHARDS, SYNTH_PER_SHARD = 16, 512         # 8192 training samples
SYNTH_EVAL_IMAGES, SYNTH_ZS_PER_CLASS = 128, 4  # held-out reconstruction images; zero-shot images per class
RESERVED = ("--preset", "--run-dir", "--seed", "--total-steps", "--resume")  # one value per (cell, seed)
PM = "\u00b1"  # the plus-minus sign of the markdown table
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


# ---- grid definition -----------------------------------------------------------------------------
@dataclass
class Cell:
    """One ablation cell: the base preset plus one switch."""

    name: str
    """Folder-safe name, unique in the grid."""
    group: str
    """Which ablation it belongs to (e.g. 'Table 8'); shown in the table."""
    args: list[str] = field(default_factory=list)
    """unitok.train overrides that define the switch (applied last)."""
    report: tuple[str, ...] = REPORTS
    """Metric groups shown in the table: recon and/or zeroshot (all are computed and kept in JSON)."""
    note: str = ""
    """One line for the table."""

    def __post_init__(self):
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise ValueError(f"cell name {self.name!r} must be letters, digits and _.+- (folder-safe)")
        if not isinstance(self.args, list) or not all(isinstance(a, str) for a in self.args):
            raise ValueError(f"cell {self.name!r}: args must be a list of strings, got {self.args!r}")
        self.report = tuple(self.report)
        bad = [r for r in self.report if r not in REPORTS]
        if bad or not self.report:
            raise ValueError(f"cell {self.name!r}: report must be a non-empty subset of {list(REPORTS)}, got "
                             f"{list(self.report)}")


@dataclass
class Grid:
    """A named set of cells trained from one base preset."""

    name: str
    """Grid name (shown in the results)."""
    cells: list[Cell]
    """The cells, in table order."""
    base_preset: str = "debug"
    """Default model preset (overridden by --base-preset)."""
    steps: int = CPU_STEPS
    """Default optimizer steps per run (overridden by --steps)."""
    train_args: list[str] = field(default_factory=list)
    """unitok.train arguments shared by every cell (applied before the user's and the cell's)."""
    eval_scales: tuple[int, ...] = (1, 2)
    """Evaluation resolutions as multiples of the training resolution."""
    needs_user_data: bool = False
    """True: refuse to run on synthetic data (paper-scale grids)."""

    def __post_init__(self):
        if not self.cells:
            raise ValueError(f"grid {self.name!r} has no cells")
        names = [c.name for c in self.cells]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"grid {self.name!r}: duplicate cell names {dup}")
        if not isinstance(self.steps, int) or self.steps <= 0:
            raise ValueError(f"grid {self.name!r}: steps must be a positive integer, got {self.steps!r}")
        self.eval_scales = tuple(self.eval_scales)
        if not self.eval_scales or 1 not in self.eval_scales or any(
                not isinstance(s, int) or s <= 0 for s in self.eval_scales):
            raise ValueError(f"grid {self.name!r}: eval_scales must be positive integers including 1, "
                             f"got {list(self.eval_scales)}")
        if not all(isinstance(a, str) for a in self.train_args):
            raise ValueError(f"grid {self.name!r}: train_args must be a list of strings")


def _q(kind: str, k: int, v: int) -> list[str]:
    return ["--model.quantizer.kind", kind, "--model.quantizer.num-codebooks", str(k),
            "--model.quantizer.codebook-size", str(v)]


def _common_cells(K: int, V: int, total: int, latent_dim: int, base_note: str) -> list[Cell]:
    """base, Table 8 at `total` entries, Table 7, Fig. 3, causal, Table 6."""
    cells = [Cell("base", "reference", [], note=base_note)]
    for k in (8, 4, 2):
        if total % k or latent_dim % k:
            continue
        if (k, total // k) == (K, V):
            continue  # that shape is the base cell itself
        cells.append(Cell(f"mcq-{k}x{total // k}", "Table 8", _q("mcq", k, total // k),
                          note=f"MCQ {k} sub-codebooks, {total} entries in all"))
    cells += [
        Cell(f"single-1x{total}", "Table 8", _q("single", 1, total), note=f"one codebook of {total} entries"),
        Cell(f"rq-{K}x{V}", "Table 7", _q("rq", K, V), note=f"residual quantization, depth {K}, same code shape"),
        Cell("linear-proj", "Fig. 3", ["--model.projection.kind", "linear"], note="linear projections"),
        Cell("causal-proj", "causal vs full", ["--model.projection.attn-mode", "causal"],
             note="raster-causal projection attention"),
        Cell("recon-only", "Table 6", ["--loss.clip", "0"], report=("recon",), note="no contrastive loss"),
        Cell("contrastive-only", "Table 6", ["--loss.l1", "0", "--loss.l2", "0", "--loss.lpips", "0",
                                             "--gan.no-enabled"],
             report=("zeroshot",), note="no pixel or GAN loss"),
    ]
    return cells


def cpu_grid(base_preset: str) -> Grid:
    """The CPU-sized grid on synthetic shapes (see the module docstring for its time budget)."""
    from unitok.config import preset

    q = preset(base_preset).quantizer
    K, V = q.num_codebooks, q.codebook_size
    note = f"MCQ {K}x{V}, attention projection (full), recon + contrastive"
    return Grid("cpu", _common_cells(K, V, K * V, q.latent_dim, note), base_preset=base_preset, steps=CPU_STEPS,
                train_args=["--data.local-batch-size", "32", "--data.num-workers", "0", "--gan.no-enabled",
                            "--loss.lpips", "0", "--log-every", "25", "--keep-last", "1"])


def paper_grid(base_preset: str) -> Grid:
    """The paper-scale grid (GPU; real data and pretrained LPIPS/DINO/Inception weights required)."""
    from unitok.config import preset

    q = preset(base_preset).quantizer
    K, V = q.num_codebooks, q.codebook_size
    note = f"MCQ {K}x{V}, attention projection (full), recon + contrastive, GAN"
    cells = _common_cells(K, V, 16384, q.latent_dim, note)  # Table 8 is at 16384 entries, as in the paper
    return Grid("paper", cells, base_preset=base_preset, steps=PAPER_STEPS, needs_user_data=True,
                train_args=["--log-every", "50", "--save-every", "1000"])


GRID_KEYS = {f.name for f in dataclasses.fields(Grid)}
CELL_KEYS = {f.name for f in dataclasses.fields(Cell)}


def load_grid(spec: str, base_preset: str | None) -> Grid:
    """`cpu`, `paper`, or a YAML/JSON file with the fields of `Grid` (cells: list of `Cell` fields)."""
    if spec in ("cpu", "paper"):
        builder = cpu_grid if spec == "cpu" else paper_grid
        return builder(base_preset or ("debug" if spec == "cpu" else "large"))
    path = Path(spec)
    if path.suffix.lower() not in (".yaml", ".yml", ".json"):
        raise ValueError(f"--grid {spec!r}: use 'cpu', 'paper' or a .yaml/.yml/.json grid file")
    if not path.is_file():
        raise ValueError(f"--grid {spec!r}: grid file not found")
    import yaml

    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: the grid must be a mapping with keys {sorted(GRID_KEYS)}")
    unknown = set(raw) - GRID_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown grid keys {sorted(unknown)}; allowed {sorted(GRID_KEYS)}")
    cells_raw = raw.get("cells")
    if not isinstance(cells_raw, list) or not cells_raw:
        raise ValueError(f"{path}: 'cells' must be a non-empty list")
    cells = []
    for i, c in enumerate(cells_raw):
        if not isinstance(c, dict) or "name" not in c:
            raise ValueError(f"{path}: cell #{i} must be a mapping with at least a 'name'")
        unknown = set(c) - CELL_KEYS
        if unknown:
            raise ValueError(f"{path}: cell {c['name']!r}: unknown keys {sorted(unknown)}; allowed {sorted(CELL_KEYS)}")
        c = dict(c)
        c["group"] = str(c.get("group", "custom"))
        if "args" in c and c["args"] is not None:
            c["args"] = [str(a) for a in c["args"]] if isinstance(c["args"], list) else c["args"]
        cells.append(Cell(**c))
    kw = {k: v for k, v in raw.items() if k != "cells"}
    kw.setdefault("name", path.stem)
    if "train_args" in kw:
        if not isinstance(kw["train_args"], list):
            raise ValueError(f"{path}: train_args must be a list of strings")
        kw["train_args"] = [str(a) for a in kw["train_args"]]
    if base_preset:
        kw["base_preset"] = base_preset
    return Grid(cells=cells, **kw)


# ---- data ------------------------------------------------------------------------------------
def write_eval_data(root: Path, size: int, seed: int = 1234) -> tuple[Path, Path]:
    """Held-out synthetic shapes at `size` px: `eval/` (reconstruction) and a zero-shot ImageFolder
    `zeroshot/<colour>_<shape>_on_a_<background>_background/` (168 classes, see the module docstring)."""
    from unitok.data import COLORS, SHAPES, render_shape

    names = list(COLORS)
    ev, zs = root / "eval", root / "zeroshot"
    ev.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"ablate-eval/{seed}")
    for i in range(SYNTH_EVAL_IMAGES):
        shape, color = rng.choice(SHAPES), rng.choice(names)
        bg = rng.choice([c for c in names if c != color])
        render_shape(shape, color, bg, size, rng).save(ev / f"{i:05d}.png")
    rng = random.Random(f"ablate-zeroshot/{seed}")
    for color in names:
        for shape in SHAPES:
            for bg in names:
                if bg == color:
                    continue
                d = zs / f"{color}_{shape}_on_a_{bg}_background"
                d.mkdir(parents=True, exist_ok=True)
                for i in range(SYNTH_ZS_PER_CLASS):
                    render_shape(shape, color, bg, size, rng).save(d / f"{i:03d}.png")
    return ev, zs


def synthetic_paths(out_dir: Path) -> dict[str, str]:
    """Where `prepare_synthetic` puts the training shards (a brace pattern) and the eval folders."""
    root = out_dir / "data"
    return {"shards": str(root / "shards" / f"shapes-{{000000..{SYNTH_SHARDS - 1:06d}}}.tar"),
            "eval_images": str(root / "eval"), "zeroshot_dir": str(root / "zeroshot")}


def prepare_synthetic(out_dir: Path, train_size: int, log) -> None:
    """Training shards + eval folders under out_dir/data, rendered at 2x the training size (idempotent)."""
    from unitok.data import write_synthetic_shards

    root = out_dir / "data"
    size = 2 * train_size
    marker = root / "READY.json"
    spec = {"shards": SYNTH_SHARDS, "per_shard": SYNTH_PER_SHARD, "size": size, "eval": SYNTH_EVAL_IMAGES,
            "zs_per_class": SYNTH_ZS_PER_CLASS}
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return
    t = time.time()
    write_synthetic_shards(root / "shards", SYNTH_SHARDS, SYNTH_PER_SHARD, size=size, seed=0)
    write_eval_data(root, size)
    marker.write_text(json.dumps(spec))
    log.info(f"synthetic data: {SYNTH_SHARDS * SYNTH_PER_SHARD} training samples, {SYNTH_EVAL_IMAGES} eval images, "
             f"{SYNTH_ZS_PER_CLASS} x 168 zero-shot images at {size} px under {root} ({time.time() - t:.1f} s)")


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
    classnames: str
    inception_weights: str | None
    eval_batch_size: int
    launcher: str
    ngpu: int
    launcher_args: list[str]
    train_size: int = 0

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
            if self.inception_weights:
                argv += ["--inception-weights", self.inception_weights]
        return argv

    def fingerprint(self, cell: Cell, seed: int) -> dict[str, Any]:
        """What decides a result; paths under out_dir are written relative so the folder can move."""
        def rel(a):
            return a.replace(str(self.out_dir), "$OUT") if isinstance(a, str) else a
        return {"train_argv": [rel(a) for a in self.train_argv(cell, seed)],
                "eval": {"scales": list(self.grid.eval_scales), "images": rel(self.eval_images),
                         "zeroshot_dir": rel(self.zeroshot_dir), "classnames": self.classnames,
                         "inception_weights": self.inception_weights, "train_size": self.train_size}}


def _launcher_cmd(plan: Plan, module: str, argv: list[str]) -> list[str]:
    if plan.launcher == "none":
        return [sys.executable, "-m", module, *argv]
    from runtime.distributed import _free_port

    exe = Path(sys.executable).parent / "deepspeed"
    # unitok.evaluate's parser does not take the launcher's --local_rank (LOCAL_RANK is in the env anyway)
    extra = ["--no_local_rank"] if module == "unitok.evaluate" else []
    return [str(exe) if exe.exists() else "deepspeed", "--num_gpus", str(plan.ngpu), "--master_port",
            str(_free_port()), *plan.launcher_args, *extra, "--module", module, *argv]


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("WANDB_MODE", "disabled")
    import torch

    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed would otherwise look for CUDA
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _run_logged(cmd: list[str], log_path: Path, what: str) -> None:
    with open(log_path, "a") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=_child_env())
    if p.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-25:])
        raise RuntimeError(f"{what} failed with exit code {p.returncode}; full log {log_path}; last lines:\n{tail}")


def _trained(run_dir: Path, total_steps: int) -> bool:
    """The final checkpoint and the export both exist."""
    from runtime.checkpoint import step_name

    latest = run_dir / "latest"
    done = latest.is_file() and latest.read_text().strip() == step_name(total_steps)
    exported = (run_dir / "export" / "model.safetensors").is_file()
    if done and not exported:
        raise RuntimeError(f"{run_dir} holds the final checkpoint but no export (killed while exporting); "
                           f"delete {run_dir} to retrain this cell")
    return done and exported


def evaluate_cell(plan: Plan, export: Path, cell_dir: Path) -> dict[str, Any]:
    """unitok.evaluate at every scale -> flat metrics (`psnr`, `psnr@2x`, `zeroshot_top1`, ...)."""
    metrics: dict[str, Any] = {}
    for s in plan.grid.eval_scales:
        out = cell_dir / f"eval_{s}x"
        argv = plan.eval_argv(export, out, s)
        if plan.launcher == "none":
            from unitok.evaluate import parse_args, run

            with open(cell_dir / "eval.log", "a") as f, contextlib.redirect_stdout(f):
                f.write(f"$ python -m unitok.evaluate {shlex.join(argv)}\n")
                m = run(parse_args(argv))
        else:
            _run_logged(_launcher_cmd(plan, "unitok.evaluate", argv), cell_dir / "eval.log", f"evaluation of {export}")
            m = json.loads((out / "metrics.json").read_text())
        suffix = "" if s == 1 else f"@{s}x"
        for k in (*RECON_KEYS, *ZEROSHOT_KEYS, "zeroshot_classes"):
            if k in m and (s == 1 or k in ("psnr", "ssim")):
                metrics[k + suffix] = m[k]
    return metrics


def run_cell(plan: Plan, cell: Cell, seed: int) -> tuple[dict[str, Any], bool]:
    """Train (or resume) and evaluate one (cell, seed); -> (result, ran). Finished ones are read back."""
    cell_dir = plan.out_dir / "cells" / cell.name / f"seed{seed}"
    result_path = cell_dir / "result.json"
    fp = plan.fingerprint(cell, seed)
    if result_path.is_file():
        result = json.loads(result_path.read_text())
        if result.get("fingerprint") != fp:
            raise ValueError(f"{result_path} was written with other arguments than this run's "
                             f"({result.get('fingerprint')} vs {fp}); use another --out-dir or delete {cell_dir}")
        return result, False
    cell_dir.mkdir(parents=True, exist_ok=True)
    run_dir = cell_dir / "train"
    t0 = time.time()
    if not _trained(run_dir, plan.steps):
        _run_logged(_launcher_cmd(plan, "unitok.train", plan.train_argv(cell, seed)), cell_dir / "train.log",
                    f"training of cell {cell.name} seed {seed}")
        if not (run_dir / "export" / "model.safetensors").is_file():
            raise RuntimeError(f"training of cell {cell.name} seed {seed} wrote no export; "
                               f"see {cell_dir / 'train.log'}")
    t1 = time.time()
    metrics = evaluate_cell(plan, run_dir / "export", cell_dir)
    t2 = time.time()
    last = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line][-1]
    metrics.update(train_loss=last["total"], train_clip=last.get("clip"), train_seconds=round(t1 - t0, 2),
                   eval_seconds=round(t2 - t1, 2))
    result = {"cell": cell.name, "group": cell.group, "seed": seed, "args": cell.args, "report": list(cell.report),
              "metrics": metrics, "fingerprint": fp}
    tmp = result_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, result_path)  # the marker of a finished cell appears whole or not at all
    return result, True


# ---- summary ---------------------------------------------------------------------------------
def summarize(plan: Plan, results: list[dict[str, Any]]) -> dict[str, Any]:
    """Group per cell: mean, std (sample, 0 for one seed), min, max and the values of each metric."""
    import numpy as np

    cells = []
    for cell in plan.grid.cells:
        rs = [r for r in results if r["cell"] == cell.name]
        if not rs:
            continue
        keys = sorted({k for r in rs for k, v in r["metrics"].items() if isinstance(v, (int, float))})
        stats = {}
        for k in keys:
            vals = [float(r["metrics"][k]) for r in rs if isinstance(r["metrics"].get(k), (int, float))]
            a = np.array(vals)
            stats[k] = {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
                        "min": float(a.min()), "max": float(a.max()), "values": vals}
        cells.append({"name": cell.name, "group": cell.group, "note": cell.note, "args": cell.args,
                      "report": list(cell.report), "seeds": [r["seed"] for r in rs], "metrics": stats})
    return {"grid": plan.grid.name, "base_preset": plan.grid.base_preset, "steps": plan.steps, "seeds": plan.seeds,
            "train_size": plan.train_size, "eval_scales": list(plan.grid.eval_scales), "cells": cells}


def _columns(summary: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(metric key, header, report group) of the columns that some cell has."""
    S = summary["train_size"]
    cols = [("psnr", f"PSNR {S}px", "recon")]
    cols += [(f"psnr@{s}x", f"PSNR {S * s}px ({s}x)", "recon") for s in summary["eval_scales"] if s != 1]
    cols += [("ssim", "SSIM", "recon"), ("rfid", "rFID", "recon"), ("mean_usage_pct", "usage %", "recon"),
             ("zeroshot_top1", "zero-shot top-1 %", "zeroshot"), ("zeroshot_top5", "top-5 %", "zeroshot")]
    have = {k for c in summary["cells"] for k in c["metrics"]}
    return [c for c in cols if c[0] in have]


def _fmt(stat: dict[str, float] | None) -> str:
    if stat is None:
        return "-"
    if len(stat["values"]) == 1:
        return f"{stat['mean']:.2f}"
    return f"{stat['mean']:.2f} {PM} {stat['std']:.2f}"


def markdown_table(summary: dict[str, Any]) -> str:
    """The results table: one row per cell, mean +- std over seeds; '-' where the cell does not report it."""
    cols = _columns(summary)
    head = ["cell", "ablation", *[h for _, h, _ in cols], "seeds", "switch"]
    lines = [f"Grid `{summary['grid']}`, preset `{summary['base_preset']}`, {summary['steps']} steps, "
             f"seeds {summary['seeds']}; mean {PM} std over seeds (min/max in results.json). "
             "'-': not reported for that cell (Table 6 reports reconstruction for recon-only and zero-shot "
             "for contrastive-only).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in summary["cells"]:
        row = [c["name"], c["group"]]
        for key, _, group in cols:
            row.append(_fmt(c["metrics"].get(key)) if group in c["report"] else "-")
        row += [str(len(c["seeds"])), c["note"] or " ".join(c["args"]) or "-"]
        lines.append("| " + " | ".join(row) + " |")
    zs = [c["metrics"]["zeroshot_classes"]["mean"] for c in summary["cells"] if "zeroshot_classes" in c["metrics"]]
    if zs:
        lines += ["", f"Zero-shot chance level: {100 / zs[0]:.1f} % top-1 ({int(zs[0])} classes)."]
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: Path) -> bool:
    """Bar charts (mean, std error bars) of reconstruction and zero-shot accuracy per cell -> PNG."""
    try:
        import matplotlib
    except ImportError:
        from runtime.distributed import warn_once

        warn_once("matplotlib is not installed: results.png is not written (pip install matplotlib)")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cells = summary["cells"]
    names = [c["name"] for c in cells]
    y = np.arange(len(cells))
    S = summary["train_size"]

    def series(key, group):
        m = [c["metrics"].get(key) if group in c["report"] else None for c in cells]
        return (np.array([s["mean"] if s else np.nan for s in m]), np.array([s["std"] if s else 0.0 for s in m]))

    panels = [("recon", "PSNR (dB), higher is better",
               [(k, h) for k, h, g in _columns(summary) if k.startswith("psnr")])]
    if any("rfid" in c["metrics"] for c in cells):
        panels.append(("recon", "rFID, lower is better", [("rfid", "rFID")]))
    panels.append(("zeroshot", "zero-shot top-1 (%), higher is better", [("zeroshot_top1", "top-1")]))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 0.45 * len(cells) + 2.2), sharey=True,
                             layout="constrained")
    colors = itertools.count()  # one colour per series across panels, for the shared legend
    for ax, (group, title, keys) in zip(np.atleast_1d(axes), panels):
        h = 0.8 / len(keys)
        for i, (key, label) in enumerate(keys):
            mean, std = series(key, group)
            ok = np.isfinite(mean)
            pos = y - 0.4 + h * (i + 0.5)
            ax.barh(pos[ok], mean[ok], h, xerr=std[ok], label=label, capsize=2, color=f"C{next(colors)}")
            for p in pos[~ok] if i == 0 else []:
                ax.text(0, p + 0.4 - h / 2, " not reported", va="center", fontsize=8, color="gray")
        if group == "zeroshot":
            ncls = [c["metrics"]["zeroshot_classes"]["mean"] for c in cells if "zeroshot_classes" in c["metrics"]]
            if ncls:
                ax.axvline(100 / ncls[0], color="k", ls="--", lw=1, label="chance")
        ax.set_title(title, fontsize=10)
    ax0 = np.atleast_1d(axes)[0]
    ax0.set_yticks(y, names)
    ax0.invert_yaxis()
    fig.suptitle(f"UniTok ablation, grid {summary['grid']}, preset {summary['base_preset']} ({S}px), "
                 f"{summary['steps']} steps, {len(summary['seeds'])} seed(s)", fontsize=10)
    fig.legend(loc="outside lower center", ncol=6, fontsize=8, frameon=False)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_outputs(plan: Plan, results: list[dict[str, Any]]) -> dict[str, Any]:
    """results.json, results.md, results.png under out_dir."""
    summary = summarize(plan, results)
    (plan.out_dir / "results.json").write_text(json.dumps(summary, indent=2))
    (plan.out_dir / "results.md").write_text(markdown_table(summary))
    plot(summary, plan.out_dir / "results.png")
    return summary


# ---- entry -----------------------------------------------------------------------------------
def make_plan(args, user_args: list[str], log) -> Plan:
    """Resolve the grid, the data and every cell's arguments; validate them all before any training."""
    grid = load_grid(args.grid, args.base_preset)
    if args.cells:
        unknown = [c for c in args.cells if c not in {x.name for x in grid.cells}]
        if unknown:
            raise ValueError(f"--cells {unknown} not in grid {grid.name!r}: {[c.name for c in grid.cells]}")
        grid.cells = [c for c in grid.cells if c.name in args.cells]
    if args.steps is not None and args.steps <= 0:
        raise ValueError("--steps must be positive")
    if not args.seeds or len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f"--seeds must be distinct integers, got {args.seeds}")
    if user_args and not user_args[0].startswith("--"):
        raise ValueError(f"unexpected argument {user_args[0]!r}: unitok.train overrides start with '--'")
    out_dir = Path(args.out_dir).resolve()
    for p in (args.eval_images, args.zeroshot_dir):
        if p and not Path(p).is_dir():
            raise ValueError(f"folder not found: {p}")
    if args.inception_weights:
        from unitok.evaluate import check_local_weights

        check_local_weights(args.inception_weights)

    def absolute(p):
        return str(Path(p).resolve()) if p else None

    plan = Plan(grid, out_dir, args.steps or grid.steps, list(args.seeds), list(user_args),
                absolute(args.eval_images), absolute(args.zeroshot_dir), args.classnames,
                absolute(args.inception_weights), args.eval_batch_size, args.launcher, args.ngpu,
                shlex.split(args.launcher_args))
    for where, args_ in [("grid train_args", grid.train_args), ("arguments", user_args),
                         *[(f"cell {c.name!r}", c.args) for c in grid.cells]]:
        flags = {a.split("=")[0].replace("_", "-") for a in args_}
        taken = sorted(flags & set(RESERVED))
        if taken:
            raise ValueError(f"{where}: {taken} are set by unitok.ablate (use --steps, --seeds, --base-preset, "
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
    for cell in grid.cells:
        cfg = check_train_args(plan.train_argv(cell, plan.seeds[0]), f"cell {cell.name!r}")
        if cfg.data.img_size != plan.train_size:
            raise ValueError(f"cell {cell.name!r} changes the training resolution; cells must share it")
    if synthetic and not args.dry_run:
        prepare_synthetic(out_dir, plan.train_size, log)
    return plan


def run(args, user_args: list[str]) -> dict[str, Any]:
    """Run (or resume) the grid; returns the summary."""
    from runtime.log import setup_logging

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = setup_logging(out_dir)
    plan = make_plan(args, user_args, log)
    todo = [(c, s) for c in plan.grid.cells for s in plan.seeds]
    log.info(f"grid {plan.grid.name}: {len(plan.grid.cells)} cells x {len(plan.seeds)} seeds = {len(todo)} runs, "
             f"preset {plan.grid.base_preset}, {plan.steps} steps, launcher {plan.launcher}, out {plan.out_dir}")
    if args.dry_run:
        for c, s in todo:
            cmd = _launcher_cmd(plan, "unitok.train", plan.train_argv(c, s))
            log.info(f"[dry run] {c.name} seed {s}: {shlex.join(cmd)}")
        return {}
    results = []
    t_start = time.time()
    for i, (cell, seed) in enumerate(todo, 1):
        t = time.time()
        result, ran = run_cell(plan, cell, seed)
        results.append(result)
        m = result["metrics"]
        shown = " ".join(f"{k} {m[k]:.2f}" for k in ("psnr", "psnr@2x", "zeroshot_top1") if k in m)
        how = (f"done in {time.time() - t:.0f} s (train {m['train_seconds']:.0f} s, eval {m['eval_seconds']:.0f} s)"
               if ran else "finished before, skipped")
        log.info(f"[{i}/{len(todo)}] {cell.name} seed {seed}: {how} | {shown}")
        write_outputs(plan, results)
    summary = write_outputs(plan, results)
    log.info(f"grid done in {time.time() - t_start:.0f} s -> {plan.out_dir / 'results.md'}\n"
             + markdown_table(summary))
    return summary


def parse_args(argv: list[str] | None = None):
    """-> (known args, unitok.train overrides)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--grid", default="cpu", help="cpu, paper, or a YAML/JSON grid file")
    p.add_argument("--base-preset", help="model preset of every cell (default: the grid's; cpu: debug, paper: large)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, help="optimizer steps per run (default: the grid's)")
    p.add_argument("--cells", nargs="+", help="run only these cells of the grid")
    p.add_argument("--out-dir", default="runs/ablate")
    p.add_argument("--launcher", choices=["none", "deepspeed"], default="none",
                   help="none: one process per run; deepspeed: `deepspeed --num_gpus NGPU` per run")
    p.add_argument("--ngpu", type=int, default=8, help="GPUs per run with --launcher deepspeed")
    p.add_argument("--launcher-args", default="", help="extra deepspeed launcher flags, e.g. '--hostfile H'")
    p.add_argument("--eval-images", help="reconstruction eval folder (default: synthetic)")
    p.add_argument("--zeroshot-dir", help="zero-shot ImageFolder (default: synthetic colour-shape classes)")
    p.add_argument("--classnames", choices=["folders", "imagenet"], default="folders")
    p.add_argument("--inception-weights", help="local Inception weights for rFID/IS")
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--dry-run", action="store_true", help="validate and print the training commands only")
    return p.parse_known_args(argv)


def main(argv: list[str] | None = None) -> None:
    args, user_args = parse_args(argv)
    try:
        run(args, user_args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # user errors and failed runs: no traceback
        raise SystemExit(f"unitok.ablate: error: {e}") from None


if __name__ == "__main__":
    main()
