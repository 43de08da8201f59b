"""Attention projection between the token width and the quantizer latent.

Compression (quant_proj, D=1024 -> C=64) and expansion (post_quant_proj, 64 -> 1024):
    x = proj(norm3(x)) + attn(norm1(x))     # linear shortcut + attention branch
    x = x + mlp(norm2(x))                   # GeGLU(out, 2 * out)
attn: qkv from `in` to 3 * max(in, out) (q/v biases, fixed zero k bias), H heads of max(in,out)/H;
compression AVERAGES the heads, expansion CONCATENATES them; then Linear(out, out).
`causal=True` reproduces the February 2025 release and the MLLM embedder (raster-causal).
`kv_cache` support lets the MLLM embed generated codes one position at a time, exactly.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from unitok.models.layers import GeGluMlp, init_linear_trunc_normal


class KVCache:
    """Keys and values of the positions seen so far (B, H, N, head_dim), for incremental decoding.

    A plain object rather than a dict or list: DeepSpeed ZeRO-3's module hooks rebuild list, tuple
    and dict arguments, so an in-place update of such a container would be lost between calls.
    """

    def __init__(self):
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append new keys/values along the sequence; return all of them."""
        if self.k is not None:
            k, v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        self.k, self.v = k, v
        return k, v


class ProjectionAttention(nn.Module):
    """Multi-head attention that changes width: heads averaged (in > out) or concatenated."""

    def __init__(self, in_dim: int, out_dim: int, num_heads: int, causal: bool = False):
        super().__init__()
        dim = max(in_dim, out_dim)
        self.in_dim, self.out_dim, self.num_heads, self.causal = in_dim, out_dim, num_heads, causal
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(in_dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))
        self.proj = nn.Linear(out_dim, out_dim)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, N, in) -> q, k, v each (B, H, N, head_dim)."""
        B, N, _ = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias).view(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def merge_heads(self, a: torch.Tensor) -> torch.Tensor:
        """a (B, H, N, head_dim) -> (B, N, out)."""
        B, H, N, hd = a.shape
        if self.in_dim > self.out_dim:
            a = a.mean(dim=1)  # (B, N, head_dim): heads averaged
            if hd != self.out_dim:
                a = F.adaptive_avg_pool1d(a, self.out_dim)
        else:
            a = a.transpose(1, 2).reshape(B, N, H * hd)  # heads concatenated
        return self.proj(a)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        q, k, v = self.qkv_heads(x)
        if kv_cache is not None:  # incremental decoding: new queries attend to cached keys + themselves
            k, v = kv_cache.extend(k, v)
        n_new, n_all = q.shape[2], k.shape[2]
        if self.causal and n_new > 1:
            # Causal mask aligned to the end of the key sequence (queries are the last n_new).
            mask = torch.ones(n_new, n_all, dtype=torch.bool, device=x.device).tril(n_all - n_new)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            a = F.scaled_dot_product_attention(q, k, v)  # full, or one causal query over its past
        return self.merge_heads(a)


class AttnProjection(nn.Module):
    """The paper's attention projection block (`quant_proj` / `post_quant_proj`)."""

    def __init__(self, in_dim: int, out_dim: int, num_heads: int, causal: bool = False, mlp_ratio: float = 2.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(in_dim)
        self.attn = ProjectionAttention(in_dim, out_dim, num_heads, causal)
        self.proj = nn.Linear(in_dim, out_dim)
        self.norm3 = nn.LayerNorm(in_dim)
        self.norm2 = nn.LayerNorm(out_dim)
        self.mlp = GeGluMlp(out_dim, int(out_dim * mlp_ratio))
        init_linear_trunc_normal(self)

    @property
    def causal(self) -> bool:
        return self.attn.causal

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        """x (B, N, in) -> (B, N, out). With `kv_cache`, x holds only the new positions."""
        x = self.proj(self.norm3(x)) + self.attn(self.norm1(x), kv_cache)
        return x + self.mlp(self.norm2(x))


class LinearProjection(nn.Linear):
    """Ablation: one Linear in place of the attention projection."""

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        return super().forward(x)


def build_projection(kind: str, in_dim: int, out_dim: int, num_heads: int, causal: bool,
                     mlp_ratio: float = 2.0) -> nn.Module:
    """`attention` -> AttnProjection, `linear` -> LinearProjection."""
    if kind == "attention":
        return AttnProjection(in_dim, out_dim, num_heads, causal, mlp_ratio)
    if kind == "linear":
        layer = LinearProjection(in_dim, out_dim)
        init_linear_trunc_normal(layer)
        return layer
    raise ValueError(f"unknown projection kind {kind!r}")
