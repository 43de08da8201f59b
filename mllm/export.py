"""ZeRO checkpoint -> Hugging Face folder (safetensors weights, tokenizer files, generation config).

    python -m mllm.export --checkpoint runs/mllm/step-00001000 --out runs/mllm/export --tokenizer-dir Llama-2-7b-hf

Weights are consolidated with DeepSpeed's `zero_to_fp32` (any ZeRO stage, any number of ranks).
The folder loads with `AutoModelForCausalLM.from_pretrained(out)` after `import mllm`.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

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


def check_out_dir(out: Path, sources: list[Path]) -> None:
    """The export replaces `out`: refuse a folder that holds what it reads, or one that is not an export."""
    for src in sources:
        if src.resolve().is_relative_to(out.resolve()):
            raise ValueError(f"--out {out} holds the checkpoint {src}, which the export would delete with it; "
                             f"choose another folder, e.g. {src.parent / 'export'}")
    if out.exists() and not (out / "config.json").is_file():
        raise FileExistsError(f"--out {out} exists and is not an export (no config.json), so it is not replaced: "
                              "remove it or choose another folder")


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
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    model.model.rotary_emb.__init__(config)  # non-persistent buffers: rebuilt, not loaded
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    if tok is not None:
        tok.save_pretrained(tmp)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                     pad_token_id=config.pad_token_id, max_new_tokens=128, do_sample=False).save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    cfg = parse(ExportConfig, argv, prog="python -m mllm.export", description=__doc__)
    print(f"wrote {export_from_checkpoint(cfg.checkpoint, cfg.out, cfg.tokenizer_dir)}")


if __name__ == "__main__":
    main()
