"""Quantizers: multi-codebook (MCQ, the paper's), residual (RQ) and single-codebook baselines.

Legend: B batch, L positions, C latent width, K codebooks, V entries per codebook, d = C/K.
MCQ (exact math of the release, REFERENCE.md 2.4), per chunk i of z (B, L, C):
    u = l2norm(z_i); E = l2norm(W_i); k = argmax(sg(u) E^T); q = E[k]
    loss_i = beta * mse(sg(q), u) + mse(q, sg(u));  out_i = u + sg(q - u)
    loss = mean_i loss_i;  out = cat_i out_i   (each chunk unit-norm)
The K codebooks are evaluated in one batched matmul instead of a Python loop; the result is the
same because every chunk has the same size. No EMA codebook update.
Usage: per-codebook percent of entries with frequency > 0.01 / V in the batch (all-reduced across
ranks in training), and an EMA `vocab_usage` buffer per codebook, as in the release.
Codes are (B, K, L) int64 in [0, V), no per-codebook offset.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from unitok.config import QuantizerConfig


@dataclass
class QuantizerOutput:
    """What a quantizer forward returns."""

    z_q: torch.Tensor  # (B, L, C) straight-through quantized latent
    codes: torch.Tensor  # (B, K, L) int64
    vq_loss: torch.Tensor  # scalar
    entropy_loss: torch.Tensor  # scalar (0 when off)
    usage: torch.Tensor  # (K,) percent of entries used in this batch


class Codebook(nn.Module):
    """One codebook: raw weight (V, d), l2-normalised at every use (MCQ), plus usage EMA."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.codebook = nn.Embedding(size, dim)
        self.register_buffer("vocab_usage", torch.zeros(size))
        bound = dim ** -0.5 / 36  # the release's init: uniform(+-(d^-0.5)/36)
        nn.init.uniform_(self.codebook.weight, -bound, bound)


def entropy_loss(u: torch.Tensor, E: torch.Tensor, temp: float) -> torch.Tensor:
    """Per-sample entropy minus codebook entropy of softmax(-||u - e||^2 / temp). u (N, d), E (V, d)."""
    dist2 = u.square().sum(1, keepdim=True) + E.square().sum(1) - 2 * u @ E.T  # (N, V)
    logits = -dist2.float() / temp
    prob, log_prob = logits.softmax(-1), logits.log_softmax(-1)
    per_sample = (-prob * log_prob).sum(-1).mean()
    avg = prob.mean(0)
    return per_sample - (-avg * torch.log(avg + 1e-7)).sum()


class _QuantizerBase(nn.Module):
    """Holds K codebooks and the usage bookkeeping shared by every quantizer kind."""

    def __init__(self, cfg: QuantizerConfig):
        super().__init__()
        self.cfg = cfg
        self.num_codebooks, self.codebook_size = cfg.num_codebooks, cfg.codebook_size
        self.codebooks = nn.ModuleList(Codebook(cfg.codebook_size, cfg.code_dim) for _ in range(cfg.num_codebooks))
        self.usage_steps = 0  # usage EMA updates so far: a host int (a device buffer cost a sync per forward)

    def usage_state(self) -> tuple[int, list[torch.Tensor]]:
        """The usage EMA (updates so far, each codebook's `vocab_usage`), for `load_usage_state`."""
        return self.usage_steps, [cb.vocab_usage.clone() for cb in self.codebooks]

    @torch.no_grad()
    def load_usage_state(self, state: tuple[int, list[torch.Tensor]]) -> None:
        """Put back a `usage_state()`: a micro batch the trainer dropped (non-finite loss) leaves no trace there."""
        self.usage_steps = state[0]
        for cb, usage in zip(self.codebooks, state[1]):
            cb.vocab_usage.copy_(usage)

    def raw_weights(self) -> torch.Tensor:
        """(K, V, d) raw codebook weights."""
        return torch.stack([cb.codebook.weight for cb in self.codebooks])

    @torch.no_grad()
    def _record_usage(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (K, N) -> per-codebook usage percent (K,); updates the EMA buffers in training."""
        K, V = self.num_codebooks, self.codebook_size
        offsets = torch.arange(K, device=codes.device).unsqueeze(1) * V
        counts = torch.bincount((codes + offsets).flatten(), minlength=K * V).float().view(K, V)
        if self.training and dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts)  # one collective for all K codebooks
        freq = counts / counts.sum(1, keepdim=True).clamp_min(1)
        usage = (freq > 0.01 / V).float().mean(1) * 100
        if self.training:
            step = self.usage_steps
            for k, cb in enumerate(self.codebooks):
                if step == 0:
                    cb.vocab_usage.copy_(freq[k])
                else:
                    decay = 0.9 if step < 100 else 0.99
                    cb.vocab_usage.mul_(decay).add_(freq[k], alpha=1 - decay)
            self.usage_steps += 1
        return usage


class MultiCodebookQuantizer(_QuantizerBase):
    """MCQ: K independent l2-normalised sub-codebooks on K chunks (also the 1-codebook baseline)."""

    def normalized_codebooks(self) -> torch.Tensor:
        """(K, V, d) unit-norm code vectors."""
        return F.normalize(self.raw_weights(), dim=-1)

    def _assign(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, L, C = z.shape
        K = self.num_codebooks
        u = F.normalize(z.reshape(B * L, K, C // K), dim=-1).float()  # (N, K, d)
        E = self.normalized_codebooks().float()  # (K, V, d)
        codes = torch.einsum("nkd,kvd->knv", u.detach(), E).argmax(-1)  # (K, N)
        return u, E, codes

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """z (B, L, C) -> straight-through quantized latent, codes, losses, usage."""
        B, L, C = z.shape
        u, E, codes = self._assign(z)
        q = torch.stack([E[k][codes[k]] for k in range(self.num_codebooks)], dim=1)  # (N, K, d)
        vq_loss = self.cfg.beta * F.mse_loss(q.detach(), u) + F.mse_loss(q, u.detach())
        ent = z.new_zeros((), dtype=torch.float32)
        if self.cfg.entropy_weight > 0:
            ent = torch.stack([entropy_loss(u[:, k], E[k], self.cfg.entropy_temp)
                               for k in range(self.num_codebooks)]).mean()
        z_q = (q.detach() - u.detach()) + u  # straight-through; grad flows to u via l2norm
        usage = self._record_usage(codes)
        return QuantizerOutput(z_q.reshape(B, L, C), codes.view(-1, B, L).transpose(0, 1), vq_loss, ent, usage)

    @torch.no_grad()
    def latent_to_codes(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, L, C) -> codes (B, K, L)."""
        B, L, _ = z.shape
        return self._assign(z)[2].view(-1, B, L).transpose(0, 1)

    def codes_to_latent(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, K, L) or (B, K, h, w) -> concatenated unit code vectors (B, L, C)."""
        codes = codes.flatten(2)
        E = self.normalized_codebooks()
        return torch.cat([E[k][codes[:, k]] for k in range(self.num_codebooks)], dim=-1)


class ResidualQuantizer(_QuantizerBase):
    """RQ baseline: K residual depths on the whole (l2-normalised) latent, Euclidean nearest code.

    Loss (RQ-VAE): beta * mse(sg(z_hat), z) + sum_k mse(q_k, sg(r_k)) / K. Codebooks are not
    normalised because residuals are not unit vectors.
    """

    def _assign(self, z: torch.Tensor):
        B, L, C = z.shape
        u = F.normalize(z.reshape(B * L, C), dim=-1).float()
        W = self.raw_weights().float()  # (K, V, C)
        r, qs, codes = u, [], []
        for k in range(self.num_codebooks):
            d2 = r.detach().square().sum(1, keepdim=True) + W[k].square().sum(1) - 2 * r.detach() @ W[k].T
            idx = d2.argmin(1)
            q = W[k][idx]
            qs.append((q, r))
            codes.append(idx)
            r = r - q.detach()
        return u, qs, torch.stack(codes)  # codes (K, N)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        B, L, C = z.shape
        u, qs, codes = self._assign(z)
        z_hat = torch.stack([q for q, _ in qs]).sum(0)
        codebook_loss = torch.stack([F.mse_loss(q, r.detach()) for q, r in qs]).mean()
        vq_loss = self.cfg.beta * F.mse_loss(z_hat.detach(), u) + codebook_loss
        z_q = (z_hat.detach() - u.detach()) + u
        usage = self._record_usage(codes)
        ent = z.new_zeros((), dtype=torch.float32)
        return QuantizerOutput(z_q.reshape(B, L, C), codes.view(-1, B, L).transpose(0, 1), vq_loss, ent, usage)

    @torch.no_grad()
    def latent_to_codes(self, z: torch.Tensor) -> torch.Tensor:
        B, L, _ = z.shape
        return self._assign(z)[2].view(-1, B, L).transpose(0, 1)

    def codes_to_latent(self, codes: torch.Tensor) -> torch.Tensor:
        codes = codes.flatten(2)
        W = self.raw_weights()
        return torch.stack([W[k][codes[:, k]] for k in range(self.num_codebooks)]).sum(0)


def build_quantizer(cfg: QuantizerConfig) -> _QuantizerBase:
    """mcq / single -> MultiCodebookQuantizer, rq -> ResidualQuantizer."""
    return ResidualQuantizer(cfg) if cfg.kind == "rq" else MultiCodebookQuantizer(cfg)
