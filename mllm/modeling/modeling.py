"""`UniMLLMForCausalLM`: a transformers Llama that reads UniTok codes and writes them through a depth head.

Batch contract (built by `mllm.data.collate`), B rows, T positions, N images, K codebooks:
    input_ids     (B, T)  text ids; image positions hold any valid id (ignored)
    attention_mask(B, T)  1 = real token (padded batches), or None for packed rows
    position_ids  (B, T)  restart at 0 for each packed sample
    labels        (B, T)  text targets, -100 = not supervised (image positions always -100)
    image_codes   (N, K, Lmax) int64, row-major codes, zero-padded to the longest image
    image_lens    (N,)    positions per image (h * w)
    image_starts  (N, 2)  (row, first position) of each image in the batch
    image_gen     (N,)    bool: the image's codes are supervised by the depth head (text-to-image)
Loss (REFERENCE.md 6.4): token-count weighted text CE and image CE (each sub-code one token),
plus z-loss weight * mean(max image logit ^ 2). Every trainable module runs exactly once per forward
on every rank, with dummy inputs when a batch has no images, so ZeRO-3 never hangs: every rank runs
the same sequence of parameter gathers whatever its batch holds (see `build_inputs_embeds` and
`_losses`, and tests/test_zero3_mixed_batches.py).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from mllm.modeling.configuration import UniMLLMConfig
from mllm.modeling.depth_head import DepthHead
from mllm.modeling.embedder import VisualEmbedder


@dataclass
class UniMLLMOutput(CausalLMOutputWithPast):
    """Adds the split losses and token counts to the causal-LM output."""

    text_loss: torch.Tensor | None = None
    image_loss: torch.Tensor | None = None
    num_text_tokens: torch.Tensor | None = None
    num_image_tokens: torch.Tensor | None = None
    hidden_states_last: torch.Tensor | None = None


def default_attn_implementation(dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> str:
    """flash_attention_2 when the package and a GPU are present and the model runs in bf16/fp16 (`dtype`; None:
    it will be) on the GPU (`device`; None: it will be), else sdpa (one warning where flash-attn is missing).
    flash-attn has no fp32 and no CPU kernels: chat and evaluation at --dtype fp32, or with --device cpu, on a GPU
    machine failed at their first forward."""
    if dtype is not None and dtype not in (torch.bfloat16, torch.float16):
        return "sdpa"
    if device is not None and torch.device(device).type != "cuda":
        return "sdpa"
    try:
        import flash_attn  # noqa: F401

        if torch.cuda.is_available():
            return "flash_attention_2"
    except ImportError:
        pass
    if not getattr(default_attn_implementation, "_warned", False):
        warnings.warn("flash-attn is not available: using PyTorch SDPA attention", stacklevel=2)
        default_attn_implementation._warned = True
    return "sdpa"


ATTENTION = {"sdpa": "sdpa", "flex": "flex_attention", "flash": "flash_attention_2", "eager": "eager"}
"""mllm.train --attention -> transformers' attn_implementation."""


def attn_implementation(choice: str, dtype: torch.dtype) -> str:
    """mllm.train's --attention for a model trained in `dtype` -> transformers' attn_implementation ("auto":
    default_attn_implementation). "flash" where flash-attn cannot run is an error, not a fallback."""
    # DeepSpeed trains where its accelerator is: DS_ACCELERATOR=cpu runs on the CPU of a GPU machine too
    on_gpu = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") in ("", "cuda")
    if choice == "auto":
        return default_attn_implementation(dtype, None if on_gpu else "cpu")
    if choice not in ATTENTION:
        raise ValueError(f"--attention must be auto or one of {sorted(ATTENTION)}, got {choice!r}")
    if choice == "flash":
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            raise ValueError("--attention flash: flash-attn is not installed (pip install flash-attn); "
                             "--attention flex or sdpa need nothing more") from None
        if not on_gpu or dtype not in (torch.bfloat16, torch.float16):
            raise ValueError("--attention flash needs a GPU and bf16 (--precision bf16): flash-attn has no CPU and "
                             "no fp32 kernels")
    if choice == "flex" and not on_gpu:
        raise ValueError("--attention flex trains on a GPU only: PyTorch's flex_attention has no backward on CPU")
    return ATTENTION[choice]


def packed_flash_kwargs(attn_implementation: str | None, position_ids: torch.Tensor) -> dict:
    """Flash-attention's varlen arguments for packed rows (position ids restarting per sample): cu_seq_lens over
    all rows flattened, so no sample attends to another. transformers infers them from position ids only for a
    batch of ONE row; with --micro-batch > 1 it ran causal attention over each whole row, every sample reading
    the ones before it (SDPA builds its block-diagonal mask from position ids for any number of rows). {} for
    other attention implementations."""
    if not attn_implementation or "flash" not in attn_implementation:
        return {}
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(position_ids)  # flattens the rows
    return {"cu_seq_lens_q": cu_q, "cu_seq_lens_k": cu_k, "max_length_q": int(max_q), "max_length_k": int(max_k)}


class UniMLLMForCausalLM(LlamaForCausalLM):
    """Llama + `model.multi_embedder` (visual input) + `ar_head` (depth head for visual output)."""

    config_class = UniMLLMConfig
    _no_split_modules = ["LlamaDecoderLayer", "DepthLayer"]

    def __init__(self, config: UniMLLMConfig):
        super().__init__(config)
        self.model.multi_embedder = VisualEmbedder(config)
        self.ar_head = DepthHead(config)
        self.post_init()

    def _init_weights(self, module):
        """HF's generic init, plus the attention projection's q/v biases (zeros, as in UniTok)."""
        super()._init_weights(module)
        from unitok.models.projection import ProjectionAttention

        if isinstance(module, ProjectionAttention):
            for t in (module.q_bias, module.v_bias, module.zero_k_bias):
                t.data.zero_()

    # ---- input side -----------------------------------------------------------------------
    def build_inputs_embeds(self, input_ids, image_codes=None, image_lens=None, image_starts=None):
        """Text embeddings with each image's h*w positions replaced by visual embeddings.

        Collective invariance (ZeRO-3): `embed_tokens` and `multi_embedder` each run exactly once here,
        whatever the batch holds (text only, images, or both), because ZeRO-3 gathers a module's
        partitioned parameters in its forward hook: a rank that ran the embedder a different number of
        times than its peers would issue mismatched all-gathers and hang the job. A batch without
        images embeds one dummy position and adds it times zero, which also gives every embedder
        parameter a (zero) gradient, so the backward reduce-scatters match as well.
        """
        embeds = self.model.embed_tokens(input_ids.clamp_min(0))  # (B, T, H)
        present = has_images(image_codes)
        if not present:
            image_codes = torch.zeros(1, self.config.num_codebooks, 1, dtype=torch.long, device=embeds.device)
        img = self.model.multi_embedder(image_codes)  # (N, Lmax, H): the only embedder call
        if not present:
            return embeds + 0 * img.sum().to(embeds.dtype)
        rows, cols, src = image_positions(image_lens, image_starts)
        flat = img[src[0], src[1]].to(embeds.dtype)  # (sum L, H)
        return embeds.index_put((rows, cols), flat)

    # ---- forward ---------------------------------------------------------------------------
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, image_codes=None, image_lens=None, image_starts=None, image_gen=None,
                use_cache=None, past_key_values=None, logits_to_keep=0, **kwargs):
        """Without labels: a plain causal-LM forward (full logits). With labels: the training losses."""
        cache = cache if cache is not None else past_key_values
        if attention_mask is None and position_ids is not None and cache is None and not use_cache:
            # Packed rows: transformers builds the block-diagonal causal mask from restarting position
            # ids only when no cache is in play, so do not let it create one implicitly.
            use_cache = False
            kwargs = {**packed_flash_kwargs(self.config._attn_implementation, position_ids), **kwargs}
        if inputs_embeds is None and cache is not None and cache.get_seq_length() > 0 and not has_images(image_codes):
            # A cached decoding step of text: every rank decodes in lockstep (generate.py's `synced`), so
            # skipping the embedder's dummy call here keeps the collectives equal on all ranks, and
            # `embeds + 0 * dummy` is exactly `embeds`; it saves the visual embedder on every new token.
            inputs_embeds = self.model.embed_tokens(input_ids.clamp_min(0))
        if inputs_embeds is None:
            inputs_embeds = self.build_inputs_embeds(input_ids, image_codes, image_lens, image_starts)
        out = self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache, use_cache=use_cache, **kwargs)
        hidden = out.last_hidden_state  # (B, T, H)
        if labels is None:
            keep = slice(-logits_to_keep, None) if logits_to_keep else slice(None)
            return UniMLLMOutput(logits=self.lm_head(hidden[:, keep]), cache=out.cache,
                                 hidden_states_last=hidden)
        return self._losses(hidden, labels, image_codes, image_lens, image_starts, image_gen, out.cache)

    def _losses(self, hidden, labels, image_codes, image_lens, image_starts, image_gen, cache):
        # text: CE on supervised positions only (no full (B, T, V) fp32 logits)
        shift_labels = labels[:, 1:]
        sel = shift_labels != -100
        n_txt = sel.sum()
        h_txt = hidden[:, :-1][sel]  # (n_txt, H)
        if h_txt.shape[0] == 0:
            h_txt = hidden[:, :1].reshape(-1, hidden.shape[-1])[:1]  # dummy: lm_head must still run
        text_logits = self.lm_head(h_txt).float()
        text_loss = (F.cross_entropy(text_logits, shift_labels[sel], reduction="sum") / n_txt.clamp_min(1)
                     if n_txt > 0 else 0 * text_logits.sum())
        # image: depth head on the hidden state preceding each generated position
        h_img, targets = self._depth_inputs(hidden, image_codes, image_lens, image_starts, image_gen)
        n_img = targets.numel() if h_img is not None else 0
        if h_img is None:  # dummy pass keeps every depth-head parameter in the graph
            h_img = hidden[:1, 0]
            targets = torch.zeros(1, self.config.num_codebooks, dtype=torch.long, device=hidden.device)
        img_logits = self.ar_head(h_img, targets).float()  # (M, K, V)
        if n_img > 0:
            ce = F.cross_entropy(img_logits.reshape(-1, img_logits.shape[-1]), targets.reshape(-1))
            z = img_logits.max(dim=-1).values.pow(2).mean()
            image_loss = ce + self.config.z_loss_weight * z
        else:
            image_loss = 0 * img_logits.sum()
        total = n_img + n_txt
        w_img = n_img / total.clamp_min(1)
        loss = image_loss * w_img + text_loss * (n_txt / total.clamp_min(1))
        if total == 0:
            loss = image_loss + text_loss  # both are zero-valued graph-connected dummies
        return UniMLLMOutput(loss=loss, text_loss=text_loss.detach(), image_loss=image_loss.detach(),
                             num_text_tokens=n_txt.detach(), num_image_tokens=torch.as_tensor(n_img),
                             cache=cache)

    def _depth_inputs(self, hidden, image_codes, image_lens, image_starts, image_gen):
        """Gather (h(p-1), codes(p)) for every position of every generated image: (M, H), (M, K)."""
        if image_codes is None or image_gen is None or not bool(image_gen.any()):
            return None, torch.zeros(0, dtype=torch.long)
        idx = image_gen.nonzero().flatten()
        rows, cols, src = image_positions(image_lens[idx], image_starts[idx])
        if bool((cols == 0).any()):
            raise ValueError("a generated image starts at position 0: it needs a preceding token (boi)")
        h = hidden[rows, cols - 1]  # (M, H)
        targets = image_codes[idx][src[0], :, src[1]]  # (M, K)
        return h, targets

    # ---- weights ---------------------------------------------------------------------------
    @classmethod
    def from_llama(cls, llama_dir, tokenizer=None, text_tokenizer=None, torch_dtype=torch.float32,
                   attn_implementation=None, **mllm_fields) -> "UniMLLMForCausalLM":
        """Start stage 1: a local HF Llama-architecture folder (Llama-2/3, Mistral; any size) + optionally
        a UniTok for the embedder.

        The config comes from `mllm.modeling.base.config_from_base`: embedder shapes from the UniTok,
        the depth head in the base's head layout, image markers from `text_tokenizer` (default: the
        folder's); `mllm_fields` (for example depth_num_layers) override. The depth head and projector
        start random.
        """
        from transformers import AutoModelForCausalLM

        from mllm.modeling.base import config_from_base

        config = config_from_base(llama_dir, tokenizer, text_tokenizer, **mllm_fields)
        config._attn_implementation = attn_implementation or default_attn_implementation(torch_dtype)
        model = cls(config)
        llama, info = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32, output_loading_info=True)
        if info["missing_keys"]:  # transformers initialises them quietly (a folder without lm_head)
            raise ValueError(f"Llama checkpoint in {llama_dir} lacks {sorted(info['missing_keys'])[:8]}")
        result = model.load_state_dict(llama.state_dict(), strict=False)
        if result.unexpected_keys:
            raise ValueError(f"unexpected Llama keys: {result.unexpected_keys[:8]}")
        ours_only = [k for k in result.missing_keys if not k.startswith(("model.multi_embedder.", "ar_head."))]
        if ours_only:
            raise ValueError(f"Llama checkpoint in {llama_dir} lacks {ours_only[:8]}")
        if tokenizer is not None:
            model.load_tokenizer_weights(tokenizer)
        return model.to(torch_dtype)

    def load_tokenizer_weights(self, tokenizer) -> None:
        """Initialise the frozen codebooks and the causal projection from a UniTok."""
        self.model.multi_embedder.load_from_tokenizer(tokenizer)


def has_images(image_codes: torch.Tensor | None) -> bool:
    """Whether a batch's `image_codes` (N, K, Lmax) hold at least one image position."""
    return image_codes is not None and image_codes.shape[0] > 0 and image_codes.shape[-1] > 0


def image_positions(image_lens: torch.Tensor, image_starts: torch.Tensor):
    """Flat indices of every image position: batch rows, batch columns, and (image, offset) sources."""
    lens = image_lens.long()
    img_idx = torch.repeat_interleave(torch.arange(lens.numel(), device=lens.device), lens)
    first = torch.cumsum(lens, 0) - lens
    offset = torch.arange(int(lens.sum()), device=lens.device) - first[img_idx]
    rows = image_starts[img_idx, 0]
    cols = image_starts[img_idx, 1] + offset
    return rows, cols, (img_idx, offset)
