"""MixtureLoader throughput and packing efficiency (prints markdown tables).

    python benchmarks/data_loader.py [--tables speed pad] [--batches 200] [--max-len 2048 1024] [--workers 0 2]
        [--pad-max-len 2048 4096] [--pad-micro-batch 1 4] [--pad-batches 200] [--lookahead 1 2 4 8 16]
        [--tokenizer DIR]

Speed table: synthetic data written to a temp folder in the real formats: short text documents (lognormal
length, median ~60 tokens), image-text pairs with 16 x 16 x 8 codes (half text-to-image, half caption;
256 image positions each) and vicuna_v1 instructions with one image. Weights 6 : 2 : 2, so most
samples are short text while most positions are image positions. `--tokenizer` takes a HF Llama
tokenizer folder; by default the tiny test tokenizer is trained (a real Llama-2 vocabulary gives
fewer tokens per text, hence a little more samples/s on text).
Reported per worker (a worker = one process running a mixture stream): samples/s, tokens/s (non-pad
positions after image expansion) and the non-pad fraction of the batch, packed vs padded.

Pad table: the pad fraction (pad positions / all positions of the first `--pad-batches` packed batches, the
loader's own `stats()["pad_ratio"]`) for each `pack_lookahead` in `--lookahead` (1 = the batch closes at the
first sample that fits none of its rows), on
  demo, demo_finetune: data_recipes/demo*.yaml on the demo's data (experiments.synthetic at the demo's sizes,
      64 px; the codes are random 4 x 4 x 4 arrays in place of unitok.extract's: only their shape matters
      here), also at the demo's own max_len 256;
  long mix: lengths in tokens of the tokenizer used: text documents of lognormal length (median 700, split
      into windows of max_len, so some samples are whole max_len chunks), image-caption pairs of 256 image
      positions + a 2-12 word caption (~260-300 with the template), vicuna_v1 instructions of 100-1500
      (log-uniform; one image in 80 % of those over 400). Sample weights 4 : 3 : 3.
"""
from __future__ import annotations

import io
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

WORDS = ("the a red blue green circle square triangle image shows on of and with is in to background small large "
         "bright dark light simple picture color shape").split()


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def _write_text(root: Path, per_file: int, doc: Callable[[], str]) -> None:
    """root/text/0000{0..3}.jsonl, `per_file` documents each, from `doc()`."""
    (root / "text").mkdir(parents=True)
    for f in range(4):
        with open(root / f"text/{f:05d}.jsonl", "w") as fh:
            for _ in range(per_file):
                fh.write(json.dumps({"text": doc()}) + "\n")


def write_data(root: Path, seed: int = 0) -> Path:
    """Write the synthetic mix under root; returns the recipe path."""
    import webdataset as wds

    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    # words; median ~37 words
    _write_text(root, 500, lambda: " ".join(rng.choice(WORDS)
                                            for _ in range(int(min(1500, max(5, rng.lognormvariate(3.6, 0.9)))))))
    (root / "codes").mkdir()
    rows = []
    for s in range(4):
        with wds.TarWriter(str(root / f"codes/{s:05d}.tar"), mtime=0) as w:
            for i in range(250):
                key = f"{s:02d}{i:04d}"
                cap = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40)))
                codes = _npy(nrng.integers(0, 4096, (8, 16, 16), dtype=np.uint16))
                w.write({"__key__": key, "codes.npy": codes, "txt": cap,
                         "json": json.dumps({"path": f"img/{key}.jpg"}).encode()})
                turns = []
                for t in range(rng.randint(1, 3)):
                    q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 15))) + "?"
                    a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 60))) + "."
                    turns += [{"from": "human", "value": ("<image>\n" if t == 0 else "") + q},
                              {"from": "gpt", "value": a}]
                rows.append({"id": key, "image": f"img/{key}.jpg", "conversations": turns})
    return _write_recipe(root, "bench", rows, (6, 2, 2))


def _write_recipe(root: Path, name: str, instructions: list[dict], weights: tuple[int, int, int]) -> Path:
    """root/inst.json and root/recipe.yaml over the text, code-shard and instruction files under root -> its path."""
    (root / "inst.json").write_text(json.dumps(instructions))
    recipe = {"name": name, "root": str(root), "sources": [
        {"name": "text", "kind": "text", "paths": "text/{00000..00003}.jsonl", "weight": weights[0]},
        {"name": "pairs", "kind": "pairs", "paths": "codes/{00000..00003}.tar", "weight": weights[1],
         "t2i_ratio": 0.5},
        {"name": "chat", "kind": "instructions", "paths": "inst.json", "image_paths": "codes/{00000..00003}.tar",
         "weight": weights[2]}]}
    path = root / "recipe.yaml"
    path.write_text(json.dumps(recipe))
    return path


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(max(1, n)))


def write_long_mix(root: Path, tok, seed: int = 0) -> Path:
    """Write the pad table's realistic length mix under root (see the module docstring); returns the recipe path."""
    import webdataset as wds

    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    per_word = len(tok(_words(random.Random(1), 2000), add_special_tokens=False).input_ids) / 2000  # tokens / word
    _write_text(root, 300, lambda: _words(rng, int(min(12000, max(20, rng.lognormvariate(np.log(700), 1.0)))  # tokens
                                                   / per_word)))
    (root / "codes").mkdir()
    rows = []
    for s in range(4):
        with wds.TarWriter(str(root / f"codes/{s:05d}.tar"), mtime=0) as w:
            for i in range(250):
                key = f"{s:02d}{i:04d}"
                w.write({"__key__": key, "codes.npy": _npy(nrng.integers(0, 4096, (8, 16, 16), dtype=np.uint16)),
                         "txt": _words(rng, rng.randint(2, 12)),
                         "json": json.dumps({"path": f"img/{key}.jpg"}).encode()})
                total = int(np.exp(rng.uniform(np.log(100), np.log(1500))))  # tokens
                image = total > 400 and rng.random() < 0.8
                words = int((total - (256 if image else 0) - 60) / per_word)  # ~60: system prompt and roles
                turns = []
                for t in range(k := rng.randint(1, 4)):
                    q = _words(rng, max(3, words // (5 * k))) + "?"
                    a = _words(rng, max(2, 4 * words // (5 * k))) + "."
                    turns += [{"from": "human", "value": ("<image>\n" if image and t == 0 else "") + q},
                              {"from": "gpt", "value": a}]
                rows.append({"id": key, **({"image": f"img/{key}.jpg"} if image else {}), "conversations": turns})
    return _write_recipe(root, "long_mix", rows, (4, 3, 3))


def write_demo(root: Path) -> list[Path]:
    """The demo's data at its sizes, with random codes of the demo tokenizer's shape in place of extracted ones;
    returns data_recipes/demo.yaml and demo_finetune.yaml re-rooted there."""
    import webdataset as wds
    import yaml

    from experiments.demo import DemoSizes
    from experiments.synthetic import DemoDataConfig, write_demo_data

    z = DemoSizes()
    write_demo_data(root, DemoDataConfig(num_images=z.num_images, images_per_shard=z.num_images // 6,
                                         num_eval_images=z.num_eval, image_size=z.image_size, num_tokenizer_images=0))
    nrng = np.random.default_rng(0)
    side = z.image_size // 16
    (root / "codes").mkdir()
    for shard in sorted((root / "images").glob("*.tar")):
        with wds.TarWriter(str(root / "codes" / shard.name), mtime=0) as w:
            for rec in wds.WebDataset(str(shard), shardshuffle=False):
                codes = _npy(nrng.integers(0, 4096, (4, side, side), dtype=np.uint16))
                w.write({"__key__": rec["__key__"], "codes.npy": codes, "txt": rec["txt"], "json": rec["json"]})
    out = []
    for name in ("demo", "demo_finetune"):
        recipe = yaml.safe_load((ROOT / f"data_recipes/{name}.yaml").read_text())
        recipe["root"] = str(root)
        (root / f"{name}.yaml").write_text(json.dumps(recipe))
        out.append(root / f"{name}.yaml")
    return out


def pad_fraction(recipe, tok, *, max_len, micro_batch_size, batches, **loader_kw) -> float:
    """Pad positions / all positions of the first `batches` packed batches."""
    from mllm.data.loader import MixtureLoader

    loader = MixtureLoader(recipe, tok, micro_batch_size=micro_batch_size, max_len=max_len, seed=0, **loader_kw)
    it = iter(loader)
    for _ in range(batches):
        next(it)
    return loader.stats()["pad_ratio"]


def measure(recipe, tok, *, max_len, pack, workers, batches, micro_batch_size=4):
    """-> (samples/s per worker, tokens/s per worker, non-pad fraction)."""
    from mllm.data.loader import MixtureLoader

    loader = MixtureLoader(recipe, tok, micro_batch_size=micro_batch_size, max_len=max_len, pack=pack,
                           num_workers=workers, seed=0)
    it = iter(loader)
    for _ in range(max(2, workers * 2)):  # warm up (worker start, code index, first shards)
        next(it)
    warm = loader.stats()
    n0 = sum(s["samples"] for s in warm["sources"].values())
    tok0 = 0
    t0 = time.perf_counter()
    for _ in range(batches):
        b = next(it)
        tok0 += int(b["input_ids"].numel() * (1 - float(b["pad_ratio"])))
    dt = time.perf_counter() - t0
    st = loader.stats()
    n = sum(s["samples"] for s in st["sources"].values()) - n0
    w = max(1, workers)
    return n / dt / w, tok0 / dt / w, 1 - st["pad_ratio"]


@dataclass
class Options:
    """What to measure."""

    tables: list[str] = field(default_factory=lambda: ["speed", "pad"])
    """Tables to print: speed (samples/s, tokens/s, packed vs padded), pad (pad fraction per look-ahead)."""
    batches: int = 200
    """Batches per speed measurement."""
    max_len: list[int] = field(default_factory=lambda: [2048, 1024])
    """Row lengths (positions) of the speed table."""
    workers: list[int] = field(default_factory=lambda: [0])
    """DataLoader worker counts of the speed table (0 = in-process)."""
    pad_max_len: list[int] = field(default_factory=lambda: [2048, 4096])
    """Row lengths of the pad table (the demo recipes also at the demo's 256)."""
    pad_micro_batch: list[int] = field(default_factory=lambda: [1, 4])
    """Micro batch sizes (rows per batch) of the pad table."""
    pad_batches: int = 200
    """Batches per pad measurement."""
    lookahead: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    """`MixtureLoader(pack_lookahead=...)` values compared in the pad table (1 = the first sample that fits no
    row closes the batch)."""
    tokenizer: str | None = None
    """HF Llama tokenizer folder; None = the tiny test tokenizer, trained here."""

    def __post_init__(self):
        if unknown := set(self.tables) - {"speed", "pad"}:
            raise ValueError(f"unknown tables {sorted(unknown)}; choose from speed, pad")


def speed_table(args: Options, tok, root: Path) -> None:
    """Samples/s, tokens/s and non-pad fraction, packed vs padded, on the short-text mix."""
    recipe = write_data(root / "data")
    print("| layout | max_len | workers | samples/s per worker | tokens/s per worker | non-pad fraction |")
    print("|---|---|---|---|---|---|")
    for max_len in args.max_len:
        for workers in args.workers:
            for pack in (True, False):
                sps, tps, eff = measure(recipe, tok, max_len=max_len, pack=pack, workers=workers,
                                        batches=args.batches)
                wname = "0 (in-process)" if workers == 0 else str(workers)
                print(f"| {'packed' if pack else 'padded'} | {max_len} | {wname} | {sps:,.0f} | {tps:,.0f} | "
                      f"{eff:.3f} |", flush=True)


def pad_table(args: Options, tok, root: Path) -> None:
    """Pad fraction per recipe, max_len, micro batch and look-ahead."""
    demo, demo_ft = write_demo(root / "demo")
    recipes = [("demo", demo, [256] + args.pad_max_len), ("demo_finetune", demo_ft, [256] + args.pad_max_len),
               ("long mix", write_long_mix(root / "long", tok), args.pad_max_len)]
    heads = [f"pad, lookahead {k}" for k in args.lookahead]
    print("| recipe | max_len | micro batch | " + " | ".join(heads) + " |")
    print("|---|---|---|" + "---|" * len(heads))
    for name, recipe, lens in recipes:
        for max_len in lens:
            for mbs in args.pad_micro_batch:
                pads = [pad_fraction(recipe, tok, max_len=max_len, micro_batch_size=mbs, batches=args.pad_batches,
                                     pack_lookahead=k) for k in args.lookahead]
                print(f"| {name} | {max_len} | {mbs} | " + " | ".join(f"{100 * p:.2f} %" for p in pads) + " |",
                      flush=True)


def main(argv: list[str] | None = None) -> None:
    from mllm.data.tiny_tokenizer import load_llama_tokenizer, make_llama_tokenizer
    from runtime.cli import parse

    args = parse(Options, argv, prog="python benchmarks/data_loader.py", description=__doc__.split("\n")[0])
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        tok = load_llama_tokenizer(args.tokenizer or make_llama_tokenizer(root / "tok"))
        if "speed" in args.tables:
            speed_table(args, tok, root)
        if "pad" in args.tables:
            pad_table(args, tok, root)


if __name__ == "__main__":
    main()
