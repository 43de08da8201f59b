"""Both MLLM stages on faithful copies of the public releases, through the real commands.

Stage 1: DCLM under its release names (.jsonl.zst, gaps in the numbering, `null` texts) with a text
share high enough that text-only micro-batches certainly happen next to image batches on the other
rank, plus img2dataset COYO-style shards and a hub-parquet Midjourney-style set, extracted from real
photos of many modes. 2 ZeRO-3 ranks under the deepspeed launcher, 12 steps, kill -9, exact resume.
Stage 2 from the stage-1 export: Mini-Gemini conversations packed with `mllm.data.pack_images` from
the standard layout (GIF, wide, tall, RGBA, missing and empty images) and extracted in understanding
mode, plus the Midjourney-style set as text-to-image.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

from public_formats import hub_parquet, img2dataset_webdataset, mini_gemini
from public_text import write_dclm
from real_data import image_variants
from runtime.launch import deepspeed_module

pytestmark = pytest.mark.slow  # multi-process launches (deselect with -m 'not slow')


MAX_LEN = 128
STAGE1 = """name: real_stage1
root: {root}
sources:
  - name: dclm
    kind: text
    paths: dclm/**/*.jsonl.zst*
    weight: 4
  - name: coyo
    kind: pairs
    paths: coyo/codes/*.tar
    weight: 1
    t2i_ratio: 0.5
  - name: midjourney
    kind: pairs
    paths: midjourney/codes/*.tar
    weight: 1
    t2i_ratio: 1.0
"""
STAGE2 = """name: real_stage2
root: {root}
sources:
  - name: mgm
    kind: instructions
    paths: mgm/instructions/*.jsonl
    image_paths: mgm/codes/*.tar
    image_index: mgm/codes/index.json
    weight: 3
  - name: t2i
    kind: t2i
    paths: midjourney/codes/*.tar
    weight: 1
"""


def _single_process(fn, *args):
    """Run an in-process CLI as one rank even when the test runner has launcher variables set."""
    saved = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if k in os.environ}
    try:
        return fn(*args)
    finally:
        os.environ.update(saved)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tokenizer (debug preset, 32 px), tiny Llama, and the data of both stages, made by the real tools."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mllm.data import pack_images
    from mllm.data.sources import split_json_list
    from mllm.data.tiny_tokenizer import make_llama_tokenizer
    from unitok import UniTok, preset
    from unitok import extract

    d = tmp_path_factory.mktemp("real")
    torch.manual_seed(0)
    UniTok(preset("debug")).save_pretrained(d / "tok")
    make_llama_tokenizer(d / "llama")
    LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                 pad_token_id=0)).save_pretrained(d / "llama")
    data = d / "data"
    write_dclm(data / "dclm", docs_per_file=12, null_every=5)
    items = sorted(image_variants().items())
    img2dataset_webdataset(d / "raw/coyo", items, per_shard=8)
    hub_parquet(d / "raw/midjourney", items)
    tok = str(d / "tok")
    man = {}
    for name, pattern, mode in (("coyo", "raw/coyo/*.tar", "generation"),
                                ("midjourney", "raw/midjourney/data/*.parquet", "generation")):
        _single_process(extract.main, ["--tokenizer", tok, "--input", str(d / pattern), "--output",
                                       str(data / name / "codes"), "--mode", mode, "--threads", "2"])
        man[name] = json.loads((data / name / "codes/manifest.json").read_text())
    mg = mini_gemini(d / "mgm_src")
    _single_process(pack_images.main, ["--conversations", str(mg["conv"]), "--conversations", str(mg["extra"]),
                                       "--image-root", str(mg["root"]), "--out", str(d / "raw/mgm"), "--per-shard", "4"])
    _single_process(extract.main, ["--tokenizer", tok, "--input", str(d / "raw/mgm/*.tar"), "--output",
                                   str(data / "mgm/codes"), "--mode", "understanding", "--threads", "2"])
    man["mgm"] = json.loads((data / "mgm/codes/manifest.json").read_text())
    split_json_list(mg["conv"], data / "mgm/instructions", per_shard=8)
    (data / "mgm/instructions/extra.jsonl").write_bytes(mg["extra"].read_bytes())
    for name, text in (("stage1.yaml", STAGE1), ("stage2.yaml", STAGE2)):
        (d / name).write_text(text.format(root=data))
    return {"dir": d, "data": data, "manifests": man, "mgm": mg}


def _stage1_args(w, run_dir, *extra):
    d = w["dir"]
    return ["--stage", "pretrain", "--llama-dir", str(d / "llama"), "--tokenizer", str(d / "tok"),
            "--recipe", str(d / "stage1.yaml"), "--run-dir", str(run_dir), "--micro-batch", "1", "--grad-accum", "1",
            "--max-len", str(MAX_LEN), "--num-workers", "0", "--total-steps", "12", "--save-every", "4",
            "--log-every", "4", "--mllm", "depth_num_layers", "1", *extra]


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _replay_batches(w, rank: int, n: int, generated: bool = False) -> list[bool]:
    """Whether each of the first n micro-batches of `rank` holds an image (`generated`: one to generate, which
    has image tokens in the loss), by the trainer's own loader setup."""
    from transformers import AutoTokenizer

    from mllm.data.loader import MixtureLoader
    from mllm.data.recipe import load_recipe

    tok = AutoTokenizer.from_pretrained(w["dir"] / "llama")
    loader = MixtureLoader(load_recipe(w["dir"] / "stage1.yaml"), tok, rank=rank, world_size=2, seed=0,
                           micro_batch_size=1, max_len=MAX_LEN, pack=True, pad_id=tok.unk_token_id)
    out = []
    for batch in loader:
        has = batch["image_codes"] is not None and batch["image_codes"].shape[0] > 0
        out.append(has and (not generated or bool(batch["image_gen"].any())))
        if len(out) == n:
            return out
    raise AssertionError("loader ended early")


def test_extraction_kept_every_decodable_image(world):
    m = world["manifests"]
    assert m["mgm"]["image_size"] == 32 and m["coyo"]["grid"] == [2, 2]
    # understanding mode keeps the wide / tall / GIF / RGBA images; only the two broken files are lost
    assert m["mgm"]["totals"]["undecodable"] == 1  # truncated.jpg (the empty file is never packed)
    assert m["coyo"]["totals"]["undecodable"] == 2  # truncated.jpg + empty.jpg
    assert m["coyo"]["totals"]["dropped_aspect"] == 2  # generation mode: wide + tall


def test_stage1_text_only_batches_on_zero3_kill_and_exact_resume(world, tmp_path):
    full = tmp_path / "full"
    deepspeed_module("mllm.train", _stage1_args(world, full), timeout=600)
    log = (full / "log.txt").read_text()
    counts = re.search(r"parameter elements per rank: \[(\d+), (\d+)\] of (\d+)", log).groups()
    a0, a1, total = (int(c) for c in counts)
    assert abs(a0 - total / 2) < 0.1 * total and abs(a1 - total / 2) < 0.1 * total  # ZeRO-3 halves it
    # fp32 asked for (auto on CPU), fp32 partitions built: each rank's parameters take as many bytes as its
    # fp32 master copy (DeepSpeed's zero.Init once built bf16 partitions on CPU whatever the dtype asked for)
    assert "precision: fp32" in log
    params, master = map(float, re.search(r"model-state MiB [\d.]+ \(params ([\d.]+), fp32 master ([\d.]+)", log).groups())
    assert master > 0 and params == master, (params, master)
    a = _metrics(full)
    assert [m["step"] for m in a] == list(range(1, 13))
    # the counters saw text-only batches and image batches, and on one step the ranks differed
    stats = json.loads((full / "data_stats.json").read_text())
    text_only = stats["text_only_batches_per_rank"]
    assert stats["batches_per_rank"] == [12, 12] and all(0 < t < 12 for t in text_only), stats
    has_img = [_replay_batches(world, r, 12) for r in (0, 1)]
    assert [12 - sum(h) for h in has_img] == text_only  # the replay is the trainer's data stream
    assert any(h0 != h1 for h0, h1 in zip(*has_img))  # a text-only rank next to an image rank
    # the record is over both ranks' tokens: a step where neither had an image logs image_loss null and 0 image
    # tokens (not a 0 that would drag the image loss down); one where only rank 1 had images logs rank 1's
    either = [g0 or g1 for g0, g1 in zip(*(_replay_batches(world, r, 12, generated=True) for r in (0, 1)))]
    assert [m["image_loss"] is not None for m in a] == either == [m["image_tokens"] > 0 for m in a]
    assert not all(either)  # a step without image tokens on either rank is in the test
    assert all(m["text_tokens"] > 0 and m["text_loss"] > 0 for m in a)
    dclm = stats["sources"]["dclm"]
    assert dclm["skipped"]["empty_text"] > 0
    assert dclm["examples"]["empty_text"][0].startswith("shard_000000") and "'text' is null" in \
        dclm["examples"]["empty_text"][0]
    assert [m["step"] for m in a if "data" in m] == [4, 8, 12]  # logged every log_every steps
    assert log.count("data (all ranks):") == 3 and "data at the end (all ranks):" in log
    assert json.loads((full / "export/config.json").read_text())["image_size"] == 32

    crash = tmp_path / "crash"
    p = deepspeed_module("mllm.train", _stage1_args(world, crash, "--debug.kill-at-step", "10"), check=False, timeout=600)
    assert p.returncode != 0 and (crash / "latest").read_text() == "step-00000008"
    deepspeed_module("mllm.train", _stage1_args(world, crash, "--no-export"), timeout=600)
    b = _metrics(crash)
    assert [m["step"] for m in b] == list(range(1, 13))
    for x, y in zip(a, b):
        assert x["data_hash"] == y["data_hash"]
        assert (x["text_tokens"], x["image_tokens"]) == (y["text_tokens"], y["image_tokens"])
        for k in ("loss", "text_loss", "image_loss", "grad_norm"):
            if x[k] is None or y[k] is None:
                assert x[k] is y[k] is None, (x["step"], k, x[k], y[k])
                continue
            assert abs(x[k] - y[k]) <= 1e-6 * max(1.0, abs(x[k])), (x["step"], k, x[k], y[k])
    assert json.loads((crash / "data_stats.json").read_text()) == stats
    # the export command (run folder -> its latest step) refuses an --out that holds the checkpoint or is no
    # export (it replaced --out whole: `--out RUN` deleted every checkpoint), and replaces an earlier export
    from mllm.export import main as export_main

    for out in (crash, crash / "step-00000012", tmp_path):
        with pytest.raises((ValueError, FileExistsError), match="holds .* would delete|not an earlier export"):
            export_main(["--checkpoint", str(crash), "--out", str(out)])
    assert (crash / "latest").read_text() == "step-00000012" and (crash / "step-00000012/mllm").is_dir()
    for _ in range(2):
        export_main(["--checkpoint", str(crash), "--out", str(crash / "export")])
    assert json.loads((crash / "export/config.json").read_text())["image_size"] == 32

    # stage 2 from the stage-1 export on the Mini-Gemini conversations
    _stage2(world, full / "export", tmp_path / "ft")


def _stage2(world, init_from: Path, run: Path):
    from mllm.data.preflight import preflight
    from mllm.data.recipe import load_recipe
    from mllm.data.sources import build_source

    d = world["dir"]
    deepspeed_module("mllm.train", [
        "--stage", "finetune", "--init-from", str(init_from), "--recipe", str(d / "stage2.yaml"),
        "--run-dir", str(run), "--micro-batch", "1", "--grad-accum", "1", "--max-len", str(MAX_LEN),
        "--num-workers", "0", "--total-steps", "6", "--save-every", "6", "--log-every", "3"], timeout=600)
    assert [m["step"] for m in _metrics(run)] == list(range(1, 7))
    assert (d / "data/mgm/codes/index.json").is_file()  # written next to the shards, not in the cwd
    stats = json.loads((run / "data_stats.json").read_text())["sources"]["mgm"]
    assert stats["with_image"] > 0 and stats["skipped"]["missing_image"] > 0
    # one finite pass over the conversations: which images were found, exactly
    recipe = load_recipe(d / "stage2.yaml")
    preflight(recipe, expect_image_size=32)
    from transformers import AutoTokenizer

    src = build_source(recipe, recipe.sources[0], AutoTokenizer.from_pretrained(init_from), max_len=MAX_LEN)
    keys = [rec.key for rec, *_ in src.records()]
    st = src.stats()
    found = " ".join(keys)
    for conv_id in ("1453600173", "vg_2", "tv_1", "140031996"):  # GIF, wide, tall, RGBA (stored as .png)
        assert f"id={conv_id}" in found, conv_id
    # absent file, zero-byte file, `..` escape, absolute path, truncated JPEG: no codes, counted by name
    assert st["skipped"]["missing_image"] == 5, st
    lost = {"absent": "missing_404.jpg", "empty": "000000000030.jpg", "escape": "../escape.jpg",
            "abs": "escape.jpg", "tv_0": "0a0bc91825468c45.jpg"}
    for ex in st["examples"]["missing_image"]:  # the first few, each with file, line, id and image
        conv_id = ex.split(" id=")[1].split(":")[0]
        assert conv_id in lost and ex.endswith(f"{lost[conv_id]}'"), ex
    assert st["skipped"]["malformed"] >= 3  # image: 5, no conversations, a broken JSONL line
    # the export records the image size, and chat refuses another one
    from mllm.engine import EngineConfig, MLLMEngine

    with pytest.raises(ValueError, match="does not match the 32 px images"):
        MLLMEngine.load(EngineConfig(model=str(run / "export"), tokenizer=str(d / "tok"), image_size=64))
    engine = MLLMEngine.load(EngineConfig(model=str(run / "export"), tokenizer=str(d / "tok")))
    assert engine.image_size == 32 and engine.grid == (2, 2)
    # the stage-2 export answers about a real photo and generates an image
    from mllm.engine import ChatSession, ImageGenConfig

    session = ChatSession(engine)
    assert session.attach([world["mgm"]["root"] / "vg/VG_100K/2.jpg"]) == 1
    reply = session.answer(session.prepare("What is shown?", max_new_tokens=4))
    assert 1 <= reply.num_tokens <= 4 and not reply.stopped
    images = engine.generate(["a photo of a cat"], ImageGenConfig(cfg_scale=2.0), torch.Generator().manual_seed(0))
    assert images.shape == (1, 32, 32, 3)
