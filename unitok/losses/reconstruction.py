"""Pixel reconstruction loss: 0.2 * L1 + 1.0 * MSE (REFERENCE.md 4.2, `wei_l1`, `wei_l2`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def reconstruction_loss(rec: torch.Tensor, target: torch.Tensor, w_l1: float = 0.2,
                        w_l2: float = 1.0) -> dict[str, torch.Tensor]:
    """rec, target (B, 3, H, W) in [-1, 1] -> {"l1", "l2", "rec" = w_l1 * l1 + w_l2 * l2} (scalars).

    The unweighted terms are returned for logging; only "rec" goes into the generator loss.
    """
    if rec.shape != target.shape:
        raise ValueError(f"reconstruction and target shapes differ: {tuple(rec.shape)} vs {tuple(target.shape)}")
    # fp32: under bf16 autocast the decoder output may be bf16 and the mean of squares loses digits
    rec, target = rec.float(), target.float()
    l1 = F.l1_loss(rec, target)
    l2 = F.mse_loss(rec, target)
    return {"l1": l1, "l2": l2, "rec": w_l1 * l1 + w_l2 * l2}
