"""The ablation grid model: cells (the base preset plus one switch), grids, the built-in `cpu` and
`paper` grids, and YAML/JSON grid files with the fields of `Grid` (experiments/ablate.py runs them).

    name: tiny                      # a grid file; every key is a field of Grid or Cell
    steps: 300
    train_args: [--data.local-batch-size, "32"]
    cells:
      - {name: base, group: reference, args: []}
      - {name: recon-only, group: Table 6, args: [--loss.clip, "0"], report: [recon]}
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

REPORTS = ("recon", "zeroshot")
CPU_STEPS, PAPER_STEPS = 500, 10_000
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
