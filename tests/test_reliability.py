"""Reliability: safe loading everywhere, config validation before any engine starts, the NaN guard."""
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.launch import ROOT, ds_env

LIBRARY_DIRS = ("unitok", "mllm", "runtime")


def _sources():
    for d in LIBRARY_DIRS:
        yield from (ROOT / d).rglob("*.py")


def test_every_torch_load_is_weights_only_and_nothing_unpickles():
    offenders = []
    for f in _sources():
        text = f.read_text()
        for m in re.finditer(r"torch\.load\((?:[^()]|\([^()]*\))*\)", text):
            if "weights_only=True" not in m.group(0):
                offenders.append(f"{f.relative_to(ROOT)}: {m.group(0)[:80]}")
        for bad in ("pickle.load", "weights_only=False", "trust_remote_code=True"):
            if bad in text:
                offenders.append(f"{f.relative_to(ROOT)}: {bad}")
    assert offenders == []


def test_tokenizer_trainer_config_errors_name_the_problem(tmp_path):
    from unitok.train import parse_config

    with pytest.raises(ValueError, match="lpips-weights"):
        parse_config(["--preset", "debug"])
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        parse_config(["--preset", "debug", "--loss.lpips-weights", str(tmp_path / "nope.pth"), "--gan.no-enabled"])
    with pytest.raises(ValueError, match="dino-weights"):
        parse_config(["--preset", "debug", "--loss.lpips", "0"])
    with pytest.raises(SystemExit):  # __post_init__ ValueError, reported by tyro: context length mismatch
        parse_config(["--preset", "debug", "--data.context-length", "77", "--loss.lpips", "0", "--gan.no-enabled"])
    with pytest.raises(SystemExit):  # tyro: unknown flag
        parse_config(["--preset", "debug", "--no-such-flag", "1"])
    ok = ["--preset", "debug", "--loss.lpips", "0", "--gan.no-enabled"]
    with pytest.raises(ValueError, match=r"--ds-config zero3 \(.*zero3.json\) is ZeRO-3: the tokenizer trains with "
                                         r"ZeRO 0-2"):  # it broke at the GAN's start or at the export
        parse_config([*ok, "--ds-config", "zero3"])
    with pytest.raises(FileNotFoundError, match="DeepSpeed config not found: .*nope.json"):
        parse_config([*ok, "--ds-config", "nope"])
    assert parse_config([*ok, "--ds-config", "zero2"]).ds_config == "zero2"


def test_mllm_trainer_config_errors_name_the_problem(tmp_path, capsys):
    from mllm.train import parse_config

    with pytest.raises(ValueError, match="init-from"):
        parse_config(["--stage", "finetune"])
    with pytest.raises(ValueError, match="llama-dir"):
        parse_config(["--stage", "pretrain"])
    with pytest.raises(FileNotFoundError, match="config.json"):
        parse_config(["--stage", "finetune", "--init-from", str(tmp_path)])
    with pytest.raises(SystemExit):  # __post_init__ ValueError, reported by tyro
        parse_config(["--stage", "pretrain", "--trainable", "everything"])
    with pytest.raises(SystemExit):
        parse_config(["--stage", "pretrain", "--no-save-final"])
    assert "--no-save-final needs --no-export" in capsys.readouterr().err
    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"no weights in .*export \(model\*.safetensors or pytorch_model"):
        parse_config(["--stage", "finetune", "--init-from", str(export)])  # before the model is built
    (export / "model.safetensors").touch()
    assert parse_config(["--stage", "finetune", "--init-from", str(export)]).optim.lr == 2e-5
    assert parse_config(["--stage", "finetune", "--init-from", str(export), "--optim.lr", "1e-6"]).optim.lr == 1e-6
    with pytest.raises(SystemExit):  # not "use the stage's rate"
        parse_config(["--stage", "finetune", "--init-from", str(export), "--optim.lr", "0"])
    assert "--optim.lr must be positive, got 0.0" in capsys.readouterr().err
    for extra in (["--llama-dir", str(export)], ["--tokenizer", str(export)], ["--mllm", "depth_num_layers", "1"],
                  ["--tokenizer-attn-mode", "causal"]):
        with pytest.raises(ValueError, match=f"{extra[0]} cannot be combined with --init-from"):
            parse_config(["--stage", "finetune", "--init-from", str(export), *extra])


@pytest.mark.slow  # a real training process
def test_nan_loss_is_skipped_and_reported(tmp_path):
    from experiments.synthetic import write_shards

    write_shards(tmp_path / "shards", 2, 16, size=32, seed=0)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "unitok.train", "--preset", "debug", "--run-dir", str(run), "--data.shards",
           str(tmp_path / "shards" / "{00000..00001}.tar"), "--data.local-batch-size", "4",
           "--data.num-workers", "0", "--total-steps", "4", "--save-every", "4", "--log-every", "1",
           "--loss.lpips", "0", "--gan.no-enabled", "--debug.nan-at-step", "2", "--no-export"]
    p = subprocess.run(cmd, cwd=ROOT, env=ds_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    log = (run / "log.txt").read_text()
    assert "non-finite loss" in log and "'loss': nan" in log
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2, 3, 4] and all(s["loss"] == s["loss"] for s in steps)
    # the usage EMA counts the 4 trained micro batches: the dropped one's codes left no trace (it counted 5)
    from runtime.checkpoint import CheckpointManager

    assert CheckpointManager.load_rank_state(run / "step-00000004")["task"]["usage_steps"] == 4
    # resuming a finished run trains nothing and still exports
    p = subprocess.run([c for c in cmd if c != "--no-export"], cwd=ROOT, env=ds_env(), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert (run / "export" / "model.safetensors").is_file()
    # with nan_policy=stop the run exits non-zero and keeps the last good checkpoint
    run2 = tmp_path / "run2"
    cmd2 = [c if c != str(run) else str(run2) for c in cmd] + ["--nan-policy", "stop", "--save-every", "1"]
    p2 = subprocess.run(cmd2, cwd=ROOT, env=ds_env(), capture_output=True, text=True, timeout=300)
    assert p2.returncode == 3
    assert (run2 / "latest").read_text() == "step-00000001"


def test_step_record_weights_per_token_losses_by_their_counts():
    """A micro batch without image tokens logs image_loss 0 (mllm/modeling/modeling.py); the step's record must
    average the image loss over the micro batches that had image tokens, weighted by how many."""
    from runtime.loop import step_means

    weighted = {"text_loss": "text_tokens", "image_loss": "image_tokens"}
    micro = [{"loss": 6.0, "text_loss": 6.0, "image_loss": 0.0, "text_tokens": 30.0, "image_tokens": 0.0},
             {"loss": 4.0, "text_loss": 5.0, "image_loss": 3.0, "text_tokens": 10.0, "image_tokens": 64.0},
             {"loss": 3.5, "text_loss": 4.0, "image_loss": 3.5, "text_tokens": 0.0, "image_tokens": 32.0}]
    rec = step_means(micro, weighted)
    assert rec["loss"] == pytest.approx((6.0 + 4.0 + 3.5) / 3)  # the objective: a plain mean, as before
    assert rec["image_loss"] == pytest.approx((3.0 * 64 + 3.5 * 32) / 96)  # not (0 + 3 + 3.5) / 3
    assert rec["text_loss"] == pytest.approx((6.0 * 30 + 5.0 * 10) / 40)
    assert (rec["text_tokens"], rec["image_tokens"]) == (40, 96) and isinstance(rec["image_tokens"], int)
    assert list(rec) == list(micro[0])
    text_only = step_means(micro[:1], weighted)  # no image token in the whole step: null, not 0
    assert text_only["image_loss"] is None and text_only["text_loss"] == 6.0
    assert step_means(micro, {}) == {k: pytest.approx(sum(m[k] for m in micro) / 3) for k in micro[0]}
    # a discriminator update skipped in one micro batch: its terms are the mean of the others (they were halved)
    assert step_means([{"loss": 1.0, "d_loss": 2.0}, {"loss": 3.0}], {}) == {"loss": 2.0, "d_loss": 2.0}


def test_step_record_weights_per_token_losses_over_every_rank(monkeypatch):
    """The logged text/image losses were rank 0's micro batches alone (1/world of the tokens), and the image loss
    null on a step where rank 0 had no image though other ranks trained on images."""
    import torch.distributed as dist

    import runtime.distributed
    from runtime.loop import all_rank_means, step_means

    monkeypatch.setattr(runtime.distributed, "get_world_size", lambda: 2)
    weighted = {"text_loss": "text_tokens", "image_loss": "image_tokens"}
    rank0 = step_means([{"loss": 6.0, "text_loss": 6.0, "image_loss": 0.0, "text_tokens": 30, "image_tokens": 0}],
                       weighted)
    rank1 = step_means([{"loss": 4.0, "text_loss": 5.0, "image_loss": 3.0, "text_tokens": 10, "image_tokens": 64}],
                       weighted)
    assert rank0["image_loss"] is None

    def all_reduce(x, op=None):  # rank 0's view of a 2-rank sum: rank 1 sends what all_rank_means makes of its record
        sent = []
        monkeypatch.setattr(dist, "all_reduce", lambda y, op=None: sent.append(y.clone()))
        all_rank_means(rank1, weighted)
        monkeypatch.setattr(dist, "all_reduce", all_reduce)
        x += sent[0]

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    both = all_rank_means(rank0, weighted)
    assert both == {"text_loss": pytest.approx((6.0 * 30 + 5.0 * 10) / 40), "text_tokens": 40,
                    "image_loss": pytest.approx(3.0), "image_tokens": 64}


def test_mfu_peak_comes_from_the_device_table_or_the_flag(recwarn):
    from mllm.train import MllmTrainConfig, peak_flops

    cfg = MllmTrainConfig()
    names = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H200": 989e12,
             "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA L40S": 362e12, "NVIDIA L40": 181e12, "NVIDIA L4": 121e12}
    assert {n: peak_flops(cfg, n) for n in names} == names
    assert peak_flops(cfg, "NVIDIA GeForce RTX 9999") is None  # unknown: no guessed MFU ...
    assert any("RTX 9999" in str(w.message) and "--peak-tflops" in str(w.message) for w in recwarn)  # ... said once
    assert peak_flops(MllmTrainConfig(peak_tflops=100.0), "NVIDIA GeForce RTX 9999") == 100e12


def test_stop_signals_are_remembered_not_fatal_and_restored():
    """In-process: SIGTERM and SIGUSR1 are caught while a run trains (the first one is kept, repeats change
    nothing), `agreed` reads it without a process group, and `restore` puts the previous handlers back."""
    import os
    import signal

    from runtime.run import STOP_SIGNALS, StopSignals

    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    signals = StopSignals()
    try:
        assert signals.agreed("cpu") == 0
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # would end the process without the handler
        assert signals.received == signal.SIGUSR1 and signals.agreed("cpu") == signal.SIGUSR1
    finally:
        signals.restore()
    assert {s: signal.getsignal(s) for s in STOP_SIGNALS} == before


def test_a_rank_that_inherits_ignored_stop_signals_still_catches_them_once_it_trains():
    """launch/slurm_node.sh starts the launcher with SIGTERM and SIGUSR1 ignored and a rank inherits SIGUSR1 so
    (deepspeed's launch.py handles SIGTERM, which gives its ranks the default back): ignored while it starts
    up (slurm_node.sh repeats a warning until the launcher exits), caught once the loop's handler is set."""
    import signal
    import subprocess
    import sys

    from runtime.launch import ROOT

    code = ("import os, signal; from runtime.run import StopSignals; "
            "print(signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN); os.kill(os.getpid(), signal.SIGUSR1); "
            "s = StopSignals(); os.kill(os.getpid(), signal.SIGUSR1); print(s.received == signal.SIGUSR1)")
    p = subprocess.run(["bash", "-c", 'trap "" TERM USR1; exec "$@"', "bash", sys.executable, "-c", code], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout == "True\nTrue\n", (p.returncode, p.stdout, p.stderr[-2000:])


WORKER_SCRIPT = """
import os, subprocess, sys, time, torch
from runtime.run import worker_stop_signals

class Count(torch.utils.data.IterableDataset):
    def __iter__(self):
        i = 0
        while True:
            yield i
            i += 1

def batches(loader):
    while True:
        yield from loader

it = batches(torch.utils.data.DataLoader(Count(), batch_size=None, num_workers=1, worker_init_fn=worker_stop_signals))
next(it)
worker = [int(p) for p in os.listdir("/proc") if p.isdigit() and open(f"/proc/{p}/stat").read().split()[3] == str(os.getpid())]
assert len(worker) == 1, worker
subprocess.run(["kill", "-TERM", str(worker[0])], check=True)  # sent by another process: a scheduler, a launcher
time.sleep(1)
print("worker alive after an outside SIGTERM:", os.path.exists(f"/proc/{worker[0]}"), next(it), flush=True)
raise RuntimeError("a crash with the loader still open")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; sigwaitinfo is Linux's")
def test_data_workers_ignore_outside_stop_signals_and_still_end_with_a_crashed_rank():
    """A loader worker survives a SIGTERM from another process (the rank finishes its step with it) and still
    ends when its rank exits after an uncaught error: Python's exit signals it and waits for it, which hung
    forever while workers ignored the signal whatever its sender."""
    p = subprocess.run([sys.executable, "-c", WORKER_SCRIPT], cwd=ROOT, env=ds_env(), capture_output=True,
                       text=True, timeout=120)
    assert "worker alive after an outside SIGTERM: True 1" in p.stdout, p.stdout + p.stderr[-2000:]
    assert p.returncode == 1 and "a crash with the loader still open" in p.stderr


def _fake_steps(ckpts, *steps):
    """Finished step folders as a run leaves them (trainer_state.json; no engine state is needed here)."""
    from runtime.checkpoint import step_name

    for s in steps:
        (ckpts.run_dir / step_name(s)).mkdir(parents=True)
        (ckpts.run_dir / step_name(s) / "trainer_state.json").write_text(json.dumps({"step": s}))


def test_checkpoints_of_a_rewound_run_keep_the_step_just_saved(tmp_path):
    """A run resumed from an earlier step of its folder: pruning kept the highest step numbers, so the step just
    saved was deleted and `latest` fell back to the rewound run's last step (resume and export then used it)."""
    from runtime.checkpoint import CheckpointManager

    ckpts = CheckpointManager(tmp_path / "run", keep_last=2)
    _fake_steps(ckpts, 500, 1000, 1500, 2000)
    assert ckpts.resolve(str(ckpts.run_dir / "step-00000500")) == ckpts.run_dir / "step-00000500"
    for step in (600, 700, 800):
        ckpts.save(step, lambda tmp: None, {}, {"step": step})
        assert ckpts.latest() == ckpts.run_dir / f"step-{step:08d}" == ckpts.resolve("auto")
    assert ckpts.complete_steps() == [700, 800, 1000, 1500, 2000]  # 1000-2000: replaced when the run gets there
    ckpts.save(1000, lambda tmp: None, {}, {"step": 1000, "new": True})
    assert ckpts.complete_steps() == [800, 1000, 1500, 2000]
    assert json.loads((ckpts.resolve("auto") / "trainer_state.json").read_text()) == {"step": 1000, "new": True}


def test_resume_flag_refuses_what_would_mix_runs_and_takes_a_run_folder(tmp_path):
    from runtime.checkpoint import CheckpointManager

    ckpts = CheckpointManager(tmp_path / "run")
    assert ckpts.resolve("none") is None and ckpts.resolve("auto") is None  # a new folder
    _fake_steps(ckpts, 2, 4)
    with pytest.raises(FileExistsError, match=r"--resume none: .*run holds checkpoints of an earlier run \(up to "
                                              r"step-00000004\); --resume auto continues it"):
        ckpts.resolve("none")
    assert ckpts.resolve(str(ckpts.run_dir)) == ckpts.run_dir / "step-00000004"  # a run folder: its latest
    (ckpts.run_dir / "latest").write_text("step-00000002")
    assert ckpts.resolve(str(ckpts.run_dir)) == ckpts.run_dir / "step-00000002"
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"--resume .*empty: .* is not a checkpoint \(no trainer_state.json\)"):
        ckpts.resolve(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        ckpts.resolve(str(tmp_path / "missing"))


def test_metrics_file_cut_short_by_a_full_disk_still_resumes(tmp_path):
    """A half-written last line (a kill or a full disk during the append) made every later resume fail to parse
    the file; it is dropped and counted, with the lines of steps after the checkpoint."""
    from runtime.run import append_metrics, truncate_metrics

    path = tmp_path / "metrics.jsonl"
    for step in (1, 2, 3):
        append_metrics(path, {"step": step, "loss": 1.0 / step})
    with open(path, "a") as f:
        f.write('{"step": 4, "lo')
    assert truncate_metrics(path, 2) == 1
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    append_metrics(path, {"step": 3, "loss": 0.5})
    assert truncate_metrics(path, 3) == 0 and len(path.read_text().splitlines()) == 3
    assert truncate_metrics(tmp_path / "none.jsonl", 3) == 0


def test_wandb_runs_of_folders_with_the_same_name_stay_apart(tmp_path, monkeypatch):
    """The wandb id was the run folder's name: every ablation cell's `seed0/train` resumed one wandb run. Now each
    folder gets its own id on its first start and keeps it (offline wandb, the real client)."""
    from runtime.log import MetricSink

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    ids = []
    for run_dir in (tmp_path / "a" / "train", tmp_path / "b" / "train", tmp_path / "a" / "train"):
        sink = MetricSink("wandb", run_dir, {"seed": 0}, project="test")
        sink.log({"loss": 1.0}, step=1)
        ids.append(sink._wandb.id)
        sink.close()
    assert ids[0] != ids[1] and ids[2] == ids[0]
    assert (tmp_path / "a" / "train" / "wandb_id").read_text() == ids[0]


def test_resume_names_an_engine_the_checkpoint_lacks(tmp_path):
    """A checkpoint of a run without the GAN resumed with it: DeepSpeed's own error was a bare AssertionError."""
    from runtime.loop import Task

    class Engine:
        def __init__(self):
            self.loaded = []

        def load_checkpoint(self, folder, tag):
            self.loaded.append(tag)

    task = Task()
    task.engines = {"tokenizer": Engine(), "disc": Engine()}
    (tmp_path / "step-00000010" / "tokenizer").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"step-00000010 holds no state of the 'disc' engine \(it has \['tokenizer'\]\)"
                                         r".*--gan.no-enabled"):
        task.load_checkpoint(tmp_path / "step-00000010", {}, 10, None)
    assert task.engines["tokenizer"].loaded == []  # nothing half-loaded
    (tmp_path / "step-00000010" / "disc").mkdir()
    assert task.load_checkpoint(tmp_path / "step-00000010", {}, 10, None) is True
    assert [e.loaded for e in task.engines.values()] == [["tokenizer"], ["disc"]]


def test_a_second_job_in_a_run_folder_is_refused(tmp_path):
    """Two trainers in one run folder (a requeue racing its predecessor, a command started twice) both ran to
    the end, interleaving metrics.jsonl and overwriting each other's checkpoints."""
    from runtime.run import lock_run_dir, unlock_run_dir

    run = tmp_path / "run"
    hold = (f"import sys; from runtime.run import lock_run_dir; assert lock_run_dir({str(run)!r}) is None; "
            "print('held', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", hold], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        problem = lock_run_dir(run)
        assert problem is not None and re.search(rf"{re.escape(str(run))} is in use by another training job \(host "
                                                 rf"\S+ pid {holder.pid}\)", problem), problem
    finally:
        holder.kill()  # the kernel drops a dead process's lock (kill -9 included)
        holder.wait()
    assert lock_run_dir(run) is None and lock_run_dir(run) is None  # free now; taking it twice in one process is fine
    unlock_run_dir(run)


def test_resume_of_another_runs_checkpoint_into_a_used_run_folder_is_refused(tmp_path):
    """--run-dir B --resume A/step-4 mixed the two runs (B's metrics, then A's continuation over B's steps)."""
    from runtime.checkpoint import CheckpointManager

    a, b = CheckpointManager(tmp_path / "a"), CheckpointManager(tmp_path / "b")
    _fake_steps(a, 2, 4)
    _fake_steps(b, 2)
    with pytest.raises(FileExistsError, match=r"--resume .*a/step-00000004: .* is another run's checkpoint, and .*b "
                                              r"holds checkpoints of its own \(up to step-00000002\)"):
        b.resolve(str(a.run_dir / "step-00000004"))
    assert CheckpointManager(tmp_path / "c").resolve(str(a.run_dir)) == a.run_dir / "step-00000004"  # a fork: fine
    assert b.resolve(str(b.run_dir / "step-00000002")) == b.run_dir / "step-00000002"


def test_flags_changed_on_resume_take_effect_and_are_logged(caplog):
    """DeepSpeed's load restores the optimizer's lr, betas, eps and weight decay and the schedule's base rates
    as saved: a resume with --optim.lr 1e-2 trained on at the old rate while config.json said 1e-2."""
    import logging

    import torch

    from runtime.loop import Task, _follow_changed_flags
    from runtime.optim import OptimConfig, lambda_scheduler, warmup_cosine

    def engine(o: OptimConfig, total: int, step: int):
        model = torch.nn.Linear(2, 2)
        opt = o.adamw([{"params": [model.weight], "weight_decay": o.weight_decay},
                       {"params": [model.bias], "weight_decay": 0.0}])
        sched = o.schedule(opt, total)
        for _ in range(step):
            opt.step()
            sched.step()
        return type("Engine", (), {"optimizer": opt, "lr_scheduler": sched})()

    old = OptimConfig(lr=1e-3, weight_decay=0.1, warmup_frac=0.2)
    new = OptimConfig(lr=1e-2, weight_decay=0.5, warmup_frac=0.2, betas=(0.9, 0.95), end_ratio=0.1)
    saved, resumed = engine(old, 10, 4), engine(new, 20, 0)
    resumed.optimizer.load_state_dict(saved.optimizer.state_dict())  # what DeepSpeed's load does
    resumed.lr_scheduler.load_state_dict(saved.lr_scheduler.state_dict())
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * warmup_cosine(4, 10, 2, 0.0))
    task = Task()
    task.engines = {"model": resumed}
    config = lambda o, total, accum: {"total_steps": total, "grad_accum": accum, "optim": {  # noqa: E731
        k: list(v) if isinstance(v, tuple) else v for k, v in vars(o).items()}}
    with caplog.at_level(logging.WARNING):
        _follow_changed_flags(config(old, 10, 1), config(new, 20, 2), task, logging.getLogger("t"))
    groups = resumed.optimizer.param_groups
    assert [g["lr"] for g in groups] == pytest.approx([1e-2 * warmup_cosine(4, 20, 4, 0.1)] * 2)
    assert [g["weight_decay"] for g in groups] == [0.5, 0.0] and all(g["betas"] == (0.9, 0.95) for g in groups)
    for flag in ("--total-steps 20 (was 10)", "--grad-accum 2 (was 1)", "--optim.lr 0.01 (was 0.001)",
                 "--optim.weight-decay 0.5 (was 0.1)", "--optim.betas [0.9, 0.95] (was [0.9, 0.999])",
                 "changes the global batch"):
        assert flag in caplog.text
    caplog.clear()
    _follow_changed_flags(config(new, 20, 2), config(new, 20, 2), task, logging.getLogger("t"))
    assert caplog.text == ""


def test_an_engine_that_cannot_load_names_the_changed_settings(tmp_path):
    """A resume with another ZeRO stage or precision failed with DeepSpeed's bare AssertionError, or a
    FileNotFoundError of bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt."""
    from types import SimpleNamespace

    from runtime.loop import Task

    class Engine:
        def load_checkpoint(self, folder, tag):
            raise AssertionError()

    ckpt = tmp_path / "step-00000004"
    (ckpt / "mllm").mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 4, "config": {"ds_config": "zero3",
                                                                                "precision": "fp32"}}))
    task = Task()
    task.engines = {"mllm": Engine()}
    task.cfg = SimpleNamespace(ds_config="zero2", precision="bf16")
    with pytest.raises(RuntimeError, match=r"cannot load the 'mllm' engine from .*step-00000004 \(AssertionError: \); "
                                           r"it was written with --ds-config zero3 --precision fp32 and this run has "
                                           r"--ds-config zero2 --precision bf16"):
        task.load_checkpoint(ckpt, {}, 4, None)
    task.cfg = SimpleNamespace(ds_config="zero3", precision="fp32")
    with pytest.raises(RuntimeError, match=r"step-00000004 \(AssertionError: \)$"):
        task.load_checkpoint(ckpt, {}, 4, None)


def test_a_failed_save_removes_its_temporary_folder_and_says_where(tmp_path):
    """A full disk: torch's 'unexpected pos 14464 vs 14356' named neither the disk nor the folder, and the
    temporary step folder left behind kept the disk full for the restart."""
    from runtime.checkpoint import CheckpointManager

    ckpts = CheckpointManager(tmp_path / "run")
    _fake_steps(ckpts, 2)
    (ckpts.run_dir / "latest").write_text("step-00000002")

    def write(tmp):
        (tmp / "partial.bin").write_bytes(b"x" * 100)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 14464 vs 14356")

    with pytest.raises(RuntimeError, match=r"saving step-00000004 in .*run failed \(\d+\.\d GiB free there\): "
                                           r"RuntimeError: .*unexpected pos.*; the previous checkpoint and `latest` "
                                           r"are kept"):
        ckpts.save(4, write, {}, {"step": 4})
    assert sorted(p.name for p in ckpts.run_dir.iterdir()) == ["latest", "step-00000002"]


def test_tensorboard_shows_each_step_once_after_a_resume(tmp_path):
    """A resume replays the steps after its checkpoint: TensorBoard drew them twice (11 points for 6 steps after a
    kill and a rewind), the abandoned values included."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from runtime.log import MetricSink

    for start, steps, value in ((0, range(1, 6), 1.0), (3, range(4, 7), 2.0), (3, range(4, 7), 3.0)):
        sink = MetricSink("tensorboard", tmp_path, {"seed": 0}, project="test", start_step=start)
        for s in steps:
            sink.log({"loss": value}, step=s)
        sink.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 1.0), (2, 1.0), (3, 1.0), (4, 3.0), (5, 3.0),
                                                               (6, 3.0)]


def test_warn_once_messages_reach_log_txt(tmp_path, recwarn):
    """'--precision bf16 on CPU', 'random VGG16 trunk', 'flash-attn is not available', 'no GPU' went to stderr
    only: log.txt, the run's record, did not say what ran."""
    import uuid

    from runtime.distributed import warn_once
    from runtime.log import setup_logging

    early, late = f"early {uuid.uuid4()}", f"late {uuid.uuid4()}"
    warn_once(early)  # before the log file exists (init_distributed's 'no GPU')
    setup_logging(tmp_path)
    warn_once(late)
    warn_once(late)
    text = (tmp_path / "log.txt").read_text()
    assert f"warning: {early}" in text and text.count(f"warning: {late}") == 1
    assert sum(late in str(w.message) for w in recwarn) == 1  # still a Python warning, once
    setup_logging(None)


def test_library_warnings_reach_log_txt_and_stderr(tmp_path):
    """A library's Python warning (transformers, deepspeed, torch) reached the console only: a detached job's
    log.txt did not have it. It now goes to both, once per warning shown."""
    code = """if True:
        import sys, warnings
        from runtime.distributed import warn_once
        from runtime.log import setup_logging
        warnings.simplefilter("default")
        setup_logging(sys.argv[1])
        setup_logging(sys.argv[1])  # installed once
        warn_once("ours")
        for _ in range(2):
            warnings.warn("a library's deprecation", FutureWarning)
        """
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    text = (tmp_path / "log.txt").read_text()
    assert text.count("warning: FutureWarning: a library's deprecation (<string>:") == 1, text
    assert text.count("ours") == 1 and "deprecation" in p.stderr


def test_a_resume_with_other_data_flags_or_ranks_is_refused_before_the_model_is_built(tmp_path, monkeypatch):
    """A changed --micro-batch (MLLM) or --data.local-batch-size (tokenizer), or the tokenizer on another number of
    ranks, was refused only by the loader or the engine, after the model and its engines were built (minutes for
    a 7B model), and the message offered no way forward."""
    import dataclasses
    from types import SimpleNamespace

    import torch

    import runtime.run
    from mllm.train import MllmTrainConfig
    from runtime.loop import run
    from unitok.train import TrainConfig

    def checkpoint(cfg, world_size):
        ckpt = Path(cfg.run_dir) / "step-00000004"
        ckpt.mkdir(parents=True)
        (ckpt / "trainer_state.json").write_text(json.dumps({"step": 4, "config": dataclasses.asdict(cfg)}))
        torch.save({"world_size": world_size}, ckpt / "rank00000.pt")

    built = []
    monkeypatch.setattr(runtime.run, "start_run", lambda *a: (SimpleNamespace(world_size=1), logging.getLogger("t")))

    def attempt(cfg):
        built.clear()
        with pytest.raises((ValueError, LookupError)) as e:
            run(cfg, lambda *a: built.append(1) or (_ for _ in ()).throw(LookupError("built")))
        return str(e.value)

    mllm = MllmTrainConfig(run_dir=str(tmp_path / "mllm"), micro_batch=4, num_workers=2)
    checkpoint(mllm, 1)
    msg = attempt(dataclasses.replace(mllm, micro_batch=8, max_len=1024))
    assert not built and re.search(r"--micro-batch 8 \(the checkpoint has 4\), --max-len 1024 \(the checkpoint has "
                                   r"2048\)\. Resume with the checkpoint's values, or .*mllm.export.*--init-from", msg)
    assert attempt(dataclasses.replace(mllm, num_workers=2)) == "built" and built  # unchanged: built
    (Path(mllm.run_dir) / "step-00000004" / "rank00000.pt").unlink()
    torch.save({"world_size": 2}, Path(mllm.run_dir) / "step-00000004" / "rank00000.pt")
    assert attempt(dataclasses.replace(mllm, micro_batch=8)) == "built"  # another world size: weights only

    tok = TrainConfig(run_dir=str(tmp_path / "tok"))
    tok.data.num_workers = 0
    checkpoint(tok, 1)
    other = dataclasses.replace(tok, data=dataclasses.replace(tok.data, num_workers=1))
    assert attempt(other) == "built"  # 0 workers stream as 1 does
    other = dataclasses.replace(tok, seed=1, data=dataclasses.replace(tok.data, local_batch_size=32))
    msg = attempt(other)
    assert not built and "--seed 1 (the checkpoint has 0), --data.local-batch-size 32 (the checkpoint has 64)" in msg
    with pytest.raises(ValueError, match="--data.seed 3: the trainer seeds its data from --seed"):
        TrainConfig(data=dataclasses.replace(tok.data, seed=3))  # a flag that was silently replaced
    assert TrainConfig(seed=4).data.seed == 4
    torch.save({"world_size": 2}, Path(tok.run_dir) / "step-00000004" / "rank00000.pt")
    msg = attempt(tok)
    assert not built and "written by 2 ranks and this run has 1; resume with the same number of ranks" in msg


def test_a_resume_restores_its_own_gpu_rng_whatever_the_gpus_it_sees(monkeypatch):
    """Each rank saved the RNG state of every GPU it saw and restored them all: resumed with as many ranks but
    fewer GPUs visible to each (2 nodes x 8 as 4 x 4; srun --gpus-per-task=1), it failed with an IndexError.
    A rank now keeps its own GPU's state (simulated GPUs: CPU generators behind torch.cuda's RNG calls)."""
    import torch

    from runtime.checkpoint import rng_state, set_rng_state

    gens = [torch.Generator().manual_seed(i) for i in range(8)]
    current = {"i": 3}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current["i"])
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": gens[current["i"]].get_state())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device="cuda": gens[current["i"]].set_state(s))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [g.get_state() for g in gens])
    saved = rng_state()
    draw = torch.rand(4, generator=gens[3])
    gens[:] = [torch.Generator().manual_seed(100)]  # resumed seeing one GPU, as device 0
    current["i"] = 0
    set_rng_state(saved)
    assert torch.equal(torch.rand(4, generator=gens[0]), draw)
    # older checkpoints: one state per GPU the rank saw; its own is at its local rank (3 here), whatever it sees now
    old = {**saved, "cuda": [torch.Generator().manual_seed(i).get_state() for i in range(8)]}
    monkeypatch.setenv("LOCAL_RANK", "3")
    set_rng_state(old)
    assert torch.equal(torch.rand(4, generator=gens[0]), torch.rand(4, generator=torch.Generator().manual_seed(3)))


def test_training_on_a_gpu_uses_tf32_as_the_releases_do():
    """Both releases train with TF32 on (and cuDNN's benchmark): no setting did, so every fp32 matmul ran at full
    precision, several times slower on A100/H100. On a CPU nothing changes."""
    import torch

    from runtime.run import train_math

    m, c = torch.backends.cuda.matmul, torch.backends.cudnn
    before = (m.allow_tf32, c.allow_tf32, c.benchmark)
    try:
        m.allow_tf32 = c.allow_tf32 = c.benchmark = False
        train_math(torch.device("cpu"))
        assert not m.allow_tf32 and not c.allow_tf32 and not c.benchmark
        train_math(torch.device("cuda", 0))
        assert m.allow_tf32 and c.allow_tf32 and c.benchmark
    finally:
        m.allow_tf32, c.allow_tf32, c.benchmark = before
