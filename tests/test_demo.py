"""The embedded demo, reduced (--quick): every stage runs through the real launchers, the report
meets floors set from measured runs, and a second run resumes instead of redoing work."""
import json
import subprocess
import sys
import time
from unittest import mock

import pytest

from experiments.demo import GENERATION, quick_checks
from runtime.launch import ROOT, ds_env


@pytest.mark.slow  # multi-process launches (deselect with -m 'not slow')
def test_quick_demo_end_to_end_and_resume(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "experiments.demo", "--out", str(out), "--quick"]
    p = subprocess.run(cmd, cwd=ROOT, env=ds_env(), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rep = json.loads((out / "report" / "report.json").read_text())
    failed = [row for row in quick_checks(out) if not row[3]]  # QUICK_FLOORS and QUICK_LOSS_CEILINGS
    assert not failed, f"below the quick run's floors (name, value, bound): {[row[:3] for row in failed]}"
    # the MLLM's held-out metrics stay near chance in a run this short, so they have no floor (the full demo's
    # figures are in README.md); the resumed run below must reproduce them
    assert {"zeroshot_shape_top1", "zeroshot_color_top1", "vqa_accuracy", "generation_match",
            "generation_match_one_sample"} <= set(rep)
    assert rep["generation"] == GENERATION  # the report says how its images were drawn
    for d in ("tokenizer/export", "stage1/export", "stage2/export"):
        assert (out / d / "config.json").is_file()
    assert len(list((out / "report").glob("generated_*.png"))) == 3
    # the checker reads every held-out render right (its validation), and the two PNG grids hold one row per
    # generated image (3) and per shown reconstruction (12): 32 px tiles enlarged 3x, 4 px apart
    assert rep["checker_on_renders"] == 100.0 and 0 <= rep["checker_on_reconstructions"] <= 100
    from PIL import Image

    for name, rows, tiles in (("generation_grid.png", 3, 1), ("reconstruction_grid.png", 12, 2)):
        w, h = Image.open(out / "report" / name).size
        assert h == 4 + rows * (96 + 4) and w == 4 + tiles * (96 + 4) + 430, (name, w, h)
    assert list((out / "report" / "chat").glob("*.png"))  # the chat script's /gen one-shot wrote an image
    assert json.loads((out / "report" / "chat.json").read_text())["expected"]
    timing = json.loads((out / "timing.json").read_text())  # every step's seconds and host, and the sum
    steps = ["data", "text model", "tokenizer", "codes", "stage 1", "stage 2", "chat", "report"]
    assert list(timing["steps"]) == steps and all(t["seconds"] >= 0 and t["host"] for t in timing["steps"].values())
    assert all(timing["steps"][k]["seconds"] > 1 for k in ("tokenizer", "stage 1", "stage 2"))
    assert timing["total_seconds"] == pytest.approx(sum(t["seconds"] for t in timing["steps"].values()), abs=0.1)
    assert "pipeline: " in p.stdout and "tokenizer: " in p.stdout
    # a second run skips every finished step and reproduces the report
    p2 = subprocess.run(cmd, cwd=ROOT, env=ds_env(), capture_output=True, text=True, timeout=600)
    assert p2.returncode == 0, p2.stdout[-3000:]
    assert "tokenizer: exported" in p2.stdout and "stage 2: exported" in p2.stdout and "chat: done" in p2.stdout
    rep2 = json.loads((out / "report" / "report.json").read_text())
    assert rep2 == rep  # deterministic: the resumed run recomputes the same report
    timing2 = json.loads((out / "timing.json").read_text())  # the skipped steps keep the first run's times
    assert {k: timing2["steps"][k] for k in steps[:-1]} == {k: timing["steps"][k] for k in steps[:-1]}


def _write_run(out, psnr=12.5, usage=35.0, stage2_text=(5.0, 4.3)):
    """A finished quick run's files as the checks read them: report.json and each run's metrics.jsonl (6 steps,
    every loss falling from its first value to its last linearly)."""
    (out / "report").mkdir(parents=True)
    (out / "report" / "report.json").write_text(json.dumps({"recon_psnr": psnr, "codebook_usage_pct": usage}))
    falls = {"tokenizer": {"l2": (0.7, 0.3), "clip": (4.8, 2.5)},
             "stage1": {"text_loss": (6.0, 5.0), "image_loss": (4.0, 3.3)},
             "stage2": {"text_loss": stage2_text, "image_loss": (3.1, 3.1)}}
    for run, losses in falls.items():
        (out / run).mkdir()
        rows = [{"step": i + 1, **{k: a + (b - a) * i / 5 for k, (a, b) in losses.items()}} for i in range(6)]
        (out / run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_quick_checks_fail_on_a_stage_that_does_not_learn(tmp_path):
    _write_run(tmp_path / "ok")
    rows = quick_checks(tmp_path / "ok")
    assert all(ok for *_, ok in rows) and len(rows) == 7
    assert dict((name, value) for name, value, _, _ in rows)["stage2 text_loss ratio"] == pytest.approx(
        (4.58 + 4.44 + 4.3) / (5.0 + 4.86 + 4.72))
    _write_run(tmp_path / "frozen", usage=3.0, stage2_text=(5.0, 4.95))  # a collapsed codebook, a frozen stage 2
    failed = [name for name, _, _, ok in quick_checks(tmp_path / "frozen") if not ok]
    assert failed == ["codebook_usage_pct", "stage2 text_loss ratio"]
    # a step without image tokens (image_loss null) is left out of the ratio
    stage1 = tmp_path / "ok" / "stage1" / "metrics.jsonl"
    ratio = dict((name, value) for name, value, _, _ in rows)["stage1 image_loss ratio"]
    stage1.write_text(stage1.read_text() + '{"step": 7, "text_loss": 5.0, "image_loss": null}\n')
    assert dict((name, value) for name, value, _, _ in quick_checks(tmp_path / "ok"))["stage1 image_loss ratio"] == ratio
    (tmp_path / "ok" / "stage2" / "metrics.jsonl").write_text('{"step": 1, "loss": 4.0}\n')  # no text_loss logged
    with pytest.raises(ValueError, match=r"stage2/metrics.jsonl: 0 logged steps with 'text_loss'"):
        quick_checks(tmp_path / "ok")


def test_a_folder_of_other_sizes_is_not_resumed(tmp_path):
    """`make demo` after a --quick run into the same folder (or after DemoSizes changed) would skip every finished
    step and report on the old models: it stops before any step, naming the sizes that differ and --fresh."""
    from dataclasses import asdict

    from experiments import demo

    out = tmp_path / "demo"
    demo.check_sizes(out, demo.QUICK)  # a new folder: accepted and recorded
    assert json.loads((out / "sizes.json").read_text())["tokenizer_steps"] == demo.QUICK.tokenizer_steps
    demo.check_sizes(out, demo.QUICK)  # the same sizes resume
    with pytest.raises(RuntimeError, match=r"tokenizer_steps: 40 -> 2400.*--fresh") as e:
        demo.run(out, demo.DemoSizes())
    assert "image_size: 32 -> 64" in str(e.value)
    assert sorted(p.name for p in out.iterdir()) == ["sizes.json"]  # no step ran
    # a run from before sizes.json: its report names the sizes it was trained with
    old = tmp_path / "old"
    (old / "report").mkdir(parents=True)
    (old / "report" / "report.json").write_text(json.dumps({"sizes": asdict(demo.QUICK)}))
    with pytest.raises(RuntimeError, match="report.json"):
        demo.check_sizes(old, demo.DemoSizes())
    demo.check_sizes(old, demo.QUICK)
    assert (old / "sizes.json").is_file()
    # --fresh deletes the folder first, so the new sizes start over
    with mock.patch.object(demo, "step_data", side_effect=RuntimeError("first step reached")):
        with pytest.raises(RuntimeError, match="first step reached"):
            demo.run(out, demo.DemoSizes(), fresh=True)
    assert json.loads((out / "sizes.json").read_text())["tokenizer_steps"] == 2400
    # an unreadable sizes.json (a kill while it was written, before it was written atomically): one clear line
    (out / "sizes.json").write_text('{"num_images": 7')
    with pytest.raises(RuntimeError, match=r"sizes.json is unreadable .*--fresh"):
        demo.check_sizes(out, demo.DemoSizes())
    # --seed N on a folder trained with another seed skipped every finished step and reported the old models
    (out / "stage1").mkdir()
    (out / "stage1" / "config.json").write_text(json.dumps({"config": {"seed": 0}}))
    demo.check_seed(out, 0)
    with pytest.raises(RuntimeError, match=r"stage1 was trained with --seed 0: for --seed 1, rerun with --fresh"):
        demo.check_seed(out, 1)


def test_an_interrupted_step_keeps_its_time_and_a_second_demo_is_refused(tmp_path, monkeypatch):
    """timing.json kept only the last attempt's seconds (a tokenizer killed twice read 21 s for 95 s of work):
    a running step's entry is refreshed as partial, and the next attempt adds to it. A second demo on the same
    folder is refused while the first runs."""
    from experiments import demo

    out = tmp_path / "demo"
    monkeypatch.setattr(demo, "HEARTBEAT_S", 0.05)
    monkeypatch.setattr(demo, "check_sizes", lambda out, sizes: out.mkdir(parents=True, exist_ok=True))

    def killed(*args):  # the step works for a while, then its process dies (as seen by the next run)
        time.sleep(0.6)
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "step_data", killed)
    with pytest.raises(KeyboardInterrupt):
        demo.run(out, demo.QUICK)
    first = json.loads((out / "timing.json").read_text())["steps"]["data"]
    assert first["partial"] and 0.4 <= first["seconds"] <= 0.8, first
    with pytest.raises(RuntimeError, match="another demo is running on"):
        with demo._lock(out):
            demo.run(out, demo.QUICK)
    monkeypatch.setattr(demo, "step_data", lambda *a: time.sleep(0.3))
    stop = RuntimeError("after the data step")
    monkeypatch.setattr(demo, "step_text_model", mock.Mock(side_effect=stop))
    with pytest.raises(RuntimeError, match="after the data step"):
        demo.run(out, demo.QUICK)
    done = json.loads((out / "timing.json").read_text())["steps"]["data"]
    assert "partial" not in done and done["attempts"] == 2 and first["seconds"] + 0.3 <= done["seconds"] < 2, done
    assert "1 s (" in demo.format_timing({"steps": {"data": done}, "total_seconds": 1}, ["data"]) and \
        "2 attempts" in demo.format_timing({"steps": {"data": done}, "total_seconds": 1}, ["data"])
