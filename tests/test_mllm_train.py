"""The MLLM trainer through the real `deepspeed` launcher on the demo data: ZeRO-3 on 2 CPU ranks (gloo),
resume on 1 rank from a 2-rank checkpoint; in bf16: the NaN guard, kill during a save, exact resume.
(Partitioning, kill -9 and exact resume in fp32, export, stage 2 from the export and generation from
it: test_real_data_mllm.py.)"""
import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

from mllm.data.tiny_tokenizer import make_llama_tokenizer
from runtime.launch import ROOT, deepspeed_module, ds_env

pytestmark = pytest.mark.slow  # multi-process launches (deselect with -m 'not slow')


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Demo data + codes (debug tokenizer) + a tiny Llama folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from experiments.synthetic import write_demo_data
    from unitok import UniTok, preset

    d = tmp_path_factory.mktemp("mllm_assets")
    write_demo_data(d / "data")
    torch.manual_seed(0)
    UniTok(preset("debug")).save_pretrained(d / "tok")
    subprocess.run([sys.executable, "-m", "unitok.extract", "--tokenizer", str(d / "tok"), "--input",
                    str(d / "data/images/{00000..00005}.tar"), "--output", str(d / "data/codes"), "--size", "32"],
                   check=True, cwd=ROOT, env=ds_env(), capture_output=True)
    make_llama_tokenizer(d / "llama")
    LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                 pad_token_id=0)).save_pretrained(d / "llama")
    return d


def _stage1(assets, run_dir, *extra):
    return ["--stage", "pretrain", "--llama-dir", str(assets / "llama"), "--tokenizer", str(assets / "tok"),
            "--recipe", str(ROOT / "data_recipes/demo.yaml"), "--data-root", str(assets / "data"),
            "--run-dir", str(run_dir), "--micro-batch", "2", "--grad-accum", "2", "--max-len", "192",
            "--num-workers", "0", "--total-steps", "4", "--save-every", "2", "--log-every", "1",
            "--mllm", "depth_num_layers", "1", *extra]


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_nodes_survive_a_node_kill_then_resume_on_one_node_and_on_one_rank(tmp_path, assets):
    """launch/mllm_stage1.sh on two simulated nodes of one rank each (DeepSpeed's no-ssh mode, ZeRO-3 across
    the nodes). kill -9 of node 1's rank from outside stops both nodes (node 0's rank fails in its next
    collective instead of waiting); the run resumes on one node with two ranks and replays the lost steps
    exactly, then continues on one rank from the consolidated weights."""
    import time

    from runtime.launch import NodeLaunch

    run = tmp_path / "run"
    args = _stage1(assets, run, "--total-steps", "12", "--no-export")[2:]  # the script passes --stage pretrain
    nodes = NodeLaunch("mllm_stage1.sh", args, tmp_path / "nodes")
    deadline = time.time() + 240
    while not (run / "step-00000004").is_dir() and time.time() < deadline:  # the second checkpoint
        time.sleep(0.05)
    victims = nodes.rank_pids(1)
    assert len(victims) == 1, victims
    os.kill(victims[0], signal.SIGKILL)
    t0 = time.time()
    (code0, out0), (code1, out1) = nodes.wait(timeout=120)
    assert code0 != 0 and code1 != 0, out0[-2000:] + out1[-2000:]  # nobody waits for the dead rank
    assert time.time() - t0 < 60
    log = (run / "log.txt").read_text()
    assert re.search(r"ranks: node 0 \(host [^)]+\): ranks \[0\] local \[0\]; node 1 \(host [^)]+\): ranks \[1\] "
                     r"local \[0\]", log), log[:2000]
    assert re.search(r"parameter elements per rank: \[\d+, \d+\]", log)  # ZeRO-3 partitions across the nodes
    before = _metrics(run)
    last = int((run / "latest").read_text().split("-")[1])
    assert 4 <= last < 12 and [m["step"] for m in before] == list(range(1, len(before) + 1)), (last, before)
    deepspeed_module("mllm.train", _stage1(assets, run, "--total-steps", "12", "--no-export"))  # one node, two ranks
    after = _metrics(run)
    assert [m["step"] for m in after] == list(range(1, 13))
    for x, y in zip(before, after):  # the steps after the checkpoint are replayed exactly
        assert x["data_hash"] == y["data_hash"] and x["loss"] == y["loss"] and x["grad_norm"] == y["grad_norm"], x["step"]
    p = deepspeed_module("mllm.train", _stage1(assets, run, "--total-steps", "13", "--no-export"), num_ranks=1)
    assert "was written by 2 ranks, this run has 1" in p.stdout + p.stderr
    assert [m["step"] for m in _metrics(run)] == list(range(1, 14)) and (run / "latest").read_text() == "step-00000013"
    # step 13 went on from step 12's weights: DeepSpeed's fp32 master copies, made at initialize from the stage's
    # starting weights, were refreshed after the load (else its first step wrote them back over the loaded weights).
    # The moments restarted, so that step moved each weight by at most its learning rate (no weight decay), which
    # is below the peak (before the refresh, the step took them back 6.7 times the peak, to the starting weights).
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    w12, w13 = (get_fp32_state_dict_from_zero_checkpoint(str(run / f"step-000000{s}"), tag="mllm") for s in (12, 13))
    moved = max((w13[k] - w12[k]).abs().max().item() for k in w12)
    peak = max(m["lr"] for m in _metrics(run))
    assert moved <= peak, (moved, peak)


def test_bf16_nan_guard_kill_during_save_and_exact_resume(tmp_path, assets):
    """bf16 on CPU (DeepSpeed's bf16 section: bf16 weights, fp32 master copies), the NaN guard under
    ZeRO-3, a kill -9 in the middle of a save, and a resume that replays the lost steps exactly; with the
    fused AdamW kernel (--optim.fused) over ZeRO-3's fp32 partitions."""
    run = tmp_path / "run"
    bf16 = ("--precision", "bf16", "--no-export", "--optim.fused")
    p = deepspeed_module("mllm.train", _stage1(assets, run, *bf16, "--debug.kill-at-step", "4",
                                               "--debug.kill-during-save", "--debug.nan-at-step", "2"), check=False)
    assert p.returncode != 0
    assert "--precision bf16 on CPU: running bf16 for testing" in p.stdout + p.stderr
    # the NaN guard: step 2's first micro batch is dropped on both ranks and training goes on
    log = (run / "log.txt").read_text()
    assert "precision: bf16 weights, fp32 master copies" in log
    assert "optimizer: AdamW (fused kernel)" in log
    assert "step 2: non-finite loss on some rank (here: {'loss': nan})" in log, log[-2000:]  # (it said step 1)
    # bf16 weights next to fp32 master copies: this rank's parameters take half the master's bytes
    params, master = map(float, re.search(r"model-state MiB [\d.]+ \(params ([\d.]+), fp32 master ([\d.]+)", log).groups())
    assert master > 0 and abs(2 * params - master) <= 0.02, (params, master)
    before = _metrics(run)
    assert [m["step"] for m in before] == [1, 2, 3, 4] and all(0 < m["loss"] < 100 for m in before)
    assert [m.get("skipped_micro_batches") for m in before] == [None, 1, None, None]
    assert (run / "latest").read_text() == "step-00000002" and not (run / "step-00000004").exists()
    deepspeed_module("mllm.train", _stage1(assets, run, *bf16))  # resumes at step 2, replays 3 and 4
    after = _metrics(run)
    assert [m["step"] for m in after] == [1, 2, 3, 4]
    for x, y in zip(before, after):
        assert x["data_hash"] == y["data_hash"] and x["loss"] == y["loss"] and x["grad_norm"] == y["grad_norm"]
    assert (run / "latest").read_text() == "step-00000004" and not list(run.glob(".tmp-*"))


def test_sigusr1_to_one_rank_stops_both_at_a_saved_step(tmp_path, assets):
    """SLURM's early warning (`--signal=USR1@SECONDS`) reaching only rank 1 of a ZeRO-3 run: the ranks agree at
    the end of the step, both save its (partitioned) checkpoint and exit 138, which the launcher reports; the
    run then resumes from that step."""
    import time

    import psutil

    from runtime.launch import deepspeed_cmd, free_port, leaked_shm

    run, port = tmp_path / "run", free_port()
    args = _stage1(assets, run, "--total-steps", "30", "--save-every", "100", "--no-export")
    job = subprocess.Popen(deepspeed_cmd("mllm.train", args, 2, port), cwd=ROOT, env=ds_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 240
    while not ((run / "metrics.jsonl").is_file() and len(_metrics(run)) >= 2):
        assert job.poll() is None and time.time() < deadline, job.communicate()[0][-3000:]
        time.sleep(0.1)
    ranks = [k for k in psutil.Process(job.pid).children(recursive=True) if "--local_rank=1" in " ".join(k.cmdline())]
    assert len(ranks) == 1, [k.cmdline() for k in ranks]
    os.kill(ranks[0].pid, signal.SIGUSR1)
    out = job.communicate(timeout=120)[0]
    assert job.returncode != 0 and not leaked_shm(port)
    assert "exits with return code = 138" in out, out[-3000:]
    stopped = len(_metrics(run))
    assert 2 <= stopped < 30 and (run / "latest").read_text() == f"step-{stopped:08d}", out[-3000:]
    assert f"SIGUSR1: stopped after step {stopped}, its checkpoint is saved; exit code 138" in (
        run / "log.txt").read_text()
    deepspeed_module("mllm.train", args)
    assert f"resumed from {run / f'step-{stopped:08d}'} at step {stopped}" in (run / "log.txt").read_text()
    assert [m["step"] for m in _metrics(run)] == list(range(1, 31))
