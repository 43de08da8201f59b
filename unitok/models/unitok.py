"""UniTok: the unified tokenizer (encoder -> quant_proj -> quantizer -> post_quant_proj -> decoder / CLIP).

Legend: B batch, H x W pixels, h = H/16, w = W/16, L = h*w, D token width, C latent width,
K codebooks, E CLIP embedding width.
    images (B, 3, H, W) in [-1, 1] -> encoder (B, L, D) -> quant_proj (B, L, C) -> quantizer
    -> codes (B, K, h, w) | z_q (B, L, C) -> post_quant_proj (B, L, D) -> decoder (B, 3, H, W)
                                                               '-> mean -> LN -> Linear -> l2norm (B, E)
The quantizer path (both projections and the quantizer) always runs in fp32, even under an
outer autocast (the release leaves `img_to_idx` unguarded).
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock
from torch.utils.checkpoint import checkpoint

from unitok.config import DOWNSAMPLE, UniTokConfig
from unitok.models.decoder import InvMbConvLNBlock, ViTaminDecoder
from unitok.models.encoder import MbConvLNBlock, ViTaminEncoder
from unitok.models.layers import Block
from unitok.models.projection import build_projection
from unitok.models.quantizer import build_quantizer
from unitok.models.text import build_text_tower

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
FORMAT_VERSION = 1
BLOCK_TYPES = (MbConvLNBlock, Block, InvMbConvLNBlock, ResidualAttentionBlock)
"""The repeated blocks `--compile` compiles (runtime/compile.py): encoder conv stages and ViT blocks,
decoder ViT blocks and conv stages, text-tower blocks (open_clip's)."""


def fp32_region(device: torch.device):
    """Disable any outer autocast so the quantizer path runs in fp32."""
    return torch.autocast(device_type=device.type, enabled=False)


class UniTok(nn.Module):
    """The unified visual tokenizer. See the module docstring for the data flow."""

    def __init__(self, cfg: UniTokConfig):
        super().__init__()
        self.cfg = cfg
        D, C = cfg.encoder.width, cfg.quantizer.latent_dim
        heads, causal, pc = cfg.projection_heads, cfg.projection.attn_mode == "causal", cfg.projection
        self.encoder = ViTaminEncoder(cfg.encoder, cfg.grad_checkpointing)
        self.quant_proj = build_projection(pc.kind, D, C, heads, causal, pc.mlp_ratio)
        self.quantizer = build_quantizer(cfg.quantizer)
        self.post_quant_proj = build_projection(pc.kind, C, D, heads, causal, pc.mlp_ratio)
        self.decoder = ViTaminDecoder(cfg.decoder, cfg.encoder, cfg.grad_checkpointing)
        self._init_decoder_side()
        self.text_encoder = build_text_tower(cfg.text, cfg.embed_dim)
        self.text_encoder.set_grad_checkpointing(cfg.grad_checkpointing)
        self.fc_norm = nn.LayerNorm(D, eps=1e-6)
        self.projection = nn.Linear(D, cfg.embed_dim)
        # One element, not 0-dim: DeepSpeed's initial parameter broadcast views every parameter as
        # bytes, which fails on 0-dim tensors. Checkpoints still store it as () like the release.
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / 0.07)))
        self.register_state_dict_post_hook(_logit_scale_to_scalar)
        self.register_load_state_dict_pre_hook(_logit_scale_from_scalar)

    def _init_decoder_side(self):
        # Release init for decoder and projections: Linear trunc_normal(0.02), conv xavier(0.5).
        for m in [*self.decoder.modules(), *self.quant_proj.modules(), *self.post_quant_proj.modules()]:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                nn.init.xavier_normal_(m.weight, gain=0.5)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # ---- properties ----------------------------------------------------------------------
    @property
    def num_codebooks(self) -> int:
        return self.cfg.quantizer.num_codebooks

    @property
    def codebook_size(self) -> int:
        return self.cfg.quantizer.codebook_size

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    # ---- validation ----------------------------------------------------------------------
    def _check_images(self, images: torch.Tensor, values: bool = True) -> None:
        """Type, shape and (with `values`: a host sync) the [-1, 1] range."""
        if not isinstance(images, torch.Tensor):
            raise ValueError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
        H, W = images.shape[-2:]
        if H % DOWNSAMPLE or W % DOWNSAMPLE or H == 0 or W == 0:
            raise ValueError(f"image height and width must be positive multiples of {DOWNSAMPLE}, got {H}x{W}")
        if not images.is_floating_point():
            raise ValueError(f"images must be floating point in [-1, 1], got dtype {images.dtype}")
        if not values:
            return
        lo, hi = images.aminmax()
        if lo < -1.001 or hi > 1.001:
            raise ValueError(f"images must be in [-1, 1] (got min {lo.item():.3f}, max {hi.item():.3f}); "
                             "map uint8 pixels with x / 127.5 - 1")

    def _check_codes(self, codes: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        if not isinstance(codes, torch.Tensor) or codes.is_floating_point() or codes.dtype == torch.bool:
            raise ValueError("codes must be an integer torch.Tensor")
        if codes.dim() not in (3, 4) or codes.shape[1] != self.num_codebooks:
            raise ValueError(f"codes must be (B, {self.num_codebooks}, h, w) or (B, {self.num_codebooks}, L), "
                             f"got {tuple(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"code values must be in [0, {self.codebook_size})")
        if codes.dim() == 4:
            grid = tuple(codes.shape[-2:])
        else:
            side = math.isqrt(codes.shape[-1])
            if side * side != codes.shape[-1]:
                raise ValueError(f"flat codes with L={codes.shape[-1]} are not square; pass (B, K, h, w)")
            grid = (side, side)
        return codes.long(), grid

    # ---- the quantizer path ----------------------------------------------------------------
    def _maybe_ckpt(self, fn, x):
        if self.cfg.grad_checkpointing and torch.is_grad_enabled() and self.training:
            return checkpoint(fn, x, use_reentrant=False)
        return fn(x)

    def latent(self, images: torch.Tensor) -> torch.Tensor:
        """images -> pre-quantization latent z (B, L, C), fp32."""
        tokens = self.encoder(images)
        with fp32_region(images.device):
            return self._maybe_ckpt(self.quant_proj, tokens.float())

    def tokens_from_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, K, L|h, w) -> post-quant tokens (B, L, D), fp32 (also the LLaVA-style features)."""
        with fp32_region(codes.device):
            return self.post_quant_proj(self.quantizer.codes_to_latent(codes).float())

    # ---- public API -----------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> codes (B, K, H/16, W/16) int64 in [0, codebook_size)."""
        self._check_images(images)
        B, _, H, W = images.shape
        z = self.latent(images)
        with fp32_region(images.device):
            codes = self.quantizer.latent_to_codes(z)  # (B, K, L)
        return codes.view(B, self.num_codebooks, H // DOWNSAMPLE, W // DOWNSAMPLE)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, K, h, w) (or square (B, K, L)) -> images (B, 3, 16h, 16w) clamped to [-1, 1]."""
        codes, grid = self._check_codes(codes)
        return self.decoder(self.tokens_from_codes(codes), grid).float().clamp_(-1, 1)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """encode then decode."""
        return self.decode(self.encode(images))

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """CLIP image features (B, E) through the QUANTIZED path (codes -> post_quant_proj -> pool)."""
        codes = self.encode(images)
        return self._clip_head(self.tokens_from_codes(codes), normalize)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """CLIP text features (B, E) from open_clip tokens (B, context_length)."""
        if tokens.dim() != 2 or tokens.is_floating_point():
            raise ValueError(f"text tokens must be an integer tensor (B, context_length), got {tuple(tokens.shape)}")
        feats = self.text_encoder(tokens)
        return F.normalize(feats, dim=-1) if normalize else feats

    def _clip_head(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        feats = self.projection(self.fc_norm(tokens.mean(dim=1)))
        return F.normalize(feats, dim=-1) if normalize else feats

    def forward(self, images: torch.Tensor, texts: torch.Tensor | None = None,
                num_decode: int | None = None) -> dict[str, torch.Tensor | None]:
        """Training forward. Decodes the first `num_decode` images (all by default).

        Returns img_rec (num_decode, 3, H, W) unclamped, vq_loss, entropy_loss, codebook_usage (K,),
        codes (B, K, h, w), clip_image_features / clip_text_features (B, E) normalised (text None
        without texts), logit_scale (exp'ed scalar).
        """
        self._check_images(images, values=not self.training)  # training reads the loader's [-1, 1] images
        B, _, H, W = images.shape
        grid = (H // DOWNSAMPLE, W // DOWNSAMPLE)
        z = self.latent(images)
        with fp32_region(images.device):
            q = self.quantizer(z)
            tokens = self._maybe_ckpt(self.post_quant_proj, q.z_q)  # (B, L, D)
        n = B if num_decode is None else num_decode
        img_rec = self.decoder(tokens[:n], grid).float() if n > 0 else None
        return {
            "img_rec": img_rec,
            "vq_loss": q.vq_loss,
            "entropy_loss": q.entropy_loss,
            "codebook_usage": q.usage,
            "codes": q.codes.view(B, self.num_codebooks, *grid),
            "clip_image_features": self._clip_head(tokens),
            "clip_text_features": self.encode_text(texts) if texts is not None else None,
            # clamped here as well as by clamp_logit_scale(): optimizers that keep a master copy
            # (DeepSpeed ZeRO) would undo an in-place clamp of the module parameter
            "logit_scale": self.logit_scale.clamp(0, math.log(100)).exp().squeeze(0),
        }

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """Keep logit_scale in [0, ln 100] (call after every optimizer step)."""
        self.logit_scale.clamp_(0, math.log(100))

    def reset_nonpersistent_buffers(self) -> None:
        """Rebuild buffers that are not in the state dict (after building on the meta device)."""
        self.quantizer.usage_steps = 0
        self.text_encoder.attn_mask = self.text_encoder.build_causal_mask().to(self.device)

    # ---- checkpoint folder (config.json + model.safetensors) ------------------------------
    CODE_PATH = ("encoder", "quant_proj", "quantizer", "post_quant_proj")
    """What makes the codes and what the MLLM reads of them (its codebooks and input projection)."""
    CODE_PATH_CONFIG = ("img_size", "encoder", "projection", "quantizer")
    """Their config (`projection` holds the attention mode)."""

    def fingerprint(self) -> str:
        """A short hash of the code path (`CODE_PATH`): its config and its parameters' bytes. The same weights give
        the same fingerprint in any file format; another checkpoint of the same shape (a longer-trained tokenizer)
        another one. The decoder, the text tower and running statistics are left out: a decoder fine-tune keeps
        the codes."""
        import hashlib

        cfg = self.cfg.to_dict()
        h = hashlib.sha256(json.dumps({k: cfg[k] for k in self.CODE_PATH_CONFIG}, sort_keys=True).encode())
        for k, v in sorted(self.named_parameters()):
            if k.split(".")[0] in self.CODE_PATH:
                h.update(k.encode())
                h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        return h.hexdigest()[:16]

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write `path/config.json` and `path/model.safetensors` atomically.

        The folder is written beside `path` and swapped in, so an existing `path` is replaced as a whole: that
        is allowed only for an empty folder or an earlier checkpoint folder (a UniTok config.json and nothing
        but the checkpoint's own files; `check_replaceable_checkpoint_folder`). Anything else (a folder that also
        holds the official .pth, notes, other weights) is refused rather than deleted."""
        from safetensors.torch import save_file

        path = Path(path)
        check_replaceable_checkpoint_folder(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(
            {"format": "unitok", "format_version": FORMAT_VERSION, "config": self.cfg.to_dict()}, indent=2))
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "UniTok":
        """Load a folder written by `save_pretrained`; returns the model in eval mode."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        cfg_file, weights = path / CONFIG_NAME, path / WEIGHTS_NAME
        for f in (cfg_file, weights):
            if not f.is_file():
                raise FileNotFoundError(f"tokenizer checkpoint file not found: {f}")
        try:
            meta = json.loads(cfg_file.read_text())
            cfg = UniTokConfig.from_dict(meta["config"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{cfg_file} is not a valid UniTok config: {e}") from e
        try:
            state = load_file(str(weights), device=str(device))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{weights} is not a readable safetensors file (truncated or corrupt?): {e}") from e
        return cls.from_state_dict(cfg, state, device)

    @classmethod
    def from_state_dict(cls, cfg: UniTokConfig, state: dict[str, torch.Tensor],
                        device: str | torch.device = "cpu") -> "UniTok":
        """Build without random init (meta device) and load `state` strictly; eval mode."""
        with torch.device("meta"):
            model = cls(cfg)
        expected = set(model.state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(f"state dict does not match the config: missing {missing[:10]}"
                             f"{' ...' if len(missing) > 10 else ''} ({len(missing)}), unexpected "
                             f"{unexpected[:10]}{' ...' if len(unexpected) > 10 else ''} ({len(unexpected)})")
        ref = model.state_dict()
        bad = [k for k in ref if tuple(ref[k].shape) != tuple(state[k].shape)]
        if bad:
            raise ValueError("shape mismatch: " + ", ".join(
                f"{k} {tuple(state[k].shape)} vs {tuple(ref[k].shape)}" for k in bad[:10]))
        model.load_state_dict({k: v.to(device=device, dtype=ref[k].dtype) for k, v in state.items()},
                              strict=True, assign=True)
        model.reset_nonpersistent_buffers()
        return model.eval()


def check_replaceable_checkpoint_folder(path: Path) -> None:
    """Refuse a `save_pretrained` target whose replacement would delete files that are not a checkpoint's own:
    an existing file, a non-empty folder without a UniTok config.json, or a checkpoint folder that also holds
    other files. A missing or empty folder and an earlier checkpoint folder pass."""
    if not path.exists():
        return
    if not path.is_dir():
        raise FileExistsError(f"cannot save a tokenizer checkpoint to {path}: it is a file, not a folder")
    names = sorted(p.name for p in path.iterdir())
    if not names:
        return
    try:
        is_checkpoint = json.loads((path / CONFIG_NAME).read_text()).get("format") == "unitok"
    except (OSError, ValueError, AttributeError):  # missing, unreadable, not JSON, not a JSON object
        is_checkpoint = False
    if not is_checkpoint:
        raise FileExistsError(f"cannot save a tokenizer checkpoint to {path}: the folder is not empty and is not "
                              f"a UniTok checkpoint folder (no UniTok {CONFIG_NAME}); it holds {names[:5]}"
                              f"{' ...' if len(names) > 5 else ''}. Choose a new or empty folder")
    foreign = [n for n in names if n not in (CONFIG_NAME, WEIGHTS_NAME)]
    if foreign:
        raise FileExistsError(f"cannot replace the tokenizer checkpoint folder {path}: it also holds "
                              f"{foreign[:5]}{' ...' if len(foreign) > 5 else ''}, which replacing the folder "
                              f"would delete. Move them out or choose a new folder")


def _logit_scale_to_scalar(module, state_dict, prefix, local_metadata):
    key = prefix + "logit_scale"
    if key in state_dict:
        state_dict[key] = state_dict[key].reshape(())


def _logit_scale_from_scalar(module, state_dict, prefix, *args):
    key = prefix + "logit_scale"
    if key in state_dict and state_dict[key].dim() == 0:
        state_dict[key] = state_dict[key].reshape(1)
