"""DINOv2-S discriminator (the release's DinoDiscV2; REFERENCE.md 3.4 and 4.4).

Legend: B batch, H x W pixels, p = 14 patch, N = (H // p) * (W // p) patches, C backbone width
(384 for ViT-S/14), K = len(key_depths) = 5 heads.
    x (B, 3, H, W) in [-1, 1] -> x * x_scale + x_shift (ImageNet normalisation, fp32)
    -> resize to a multiple of 14 (one random crop for the batch with p = 1/2, else area)
    -> frozen DINOv2 blocks; after blocks (0, 2, 5, 8, 11): tokens (B, 1 + N, C), no final norm
    -> per layer: patch tokens + CLS token -> (B, C, N) -> head k -> (B, 1, N)
    -> logits (B, K * N)
Each head: [Conv1d k1 + GroupNorm(32) + LeakyReLU(0.2)] -> residual [Conv1d k9 circular + GN +
LeakyReLU] scaled by 1/sqrt(2) -> Conv1d(C -> 1). No spectral norm.

The backbone is a timm `vit_small_patch14_dinov2` (same parameter names as the official
`dinov2_vits14_pretrain.pth`). It is held in a plain list, OUTSIDE the module tree: it is never in
`state_dict()`, never seen by an optimizer, and never trained, but gradients flow through it to the
input images (the generator's GAN loss needs them). `.to()` / `.cuda()` still move it.
"""
from __future__ import annotations

import math
import os
import re
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

PATCH = 14
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# name -> timm kwargs; `img_size` fixes the stored pos_embed grid (518 / 14 = 37 for the release)
BACKBONES: dict[str, dict] = {
    "vits14": dict(embed_dim=384, depth=12, num_heads=6, img_size=518),
    "debug": dict(embed_dim=64, depth=12, num_heads=2, img_size=56),  # CPU tests: ~1 ms per block
}


def build_dinov2_backbone(name: str = "vits14") -> nn.Module:
    """A randomly initialised DINOv2 ViT/14 from timm (LayerScale init 1.0, as the release builds it)."""
    import timm

    if name not in BACKBONES:
        raise ValueError(f"unknown DINOv2 backbone {name!r}; choose from {sorted(BACKBONES)}")
    return timm.create_model("vit_small_patch14_dinov2", pretrained=False, init_values=1.0,
                             num_classes=0, **BACKBONES[name])


def dinov2_official_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official facebookresearch DINOv2 keys -> timm keys.

    The layouts share names (`blocks.{i}.attn.qkv.weight`, `ls1.gamma`, `patch_embed.proj.*`,
    `pos_embed`, `cls_token`, `norm.*`). Differences handled: `mask_token` (masked-image training
    only) is dropped; chunked checkpoints `blocks.{chunk}.{i}.*` are flattened (chunks keep global
    block indices); a `module.` prefix is stripped. Register-token checkpoints are a different model.
    """
    out = {}
    for k, v in state.items():
        k = k.removeprefix("module.")
        if k == "mask_token":
            continue
        if k == "register_tokens":
            raise ValueError("this DINOv2 checkpoint has register tokens (a *_reg model); the "
                             "discriminator uses the plain ViT-S/14 (dinov2_vits14_pretrain.pth)")
        k = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k)
        out[k] = v
    return out


def _missing_dino(path: str | os.PathLike) -> str:
    from runtime.weights import fetch_hint

    return f"DINOv2 weights file not found: {path}; {fetch_hint('dinov2-vits14')}"


def load_dinov2_weights(backbone: nn.Module, path: str | os.PathLike, assign: bool = False) -> None:
    """Load an official-layout DINOv2 state dict from a local file into a timm backbone, strictly.

    `assign=True` adopts the file's tensors (for a backbone built on the meta device).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(_missing_dino(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = dinov2_official_to_timm(state)
    own = backbone.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"{path} does not match the DINOv2 backbone: missing {missing[:6]} ({len(missing)}), "
                         f"unexpected {unexpected[:6]} ({len(unexpected)})")
    bad = [k for k in own if own[k].shape != state[k].shape]
    if bad:
        raise ValueError(f"{path}: shape mismatch " + ", ".join(
            f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in bad[:6]))
    backbone.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True, assign=assign)


def _conv_block(channels: int, kernel_size: int, norm_eps: float) -> nn.Sequential:
    # Conv1d over the patch sequence, circular padding (the sequence is a flattened grid)
    return nn.Sequential(
        nn.Conv1d(channels, channels, kernel_size, padding=kernel_size // 2, padding_mode="circular"),
        nn.GroupNorm(32, channels, eps=norm_eps),
        nn.LeakyReLU(0.2, inplace=True),
    )


class ResidualBlock(nn.Module):
    """(fn(x) + x) / sqrt(2); the parameter names live under `.fn` (release layout)."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.fn(x) + x) * (1 / math.sqrt(2))


class DinoDiscriminator(nn.Module):
    """Frozen DINOv2 features + 5 trainable 1-D conv heads -> per-patch logits (B, K * N).

    `dino_weights`: local official-layout `dinov2_vits14_pretrain.pth`. `None` needs
    `random_backbone=True` (tests, demo) and warns once. `backbone`: "vits14" (release) or "debug"
    (width 64, for CPU tests); the heads follow the backbone width.
    """

    def __init__(self, dino_weights: str | os.PathLike | None, *, random_backbone: bool = False,
                 backbone: str = "vits14", key_depths: tuple[int, ...] = (0, 2, 5, 8, 11),
                 kernel_size: int = 9, norm_eps: float = 1e-6):
        super().__init__()
        if dino_weights is None and not random_backbone:
            raise ValueError("DinoDiscriminator needs dino_weights (a local dinov2_vits14_pretrain.pth); "
                             "pass random_backbone=True to run with a random backbone (tests only)")
        if dino_weights is not None and random_backbone:
            raise ValueError("pass either dino_weights or random_backbone=True, not both")
        if dino_weights is not None and not Path(dino_weights).is_file():
            raise FileNotFoundError(_missing_dino(dino_weights))
        if dino_weights is None:
            vit = build_dinov2_backbone(backbone)
        else:  # every tensor comes from the file: skip the (slow) random init on the meta device
            with torch.device("meta"):
                vit = build_dinov2_backbone(backbone)
        depth = len(vit.blocks)
        key_depths = tuple(key_depths)
        increasing = list(key_depths) == sorted(set(key_depths))
        if not key_depths or not increasing or not 0 <= key_depths[0] <= key_depths[-1] < depth:
            raise ValueError(f"key_depths must be increasing block indices in [0, {depth}), got {key_depths}")
        if vit.embed_dim % 32:
            raise ValueError(f"backbone width {vit.embed_dim} is not divisible by 32 (GroupNorm groups)")
        if dino_weights is None:
            warnings.warn("DinoDiscriminator: random DINOv2 backbone (random_backbone=True); use "
                          "dino_weights for real training", stacklevel=2)
        else:
            load_dinov2_weights(vit, dino_weights, assign=True)
        vit.requires_grad_(False).eval()
        self._backbone = [vit]  # a list hides it from modules(), parameters() and state_dict()
        self.key_depths = key_depths

        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        # [-1, 1] -> ImageNet-normalised in one multiply-add: (x + 1) / 2 -> (. - mean) / std
        self.register_buffer("x_scale", (0.5 / std).view(1, 3, 1, 1))
        self.register_buffer("x_shift", ((0.5 - mean) / std).view(1, 3, 1, 1))
        C = vit.embed_dim
        self.heads = nn.ModuleList([
            nn.Sequential(
                _conv_block(C, 1, norm_eps),
                ResidualBlock(_conv_block(C, kernel_size, norm_eps)),
                nn.Conv1d(C, 1, kernel_size=1),
            )
            for _ in key_depths
        ])

    @property
    def backbone(self) -> nn.Module:
        """The frozen DINOv2 (not a submodule)."""
        return self._backbone[0]

    def _apply(self, fn, recurse: bool = True):
        # keep the hidden backbone on the same device / dtype as the heads
        super()._apply(fn, recurse)
        self._backbone[0]._apply(fn)
        return self

    def _pos_embed(self, h: int, w: int) -> torch.Tensor:
        """pos_embed resampled to an h x w patch grid exactly as official DINOv2 does it at run
        time (bicubic, scale factor (h + 0.1) / M, no antialias) -> (1, 1 + h*w, C)."""
        pe = self.backbone.pos_embed  # (1, 1 + M*M, C)
        M = math.isqrt(pe.shape[1] - 1)
        if (h, w) == (M, M):
            return pe
        C = pe.shape[-1]
        grid = pe[:, 1:].float().reshape(1, M, M, C).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((h + 0.1) / M, (w + 0.1) / M), mode="bicubic",
                             antialias=False)
        assert grid.shape[-2:] == (h, w), grid.shape
        grid = grid.permute(0, 2, 3, 1).reshape(1, h * w, C)
        return torch.cat([pe[:, :1].float(), grid], dim=1).to(pe.dtype)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Normalised images (B, 3, 14h, 14w) -> per key depth, patch + CLS tokens (B, C, h*w), fp32."""
        vit = self.backbone
        B, _, H, W = x.shape
        h, w = H // PATCH, W // PATCH
        t = vit.patch_embed.norm(vit.patch_embed.proj(x).flatten(2).transpose(1, 2))  # (B, N, C)
        t = torch.cat([vit.cls_token.expand(B, -1, -1).to(t.dtype), t], dim=1)  # (B, 1 + N, C)
        t = t + self._pos_embed(h, w).to(t.dtype)
        out = []
        for i, blk in enumerate(vit.blocks[: self.key_depths[-1] + 1]):
            t = blk(t)
            if i in self.key_depths:
                out.append((t[:, 1:].float() + t[:, :1].float()).transpose(1, 2))  # (B, C, N)
        return out

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None,
                grad_ckpt: bool = False) -> torch.Tensor:
        """x (B, 3, H, W) in [-1, 1] -> logits (B, K * N). `generator` drives the crop-or-resize draw."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"discriminator input must be (B, 3, H, W), got {tuple(x.shape)}")
        B, _, H, W = x.shape
        nh, nw = H // PATCH * PATCH, W // PATCH * PATCH
        if nh == 0 or nw == 0:
            raise ValueError(f"discriminator input {H}x{W} is smaller than one {PATCH}px patch")
        with torch.autocast(device_type=x.device.type, enabled=False):  # normalise in fp32
            x = x.float() * self.x_scale + self.x_shift
            if H > nh and W > nw:
                r = torch.rand(3, generator=generator, device=generator.device if generator else "cpu")
                if r[0] < 0.5:  # one crop offset for the whole batch, as torchvision RandomCrop
                    top, left = int(r[1] * (H - nh + 1)), int(r[2] * (W - nw + 1))
                    x = x[:, :, top:top + nh, left:left + nw]
                else:
                    x = F.interpolate(x, size=(nh, nw), mode="area")
            elif (H, W) != (nh, nw):
                x = F.interpolate(x, size=(nh, nw), mode="bicubic")
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.backbone.cls_token.dtype)
        head_dtype = self.heads[0][2].weight.dtype  # heads may be bf16 under a bf16 engine
        logits = []
        for head, act in zip(self.heads, self.features(x)):
            if not torch.is_autocast_enabled(x.device.type):
                act = act.to(head_dtype)
            if grad_ckpt and torch.is_grad_enabled():
                y = checkpoint(head, act, use_reentrant=False)
            else:
                y = head(act)
            logits.append(y.reshape(B, -1))  # (B, N)
        return torch.cat(logits, dim=1)  # (B, K * N)
