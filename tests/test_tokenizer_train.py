"""The tokenizer trainer through the real `deepspeed` launcher on 2 CPU ranks: run, kill -9, resume."""
import json

import pytest
import torch

from experiments.synthetic import write_shards
from runtime.distributed import GROUP_OUTLIVED
from runtime.launch import deepspeed_module
from unitok import load_tokenizer


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    write_shards(d, num_shards=4, samples_per_shard=24, size=32, seed=0)
    return str(d / "{00000..00003}.tar")


def _args(run_dir, shards, *extra):
    return ["--preset", "debug", "--run-dir", str(run_dir), "--data.shards", shards, "--data.local-batch-size", "4",
            "--data.num-workers", "0", "--total-steps", "6", "--save-every", "3", "--log-every", "1",
            "--gan.random-backbone", "--gan.backbone", "debug", "--loss.lpips-random-backbone",
            "--gan.start-frac", "0.3", *extra]


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_ranks_kill_and_resume_is_exact(tmp_path, shards):
    full = tmp_path / "full"
    deepspeed_module("unitok.train", _args(full, shards))
    a = _metrics(full)
    assert [m["step"] for m in a] == [1, 2, 3, 4, 5, 6]
    assert "g" in a[-1] and "d_loss" in a[-1]  # the GAN is active after 30% of training
    # the data counts of all ranks, by reason (they were only in the log line's total)
    assert a[-1]["data"]["samples"] >= 6 * 2 * 4 and a[-1]["data"]["decode_errors"] == 0
    assert sorted(p.name for p in full.iterdir() if p.name.startswith("step-")) == ["step-00000003",
                                                                                     "step-00000006"]
    tok = load_tokenizer(full / "export")
    assert tok.encode(torch.zeros(1, 3, 32, 32)).shape == (1, 4, 2, 2)

    crash = tmp_path / "crash"
    p = deepspeed_module("unitok.train", _args(crash, shards, "--debug.kill-at-step", "4"), check=False)
    assert p.returncode != 0
    assert (crash / "latest").read_text() == "step-00000003"
    deepspeed_module("unitok.train", _args(crash, shards))
    b = _metrics(crash)
    assert [m["step"] for m in b] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and x["data_hash"] == y["data_hash"]
        assert {"loss", "l1", "l2", "vq", "clip", "grad_norm", "lr"} <= x.keys()
        for k, v in x.items():
            if isinstance(v, float):
                assert abs(v - y[k]) <= 1e-6 * max(1.0, abs(v)), (x["step"], k, v, y[k])
        assert x["usage_per_codebook"] == y["usage_per_codebook"]
    # the exports too, the codebook usage EMA included (its step count restarted at 0 on a resume: one batch
    # overwrote the average, up to 0.03 off)
    from safetensors.torch import load_file

    wa, wb = load_file(full / "export/model.safetensors"), load_file(crash / "export/model.safetensors")
    assert wa.keys() == wb.keys() and any("vocab_usage" in k for k in wa)
    assert [k for k in wa if not torch.allclose(wa[k], wb[k], rtol=0, atol=1e-6)] == []
    # the logged lr is the rate each step used (it was the next step's); continuing the run to 8 steps follows the
    # new schedule at once (the first resumed step took the old schedule's saved rate), with a warning
    from runtime.optim import warmup_cosine

    o = json.loads((full / "config.json").read_text())["config"]["optim"]
    rate = [o["lr"] * warmup_cosine(s, 6, int(o["warmup_frac"] * 6), o["end_ratio"]) for s in range(6)]
    assert [m["lr"] for m in a] == pytest.approx(rate, rel=1e-9)
    deepspeed_module("unitok.train", _args(full, shards, "--total-steps", "8", "--no-export"))
    longer = _metrics(full)
    assert [m["step"] for m in longer] == list(range(1, 9)) and longer[:6] == a
    assert longer[6]["lr"] == pytest.approx(o["lr"] * warmup_cosine(6, 8, int(o["warmup_frac"] * 8), o["end_ratio"]))
    assert "--total-steps 8 (was 6)" in (full / "log.txt").read_text()
    assert "the GAN started at step 1 (0.3 of the first 6 steps) and keeps that start" in (full / "log.txt").read_text()
    # rewinding to step 3 and dying before the next save: `latest` names step 3, so --resume auto continues the
    # rewound run (it named step 8, and auto jumped back to the run abandoned, with steps 4-5 lost from the metrics)
    p = deepspeed_module("unitok.train", _args(full, shards, "--total-steps", "8", "--no-export", "--resume",
                                               str(full / "step-00000003"), "--debug.kill-at-step", "4"), check=False)
    assert p.returncode != 0 and (full / "latest").read_text() == "step-00000003"
    assert "holds 2 checkpoints after step 3" in (full / "log.txt").read_text()


def test_an_extended_run_keeps_the_gan_it_has_started(tmp_path, caplog):
    """--total-steps raised on resume moved the GAN's start with it (a fraction of the total): 6 -> 30 steps at
    step 6 switched the GAN off again until step 9, and its warmup restarted."""
    import logging
    from types import SimpleNamespace

    from unitok.train import TokenizerTask

    class Engine:
        def __init__(self):
            self.lr_scheduler = SimpleNamespace(lr_lambdas=[None, None])  # decayed and non-decayed groups

        def load_checkpoint(self, folder, tag):
            pass

    ckpt = tmp_path / "step-00000006"
    for tag in ("tokenizer", "disc"):
        (ckpt / tag).mkdir(parents=True)
    log = logging.getLogger("t")
    for step, kept in ((6, True), (1, False)):  # the GAN of a 6-step run starts at 0.3 x 6 = 1.8
        task = TokenizerTask.__new__(TokenizerTask)
        task.cfg = SimpleNamespace(total_steps=30, gan=SimpleNamespace(start_frac=0.3, warmup_frac=0.03),
                                   optim=SimpleNamespace(end_ratio=0.1))
        task.disc_engine = Engine()
        task.engines = {"tokenizer": Engine(), "disc": task.disc_engine}
        task.gan_total = 30
        with caplog.at_level(logging.WARNING):
            assert task.load_checkpoint(ckpt, {"task": {"gan_total": 6}}, step, log) is True
        if kept:
            assert task.gan_total == 6 and task.gan_state(7).active and task.gan_state(7).warm == 1.0
            assert "the GAN started at step 1 (0.3 of the first 6 steps) and keeps that start" in caplog.text
            assert "it would be off until step 9" in caplog.text
            lambdas = task.disc_engine.lr_scheduler.lr_lambdas  # the cosine from the old start, no warmup to redo
            assert len(lambdas) == 2 and [f(0) for f in lambdas] == [1.0, 1.0]
        else:  # not started yet: it starts at 0.3 of the new total
            assert task.gan_total == 30 and not task.gan_state(7).active


@pytest.mark.slow
def test_a_skipped_discriminator_micro_batch_keeps_its_accumulation_in_step(tmp_path, shards):
    """--grad-accum 2 with the discriminator's loss non-finite on one micro batch: that micro batch adds nothing,
    and the discriminator still steps at the generator's boundaries (skipping it put every later discriminator
    step across two of the generator's, and its d_* terms were halved in that step's record)."""
    from runtime.launch import ROOT, deepspeed_script

    run = tmp_path / "run"
    deepspeed_script(ROOT / "tests/disc_nan_train.py", _args(run, shards, "--grad-accum", "2", "--total-steps", "5",
                                                              "--save-every", "5", "--no-export"), num_ranks=1)
    m = _metrics(run)
    assert [r["step"] for r in m] == [1, 2, 3, 4, 5] and "non-finite discriminator loss" in (run / "log.txt").read_text()
    gan = [r for r in m if "d_loss" in r]
    assert len(gan) >= 3 and all(r["disc_micro_steps"] == 2 * r["disc_global_steps"] for r in gan), m
    third = next(r for r in m if r["step"] == 3)
    assert 0.5 < third["d_hinge"] / sum(r["d_hinge"] for r in gan if r["step"] != 3) * (len(gan) - 1) < 2
    # usage_per_codebook is the step's mean over its micro batches, as usage is (it was the last micro batch's)
    per_codebook = [sum(r["usage_per_codebook"]) / len(r["usage_per_codebook"]) for r in m]
    assert all(abs(u - r["usage"]) < 2e-3 for u, r in zip(per_codebook, m)), [(u, r["usage"]) for u, r in
                                                                             zip(per_codebook, m)]


@pytest.mark.slow
def test_sigterm_to_the_whole_job_saves_the_step_and_resumes_exactly(tmp_path, shards):
    """SIGTERM to every process of the job, as a scheduler at its time limit (or preemption) sends it: the
    launcher passes it on too, the data workers ignore it, the ranks finish the step they are in, save a
    checkpoint at it (no periodic one is due) and exit 143; `--resume auto` then continues exactly."""
    import os
    import signal
    import subprocess
    import time

    from runtime.launch import ROOT, deepspeed_cmd, ds_env, free_port, leaked_shm

    def args(run_dir):
        return _args(run_dir, shards, "--gan.no-enabled", "--loss.lpips", "0", "--data.num-workers", "1",
                     "--total-steps", "40", "--save-every", "100")

    full = tmp_path / "full"
    deepspeed_module("unitok.train", args(full))
    run, port = tmp_path / "run", free_port()
    job = subprocess.Popen(deepspeed_cmd("unitok.train", args(run), 2, port), cwd=ROOT, env=ds_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 240
    while not ((run / "metrics.jsonl").is_file() and len(_metrics(run)) >= 3):
        assert job.poll() is None and time.time() < deadline, job.communicate()[0][-3000:]
        time.sleep(0.1)
    os.killpg(job.pid, signal.SIGTERM)
    out = job.communicate(timeout=120)[0]
    assert job.returncode != 0 and not leaked_shm(port)
    assert GROUP_OUTLIVED not in out and "terminate called" not in out, out[-3000:]  # the ranks' groups were freed
    stopped = len(_metrics(run))
    assert 3 <= stopped < 40 and (run / "latest").read_text() == f"step-{stopped:08d}", out[-3000:]
    assert f"SIGTERM: stopped after step {stopped}, its checkpoint is saved; exit code 143" in (
        run / "log.txt").read_text()
    deepspeed_module("unitok.train", args(run))
    a, b = _metrics(full), _metrics(run)
    assert [m["step"] for m in b] == list(range(1, 41))
    for x, y in zip(a, b):
        assert x["data_hash"] == y["data_hash"] and abs(x["loss"] - y["loss"]) <= 1e-6 * max(1.0, abs(x["loss"]))


@pytest.mark.slow
def test_a_crashed_run_exits_with_its_error_and_frees_its_group(tmp_path, shards):
    """An error in the middle of a 2-rank run: the ranks exit with it, and the at-exit end_job frees the
    engines and the process group first (the printed traceback, which holds them, is dropped), so no gloo
    thread is left for the interpreter's finalisation, where it can abort the rank instead."""
    p = deepspeed_module("unitok.train", _args(tmp_path / "run", shards, "--gan.no-enabled", "--loss.lpips", "0",
                                               "--debug.raise-at-step", "2"), check=False)
    out = p.stdout + p.stderr
    assert p.returncode != 0 and "RuntimeError: --debug.raise-at-step 2: the injected error" in out, out[-3000:]
    assert GROUP_OUTLIVED not in out and "terminate called" not in out, out[-3000:]
    # log.txt says so too (it ended at the last step's line, as if the run were still going)
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "the run failed: RuntimeError: --debug.raise-at-step 2: the injected error" in log
    assert "Traceback (most recent call last):" in log and 'raise RuntimeError(f"--debug.raise-at-step' in log


STAND_IN_SRUN = """#!{python}
# srun, and slurmstepd (proctrack/cgroup, SignalChildrenProcesses=no), as they treat one node's task: a
# signal (srun's, or SLURM's) reaches only the task's own process, and once that process exits whatever is
# left of the task is killed.
import ctypes, os, signal, subprocess, sys
import psutil
args = sys.argv[1:]
while args[0].startswith("--"):
    args.pop(0)
ctypes.CDLL(None).prctl(36, 1)  # PR_SET_CHILD_SUBREAPER: orphans of the task stay our descendants
task = subprocess.Popen(args, env={{**os.environ, "SLURM_NODEID": "0"}})
for s in (signal.SIGTERM, signal.SIGUSR1):
    signal.signal(s, lambda signum, frame: task.send_signal(signum))
open(os.environ["TASK_PID_FILE"], "w").write(str(task.pid))
rc = task.wait()
left = [p for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]
names = [" ".join(p.cmdline()[:3]) for p in left]
for p in left:
    p.kill()
print(f"stand-in srun: task exited {{rc}}, killed {{len(left)}} processes left behind {{names}}", flush=True)
sys.exit(rc)
"""


@pytest.mark.slow
def test_sbatch_passes_slurm_stop_signals_to_the_saving_ranks_and_requeues(tmp_path, shards):
    """launch/slurm.sbatch under a stand-in srun that signals and kills like SLURM's default: scancel's SIGTERM
    reaches only the node's task (launch/slurm_node.sh) and the rest of the task is killed once it exits.
    The task passes the signal on, the 2 ranks save the step they are in and exit before it does. The job,
    resubmitted, resumes; the time-limit warning (--signal=B:USR1@600, to the batch script) stops it the same
    way through srun, and the script requeues the job. (Before slurm_node.sh, the deepspeed launcher was the
    task and died of the SIGTERM: nothing was saved.)"""
    import os
    import signal
    import subprocess
    import sys
    import time

    from runtime.launch import ROOT, ds_env, free_port

    bins = tmp_path / "bin"
    bins.mkdir()
    (bins / "srun").write_text(STAND_IN_SRUN.format(python=sys.executable))
    (bins / "scontrol").write_text('#!/bin/sh\ncase "$1" in requeue) echo "$*" >> "$REQUEUE_LOG";; '
                                   'show) echo "$3";; esac\n')  # show hostnames localhost
    for f in bins.iterdir():
        f.chmod(0o755)
    run, pid_file, requeued = tmp_path / "run", tmp_path / "task.pid", tmp_path / "requeued"
    env = {**ds_env(), "PATH": f"{bins}{os.pathsep}{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}",
           "TMPDIR": str(tmp_path), "TASK_PID_FILE": str(pid_file), "REQUEUE_LOG": str(requeued),
           "SLURM_JOB_ID": "7", "SLURM_NNODES": "1", "SLURM_SUBMIT_DIR": str(ROOT),
           "SLURM_JOB_NODELIST": "localhost", "SLURM_GPUS_ON_NODE": "2"}
    args = _args(run, shards, "--gan.no-enabled", "--loss.lpips", "0", "--data.num-workers", "1",
                 "--total-steps", "200", "--save-every", "1000")

    def log_text() -> str:
        return (run / "log.txt").read_text() if (run / "log.txt").is_file() else ""

    def submit_and_signal(sig: signal.Signals, ready, to_batch_script: bool) -> tuple[int, str]:
        pid_file.unlink(missing_ok=True)
        job = subprocess.Popen(["bash", "launch/slurm.sbatch", "launch/tokenizer.sh", *args], cwd=ROOT,
                               env={**env, "MASTER_PORT": str(free_port())}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
        deadline = time.time() + 240
        while not ready():
            assert job.poll() is None and time.time() < deadline, job.communicate()[0][-3000:]
            time.sleep(0.05)
        os.kill(job.pid if to_batch_script else int(pid_file.read_text()), sig)
        try:
            out = job.communicate(timeout=120)[0]
        finally:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
        stopped = len(_metrics(run))
        assert "killed 0 processes left behind" in out, out[-3000:]  # every rank saved and ended by itself
        assert job.returncode != 0 and (run / "latest").read_text() == f"step-{stopped:08d}", out[-3000:]
        assert f"{sig.name}: stopped after step {stopped}, its checkpoint is saved" in log_text()
        return stopped, out

    def steps_done(n: int):
        return lambda: (run / "metrics.jsonl").is_file() and len(_metrics(run)) >= n

    # scancel, preemption, the time limit itself: SIGTERM to the task, after 3 steps
    first, _ = submit_and_signal(signal.SIGTERM, steps_done(3), to_batch_script=False)
    assert first < 200 and not requeued.exists()  # an scancel is no reason to come back
    # the time-limit warning (to the batch script) while the resubmitted job's ranks still start up (it logged
    # its layout, the loop's handler is not set yet): ignored there, caught when slurm_node.sh repeats it
    starts = log_text().count("ranks: ")
    second, out = submit_and_signal(signal.SIGUSR1, lambda: log_text().count("ranks: ") > starts, to_batch_script=True)
    assert f"step-{first:08d} at step {first}" in log_text() and first < second < 200
    assert [m["step"] for m in _metrics(run)] == list(range(1, second + 1))
    assert "task exited 138" in out and requeued.read_text() == "requeue 7\n" and "requeueing job 7" in out


@pytest.mark.slow
def test_bf16_kill_during_save_keeps_the_previous_checkpoint_and_resumes_exactly(tmp_path, shards):
    """--precision bf16 on CPU (a bf16 autocast forward over fp32 weights), kill -9 in a save, exact replay;
    with the fused AdamW kernel (--optim.fused) under ZeRO-2's flat fp32 partitions, GAN optimizer included."""
    run = tmp_path / "run"
    p = deepspeed_module("unitok.train", _args(run, shards, "--precision", "bf16", "--optim.fused",
                                               "--debug.kill-at-step", "6", "--debug.kill-during-save"), check=False)
    assert p.returncode != 0
    assert "--precision bf16 on CPU: running bf16 for testing" in p.stdout + p.stderr
    log = (run / "log.txt").read_text()
    assert "precision: bf16 autocast forward, fp32 weights and quantizer" in log
    assert "optimizer: AdamW (fused kernel), peak lr 0.0005" in log
    assert (run / "latest").read_text() == "step-00000003"
    assert not (run / "step-00000006").exists()
    before = _metrics(run)
    deepspeed_module("unitok.train", _args(run, shards, "--precision", "bf16", "--optim.fused"))  # from step 3 on
    after = _metrics(run)
    assert [m["step"] for m in before] == [m["step"] for m in after] == [1, 2, 3, 4, 5, 6]
    assert before == after  # every logged float, the batch hashes and the codebook usage
    assert (run / "latest").read_text() == "step-00000006" and not list(run.glob(".tmp-*"))


def test_adaptive_weight_matches_autograd_at_the_last_layer():
    """The trainer's conv2d_weight route equals autograd.grad w.r.t. the decoder's last weight."""
    from types import SimpleNamespace

    from unitok import UniTok, preset
    from unitok.losses import adaptive_weight
    from unitok.train import TokenizerTask, TrainConfig

    torch.manual_seed(0)
    model = UniTok(preset("debug")).train()
    engine = SimpleNamespace(module=model, device=torch.device("cpu"), global_rank=0)
    from unitok.data import DataConfig

    cfg = TrainConfig(preset="debug", model=preset("debug"), data=DataConfig(img_size=32, context_length=16))
    task = TokenizerTask(cfg, engine, None, None, None, None)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    rec = model(x)["img_rec"]
    nll = (rec - x).abs().mean() + (rec - x).square().mean()
    g = -(rec * torch.linspace(-1, 1, 32)).mean()  # a stand-in adversarial loss
    ref = adaptive_weight(nll, g, model.decoder.last_layer_weight())  # (keeps the graphs, which ours frees)
    ours = task.adaptive_weight(nll, g, rec)
    assert torch.allclose(ours, ref, rtol=1e-4)


def test_a_gan_step_gets_the_gradient_of_its_logged_objective():
    """During the GAN, the generator's backward reuses dL_nll/d rec and dL_g/d rec, which the adaptive weight
    computes anyway, instead of running LPIPS's VGG16 and the discriminator backward a second time: every model
    parameter gets the gradient of nll + vq + clip + g_weight * g (the logged loss), computed here directly."""
    import dataclasses
    from types import SimpleNamespace

    from unitok import UniTok, preset
    from unitok.data import DataConfig
    from unitok.losses import ContrastiveLoss, DiffAug, PerceptualLoss, hinge_g_loss, reconstruction_loss
    from unitok.models.discriminator import DinoDiscriminator
    from unitok.train import GanConfig, LossConfig, TokenizerTask, TrainConfig

    torch.manual_seed(0)
    mcfg = preset("debug")
    mcfg.img_size = 64  # LPIPS runs from 48 px
    model = UniTok(mcfg).train()
    disc = DinoDiscriminator(None, random_backbone=True, backbone="debug").train()
    engine = SimpleNamespace(module=model, device=torch.device("cpu"), global_rank=0)
    cfg = TrainConfig(preset="debug", model=mcfg, total_steps=100,
                      data=DataConfig(img_size=64, context_length=mcfg.text.context_length),
                      loss=dataclasses.replace(LossConfig(), lpips=1.0, lpips_random_backbone=True),
                      gan=dataclasses.replace(GanConfig(), random_backbone=True, backbone="debug", start_frac=0.0,
                                              warmup_frac=0.5))
    task = TokenizerTask(cfg, engine, SimpleNamespace(module=disc), PerceptualLoss(None, random_backbone=True),
                         ContrastiveLoss(), DiffAug())
    batch = {"images": torch.rand(2, 3, 64, 64) * 2 - 1, "texts": torch.randint(1, 1000, (2, mcfg.text.context_length))}
    step, rng0 = 20, task.rng.get_state()
    assert task.gan_state(step).active and 0 < task.gan_state(step).warm < 1 and task.gan_state(step).fade > 0

    def grads(loss):
        model.zero_grad(set_to_none=True)
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    out = task.generator_losses(batch, step)
    assert not out["loss"].requires_grad and out["lpips"] > 0
    ours = grads(out["_objective"])
    # the same forward (the GAN's generator replays its draws), with the loss written out and backpropagated
    task.rng.set_state(rng0)
    torch.manual_seed(0)
    fwd = model(batch["images"], batch["texts"])
    rec, c, gs = fwd["img_rec"], cfg.loss, task.gan_state(step)
    nll = reconstruction_loss(rec, batch["images"], c.l1, c.l2)["rec"] + c.lpips * task.perceptual(rec, batch["images"])
    g = hinge_g_loss(disc(task.diffaug(rec, gs.fade, task.rng), generator=task.rng).float())
    loss = nll + c.vq * fwd["vq_loss"] + c.clip * task.contrastive(
        fwd["clip_image_features"], fwd["clip_text_features"], fwd["logit_scale"]) + out["g_weight"] * g
    assert torch.allclose(loss.detach(), out["loss"], rtol=1e-5)
    ref = grads(loss)
    assert ours.keys() == ref.keys() and len(ref) > 50
    for n, r in ref.items():
        assert torch.allclose(ours[n], r, rtol=1e-4, atol=1e-6 * r.abs().max().item()), n


def test_the_loader_batch_reaches_the_model_on_its_device(tmp_path):
    """The loader yields (pinned) CPU tensors and DeepSpeed puts the model on the GPU: the task moves the batch
    (it handed the CPU batch to the model: on a GPU the first step failed, "Expected all tensors to be on the
    same device"). The GPU is simulated: FakeTensorMode, the model materialised on "cuda"."""
    import dataclasses
    from types import SimpleNamespace

    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from experiments.synthetic import write_shards
    from unitok import UniTok, preset
    from unitok.data import DataConfig, ImageTextLoader
    from unitok.losses import ContrastiveLoss, DiffAug
    from unitok.train import LossConfig, TokenizerTask, TrainConfig

    write_shards(tmp_path, num_shards=1, samples_per_shard=4, size=32, seed=0)
    data = DataConfig(shards=str(tmp_path / "00000.tar"), img_size=32, context_length=16, local_batch_size=4,
                      num_workers=0)
    batch = next(iter(ImageTextLoader(data, rank=0, world_size=1)))
    assert {v.device.type for v in batch.values()} == {"cpu"}
    fake = FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv())  # ShapeEnv: bincount's data-dependent size
    with torch.device("meta"):
        model = UniTok(preset("debug")).train()
    with fake:
        model.to_empty(device="cuda")
    engine = SimpleNamespace(module=model, device=torch.device("cpu"), global_rank=0)
    cfg = TrainConfig(preset="debug", model=preset("debug"), data=data,
                      loss=dataclasses.replace(LossConfig(), lpips=0.0))
    cfg.gan.enabled = False
    task = TokenizerTask(cfg, engine, None, None, ContrastiveLoss(), DiffAug())
    engine.device = torch.device("cuda", 0)
    with fake:
        out = task.forward(batch, 0)
    assert out["loss"].device == engine.device and out["images"].device == engine.device


@pytest.mark.parametrize("loss", [{"l1": 0.0, "l2": 0.0}, {"clip": 0.0}], ids=["contrastive-only", "recon-only"])
def test_a_part_no_loss_reads_is_not_run_and_the_rest_gets_the_same_gradients(loss):
    """Contrastive-only training skips the decoder, reconstruction-only the text tower (the ablation grid's
    Table 6 cells): every other parameter's gradient equals the one of the full forward, where the skipped
    part's loss weighs 0, and the skipped part gets none."""
    import dataclasses
    from types import SimpleNamespace

    from unitok import UniTok, preset
    from unitok.data import DataConfig
    from unitok.losses import ContrastiveLoss
    from unitok.train import LossConfig, TokenizerTask, TrainConfig

    torch.manual_seed(0)
    model = UniTok(preset("debug")).train()
    engine = SimpleNamespace(module=model, device=torch.device("cpu"), global_rank=0)
    cfg = TrainConfig(preset="debug", model=preset("debug"), data=DataConfig(img_size=32, context_length=16),
                      loss=dataclasses.replace(LossConfig(), lpips=0.0, **loss))
    task = TokenizerTask(cfg, engine, None, None, ContrastiveLoss(), None)
    skipped = "decoder." if "l1" in loss else "text_encoder."
    assert task.decodes == (skipped != "decoder.") and task.uses_text == (skipped != "text_encoder.")
    batch = {"images": torch.rand(4, 3, 32, 32) * 2 - 1, "texts": torch.randint(1, 1000, (4, 16))}

    def grads(**run_all):
        model.zero_grad(set_to_none=True)
        for k, v in run_all.items():
            setattr(task, k, v)
        out = task.generator_losses(batch, 0)
        out["loss"].backward()
        return out, {n: p.grad for n, p in model.named_parameters()}

    out, lean = grads()
    assert (out["rec"] is None) == (skipped == "decoder.") and ("clip" in out) == (skipped != "text_encoder.")
    _, full = grads(decodes=True, uses_text=True)
    assert any(n.startswith(skipped) for n in full)
    assert all(lean[n] is None for n in full if n.startswith(skipped))
    for n, g in full.items():
        if lean[n] is None:  # the skipped part (and, without text, the contrastive head): no loss reads it
            assert g is None or not g.any(), n
        else:
            assert torch.equal(lean[n], g), n
    assert sum(g is not None for g in lean.values()) > len(lean) // 3


def test_fused_adamw_is_the_flagged_kernel_and_follows_the_default_one():
    """--optim.fused builds torch's fused AdamW; over 20 steps it stays within float rounding of the default."""
    from runtime.optim import OptimConfig, param_groups

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 4))
    data = [(torch.randn(8, 16), torch.randn(8, 4)) for _ in range(20)]
    runs = {}
    for fused in (False, True):
        model = torch.nn.Sequential(*[type(m)(*m.normalized_shape) if isinstance(m, torch.nn.LayerNorm) else
                                      torch.nn.Linear(m.in_features, m.out_features) for m in net])
        model.load_state_dict(net.state_dict())
        opt = OptimConfig(lr=1e-2, weight_decay=0.1, fused=fused).adamw(param_groups(model, 0.1))
        assert bool(opt.defaults.get("fused")) == fused
        for x, y in data:
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        runs[fused] = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert not torch.equal(runs[False], torch.cat([p.detach().flatten() for p in net.parameters()]))
    torch.testing.assert_close(runs[True], runs[False], rtol=1e-5, atol=1e-6)


def test_clip_init_maps_visual_trunk_and_text(tmp_path):
    import logging

    from unitok import UniTok, preset
    from unitok.train import load_clip_init

    torch.manual_seed(0)
    src = UniTok(preset("debug"))
    state = {"visual.trunk." + k[len("encoder."):]: v for k, v in src.state_dict().items() if k.startswith("encoder.")}
    state.update({"text." + k[len("text_encoder."):]: v for k, v in src.state_dict().items()
                  if k.startswith("text_encoder.")})
    state["visual.head.proj.weight"] = torch.zeros(3, 3)  # heads are dropped
    torch.save({"state_dict": state}, tmp_path / "clip.pt")
    torch.manual_seed(1)
    dst = UniTok(preset("debug"))
    untouched = {k: v.clone() for k, v in dst.state_dict().items() if not k.startswith(("encoder.", "text_encoder."))}
    load_clip_init(dst, str(tmp_path / "clip.pt"), logging.getLogger("test"))
    for k, v in dst.state_dict().items():  # the visual trunk and the text tower are copied, exactly
        if k.startswith(("encoder.", "text_encoder.")):
            assert torch.equal(v, src.state_dict()[k]), k
    after = dst.state_dict()
    assert all(torch.equal(after[k], v) for k, v in untouched.items())  # the rest keeps its own init ...
    differs = [k for k, v in untouched.items() if v.is_floating_point() and not torch.equal(v, src.state_dict()[k])]
    assert "decoder.conv_in.weight" in differs or len(differs) > 10  # ... which differs from the source's


def test_clip_init_refuses_a_checkpoint_that_leaves_towers_random(tmp_path):
    """A checkpoint of another architecture (a wider text tower, a missing tower) raises, naming counts, keys and
    the file, instead of training with a random tower; only the known gaps (encoder.norm, pos_embed) may stay."""
    import logging

    from unitok import UniTok, preset
    from unitok.train import load_clip_init

    torch.manual_seed(0)
    own = UniTok(preset("debug")).state_dict()
    gaps = ("encoder.norm.weight", "encoder.norm.bias", "encoder.pos_embed")  # ViTamin has fc_norm, another grid
    visual = {"visual.trunk." + k[len("encoder."):]: v for k, v in own.items()
              if k.startswith("encoder.") and k not in gaps}  # without the gaps: still accepted
    text = {"text." + k[len("text_encoder."):]: v for k, v in own.items() if k.startswith("text_encoder.")}
    wider = {k: torch.zeros(*v.shape[:-1], v.shape[-1] * 2) if v.dim() else v for k, v in text.items()}
    log = logging.getLogger("test")
    torch.save({**visual, **text}, tmp_path / "fits.pt")
    load_clip_init(UniTok(preset("debug")), str(tmp_path / "fits.pt"), log)
    for name, state, message in (("wider.pt", {**visual, **wider}, "tensors have another shape (e.g. text_encoder."),
                                 ("no_text.pt", visual, "tensors of the model are not in it (e.g. text_encoder.")):
        torch.save(state, tmp_path / name)
        with pytest.raises(ValueError, match="does not fit the model's architecture") as err:
            load_clip_init(UniTok(preset("debug")), str(tmp_path / name), log)
        assert str(tmp_path / name) in str(err.value) and message in str(err.value), str(err.value)


@pytest.mark.slow
def test_torchrun_launch_works_too_and_compiled(tmp_path, shards):
    """torchrun instead of deepspeed, with --compile (aot_eager: the graphs without inductor's C++ builds):
    no graph break, and no graph compiled after the first step (the GAN joins at step 2 of 4)."""
    from runtime.launch import torchrun_module

    run = tmp_path / "run"
    torchrun_module("unitok.train", _args(run, shards, "--total-steps", "4", "--save-every", "4", "--no-export",
                                          "--compile", "aot_eager"))
    m = _metrics(run)
    assert [r["step"] for r in m] == [1, 2, 3, 4] and (run / "latest").read_text() == "step-00000004"
    assert "compile: 7 blocks (aot_eager)" in (run / "log.txt").read_text()
    assert all(r["graph_breaks"] == 0 for r in m) and len({r["compiled_graphs"] for r in m}) == 1, m


@pytest.mark.slow
def test_trains_on_img2dataset_shards_of_real_photos(tmp_path):
    """img2dataset output (a glob over tars with _stats.json / .parquet side files) holding every image
    mode of the public crawls, a truncated JPEG and an empty file: the run finishes on 2 ranks, and the skipped
    samples are counted over all ranks (rank 0, which logs, reads none of them) and named by shard and key."""
    import re

    from public_formats import img2dataset_webdataset
    from real_data import image_variants

    raw = tmp_path / "raw"
    broken = ("empty.jpg", "truncated.jpg")
    items = sorted(image_variants().items(), key=lambda kv: (kv[0] in broken, kv[0]))  # both in shard 1
    img2dataset_webdataset(raw, items, per_shard=8)
    run = tmp_path / "run"
    p = deepspeed_module("unitok.train", _args(run, str(raw / "*.tar"), "--total-steps", "3", "--save-every", "3",
                                               "--no-export"), num_ranks=2)
    assert [m["step"] for m in _metrics(run)] == [1, 2, 3]
    out = p.stdout + p.stderr
    # the two broken files are named with their shard and key (img2dataset keys are 9 digits)
    assert "00001.tar: sample 000010005" in out and "00001.tar: sample 000010006" in out, out[-3000:]
    assert "00000.tar: sample" not in out
    log = (run / "log.txt").read_text()
    errors = int(re.search(r"data \(all ranks\): \d+ usable samples; skipped (\d+) \(decode_errors \1\)", log)[1])
    assert errors >= 2 and errors % 2 == 0, log  # each pass over shard 1 meets both
    assert f"skipped samples (all ranks) {errors} (decode_errors {errors})" in log


@pytest.mark.slow
def test_two_nodes_without_ssh_then_resume_on_one_node(tmp_path, shards):
    """launch/tokenizer.sh with NODE_RANK: two launchers on this machine act as two nodes of one rank each
    (DeepSpeed's --no_ssh, one hostfile with two names); a kill -9 at step 3 stops both nodes, and the run
    resumes on one node with two ranks (the same ZeRO world size), replaying step 3 exactly."""
    from runtime.launch import NodeLaunch

    run = tmp_path / "run"
    args = _args(run, shards, "--gan.no-enabled", "--loss.lpips", "0", "--total-steps", "4", "--save-every", "2")
    nodes = NodeLaunch("tokenizer.sh", [*args, "--debug.kill-at-step", "3"], tmp_path / "nodes").wait()
    for r, (code, out) in enumerate(nodes):
        assert code != 0, out[-2000:]  # both nodes stop after the kill; none waits forever
        assert f"node_rank={r}" in out and "{'node-a': [0], 'node-b': [1]}" in out, out[-2000:]
    assert "ranks [0] local [0]; node 1 (host " in (run / "log.txt").read_text()  # rank 0's view of the layout
    before = _metrics(run)
    assert [m["step"] for m in before] == [1, 2, 3] and (run / "latest").read_text() == "step-00000002"
    deepspeed_module("unitok.train", args)  # one node, two ranks: resumes at step 2
    after = _metrics(run)
    assert [m["step"] for m in after] == [1, 2, 3, 4] and after[:3] == before
