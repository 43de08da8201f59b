"""The optimizer flags, parameter groups and the warmup + cosine schedule shared by both trainers."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

# REFERENCE.md 4.7: no weight decay for 1-D tensors or names containing these pieces.
NO_DECAY = re.compile(r"norm_scale|bn|ln|bias|logit_scale")


@dataclass
class OptimConfig:
    """AdamW and its schedule (`--optim.*` in both trainers; each trainer sets its own defaults)."""

    lr: float | None = None
    """Peak learning rate (> 0). The MLLM trainer leaves it unset to take its stage's rate."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_frac: float = 0.0
    """Linear warmup, as a fraction of total steps; then cosine to end_ratio x lr."""
    end_ratio: float = 0.0
    """Final learning rate as a fraction of the peak."""
    grad_clip: float = 1.0
    """Max gradient norm."""
    fused: bool = False
    """torch's fused AdamW kernel (CPU and CUDA): one pass over each tensor instead of about ten elementwise
    ops. Each step differs from the default kernel by float rounding (about 1 ulp), so a fused run is not
    bitwise the release's; it pays where the optimizer is a large share of the step, as in the `debug`
    tokenizer, whose 49408 x 32 text embedding is 93 % of its parameters (benchmarks/README.md)."""

    def __post_init__(self):
        self.betas = tuple(self.betas)
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"--optim.lr must be positive, got {self.lr}")
        if not 0 <= self.warmup_frac <= 1 or not 0 <= self.end_ratio <= 1:
            raise ValueError("--optim.warmup-frac and --optim.end-ratio must lie in [0, 1]")

    def adamw(self, params, **override) -> torch.optim.AdamW:
        """torch AdamW with these flags; `override` replaces lr, betas or weight_decay (the discriminator's)."""
        kw = {"lr": self.lr, "betas": self.betas, "eps": self.eps, "weight_decay": self.weight_decay, **override}
        return torch.optim.AdamW(params, **kw, **({"fused": True} if self.fused else {}))

    def summary(self) -> str:
        """What the trainers log: the optimizer, its kernel and peak rate."""
        return f"AdamW ({'fused' if self.fused else 'default'} kernel), peak lr {self.lr:g}"

    def schedule(self, optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
        """Warmup + cosine over `total_steps` (warmup = warmup_frac x total_steps)."""
        warm = int(self.warmup_frac * total_steps)
        return lambda_scheduler(optimizer, lambda s: warmup_cosine(s, total_steps, warm, self.end_ratio))


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
