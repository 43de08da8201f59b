"""CLIP text tower: open_clip's own TextTransformer (GELU, causal mask, EOT pooling, projection)."""
from __future__ import annotations

import torch.nn as nn
from open_clip.model import CLIPTextCfg, _build_text_tower

from unitok.config import TextConfig


def build_text_tower(cfg: TextConfig, embed_dim: int) -> nn.Module:
    """tokens (B, context_length) int64 -> features (B, embed_dim), unnormalised."""
    text_cfg = CLIPTextCfg(context_length=cfg.context_length, vocab_size=cfg.vocab_size,
                           width=cfg.width, heads=cfg.num_heads, layers=cfg.num_layers)
    return _build_text_tower(embed_dim, text_cfg)
