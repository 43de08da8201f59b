"""The embedded end-to-end demo: the whole pipeline at toy scale on CPU, with the real code paths.

    python -m experiments.demo --out runs/demo [--quick] [--fresh] [--no-chat] [--seed 0]
    (launch/demo.sh and `make demo` run it)

Steps (each is skipped when its output already exists, so a second run resumes or is a no-op;
--fresh starts over; a folder made with other sizes, recorded in OUT/sizes.json, is refused):
  1. data        procedural coloured shapes (experiments.synthetic: webdataset shards, the tokenizer's own
                 larger set of shards, JSONL text, LLaVA JSON, held-out set)
  2. text tok.   a tiny sentencepiece Llama tokenizer trained on the demo text + a random tiny Llama
  3. tokenizer   unitok.train (debug preset, wider encoder, narrower decoder, 64 px) through deepspeed
                 (1 rank: the tiny model trains faster on one rank with both cores) -> export
  4. codes       unitok.extract on 2 ranks (the training shards)
  5. stage 1     mllm.train --stage pretrain (ZeRO-3, 2 ranks, data_recipes/demo.yaml) -> export
  6. stage 2     mllm.train --stage finetune from the stage-1 export (demo_finetune.yaml) -> export
  7. chat        mllm.chat one-shot: a question about a held-out image, an image from a held-out prompt
  8. report      reconstruction PSNR, zero-shot shape/colour accuracy, VQA accuracy on held-out
                 questions, and the fraction of generated images whose colour and shape match the
                 prompt (experiments.synthetic.classify_image); PNGs under OUT/report/

On 2 CPU cores the default sizes take about 13-19 minutes (13.4-17.0 on AVX-512 hosts; AVX2 hosts ran an older
configuration 1.1-1.5x slower); --quick is the reduced version the tests run. OUT/timing.json keeps each step's
seconds and the host it ran on (a resumed run keeps those of the steps it skips).
"""
from __future__ import annotations

import contextlib
import json
import random
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from runtime.distributed import describe_host
from runtime.launch import ROOT, deepspeed_cmd, free_port, job_env, run_logged
from runtime.run import write_json_atomic


@dataclass
class DemoSizes:
    """How much each stage trains."""

    num_images: int = 768
    """Training images of the MLLM stages."""
    tokenizer_images: int = 6144
    """Training images of the tokenizer, a draw of their own (0: the MLLM's images). On 768 images (62 epochs
    in 1500 steps) the tokenizer fits its set more than the world. On the same 240 held-out images, two draws
    of 6144 gave PSNR 24.1 / 23.5 dB, zero-shot shape 78 / 83 %, reconstructions read right 78 / 65 %, against
    23.2, 78 and 63 on the 768, at the same steps and time. The MLLM stays on 768: trained on a 6144 set it
    generated worse in its steps (41 % against 60 % match on 144 other prompts, same tokenizer)."""
    num_eval: int = 240
    """Held-out images (reconstruction, zero-shot, one VQA question each). 48 left a standard error of about
    7 points on each accuracy: on a 288-image set the 2026-12-02 demo tokenizer read 62 % of shapes zero-shot, where
    its 48-image figure had been 73."""
    image_size: int = 64
    """Image side in pixels (the tokenizer sees (side / 16)^2 positions per image)."""
    tokenizer_steps: int = 2400
    """Tokenizer optimizer steps. Steps are what moves shape most, and steeply: from 1500 to 3000 steps (same seed,
    all 32 images decoded, reconstructions of 720 fresh renders, 2026-12-04) the checker reads 68 -> 99 % of
    reconstructions right, zero-shot shape 76 -> 91 % (240 held-out), PSNR 23.3 -> 26.0 dB; at 1500 steps two
    training seeds read 68 / 66 %, and no loss or width change tried there came near (README.md)."""
    tokenizer_decode: int = 16
    """Images of each micro batch decoded for the pixel losses (`unitok.train --num-decode`; 0 = all); the
    contrastive loss still sees the whole batch. Half the batch makes a step 1.3x faster (219 against 165-180
    samples/s), which is what fits the 15 minutes: reconstructions read right 93 / 94 % at 2400 / 3000 steps,
    zero-shot shape 90 / 89 % (all decoded, 3000 steps: 99 and 91). Batch 16 for 2800 steps, all decoded, instead
    read 81 % and zero-shot 63 % (the contrastive loss lost half its negatives)."""
    tokenizer_batch: int = 32
    """Tokenizer micro batch per rank."""
    tokenizer_ranks: int = 1
    """Ranks of the tokenizer job. One: the tiny tokenizer spends 2 ranks' time in gloo all-reduces;
    on 2 cores one rank with both trained the 32 px demo tokenizer at about 290 samples/s, 2 ranks of one
    core each at about 140. At 64 px the two are equal (135-141 samples/s, 300 steps back to back)."""
    tokenizer_model: tuple[str, ...] = ("--model.encoder.stem-width", "32", "--model.encoder.stage-widths", "32", "64",
                                        "--model.decoder.stage-widths", "16", "32")
    """`--model.*` overrides of the debug preset for the demo's tokenizer: 4x wider encoder convolutions, a
    decoder half as wide (its upsampling convolutions were 55 % of a step at the encoder's widths; at half
    width a step is 2.2x faster, and 1500 steps reconstruct shapes the checker reads 73 % right, against
    50-56 % for 1000 steps at full width, on 288 held-out images)."""
    stage1_steps: int = 360
    """MLLM stage-1 steps."""
    stage2_steps: int = 480
    """MLLM stage-2 steps."""
    mllm_batch: int = 4
    """MLLM rows per rank per step. Half the rows for twice the steps (the same samples, 1.3x the time: 6.5 against
    5.3 min of stages) generated better on one tokenizer (2026-12-04, 864 prompts, the best of 4 at CFG 3): MLLM seeds
    0 / 1 / 2 72 / 66 / 69 % against 70 / 44 for 8 rows x 180 + 240 steps; one sample 67 / 61 / 66 against 59 / 39."""
    hidden: int = 192
    """Tiny Llama width."""
    layers: int = 4
    """Tiny Llama layers."""
    num_generate: int = 576
    """Prompts generated for the prompt-match check (the grid PNG shows the first 12). 576 leave a standard error
    of about 2 points on the match rate (288 left 3, 96 left 5), for half a minute of the report."""


GENERATION = {"cfg_scale": 1.5, "temperature": 0.3, "candidates": 4}
"""How the report and the chat step draw images (`mllm.engine.ImageGenConfig` fields): CFG 1.5, temperature 0.3,
the best of 4 samples by the tokenizer's own text-image score. Chosen on prompts of other seeds (456: 288, 789: 576)
than the report's (1000). Temperature and ranking with the 2026-12-04 export at CFG 3: one sample greedy 49 / 54 %,
at temperature 0.3 56 / 58 % (0.2: 60, 0.5: 51, 1: 44); the best of 4 at 0.3 by the tokenizer's score 68 / 71 %
(8: 69), by the MLLM's own likelihood 60 / 58. The guidance scale on the three MLLM training seeds of the
2026-12-05 configuration, mean of the 6 (seed, prompt set) cells, best of 4 at 0.3: CFG 1 73.8 % (67.7-81.2),
1.25 75.4, 1.5 77.2 (74.3-78.5), 2 76.1, 3 69.3, 4 60.6, 6 45.9; at CFG 1.5 temperature 0.2 76.5, 0.5 77.5,
the best of 8 79.1, one sample 67.6 (63.5 at CFG 3). What stronger guidance loses is shape: on
prompt seed 789 (576 prompts) MLLM seeds 0 / 1 drew 142 / 183 squares and triangles as circles at CFG 3, 110 / 134
at 1.5."""

QUICK = DemoSizes(num_images=192, tokenizer_images=384, num_eval=48, image_size=32, tokenizer_model=(),
                  tokenizer_steps=40, tokenizer_batch=16, tokenizer_decode=0, stage1_steps=12, stage2_steps=12,
                  mllm_batch=4, hidden=64, layers=2, num_generate=3)

# What the quick run must reach (tests/test_demo.py). Each bound lies outside what trained runs reached (10 training
# seeds on torch 2.14.1; on 2.9.1, 10 for the tokenizer and 4 for the MLLM stages) and inside what a step trained
# at learning rate 1e-9 reads. The figures are in README.md ("The demo") and benchmarks/README.md, and
# `python benchmarks/demo_floors.py` measures them. Each loss is bounded on its own: the total mixes them in
# proportions that vary per batch.
QUICK_FLOORS = {"recon_psnr": 11.0, "codebook_usage_pct": 15.0}
"""report.json figures: each must be at least this."""
QUICK_LOSS_CEILINGS = {("tokenizer", "l2"): 0.75, ("tokenizer", "clip"): 0.8, ("stage1", "text_loss"): 0.92,
                       ("stage1", "image_loss"): 0.92, ("stage2", "text_loss"): 0.94}
"""(run, loss) -> the most `loss_ratio` may read."""


def loss_ratio(metrics: Path, key: str) -> float:
    """A run's logged `key` over its last 3 logged steps relative to its first 3 (1: it did not learn). Steps
    that logged it as null (no token of that kind on rank 0) are left out."""
    values = [row[key] for row in map(json.loads, metrics.read_text().splitlines()) if row.get(key) is not None]
    if len(values) < 6:
        raise ValueError(f"{metrics}: {len(values)} logged steps with {key!r}, a loss ratio needs 6")
    return sum(values[-3:]) / sum(values[:3])


def quick_checks(out: Path) -> list[tuple[str, float, str, bool]]:
    """The quick run's figures against QUICK_FLOORS and QUICK_LOSS_CEILINGS: (name, value, bound, passed) rows."""
    report = json.loads((out / "report" / "report.json").read_text())
    rows = [(k, report[k], f">= {v}", report[k] >= v) for k, v in QUICK_FLOORS.items()]
    for (run_name, key), ceiling in QUICK_LOSS_CEILINGS.items():
        r = loss_ratio(out / run_name / "metrics.jsonl", key)
        rows.append((f"{run_name} {key} ratio", r, f"<= {ceiling}", r <= ceiling))
    return rows


def _log(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _skipped(msg: str) -> bool:
    """Log that a step's output exists -> False: the step is skipped and keeps the time the run that did it took."""
    _log(msg)
    return False


def _echo(line: str) -> None:
    """A job's output line on the console, without the launchers' warnings and info lines."""
    if "WARNING" not in line and "warn" not in line and "[INFO]" not in line:
        print("    " + line.rstrip()[:200], flush=True)


def _deepspeed(module: str, args: list[str], ranks: int, log_file: Path) -> None:
    port = free_port()
    run_logged(deepspeed_cmd(module, args, ranks, port), port, log_file, what=f"demo step {module}", echo=_echo,
               cwd=ROOT)


def image_shards(out: Path, key: str = "image_shards") -> str:
    """The MLLM's training shards' brace pattern, as the data step's manifest names it (`key="tokenizer_shards"`:
    the tokenizer's)."""
    manifest = out / "data" / "manifest.json"
    patterns = json.loads(manifest.read_text())
    if key not in patterns:  # a data folder written before the demo gave the tokenizer its own images
        raise RuntimeError(f"{manifest} names no {key}: its data predates this demo; rerun with --fresh")
    return str(out / "data" / patterns[key])


# ---- steps --------------------------------------------------------------------------------------
# A step whose output exists returns False (`_skipped`); run() times the others.
def step_data(out: Path, sizes: DemoSizes) -> bool | None:
    from experiments.synthetic import DemoDataConfig, write_demo_data

    if (out / "data" / "manifest.json").is_file():
        return _skipped("data: exists")
    # data_recipes/demo*.yaml name 6 shards
    write_demo_data(out / "data", DemoDataConfig(num_images=sizes.num_images, images_per_shard=sizes.num_images // 6,
                                                 num_eval_images=sizes.num_eval, image_size=sizes.image_size,
                                                 num_tokenizer_images=sizes.tokenizer_images))
    _log(f"data: wrote {sizes.num_images} training images (+ {sizes.tokenizer_images} for the tokenizer), held-out "
         "set, text and instructions")


def step_text_model(out: Path, sizes: DemoSizes) -> bool | None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from mllm.data.tiny_tokenizer import make_llama_tokenizer

    if (out / "llama" / "model.safetensors").is_file():
        return _skipped("text tokenizer + tiny Llama: exist")
    data = out / "data"
    corpus = [json.loads(line)["text"] for f in sorted((data / "text").glob("*.jsonl"))
              for line in f.read_text().splitlines()]
    for conv in json.loads((data / "instructions" / "train.json").read_text()):
        corpus += [t["value"].replace("<image>\n", "") for t in conv["conversations"]]
    tmp = out / "llama.tmp"  # written aside and renamed: a kill must not leave a folder the next run skips
    shutil.rmtree(tmp, ignore_errors=True)
    make_llama_tokenizer(tmp, vocab_size=1024, extra_corpus=tuple(corpus))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=sizes.hidden, intermediate_size=sizes.hidden * 8 // 3 // 8 * 8,
                      num_hidden_layers=sizes.layers, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(tmp)
    shutil.rmtree(out / "llama", ignore_errors=True)
    tmp.rename(out / "llama")
    _log(f"text tokenizer (1024 pieces) + random tiny Llama ({sizes.layers} x {sizes.hidden})")


def step_tokenizer(out: Path, sizes: DemoSizes, seed: int = 0) -> bool | None:
    if (out / "tokenizer" / "export" / "model.safetensors").is_file():
        return _skipped("tokenizer: exported")
    ranks = sizes.tokenizer_ranks
    _log(f"tokenizer: training {sizes.tokenizer_steps} steps on {ranks} rank{'s' * (ranks > 1)}")
    _deepspeed("unitok.train", [
        "--preset", "debug", "--run-dir", str(out / "tokenizer"), *sizes.tokenizer_model,
        "--model.img-size", str(sizes.image_size), "--data.img-size", str(sizes.image_size),
        "--data.shards", image_shards(out, "tokenizer_shards"),
        "--data.local-batch-size", str(sizes.tokenizer_batch), "--num-decode", str(sizes.tokenizer_decode),
        "--data.num-workers", "0",
        "--total-steps", str(sizes.tokenizer_steps), "--save-every", str(max(10, sizes.tokenizer_steps // 3)),
        "--log-every", str(max(1, sizes.tokenizer_steps // 10)), "--optim.lr", "1e-3", "--seed", str(seed),
        # the GAN (random DINOv2 trunk) changed nothing measurable at this scale: it runs for the last 2 %, so
        # that the loss stays wired, not longer
        "--gan.random-backbone", "--gan.backbone", "debug", "--gan.start-frac", "0.98", "--loss.lpips", "0",
        "--resume", "auto"], ranks, out / "logs" / "tokenizer.log")


def step_codes(out: Path, sizes: DemoSizes, ranks: int) -> bool | None:
    data = out / "data"
    if (data / "codes" / "manifest.json").is_file():
        return _skipped("codes: exist")
    # the held-out images are not extracted: the report encodes them through the engine, as the chat does
    _deepspeed("unitok.extract", ["--tokenizer", str(out / "tokenizer" / "export"), "--input", image_shards(out),
                                  "--output", str(data / "codes"), "--size", str(sizes.image_size)], ranks,
               out / "logs" / "extract.log")
    _log("codes: extracted")


def _mllm_common(out: Path, sizes: DemoSizes, run: str, steps: int, seed: int) -> list[str]:
    return ["--data-root", str(out / "data"), "--run-dir", str(out / run), "--seed", str(seed), "--micro-batch",
            str(sizes.mllm_batch), "--grad-accum", "1", "--max-len", "256", "--num-workers", "0", "--total-steps",
            str(steps), "--save-every", str(max(5, steps // 2)), "--log-every", str(max(1, steps // 10)),
            "--resume", "auto",
            # the figures the README records were measured with the batch closed at the first sample that fits no
            # row; the default look-ahead (8) packs 2 points more positions here: to be measured before it is used
            "--pack-lookahead", "1"]


def step_stage1(out: Path, sizes: DemoSizes, ranks: int, seed: int = 0) -> bool | None:
    if (out / "stage1" / "export" / "config.json").is_file():
        return _skipped("stage 1: exported")
    _log(f"MLLM stage 1 (pretrain): {sizes.stage1_steps} steps, ZeRO-3 on {ranks} ranks")
    _deepspeed("mllm.train", ["--stage", "pretrain", "--llama-dir", str(out / "llama"), "--tokenizer",
                              str(out / "tokenizer" / "export"), "--recipe", str(ROOT / "data_recipes/demo.yaml"),
                              "--optim.lr", "2e-3", "--mllm", "depth_num_layers", "2",
                              *_mllm_common(out, sizes, "stage1", sizes.stage1_steps, seed)], ranks,
               out / "logs" / "stage1.log")


def step_stage2(out: Path, sizes: DemoSizes, ranks: int, seed: int = 0) -> bool | None:
    if (out / "stage2" / "export" / "config.json").is_file():
        return _skipped("stage 2: exported")
    _log(f"MLLM stage 2 (finetune): {sizes.stage2_steps} steps from the stage-1 export")
    _deepspeed("mllm.train", ["--stage", "finetune", "--init-from", str(out / "stage1" / "export"), "--recipe",
                              str(ROOT / "data_recipes/demo_finetune.yaml"), "--optim.lr", "1e-3",
                              *_mllm_common(out, sizes, "stage2", sizes.stage2_steps, seed)], ranks,
               out / "logs" / "stage2.log")


def _labelled_grid(rows: list[tuple[list, str, bool | None]], path: Path) -> None:
    """One PNG a person can judge at a glance: per row, images (PIL or (H, W, 3) uint8, enlarged with
    nearest neighbours to tiles of at least 96 px) then a caption; a verdict True/False colours the caption
    green/red."""
    from PIL import Image, ImageDraw

    tiles = [[(im if isinstance(im, Image.Image) else Image.fromarray(im)).convert("RGB") for im in ims]
             for ims, _, _ in rows]
    side = max(t.size[0] for ts in tiles for t in ts)
    side *= max(1, -(-96 // side))
    pad, text_w = 4, 430
    width = pad + max(len(ts) for ts in tiles) * (side + pad) + text_w
    sheet = Image.new("RGB", (width, pad + len(rows) * (side + pad)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, (ts, (_, text, ok)) in enumerate(zip(tiles, rows)):
        y = pad + r * (side + pad)
        for c, t in enumerate(ts):
            sheet.paste(t.resize((side, side), Image.NEAREST), (pad + c * (side + pad), y))
        colour = (0, 0, 0) if ok is None else ((0, 120, 0) if ok else (190, 0, 0))
        draw.multiline_text((pad + len(ts) * (side + pad) + 6, y + side // 2 - 14), text, fill=colour, spacing=4)
    sheet.save(path)


def _matches(judged: dict[str, str], shape: str, color: str) -> bool:
    """The checker's reading agrees with the scene on colour and shape (the demo's match rule)."""
    return judged["shape"] == shape and judged["color"] == color


def _templates(rep: Path, factor: str) -> Path:
    """Zero-shot prompts in the world's own caption phrasing, the other two attributes marginalised out
    (every colour/background, or shape/background, once): CLIP's ImageNet prompts ('a photo of a {}') are
    phrasings the demo's text tower never saw."""
    from experiments.synthetic import BACKGROUNDS, FOREGROUNDS, SHAPES

    if factor == "shape":
        lines = [f"a {c} {{}} on a {b} background" for c in FOREGROUNDS for b in BACKGROUNDS]
    else:
        lines = [f"a {{}} {s} on a {b} background" for s in SHAPES for b in BACKGROUNDS]
    path = rep / f"templates_{factor}.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def _eval_items(out: Path) -> list[dict]:
    return json.loads((out / "data" / "eval" / "questions.json").read_text())


def _eval_images(out: Path) -> dict[str, "object"]:
    """Held-out images by path, decoded from the eval shard."""
    import io

    import webdataset as wds
    from PIL import Image

    imgs = {}
    for s in wds.WebDataset(str(out / "data" / "eval" / "00000.tar"), shardshuffle=False):
        meta = json.loads(s["json"])
        imgs[meta["path"]] = Image.open(io.BytesIO(s["png"])).convert("RGB")
    return imgs


def step_chat(out: Path, sizes: DemoSizes) -> dict[str, str] | bool:
    """The chat script's one-shot modes on a held-out image and a held-out prompt -> report/chat.json (its
    content; False when an earlier run's is newer than the model)."""
    rep, model = out / "report", out / "stage2" / "export" / "model.safetensors"
    if (rep / "chat.json").is_file() and (rep / "chat.json").stat().st_mtime > model.stat().st_mtime:
        return _skipped("chat: done (report/chat.json)")
    rep.mkdir(parents=True, exist_ok=True)
    item = _eval_items(out)[0]
    img_path = rep / "held_out_question.png"
    _eval_images(out)[item["image"]].save(img_path)
    base = [sys.executable, "-m", "mllm.chat", "--model", str(out / "stage2" / "export"), "--tokenizer",
            str(out / "tokenizer" / "export"), "--image-size", str(sizes.image_size), "--seed", "0"]
    q = subprocess.run(base + ["--ask", item["question"], "--image", str(img_path)],
                       cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=300)
    prompt = f"a {item['color']} {item['shape']} on a {item['background']} background"
    flags = [a for k, v in GENERATION.items() for a in ("--" + k.replace("_", "-"), str(v))]
    g = subprocess.run(base + ["--generate", prompt, *flags, "--out-dir", str(rep / "chat")],
                       cwd=ROOT, env=job_env(),
                       capture_output=True, text=True, timeout=300)
    for p in (q, g):
        if p.returncode != 0:
            raise RuntimeError(f"chat failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    _log(f"chat: Q: {item['question']} -> A: {q.stdout.strip()[-200:]} (expected {item['answer']})")
    _log(f"chat: /gen {prompt!r} -> {g.stdout.strip()[-200:]}")
    result = {"question": item["question"], "answer": q.stdout.strip(), "expected": item["answer"],
              "gen_prompt": prompt, "gen_output": g.stdout.strip()}
    write_json_atomic(rep / "chat.json", result)
    return result


@torch.no_grad()
def step_report(out: Path, sizes: DemoSizes) -> dict:
    """Quality report: PSNR, zero-shot, VQA accuracy, generated-image prompt match."""
    from PIL import Image
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import mllm  # noqa: F401
    from experiments.synthetic import classify_image, random_scene
    from mllm.engine import ImageGenConfig, MLLMEngine
    from unitok import load_tokenizer
    from unitok.evaluate import main as tok_eval

    rep = out / "report"
    rep.mkdir(parents=True, exist_ok=True)
    items, images = _eval_items(out), _eval_images(out)
    # tokenizer: reconstruction and zero-shot by shape and by colour (ImageFolders of held-out images)
    flat, by_shape, by_color = rep / "eval_images", rep / "zs_shape", rep / "zs_color"
    for d in (flat, by_shape, by_color):
        shutil.rmtree(d, ignore_errors=True)
    for i, it in enumerate(items):
        img = images[it["image"]]
        for d, cls in ((flat, None), (by_shape, it["shape"]), (by_color, it["color"])):
            target = d / cls if cls else d
            target.mkdir(parents=True, exist_ok=True)
            img.save(target / f"{i:04d}.png")
    tok_dir = str(out / "tokenizer" / "export")
    tok_eval(["--tokenizer", tok_dir, "--images", str(flat), "--size", str(sizes.image_size), "--out",
              str(rep / "tok_recon")])
    for d, factor, o in ((by_shape, "shape", "zs1"), (by_color, "color", "zs2")):
        tok_eval(["--tokenizer", tok_dir, "--zeroshot-dir", str(d), "--size", str(sizes.image_size), "--out",
                  str(rep / o), "--templates", str(_templates(rep, factor))])
    recon = json.loads((rep / "tok_recon" / "metrics.json").read_text())
    zs_shape = json.loads((rep / "zs1" / "metrics.json").read_text())["zeroshot_top1"]
    zs_color = json.loads((rep / "zs2" / "metrics.json").read_text())["zeroshot_top1"]
    # the checker, validated: on the held-out renders themselves (its own accuracy) and on the tokenizer's
    # reconstructions of them (what any generated image can reach at best: generation decodes the same codes)
    recons = [Image.open(rep / "tok_recon" / "recon" / f"{i:06d}.png").convert("RGB") for i in range(len(items))]
    on_renders = [_matches(classify_image(images[it["image"]]), it["shape"], it["color"]) for it in items]
    read = [classify_image(r) for r in recons]
    on_recons = [_matches(g, it["shape"], it["color"]) for g, it in zip(read, items)]
    checker_renders = 100.0 * sum(on_renders) / len(items)
    checker_recons = 100.0 * sum(on_recons) / len(items)
    _labelled_grid([([images[it["image"]], r], f"{it['color']} {it['shape']} on {it['background']}\n"
                     f"checker on the reconstruction: {g['color']} {g['shape']}", ok)
                    for it, r, g, ok in list(zip(items, recons, read, on_recons))[:12]],
                   rep / "reconstruction_grid.png")
    # MLLM: VQA on held-out questions, through the engine the chat and the evaluation use (greedy)
    model = AutoModelForCausalLM.from_pretrained(out / "stage2" / "export").eval()
    engine = MLLMEngine(model, AutoTokenizer.from_pretrained(out / "stage2" / "export"), load_tokenizer(tok_dir),
                        image_size=sizes.image_size)
    correct, rows = 0, []
    for s in range(0, len(items), 8):
        chunk = items[s:s + 8]
        codes = engine.encode_images([images[it["image"]] for it in chunk])  # 8 x (K, 2, 2)
        prompts = [engine.chat_sample([it["question"]], [c]) for it, c in zip(chunk, codes)]
        for it, pred in zip(chunk, engine.answer(prompts, max_new_tokens=12)):
            ok = it["answer"].lower().split()[-1] in pred.lower()
            correct += ok
            rows.append({"question": it["question"], "expected": it["answer"], "predicted": pred, "correct": ok})
    vqa = 100.0 * correct / len(items)
    (rep / "vqa.json").write_text(json.dumps(rows, indent=1))
    # generation: held-out prompts -> decode -> checker, as GENERATION draws them, and one sample per prompt at the
    # same settings beside it. Prompt seed 1000: the settings here and in DemoSizes were chosen on seeds 123, 456
    # and 789
    rng = random.Random(1000)
    combos = [random_scene(rng) for _ in range(sizes.num_generate)]
    texts = [f"a {c} {s} on a {b} background" for s, c, b in combos]
    pix = engine.generate(texts, ImageGenConfig(**GENERATION), torch.Generator().manual_seed(0))  # (N, S, S, 3) uint8
    single = engine.generate(texts, ImageGenConfig(**{**GENERATION, "candidates": 1}), torch.Generator().manual_seed(0))
    single_match = sum(_matches(classify_image(a), s, c) for (s, c, _), a in zip(combos, single))
    match, color_match, gen_rows = 0, 0, []
    for i, ((s, c, b), arr) in enumerate(zip(combos, pix)):
        Image.fromarray(arr).resize((128, 128), Image.NEAREST).save(rep / f"generated_{i:03d}_{c}_{s}.png")
        got = classify_image(arr)
        ok = _matches(got, s, c)
        match += ok
        color_match += got["color"] == c
        gen_rows.append({"prompt": f"a {c} {s} on a {b} background", "judged": got, "match": ok})
    (rep / "generation.json").write_text(json.dumps(gen_rows, indent=1))
    _labelled_grid([([arr], f"prompt: {r['prompt']}\nchecker: {r['judged']['color']} {r['judged']['shape']} on "
                            f"{r['judged']['background']} -> {'match' if r['match'] else 'no match'}", r["match"])
                    for arr, r in list(zip(pix, gen_rows))[:12]], rep / "generation_grid.png")
    report = {"recon_psnr": recon["psnr"], "recon_ssim": recon["ssim"], "codebook_usage_pct": recon["mean_usage_pct"],
              "zeroshot_shape_top1": zs_shape, "zeroshot_color_top1": zs_color, "vqa_accuracy": vqa,
              "generation_match": 100.0 * match / len(combos),
              "generation_match_one_sample": 100.0 * single_match / len(combos), "checker_on_renders": checker_renders,
              "checker_on_reconstructions": checker_recons,
              "generation_color_match": 100.0 * color_match / len(combos), "sizes": asdict(sizes),
              "generation": GENERATION}
    (rep / "report.json").write_text(json.dumps(report, indent=1))
    return report


def format_report(r: dict) -> str:
    chance = {"zeroshot_shape_top1": 33.3, "zeroshot_color_top1": 16.7, "generation_match": 5.6,
              "generation_match_one_sample": 5.6, "generation_color_match": 16.7}
    lines = ["| metric | value | chance |", "|---|---|---|"]
    for k in ("recon_psnr", "codebook_usage_pct", "zeroshot_shape_top1", "zeroshot_color_top1", "vqa_accuracy",
              "generation_match", "generation_match_one_sample", "generation_color_match", "checker_on_renders",
              "checker_on_reconstructions"):
        lines.append(f"| {k} | {r[k]:.2f} | {chance.get(k, '-')} |")
    return "\n".join(lines)


def format_timing(t: dict, names: list[str]) -> str:
    """timing.json as one line per step, and the whole pipeline's time (the steps' sum, resumed runs included);
    a step done by a run that kept no times is named."""
    lines = [f"{name}: {v['seconds']:.0f} s ({v['host']}" + (f"; {v['attempts']} attempts, an interrupted one "
             "included" if v.get("attempts", 1) > 1 else "") + ")" for name, v in t["steps"].items()]
    untimed = [n for n in names if n not in t["steps"]]
    total = f"pipeline: {t['total_seconds'] / 60:.1f} min"
    return "\n".join(["time per step (the run that did it):", *lines,
                      total + (f" without {', '.join(untimed)} (done before timing.json)" if untimed else "")])


def check_sizes(out: Path, sizes: DemoSizes) -> None:
    """Refuse to resume a folder trained with other sizes (a --quick run, or an older DemoSizes): its finished
    steps would be skipped and the report would mix them with the new ones. The sizes are read from
    `sizes.json`, or from the report of a run made before that file existed; this run's sizes are then written."""
    want = json.loads(json.dumps(asdict(sizes)))  # tuples as JSON lists, as read back
    recorded, report = out / "sizes.json", out / "report" / "report.json"
    source = recorded if recorded.is_file() else report if report.is_file() else None
    if source is not None:
        try:
            data = json.loads(source.read_text())
        except ValueError as e:
            raise RuntimeError(f"{source} is unreadable ({e}): rerun with --fresh to start over there") from None
        had = data if source == recorded else data.get("sizes")
        if had is not None and had != want:
            diff = ", ".join(f"{k}: {had.get(k)} -> {want.get(k)}" for k in dict.fromkeys([*want, *had])
                             if had.get(k) != want.get(k))
            raise RuntimeError(f"{out} was made with other demo sizes ({diff}; from {source}). Rerun with --fresh "
                               "to start over there, or pass another --out")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(recorded, want)


def check_seed(out: Path, seed: int) -> None:
    """Refuse --seed N on a folder whose training steps ran with another seed: their finished steps would be
    skipped, and the report would be the old seed's, silently."""
    for step in ("tokenizer", "stage1", "stage2"):
        try:
            had = json.loads((out / step / "config.json").read_text())["config"]["seed"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if had != seed:
            raise RuntimeError(f"{out / step} was trained with --seed {had}: for --seed {seed}, rerun with --fresh "
                               "or pass another --out")


HEARTBEAT_S = 5.0
"""How often a running step's partial entry in timing.json is refreshed."""


@contextlib.contextmanager
def _lock(out: Path):
    """An exclusive lock beside OUT (released with the process if it dies): a second demo on the same folder is
    refused, not run beside it."""
    import fcntl

    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another demo is running on {out}; wait for it, or pass another --out") from None
        yield


def run(out: Path, sizes: DemoSizes, ranks: int = 2, fresh: bool = False, chat: bool = True, seed: int = 0) -> dict:
    """Run every step (skipping finished ones) and return the report; `seed` seeds the three training steps."""
    with _lock(out):
        return _run(out, sizes, ranks, fresh, chat, seed)


def _run(out: Path, sizes: DemoSizes, ranks: int, fresh: bool, chat: bool, seed: int) -> dict:
    if fresh:
        shutil.rmtree(out, ignore_errors=True)
    check_sizes(out, sizes)
    check_seed(out, seed)
    t0 = time.time()
    timing = out / "timing.json"
    times = json.loads(timing.read_text())["steps"] if timing.is_file() else {}
    names: list[str] = []
    host = describe_host()  # every step of this invocation runs here
    writing = threading.Lock()

    def record(name: str, entry: dict | None) -> None:
        with writing:
            if entry is None:
                times.pop(name, None)
            else:
                times[name] = entry
            write_json_atomic(timing, {"steps": times, "total_seconds": round(sum(t["seconds"] for t in
                                                                                   times.values()), 1)})

    def timed(name: str, step, *args):
        """Run one step; one that did work (did not return False) records its seconds and host in timing.json, so
        a resumed run keeps the times of the steps an earlier run did. While it runs, its entry is refreshed every
        few seconds and marked partial: the time of an attempt that is killed is kept, and added to the next."""
        names.append(name)
        earlier = times.get(name, {})
        before, attempt = (earlier["seconds"], earlier.get("attempts", 1) + 1) if earlier.get("partial") else (0.0, 1)
        start = time.time()
        done = threading.Event()

        def beat():
            while not done.wait(HEARTBEAT_S):
                record(name, {"seconds": round(before + time.time() - start, 1), "host": host, "partial": True,
                              "attempts": attempt})

        heart = threading.Thread(target=beat, daemon=True)
        heart.start()
        try:
            result = step(*args)
        finally:
            done.set()
            heart.join()
        if result is not False:
            record(name, {"seconds": round(before + time.time() - start, 1), "host": host,
                          **({"attempts": attempt} if attempt > 1 else {})})
        elif times.get(name) != earlier:  # skipped: its entry as it was (a beat may have run; an output that an
            # attempt killed just after finishing it left is complete, so that attempt's time stands)
            record(name, {k: v for k, v in earlier.items() if k != "partial"} or None)
        return result

    timed("data", step_data, out, sizes)
    timed("text model", step_text_model, out, sizes)
    timed("tokenizer", step_tokenizer, out, sizes, seed)
    timed("codes", step_codes, out, sizes, ranks)
    timed("stage 1", step_stage1, out, sizes, ranks, seed)
    timed("stage 2", step_stage2, out, sizes, ranks, seed)
    if chat:
        timed("chat", step_chat, out, sizes)
    report = timed("report", step_report, out, sizes)
    _log(f"done in {time.time() - t0:.0f} s; PNGs and report.json under {out / 'report'}")
    print(format_report(report), flush=True)
    print(format_timing(json.loads(timing.read_text()), names), flush=True)
    return report


@dataclass
class DemoConfig:
    """The demo run."""

    out: str = "runs/demo"
    """Output folder; a second run resumes it."""
    quick: bool = False
    """The reduced sizes that the tests run (QUICK) instead of the full ones (DemoSizes)."""
    ranks: int = 2
    """Local ranks of code extraction and the MLLM stages (the tokenizer uses DemoSizes.tokenizer_ranks)."""
    fresh: bool = False
    """Delete OUT first instead of resuming."""
    chat: bool = True
    """Run the chat step (--no-chat skips it)."""
    seed: int = 0
    """Seed of the tokenizer and both MLLM stages (each rank adds its rank). The data and the held-out sets stay
    the same; a folder trained with another seed is refused (--fresh, or another --out)."""

    def __post_init__(self):
        if self.ranks <= 0:
            raise ValueError(f"--ranks must be positive, got {self.ranks}")


def main(argv: list[str] | None = None) -> None:
    """CLI entry point; a failed step ends with its log's last lines, not a traceback."""
    import tyro

    cfg = tyro.cli(DemoConfig, args=argv, description=__doc__)
    try:
        run(Path(cfg.out), QUICK if cfg.quick else DemoSizes(), cfg.ranks, cfg.fresh, cfg.chat, cfg.seed)
    except RuntimeError as e:
        raise SystemExit(f"experiments.demo: error: {e}") from None
    except KeyboardInterrupt:
        print("experiments.demo: interrupted; the same command resumes", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
