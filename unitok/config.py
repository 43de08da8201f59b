"""Typed configs for the UniTok tokenizer, its presets, and command-line overrides.

One dataclass per component; `UniTokConfig` nests them. Presets:
  debug  tiny, for CPU tests (seconds)
  small  ViTamin-S trunk, 8 x 4096 x 8 codes
  base   ViTamin-B trunk, 8 x 4096 x 8 codes
  large  the released UniTok (ViTamin-L, 31 blocks, width 1024, ~820M parameters)
Overrides use tyro: `--encoder.width=64 --quantizer.kind=rq`.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

DOWNSAMPLE = 16  # stem (x2) + two MBConv stages (x2 each) + strided conv (x2)


@dataclass
class EncoderConfig:
    """ViTamin hybrid encoder: conv stem, two MBConv stages, strided conv, ViT blocks."""

    stem_width: int = 160
    """Channels of the conv stem."""
    stage_widths: tuple[int, int] = (160, 320)
    """Output channels of the two MBConv stages."""
    stage_depths: tuple[int, int] = (2, 4)
    """Number of MBConv blocks in each stage."""
    width: int = 1024
    """Token width of the ViT blocks."""
    num_layers: int = 31
    """Number of ViT blocks."""
    num_heads: int = 16
    """Attention heads per ViT block."""
    mlp_ratio: float = 2.0
    """GeGLU hidden width as a multiple of `width`."""
    drop_path: float = 0.1
    """Stochastic depth rate of the last block (linear from 0)."""

    def __post_init__(self):
        self.stage_widths = tuple(self.stage_widths)
        self.stage_depths = tuple(self.stage_depths)
        _positive(self, "stem_width", "width", "num_layers", "num_heads")
        if len(self.stage_widths) != 2 or len(self.stage_depths) != 2:
            raise ValueError("encoder.stage_widths and encoder.stage_depths need exactly 2 entries")
        if min(self.stage_widths) <= 0 or min(self.stage_depths) <= 0:
            raise ValueError("encoder stage widths and depths must be positive")
        if self.width % self.num_heads:
            raise ValueError(f"encoder.width={self.width} is not divisible by num_heads={self.num_heads}")
        if not 0.0 <= self.drop_path < 1.0:
            raise ValueError("encoder.drop_path must be in [0, 1)")


@dataclass
class DecoderConfig:
    """ViT blocks then the inverse-MBConv upsampler; its widths mirror the encoder's unless set."""

    num_layers: int = 31
    """Number of ViT blocks."""
    num_heads: int = 16
    """Attention heads per ViT block."""
    up_depths: tuple[int, int] = (4, 2)
    """Inverse-MBConv blocks in the two upsampling stages."""
    stage_widths: tuple[int, int] | None = None
    """Channel widths of the two upsampling stages (fine, coarse), as `encoder.stage_widths`; None mirrors the
    encoder, as the release does."""
    drop_path: float = 0.1
    """Stochastic depth rate of the last block."""

    def __post_init__(self):
        self.up_depths = tuple(self.up_depths)
        _positive(self, "num_layers", "num_heads")
        if self.stage_widths is not None:
            self.stage_widths = tuple(self.stage_widths)
            if len(self.stage_widths) != 2 or min(self.stage_widths) <= 0:
                raise ValueError("decoder.stage_widths needs 2 positive entries (or None to mirror the encoder)")
        if len(self.up_depths) != 2 or min(self.up_depths) <= 0:
            raise ValueError("decoder.up_depths needs 2 positive entries")
        if not 0.0 <= self.drop_path < 1.0:
            raise ValueError("decoder.drop_path must be in [0, 1)")


@dataclass
class ProjectionConfig:
    """The projections between token width and the quantizer latent (both directions)."""

    kind: Literal["attention", "linear"] = "attention"
    """`attention` (the paper's attention projection) or `linear` (ablation)."""
    attn_mode: Literal["full", "causal"] = "full"
    """`full`: April 2025 release. `causal`: February 2025 release (raster-causal attention)."""
    num_heads: int = 0
    """Attention heads; 0 means width // latent_dim (16 at the released config)."""
    mlp_ratio: float = 2.0
    """GeGLU hidden width as a multiple of the output width."""

    def __post_init__(self):
        if self.kind not in ("attention", "linear"):
            raise ValueError(f"projection.kind must be 'attention' or 'linear', got {self.kind!r}")
        if self.attn_mode not in ("full", "causal"):
            raise ValueError(f"projection.attn_mode must be 'full' or 'causal', got {self.attn_mode!r}")
        if self.num_heads < 0:
            raise ValueError("projection.num_heads must be >= 0")


@dataclass
class QuantizerConfig:
    """Discretisation of the latent: multi-codebook (MCQ), residual (RQ) or one codebook."""

    kind: Literal["mcq", "rq", "single"] = "mcq"
    """`mcq`: K independent sub-codebooks on K chunks. `rq`: K residual depths on the whole
    latent. `single`: one codebook on the whole latent (MCQ with K = 1)."""
    num_codebooks: int = 8
    """K: sub-codebooks (mcq) or residual depths (rq); must be 1 for `single`."""
    codebook_size: int = 4096
    """Entries per sub-codebook (per depth for rq)."""
    latent_dim: int = 64
    """Width of the quantized latent; mcq splits it into K chunks of latent_dim / K."""
    beta: float = 0.25
    """Commitment weight."""
    entropy_weight: float = 0.0
    """Weight of the entropy loss (0 disables it, as in the release)."""
    entropy_temp: float = 0.01
    """Temperature of the entropy loss logits."""

    def __post_init__(self):
        if self.kind not in ("mcq", "rq", "single"):
            raise ValueError(f"quantizer.kind must be mcq, rq or single, got {self.kind!r}")
        _positive(self, "num_codebooks", "codebook_size", "latent_dim")
        if self.kind == "single" and self.num_codebooks != 1:
            raise ValueError("quantizer.kind='single' needs num_codebooks=1")
        if self.kind == "mcq" and self.latent_dim % self.num_codebooks:
            raise ValueError(
                f"quantizer.latent_dim={self.latent_dim} is not divisible by num_codebooks={self.num_codebooks}")
        if self.beta < 0 or self.entropy_weight < 0 or self.entropy_temp <= 0:
            raise ValueError("quantizer.beta and entropy_weight must be >= 0, entropy_temp > 0")

    @property
    def code_dim(self) -> int:
        """Width of one code vector."""
        return self.latent_dim // self.num_codebooks if self.kind == "mcq" else self.latent_dim


@dataclass
class TextConfig:
    """The open_clip text transformer."""

    width: int = 768
    """Token width."""
    num_heads: int = 12
    """Attention heads."""
    num_layers: int = 12
    """Transformer blocks."""
    context_length: int = 77
    """Tokens per caption (open_clip tokenizer context)."""
    vocab_size: int = 49408
    """BPE vocabulary of the open_clip tokenizer."""

    def __post_init__(self):
        _positive(self, "width", "num_heads", "num_layers", "context_length", "vocab_size")
        if self.width % self.num_heads:
            raise ValueError("text.width must be divisible by text.num_heads")


@dataclass
class UniTokConfig:
    """The whole tokenizer."""

    img_size: int = 256
    """Training resolution; any multiple of 16 works at inference, square or not."""
    embed_dim: int = 768
    """Width of the joint CLIP embedding space."""
    grad_checkpointing: bool = False
    """Activation checkpointing of the ViT blocks, text tower and quantizer path."""
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    """Encoder."""
    projection: ProjectionConfig = field(default_factory=ProjectionConfig)
    """Token <-> latent projections."""
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    """Quantizer."""
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    """Pixel decoder."""
    text: TextConfig = field(default_factory=TextConfig)
    """CLIP text tower."""

    def __post_init__(self):
        _positive(self, "img_size", "embed_dim")
        if self.img_size % DOWNSAMPLE:
            raise ValueError(f"img_size={self.img_size} must be a multiple of {DOWNSAMPLE}")
        heads = self.projection_heads
        if self.projection.kind == "attention" and max(self.encoder.width, self.quantizer.latent_dim) % heads:
            raise ValueError(f"projection.num_heads={heads} does not divide encoder.width={self.encoder.width}")
        if self.decoder.num_heads and self.encoder.width % self.decoder.num_heads:
            raise ValueError("decoder.num_heads must divide encoder.width")

    @property
    def projection_heads(self) -> int:
        """Heads of the attention projection (official rule: width // latent_dim)."""
        return self.projection.num_heads or max(1, self.encoder.width // self.quantizer.latent_dim)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "UniTokConfig":
        """Inverse of `to_dict`; unknown keys raise ValueError."""
        d = dict(d)
        sub = {"encoder": EncoderConfig, "projection": ProjectionConfig, "quantizer": QuantizerConfig,
               "decoder": DecoderConfig, "text": TextConfig}
        kwargs = {}
        for name, typ in sub.items():
            part = d.pop(name, {})
            kwargs[name] = _build(typ, part, prefix=name + ".")
        return _build(cls, d, prefix="", extra=kwargs)


def _build(typ, d, prefix, extra=None):
    names = {f.name for f in dataclasses.fields(typ)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"unknown config keys: {sorted(prefix + k for k in unknown)}")
    return typ(**d, **(extra or {}))


def _positive(obj, *names):
    for n in names:
        if getattr(obj, n) <= 0:
            raise ValueError(f"{type(obj).__name__}.{n} must be positive, got {getattr(obj, n)}")


PRESETS: dict[str, UniTokConfig] = {
    "debug": UniTokConfig(
        img_size=32, embed_dim=32,
        encoder=EncoderConfig(stem_width=8, stage_widths=(8, 16), stage_depths=(1, 1), width=32,
                              num_layers=1, num_heads=2, drop_path=0.0),
        quantizer=QuantizerConfig(num_codebooks=4, codebook_size=64, latent_dim=16),
        decoder=DecoderConfig(num_layers=1, num_heads=2, up_depths=(1, 1), drop_path=0.0),
        text=TextConfig(width=32, num_heads=2, num_layers=1, context_length=16),
    ),
    "small": UniTokConfig(
        embed_dim=384,
        encoder=EncoderConfig(stem_width=64, stage_widths=(64, 128), width=384, num_layers=14, num_heads=6),
        decoder=DecoderConfig(num_layers=14, num_heads=6),
        text=TextConfig(width=384, num_heads=6, num_layers=12),
    ),
    "base": UniTokConfig(
        embed_dim=768,
        encoder=EncoderConfig(stem_width=128, stage_widths=(128, 256), width=768, num_layers=14, num_heads=12),
        decoder=DecoderConfig(num_layers=14, num_heads=12),
        text=TextConfig(width=768, num_heads=12, num_layers=12),
    ),
    "large": UniTokConfig(),
}


def preset(name: str, overrides: list[str] | None = None) -> UniTokConfig:
    """A fresh copy of a named preset, with optional `--section.field=value` overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    cfg = copy.deepcopy(PRESETS[name])
    return apply_overrides(cfg, overrides) if overrides else cfg


def apply_overrides(cfg, overrides: list[str]):
    """Apply `--section.field=value` overrides to any dataclass config (parsed by tyro)."""
    import contextlib
    import io

    import tyro

    buf = io.StringIO()
    try:
        with contextlib.redirect_stderr(buf), contextlib.redirect_stdout(buf):
            return tyro.cli(type(cfg), default=cfg, args=list(overrides))
    except SystemExit:  # tyro exits on bad input; turn it into an exception that names the problem
        raise ValueError(f"invalid config overrides {list(overrides)}:\n{buf.getvalue().strip()}") from None
