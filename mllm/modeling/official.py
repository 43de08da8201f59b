"""Import of the released `FoundationVision/unitok_mllm` folder (REFERENCE.md 7).

The release is a transformers folder with `model_type: "mini_gemini"` (loadable only through the
official package) and safetensors shards. Its parameter names equal ours (`model.multi_embedder.*`,
`ar_head.*`), so the map is the identity; this module rebuilds a `UniMLLMConfig` from the official
config.json (embedder and depth-head shapes are hard-coded in the release: the defaults here), checks
every key in both directions, and writes a normal `unitok_mllm` folder.

CLI: python -m mllm.modeling.official UNITOK_MLLM_DIR OUT_DIR
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import torch
from tyro.conf import Positional, arg

from mllm.modeling.configuration import UniMLLMConfig
from mllm.modeling.modeling import UniMLLMForCausalLM, default_attn_implementation
from runtime.weights import fetch_hint
from runtime.cli import parse

# Llama fields carried over from the official config.json; everything else there is Mini-Gemini residue.
_LLAMA_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling",
                 "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings", "attention_bias",
                 "pretraining_tp", "hidden_act")


def config_from_official(cfg: dict) -> UniMLLMConfig:
    """Official config.json dict -> UniMLLMConfig (release embedder/depth-head shapes)."""
    if cfg.get("mm_vision_tower") or cfg.get("mm_vision_tower_aux"):
        raise ValueError("this official config has a vision tower: it is a Mini-Gemini model, not the UniTok MLLM")
    kw = {k: cfg[k] for k in _LLAMA_FIELDS if k in cfg and cfg[k] is not None}
    theta = kw.pop("rope_theta", 10000.0)
    kw.pop("rope_scaling", None)
    kw["rope_parameters"] = {"rope_type": "default", "rope_theta": float(theta)}
    kw.setdefault("pad_token_id", 0)
    return UniMLLMConfig(**kw)


def expected_keys(model: torch.nn.Module) -> dict[str, tuple]:
    """Our persistent state-dict keys and shapes."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def read_official_state(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of the safetensors shards in `folder` (index file or single file)."""
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"no model.safetensors(.index.json) in {folder}; {fetch_hint('unitok-mllm')}")
    state = {}
    for f in files:
        if not (folder / f).is_file():
            raise FileNotFoundError(f"shard listed in the index is missing: {folder / f}")
        state.update(load_file(str(folder / f)))
    return state


def check_keys(ours: dict[str, tuple], theirs: dict[str, tuple]) -> None:
    """Raise ValueError naming unknown, missing and mis-shaped keys."""
    missing = sorted(set(ours) - set(theirs))
    unknown = sorted(set(theirs) - set(ours))
    bad = sorted(k for k in set(ours) & set(theirs) if ours[k] != theirs[k])
    if missing or unknown or bad:
        raise ValueError(f"official checkpoint does not map: missing {missing[:8]} ({len(missing)}), unknown "
                         f"{unknown[:8]} ({len(unknown)}), shape mismatch {bad[:8]} ({len(bad)})")


def load_official_mllm(folder: str | os.PathLike, dtype: torch.dtype = torch.float32,
                       device: torch.device | str | None = None) -> UniMLLMForCausalLM:
    """Build a UniMLLMForCausalLM from the released folder (on the CPU; `device`: where it will run, which
    picks the attention implementation); eval mode."""
    folder = Path(folder)
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"official MLLM config not found: {cfg_file}; {fetch_hint('unitok-mllm')}")
    config = config_from_official(json.loads(cfg_file.read_text()))
    config._attn_implementation = default_attn_implementation(dtype, device)
    state = read_official_state(folder)
    with torch.device("meta"):
        model = UniMLLMForCausalLM(config)
    check_keys(expected_keys(model), {k: tuple(v.shape) for k, v in state.items()})
    # popped one by one: each stored tensor goes as its converted copy comes (not both whole models at once)
    model.load_state_dict({k: state.pop(k).to(dtype) for k in list(state)}, strict=True, assign=True)
    model.model.rotary_emb.to_empty(device="cpu")  # non-persistent buffers: rebuild on CPU
    model.model.rotary_emb.__init__(config)
    return model.eval()


@dataclass
class ImportConfig:
    """The released unitok_mllm folder -> this project's `unitok_mllm` folder."""

    official_dir: Annotated[Positional[str], arg(metavar="UNITOK_MLLM_DIR")]
    """The released FoundationVision/unitok_mllm folder (config.json + safetensors shards)."""
    out_dir: Annotated[Positional[str], arg(metavar="OUT_DIR")]
    """Output folder (new, or an earlier import: replaced)."""
    dtype: Literal["bf16", "fp32"] = "bf16"
    """Stored weight dtype (the release stores bf16; fp32 doubles the folder)."""


def main(argv: list[str] | None = None) -> None:
    """Convert the released folder into a `unitok_mllm` folder that `from_pretrained` loads after `import mllm`."""
    from mllm.export import DTYPES, check_out_dir, replace_dir

    cfg = parse(ImportConfig, argv, prog="python -m mllm.modeling.official", description=__doc__)
    out = Path(cfg.out_dir)
    check_out_dir(out, [Path(cfg.official_dir)], "OUT_DIR")  # before minutes of reading a 7B model
    model = load_official_mllm(cfg.official_dir, DTYPES[cfg.dtype])
    model.config.dtype = DTYPES[cfg.dtype]
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    replace_dir(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
