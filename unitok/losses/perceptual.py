"""LPIPS-VGG perceptual loss (REFERENCE.md 4.3), built from the `lpips` package, offline.

`lpips.LPIPS(net='vgg')` downloads the VGG16 trunk from download.pytorch.org, which these machines
cannot reach. We build it with `pnet_rand=True` (random trunk; the 5 linear heads ship inside the
wheel) and then load the trunk from a LOCAL file, either
  - a torchvision `vgg16` state dict (`features.{i}.weight|bias`, `classifier.*` ignored), or
  - a full LPIPS state dict (`net.slice{s}.{i}.*` + optional `lin{k}.model.1.weight`), e.g. the
    release's `external/lpips_with_vgg.pth`.
Legend: B batch, H x W pixels, C_l channels of VGG stage l (64, 128, 256, 512, 512).
    x (B, 3, H, W) in [-1, 1] -> (x - shift) / scale -> VGG16 relu{1_2,2_2,3_3,4_3,5_3} (B, C_l, H_l, W_l)
    -> channel-normalise -> squared difference -> 1x1 conv (C_l -> 1) -> mean -> sum over l
The forward is written out here (REFERENCE 4.3, as the release does it) over lpips' own modules
instead of calling `LPIPS.forward`: the math is the same, but the channel norm keeps its eps inside
the sqrt, so all-zero feature columns give a finite gradient. A test checks parity with lpips.
"""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import torch
import torch.nn as nn

# torchvision vgg16 `features` index ranges held by lpips' net.slice1..5 (indices keep their names)
_VGG_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))
_LIN_KEY = re.compile(r"^lins?\.?(\d)\.model\.1\.weight$")  # lin3.model.1.weight | lins.3.model.1.weight


def _slice_of(index: int) -> int | None:
    for s, (lo, hi) in enumerate(_VGG_SLICES, start=1):
        if lo <= index < hi:
            return s
    return None


def normalize_channels(x: torch.Tensor) -> torch.Tensor:
    """x (B, C, H, W) / its L2 norm over C. The eps sits INSIDE the sqrt (as in the release), unlike
    `lpips.normalize_tensor`, whose sqrt has an infinite gradient at all-zero feature columns."""
    return x / (x.square().sum(dim=1, keepdim=True).add(1e-9).sqrt() + 1e-10)


def vgg16_to_lpips_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision vgg16 state dict -> lpips `net.slice{s}.{i}.{weight,bias}` keys (classifier dropped)."""
    out = {}
    for k, v in state.items():
        parts = k.split(".")
        if parts[0] != "features" or len(parts) != 3:
            continue
        s = _slice_of(int(parts[1]))
        if s is not None:
            out[f"net.slice{s}.{parts[1]}.{parts[2]}"] = v
    return out


def _read_lpips_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a torchvision vgg16 or LPIPS state dict file -> lpips-layout keys (trunk + optional heads)."""
    path = Path(path)
    if not path.is_file():
        from runtime.weights import fetch_hint

        raise FileNotFoundError(f"LPIPS/VGG16 weights file not found: {path}; {fetch_hint('lpips-vgg16')}")
    try:  # mmap: a torchvision file is 90% classifier, which is never read
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (pre-zipfile) serialisation cannot be mmapped
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("features.") for k in state):
        return vgg16_to_lpips_keys(state)
    if any(k.startswith("net.slice") for k in state):
        mapped = {k: v for k, v in state.items() if k.startswith("net.")}
        for k, v in state.items():  # linear heads; lpips registers each twice (lin{k} and lins.{k})
            hit = _LIN_KEY.match(k)
            if hit:
                mapped[f"lin{hit.group(1)}.model.1.weight"] = v
                mapped[f"lins.{hit.group(1)}.model.1.weight"] = v
        return mapped
    raise ValueError(f"{path}: unrecognised layout; expected a torchvision vgg16 state dict "
                     "(features.*) or an LPIPS state dict (net.slice*)")


class PerceptualLoss(nn.Module):
    """LPIPS(VGG16) between two image batches in [-1, 1]; frozen, always in eval mode.

    `vgg_weights` is a local file (see the module docstring). `vgg_weights=None` needs
    `random_backbone=True` (tests, demo) and warns once: a random trunk is not a perceptual metric.
    Images smaller than `min_size` pixels on either side give 0 (REFERENCE `lpr` = 48).
    """

    def __init__(self, vgg_weights: str | os.PathLike | None, *, random_backbone: bool = False,
                 min_size: int = 48):
        super().__init__()
        import lpips

        if vgg_weights is None and not random_backbone:
            raise ValueError("PerceptualLoss needs vgg_weights (a local VGG16 or LPIPS state dict file); "
                             "pass random_backbone=True to run with a random trunk (tests only)")
        if vgg_weights is not None and random_backbone:
            raise ValueError("pass either vgg_weights or random_backbone=True, not both")
        # read and check the file before building: a bad path fails fast, without a VGG16 build
        state = _read_lpips_state(vgg_weights) if vgg_weights is not None else None
        with warnings.catch_warnings():
            # torchvision deprecation chatter about `pretrained=` inside lpips; not actionable here
            warnings.simplefilter("ignore", UserWarning)
            self.lpips = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
        self.min_size = min_size
        if vgg_weights is None:
            warnings.warn("PerceptualLoss: random VGG16 trunk (random_backbone=True); the loss is not "
                          "a perceptual metric", stacklevel=2)
        else:
            self._load_state(state, vgg_weights)
        self.requires_grad_(False)
        self.eval()

    def load_weights(self, path: str | os.PathLike) -> None:
        """Load a torchvision vgg16 or a full LPIPS state dict from a local file (strict on the trunk)."""
        self._load_state(_read_lpips_state(path), path)

    def _load_state(self, mapped: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
        own = self.lpips.state_dict()
        trunk = [k for k in own if k.startswith("net.")]
        missing = [k for k in trunk if k not in mapped]
        if missing:
            raise ValueError(f"{path}: VGG16 trunk incomplete, missing {missing[:6]} ({len(missing)} keys)")
        bad = [k for k in mapped if k not in own or own[k].shape != mapped[k].shape]
        if bad:
            raise ValueError(f"{path}: unexpected or mis-shaped keys {bad[:6]}")
        self.lpips.load_state_dict(mapped, strict=False)

    def train(self, mode: bool = True) -> "PerceptualLoss":
        """Always eval: a frozen metric, whose lpips heads hold dropout that must never switch on."""
        return super().train(False)

    def forward(self, rec: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """rec, target (B, 3, H, W) in [-1, 1] -> scalar LPIPS averaged over the batch (0 below min_size)."""
        if rec.shape != target.shape:
            raise ValueError(f"LPIPS inputs differ in shape: {tuple(rec.shape)} vs {tuple(target.shape)}")
        if min(rec.shape[-2:]) < self.min_size:
            return rec.new_zeros((), dtype=torch.float32)
        m = self.lpips
        with torch.autocast(device_type=rec.device.type, enabled=False):  # fp32, as in the release
            # The target's features without a graph: in one 2B batch with rec, the backward ran VGG16's input
            # gradients for the targets too (half of LPIPS's backward, thrown away) and kept their activations.
            with torch.no_grad():
                ref = [normalize_channels(f) for f in m.net(m.scaling_layer(target.float()))]
            total = rec.new_zeros((), dtype=torch.float32)
            for t, feats, lin in zip(ref, m.net(m.scaling_layer(rec.float())), m.lins):  # (B, C_l, H_l, W_l)
                total = total + lin((t - normalize_channels(feats)).square()).mean()
        return total
