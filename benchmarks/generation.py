"""Generation speed: cached text-to-image loop vs the naive loop, and answer tokens/s vs transformers.

The naive loop re-embeds and re-runs the whole prefix at every position and runs the depth head
without a cache (`mllm.generate.reference_generate_images`); the cached loop keeps LLM, depth-head
and embedder KV caches. Both use greedy decoding, and the table says whether their codes match.
Answering (`mllm.generate.answer`) runs beside transformers' own `LlamaForCausalLM.generate` on the
same Llama weights and prompts (greedy, KV cache, the same number of new tokens), each timed after a
warm-up call; the table says whether the tokens are the same.

    python benchmarks/generation.py [--grid 16] [--presets debug small] [--device cuda --dtype bf16]
"""
from __future__ import annotations

import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mllm import UniMLLMConfig, UniMLLMForCausalLM  # noqa: E402
from mllm.data.collate import Sample  # noqa: E402
from mllm.generate import SamplingConfig, answer, generate_images, reference_generate_images  # noqa: E402
from runtime.cli import parse  # noqa: E402

PRESETS = {
    "debug": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_codebooks=4, codebook_size=64, code_dim=4, embed_width=32, embed_num_heads=2,
                  depth_num_layers=2),
    # small keeps the depth head shallow relative to the LLM (16:3 layers; the release is 32:3)
    "small": dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=16,
                  num_attention_heads=8, num_codebooks=8, codebook_size=4096, code_dim=8, embed_width=256,
                  embed_num_heads=4, depth_num_layers=3),
}


def build(name: str) -> UniMLLMForCausalLM:
    torch.manual_seed(0)
    cfg = UniMLLMConfig(**PRESETS[name], max_position_embeddings=2048, pad_token_id=0, attn_implementation="sdpa")
    return UniMLLMForCausalLM(cfg).eval()


def llama_of(model: UniMLLMForCausalLM) -> LlamaForCausalLM:
    """transformers' own LlamaForCausalLM holding the same Llama weights (no embedder, no depth head)."""
    base = {k: v for k, v in model.config.to_dict().items() if k in LlamaConfig.__dataclass_fields__}
    hf = LlamaForCausalLM(LlamaConfig(**base, attn_implementation="sdpa")).eval()
    missing, _ = hf.load_state_dict(model.state_dict(), strict=False)
    assert not missing, missing
    return hf


def timeit(fn):
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t


@dataclass
class Options:
    """What to measure."""

    grid: int = 16
    """Image side in positions (16 -> 256 positions)."""
    presets: list[str] = field(default_factory=lambda: ["debug", "small"])
    """Model sizes to measure (PRESETS)."""
    batch: int = 2
    """Prompts per generate / answer call."""
    answer_tokens: int = 64
    """Answer tokens to generate."""
    device: Literal["cpu", "cuda"] = "cpu"
    """Where the models run."""
    dtype: Literal["fp32", "bf16"] = "fp32"
    """Weights and activations (bf16 may make the cached and naive loops' codes differ)."""

    def __post_init__(self):
        unknown = [n for n in self.presets if n not in PRESETS]
        if unknown:
            raise ValueError(f"unknown preset(s) {unknown}; choose from {sorted(PRESETS)}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no GPU is visible")


def main(argv: list[str] | None = None) -> None:
    a = parse(Options, argv, prog="python benchmarks/generation.py", description=__doc__)
    greedy = SamplingConfig(temperature=0)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    rows = []
    for name in a.presets:
        model = build(name).to(a.device, dtype)
        prompts = [[1] + list(range(10, 30 + i)) + [3] for i in range(a.batch)]
        null = [1, 40, 41, 3]
        grid = (a.grid, a.grid)
        L = a.grid * a.grid * a.batch
        cached = lambda: generate_images(model, prompts, grid, null_ids=null, cfg_scale=3.0,  # noqa: E731
                                         sampling=greedy)
        cached()  # warm-up, as for the answers below (on a GPU the first call pays kernel and allocator set-up)
        fast, t_fast = timeit(cached)
        slow, t_slow = timeit(lambda: reference_generate_images(model, prompts, grid, null_ids=null, cfg_scale=3.0,
                                                                sampling=greedy))
        qs = [Sample([1] + list(range(50, 80)), [-100] * 31) for _ in range(a.batch)]
        ours = lambda: answer(model, qs, max_new_tokens=a.answer_tokens, stop_ids=set())  # noqa: E731
        ours()
        toks, t_ans = timeit(ours)
        hf = llama_of(model).to(a.device, dtype)
        ids = torch.tensor([q.input_ids for q in qs], device=a.device)
        theirs = lambda: hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,  # noqa: E731
                                     max_new_tokens=a.answer_tokens, min_new_tokens=a.answer_tokens)
        theirs()
        ref, t_hf = timeit(theirs)
        n = sum(len(r) for r in toks)
        rows.append((name, L / t_fast, L / t_slow, t_slow / t_fast, torch.equal(fast, slow), n / t_ans,
                     ref[:, ids.shape[1]:].numel() / t_hf, ref[:, ids.shape[1]:].tolist() == toks))
    dev = torch.cuda.get_device_name() if a.device == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"# machine: {platform.machine()}, {dev}, torch {torch.__version__}, {a.dtype}; "
          f"batch {a.batch}, {a.grid}x{a.grid} positions, CFG 3.0 (2x rows), greedy")
    print("| preset | cached positions/s | naive positions/s | speed-up | identical codes | answer tokens/s | "
          "transformers generate tokens/s | same tokens |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.1f} | {r[2]:.1f} | {r[3]:.1f}x | {r[4]} | {r[5]:.1f} | {r[6]:.1f} | {r[7]} |")


if __name__ == "__main__":
    main()
