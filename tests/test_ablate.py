"""`experiments.ablate`: a 2-cell grid end to end on CPU (single process): kill and resume, skipping finished
cells, results files; grid validation."""
import json
from unittest import mock

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
    # a run killed (kill -9) after step 2 of 3 leaves a half-trained cell that the next run resumes
    with pytest.raises(RuntimeError, match="training of cell base seed 0 failed"):
        ablate.run(*ablate.parse_args(_args(out, grid, "--debug.kill-at-step", "2")))
    assert (out / "cells" / "base" / "seed0" / "train" / "latest").read_text() == "step-00000002"
    summary = ablate.run(*ablate.parse_args(_args(out, grid)))
    assert "resumed from" in (out / "cells" / "base" / "seed0" / "train.log").read_text()
    steps = [json.loads(x)["step"] for x in (out / "cells" / "base" / "seed0" / "train" / "metrics.jsonl").open()]
    assert steps == [1, 2, 3]

    # every cell: trained, exported, evaluated at 32 px and 64 px (2x), zero-shot on the synthetic folder
    assert [c["name"] for c in summary["cells"]] == ["base", "recon-only"]
    for c in summary["cells"]:
        m = c["metrics"]
        # the summary carries each seed's own evaluation and the trainer's last loss, unchanged
        seed0 = json.loads((out / "cells" / c["name"] / "seed0" / "result.json").read_text())["metrics"]
        run_dir = out / "cells" / c["name"] / "seed0" / "train"
        last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
        assert m["train_loss"]["values"] == [last["loss"]] and seed0["train_loss"] == last["loss"]
        for k in ("psnr", "psnr@2x", "ssim", "mean_usage_pct", "zeroshot_top1", "zeroshot_top5"):
            assert m[k]["values"] == [seed0[k]] and m[k]["mean"] == seed0[k], (c["name"], k)
        evaluated = json.loads((out / "cells" / c["name"] / "seed0" / "eval_1x" / "metrics.json").read_text())
        assert seed0["psnr"] == evaluated["psnr"] and 0 < seed0["psnr"] < 60 and 0 < seed0["psnr@2x"] < 60
        assert m["zeroshot_classes"]["mean"] == 54 and c["seeds"] == [0]  # the synthetic world's scenes
        assert (run_dir / "export" / "model.safetensors").is_file()
        assert (run_dir / "latest").read_text() == "step-00000003"
    cfg = json.loads((out / "cells" / "recon-only" / "seed0" / "train" / "config.json").read_text())["config"]
    assert cfg["loss"]["clip"] == 0.0 and cfg["gan"]["enabled"] is False and cfg["total_steps"] == 3

    # results: JSON, markdown table (recon-only hides zero-shot), plot
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    table = (out / "results.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| recon-only "))
    assert row.split("|")[-4].strip() == "-"  # the zero-shot top-5 column
    assert "PSNR 64px (2x)" in table and "| base | reference |" in table
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
