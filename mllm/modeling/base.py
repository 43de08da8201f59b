"""Base checkpoints: a local transformers Llama-architecture folder -> the `UniMLLMConfig` of a new MLLM.

Accepted: `model_type` "llama" (Llama-2, Llama-3/3.1: grouped-query attention, rope_parameters with the
"llama3" rope type, 128k vocabularies) and "mistral" (the same decoder with an optional sliding window).
Only the architecture fields carry over (transformers 5 reads legacy rope_theta / rope_scaling into
`rope_parameters`); the visual embedder follows the UniTok, the depth head the base's head layout, and
the image marker ids the text tokenizer (`templates.image_marker_ids`).

Mistral's sliding window is dropped: the MLLM is a transformers Llama and attends over the whole
sequence, so it equals the base only on sequences of at most `sliding_window` tokens. Longer training
rows or a longer context are allowed (full attention is a superset, and training adapts to it) with
one warning naming both lengths.
"""
from __future__ import annotations

import warnings
from pathlib import Path

from transformers import AutoConfig, LlamaConfig, PreTrainedConfig

from mllm.data.templates import image_marker_ids
from mllm.modeling.configuration import UniMLLMConfig

BASE_MODEL_TYPES = ("llama", "mistral")
# Llama's own architecture fields (sizes, heads, rope, norms, special ids), not transformers' bookkeeping
# (model_type, architectures, dtype, ...).
LLAMA_FIELDS = sorted(set(LlamaConfig.__dataclass_fields__) - set(PreTrainedConfig.__dataclass_fields__))
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def load_text_tokenizer(folder: str | Path, flag: str):
    """The HF text tokenizer of a local folder. transformers reads a path that is not a folder as a Hub repo
    id (a run-time download, or a minute of retries offline), and a folder with only tokenizer_config.json
    as an empty vocabulary (every question encodes to nothing): both are named here, with `flag`."""
    from transformers import AutoTokenizer

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{flag} {folder}: no such folder (a local tokenizer folder is expected; nothing "
                                "is downloaded at run time)")
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        raise FileNotFoundError(f"{flag} {folder}: neither tokenizer.json nor tokenizer.model in it (an incomplete "
                                "copy of a Llama folder?)")
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def read_base_config(base_dir: str | Path, max_len: int | None = None) -> dict:
    """The Llama architecture fields of a base folder's config.json; `max_len` (training row length) is
    only checked against a Mistral sliding window. FileNotFoundError / ValueError name the folder."""
    base_dir = Path(base_dir)
    if not (base_dir / "config.json").is_file():
        from runtime.weights import fetch_hint

        raise FileNotFoundError(f"no Llama config.json in {base_dir} (expected a local HF Llama folder); for "
                                f"Llama-2-7B, {fetch_hint('llama-2-7b')}")
    config = AutoConfig.from_pretrained(base_dir)
    if config.model_type not in BASE_MODEL_TYPES:
        raise ValueError(f"{base_dir}: model_type {config.model_type!r} is not a supported Llama-architecture base "
                         f"(supported: {', '.join(BASE_MODEL_TYPES)})")
    window = getattr(config, "sliding_window", None)
    longest = max(max_len or 0, config.max_position_embeddings)
    if window is not None and longest > window:
        warnings.warn(f"{base_dir}: the base's sliding-window attention (window {window}) is not used; the MLLM "
                      f"attends over whole sequences and equals the base only up to {window} tokens (training rows: "
                      f"{max_len or 'not given'}, context: {config.max_position_embeddings})", stacklevel=2)
    out = config.to_dict()
    return {k: out[k] for k in LLAMA_FIELDS if k in out}


def config_from_base(base_dir: str | Path, image_tokenizer=None, text_tokenizer=None, max_len: int | None = None,
                     **mllm_fields) -> UniMLLMConfig:
    """The config of a new MLLM on the base in `base_dir`.

    image_tokenizer: a UniTok; the embedder shapes follow it. text_tokenizer: the HF tokenizer the MLLM
    will read (default: the one in `base_dir`); its image markers are recorded as boi/eoi, and a base
    folder without one keeps the release's 3/4 (one warning). The depth head follows the base's head
    layout (grouped-query kv heads) when its width and heads are the base's. `mllm_fields` override all.
    """
    base = read_base_config(base_dir, max_len)
    fields: dict = {}
    if image_tokenizer is not None:
        tc = image_tokenizer.cfg
        fields.update(num_codebooks=tc.quantizer.num_codebooks, codebook_size=tc.quantizer.codebook_size,
                      code_dim=tc.quantizer.code_dim, embed_width=tc.encoder.width, embed_num_heads=tc.projection_heads)
    if text_tokenizer is None and any((Path(base_dir) / f).is_file() for f in TOKENIZER_FILES):
        from transformers import AutoTokenizer

        text_tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if text_tokenizer is not None:
        fields["boi_token_id"], fields["eoi_token_id"] = image_marker_ids(text_tokenizer)
    else:
        warnings.warn(f"no text tokenizer in {base_dir}: the image markers keep the release's ids 3/4 (Llama-2 byte "
                      "pieces <0x00>/<0x01>)", stacklevel=2)
    fields.update(mllm_fields)
    same_width = fields.get("depth_hidden_size") in (None, base["hidden_size"])
    same_heads = fields.get("depth_num_heads") in (None, base["num_attention_heads"])
    if same_width and same_heads and base.get("num_key_value_heads") is not None:
        fields.setdefault("depth_num_key_value_heads", base["num_key_value_heads"])
    return UniMLLMConfig(**{**base, **fields})
