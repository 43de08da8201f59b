"""CLIP contrastive loss with gather-with-grad across ranks (REFERENCE.md 4.6).

Legend: n local batch, N = n * world_size global batch, E embedding width, r this rank.
    I_all, T_all = all_gather_with_grad(img (n, E)), all_gather_with_grad(txt (n, E))  # (N, E)
    logits_i = s * img @ T_all^T (n, N);  logits_t = s * txt @ I_all^T (n, N)
    labels = arange(n) + n * r;  loss = (CE(logits_i, labels) + CE(logits_t, labels)) / 2
We reuse open_clip's `ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True)`
directly: it is the implementation the release calls, with exactly this math (it gathers with
`torch.distributed.nn.all_gather`), so parity holds by construction instead of by re-derivation.
Gradients: the gather's backward SUMS the gradients that every rank's local loss sends to this
rank's features, so a feature gradient here is world_size x the gradient of the mean loss; DDP's
gradient averaging divides that factor back out, giving the gradient of the global-batch loss.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn


class ContrastiveLoss(nn.Module):
    """Symmetric InfoNCE over the global batch, computed per rank on its local rows.

    `rank` / `world_size` default to torch.distributed's (1 process when it is not initialised),
    read at the first call so the loss can be built before `init_process_group`.
    """

    def __init__(self, rank: int | None = None, world_size: int | None = None):
        super().__init__()
        if (rank is None) != (world_size is None):
            raise ValueError("pass both rank and world_size, or neither")
        if world_size is not None and not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self._rank, self._world_size = rank, world_size
        self._loss = None  # open_clip ClipLoss, built at the first call

    def _clip_loss(self):
        if self._loss is None:
            from open_clip.loss import ClipLoss

            rank, world = self._rank, self._world_size
            if world is None:
                ddp = dist.is_available() and dist.is_initialized()
                rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
            self._loss = ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True,
                                  rank=rank, world_size=world)
        return self._loss

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor | float) -> torch.Tensor:
        """image_features, text_features (n, E), l2-normalised; logit_scale already exp'ed -> scalar loss."""
        if image_features.shape != text_features.shape or image_features.dim() != 2:
            raise ValueError(f"image and text features must both be (n, E), got {tuple(image_features.shape)} "
                             f"and {tuple(text_features.shape)}")
        return self._clip_loss()(image_features, text_features, logit_scale)
