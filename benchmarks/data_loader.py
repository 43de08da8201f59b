"""MixtureLoader throughput and packing efficiency on a realistic length mix (prints a markdown table).

    python benchmarks/data_loader.py [--batches 200] [--max-len 2048 1024] [--workers 0 2] [--tokenizer DIR]

Synthetic data written to a temp folder in the real formats: short text documents (lognormal
length, median ~60 tokens), image-text pairs with 16 x 16 x 8 codes (half text-to-image, half caption;
256 image positions each) and vicuna_v1 instructions with one image. Weights 6 : 2 : 2, so most
samples are short text while most positions are image positions. `--tokenizer` takes a HF Llama
tokenizer folder; by default the tiny test tokenizer is trained (a real Llama-2 vocabulary gives
fewer tokens per text, hence a little more samples/s on text).
Reported per worker (a worker = one process running a mixture stream): samples/s, tokens/s (non-pad
positions after image expansion) and the non-pad fraction of the batch, packed vs padded.
"""
from __future__ import annotations

import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

WORDS = ("the a red blue green circle square triangle image shows on of and with is in to background small large "
         "bright dark light simple picture color shape").split()


def write_data(root: Path, seed: int = 0) -> Path:
    """Write the synthetic mix under root; returns the recipe path."""
    import io

    import webdataset as wds

    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    (root / "text").mkdir(parents=True)
    for f in range(4):
        with open(root / f"text/{f:05d}.jsonl", "w") as fh:
            for _ in range(500):
                n = int(min(1500, max(5, rng.lognormvariate(3.6, 0.9))))  # words; median ~37 words
                fh.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(n))}) + "\n")
    (root / "codes").mkdir()
    rows = []
    for s in range(4):
        with wds.TarWriter(str(root / f"codes/{s:05d}.tar"), mtime=0) as w:
            for i in range(250):
                buf = io.BytesIO()
                np.save(buf, nrng.integers(0, 4096, (8, 16, 16), dtype=np.uint16))
                key = f"{s:02d}{i:04d}"
                cap = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40)))
                w.write({"__key__": key, "codes.npy": buf.getvalue(), "txt": cap,
                         "json": json.dumps({"path": f"img/{key}.jpg"}).encode()})
                turns = []
                for t in range(rng.randint(1, 3)):
                    q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 15))) + "?"
                    a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 60))) + "."
                    turns += [{"from": "human", "value": ("<image>\n" if t == 0 else "") + q},
                              {"from": "gpt", "value": a}]
                rows.append({"id": key, "image": f"img/{key}.jpg", "conversations": turns})
    (root / "inst.json").write_text(json.dumps(rows))
    recipe = {"name": "bench", "root": str(root), "sources": [
        {"name": "text", "kind": "text", "paths": "text/{00000..00003}.jsonl", "weight": 6},
        {"name": "pairs", "kind": "pairs", "paths": "codes/{00000..00003}.tar", "weight": 2, "t2i_ratio": 0.5},
        {"name": "chat", "kind": "instructions", "paths": "inst.json", "image_paths": "codes/{00000..00003}.tar",
         "weight": 2}]}
    path = root / "recipe.yaml"
    path.write_text(json.dumps(recipe))
    return path


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

    batches: int = 200
    """Batches per measurement."""
    max_len: list[int] = field(default_factory=lambda: [2048, 1024])
    """Row lengths (positions) to measure."""
    workers: list[int] = field(default_factory=lambda: [0])
    """DataLoader worker counts to measure (0 = in-process)."""
    tokenizer: str | None = None
    """HF Llama tokenizer folder; None = the tiny test tokenizer, trained here."""


def main(argv: list[str] | None = None) -> None:
    from mllm.data.tiny_tokenizer import load_llama_tokenizer, make_llama_tokenizer
    from runtime.cli import parse

    args = parse(Options, argv, prog="python benchmarks/data_loader.py", description=__doc__.split("\n")[0])
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        tok = load_llama_tokenizer(args.tokenizer or make_llama_tokenizer(root / "tok"))
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


if __name__ == "__main__":
    main()
