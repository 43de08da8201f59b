"""Official `unitok_tokenizer.pth` <-> this project's checkpoint folder.

The official file is `{'args': OrderedDict, 'epoch', 'iter', 'trainer': {'unitok': state_dict, ...}}`
(REFERENCE.md 3.2). Our module names follow the official ones, so the key map is the identity; this
module rebuilds the config from `args`, checks that every key maps in both directions with the right
shape, and refuses anything it does not understand. The file is read with
`torch.load(weights_only=True)`: no arbitrary objects are unpickled.

The projection attention mode is not stored in the official file (both releases have identical
keys): pass `attn_mode="causal"` for the February 2025 checkpoint; the default is the April 2025
full-attention release.

CLI: python -m unitok.convert unitok_tokenizer.pth OUT_DIR [--attn-mode causal]
"""
from __future__ import annotations

import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from tyro.conf import Positional, arg

from runtime.cli import parse
from unitok.config import (DecoderConfig, EncoderConfig, ProjectionConfig, QuantizerConfig, TextConfig,
                           UniTokConfig, PRESETS)
from unitok.models.unitok import UniTok


@dataclass
class ConvertConfig:
    """Official unitok_tokenizer.pth -> a config.json + model.safetensors folder."""

    checkpoint: Annotated[Positional[str], arg(metavar="CHECKPOINT")]
    """The official unitok_tokenizer.pth."""
    out_dir: Annotated[Positional[str], arg(metavar="OUT_DIR")]
    """Output folder."""
    attn_mode: Literal["full", "causal"] = "full"
    """Projection attention of the release (not stored in the file): full (April 2025) or causal (February 2025)."""


# Official `args.model` -> trunk preset (the decoder mirrors the encoder's ViT in the release).
_TRUNKS = {"vitamin_large": "large", "vitamin_base": "base", "vitamin_small": "small"}


def config_from_official_args(args: dict[str, Any], attn_mode: str = "full") -> UniTokConfig:
    """Rebuild a UniTokConfig from the official checkpoint's `args` dict."""
    def need(key):
        if key not in args:
            raise ValueError(f"official checkpoint args lack {key!r}")
        return args[key]

    model = need("model")
    if model not in _TRUNKS:
        raise ValueError(f"unsupported official model {model!r}; known: {sorted(_TRUNKS)}")
    if int(args.get("num_query", 0)) != 0:
        raise ValueError("official checkpoints with num_query > 0 (register tokens) are not supported")
    trunk = PRESETS[_TRUNKS[model]]
    drop_path = float(args.get("drop_path", 0.1))
    num_codebooks = int(need("num_codebooks"))
    kind = {"attn": "attention", "linear": "linear"}.get(args.get("quant_proj", "attn"))
    if kind is None:
        raise ValueError(f"unsupported official quant_proj {args.get('quant_proj')!r}")
    return UniTokConfig(
        img_size=int(args.get("img_size", 256)),
        embed_dim=int(need("embed_dim")),
        encoder=EncoderConfig(**{**vars_of(trunk.encoder), "drop_path": drop_path}),
        projection=ProjectionConfig(kind=kind, attn_mode=attn_mode),
        quantizer=QuantizerConfig(
            kind="mcq", num_codebooks=num_codebooks,
            codebook_size=int(need("vocab_size")) // num_codebooks,
            latent_dim=int(need("vocab_width")), beta=float(args.get("vq_beta", 0.25)),
            entropy_weight=float(args.get("le", 0.0)), entropy_temp=float(args.get("e_temp", 0.01))),
        decoder=DecoderConfig(**{**vars_of(trunk.decoder), "drop_path": drop_path}),
        text=TextConfig(width=int(need("text_width")), num_heads=int(need("text_heads")),
                        num_layers=int(need("text_layers")), context_length=int(need("text_context_length")),
                        vocab_size=int(need("text_vocab_size"))),
    )


def vars_of(dc) -> dict:
    """Shallow field dict of a dataclass instance."""
    return {k: getattr(dc, k) for k in dc.__dataclass_fields__}


def read_official(path: str | os.PathLike) -> dict[str, Any]:
    """torch.load the official file safely; clear errors for missing, truncated or foreign files."""
    path = Path(path)
    if not path.is_file():
        from runtime.weights import fetch_hint

        raise FileNotFoundError(f"official tokenizer checkpoint not found: {path}; {fetch_hint('unitok-tokenizer')}")
    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as e:
        raise ValueError(f"cannot read {path} as an official UniTok checkpoint "
                         f"(truncated, corrupt, or holds non-tensor objects): {e}") from e
    if not isinstance(ckpt, dict) or "args" not in ckpt or "unitok" not in ckpt.get("trainer", {}):
        raise ValueError(f"{path} does not have the official layout {{'args', 'trainer': {{'unitok'}}}}")
    return ckpt


def load_official(path: str | os.PathLike, device: str | torch.device = "cpu",
                  attn_mode: str = "full") -> UniTok:
    """Build a UniTok from an official `unitok_tokenizer.pth`; eval mode."""
    ckpt = read_official(path)
    cfg = config_from_official_args(dict(ckpt["args"]), attn_mode=attn_mode)
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in ckpt["trainer"]["unitok"].items()}
    try:
        return UniTok.from_state_dict(cfg, state, device)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


RUNTIME_FIELDS = ("grad_checkpointing",)
"""Config fields that change how a model trains, not what it computes: the official args need not carry them."""


def official_args_from_config(cfg: UniTokConfig) -> dict[str, Any]:
    """The `args` entries an official-layout file needs to rebuild `cfg` (for export and tests).

    The official args carry a trunk name and a few sizes, not every field of our config: a config they cannot
    rebuild (another projection head count, decoder depth or widths, separate encoder/decoder drop paths, ...)
    is refused, naming the fields, rather than exported as args that build another model. The attention mode
    is the one field the file never carries (`config_from_official_args(args, attn_mode)`)."""
    trunk = {v: k for k, v in _TRUNKS.items()}
    name = next((trunk[n] for n in ("large", "base", "small")
                 if vars_of(PRESETS[n].encoder) | {"drop_path": 0} == vars_of(cfg.encoder) | {"drop_path": 0}), None)
    if name is None or cfg.quantizer.kind != "mcq":
        raise ValueError("only ViTamin small/base/large trunks with an MCQ quantizer have an official layout")
    q, t = cfg.quantizer, cfg.text
    args = {"model": name, "img_size": cfg.img_size, "num_query": 0, "drop_path": cfg.encoder.drop_path,
            "quant_proj": "attn" if cfg.projection.kind == "attention" else "linear",
            "vocab_size": q.codebook_size * q.num_codebooks, "vocab_width": q.latent_dim,
            "num_codebooks": q.num_codebooks, "vq_beta": q.beta, "le": q.entropy_weight, "e_temp": q.entropy_temp,
            "embed_dim": cfg.embed_dim, "text_width": t.width, "text_heads": t.num_heads,
            "text_layers": t.num_layers, "text_context_length": t.context_length, "text_vocab_size": t.vocab_size}
    lost = _config_diff(cfg.to_dict(), config_from_official_args(args, cfg.projection.attn_mode).to_dict())
    lost = [f"{k}={want!r} (the args rebuild {got!r})" for k, want, got in lost if k not in RUNTIME_FIELDS]
    if lost:
        raise ValueError("the official args cannot carry this config: " + ", ".join(lost))
    return args


def _config_diff(a: dict, b: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted field, a's value, b's value) of every leaf where two `UniTokConfig.to_dict()`s differ."""
    out = []
    for k in a:
        if isinstance(a[k], dict):
            out += _config_diff(a[k], b[k], f"{prefix}{k}.")
        elif a[k] != b[k]:
            out.append((prefix + k, a[k], b[k]))
    return out


def main(argv: list[str] | None = None) -> None:
    """Convert an official .pth into a config.json + model.safetensors folder."""
    cfg = parse(ConvertConfig, argv, prog="python -m unitok.convert", description=__doc__)
    src, dst = Path(cfg.checkpoint).resolve(), Path(cfg.out_dir).resolve()
    if src.is_relative_to(dst):  # writing the folder would replace (delete) the file being converted
        raise ValueError(f"OUT_DIR {cfg.out_dir} is or contains the checkpoint {cfg.checkpoint}; "
                         f"write the folder elsewhere (e.g. {src.with_suffix('')})")
    model = load_official(cfg.checkpoint, attn_mode=cfg.attn_mode)
    model.save_pretrained(cfg.out_dir)
    print(f"wrote {cfg.out_dir} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters)")


if __name__ == "__main__":
    main()
