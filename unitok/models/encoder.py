"""ViTamin hybrid encoder: conv stem -> 2 MBConv stages -> strided conv -> ViT blocks.

images (B, 3, H, W) -> stem (B, s0, H/2, W/2) -> stage0 (B, c0, H/4, W/4) -> stage1 (B, c1, H/8, W/8)
-> strided conv (B, D, H/16, W/16) -> tokens (B, h*w, D) -> ViT blocks -> LayerNorm.
No positional embedding: position comes from the conv stem. `pos_embed` is a frozen zero buffer
kept only so the released state dict loads by name.
Parameter names follow the official checkpoint (`patch_embed.backbone.stages.1.0.conv1_1x1`...).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from unitok.config import EncoderConfig
from unitok.models.layers import (Block, LayerNorm2d, drop_path_rates, init_conv_fan_out,
                                  init_linear_trunc_normal, run_blocks)


class Stem(nn.Module):
    """Conv3x3 s2 -> LN2d + GELU -> Conv3x3 s1."""

    def __init__(self, in_chs: int, out_chs: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=2, padding=1)
        self.norm1 = LayerNorm2d(out_chs, act=True)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.norm1(self.conv1(x)))


class Downsample2d(nn.Module):
    """Shortcut of a strided MBConv block: 3x3 avg-pool s2, then 1x1 conv when widths differ."""

    def __init__(self, in_chs: int, out_chs: int):
        super().__init__()
        self.pool = nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)
        self.expand = nn.Conv2d(in_chs, out_chs, 1) if in_chs != out_chs else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.expand(self.pool(x))


class MbConvLNBlock(nn.Module):
    """Pre-norm inverted bottleneck: LN2d -> 1x1 (x4) GELU -> DW3x3 (stride) GELU -> 1x1, + shortcut."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, expand_ratio: float = 4.0):
        super().__init__()
        mid = int(out_chs * expand_ratio)
        if stride == 2:
            self.shortcut = Downsample2d(in_chs, out_chs)
        elif in_chs != out_chs:
            self.shortcut = nn.Conv2d(in_chs, out_chs, 1)
        else:
            self.shortcut = nn.Identity()
        self.pre_norm = LayerNorm2d(in_chs)
        self.conv1_1x1 = nn.Conv2d(in_chs, mid, 1)
        self.conv2_kxk = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=mid)
        self.conv3_1x1 = nn.Conv2d(mid, out_chs, 1)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.shortcut(x)
        x = self.act(self.conv1_1x1(self.pre_norm(x)))
        x = self.act(self.conv2_kxk(x))
        return self.conv3_1x1(x) + shortcut


class StridedConv(nn.Module):
    """LN2d -> Conv3x3 s2: the last x2 downsampling, into the ViT width."""

    def __init__(self, in_chs: int, out_chs: int):
        super().__init__()
        self.norm = LayerNorm2d(in_chs)
        self.proj = nn.Conv2d(in_chs, out_chs, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(x))


class ConvTrunk(nn.Module):
    """Stem + MBConv stages + strided conv: (B, 3, H, W) -> (B, D, H/16, W/16)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.stem = Stem(3, cfg.stem_width)
        stages, in_chs = [], cfg.stem_width
        for width, depth in zip(cfg.stage_widths, cfg.stage_depths):
            stages.append(nn.Sequential(*[
                MbConvLNBlock(in_chs if d == 0 else width, width, stride=2 if d == 0 else 1)
                for d in range(depth)]))
            in_chs = width
        self.stages = nn.ModuleList(stages)
        self.pool = StridedConv(cfg.stage_widths[-1], cfg.width)
        self.grad_checkpointing = False  # set by ViTaminEncoder
        init_conv_fan_out(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # with checkpointing, the stem and each MBConv stage keep only their input (as the release does):
        # their activations at 1/2 and 1/4 resolution are the largest of the encoder
        ckpt = self.grad_checkpointing and torch.is_grad_enabled()
        for part in (self.stem, *self.stages):
            x = checkpoint(part, x, use_reentrant=False) if ckpt else part(x)
        return self.pool(x)


class HybridEmbed(nn.Module):
    """Conv trunk, flattened to tokens (B, h*w, D) in row-major order."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.backbone = ConvTrunk(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x).flatten(2).transpose(1, 2)


class ViTaminEncoder(nn.Module):
    """images (B, 3, H, W) in [-1, 1] -> tokens (B, H/16 * W/16, D)."""

    def __init__(self, cfg: EncoderConfig, grad_checkpointing: bool = False):
        super().__init__()
        self.grad_checkpointing = grad_checkpointing
        self.patch_embed = HybridEmbed(cfg)
        self.patch_embed.backbone.grad_checkpointing = grad_checkpointing
        self.register_buffer("pos_embed", torch.zeros(1, 1, cfg.width))  # frozen zeros, see module doc
        dpr = drop_path_rates(cfg.drop_path, cfg.num_layers)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.num_heads, cfg.mlp_ratio, dpr[i])
                                    for i in range(cfg.num_layers))
        self.norm = nn.LayerNorm(cfg.width, eps=1e-6)
        init_linear_trunc_normal(self.blocks)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images) + self.pos_embed  # (B, L, D)
        x = run_blocks(self.blocks, x, self.grad_checkpointing)
        return self.norm(x)
