"""The MLLM trainer through the real `deepspeed` launcher on the demo data: ZeRO-3 on 2 CPU ranks (gloo),
resume on 1 rank from a 2-rank checkpoint; in bf16: the NaN guard, kill during a save, exact resume.
(Partitioning, kill -9 and exact resume in fp32, export, stage 2 from the export and generation from
it: test_real_data_mllm.py.)"""
import json
import re
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


def test_resume_on_one_rank_from_a_two_rank_checkpoint(tmp_path, assets):
    run = tmp_path / "run"
    deepspeed_module("mllm.train", _stage1(assets, run, "--total-steps", "2", "--no-export"))
    p = deepspeed_module("mllm.train", _stage1(assets, run, "--total-steps", "3", "--no-export"),
                         num_ranks=1)
    assert "was written by 2 ranks, this run has 1" in p.stdout + p.stderr
    steps = [m["step"] for m in _metrics(run)]
    assert steps == [1, 2, 3] and (run / "latest").read_text() == "step-00000003"


def test_bf16_nan_guard_kill_during_save_and_exact_resume(tmp_path, assets):
    """bf16 on CPU (DeepSpeed's bf16 section: bf16 weights, fp32 master copies), the NaN guard under
    ZeRO-3, a kill -9 in the middle of a save, and a resume that replays the lost steps exactly."""
    run = tmp_path / "run"
    bf16 = ("--precision", "bf16", "--no-export")
    p = deepspeed_module("mllm.train", _stage1(assets, run, *bf16, "--debug.kill-at-step", "4",
                                               "--debug.kill-during-save", "--debug.nan-at-step", "2"), check=False)
    assert p.returncode != 0
    assert "--precision bf16 on CPU: running bf16 for testing" in p.stdout + p.stderr
    # the NaN guard: step 2's first micro batch is dropped on both ranks and training goes on
    log = (run / "log.txt").read_text()
    assert "precision: bf16 weights, fp32 master copies" in log
    assert "step 1: non-finite loss on some rank (here: {'loss': nan})" in log, log[-2000:]
    # bf16 weights next to fp32 master copies: this rank's parameters take half the master's bytes
    params, master = map(float, re.search(r"model-state MB [\d.]+ \(params ([\d.]+), fp32 master ([\d.]+)", log).groups())
    assert master > 0 and abs(2 * params - master) <= 0.02, (params, master)
    before = _metrics(run)
    assert [m["step"] for m in before] == [1, 2, 3, 4] and all(0 < m["loss"] < 100 for m in before)
    assert (run / "latest").read_text() == "step-00000002" and not (run / "step-00000004").exists()
    deepspeed_module("mllm.train", _stage1(assets, run, *bf16))  # resumes at step 2, replays 3 and 4
    after = _metrics(run)
    assert [m["step"] for m in after] == [1, 2, 3, 4]
    for x, y in zip(before, after):
        assert x["data_hash"] == y["data_hash"] and x["loss"] == y["loss"] and x["grad_norm"] == y["grad_norm"]
    assert (run / "latest").read_text() == "step-00000004" and not list(run.glob(".tmp-*"))
