"""ViTamin pixel decoder: ViT blocks -> inverse-MBConv upsampler (x16) -> RGB.

tokens (B, h*w, D) -> blocks + LN -> map (B, D, h, w) -> up_conv1 (B, c1, 2h, 2w)
-> up_conv2 (B, c1, 4h, 4w) -> up_conv3 (B, c0, 8h, 8w) -> up_conv4 (B, 3, 16h, 16w).
No tanh: the output is clamped to [-1, 1] at inference only. Non-square grids work because the
caller passes (h, w) instead of assuming h = w = sqrt(L).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from unitok.config import DecoderConfig, EncoderConfig
from unitok.models.layers import Block, LayerNorm2d, drop_path_rates, run_blocks


def _nearest_x2_taps(w: torch.Tensor, dim: int) -> torch.Tensor:
    """3 taps (a, b, c) of a kernel axis -> the 4 taps (c, b+c, a+b, a) of the stride-2 transposed conv."""
    a, b, c = w.unbind(dim)
    return torch.stack([c, b + c, a + b, a], dim)


class Upsample2d(nn.Module):
    """Nearest x2 then Conv3x3 (padding 1), computed on the low-resolution map.

    Each output pixel of conv3x3(nearest_x2(x)) reads only a 2x2 window of x, with a kernel whose rows and
    columns are sums of the 3x3 kernel's (the sub-pixel view of resize-convolution). So the whole layer is
    one stride-2 transposed convolution of x with a 4x4 kernel derived from the 3x3 weight: 16 multiply-adds
    per input pixel instead of 36, and no x4 upsampled copy. Written by hand because neither torch nor timm
    has this rewrite; the parameter stays the 3x3 `conv` (the released checkpoint layout), the derivation is
    differentiable, and the result equals the direct form up to float rounding
    (tests/test_tokenizer_modules.py). Measured on the `base` decoder's largest layers (2 CPU threads,
    forward + backward): 1.3-1.8x faster; benchmarks/README.md has the figures.
    """

    def __init__(self, in_chs: int, out_chs: int):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (out, in, 3, 3) -> (in, out, 4, 4), conv_transpose2d's layout, built contiguous (the stacks copy);
        # plain additions, so they stay in the weight's dtype under autocast (the convolution itself
        # autocasts like the direct form's)
        weight = _nearest_x2_taps(_nearest_x2_taps(self.conv.weight.transpose(0, 1), 2), 3)
        return F.conv_transpose2d(x, weight, self.conv.bias, stride=2, padding=1)


class InvMbConvLNBlock(nn.Module):
    """LN2d -> 1x1 (x4) GELU -> [Upsample2d] -> DW3x3 GELU -> 1x1, + shortcut."""

    def __init__(self, in_chs: int, out_chs: int, upsample: bool = False, expand_ratio: float = 4.0):
        super().__init__()
        mid = int(out_chs * expand_ratio)
        if upsample:
            self.shortcut = Upsample2d(in_chs, out_chs)
        elif in_chs != out_chs:
            self.shortcut = nn.Conv2d(in_chs, out_chs, 1)
        else:
            self.shortcut = nn.Identity()
        self.pre_norm = LayerNorm2d(in_chs)
        self.conv1_1x1 = nn.Conv2d(in_chs, mid, 1)
        self.up = Upsample2d(mid, mid) if upsample else nn.Identity()
        self.conv2_kxk = nn.Conv2d(mid, mid, 3, padding=1, groups=mid)
        self.conv3_1x1 = nn.Conv2d(mid, out_chs, 1)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.shortcut(x)
        x = self.up(self.act(self.conv1_1x1(self.pre_norm(x))))
        x = self.act(self.conv2_kxk(x))
        return self.conv3_1x1(x) + shortcut


class InvStem(nn.Module):
    """Upsample2d -> LN2d + GELU -> Conv3x3 to RGB."""

    def __init__(self, in_chs: int, out_chs: int = 3):
        super().__init__()
        self.conv1 = Upsample2d(in_chs, in_chs)
        self.norm1 = LayerNorm2d(in_chs, act=True)
        self.conv2 = nn.Conv2d(in_chs, out_chs, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.norm1(self.conv1(x)))


class ViTaminDecoder(nn.Module):
    """tokens (B, h*w, D) + grid (h, w) -> images (B, 3, 16h, 16w), unclamped."""

    def __init__(self, cfg: DecoderConfig, enc: EncoderConfig, grad_checkpointing: bool = False):
        super().__init__()
        self.grad_checkpointing = grad_checkpointing
        width, (c0, c1) = enc.width, cfg.stage_widths or enc.stage_widths
        dpr = drop_path_rates(cfg.drop_path, cfg.num_layers)
        self.blocks = nn.ModuleList(Block(width, cfg.num_heads, enc.mlp_ratio, dpr[i])
                                    for i in range(cfg.num_layers))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.up_conv1 = Upsample2d(width, c1)
        self.up_conv2 = nn.Sequential(*[InvMbConvLNBlock(c1, c1, upsample=d == 0) for d in range(cfg.up_depths[0])])
        self.up_conv3 = nn.Sequential(*[InvMbConvLNBlock(c1 if d == 0 else c0, c0, upsample=d == 0)
                                        for d in range(cfg.up_depths[1])])
        self.up_conv4 = InvStem(c0, 3)

    def last_layer_weight(self) -> nn.Parameter:
        """The final conv weight, where the adaptive GAN weight is measured."""
        return self.up_conv4.conv2.weight

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        B, L, D = x.shape
        h, w = grid
        if h * w != L:
            raise ValueError(f"decoder grid {h}x{w} does not match {L} tokens")
        x = self.norm(run_blocks(self.blocks, x, self.grad_checkpointing))
        x = x.transpose(1, 2).reshape(B, D, h, w)
        for stage in (self.up_conv1, self.up_conv2, self.up_conv3):
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(stage, x, use_reentrant=False)
            else:
                x = stage(x)
        return self.up_conv4(x)
