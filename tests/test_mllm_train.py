"""The MLLM trainer through the real `deepspeed` launcher: ZeRO-3 on 2 CPU ranks (gloo), kill -9 and
exact resume, export, stage 2 from the export, resume on 1 rank."""
import json
import re
import subprocess
import sys

import pytest
import torch

from launch_utils import ROOT, deepspeed_module, ds_env
from mllm.data.tiny_tokenizer import make_llama_tokenizer

pytestmark = pytest.mark.slow  # multi-process launches (deselect with -m 'not slow')


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Demo data + codes (debug tokenizer) + a tiny Llama folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mllm.data.demo_data import write_demo_data
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


def test_zero3_two_ranks_partition_kill_resume_export_finetune(tmp_path, assets):
    full = tmp_path / "full"
    deepspeed_module("mllm.train", _stage1(assets, full))
    log = (full / "log.txt").read_text()
    counts, total = re.search(r"parameter elements per rank: \[(\d+), (\d+)\] of (\d+)", log).groups()[:2], \
        int(re.search(r"of (\d+)", log.split("parameter elements per rank")[1]).group(1))
    a0, a1 = int(counts[0]), int(counts[1])
    assert abs(a0 - total / 2) < 0.1 * total and abs(a1 - total / 2) < 0.1 * total  # ZeRO-3 halves it
    a = _metrics(full)
    assert [m["step"] for m in a] == [1, 2, 3, 4]

    crash = tmp_path / "crash"
    p = deepspeed_module("mllm.train", _stage1(assets, crash, "--kill-at-step", "3"), check=False)
    assert p.returncode != 0 and (crash / "latest").read_text() == "step-00000002"
    deepspeed_module("mllm.train", _stage1(assets, crash))
    b = _metrics(crash)
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert x["data_hash"] == y["data_hash"]
        for k in ("loss", "text_loss", "image_loss", "grad_norm"):
            assert abs(x[k] - y[k]) <= 1e-6 * max(1.0, abs(x[k])), (x["step"], k, x[k], y[k])

    # stage 2 from the stage-1 export, then export again; the result loads and generates
    ft = tmp_path / "ft"
    deepspeed_module("mllm.train", [
        "--stage", "finetune", "--init-from", str(full / "export"), "--recipe",
        str(ROOT / "data_recipes/demo_finetune.yaml"), "--data-root", str(assets / "data"), "--run-dir", str(ft),
        "--micro-batch", "2", "--grad-accum", "1", "--max-len", "192", "--num-workers", "0",
        "--total-steps", "2", "--save-every", "2", "--log-every", "1"])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import mllm  # noqa: F401
    from mllm.data.templates import chat_prompt, null_prompt_ids, t2i_prompt_ids
    from mllm.generate import answer, generate_images

    model = AutoModelForCausalLM.from_pretrained(ft / "export").eval()
    tok = AutoTokenizer.from_pretrained(ft / "export")
    out = answer(model, [chat_prompt(tok, ["What shape is in the image?"], images=[torch.zeros(4, 2, 2).long()])],
                 max_new_tokens=4)
    assert len(out) == 1 and len(out[0]) >= 1
    codes = generate_images(model, [t2i_prompt_ids(tok, "a red circle")], (2, 2), null_ids=null_prompt_ids(tok),
                            cfg_scale=2.0)
    assert codes.shape == (1, 4, 2, 2) and int(codes.max()) < 64


def test_resume_on_one_rank_from_a_two_rank_checkpoint(tmp_path, assets):
    run = tmp_path / "run"
    deepspeed_module("mllm.train", _stage1(assets, run, "--total-steps", "2", "--no-export"))
    p = deepspeed_module("mllm.train", _stage1(assets, run, "--total-steps", "3", "--no-export"),
                         num_ranks=1)
    assert "was written by 2 ranks, this run has 1" in p.stdout + p.stderr
    steps = [m["step"] for m in _metrics(run)]
    assert steps == [1, 2, 3] and (run / "latest").read_text() == "step-00000003"


def test_kill_during_save_keeps_the_previous_checkpoint(tmp_path, assets):
    run = tmp_path / "run"
    p = deepspeed_module("mllm.train", _stage1(assets, run, "--no-export", "--kill-at-step", "4",
                                               "--kill-during-save"), check=False)
    assert p.returncode != 0
    assert (run / "latest").read_text() == "step-00000002" and not (run / "step-00000004").exists()
    deepspeed_module("mllm.train", _stage1(assets, run, "--no-export"))
    assert [m["step"] for m in _metrics(run)] == [1, 2, 3, 4]
    assert (run / "latest").read_text() == "step-00000004" and not list(run.glob(".tmp-*"))
