"""Benchmark scripts: issue 14's configuration and table, the tokenizer rows run the trainer's own step, and
benchmarks/gpu_check.sh (its tiny CPU mode end to end, its GPU-mode command lines, its failure rows)."""
import importlib.util
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    """benchmarks/NAME.py as a module (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


def test_issue14_config_is_the_issues():
    tt = load("tokenizer_throughput")
    a = tt.parse(tt.Options, ["--config", "issue14"], prog="t")
    assert (a.presets, a.res, a.batch, a.grad_checkpointing, a.drop_path) == (["base"], 256, 4, True, 0.0)
    assert (a.no_optimizer_step, a.iters, a.runs, a.rows, a.device) == (True, 3, 2, ["step", "full"], "cpu")
    with pytest.raises(SystemExit) as e:  # a flag the configuration sets is refused, not silently overridden
        tt.parse(tt.Options, ["--config", "issue14", "--batch", "16"], prog="t")
    assert e.value.code == 2


def test_issue14_table_pass_fail():
    tt = load("tokenizer_throughput")
    step = {"row": "step", "train": 0.16, "step_adds_gb": 3.4, "encode": 2.9, "decode": 0.5}
    full = {"row": "full", "train": 0.05, "step_adds_gb": 5.0}
    lines = tt.issue14_table([step, full])
    by_label = {ln.split(" | ")[0].lstrip("| "): ln for ln in lines[2:]}
    assert by_label[tt.ISSUE14_TARGETS[0][1]].endswith("| >= 0.15 | PASS |")
    assert by_label[tt.ISSUE14_TARGETS[1][1]].endswith("| <= 3.0 | FAIL |")
    assert by_label[tt.ISSUE14_TARGETS[2][1]].endswith("| >= 2.9 | PASS |")  # the target itself passes
    assert by_label[tt.ISSUE14_TARGETS[3][1]].endswith("| >= 0.87 | FAIL |")
    assert len(lines) == 2 + 4 + 2


@pytest.fixture
def one_thread():
    """One torch thread for the test: it checks wiring, not speed, and on a busy 2-core machine two threads
    that spin-wait for each other made it 10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_tokenizer_rows_run_the_trainers_step(one_thread):
    """`step` is reconstruction + VQ + contrastive; `full` adds LPIPS, the generator's GAN term and a
    discriminator update, all through unitok.train.TokenizerTask."""
    tt = load("tokenizer_throughput")
    cpu = torch.device("cpu")
    batch = {"images": torch.rand(2, 3, 48, 48) * 2 - 1, "texts": torch.randint(0, 100, (2, 16))}
    for row, full in (("step", False), ("full", True)):
        job = tt.Job("debug", row, "cpu", "fp32", 48, 2, 1, True, 0.0, False, "debug", codec=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the random VGG / DINOv2 backbones
            task, cfg = tt.build_task(job, cpu)
        assert cfg.model.grad_checkpointing and cfg.model.encoder.drop_path == cfg.model.decoder.drop_path == 0.0
        # --no-optimizer-step: no optimizer in the `step` row; the full row steps both, as the trainer does
        assert (task.engine.optimizer is not None) == full
        out = task.forward(batch, cfg.total_steps // 2)
        assert {"vq", "clip"} <= set(out) and ("lpips" in out) == ("g" in out) == full
        if full:
            assert float(out["lpips"].detach()) > 0 and float(out["g_weight"]) > 0
        d = task.backward(out, batch, cfg.total_steps // 2)
        assert ("d_loss" in d) == full
        assert all(p.grad is None for p in task.model.parameters())  # freed after each step, as measured
    r = tt.measure(tt.Job("debug", "step", "cpu", "fp32", None, 2, 1, False, None, True, "debug", codec=True))
    assert r["train"] > 0 and r["encode"] > 0 and r["decode"] > 0 and r["step_adds_gb"] >= 0 and r["optimizer_step"]


def test_md_table_reads_the_last_table():
    gc = load("gpu_check")
    text = "noise\n| a | b |\n|---|---|\n| 1 | 2 |\nmore\n| x | y z |\n|---|---|\n| 3 | 4 |\n| 5 | 6 |\n"
    assert gc.md_table(text) == [{"x": "3", "y z": "4"}, {"x": "5", "y z": "6"}]
    with pytest.raises(ValueError):
        gc.md_table("no table")


def test_gpu_check_failed_steps_are_fail_rows(tmp_path):
    gc = load("gpu_check")
    figs = [("area", "fig 1"), ("area", "fig 2")]
    py = sys.executable
    read = lambda out: [gc.Row("area", "fig 1", gc.md_table(out)[0]["v"], "ok")]  # noqa: E731
    cases = {
        "exit": ([py, "-c", "raise SystemExit(3)"], "FAIL (exit status 3"),
        "timeout": ([py, "-c", "import time; time.sleep(30)"], "FAIL (timeout 1 s"),
        "garbage": ([py, "-c", "print('no table here')"], "FAIL (unreadable output: ValueError"),
    }
    for name, (argv, status) in cases.items():
        rows, _ = gc.run_step(gc.Step(name, argv, 1.0 if name == "timeout" else 20.0, read, figs), tmp_path, {})
        assert [(r.figure, r.value) for r in rows] == [("fig 1", "-"), ("fig 2", "-")]
        assert all(r.status.startswith(status) for r in rows), rows
        assert (tmp_path / "logs" / f"{name}.log").read_text().startswith("$ ")
    rows, _ = gc.run_step(gc.Step("ok", [py, "-c", "print('| v |'); print('|---|'); print('| 7 |')"], 20.0, read,
                                  figs), tmp_path, {})
    assert [(r.value, r.status) for r in rows] == [("7", "ok")]


def test_gpu_check_gpu_mode_command_lines_parse(tmp_path, monkeypatch):
    """The GPU-mode steps' flags are valid for their scripts (checked here, where no GPU runs them)."""
    import tyro

    gc = load("gpu_check")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    steps = {s.name: s for s in gc.steps(cpu=False, out=tmp_path)}
    assert sum(s.timeout_s for s in steps.values()) <= 8 * 60
    for name in ("tokenizer", "generation", "attention"):
        mod = load({"tokenizer": "tokenizer_throughput", "generation": "generation",
                    "attention": "attention_parity"}[name])
        a = mod.parse(mod.Options, steps[name].argv[2:], prog=name)
        assert a.device == "cuda"
    a = tyro.cli(load("mllm_train").BenchConfig, args=steps["mllm"].argv[2:])
    assert (a.hidden, a.layers, a.heads, a.ranks, a.ds_config) == (2048, 16, 16, (1,), "zero3")
    assert a.hidden // a.heads <= 256  # flash-attn's largest head width


def test_gpu_check_needs_a_gpu_or_cpu_mode(tmp_path, monkeypatch, capsys):
    gc = load("gpu_check")
    monkeypatch.delenv("GPU_CHECK_MODE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gc.main(["--out", str(tmp_path)]) == 2
    assert "--cpu" in capsys.readouterr().err


def test_gpu_check_fails_at_once_without_its_packages_and_reads_a_broken_flash_attn(tmp_path, monkeypatch, capsys):
    """On a bare GPU machine (no tyro, deepspeed, ...) the script died at its first import with a traceback; a
    flash-attn wheel built for another torch (installed, failing on import) lost the whole table after 8 minutes,
    and the MLLM row said flash-attn while the trainer used SDPA; an inherited DS_ACCELERATOR=cpu reached the GPU
    steps."""
    gc = load("gpu_check")
    monkeypatch.setattr(gc, "NEEDED", (*gc.NEEDED, "no_such_package_xyz"))
    assert gc.main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "cannot import no_such_package_xyz (ModuleNotFoundError" in err and "benchmarks/gpu_wheels.sh" in err
    fake = tmp_path / "site" / "flash_attn"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('flash_attn_2_cuda.so: undefined symbol: _ZN3c10')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert gc.flash_attn_version() is None
    steps = {s.name: s for s in gc.steps(cpu=False, out=tmp_path)}
    assert steps["mllm"].figures[0][0].endswith("SDPA (flash-attn not importable)")
    assert "flash-attn not importable" in gc.header(True, tmp_path)[0]
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert "DS_ACCELERATOR" not in gc.step_env(cpu=False) and gc.step_env(cpu=True)["DS_ACCELERATOR"] == "cpu"
    # the attention step reads it as absent too: a skip row and exit 0 (it died with the ImportError: a FAIL row)
    rows = load("attention_parity").main(["--impls", "flash_attention_2", "sdpa", "--json", str(tmp_path / "a.json")])
    assert [(r["status"], r["error"]) for r in rows] == [("flash-attn not importable", None)]


def test_demo_floors_freezes_only_the_named_steps(monkeypatch):
    """--frozen STEP appends learning rate 1e-9 to that step's trainer command line, and to no other."""
    from experiments import demo

    calls = []
    monkeypatch.setattr(demo, "_deepspeed", lambda module, args, ranks, log: calls.append((module, args)))
    df = load("demo_floors")
    df.freeze(("stage2",))
    for module, args in (("unitok.train", ["--optim.lr", "1e-3"]), ("unitok.extract", ["--size", "32"]),
                         ("mllm.train", ["--stage", "pretrain", "--optim.lr", "2e-3"]),
                         ("mllm.train", ["--stage", "finetune", "--optim.lr", "1e-3"])):
        demo._deepspeed(module, args, 2, None)
    assert [a[-2:] == ["--optim.lr", "1e-9"] for _, a in calls] == [False, False, False, True]
    with pytest.raises(SystemExit):  # a step name that is not one is a usage error
        df.main(["--frozen", "stage3"])


def test_demo_floors_table_marks_failures():
    df = load("demo_floors")
    rows = {0: [("psnr", 12.5, ">= 11.0", True), ("l2 ratio", 0.5, "<= 0.75", True)],
            1: [("psnr", 10.0, ">= 11.0", False), ("l2 ratio", 0.6, "<= 0.75", True)]}
    lines = df.table(rows)
    assert lines[2] == "| 0 | 12.500 | 0.500 |" and lines[3] == "| 1 | 10.000 FAIL | 0.600 |"
    assert lines[4:] == ["| min | 10.000 | 0.500 |", "| max | 12.500 | 0.600 |", "| bound | >= 11.0 | <= 0.75 |"]


@pytest.mark.slow
def test_gpu_check_cpu_mode(tmp_path):
    """The whole script in its tiny CPU mode: every row has a value and none failed (~75 s on 2 busy cores)."""
    p = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu", "--out", str(tmp_path),
                        "--timeout-scale", "2"], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    table = (tmp_path / "table.md").read_text()
    assert table.strip() in p.stdout
    gc = load("gpu_check")
    rows = gc.md_table(table)
    figures = [(r["area"].split(",")[0].split(" ")[0], r["figure"].split(" (")[0]) for r in rows]
    assert figures == [("tokenizer", "train images/s, full step"), ("tokenizer", "peak memory GB"),
                       ("tokenizer", "encode images/s"), ("tokenizer", "decode images/s"),
                       ("MLLM", "tokens/s"), ("MLLM", "MFU %"),
                       ("generation", "cached text-to-image positions/s"), ("generation", "answer tokens/s"),
                       ("attention", "max abs logit difference / max abs logit")]
    assert all(r["value"] not in ("", "-") and r["status"] == "ok" for r in rows), table
    for step in ("tokenizer", "mllm", "generation", "attention"):
        assert (tmp_path / "logs" / f"{step}.log").is_file()
    assert not list((tmp_path / "mllm").glob("run_*/step-*"))  # --no-save-final: no ZeRO-3 state written (12 GB at 1B)
