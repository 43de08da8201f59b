"""Visual embedder: frozen UniTok codebook -> concat (64-d) -> causal attention projection -> MLP.

codes (N, K, L) -> per-book unit vectors (N, L, K*d) -> AttnProjection(64 -> 1024, causal)
-> mm_projector LN -> Linear -> GELU -> Linear -> (N, L, hidden).
One LLM position per image position. The projection is causal over the raster order, so the
embedding of position t depends on codes 0..t only; that makes incremental generation exact with a
KV cache (`kv_cache`, a KVCache), which the release's cached loop gets wrong.
Every parameter is used through its own module's forward so ZeRO-3 gathers it.
Names match the released checkpoint: quantizer.codebooks.{j}.codebook.weight, attn_projection.*,
mm_projector.{0,1,3}.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mllm.modeling.configuration import UniMLLMConfig
from unitok.models.projection import AttnProjection, KVCache


class NormalizedEmbedding(nn.Embedding):
    """Embedding whose rows are l2-normalised at every use (the tokenizer's code vectors)."""

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, F.normalize(self.weight, dim=1))


class FrozenCodebook(nn.Module):
    """One sub-codebook: `codebook.weight` (V, d) and the tokenizer's usage statistics buffer."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.codebook = NormalizedEmbedding(size, dim)
        self.register_buffer("vocab_usage", torch.zeros(size))


class CodebookSet(nn.Module):
    """K sub-codebooks; codes (N, K, L) -> concatenated unit vectors (N, L, K*d)."""

    def __init__(self, num_codebooks: int, size: int, dim: int):
        super().__init__()
        self.codebooks = nn.ModuleList(FrozenCodebook(size, dim) for _ in range(num_codebooks))

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return torch.cat([cb.codebook(codes[:, k]) for k, cb in enumerate(self.codebooks)], dim=-1)


class VisualEmbedder(nn.Module):
    """codes (N, K, L) -> LLM input embeddings (N, L, hidden_size)."""

    def __init__(self, config: UniMLLMConfig):
        super().__init__()
        self.quantizer = CodebookSet(config.num_codebooks, config.codebook_size, config.code_dim)
        self.quantizer.requires_grad_(False)  # frozen in every stage
        self.attn_projection = AttnProjection(config.latent_dim, config.embed_width, config.embed_num_heads,
                                              causal=True)
        self.mm_projector = nn.Sequential(
            nn.LayerNorm(config.embed_width, eps=1e-6),
            nn.Linear(config.embed_width, config.hidden_size),
            nn.GELU(),
            nn.Linear(config.hidden_size, config.hidden_size),
        )

    def forward(self, codes: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        """With `kv_cache`, `codes` holds only new positions (N, K, n) appended after the cached ones."""
        dtype = self.mm_projector[1].weight.dtype
        x = self.quantizer(codes).to(dtype)  # (N, L, 64)
        return self.mm_projector(self.attn_projection(x, kv_cache))

    @torch.no_grad()
    def load_from_tokenizer(self, tokenizer) -> None:
        """Copy the frozen codebooks and `post_quant_proj` of a UniTok into this embedder."""
        qcfg = tokenizer.cfg.quantizer
        if qcfg.kind not in ("mcq", "single") or tokenizer.cfg.projection.kind != "attention":
            raise ValueError("the MLLM embedder needs a tokenizer with an MCQ quantizer and an attention projection")
        mine = (len(self.quantizer.codebooks), self.quantizer.codebooks[0].codebook.weight.shape)
        theirs = (qcfg.num_codebooks, (qcfg.codebook_size, qcfg.code_dim))
        if mine[0] != theirs[0] or tuple(mine[1]) != theirs[1]:
            raise ValueError(f"tokenizer codebooks {theirs} do not match the MLLM config {mine}")
        if tokenizer.cfg.projection_heads != self.attn_projection.attn.num_heads:
            raise ValueError(f"tokenizer projection has {tokenizer.cfg.projection_heads} heads, the MLLM config "
                             f"{self.attn_projection.attn.num_heads}: set embed_num_heads to match")
        src = {f"quantizer.{k}": v for k, v in tokenizer.quantizer.state_dict().items()}
        src.update({f"attn_projection.{k}": v for k, v in tokenizer.post_quant_proj.state_dict().items()})
        own = self.state_dict()
        for k, v in src.items():
            if k not in own or own[k].shape != v.shape:
                raise ValueError(f"tokenizer tensor {k} {tuple(v.shape)} does not fit the embedder "
                                 f"({tuple(own[k].shape) if k in own else 'missing'})")
        self.load_state_dict(src, strict=False)
