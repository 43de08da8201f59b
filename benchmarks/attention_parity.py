"""Attention parity: the same UniMLLM's logits under two attention implementations.

On a GPU: flash-attn (`flash_attention_2`) against PyTorch SDPA in bf16; on CPU, where flash-attn cannot run,
SDPA against the eager implementation in fp32, so the same code path runs. Two inputs, the two ways the
trainer and the generator call the model:
  padded  a left-padded batch with an attention mask (generation)
  packed  two rows of two sequences each (cut at other places), position ids restarting at 0, no mask: packed
          training rows at --micro-batch 2 (transformers' flash path reads restarts in one row only; the
          model passes flash-attn the sequence bounds over all rows itself)
The figure is max |logits_a - logits_b| / max |logits_b| over the real positions; it passes at or below the
tolerance of the dtype (bf16: 2e-2, fp32: 1e-4). Requesting flash-attn where the package is not installed, or
does not import (a wheel built for another torch: the trainer then uses SDPA), prints a "flash-attn not installed"
or "not importable" row and exits 0.

    python benchmarks/attention_parity.py                                   # CPU: sdpa vs eager, fp32
    python benchmarks/attention_parity.py --device cuda --dtype bf16 --impls flash_attention_2 sdpa
"""
from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.generation import PRESETS as GEN_PRESETS  # noqa: E402
from benchmarks.gpu_check import flash_attn_version  # noqa: E402
from mllm import UniMLLMConfig, UniMLLMForCausalLM  # noqa: E402
from runtime.cli import parse  # noqa: E402

TOLERANCE = {"bf16": 2e-2, "fp32": 1e-4}
# generation.py's shapes (realistic head widths: flash-attn needs <= 256), with one depth layer: only the
# LLM's attention is compared
PRESETS = {name: {**shape, "depth_num_layers": 1} for name, shape in GEN_PRESETS.items()}


@dataclass
class Options:
    """What to compare."""

    preset: Literal["debug", "small"] = "small"
    """Model size (PRESETS)."""
    impls: list[str] = field(default_factory=lambda: ["sdpa", "eager"])
    """Two transformers attention implementations: the one under test, then the reference."""
    device: Literal["cpu", "cuda"] = "cpu"
    """Where the models run."""
    dtype: Literal["fp32", "bf16"] = "fp32"
    """Weights and activations."""
    seq: int = 128
    """Tokens per row."""
    json: str | None = None
    """Also write the rows to this JSON file."""

    def __post_init__(self):
        if len(self.impls) != 2:
            raise ValueError(f"--impls needs exactly two implementations, got {self.impls}")
        if self.seq < 8:
            raise ValueError("--seq must be at least 8")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no GPU is visible")


def build(preset: str, impl: str, device: str, dtype: torch.dtype, state: dict | None) -> UniMLLMForCausalLM:
    """The preset's UniMLLM with `impl` attention (weights from `state`, else seed 0)."""
    torch.manual_seed(0)
    cfg = UniMLLMConfig(**PRESETS[preset], max_position_embeddings=4096, pad_token_id=0, attn_implementation=impl)
    model = UniMLLMForCausalLM(cfg)
    if state is not None:
        model.load_state_dict(state)
    return model.to(device, dtype).eval()


def inputs(vocab: int, seq: int, device: str) -> dict[str, dict]:
    """The two cases' forward arguments and masks of the positions compared, each (B, T)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (2, seq), generator=g)
    pad = seq // 4
    ids[1, :pad] = 0
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    pos = torch.stack([torch.cat([torch.arange(cut), torch.arange(seq - cut)]) for cut in (seq // 3, seq // 2)])
    return {
        "padded": {"args": {"input_ids": ids.to(device), "attention_mask": mask.to(device)}, "real": mask.bool()},
        "packed": {"args": {"input_ids": torch.randint(3, vocab, (2, seq), generator=g).to(device),
                            "position_ids": pos.to(device), "use_cache": False},
                   "real": torch.ones(2, seq, dtype=torch.bool)},
    }


def main(argv: list[str] | None = None) -> list[dict]:
    """Compare, print the table, return the rows."""
    a = parse(Options, argv, prog="python benchmarks/attention_parity.py", description=__doc__)
    test, ref = a.impls
    label = f"{test} vs {ref}, {a.preset}, {a.dtype}, {a.device}"
    if "flash_attention_2" in a.impls and flash_attn_version() is None:
        why = "not installed" if importlib.util.find_spec("flash_attn") is None else "not importable"
        rows = [{"case": "all", "impls": label, "error": None, "tolerance": TOLERANCE[a.dtype],
                 "status": f"flash-attn {why}"}]
    else:
        dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
        ref_model = build(a.preset, ref, a.device, dtype, None)
        test_model = build(a.preset, test, a.device, dtype,
                           {k: v.float().cpu() for k, v in ref_model.state_dict().items()})
        rows = []
        with torch.no_grad():
            for case, c in inputs(ref_model.config.vocab_size, a.seq, a.device).items():
                lr = ref_model(**c["args"]).logits.float().cpu()[c["real"]]
                lt = test_model(**c["args"]).logits.float().cpu()[c["real"]]
                err = float((lt - lr).abs().max() / lr.abs().max())
                rows.append({"case": case, "impls": label, "error": err, "tolerance": TOLERANCE[a.dtype],
                             "status": "PASS" if err <= TOLERANCE[a.dtype] else "FAIL"})
    print(f"# attention parity: {label}; error = max |logits diff| / max |logits|, real positions only")
    print("| case | implementations | error | tolerance | status |")
    print("|---|---|---|---|---|")
    for r in rows:
        err = "-" if r["error"] is None else f"{r['error']:.2e}"
        print(f"| {r['case']} | {r['impls']} | {err} | {r['tolerance']:.0e} | {r['status']} |")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(rows, indent=1))
    if any(r["status"] == "FAIL" for r in rows):
        sys.exit(1)
    return rows


if __name__ == "__main__":
    main()
