"""Optimizer parameter groups and the warmup + cosine schedule shared by both trainers."""
from __future__ import annotations

import math
import re

import torch

# REFERENCE.md 4.7: no weight decay for 1-D tensors or names containing these pieces.
NO_DECAY = re.compile(r"norm_scale|bn|ln|bias|logit_scale")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into decayed and non-decayed groups (names kept for logging)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or NO_DECAY.search(name) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(step: int, total: int, warmup: int, end_ratio: float) -> float:
    """LR multiplier: linear 0 -> 1 over `warmup` steps, then cosine 1 -> end_ratio at `total`."""
    if step < warmup:
        return step / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return end_ratio + (1 - end_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def lambda_scheduler(optimizer: torch.optim.Optimizer, fn) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR (its state is saved by DeepSpeed with the engine)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
