"""Depth head: emits the K sub-codes of one image position, autoregressively over depth.

Input per position p: [h(p-1), E_0(c_0), ..., E_{K-2}(c_{K-2})]  (K steps, width Hd), where h(p-1) is
the LLM's final hidden state at the position before p. Output: logits (K, V); step i predicts c_i.
Llama-style layers (RMSNorm, RoPE over depth positions 0..K-1, SwiGLU), written here rather than
borrowed from transformers because HF's decoder-layer contract changes between releases
(REFERENCE.md 8.8); parameter names match LlamaDecoderLayer so released `ar_head.*` weights load.
Shapes: B rows (positions), S depth steps <= K, Hd width, V codebook_size, H / Hkv query / key-value heads.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mllm.modeling.configuration import UniMLLMConfig
from unitok.models.projection import KVCache


class DepthRMSNorm(nn.Module):
    """Llama RMSNorm (computed in fp32)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding (Llama rotate-half convention). x (B, H, S, D), positions (S,)."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    freqs = positions.float()[:, None] * inv_freq[None]  # (S, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class DepthAttention(nn.Module):
    """Causal self-attention over depth steps, grouped-query when num_kv_heads < num_heads (query head
    h reads kv head h // (num_heads / num_kv_heads), as in Llama), with an optional KV cache of the kv heads."""

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, theta: float):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.theta = num_heads, num_kv_heads, dim // num_heads, theta
        # a plain bool, fixed here: compiled with dynamic=True, torch 2.6/2.7 trace int attributes as symbols,
        # and sdpa's enable_gqa refuses the symbolic bool their comparison makes (a graph break per layer)
        self.gqa = num_kv_heads != num_heads  # False: exactly the plain multi-head call
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, start: int, cache: KVCache | None) -> torch.Tensor:
        B, S, D = x.shape
        pos = torch.arange(start, start + S, device=x.device)
        q = self.q_proj(x).view(B, S, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, S, hd)
        k, v = (p(x).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, S, hd)
                for p in (self.k_proj, self.v_proj))
        q, k = rope(q, pos, self.theta), rope(k, pos, self.theta)
        if cache is not None:
            k, v = cache.extend(k, v)
        if S == 1:
            a = F.scaled_dot_product_attention(q, k, v, enable_gqa=self.gqa)  # one new step attends to all cached steps
        elif k.shape[2] == S:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.gqa)
        else:
            mask = torch.ones(S, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - S)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.gqa)
        return self.o_proj(a.transpose(1, 2).reshape(B, S, D))


class DepthMLP(nn.Module):
    """SwiGLU MLP (Llama layout)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DepthLayer(nn.Module):
    """Pre-norm decoder layer with LlamaDecoderLayer parameter names."""

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, hidden: int, eps: float, theta: float):
        super().__init__()
        self.self_attn = DepthAttention(dim, num_heads, num_kv_heads, theta)
        self.mlp = DepthMLP(dim, hidden)
        self.input_layernorm = DepthRMSNorm(dim, eps)
        self.post_attention_layernorm = DepthRMSNorm(dim, eps)

    def forward(self, x: torch.Tensor, start: int, cache: KVCache | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), start, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class DepthHead(nn.Module):
    """h (B, hidden) + teacher sub-codes -> logits (B, K, V); or step-by-step with a cache."""

    def __init__(self, config: UniMLLMConfig):
        super().__init__()
        Hd = config.depth_hidden_size
        # Plain RoPE with the base's theta over depth positions 0..K-1 only: the head is trained from
        # scratch, so the base's long-context scaling (e.g. Llama-3's "llama3" rope type) does not apply.
        theta = float((config.rope_parameters or {}).get("rope_theta", 10000.0))
        self.num_codebooks = config.num_codebooks
        self.in_proj = nn.Linear(config.hidden_size, Hd) if Hd != config.hidden_size else None
        self.layers = nn.ModuleList(
            DepthLayer(Hd, config.depth_num_heads, config.depth_num_key_value_heads, config.depth_intermediate_size,
                       config.rms_norm_eps, theta)
            for _ in range(config.depth_num_layers))
        self.norm = DepthRMSNorm(Hd, config.rms_norm_eps)
        self.linear_head = nn.Linear(Hd, config.codebook_size)
        self.codebooks = nn.ModuleList(nn.Embedding(config.codebook_size, Hd)
                                       for _ in range(config.num_codebooks - 1))

    def _run(self, x: torch.Tensor, start: int, caches: list | None) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x, start, caches[i] if caches is not None else None)
        return self.linear_head(self.norm(x))

    def start_input(self, h: torch.Tensor) -> torch.Tensor:
        """LLM hidden (B, hidden) -> first depth input (B, 1, Hd)."""
        h = h.unsqueeze(1)
        return self.in_proj(h) if self.in_proj is not None else h

    def embed_code(self, step: int, codes: torch.Tensor) -> torch.Tensor:
        """Sub-code c_step (B,) -> next depth input (B, 1, Hd)."""
        return self.codebooks[step](codes).unsqueeze(1)

    def forward(self, h: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Teacher-forced: h (B, hidden), codes (B, K) ground truth -> logits (B, K, V)."""
        x = torch.cat([self.start_input(h)] + [self.embed_code(i, codes[:, i])
                                                for i in range(self.num_codebooks - 1)], dim=1)
        return self._run(x, 0, None)

    def new_cache(self) -> list[KVCache]:
        """Empty per-layer KV caches for step-by-step decoding."""
        return [KVCache() for _ in self.layers]

    def step(self, x: torch.Tensor, start: int, cache: list) -> torch.Tensor:
        """One depth step: x (B, 1, Hd) at depth position `start` -> logits (B, V)."""
        return self._run(x, start, cache)[:, -1]
