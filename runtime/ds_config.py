"""DeepSpeed configs: the JSON files hold ZeRO/offload/precision only; batch arithmetic is injected here."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from runtime.distributed import warn_once

DS_CONFIG_DIR = Path(__file__).resolve().parents[1] / "ds_configs"


def resolve_precision(precision: str) -> str:
    """The `--precision` flag (auto, bf16, fp32) -> what runs: auto is bf16 on a GPU and fp32 on CPU; an
    explicit bf16 runs bf16 on CPU too (one warning), so the bf16 paths are tested without a GPU."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be auto, bf16 or fp32, got {precision!r}")
    if precision == "bf16" and not torch.cuda.is_available():
        warn_once("--precision bf16 on CPU: running bf16 for testing (slow, not a training setup); "
                  "auto uses fp32 on CPU")
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() else "fp32"
    return precision


def read_ds_config(name_or_path: str) -> tuple[Path, dict[str, Any]]:
    """`ds_configs/<name>.json` (or a path) and its content, as written."""
    p = Path(name_or_path)
    if not p.suffix:
        p = DS_CONFIG_DIR / f"{name_or_path}.json"
    if not p.is_file():
        raise FileNotFoundError(f"DeepSpeed config not found: {p}")
    return p, json.loads(p.read_text())


def load_ds_config(name_or_path: str, *, micro_batch: int, grad_accum: int, world_size: int,
                   grad_clip: float | None, precision: str = "auto") -> dict[str, Any]:
    """Read `ds_configs/<name>.json` (or a path), inject global = micro x accum x world, and precision."""
    p, cfg = read_ds_config(name_or_path)
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if key in cfg:
            raise ValueError(f"{p} sets {key}: batch sizes are computed by the trainer, remove it")
    if micro_batch <= 0 or grad_accum <= 0 or world_size <= 0:
        raise ValueError("micro batch, gradient accumulation and world size must be positive")
    global_batch = micro_batch * grad_accum * world_size
    assert global_batch == micro_batch * grad_accum * world_size
    cfg["train_batch_size"] = global_batch
    cfg["train_micro_batch_size_per_gpu"] = micro_batch
    cfg["gradient_accumulation_steps"] = grad_accum
    if grad_clip is not None:
        cfg["gradient_clipping"] = grad_clip
    if precision != "autocast":
        precision = resolve_precision(precision)
    # bf16: DeepSpeed keeps bf16 weights + fp32 master copies (the MLLM). autocast: fp32 weights and a
    # bf16 autocast forward (the tokenizer, whose quantizer path must see fp32 weights).
    cfg["bf16"] = {"enabled": precision == "bf16"}
    if precision == "autocast":
        cfg["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    cfg.setdefault("steps_per_print", 10**9)  # our own log line replaces DeepSpeed's
    cfg.setdefault("wall_clock_breakdown", False)
    return cfg
