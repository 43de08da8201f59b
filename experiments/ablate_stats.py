"""The paper's claims tested over seeds: Welch's t, CIs of the difference and a verdict per claim.

A claim (experiments/ablate_grid.py) says cell A beats cell B on a metric. With per-seed values a, b:

    d    = mean(a) - mean(b)                (lower-better metric, rFID: mean(b) - mean(a)); d > 0: the paper's way
    se   = sqrt(va/na + vb/nb)              va, vb: sample variances (ddof 1)
    df   = se^4 / ((va/na)^2/(na-1) + (vb/nb)^2/(nb-1))                    Welch-Satterthwaite
    CI90 = d -+ t(0.95, df) * se            two-sided 90 %: its bounds are the two one-sided tests at ALPHA
    CI95 = d -+ t(0.975, df) * se           two-sided 95 % (kept in results.json)
    p    = P(T_df >= d/se)                  one-sided Welch test in the paper's direction
    p_opposite = P(T_df <= d/se)            the same test the other way

Verdict at ALPHA = 0.05: "reproduced" if p < ALPHA, "contradicted" if p_opposite < ALPHA, otherwise "not
resolved at this scale". A one-sided p < 0.05 is exactly a CI90 that excludes 0 on that side, so the report
prints the CI90 beside the verdict (a CI95 could touch 0 beside a "reproduced"). Fewer than 2 seeds on a side:
no test, "not resolved (needs >= 2 seeds)"; a cell that ran without the metric (rFID without
--inception-weights): "not measured"; a cell with no finished seed (failed, or not run yet): "not run"; a
NaN or inf value (a diverged run): no test.
Both sides constant (se = 0, e.g. 100 % usage on every seed): t = 0 if the means are equal (p = 0.5 both
ways, not resolved), else t = +-inf (p = 0 towards the observed difference, 1 against it, CIs = [d, d]):
the seeds show no spread, so the difference is exact at this scale. A side whose values are all equal counts
as exactly constant (variance 0, mean = its value): np.var and np.mean of n equal floats can be off by an
ulp, and two such sides gave a t of order 1 from rounding alone.

A claim of kind "difference" (the paper states no direction, e.g. Table 6 joint vs contrastive-only) gets d,
both CIs and a two-sided p = 2 min(p, p_opposite) in `p`, no `p_opposite` and the verdict "difference only";
it is not one of Holm's tests.

Multiple comparisons: each claim can give a false verdict with probability 2 x ALPHA when there is no real
effect (ALPHA each way), so of m claims about m x ALPHA false "reproduced" and as many false "contradicted"
are expected by chance. `holm` also adjusts all 2m one-sided p-values together (Holm's step-down, which
holds the chance of ANY false verdict at ALPHA under any dependence); `verdict_holm` is the verdict on
those adjusted p-values. The table shows both.
"""
from __future__ import annotations

import math
from typing import Any

from experiments.ablate_grid import Claim

ALPHA = 0.05
REPRODUCED, CONTRADICTED = "reproduced", "contradicted"
UNRESOLVED, FEW_SEEDS, NOT_MEASURED = "not resolved at this scale", "not resolved (needs >= 2 seeds)", "not measured"
NOT_RUN = "not run (a cell has no finished seed)"
NON_FINITE = "not resolved (a seed's value is NaN or inf: a run diverged)"
DIFFERENCE_ONLY = "difference only (no direction claimed)"


def welch(a: list[float], b: list[float]) -> dict[str, Any]:
    """Welch's t-test of mean(a) > mean(b) (>= 2 values each): difference, se, df, t, CI90, CI95, both one-sided
    p."""
    import numpy as np
    from scipy import stats

    a, b = np.asarray(a, float), np.asarray(b, float)
    na, nb = len(a), len(b)
    assert na >= 2 and nb >= 2, "Welch's test needs two values per side"

    def mean_var(x):  # all equal: exactly constant (np.mean/np.var of equal floats can be off by an ulp)
        return (float(x[0]), 0.0) if np.ptp(x) == 0 else (float(x.mean()), float(x.var(ddof=1)))

    (ma, va), (mb, vb) = mean_var(a), mean_var(b)
    d = ma - mb
    ua, ub = va / na, vb / nb  # squared standard errors of the two means
    se = math.sqrt(ua + ub)
    if se == 0.0:  # both sides constant: t = 0 or +-inf (see the module docstring); df and t are left out
        p_greater = 0.5 if d == 0.0 else float(d < 0)
        return {"diff": d, "se": 0.0, "df": None, "t": None, "ci90": [d, d], "ci95": [d, d],
                "p_greater": p_greater, "p_less": 1.0 - p_greater, "constant": True}
    df = (ua + ub) ** 2 / (ua ** 2 / (na - 1) + ub ** 2 / (nb - 1))
    t = d / se
    h90, h95 = (float(stats.t.ppf(1 - alpha / 2, df)) * se for alpha in (2 * ALPHA, ALPHA))
    return {"diff": d, "se": se, "df": float(df), "t": t, "ci90": [d - h90, d + h90], "ci95": [d - h95, d + h95],
            "p_greater": float(stats.t.sf(t, df)), "p_less": float(stats.t.cdf(t, df)), "constant": False}


def verdict(p: float | None, p_opposite: float | None, alpha: float = ALPHA) -> str:
    """reproduced / contradicted / not resolved at this scale from the two one-sided p-values."""
    if p is None or p_opposite is None:
        return FEW_SEEDS
    if p < alpha:
        return REPRODUCED
    if p_opposite < alpha:
        return CONTRADICTED
    return UNRESOLVED


def holm(ps: list[float]) -> list[float]:
    """Holm-adjusted p-values, in the input order: sorted ascending, p_(i) -> max_{j<=i} min(1, (m-j+1) p_(j)).
    A NaN counts as 1 (sorted with NaN keys, and min(1, nan) = 1, it made every later p 1)."""
    ps = [1.0 if math.isnan(p) else p for p in ps]
    m = len(ps)
    out = [0.0] * m
    running = 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda i: ps[i])):
        running = max(running, min(1.0, (m - rank) * ps[i]))
        out[i] = running
    return out


def _side(cell: dict[str, Any] | None, metric: str) -> dict[str, Any]:
    """n, mean, sample std (None below 2 values) and the values of one cell's metric."""
    import numpy as np

    vals = cell["metrics"][metric]["values"] if cell and metric in cell["metrics"] else []
    return {"n": len(vals), "mean": float(np.mean(vals)) if vals else None,
            "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else None, "values": list(vals)}


def evaluate_claims(claims: list[Claim], cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per claim from the summary's cells (name -> metrics -> values over seeds)."""
    by_name = {c["name"]: c for c in cells}
    out = []
    for c in claims:
        sides = {k: _side(by_name.get(name), c.metric) for k, name in (("better", c.better), ("other", c.other))}
        rec: dict[str, Any] = {
            "name": c.name, "source": c.source, "statement": c.statement, "metric": c.metric,
            "direction": c.direction, "better": {"cell": c.better, **sides["better"]},
            "other": {"cell": c.other, **sides["other"]}, "kind": c.kind, "diff": None, "ci90": None, "ci95": None,
            "df": None, "t": None, "p": None, "p_opposite": None}
        ran = {n: by_name[n]["seeds"] if n in by_name else [] for n in (c.better, c.other)}
        ran_without = [n for n in (c.better, c.other) if ran[n] and c.metric not in by_name[n]["metrics"]]
        if not all(ran.values()):
            rec["verdict"] = NOT_RUN
        elif ran_without:
            rec["verdict"] = NOT_MEASURED
        elif not all(math.isfinite(v) for k in ("better", "other") for v in sides[k]["values"]):
            rec["verdict"] = NON_FINITE  # no test: a NaN mean or variance would give a NaN p
        else:
            sign = 1.0 if c.direction == "higher" else -1.0  # lower-better: negate, so d > 0 is the paper's way
            a, b = ([sign * v for v in sides[k]["values"]] for k in ("better", "other"))
            if a and b:
                rec["diff"] = sum(a) / len(a) - sum(b) / len(b)
            if len(a) >= 2 and len(b) >= 2:
                w = welch(a, b)
                rec.update(diff=w["diff"], ci90=w["ci90"], ci95=w["ci95"], df=w["df"], t=w["t"], p=w["p_greater"],
                           p_opposite=w["p_less"])
            rec["verdict"] = verdict(rec["p"], rec["p_opposite"])
            if c.kind == "difference" and rec["p"] is not None:
                rec.update(p=min(1.0, 2 * min(rec["p"], rec["p_opposite"])), p_opposite=None,
                           verdict=DIFFERENCE_ONLY)
        out.append(rec)
    tested = [r for r in out if r["p_opposite"] is not None]
    adjusted = holm([r["p"] for r in tested] + [r["p_opposite"] for r in tested])
    for r, p, q in zip(tested, adjusted[:len(tested)], adjusted[len(tested):]):
        r.update(p_holm=p, p_opposite_holm=q, verdict_holm=verdict(p, q))
    for r in out:
        if r["p_opposite"] is None:
            r.update(p_holm=None, p_opposite_holm=None, verdict_holm=r["verdict"])
    return out
