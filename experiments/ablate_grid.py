"""The ablation grid model: cells (the base preset plus one switch), the paper's claims as comparisons of
two cells, grids, the built-in `cpu` and `paper` grids, and YAML/JSON grid files with the fields of
`Grid` (experiments/ablate.py runs them; experiments/ablate_stats.py tests the claims).

    name: tiny                      # a grid file; every key is a field of Grid, Cell or Claim
    steps: 300
    train_args: [--data.local-batch-size, "32"]
    cells:
      - {name: base, group: reference, args: []}
      - {name: recon-only, group: Table 6, args: [--loss.clip, "0"], report: [recon]}
    claims:                         # optional, in addition to the paper's (`paper_claims`)
      - {name: my-claim, source: mine, statement: "joint beats recon-only at 2x", better: base,
         other: recon-only, metric: psnr@2x}   # direction: the metric's own (rfid: lower) if left out

The paper's claims are found by cell name: every grid, a file's too, gets those of `paper_claims`
whose two cells it has (for the Table 8 names, from the base preset's K x V and total K*V entries).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

REPORTS = ("recon", "zeroshot")
CPU_STEPS, PAPER_STEPS = 1000, 10_000
LOWER_IS_BETTER = ("rfid",)  # every other metric of the grid (PSNR, SSIM, usage, accuracies) is higher-better
CLAIM_KINDS = ("directional", "difference")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def metric_direction(metric: str) -> str:
    """'lower' for a lower-is-better metric (rFID), else 'higher'."""
    return "lower" if metric in LOWER_IS_BETTER else "higher"


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
class Claim:
    """A finding of the paper as a one-sided comparison: cell `better` beats cell `other` on `metric` (or, for
    kind 'difference', their difference reported without a verdict)."""

    name: str
    """Unique in the grid, e.g. 'table8-8v4/psnr'."""
    source: str
    """Where it is stated, e.g. 'Table 8', 'issue #5'."""
    statement: str
    """The finding in a few words, with the paper's numbers."""
    better: str
    """The cell the paper finds better."""
    other: str
    """The cell it is compared with."""
    metric: str
    """A per-seed result key of experiments.ablate, e.g. psnr, psnr@2x, rfid, mean_usage_pct, zeroshot_top1,
    probe_top1."""
    direction: Literal["higher", "lower"] | None = None
    """Which way `metric` is better: higher, or lower (rFID). None: the metric's own (`metric_direction`); a
    direction against it is refused (a file's rFID claim was tested as higher-better and read 'contradicted')."""
    kind: Literal["directional", "difference"] = "directional"
    """directional: a one-sided test and a verdict; difference: the paper claims no direction (its numbers split
    both ways), so only the difference, its CIs and a two-sided p are reported, with no verdict."""

    def __post_init__(self):
        for f in ("name", "source", "statement", "better", "other", "metric"):
            if not isinstance(getattr(self, f), str) or not getattr(self, f):
                raise ValueError(f"claim {self.name!r}: {f} must be a non-empty string, got {getattr(self, f)!r}")
        known = metric_direction(self.metric)
        if self.direction is None:
            self.direction = known
        if self.direction not in ("higher", "lower"):
            raise ValueError(f"claim {self.name!r}: direction must be 'higher' or 'lower', got {self.direction!r}")
        if self.direction != known:
            raise ValueError(f"claim {self.name!r}: {self.metric} is {known}-is-better, but the claim says direction "
                             f"{self.direction!r}; leave direction out")
        if self.kind not in CLAIM_KINDS:
            raise ValueError(f"claim {self.name!r}: kind must be one of {list(CLAIM_KINDS)}, got {self.kind!r}")
        if self.better == self.other:
            raise ValueError(f"claim {self.name!r}: compares cell {self.better!r} with itself")


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
    claims: list[Claim] = field(default_factory=list)
    """The comparisons tested over seeds; each names two cells of this grid."""

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
        names = [c.name for c in self.claims]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"grid {self.name!r}: duplicate claim names {dup}")
        cells = {c.name for c in self.cells}
        for c in self.claims:
            missing = [x for x in (c.better, c.other) if x not in cells]
            if missing:
                raise ValueError(f"grid {self.name!r}: claim {c.name!r} names cells {missing} that the grid does "
                                 f"not have; cells: {sorted(cells)}")


def _q(kind: str, k: int, v: int) -> list[str]:
    return ["--model.quantizer.kind", kind, "--model.quantizer.num-codebooks", str(k),
            "--model.quantizer.codebook-size", str(v)]


def table8_cell(k: int, total: int, K: int, V: int) -> str:
    """The cell with k codebooks of total/k entries: 'base' at the base's K x V, else mcq-kxV' / single-1xN."""
    if (k, total // k) == (K, V):
        return "base"
    return f"single-1x{total}" if k == 1 else f"mcq-{k}x{total // k}"


def _common_cells(K: int, V: int, total: int, latent_dim: int, base_note: str) -> list[Cell]:
    """base, Table 8 at `total` entries, Table 7, Fig. 3, causal, Table 6."""
    cells = [Cell("base", "reference", [], note=base_note)]
    for k in (8, 4, 2):
        if total % k or latent_dim % k:
            continue
        if table8_cell(k, total, K, V) == "base":
            continue  # that shape is the base cell itself
        cells.append(Cell(table8_cell(k, total, K, V), "Table 8", _q("mcq", k, total // k),
                          note=f"MCQ {k} sub-codebooks, {total} entries in all"))
    cells += [
        Cell(table8_cell(1, total, K, V), "Table 8", _q("single", 1, total), note=f"one codebook of {total} entries"),
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


RECON_METRICS = ("psnr", "rfid")  # rFID only where the grid runs with --inception-weights
UNDERSTANDING_METRICS = ("zeroshot_top1", "probe_top1")
TABLE8_NUMBERS = {8: (0.33, 46.1), 4: (0.54, 44.7), 2: (0.98, 43.9), 1: (1.50, 41.0)}  # k -> (rFID, zero-shot %)


def _claims(name: str, source: str, statement: str, better: str, other: str, metrics: tuple[str, ...],
            kind: str = "directional") -> list[Claim]:
    return [Claim(f"{name}/{m}", source, statement, better, other, m, kind=kind) for m in metrics]


def paper_claims(K: int, V: int, total: int) -> list[Claim]:
    """The paper's tokenizer claims (REFERENCE.md 1.4) over the cells `_common_cells(K, V, total)` names.

    Table 6 against recon-only is tested one-sided for joint training, which is ahead on every column of the
    paper. Against contrastive-only the paper's columns split (joint ahead on VQAv2 by 0.19, behind on the
    other five): it finds joint training costs understanding little, not that it helps, so that comparison
    is kind 'difference' (no verdict).
    """
    claims = [
        *_claims("table6-joint-vs-recon-only", "Table 6", "recon + contrastive reconstructs no worse than "
                 "recon only (rFID 0.72 vs 0.82); tested: joint better", "base", "recon-only", RECON_METRICS),
        *_claims("table6-joint-vs-contrastive-only", "Table 6", "recon + contrastive understands about as well as "
                 "contrastive only (VQAv2 69.14 vs 68.95, but behind on GQA, SciQA, TextVQA, POPE and MME, "
                 "1333 vs 1373); no direction claimed: difference only, no verdict", "base", "contrastive-only",
                 UNDERSTANDING_METRICS, kind="difference"),
        *_claims("table7-mcq-vs-rq", "Table 7", "MCQ reconstructs better than RQ (rFID 0.55 vs 3.46)", "base",
                 f"rq-{K}x{V}", RECON_METRICS),
        *_claims("table7-mcq-vs-rq", "Table 7", "MCQ understands better than RQ (zero-shot 63.7 vs 58.8)", "base",
                 f"rq-{K}x{V}", UNDERSTANDING_METRICS),
    ]
    for hi, lo in ((8, 4), (4, 2), (2, 1)):  # adjacent pairs of the Table 8 chain
        (rh, zh), (rl, zl) = TABLE8_NUMBERS[hi], TABLE8_NUMBERS[lo]
        claims += _claims(f"table8-{hi}v{lo}", "Table 8", f"{hi} sub-codebooks beat {lo} at fixed total entries "
                          f"(at 16384: rFID {rh:.2f} vs {rl:.2f}, zero-shot {zh:.1f} vs {zl:.1f})",
                          table8_cell(hi, total, K, V), table8_cell(lo, total, K, V),
                          RECON_METRICS + UNDERSTANDING_METRICS)
    claims += [
        *_claims("usage-mcq-vs-single", "issue #5", f"MCQ ({K} codebooks) keeps codebook usage where one codebook "
                 f"of {total} collapses (above ~16k codes at 64-d)", table8_cell(K, total, K, V),
                 table8_cell(1, total, K, V), ("mean_usage_pct",)),
        *_claims("fig3-attention-vs-linear", "Fig. 3", "attention projections recover understanding that linear "
                 "ones lose", "base", "linear-proj", UNDERSTANDING_METRICS),
        *_claims("full-vs-causal", "README 2025-04-02", "full-attention projection gives better downstream "
                 "results than causal", "base", "causal-proj", UNDERSTANDING_METRICS),
    ]
    return claims


def present_claims(claims: list[Claim], cells: list[Cell]) -> list[Claim]:
    """The claims whose two cells are both in `cells`."""
    names = {c.name for c in cells}
    return [c for c in claims if c.better in names and c.other in names]


def cpu_grid(base_preset: str) -> Grid:
    """The CPU-sized grid on synthetic shapes (see the module docstring for its time budget)."""
    from unitok.config import preset

    q = preset(base_preset).quantizer
    K, V = q.num_codebooks, q.codebook_size
    note = f"MCQ {K}x{V}, attention projection (full), recon + contrastive"
    cells = _common_cells(K, V, K * V, q.latent_dim, note)
    return Grid("cpu", cells, base_preset=base_preset, steps=CPU_STEPS,
                # fused AdamW: the debug tokenizer's optimizer step is a quarter of its training step on CPU
                train_args=["--data.local-batch-size", "32", "--data.num-workers", "0", "--gan.no-enabled",
                            "--loss.lpips", "0", "--log-every", "25", "--keep-last", "1", "--optim.fused"],
                claims=present_claims(paper_claims(K, V, K * V), cells))


def paper_grid(base_preset: str) -> Grid:
    """The paper-scale grid (GPU; real data and pretrained LPIPS/DINO/Inception weights required)."""
    from unitok.config import preset

    q = preset(base_preset).quantizer
    K, V = q.num_codebooks, q.codebook_size
    note = f"MCQ {K}x{V}, attention projection (full), recon + contrastive, GAN"
    cells = _common_cells(K, V, 16384, q.latent_dim, note)  # Table 8 is at 16384 entries, as in the paper
    return Grid("paper", cells, base_preset=base_preset, steps=PAPER_STEPS, needs_user_data=True,
                train_args=["--log-every", "50", "--save-every", "1000"],
                claims=present_claims(paper_claims(K, V, 16384), cells))


GRID_KEYS = {f.name for f in dataclasses.fields(Grid)}
CELL_KEYS = {f.name for f in dataclasses.fields(Cell)}
CLAIM_KEYS = {f.name for f in dataclasses.fields(Claim)}
CLAIM_REQUIRED = {f.name for f in dataclasses.fields(Claim) if f.default is dataclasses.MISSING}


def _load_claims(path: Path, raw) -> list[Claim]:
    """A grid file's `claims:` list -> Claims; any problem is a ValueError naming the file."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ValueError(f"{path}: 'claims' must be a list of mappings with keys {sorted(CLAIM_KEYS)}")
    claims = []
    for i, c in enumerate(raw):
        if not isinstance(c, dict):
            raise ValueError(f"{path}: claim #{i} must be a mapping with keys {sorted(CLAIM_KEYS)}")
        label = repr(c.get("name", f"#{i}"))
        if set(c) - CLAIM_KEYS:
            raise ValueError(f"{path}: claim {label}: unknown keys {sorted(set(c) - CLAIM_KEYS)}; allowed "
                             f"{sorted(CLAIM_KEYS)}")
        if CLAIM_REQUIRED - set(c):
            raise ValueError(f"{path}: claim {label}: missing keys {sorted(CLAIM_REQUIRED - set(c))}")
        try:
            claims.append(Claim(**c))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    return claims


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
    kw = {k: v for k, v in raw.items() if k not in ("cells", "claims")}
    kw.setdefault("name", path.stem)
    if "train_args" in kw:
        if not isinstance(kw["train_args"], list):
            raise ValueError(f"{path}: train_args must be a list of strings")
        kw["train_args"] = [str(a) for a in kw["train_args"]]
    if base_preset:
        kw["base_preset"] = base_preset
    from unitok.config import preset

    try:
        q = preset(kw.get("base_preset", Grid.base_preset)).quantizer
        claims = present_claims(paper_claims(q.num_codebooks, q.codebook_size, q.num_codebooks * q.codebook_size),
                                cells) + _load_claims(path, raw.get("claims"))
        return Grid(cells=cells, claims=claims, **kw)
    except (ValueError, TypeError) as e:  # name the file, once
        msg = str(e)
        raise ValueError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None
