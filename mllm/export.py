"""ZeRO checkpoint -> Hugging Face folder (safetensors weights, tokenizer files, generation config).

    python -m mllm.export --checkpoint runs/mllm/step-00001000 --out runs/mllm/export --tokenizer-dir Llama-2-7b-hf

Weights are consolidated with DeepSpeed's `zero_to_fp32` (any ZeRO stage, any number of ranks).
The folder loads with `AutoModelForCausalLM.from_pretrained(out)` after `import mllm`.
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from runtime.cli import parse


@dataclass
class ExportConfig:
    """A training checkpoint -> a Hugging Face folder."""

    checkpoint: str
    """A step-XXXXXXXX folder, or a run folder (its `latest` step)."""
    out: str
    """Output HF folder (an earlier export there is replaced; any other existing folder is refused)."""
    tokenizer_dir: str | None = None
    """Folder with the text tokenizer files to copy (Llama or an export); None = no tokenizer files."""
    dtype: Literal["fp32", "bf16"] = "fp32"
    """Stored weight dtype (bf16 halves the folder: about 15 GB instead of 30 for a 7B model)."""


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# What an export folder holds (save_pretrained's weights and configs, a text tokenizer's files): a folder with
# anything else is not replaced, since replacing it deletes that too
EXPORT_FILES = re.compile(r"(config|generation_config)\.json|model(-\d+-of-\d+)?\.safetensors|"
                          r"model\.safetensors\.index\.json|tokenizer(_config)?\.json|tokenizer\.model|"
                          r"special_tokens_map\.json|added_tokens\.json|chat_template\.(jinja|json)")


def check_out_dir(out: Path, sources: list[Path], flag: str = "--out") -> None:
    """The export replaces `out`: refuse a folder that holds what it reads, and an existing folder that is not
    an earlier export (a `unitok_mllm` config.json and export files only). Any Hugging Face model folder has a
    config.json: the Llama base or the released folder given as `out` was deleted."""
    for src in sources:
        if src.resolve().is_relative_to(out.resolve()):
            raise ValueError(f"{flag} {out} holds {src}, which the export would delete with it; choose another "
                             f"folder, e.g. {src.parent / 'export'}")
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"{flag} {out} is a file")
    names = sorted(p.name for p in out.iterdir())
    try:
        ours = json.loads((out / "config.json").read_text()).get("model_type") == "unitok_mllm"
    except (OSError, ValueError, AttributeError):
        ours = False
    foreign = [n for n in names if not EXPORT_FILES.fullmatch(n)]
    if names and (not ours or foreign):
        what = f"it also holds {foreign[:5]}" if ours else "it is not an earlier export (no unitok_mllm config.json)"
        raise FileExistsError(f"{flag} {out} exists and {what}, which replacing it would delete: remove it or "
                              "choose another folder")


def replace_dir(tmp: Path, out: Path) -> None:
    """Put the finished folder `tmp` at `out`; an earlier `out` is moved aside first and deleted last, so a kill
    leaves either folder whole."""
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def export_from_checkpoint(checkpoint: str | Path, out_dir: str | Path, tokenizer_dir: str | Path | None = None,
                           dtype: torch.dtype = torch.float32) -> Path:
    """Consolidate `checkpoint` (a step folder, or a run folder: its latest step) into `out_dir`."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import GenerationConfig

    import mllm  # noqa: F401
    from mllm import UniMLLMConfig, UniMLLMForCausalLM
    from mllm.modeling.base import load_text_tokenizer

    ckpt = Path(checkpoint)
    if (ckpt / "latest").is_file() and not (ckpt / "mllm").is_dir():
        ckpt = ckpt / (ckpt / "latest").read_text().strip()
    if not (ckpt / "mllm_config.json").is_file():
        raise FileNotFoundError(f"{ckpt} is not an MLLM training checkpoint (no mllm_config.json)")
    out = Path(out_dir)
    check_out_dir(out, [Path(checkpoint), ckpt])
    tok = load_text_tokenizer(tokenizer_dir, "--tokenizer-dir") if tokenizer_dir is not None else None  # before
    # the consolidation, which takes minutes for 7B
    config = UniMLLMConfig.from_json_file(str(ckpt / "mllm_config.json"))
    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="mllm")
    with torch.device("meta"):
        model = UniMLLMForCausalLM(config)
    expected = set(model.state_dict())
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the config: missing {missing[:8]}, unexpected {unexpected[:8]}")
    # popped one by one: the fp32 copy of each tensor goes as its converted one comes
    model.load_state_dict({k: state.pop(k).to(dtype) for k in list(state)}, strict=True, assign=True)
    model.model.rotary_emb.__init__(config)  # non-persistent buffers: rebuilt, not loaded
    model.config.dtype = dtype
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    if tok is not None:
        tok.save_pretrained(tmp)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                     pad_token_id=config.pad_token_id, max_new_tokens=128, do_sample=False).save_pretrained(tmp)
    replace_dir(tmp, out)
    return out


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    cfg = parse(ExportConfig, argv, prog="python -m mllm.export", description=__doc__)
    print(f"wrote {export_from_checkpoint(cfg.checkpoint, cfg.out, cfg.tokenizer_dir, DTYPES[cfg.dtype])}")


if __name__ == "__main__":
    main()
