"""Generation with the unified MLLM: answers (images + text -> text) and text-to-image codes.

Both loops keep an LLM KV cache. Text-to-image also keeps
  - a depth-head KV cache over the K sub-code steps of each position, and
  - a KV cache in the embedder's causal attention projection, so the embedding of generated
    position t sees codes 0..t exactly as in training (the release embeds only the newest position).
Classifier-free guidance mixes conditional and null-prompt logits per sub-code:
    l = l_uncond + scale * (l_cond - l_uncond).
`reference_*` functions recompute everything from scratch at every step; they are the slow,
obviously-correct baselines that tests and benchmarks compare against.
Under ZeRO-3 pass `synced=True` to `answer` so finished ranks keep stepping until every rank is done.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from transformers import DynamicCache

from mllm.data.collate import Sample, collate
from unitok.models.projection import KVCache


@dataclass
class SamplingConfig:
    """How to pick a token from logits."""

    temperature: float = 1.0
    """0 means greedy (argmax)."""
    top_k: int = 0
    """Keep the k most likely tokens (0 = off)."""
    top_p: float = 1.0
    """Keep the smallest set with cumulative probability >= top_p (1 = off)."""

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError("temperature >= 0, top_k >= 0 and 0 < top_p <= 1 are required")


def sample_logits(logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None = None):
    """logits (B, V) -> token ids (B,)."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / max(sampling.temperature, 1e-5)
    if sampling.top_k > 0:
        kth = torch.topk(logits, min(sampling.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        remove = probs.cumsum(-1) - probs >= sampling.top_p  # the mass before a token already reaches top_p
        remove[..., 0] = False
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def cfg_mix(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance on logits."""
    return uncond + scale * (cond - uncond)


def _to_device(batch: dict, device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def default_stop_ids(model, stop_ids=None) -> set[int]:
    """`stop_ids`, or the config's eos id(s): Llama-3.1 configs list several."""
    if stop_ids is not None:
        return set(stop_ids)
    eos = model.config.eos_token_id
    return set(eos) if isinstance(eos, (list, tuple)) else {eos}


def _all_done(done: torch.Tensor, synced: bool) -> bool:
    flag = (~done).any().float().reshape(1)
    if synced and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag)
    return flag.item() == 0


@torch.no_grad()
def answer(model, prompts: list[Sample], max_new_tokens: int = 128, sampling: SamplingConfig | None = None,
           stop_ids: set[int] | None = None, pad_id: int = 0, generator: torch.Generator | None = None,
           synced: bool = False, on_token: Callable[[torch.Tensor], bool | None] | None = None,
           context_length: int | None = None) -> list[list[int]]:
    """Continue each prompt (batched, left-padded, KV cache). Returns the new token ids per prompt,
    without the stop token. `on_token(ids (B,))` is called per step; returning True stops early. With
    `context_length`, a row ends where prompt + answer fill it (ValueError for a prompt that fills it alone)."""
    sampling = sampling or SamplingConfig(temperature=0)
    stop_ids = default_stop_ids(model, stop_ids)
    batch = _to_device(collate(prompts, pad_id=pad_id, padding_side="left"), model.device)
    mask, pos = batch["attention_mask"], batch["position_ids"]
    room = None
    if context_length is not None:  # new tokens each row has room for
        room = context_length - (pos[:, -1] + 1)
        if (room <= 0).any():
            i = int((room <= 0).nonzero()[0])
            raise ValueError(f"prompt {i} has {int(pos[i, -1]) + 1} positions, which fill the model's context of "
                             f"{context_length}: no room for an answer")
    embeds = model.build_inputs_embeds(batch["input_ids"], batch["image_codes"], batch["image_lens"],
                                       batch["image_starts"])
    cache = DynamicCache(config=model.config)
    out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True,
                logits_to_keep=1)
    B = len(prompts)
    done = torch.zeros(B, dtype=torch.bool, device=model.device)
    result: list[list[int]] = [[] for _ in range(B)]
    stop = torch.tensor(sorted(stop_ids), device=model.device)
    for step in range(max_new_tokens):
        nxt = sample_logits(out.logits[:, -1], sampling, generator)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        hit = torch.isin(nxt, stop) & ~done
        for b in (~done & ~hit).nonzero().flatten().tolist():
            result[b].append(int(nxt[b]))
        done |= hit
        if room is not None:
            done |= room <= step + 1  # the context is full
        if on_token is not None and on_token(nxt):
            break
        if step == max_new_tokens - 1 or _all_done(done, synced):
            break  # (the last token needs no forward)
        mask = torch.cat([mask, (~done).long()[:, None]], 1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, cache=out.cache, use_cache=True)
    return result


def _t2i_prompts(prompt_ids: list[list[int]], null_ids: list[int] | None, use_cfg: bool) -> list[Sample]:
    rows = [list(p) for p in prompt_ids] + ([list(null_ids)] * len(prompt_ids) if use_cfg else [])
    return [Sample(r, [-100] * len(r)) for r in rows]


@torch.no_grad()
def generate_images(model, prompt_ids: list[list[int]], grid: tuple[int, int], null_ids: list[int] | None = None,
                    cfg_scale: float = 1.0, sampling: SamplingConfig | None = None,
                    generator: torch.Generator | None = None, pad_id: int = 0,
                    on_position: Callable[[int], None] | None = None) -> torch.Tensor:
    """Prompts (each ending with the image-start token) -> codes (B, K, h, w).

    With `cfg_scale != 1`, `null_ids` (the null prompt, e.g. "<unconditional>" + boi) runs beside each
    prompt and every sub-code's logits are mixed with `cfg_mix`; at scale 1 the null rows are skipped
    (the mix is then the conditional logits).
    """
    sampling = sampling or SamplingConfig()
    use_cfg = cfg_scale != 1.0
    if use_cfg and null_ids is None:
        raise ValueError("cfg_scale != 1 needs null_ids (the null prompt)")
    B, K, L = len(prompt_ids), model.config.num_codebooks, grid[0] * grid[1]
    batch = _to_device(collate(_t2i_prompts(prompt_ids, null_ids, use_cfg), pad_id=pad_id, padding_side="left"),
                       model.device)
    mask, pos = batch["attention_mask"], batch["position_ids"]
    cache = DynamicCache(config=model.config)
    out = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=pos, cache=cache, use_cache=True,
                logits_to_keep=1)
    hidden = out.hidden_states_last[:, -1]  # (R, H), R = B or 2B
    codes = torch.zeros(B, K, L, dtype=torch.long, device=model.device)
    emb_cache = KVCache()
    for t in range(L):
        codes[:, :, t] = _sample_position(model, hidden, use_cfg, cfg_scale, sampling, generator, B)
        if on_position is not None:
            on_position(t)
        if t == L - 1:
            break
        rows = codes[:, :, t:t + 1].repeat(2 if use_cfg else 1, 1, 1)  # (R, K, 1)
        emb = model.model.multi_embedder(rows, kv_cache=emb_cache)  # (R, 1, H): sees codes 0..t
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        pos = pos[:, -1:] + 1
        out = model(inputs_embeds=emb, attention_mask=mask, position_ids=pos, cache=out.cache, use_cache=True,
                    logits_to_keep=1)
        hidden = out.hidden_states_last[:, -1]
    return codes.view(B, K, *grid)


def _sample_position(model, hidden, use_cfg, cfg_scale, sampling, generator, B) -> torch.Tensor:
    """Depth loop with a KV cache: hidden (R, H) -> sub-codes (B, K)."""
    head, K = model.ar_head, model.config.num_codebooks
    cache = head.new_cache()
    x = head.start_input(hidden)
    out = []
    for i in range(K):
        logits = head.step(x, i, cache).float()  # (R, V)
        if use_cfg:
            logits = cfg_mix(logits[:B], logits[B:], cfg_scale)
        c = sample_logits(logits, sampling, generator)
        out.append(c)
        if i < K - 1:
            x = head.embed_code(i, c.repeat(2) if use_cfg else c)
    return torch.stack(out, 1)


# ---- slow references (tests and benchmarks) ----------------------------------------------------
@torch.no_grad()
def reference_generate_images(model, prompt_ids, grid, null_ids=None, cfg_scale=1.0, sampling=None,
                              generator=None, pad_id=0) -> torch.Tensor:
    """Naive loop: re-embed and re-run the whole prefix at every position; no depth-head cache."""
    sampling = sampling or SamplingConfig()
    use_cfg = cfg_scale != 1.0
    B, K, L = len(prompt_ids), model.config.num_codebooks, grid[0] * grid[1]
    prompts = _t2i_prompts(prompt_ids, null_ids, use_cfg)
    codes = torch.zeros(B, K, L, dtype=torch.long, device=model.device)
    head = model.ar_head
    for t in range(L):
        samples = []
        for r, p in enumerate(prompts):
            img = codes[r % B, :, :t].cpu()
            if t > 0:
                samples.append(Sample(p.input_ids + [-200], p.labels + [-100], [img.view(K, 1, t)]))
            else:
                samples.append(p)
        batch = _to_device(collate(samples, pad_id=pad_id, padding_side="left"), model.device)
        embeds = model.build_inputs_embeds(batch["input_ids"], batch["image_codes"], batch["image_lens"],
                                           batch["image_starts"])
        out = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                    position_ids=batch["position_ids"])
        hidden = out.hidden_states_last[:, -1]
        sub: list[torch.Tensor] = []
        for i in range(K):
            x = torch.cat([head.start_input(hidden)] + [
                head.embed_code(j, sub[j].repeat(2) if use_cfg else sub[j]) for j in range(i)], 1)
            logits = head._run(x, 0, None)[:, -1].float()
            if use_cfg:
                logits = cfg_mix(logits[:B], logits[B:], cfg_scale)
            sub.append(sample_logits(logits, sampling, generator))
        codes[:, :, t] = torch.stack(sub, 1)
    return codes.view(B, K, *grid)


@torch.no_grad()
def reference_answer(model, prompts: list[Sample], max_new_tokens: int = 16, stop_ids=None, pad_id=0):
    """Greedy answers by recomputing the full sequence at every step (one prompt at a time)."""
    stop_ids = default_stop_ids(model, stop_ids)
    results = []
    for p in prompts:
        ids, new = list(p.input_ids), []
        for _ in range(max_new_tokens):
            batch = _to_device(collate([Sample(ids, [-100] * len(ids), p.images)], pad_id=pad_id), model.device)
            embeds = model.build_inputs_embeds(batch["input_ids"], batch["image_codes"], batch["image_lens"],
                                               batch["image_starts"])
            logits = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                           position_ids=batch["position_ids"]).logits
            tok = int(logits[0, -1].argmax())
            if tok in stop_ids:
                break
            new.append(tok)
            ids.append(tok)
        results.append(new)
    return results
