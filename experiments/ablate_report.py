"""The ablation grid's results: per-cell statistics over seeds, the claim tests, the markdown tables and the plot.

    OUT_DIR/results.json   per cell: mean, std, min, max and the values over seeds, the seeds whose run failed
                           and the results' code versions (git SHAs); `claims`: one record per claim of the grid
                           (experiments/ablate_stats.py)
    OUT_DIR/results.md     the cell table (mean +- std) and the claim table (difference, CI90, p, verdict)
    OUT_DIR/results.png    reconstruction (PSNR at 1x and 2x, rFID) and understanding (zero-shot and
                           linear-probe top-1) per cell
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:
    from experiments.ablate import Plan

PM = "\u00b1"  # the plus-minus sign of the markdown table


# ---- summary ---------------------------------------------------------------------------------
def metric_stats(vals: list[float]) -> dict[str, Any]:
    """One metric over the seeds: mean, std (sample; None for one seed: no spread was measured), min, max and
    the values."""
    import numpy as np

    a = np.array(vals, dtype=float)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else None, "min": float(a.min()),
            "max": float(a.max()), "values": vals}


def summarize(plan: Plan, results: list[dict[str, Any]], failed: Iterable[tuple[str, int]] = ()) -> dict[str, Any]:
    """Group per cell: `metric_stats` of each metric, over the grid's cells that this run trains or that have a
    result or a failed run (`failed`: (cell, seed)s). A cell of this run with no result yet (failed, or not run)
    is kept with no seeds, so the tables show it. Seeds are in ascending order; `failed_seeds` are the cell's
    failed runs, `git_shas` the code versions of its results (train/config.json's)."""
    from experiments.ablate_grid import present_claims

    results = sorted(results, key=lambda r: r["seed"])
    failed = sorted(failed, key=lambda x: x[1])
    names = {c.name for c in plan.run_cells} | {r["cell"] for r in results} | {c for c, _ in failed}
    shown = [c for c in plan.grid.cells if c.name in names]
    cells = []
    for cell in shown:
        rs = [r for r in results if r["cell"] == cell.name]
        keys = sorted({k for r in rs for k, v in r["metrics"].items() if isinstance(v, (int, float))})
        stats = {}
        for k in keys:
            stats[k] = metric_stats([float(r["metrics"][k]) for r in rs
                                     if isinstance(r["metrics"].get(k), (int, float))])
        cells.append({"name": cell.name, "group": cell.group, "note": cell.note, "args": cell.args,
                      "report": list(cell.report), "seeds": [r["seed"] for r in rs],
                      "failed_seeds": [s for c, s in failed if c == cell.name],
                      "git_shas": sorted({r["git_sha"] for r in rs if r.get("git_sha")}), "metrics": stats})
    from experiments.ablate_stats import evaluate_claims

    seeds = sorted({*plan.seeds, *(r["seed"] for r in results)})
    return {"grid": plan.grid.name, "base_preset": plan.grid.base_preset, "steps": plan.steps, "seeds": seeds,
            "train_size": plan.train_size, "eval_scales": list(plan.grid.eval_scales), "cells": cells,
            "claims": evaluate_claims(present_claims(plan.grid.claims, shown), cells)}


def _columns(summary: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(metric key, header, report group) of the columns that some cell has."""
    S = summary["train_size"]
    cols = [("psnr", f"PSNR {S}px", "recon")]
    cols += [(f"psnr@{s}x", f"PSNR {S * s}px ({s}x)", "recon") for s in summary["eval_scales"] if s != 1]
    cols += [("ssim", "SSIM", "recon"), ("rfid", "rFID", "recon"), ("mean_usage_pct", "usage %", "recon"),
             ("zeroshot_top1", "zero-shot top-1 %", "zeroshot"), ("zeroshot_top5", "top-5 %", "zeroshot"),
             ("probe_top1", "probe top-1 %", "zeroshot")]
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
             "for contrastive-only); seeds: how many finished, and the seeds whose run failed (left out; "
             "failed.json in the run's folder names its log); 0 seeds: none finished (see log.txt).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in summary["cells"]:
        row = [c["name"], c["group"]]
        for key, _, group in cols:
            row.append(_fmt(c["metrics"].get(key)) if group in c["report"] else "-")
        bad = ", ".join(map(str, c["failed_seeds"]))
        row += [f"{len(c['seeds'])} (failed: seed {bad})" if bad else str(len(c["seeds"])),
                c["note"] or " ".join(c["args"]) or "-"]
        lines.append("| " + " | ".join(row) + " |")
    for c in summary["cells"]:
        if len(c["git_shas"]) > 1:
            lines += ["", f"Warning: cell {c['name']} pools results of {len(c['git_shas'])} code versions (git "
                          f"{', '.join(sha[:10] for sha in c['git_shas'])}): its spread, and its differences to "
                          "other cells, may be the code's (result.json's git_sha per seed)."]
    for key, what in (("zeroshot_classes", "Zero-shot"), ("probe_classes", "Linear-probe")):
        n = [c["metrics"][key]["mean"] for c in summary["cells"] if key in c["metrics"]]
        if n:
            lines += ["", f"{what} chance level: {100 / n[0]:.1f} % top-1 ({int(n[0])} classes)."]
    return "\n".join(lines) + "\n"


def _side(s: dict[str, Any]) -> str:
    if s["n"] == 0:
        return f"{s['cell']}: -"
    spread = f" {PM} {s['std']:.2f}" if s["std"] is not None else ""
    return f"{s['cell']}: {s['mean']:.2f}{spread} (n {s['n']})"


def _p(p: float | None) -> str:
    return "-" if p is None else ("< 0.001" if p < 0.001 else f"{p:.3f}")


def claims_table(summary: dict[str, Any]) -> str:
    """The claim table: per claim both sides, the difference with its CI90, p and the verdicts."""
    from experiments.ablate_stats import ALPHA

    claims = summary.get("claims", [])
    if not claims:
        return ""
    shown = [c for c in claims if c["verdict"] != "not measured"]
    tested = sum(c["p_opposite"] is not None for c in claims)
    level = round(100 * (1 - 2 * ALPHA))
    head = ["claim", "source", "metric", "paper's better side", "other side", f"difference [{level} % CI]", "p",
            "verdict", "after Holm"]
    lines = ["## The paper's claims", "",
             "Difference = the paper's better side minus the other (for lower-better metrics such as rFID, the "
             f"other minus the better), so > 0 is the paper's direction; {level} % Welch-Satterthwaite CI, "
             f"whose bounds are the two one-sided tests at {ALPHA}: a verdict comes exactly with a CI that "
             f"excludes 0 on its side (the 95 % CI, wider, is in results.json). "
             f"p: one-sided Welch t-test in the paper's direction. Verdict: reproduced if p < {ALPHA}, "
             f"contradicted if the opposite one-sided test has p < {ALPHA}, else not resolved at this scale "
             "(fewer than 2 seeds on a side: no test). Both sides constant over seeds: an exact difference "
             "(p 0 or 1; equal values: 0.5). 'difference only': the paper claims no direction there, so p is "
             "two-sided and there is no verdict. "
             f"{tested} claims were tested: with no real effect anywhere, about {tested * ALPHA:.1f} false "
             f"'reproduced' and as many false 'contradicted' are expected by chance at {ALPHA}; 'after Holm' "
             f"is the verdict on Holm-adjusted p over all {2 * tested} one-sided tests (family-wise error "
             f"{ALPHA}).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in shown:
        diff = "-" if c["diff"] is None else f"{c['diff']:+.2f}"
        if c["ci90"] is not None:
            diff += f" [{c['ci90'][0]:+.2f}, {c['ci90'][1]:+.2f}]"
        p = _p(c["p"]) + (" (two-sided)" if c["p"] is not None and c["p_opposite"] is None else "")
        lines.append("| " + " | ".join([
            c["name"], c["source"], f"{c['metric']} ({c['direction']} better)", _side(c["better"]),
            _side(c["other"]), diff, p, c["verdict"], c["verdict_holm"]]) + " |")
    statements = dict.fromkeys((c["name"].split("/")[0], c["statement"]) for c in shown)  # once per claim
    lines += ["", "What each claim says (the paper's numbers):", ""] + [f"- `{n}`: {st}" for n, st in statements]
    missing = [c["name"] for c in claims if c["verdict"] == "not measured"]
    if missing:
        lines += ["", f"Not measured in this grid (a cell ran without the metric; rFID needs "
                      f"--inception-weights): {', '.join(missing)}."]
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: Path) -> bool:
    """Bar charts (mean, std error bars) of reconstruction and understanding accuracy per cell -> PNG; none (False)
    before a run has finished (only failed ones, so far)."""
    if not any(c["metrics"] for c in summary["cells"]):
        return False
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
        # std None: one seed, no error bar
        return (np.array([s["mean"] if s else np.nan for s in m]),
                np.array([(s["std"] or 0.0) if s else 0.0 for s in m]))

    panels = [("recon", "PSNR (dB), higher is better",
               [(k, h) for k, h, g in _columns(summary) if k.startswith("psnr")])]
    if any("rfid" in c["metrics"] for c in cells):
        panels.append(("recon", "rFID, lower is better", [("rfid", "rFID")]))
    understanding = [("zeroshot_top1", "zero-shot top-1")]
    if any("probe_top1" in c["metrics"] for c in cells):
        understanding.append(("probe_top1", "linear-probe top-1"))
    panels.append(("zeroshot", "understanding top-1 (%), higher is better", understanding))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 0.45 * len(cells) + 2.2), sharey=True,
                             layout="constrained")
    colors = itertools.count()  # one colour per series across panels, for the shared legend
    for ax, (group, title, keys) in zip(np.atleast_1d(axes), panels):
        h = 0.8 / len(keys)
        for i, (key, label) in enumerate(keys):
            mean, std = series(key, group)
            ok = np.isfinite(mean)
            pos = y - 0.4 + h * (i + 0.5)
            ax.barh(pos[ok], mean[ok], h, xerr=std[ok], label=label if ok.any() else "_nolegend_", capsize=2,
                    color=f"C{next(colors)}")
            # x in axes coordinates: at data x = 0 the note lay outside a panel whose only artist is the chance
            # line (a grid whose finished cells all skip zero-shot), and the layout collapsed the axes
            for p in pos[~ok] if i == 0 else []:
                ax.text(0.01, p + 0.4 - h / 2, "not reported", va="center", fontsize=8, color="gray",
                        transform=ax.get_yaxis_transform())
        if group == "zeroshot":
            ncls = [c["metrics"]["zeroshot_classes"]["mean"] for c in cells if "zeroshot_classes" in c["metrics"]]
            if ncls:
                ax.axvline(100 / ncls[0], color="k", ls="--", lw=1, label="chance")
        ax.set_xlim(left=0)  # every plotted metric is >= 0
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


def write_outputs(plan: Plan, results: list[dict[str, Any]],
                  failed: Iterable[tuple[str, int]] = ()) -> dict[str, Any]:
    """results.json, results.md, results.png under out_dir; `failed`: the (cell, seed)s whose run failed."""
    summary = summarize(plan, results, failed)
    (plan.out_dir / "results.json").write_text(json.dumps(summary, indent=2))
    (plan.out_dir / "results.md").write_text(markdown_table(summary) + "\n" + claims_table(summary))
    plot(summary, plan.out_dir / "results.png")
    return summary
