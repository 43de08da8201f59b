"""`experiments.ablate`: a 2-cell grid end to end on CPU (single process): kill and resume, skipping finished
cells, results files; grid validation."""
import json
import re
import warnings
from unittest import mock

import numpy as np
import pytest

from experiments import ablate, ablate_grid


def _args(out, grid, *extra):
    return ["--grid", str(grid), "--base-preset", "debug", "--seeds", "0", "--out-dir", str(out), *extra]


def _write_grid(path, cells, **top):
    import yaml

    spec = {"name": "tiny", "steps": 3, "train_args": ["--data.local-batch-size", "4", "--data.num-workers", "0",
                                                       "--gan.no-enabled", "--loss.lpips", "0", "--log-every", "1"],
            "cells": cells, **top}
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.slow
def test_two_cell_grid_runs_end_to_end_and_skips_finished_cells(tmp_path):
    grid = _write_grid(tmp_path / "grid.yaml", [
        {"name": "base", "group": "reference", "args": []},
        {"name": "recon-only", "group": "Table 6", "args": ["--loss.clip", "0"], "report": ["recon"]},
    ])
    out = tmp_path / "out"
    # a training killed (kill -9) after step 2 of 3 is a failed run with a half-trained cell; the next run with
    # --retry-failed resumes it (a rerun without skips it)
    with pytest.raises(RuntimeError, match=r"1 of the 1 runs failed: base seed 0 \(exit code -?\d+, log .*train\.log"):
        ablate.run(*ablate.parse_args(_args(out, grid, "--cells", "base", "--debug.kill-at-step", "2")))
    assert (out / "cells" / "base" / "seed0" / "train" / "latest").read_text() == "step-00000002"
    assert (out / "cells" / "base" / "seed0" / "failed.json").is_file()
    # resumes one, trains the other beside it
    summary = ablate.run(*ablate.parse_args(_args(out, grid, "--jobs", "2", "--retry-failed")))
    assert not (out / "cells" / "base" / "seed0" / "failed.json").exists()
    assert "resumed from" in (out / "cells" / "base" / "seed0" / "train.log").read_text()
    steps = [json.loads(x)["step"] for x in (out / "cells" / "base" / "seed0" / "train" / "metrics.jsonl").open()]
    assert steps == [1, 2, 3]

    # every cell: trained, exported, evaluated at 32 px and 64 px (2x), zero-shot and probe on the synthetic folder
    assert [c["name"] for c in summary["cells"]] == ["base", "recon-only"]
    for c in summary["cells"]:
        m = c["metrics"]
        # the summary carries each seed's own evaluation and the trainer's last loss, unchanged
        result = json.loads((out / "cells" / c["name"] / "seed0" / "result.json").read_text())
        seed0 = result["metrics"]
        assert result["host"] and seed0["train_seconds"] > 0  # a run's time says what it ran on
        # the trainer's own record: one rank, batch 4, the checkout's commit (or 'unknown' outside git)
        assert (result["world_size"], result["global_batch"]) == (1, 4) and result["git_sha"]
        run_dir = out / "cells" / c["name"] / "seed0" / "train"
        last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
        assert m["train_loss"]["values"] == [last["loss"]] and seed0["train_loss"] == last["loss"]
        for k in ("psnr", "psnr@2x", "ssim", "mean_usage_pct", "zeroshot_top1", "zeroshot_top5", "probe_top1"):
            assert m[k]["values"] == [seed0[k]] and m[k]["mean"] == seed0[k], (c["name"], k)
        evaluated = json.loads((out / "cells" / c["name"] / "seed0" / "eval_1x" / "metrics.json").read_text())
        assert seed0["psnr"] == evaluated["psnr"] and 0 < seed0["psnr"] < 60 and 0 < seed0["psnr@2x"] < 60
        assert m["zeroshot_classes"]["mean"] == 54 and c["seeds"] == [0]  # the synthetic world's scenes
        assert m["probe_classes"]["mean"] == 54 and 0 <= seed0["probe_top1"] <= 100
        assert (run_dir / "export" / "model.safetensors").is_file()
        assert (run_dir / "latest").read_text() == "step-00000003"
    cfg = json.loads((out / "cells" / "recon-only" / "seed0" / "train" / "config.json").read_text())["config"]
    assert cfg["loss"]["clip"] == 0.0 and cfg["gan"]["enabled"] is False and cfg["total_steps"] == 3

    # results: JSON, markdown table (recon-only hides zero-shot), plot
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    table = (out / "results.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| recon-only "))
    assert row.split("|")[-5].strip() == row.split("|")[-4].strip() == "-"  # the zero-shot top-5 and probe columns
    assert "PSNR 64px (2x)" in table and "| base | reference |" in table
    # the claims of these two cells (Table 6, joint vs recon-only): one seed tests nothing; no rFID was measured
    claims = {c["name"]: c for c in summary["claims"]}
    assert set(claims) == {"table6-joint-vs-recon-only/psnr", "table6-joint-vs-recon-only/rfid"}
    psnr = claims["table6-joint-vs-recon-only/psnr"]
    assert psnr["verdict"] == "not resolved (needs >= 2 seeds)" and psnr["p"] is None
    assert psnr["better"]["values"] == summary["cells"][0]["metrics"]["psnr"]["values"]
    assert claims["table6-joint-vs-recon-only/rfid"]["verdict"] == "not measured"
    claim_rows = table.split("## The paper's claims")[1].splitlines()
    assert sum("| Table 6 | psnr" in r and "not resolved (needs >= 2 seeds)" in r for r in claim_rows) == 1
    try:
        import matplotlib  # noqa: F401
        assert (out / "results.png").stat().st_size > 1000
    except ImportError:
        assert not (out / "results.png").exists()

    # rerun: finished cells are read back, nothing is trained or evaluated again
    stamp = (out / "cells" / "base" / "seed0" / "result.json").stat().st_mtime_ns
    with mock.patch.object(ablate, "run_logged", side_effect=AssertionError("trained again")), \
            mock.patch.object(ablate, "evaluate_cell", side_effect=AssertionError("evaluated again")):
        again = ablate.run(*ablate.parse_args(_args(out, grid)))
    assert again == summary
    assert (out / "cells" / "base" / "seed0" / "result.json").stat().st_mtime_ns == stamp

    # a finished cell is never reused for different arguments
    with pytest.raises(ValueError, match="other arguments"):
        ablate.run(*ablate.parse_args(_args(out, grid, "--steps", "4")))


@pytest.mark.parametrize("cells", [["recon-only"], ["recon-only", "base"]])
def test_plot_of_cells_without_zero_shot_keeps_its_layout(tmp_path, cells):
    """The grid writes its plot after every finished cell. When the finished cells all skip zero-shot (a
    reconstruction-only cell that ended first), the understanding panel has only the chance line and the
    'not reported' notes; the plot must still lay out (matplotlib warned that the axes collapsed to zero)."""
    pytest.importorskip("matplotlib")
    from experiments import ablate_report

    stat = ablate_report.metric_stats
    understanding = {"zeroshot_top1": stat([2.2, 2.9]), "probe_top1": stat([20.2, 21.0]),
                     "zeroshot_classes": stat([54, 54])}
    metrics = {"recon-only": {"psnr": stat([9.4, 9.6]), "psnr@2x": stat([9.4, 9.5]), **understanding},
               "base": {"psnr": stat([9.3, 9.5]), "psnr@2x": stat([9.4, 9.4]), **understanding}}
    summary = {"grid": "tiny", "base_preset": "debug", "steps": 3, "seeds": [0, 1], "train_size": 32,
               "eval_scales": [1, 2], "claims": [],
               "cells": [{"name": n, "report": ["recon"] if n == "recon-only" else ["recon", "zeroshot"],
                          "metrics": metrics[n]} for n in cells]}
    path = tmp_path / "results.png"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ablate_report.plot(summary, path)
    assert path.stat().st_size > 1000


def test_a_cell_without_a_finished_seed_keeps_its_row(tmp_path):
    """A cell whose runs failed (or have not run yet) had no row in results.md, and its claims read 'needs >= 2
    seeds'; it now shows with 0 seeds, and its claims say 'not run'."""
    from experiments import ablate_report
    from experiments.ablate_stats import NOT_RUN

    plan = ablate.make_plan(*ablate.parse_args(_args(tmp_path / "out", "cpu", "--cells", "base", "recon-only",
                                                    "--dry-run")), None)
    result = {"cell": "base", "seed": 0, "metrics": {"psnr": 9.5, "zeroshot_top1": 3.0}}
    summary = ablate_report.summarize(plan, [result, {**result, "seed": 1}])
    assert [(c["name"], c["seeds"]) for c in summary["cells"]] == [("base", [0, 1]), ("recon-only", [])]
    row = next(r for r in ablate_report.markdown_table(summary).splitlines() if r.startswith("| recon-only |"))
    assert set(row.split(" | ")[2:-2]) == {"-"} and row.split(" | ")[-2] == "0"  # no metric, 0 seeds
    assert {c["verdict"] for c in summary["claims"]} == {NOT_RUN}


@pytest.mark.parametrize("cells,top,match", [
    ([{"name": "a", "args": []}, {"name": "a", "args": ["--loss.clip", "0"]}], {}, "duplicate cell names"),
    ([{"name": "a", "args": [], "colour": 1}], {}, "unknown keys"),
    ([{"name": "a", "args": []}], {"stepz": 3}, "unknown grid keys"),
    ([{"name": "a", "args": [], "report": ["fid"]}], {}, "report must be"),
    ([{"name": "a/b", "args": []}], {}, "folder-safe"),
    ([], {}, "non-empty list"),
    ([{"name": "a", "args": ["--total-steps", "9"]}], {}, "set by experiments.ablate"),
    ([{"name": "a", "args": ["--model.quantizer.kind", "bogus"]}], {}, "cell 'a': unitok.train rejects"),
    ([{"name": "a", "args": ["--model.quantizer.num-codebooks", "3"]}], {},
     "(?s)cell 'a'.*latent_dim=16 is not divisible"),
])
def test_bad_grid_spec_is_a_clear_error(tmp_path, cells, top, match):
    grid = _write_grid(tmp_path / "bad.yaml", cells, **top)
    with pytest.raises(ValueError, match=match):
        ablate.run(*ablate.parse_args(_args(tmp_path / "out", grid, "--dry-run")))
    assert not (tmp_path / "out" / "cells").exists()  # nothing ran


def test_cli_errors_name_the_problem(tmp_path, capsys):
    with pytest.raises(SystemExit, match="use 'cpu', 'paper' or a .yaml"):
        ablate.main(_args(tmp_path / "out", "nope"))
    with pytest.raises(SystemExit, match="needs real data"):
        ablate.main(_args(tmp_path / "out", "paper", "--dry-run"))
    with pytest.raises(SystemExit, match="--cells"):
        ablate.main(_args(tmp_path / "out", "cpu", "--cells", "nope", "--dry-run"))


def test_cli_takes_the_launch_script_flags_and_passes_the_rest_to_training(capsys):
    cfg, rest = ablate.parse_args(["--launcher", "deepspeed", "--ngpu", "8", "--launcher-args=--hostfile h --num_nodes 2",
                                   "--grid", "paper", "--seeds", "0", "1", "--data.shards", "/d/{0..9}.tar", "--seed", "3"])
    assert cfg.launcher == "deepspeed" and cfg.ngpu == 8 and cfg.launcher_args == "--hostfile h --num_nodes 2"
    assert cfg.grid == "paper" and cfg.seeds == (0, 1)
    assert rest == ["--data.shards", "/d/{0..9}.tar", "--seed", "3"]  # --seed is no abbreviation of --seeds
    assert ablate.parse_args(["--launcher-args="])[0].launcher_args == ""  # launch/ablate.sh without LAUNCHER_ARGS
    with pytest.raises(SystemExit):
        ablate.parse_args(["--seeds", "1", "1"])
    assert "--seeds must be distinct" in capsys.readouterr().err


def test_builtin_grids_one_switch_per_cell(tmp_path):
    cpu = ablate_grid.load_grid("cpu", "debug")  # debug preset: MCQ 4 x 64, latent 16
    assert [c.name for c in cpu.cells] == ["base", "mcq-8x32", "mcq-2x128", "single-1x256", "rq-4x64", "linear-proj",
                                           "causal-proj", "recon-only", "contrastive-only"]
    paper = ablate_grid.load_grid("paper", "large")  # Table 8 at 16384 entries, Table 7 at the release shape
    names = [c.name for c in paper.cells]
    assert {"mcq-8x2048", "mcq-4x4096", "mcq-2x8192", "single-1x16384", "rq-8x4096"} <= set(names)
    # the paper grid's every cell passes unitok.train's parser (weights only need to exist here)
    for f in ("lpips.pth", "dino.pth"):
        (tmp_path / f).write_bytes(b"")
    (tmp_path / "val").mkdir()
    summary = ablate.run(*ablate.parse_args([
        "--grid", "paper", "--seeds", "0", "--out-dir", str(tmp_path / "out"), "--dry-run",
        "--launcher", "deepspeed", "--data.shards", "/data/{0..9}.tar", "--eval-images", str(tmp_path / "val"),
        "--zeroshot-dir", str(tmp_path / "val"), "--classnames", "imagenet",
        "--loss.lpips-weights", str(tmp_path / "lpips.pth"), "--gan.dino-weights", str(tmp_path / "dino.pth")]))
    assert summary == {} and not (tmp_path / "out" / "cells").exists()  # nothing ran
    planned = [line for line in (tmp_path / "out" / "log.txt").read_text().splitlines() if "[dry run]" in line]
    assert len(planned) == len(paper.cells)  # one deepspeed command per cell, with the cell's own switch
    for cell, line in zip(paper.cells, planned):
        assert f"] {cell.name} seed 0: " in line and "deepspeed --num_gpus" in line and "--module unitok.train" in line
        assert all(a in line for a in cell.args), (cell.name, cell.args)


# ---- claims: statistics, verdicts, derivation -----------------------------------------------------
@pytest.mark.filterwarnings("ignore:Precision loss:RuntimeWarning")  # scipy, on the constant side
def test_welch_matches_scipy_ttest_and_its_interval():
    """Difference, Welch df, CI95 and both one-sided p-values against scipy's own Welch test."""
    from scipy import stats

    from experiments.ablate_stats import welch

    rng = np.random.default_rng(0)
    for na, nb, sa, sb, shift in [(5, 5, 1.0, 1.0, 0.8), (3, 7, 0.2, 2.0, -0.5), (2, 2, 1.0, 0.1, 3.0),
                                  (5, 4, 0.0, 1.0, 1.0)]:  # the last: one side constant, Welch still defined
        a = shift + sa * rng.standard_normal(na) if sa else np.full(na, shift)
        b = sb * rng.standard_normal(nb)
        w = welch(list(a), list(b))
        ref = stats.ttest_ind(a, b, equal_var=False)
        assert w["diff"] == pytest.approx(a.mean() - b.mean())
        assert w["t"] == pytest.approx(ref.statistic) and w["df"] == pytest.approx(ref.df)
        assert w["ci95"] == pytest.approx(list(ref.confidence_interval(0.95)))
        assert w["p_greater"] == pytest.approx(stats.ttest_ind(a, b, equal_var=False, alternative="greater").pvalue)
        assert w["p_less"] == pytest.approx(stats.ttest_ind(a, b, equal_var=False, alternative="less").pvalue)
        va, vb = a.var(ddof=1) / na, b.var(ddof=1) / nb  # Welch-Satterthwaite by hand
        assert w["df"] == pytest.approx((va + vb) ** 2 / (va ** 2 / (na - 1) + vb ** 2 / (nb - 1)))


def test_holm_against_hand_computed_values():
    from experiments.ablate_stats import holm

    # sorted 0.01, 0.03, 0.04, 0.5 (m = 4): 4 x 0.01, 3 x 0.03, max(0.09, 2 x 0.04), max(0.09, 0.5)
    assert holm([0.04, 0.5, 0.01, 0.03]) == pytest.approx([0.09, 0.5, 0.04, 0.09])
    assert holm([0.3, 0.6]) == pytest.approx([0.6, 0.6])  # capped monotone, never above 1
    assert holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])
    # a NaN is a 1, not a poison: sorted with NaN keys and min(1, m * nan) it made every later p 1
    assert holm([float("nan"), 0.001, 0.002, 0.003]) == pytest.approx([1.0, 0.004, 0.006, 0.006])


def _cells(values: dict[str, dict[str, list[float]]]) -> list[dict]:
    """Summary cells: a cell's seeds are as many as its longest series (one for a cell without the metric)."""
    return [{"name": n, "seeds": list(range(max(map(len, m.values()), default=1))),
             "metrics": {k: {"values": v} for k, v in m.items()}} for n, m in values.items()]


def test_claim_verdict_rules():
    from experiments.ablate_grid import Claim
    from experiments.ablate_stats import (CONTRADICTED, FEW_SEEDS, NON_FINITE, NOT_MEASURED, NOT_RUN, REPRODUCED,
                                          UNRESOLVED, evaluate_claims)

    def run(a, b, direction="higher", metric="m"):
        cells = _cells({"A": {metric: a} if a is not None else {}, "B": {metric: b}})
        return evaluate_claims([Claim("c", "src", "A beats B", "A", "B", metric, direction)], cells)[0]

    r = run([10.0, 10.5, 11.0, 10.2, 10.8], [8.0, 8.4, 7.9, 8.3, 8.1])
    assert r["verdict"] == REPRODUCED and r["p"] < 0.05 and r["diff"] > 0 and r["ci95"][0] > 0
    assert r["better"]["mean"] == pytest.approx(10.5) and r["better"]["std"] == pytest.approx(np.std(
        [10.0, 10.5, 11.0, 10.2, 10.8], ddof=1)) and r["other"]["n"] == 5
    r = run([8.0, 8.4, 7.9, 8.3, 8.1], [10.0, 10.5, 11.0, 10.2, 10.8])
    assert r["verdict"] == CONTRADICTED and r["p_opposite"] < 0.05 and r["diff"] < 0
    assert run([1.0, 2.0, 3.0], [1.5, 2.5, 2.0])["verdict"] == UNRESOLVED
    # lower-is-better (rFID): the lower side wins, and the difference is signed so > 0 is the paper's way
    r = run([1.0, 1.1, 0.9], [2.0, 2.2, 1.9], direction="lower", metric="rfid")
    assert r["verdict"] == REPRODUCED and r["diff"] == pytest.approx(2.0333333 - 1.0)
    # both sides constant: no NaN; equal values resolve nothing, different ones are an exact difference
    r = run([100.0, 100.0], [100.0, 100.0, 100.0])
    assert r["verdict"] == UNRESOLVED and r["p"] == r["p_opposite"] == 0.5 and r["ci95"] == [0.0, 0.0]
    r = run([100.0, 100.0], [90.0, 90.0])
    assert r["verdict"] == REPRODUCED and (r["p"], r["p_opposite"]) == (0.0, 1.0) and r["ci95"] == [10.0, 10.0]
    assert run([90.0, 90.0], [100.0, 100.0])["verdict"] == CONTRADICTED
    # one seed on a side: no test; a cell that ran without the metric: not measured
    r = run([10.0], [8.0, 8.1])
    assert r["verdict"] == FEW_SEEDS and r["p"] is None and r["ci95"] is None and r["diff"] == pytest.approx(1.95)
    assert run(None, [8.0, 8.1])["verdict"] == NOT_MEASURED
    # a diverged seed (NaN): no test, and the other claims' Holm verdicts stand; a cell with no finished seed
    r = run([10.0, float("nan"), 10.2], [8.0, 8.1])
    assert r["verdict"] == r["verdict_holm"] == NON_FINITE and r["p"] is None
    cells = _cells({"A": {"m": [10.0, 10.5, 11.0]}, "B": {"m": [8.0, 8.4, 7.9]}, "C": {"m": [1.0, float("nan")]}})
    cells.append({"name": "D", "seeds": [], "metrics": {}})
    out = evaluate_claims([Claim("ok", "s", "x", "A", "B", "m"), Claim("nan", "s", "x", "C", "B", "m"),
                           Claim("unrun", "s", "x", "A", "D", "m")], cells)
    assert [r["verdict_holm"] for r in out] == [REPRODUCED, NON_FINITE, NOT_RUN]


def test_holm_verdicts_are_never_bolder_than_the_raw_ones():
    from experiments.ablate_grid import Claim
    from experiments.ablate_stats import REPRODUCED, UNRESOLVED, evaluate_claims

    rng = np.random.default_rng(1)
    cells = {f"c{i}": {"m": list(rng.normal(0, 1, 5))} for i in range(12)}
    cells["strong"] = {"m": list(rng.normal(5, 1, 5))}
    claims = [Claim(f"k{i}", "s", "x", "strong" if i == 0 else f"c{i}", f"c{i + 1}", "m") for i in range(11)]
    out = evaluate_claims(claims, _cells(cells))
    assert out[0]["verdict"] == out[0]["verdict_holm"] == REPRODUCED
    for r in out:
        assert r["p_holm"] >= r["p"] and r["p_opposite_holm"] >= r["p_opposite"]
        assert r["verdict_holm"] in (r["verdict"], UNRESOLVED)


def test_cpu_grid_claims_cover_the_paper_and_name_its_cells():
    grid = ablate_grid.load_grid("cpu", "debug")
    cells = {c.name for c in grid.cells}
    pairs = {(c.better, c.other, c.metric): c for c in grid.claims}
    assert len(pairs) == len(grid.claims) == len({c.name for c in grid.claims})
    for c in grid.claims:
        assert {c.better, c.other} <= cells and c.metric in ablate.metric_keys(grid)
        assert c.direction == ("lower" if c.metric == "rfid" else "higher")
    expected = [("base", "recon-only", "psnr"), ("base", "recon-only", "rfid"),
                ("base", "contrastive-only", "zeroshot_top1"), ("base", "rq-4x64", "psnr"),
                ("base", "rq-4x64", "zeroshot_top1"), ("base", "rq-4x64", "probe_top1"),
                ("mcq-8x32", "base", "psnr"), ("base", "mcq-2x128", "psnr"), ("mcq-2x128", "single-1x256", "psnr"),
                ("mcq-8x32", "base", "zeroshot_top1"), ("mcq-2x128", "single-1x256", "probe_top1"),
                ("base", "single-1x256", "mean_usage_pct"), ("base", "linear-proj", "zeroshot_top1"),
                ("base", "causal-proj", "probe_top1")]
    assert [e for e in expected if e not in pairs] == []
    assert {c.source for c in grid.claims} >= {"Table 6", "Table 7", "Table 8", "Fig. 3", "issue #5"}
    # the summary of some cells (--cells) keeps only the claims whose two cells it shows
    kept = ablate_grid.present_claims(grid.claims, [c for c in grid.cells if c.name in {"base", "recon-only",
                                                                                        "linear-proj"}])
    assert {(c.better, c.other) for c in kept} == {("base", "recon-only"), ("base", "linear-proj")}


def test_yaml_grid_gets_the_paper_claims_of_its_cells_and_its_own(tmp_path):
    grid = ablate_grid.load_grid(str(_write_grid(tmp_path / "g.yaml", [
        {"name": "base", "args": []}, {"name": "recon-only", "args": ["--loss.clip", "0"]},
        {"name": "wide", "args": ["--model.quantizer.codebook-size", "128"]}],
        claims=[{"name": "wide-recon", "source": "mine", "statement": "wider codebooks reconstruct better",
                 "better": "wide", "other": "base", "metric": "psnr@2x"}])), None)
    assert [(c.better, c.other, c.metric) for c in grid.claims] == [
        ("base", "recon-only", "psnr"), ("base", "recon-only", "rfid"), ("wide", "base", "psnr@2x")]
    assert grid.claims[-1].direction == "higher"


@pytest.mark.parametrize("claims,match", [
    ({"name": "x"}, "'claims' must be a list"),
    (["x"], "claim #0 must be a mapping"),
    ([{"name": "x", "source": "s", "statement": "t", "better": "base", "other": "b", "metric": "psnr", "dir": 1}],
     "claim 'x': unknown keys \\['dir'\\]"),
    ([{"name": "x", "source": "s", "better": "base", "other": "b", "metric": "psnr"}],
     "missing keys \\['statement'\\]"),
    ([{"name": "x", "source": "s", "statement": "t", "better": "base", "other": "b", "metric": "psnr",
       "direction": "up"}], "direction must be 'higher' or 'lower'"),
    ([{"name": "x", "source": "s", "statement": "t", "better": "base", "other": "nope", "metric": "psnr"}],
     "claim 'x' names cells \\['nope'\\]"),
    ([{"name": "x", "source": "s", "statement": "t", "better": "b", "other": "b", "metric": "psnr"}], "with itself"),
    ([{"name": "x", "source": "s", "statement": "t", "better": "base", "other": "b", "metric": "psnr"}] * 2,
     "duplicate claim names"),
    ([{"name": "x", "source": "s", "statement": "t", "better": "base", "other": "b", "metric": "psnr@3x"}],
     "claim 'x': metric 'psnr@3x' is not a result of this grid"),
])
def test_bad_claim_is_a_clear_error_naming_the_file(tmp_path, claims, match):
    grid = _write_grid(tmp_path / "bad.yaml", [{"name": "base", "args": []}, {"name": "b", "args": []}], claims=claims)
    with pytest.raises(ValueError, match=match) as e:
        ablate.run(*ablate.parse_args(_args(tmp_path / "out", grid, "--dry-run")))
    assert str(grid) in str(e.value)
    assert not (tmp_path / "out" / "cells").exists()


def test_an_error_other_than_a_runs_failure_stops_the_queue_whichever_run_it_is(tmp_path, monkeypatch):
    """--jobs 2: the second run ends in an error that every run would meet (here, a launch whose world size was
    misread) while the first still trains; no queued run starts after that (the runs were awaited in order, so
    the queue went on until the first one ended). A run's own failure (RunFailed) lets the queue go on: the
    next test."""
    import threading

    started, first_may_end = [], threading.Event()

    def run_cell(plan, cell, seed):
        started.append((cell.name, seed))
        if len(started) == 2:
            raise ValueError("training of cell base seed 1 ran on 16 ranks where this run expects 8")
        if len(started) == 1:
            assert first_may_end.wait(30)
        return {"cell": cell.name, "seed": seed, "metrics": {"train_seconds": 0, "eval_seconds": 0}}, True

    def release_after_failure(*args, **kwargs):
        first_may_end.set()  # the failure was seen: the first run may end now
        return original_cancel(*args, **kwargs)

    from concurrent.futures import Future

    original_cancel = Future.cancel
    monkeypatch.setattr(Future, "cancel", release_after_failure)
    monkeypatch.setattr(ablate, "run_cell", run_cell)
    monkeypatch.setattr(ablate, "write_outputs", lambda plan, results, failed: {})
    args = _args(tmp_path / "out", "cpu", "--cells", "base", "--seeds", "0", "1", "2", "3", "--jobs", "2")
    with pytest.raises(ValueError, match="seed 1 ran on 16 ranks"):
        ablate.run(*ablate.parse_args(args))
    assert len(started) == 2, started


def test_a_failed_run_lets_the_others_run_and_a_rerun_skips_it_unless_told(tmp_path, monkeypatch):
    """The first failing run raised at once and no later run started; a rerun resumed it first, so a failure
    that repeats blocked the grid for good. The other runs now finish; failed.json records the failure,
    results.md marks the seed and the grid exits non-zero naming it. A rerun skips it; --retry-failed runs it."""
    def training(cmd, port, log, **kw):
        if "/cells/bad/seed0/" in cmd[cmd.index("--run-dir") + 1]:
            raise RuntimeError(f"training of cell bad seed 0 failed with exit code 3\nfull log {log}; last lines:\n")
        _fake_training(cmd, port, log, **kw)

    monkeypatch.setattr(ablate, "run_logged", training)
    monkeypatch.setattr(ablate, "evaluate_cell", _fake_eval)
    monkeypatch.setattr(ablate, "prepare_synthetic", lambda *a, **k: None)
    grid = _write_grid(tmp_path / "g.yaml", [{"name": "bad", "args": ["--loss.clip", "0"]},
                                             {"name": "base", "args": []}])
    out, bad = tmp_path / "out", tmp_path / "out" / "cells" / "bad" / "seed0"
    args = _args(out, grid, "--seeds", "0", "1")
    with pytest.raises(SystemExit, match=r"error: 1 of the 4 runs failed: bad seed 0 \(exit code 3, log "
                                         + re.escape(f"{bad / 'train.log'}). ") + ".*--retry-failed"):
        ablate.main(args)
    assert json.loads((bad / "failed.json").read_text()) == {
        "error": "training of cell bad seed 0 failed with exit code 3", "exit_code": 3, "log": str(bad / "train.log"),
        "launch": {"launcher": "none", "world_size": 1}}
    summary = json.loads((out / "results.json").read_text())
    assert [(c["name"], c["seeds"], c["failed_seeds"]) for c in summary["cells"]] == [
        ("bad", [1], [0]), ("base", [0, 1], [])]  # the runs queued after the failure ran
    row = next(r for r in (out / "results.md").read_text().splitlines() if r.startswith("| bad |"))
    assert "| 1 (failed: seed 0) |" in row

    monkeypatch.setattr(ablate, "run_logged", mock.Mock(side_effect=AssertionError("trained again")))
    with pytest.raises(SystemExit, match=r"1 of the 4 runs failed: bad seed 0 \(skipped, failed before: exit code 3"):
        ablate.main(args)
    assert json.loads((out / "results.json").read_text()) == summary
    monkeypatch.setattr(ablate, "run_logged", _fake_training)  # a transient failure: it trains now
    again = ablate.run(*ablate.parse_args([*args, "--retry-failed"]))
    assert [(c["name"], c["seeds"], c["failed_seeds"]) for c in again["cells"]] == [
        ("bad", [0, 1], []), ("base", [0, 1], [])]
    assert not (bad / "failed.json").exists() and (bad / "result.json").is_file()


# ---- review fixes: claim directions, kill-and-change, subset reruns, Ctrl-C, corrupt files ------------------
def test_a_grid_files_claim_takes_its_metrics_direction_and_a_wrong_one_is_refused(tmp_path):
    """A file's rFID claim without `direction` was tested as higher-better, so a claim that held read
    'contradicted'; it now takes rFID's own direction, and a file that states the other one is refused."""
    from experiments.ablate_stats import REPRODUCED, evaluate_claims

    cells = [{"name": "base", "args": []}, {"name": "wide", "args": ["--model.quantizer.codebook-size", "128"]}]
    claim = {"name": "wide-rfid", "source": "mine", "statement": "wider codebooks give a lower rFID",
             "better": "wide", "other": "base", "metric": "rfid"}
    grid = ablate_grid.load_grid(str(_write_grid(tmp_path / "g.yaml", cells, claims=[claim])), None)
    c = next(c for c in grid.claims if c.name == "wide-rfid")
    assert c.direction == "lower"
    r = evaluate_claims([c], _cells({"wide": {"rfid": [1.0, 1.1, 0.9]}, "base": {"rfid": [2.0, 2.1, 1.9]}}))[0]
    assert r["verdict"] == REPRODUCED and r["diff"] == pytest.approx(1.0)
    bad = _write_grid(tmp_path / "bad.yaml", cells, claims=[{**claim, "direction": "higher"}])
    with pytest.raises(ValueError, match="claim 'wide-rfid': rfid is lower-is-better") as e:
        ablate_grid.load_grid(str(bad), None)
    assert str(bad) in str(e.value)


def _killed_training(cmd, port, log, **kw):
    """run_logged of a training killed after step 2: a checkpoint, no export, no result."""
    from pathlib import Path

    run_dir = Path(cmd[cmd.index("--run-dir") + 1])
    run_dir.mkdir(parents=True)
    (run_dir / "latest").write_text("step-00000002")
    raise RuntimeError("training failed")


def test_a_half_trained_run_is_not_resumed_with_other_arguments(tmp_path, monkeypatch):
    """Killed mid-training, then its switch changed in the grid file: the rerun resumed the old checkpoint under
    the new arguments. fingerprint.json, written before training, now refuses it and says what differs."""
    def plan_for(clip):
        grid = _write_grid(tmp_path / "g.yaml", [{"name": "x", "args": ["--loss.clip", clip]}])
        return ablate.make_plan(*ablate.parse_args(_args(tmp_path / "out", grid, "--dry-run")), None)

    monkeypatch.setattr(ablate, "run_logged", _killed_training)
    plan = plan_for("0")
    with pytest.raises(RuntimeError, match="training failed"):
        ablate.run_cell(plan, plan.run_cells[0], 0)
    cell_dir = tmp_path / "out" / "cells" / "x" / "seed0"
    assert json.loads((cell_dir / "fingerprint.json").read_text()) == plan.fingerprint(plan.run_cells[0], 0)

    resumed = mock.Mock(side_effect=RuntimeError("resumed"))
    monkeypatch.setattr(ablate, "run_logged", resumed)
    plan = plan_for("1")
    with pytest.raises(ValueError, match=r"fingerprint\.json.*--loss\.clip 0 -> 1.*delete .*seed0") as e:
        ablate.run_cell(plan, plan.run_cells[0], 0)
    assert str(cell_dir / "fingerprint.json") in str(e.value) and not resumed.called
    plan = plan_for("0")  # the arguments it was started with resume it
    with pytest.raises(RuntimeError, match="resumed"):
        ablate.run_cell(plan, plan.run_cells[0], 0)


def test_constant_sides_with_different_seed_counts_resolve_nothing():
    """n equal floats have np.mean/np.var off by an ulp for some n: two constant, equal sides got a verdict from
    rounding (e.g. 0.7 x 3 vs 0.7 x 2). An all-equal side is now exactly constant."""
    from experiments.ablate_grid import Claim
    from experiments.ablate_stats import UNRESOLVED, evaluate_claims

    for x, na, nb in [(0.7, 3, 2), (0.1, 7, 10), (57.7, 3, 5), (81.32702392002724, 7, 10), (1 / 3, 10, 2)]:
        cells = _cells({"A": {"m": [x] * na}, "B": {"m": [x] * nb}})
        r = evaluate_claims([Claim("c", "s", "x", "A", "B", "m")], cells)[0]
        assert (r["verdict"], r["diff"], r["p"], r["p_opposite"]) == (UNRESOLVED, 0.0, 0.5, 0.5), (x, na, nb)


def test_table6_joint_vs_contrastive_only_is_a_difference_without_a_verdict():
    """The paper's Table 6 has contrastive-only ahead on 5 of 6 understanding columns (joint ahead on VQAv2 by
    0.19): it claims no direction, so the grid reports the difference and a two-sided p, with no verdict and no
    place among Holm's tests."""
    from scipy import stats

    from experiments.ablate_stats import DIFFERENCE_ONLY, evaluate_claims, holm

    grid = ablate_grid.load_grid("cpu", "debug")
    table6 = [c for c in grid.claims if c.name.startswith("table6-joint-vs-contrastive-only")]
    assert table6 and {c.kind for c in table6} == {"difference"} and "no direction" in table6[0].statement
    assert {c.kind for c in grid.claims if c not in table6} == {"directional"}
    a, b, x = [50.0, 51.0, 53.0], [40.0, 41.5, 42.0], [48.0, 49.0, 50.5]
    cells = _cells({"base": {"zeroshot_top1": a}, "contrastive-only": {"zeroshot_top1": b},
                    "rq-4x64": {"zeroshot_top1": x}})
    directional = ablate_grid.Claim("d", "s", "x", "base", "rq-4x64", "zeroshot_top1")
    diff, other = evaluate_claims([table6[0], directional], cells)
    assert diff["verdict"] == diff["verdict_holm"] == DIFFERENCE_ONLY and diff["p_opposite"] is None
    assert diff["p"] == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue) and diff["p"] < 0.05
    assert other["p_holm"] == pytest.approx(holm([other["p"], other["p_opposite"]])[0])  # a family of 2 tests


def test_the_printed_interval_agrees_with_the_verdict():
    """The verdict is a one-sided test at 0.05, a 90 % two-sided interval; the table printed the 95 % CI, which
    can include 0 beside 'reproduced'. It prints the CI90 now, and says so."""
    from scipy import stats

    from experiments.ablate_grid import Claim
    from experiments.ablate_report import claims_table
    from experiments.ablate_stats import REPRODUCED, evaluate_claims

    a, b = [19.5, 20.4, 19.8, 20.9, 20.2], [19.6, 19.2, 20.0, 19.4, 19.8]
    r = evaluate_claims([Claim("a-vs-b/psnr", "T", "A beats B", "A", "B", "psnr")], _cells({"A": {"psnr": a},
                                                                                           "B": {"psnr": b}}))[0]
    assert r["verdict"] == REPRODUCED and r["ci95"][0] < 0 < r["ci90"][0]
    ref = stats.ttest_ind(a, b, equal_var=False)
    assert r["ci90"] == pytest.approx(list(ref.confidence_interval(0.90)))
    assert r["ci95"] == pytest.approx(list(ref.confidence_interval(0.95)))
    table = claims_table({"claims": [r]})
    assert f"+{r['diff']:.2f} [+{r['ci90'][0]:.2f}, +{r['ci90'][1]:.2f}]" in table and "difference [90 % CI]" in table


FAKE_SHA = "0123456789abcdef0123456789abcdef01234567"  # the git SHA of _fake_training's config.json


def _fake_training(cmd, port, log, **kw):
    """run_logged of a finished training (no model): the export, the trainer's last loss, its config.json and a
    final checkpoint with a rank file per rank (deepspeed's --num_gpus on one node, else 1)."""
    import time
    from pathlib import Path

    time.sleep(0.05)
    run_dir = Path(cmd[cmd.index("--run-dir") + 1])
    (run_dir / "export").mkdir(parents=True)
    (run_dir / "export" / "model.safetensors").write_bytes(b"")
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 3, "loss": 1.0}) + "\n")
    step = f"step-{int(cmd[cmd.index('--total-steps') + 1]):08d}"
    (run_dir / step).mkdir()
    for rank in range(int(cmd[cmd.index("--num_gpus") + 1]) if "--num_gpus" in cmd else 1):
        (run_dir / step / f"rank{rank:05d}.pt").write_bytes(b"")
    (run_dir / "latest").write_text(step)
    local = int(cmd[len(cmd) - 1 - cmd[::-1].index("--data.local-batch-size") + 1])  # the last one: tyro's
    (run_dir / "config.json").write_text(json.dumps({"config": {"grad_accum": 1, "data": {"local_batch_size": local}},
                                                     "git_sha": FAKE_SHA}))


def _fake_eval(plan, export, cell_dir):
    seed = int(cell_dir.name.removeprefix("seed"))
    return {"psnr": 10.0 + 0.1 * seed + (2.0 if cell_dir.parent.name == "base" else 0.0)}


def test_a_rerun_of_some_cells_or_seeds_keeps_the_others_in_the_results(tmp_path, monkeypatch):
    """results.json summarised only the cells and seeds of the last run: a --cells (or fewer --seeds) rerun of a
    finished grid dropped the other cells' rows and every claim that needs them. Finished results with other
    settings stay out."""
    monkeypatch.setattr(ablate, "run_logged", _fake_training)
    monkeypatch.setattr(ablate, "evaluate_cell", _fake_eval)
    monkeypatch.setattr(ablate, "prepare_synthetic", lambda *a, **k: None)
    grid = _write_grid(tmp_path / "g.yaml", [{"name": "base", "args": []},
                                             {"name": "recon-only", "args": ["--loss.clip", "0"]}])
    out = tmp_path / "out"
    full = ablate.run(*ablate.parse_args(_args(out, grid, "--seeds", "0", "1")))
    assert [(c["name"], c["seeds"]) for c in full["cells"]] == [("base", [0, 1]), ("recon-only", [0, 1])]
    for extra in (["--cells", "base"], ["--seeds", "1"], ["--cells", "recon-only", "--seeds", "0"]):
        again = ablate.run(*ablate.parse_args(_args(out, grid, *extra)))
        assert again == full, extra
        assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(full))
    assert "| table6-joint-vs-recon-only/psnr |" in (out / "results.md").read_text()
    # finished runs with other settings (here, another --steps) stay out of the summary
    other = ablate.run(*ablate.parse_args(_args(out, grid, "--cells", "recon-only", "--seeds", "2", "--steps", "4")))
    assert [(c["name"], c["seeds"]) for c in other["cells"]] == [("recon-only", [2])]


def test_ctrl_c_with_two_jobs_starts_no_queued_run(tmp_path, monkeypatch):
    """Ctrl-C during `--jobs 2`: leaving the executor's `with` waited for every queued run, so the queue went on.
    Now the two running runs end and no other starts."""
    import signal
    import threading
    import time

    started = []

    def run_cell(plan, cell, seed):
        if not started:  # SIGINT to the main thread (where Python raises it) while runs 1 and 2 are going
            threading.Timer(0.2, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT)).start()
        started.append(seed)
        time.sleep(1.0)  # well past the SIGINT, so no run ends (and frees a worker) before it
        return {"cell": cell.name, "seed": seed, "metrics": {"train_seconds": 0, "eval_seconds": 0}}, True

    monkeypatch.setattr(ablate, "run_cell", run_cell)
    monkeypatch.setattr(ablate, "write_outputs", lambda plan, results, failed: {})
    monkeypatch.setattr(ablate, "prepare_synthetic", lambda *a, **k: None)
    args = _args(tmp_path / "out", "cpu", "--cells", "base", "--seeds", *map(str, range(8)), "--jobs", "2")
    with pytest.raises(KeyboardInterrupt):
        ablate.run(*ablate.parse_args(args))
    assert len(started) == 2, started


def test_a_corrupt_result_names_the_file(tmp_path, monkeypatch):
    """A truncated result.json ended the CLI with a bare JSONDecodeError message."""
    monkeypatch.setattr(ablate, "prepare_synthetic", lambda *a, **k: None)
    monkeypatch.setattr(ablate, "run_logged", mock.Mock(side_effect=AssertionError("would train")))
    path = tmp_path / "out" / "cells" / "base" / "seed0" / "result.json"
    path.parent.mkdir(parents=True)
    path.write_text('{"cell": "base", "seed": 0, "metr')
    with pytest.raises(SystemExit) as e:
        ablate.main(_args(tmp_path / "out", "cpu", "--cells", "base"))
    assert str(path) in str(e.value) and "delete it to evaluate that run again" in str(e.value)


def test_a_re_evaluation_keeps_the_training_time_and_one_seed_has_no_std(tmp_path, monkeypatch):
    """Deleting result.json re-evaluates a trained run: its train_seconds became the ~0 s of finding the training
    done; it keeps the training's own figure now. A metric over one seed stores std null (was 0.0, a spread
    that was never measured), and results.md points at the harness's log, log.txt."""
    from experiments import ablate_report

    monkeypatch.setattr(ablate, "run_logged", _fake_training)
    monkeypatch.setattr(ablate, "evaluate_cell", _fake_eval)
    grid = _write_grid(tmp_path / "g.yaml", [{"name": "base", "args": []}])
    plan = ablate.make_plan(*ablate.parse_args(_args(tmp_path / "out", grid, "--dry-run")), None)
    first, ran = ablate.run_cell(plan, plan.run_cells[0], 0)
    assert ran and first["metrics"]["train_seconds"] >= 0.05
    (tmp_path / "out" / "cells" / "base" / "seed0" / "result.json").unlink()
    monkeypatch.setattr(ablate, "run_logged", mock.Mock(side_effect=AssertionError("trained again")))
    again, ran = ablate.run_cell(plan, plan.run_cells[0], 0)
    assert ran and again["metrics"]["train_seconds"] == first["metrics"]["train_seconds"]

    summary = ablate_report.summarize(plan, [again])
    assert summary["cells"][0]["metrics"]["psnr"]["std"] is None
    table = ablate_report.markdown_table(summary)
    assert "see log.txt" in table and "ablate.log" not in table


# ---- review fixes: world size, every run checked first, code versions ------------------------------------------
def test_a_result_of_another_world_size_is_not_reused(tmp_path, monkeypatch):
    """A result trained on 1 rank was reused, and pooled, by a grid launched on 8 (the fingerprint holds the
    arguments, not --launcher, --ngpu or --launcher-args; the global batch is local batch x ranks). result.json
    records the run's world size, global batch and git SHA; a result of another world size is refused, and left
    out of the results, like one of other arguments, and so is a half-trained run."""
    monkeypatch.setattr(ablate, "run_logged", _fake_training)
    monkeypatch.setattr(ablate, "evaluate_cell", _fake_eval)
    grid = _write_grid(tmp_path / "g.yaml", [{"name": "base", "args": []}])
    out = tmp_path / "out"

    def plan_for(*extra):
        return ablate.make_plan(*ablate.parse_args(_args(out, grid, "--dry-run", *extra)), None)

    one = plan_for()
    cell = one.run_cells[0]
    result, _ = ablate.run_cell(one, cell, 0)
    assert (one.world_size, result["world_size"], result["global_batch"], result["git_sha"]) == (1, 1, 4, FAKE_SHA)
    hosts = tmp_path / "hostfile"  # deepspeed's format: the hosts' GPUs are --ngpu each
    hosts.write_text("# workers\nnode-a slots=8\nnode-b slots=8\n\nnode-c slots=8\n")
    ds = ("--launcher", "deepspeed", "--ngpu", "2")
    for extra, ranks in [(ds, 2), ((*ds, f"--launcher-args=--hostfile {hosts}"), 6),
                         ((*ds, f"--launcher-args=--hostfile={hosts} --num_nodes 2"), 4)]:
        plan = plan_for(*extra)
        assert plan.world_size == ranks, extra
        with pytest.raises(ValueError, match=rf"another world size than this run's \(1 -> {ranks} ranks"):
            ablate.run_cell(plan, cell, 0)
        log = mock.Mock()
        assert ablate.finished_results(plan, set(), log) == []
        assert "leave out 1 finished run(s)" in log.info.call_args[0][0]
    assert ablate.finished_results(plan_for("--launcher", "deepspeed", "--ngpu", "1"), set(), mock.Mock()) == [result]
    # a result.json of an earlier experiments.ablate gets them from its run folder
    path = out / "cells" / "base" / "seed0" / "result.json"
    path.write_text(json.dumps({k: v for k, v in result.items() if k not in ("world_size", "global_batch", "git_sha")}))
    assert ablate.read_result(path) == result

    # a launch on other ranks than deepspeed's runner resolves here (another node's hostfile) stops the grid after
    # its training
    four = plan_for(*ds, f"--launcher-args=--hostfile {hosts} --num_nodes 2")
    with pytest.raises(ValueError, match="seed 1 ran on 2 ranks where this run expects 4: .*--ngpu, or --num_gpus"):
        ablate.run_cell(four, cell, 1)
    with pytest.raises(ValueError, match=r"(?s)1 of the 2 runs do not match.*seed1/train was started on 2 ranks and "
                                         r"this run has 1"):
        ablate.check_reusable(one, [(cell, 0), (cell, 1)])
    monkeypatch.setattr(ablate, "run_logged", mock.Mock(side_effect=AssertionError("launched")))
    with pytest.raises(ValueError, match="started on 2 ranks and this run has 1"):  # checked before it launches
        ablate.run_cell(one, cell, 1)


def test_changed_settings_are_found_for_every_run_before_any_starts(tmp_path, monkeypatch):
    """The check of a finished run's settings ran when the queue reached its cell: the unfinished runs queued
    before it trained first, then the grid stopped at the first mismatch (and a fix showed the next one). Every
    run is checked before any starts now, and one error names them all."""
    monkeypatch.setattr(ablate, "run_logged", _fake_training)
    monkeypatch.setattr(ablate, "evaluate_cell", _fake_eval)
    monkeypatch.setattr(ablate, "prepare_synthetic", lambda *a, **k: None)

    def grid(clip):
        return _write_grid(tmp_path / "g.yaml", [{"name": "a", "args": ["--loss.clip", clip]},
                                                 {"name": "b", "args": ["--loss.clip", clip]}])

    out = tmp_path / "out"
    ablate.run(*ablate.parse_args(_args(out, grid("0"), "--seeds", "1")))
    monkeypatch.setattr(ablate, "run_logged", mock.Mock(side_effect=AssertionError("trained")))
    for extra in ((), ("--dry-run",)):
        with pytest.raises(ValueError, match="2 of the 4 runs do not match this run's settings") as e:
            ablate.run(*ablate.parse_args(_args(out, grid("1"), "--seeds", "0", "1", *extra)))
        for c in "ab":
            assert f"{out / 'cells' / c / 'seed1' / 'result.json'} was written with other arguments" in str(e.value)
        assert "--loss.clip 0 -> 1" in str(e.value)
    assert not (out / "cells" / "a" / "seed0").exists()  # nothing started


def test_a_cell_pooling_results_of_two_code_versions_is_named_in_the_report(tmp_path):
    """Results of different code versions were pooled without notice. Each result records the git SHA of its
    training (train/config.json's), and results.md warns of a cell whose results have more than one."""
    from experiments import ablate_report

    plan = ablate.make_plan(*ablate.parse_args(_args(tmp_path / "out", "cpu", "--cells", "base", "recon-only",
                                                    "--dry-run")), None)
    old, new = "a" * 40, "b" * 40
    base = {"cell": "base", "seed": 0, "metrics": {"psnr": 9.5}, "git_sha": old}
    results = [base, {**base, "seed": 1, "git_sha": new}, {**base, "cell": "recon-only"},
               {**base, "cell": "recon-only", "seed": 1}]
    summary = ablate_report.summarize(plan, results)
    assert [c["git_shas"] for c in summary["cells"]] == [[old, new], [old]]
    warned = [line for line in ablate_report.markdown_table(summary).splitlines() if line.startswith("Warning")]
    assert len(warned) == 1 and "cell base pools results of 2 code versions (git aaaaaaaaaa, bbbbbbbbbb)" in warned[0]


# ---- review fixes: Ctrl-C and stop signals, deepspeed's own world size, a failure's launch, stopping, old results --
def _grid_runs(monkeypatch, tmp_path, training):
    """A one-cell grid (its run_logged: `training`) and its run(*extra) -> the summary."""
    monkeypatch.setattr(ablate, "run_logged", training)
    monkeypatch.setattr(ablate, "evaluate_cell", _fake_eval)
    monkeypatch.setattr(ablate, "prepare_synthetic", lambda *a, **k: None)
    grid = _write_grid(tmp_path / "g.yaml", [{"name": "base", "args": []}])
    return lambda *extra: ablate.run(*ablate.parse_args(_args(tmp_path / "out", grid, *extra)))


def _seed(cmd) -> int:
    from pathlib import Path

    return int(Path(cmd[cmd.index("--run-dir") + 1]).parent.name.removeprefix("seed"))


@pytest.mark.parametrize("code", [1, -2])  # a launcher's exit under Ctrl-C, and a job's own
def test_ctrl_c_records_no_run_as_failed_and_a_rerun_resumes_them(tmp_path, monkeypatch, code):
    """Ctrl-C reaches the training jobs too (the terminal signals the foreground process group): their exit became
    'failed with exit code -2', failed.json, and the next rerun skipped those runs as failed. Once the harness is
    interrupted, nothing is recorded as failed, whatever exit code a job's launcher makes of it."""
    import signal
    import threading
    import time

    def training(cmd, port, log, **kw):
        if _seed(cmd) == 0:  # while both runs train (--jobs 2): SIGINT to the main thread, where Python raises it
            threading.Timer(0.1, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT)).start()
        time.sleep(1.0)  # the jobs end after the harness saw Ctrl-C
        raise RuntimeError(f"training of cell base seed {_seed(cmd)} failed with exit code {code}\nfull log {log}")

    run = _grid_runs(monkeypatch, tmp_path, training)
    with pytest.raises(KeyboardInterrupt):
        run("--seeds", "0", "1", "--jobs", "2")
    cells = tmp_path / "out" / "cells" / "base"
    assert not list(cells.glob("seed*/failed.json"))
    monkeypatch.setattr(ablate, "run_logged", _fake_training)  # the rerun trains both
    assert run("--seeds", "0", "1")["cells"][0]["seeds"] == [0, 1]


@pytest.mark.parametrize("code", [-2, -15, 130, 143, 138])
def test_a_job_stopped_by_a_signal_is_no_failure_and_stops_the_grid(tmp_path, monkeypatch, code):
    """A training that saved and stopped on SIGTERM or SLURM's SIGUSR1 (exit 143, 138), or a job killed by SIGINT or
    SIGTERM, was a failed run, skipped by the next rerun. It is an interruption now: no failed.json (an earlier
    failure's goes), no queued run starts, the grid says so, and a rerun resumes it."""
    started = []

    def training(cmd, port, log, **kw):
        started.append(_seed(cmd))
        raise RuntimeError(f"training of cell base seed {_seed(cmd)} failed with exit code {code}\nfull log {log}")

    run = _grid_runs(monkeypatch, tmp_path, training)
    seed0 = tmp_path / "out" / "cells" / "base" / "seed0"
    seed0.mkdir(parents=True)
    (seed0 / "failed.json").write_text("{}")  # an earlier failure, retried now
    with pytest.raises(RuntimeError, match=rf"training of cell base seed 0 was stopped by a signal \(exit code "
                                           rf"{code}\), not recorded as a failure; a rerun resumes it"):
        run("--seeds", "0", "1", "--retry-failed")
    assert started == [0] and not (seed0 / "failed.json").exists()
    monkeypatch.setattr(ablate, "run_logged", _fake_training)
    assert run("--seeds", "0", "1")["cells"][0]["seeds"] == [0, 1]


def test_launcher_args_are_read_as_deepspeeds_runner_reads_them(tmp_path):
    """The world size was the harness's own reading of --launcher-args, which deepspeed's runner contradicted: a
    later --num_gpus wins, --num_nodes stops at the hostfile's hosts, argparse takes abbreviations. It is the
    runner's own resolution of the training command now, and a command line the runner refuses (which failed every
    run at its launch) is an error naming the flag before any run."""
    grid = _write_grid(tmp_path / "g.yaml", [{"name": "base", "args": []}])
    hosts = tmp_path / "hosts"
    hosts.write_text("node-a slots=8\nnode-b slots=8\n")
    (tmp_path / "bad").write_text("node-a slots=8\nnode-b\n")

    def world(launcher_args):
        args = _args(tmp_path / "out", grid, "--dry-run", "--launcher", "deepspeed", "--ngpu", "8",
                     f"--launcher-args={launcher_args}")
        return ablate.make_plan(*ablate.parse_args(args), None).world_size

    for launcher_args, ranks in [("", 8), (f"--hostfile {hosts}", 16), ("--num_gpus 4", 4), ("--num_accelerators=2", 2),
                                 (f"--hostfile {hosts} --num_nodes 3", 16), (f"--hostf {hosts}", 16),
                                 (f"-H{hosts}", 16), (f"--hostfile {hosts} --num_node 1", 8)]:
        assert world(launcher_args) == ranks, launcher_args
    for launcher_args, match in [("--include localhost:0", "refuses --include/--exclude beside --num_gpus"),
                                 ("--num_nodes 2", "refuses --num_nodes 2 without a hostfile"),
                                 (f"--hostfile {tmp_path / 'bad'}", "refuses the hostfile .*bad \\(--hostfile\\): "
                                                                     "Hostfile contains a bad entry"),
                                 ("--num 2", "rejects them: ambiguous option: --num could match")]:
        with pytest.raises(ValueError, match=match):
            world(launcher_args)
    with pytest.raises(SystemExit, match="error: --ngpu 8 --launcher-args='--num_nodes 2': deepspeed refuses"):
        ablate.main(_args(tmp_path / "out", grid, "--launcher", "deepspeed", "--ngpu", "8",
                          "--launcher-args=--num_nodes 2"))
    assert not (tmp_path / "out" / "cells").exists()  # nothing ran


def test_a_failure_under_other_launch_settings_runs_again(tmp_path, monkeypatch):
    """A launcher-level error (deepspeed refusing its hosts before any rank starts) failed every run; after the
    flags were fixed, every run was still skipped as failed before (failed runs were matched on the training
    arguments alone). failed.json records the launch settings, and a failure of other ones runs again."""
    def refused(cmd, port, log, **kw):
        raise RuntimeError(f"training of cell base seed {_seed(cmd)} failed with exit code 1\nfull log {log}")

    run = _grid_runs(monkeypatch, tmp_path, refused)
    hosts = tmp_path / "hosts"
    hosts.write_text("node-a slots=8\nnode-b slots=8\n")
    on_hosts = ("--seeds", "0", "1", "--launcher", "deepspeed", "--ngpu", "2", f"--launcher-args=--hostfile {hosts}")
    with pytest.raises(RuntimeError, match="2 of the 2 runs failed"):
        run(*on_hosts)
    seed0 = tmp_path / "out" / "cells" / "base" / "seed0"
    record = json.loads((seed0 / "failed.json").read_text())
    monkeypatch.setattr(ablate, "run_logged", mock.Mock(side_effect=AssertionError("trained again")))
    with pytest.raises(RuntimeError, match="2 of the 2 runs failed: base seed 0 \\(skipped, failed before"):
        run(*on_hosts)  # the same settings: skipped
    monkeypatch.setattr(ablate, "run_logged", _fake_training)
    summary = run(*on_hosts[:-1])  # without the hostfile: run again
    assert summary["cells"][0]["seeds"] == [0, 1] and summary["cells"][0]["failed_seeds"] == []
    assert not (seed0 / "failed.json").exists() and record["launch"] == {
        "launcher": "deepspeed", "ngpu": 2, "launcher_args": ["--hostfile", str(hosts)], "world_size": 4}


def test_an_error_that_stops_the_grid_starts_no_further_run_with_one_job(tmp_path, monkeypatch):
    """--jobs 1 (as with --launcher deepspeed): after a run's error that stops the grid, the single worker took the
    next queued run at once and trained it to its end before the error was raised."""
    import concurrent.futures

    started = []

    def run_cell(plan, cell, seed):
        started.append(seed)
        if seed == 0:
            raise ValueError("training of cell base seed 0 ran on 4 ranks where this run expects 8")
        return {"cell": cell.name, "seed": seed, "metrics": {"train_seconds": 0, "eval_seconds": 0}}, True

    real_wait = concurrent.futures.wait

    def slow_wait(*args, **kwargs):  # the main thread wakes after the worker could take the next run
        done = real_wait(*args, **kwargs)
        __import__("time").sleep(0.3)
        return done

    monkeypatch.setattr(concurrent.futures, "wait", slow_wait)
    monkeypatch.setattr(ablate, "run_cell", run_cell)
    monkeypatch.setattr(ablate, "write_outputs", lambda plan, results, failed: {})
    monkeypatch.setattr(ablate, "prepare_synthetic", lambda *a, **k: None)
    args = _args(tmp_path / "out", "cpu", "--cells", "base", "--seeds", "0", "1", "2", "--launcher", "deepspeed")
    with pytest.raises(ValueError, match="seed 0 ran on 4 ranks"):
        ablate.run(*ablate.parse_args(args))
    assert started == [0]


def test_an_old_result_without_checkpoints_takes_its_world_size_from_its_log(tmp_path, monkeypatch):
    """A result.json of the previous version (no world_size) whose step checkpoints were deleted (a finished grid
    needs only the exports) read world size None: refused with 'delete <cell_dir>' (finished training), or left
    out of the results unsaid. Its world size comes from the trainer's 'ranks:' line (train/log.txt, else
    train.log); with neither, it is used with a warning."""
    import shutil

    run = _grid_runs(monkeypatch, tmp_path, _fake_training)
    run("--seeds", "0")
    seed0 = tmp_path / "out" / "cells" / "base" / "seed0"
    result = json.loads((seed0 / "result.json").read_text())
    old = {k: v for k, v in result.items() if k not in ("world_size", "global_batch", "git_sha")}
    (seed0 / "result.json").write_text(json.dumps(old))
    shutil.rmtree(seed0 / "train" / "step-00000003")
    monkeypatch.setattr(ablate, "run_logged", mock.Mock(side_effect=AssertionError("trained again")))
    monkeypatch.setattr(ablate, "evaluate_cell", mock.Mock(side_effect=AssertionError("evaluated again")))

    one = "12:00:00 ranks: node 0 (host a): ranks [0] local [0]\n"
    two = "12:00:00 ranks: node 0 (host a): ranks [0] local [0]; node 1 (host b): ranks [1] local [0]\n"
    (seed0 / "train" / "log.txt").write_text(two + "12:00:01 step 1/3 | loss 1.0\n" + one)  # the last start's
    assert ablate.read_result(seed0 / "result.json")["world_size"] == 1
    assert run("--seeds", "0")["cells"][0]["seeds"] == [0]
    (seed0 / "train" / "log.txt").unlink()
    (seed0 / "train.log").write_text(f"$ python -m unitok.train\n{two}")
    assert ablate.read_result(seed0 / "result.json")["world_size"] == 2
    with pytest.raises(ValueError, match=r"another world size than this run's \(2 -> 1 ranks"):
        run("--seeds", "0")
    (seed0 / "train.log").unlink()
    with pytest.warns(UserWarning, match="cell base seed 0 does not say on how many ranks it trained"):
        summary = run("--seeds", "0")
    assert summary["cells"][0]["seeds"] == [0]
