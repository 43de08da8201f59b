"""`load_tokenizer`: one entry for both checkpoint kinds (our folder or the official .pth)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from unitok.models.unitok import CONFIG_NAME, WEIGHTS_NAME, UniTok


def load_tokenizer(path: str | os.PathLike, device: str | torch.device = "cpu",
                   attn_mode: str = "full") -> UniTok:
    """Load a tokenizer in eval mode.

    `path` is this project's checkpoint folder (config.json + model.safetensors) or an official
    `unitok_tokenizer.pth` (or a folder holding one .pth and no model.safetensors: the Hub repository's). `attn_mode` applies to official files only (their keys do not record
    it): "full" for the April 2025 release, "causal" for the February 2025 one.
    """
    path = Path(path)
    if path.is_dir() and not (path / WEIGHTS_NAME).is_file() and len(pths := sorted(path.glob("*.pth"))) == 1:
        path = pths[0]  # a snapshot of the Hub repo FoundationVision/unitok_tokenizer: its config.json and the .pth
    if path.is_dir():
        if not (path / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{path} is a folder without {CONFIG_NAME}; expected a UniTok checkpoint folder")
        return UniTok.from_pretrained(path, device)
    if path.is_file():
        from unitok.convert import load_official

        return load_official(path, device, attn_mode=attn_mode)
    from runtime.weights import fetch_hint

    raise FileNotFoundError(f"tokenizer checkpoint not found: {path}; for the released one, "
                            f"{fetch_hint('unitok-tokenizer')}")
