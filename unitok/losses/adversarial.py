"""Adversarial losses: hinge (D and G), DiffAug, fading blur, bCR, adaptive weight, GAN schedule.

REFERENCE.md 4.2, 4.4 and 4.5. Legend: B batch, H x W pixels, P discriminator logits per image.
    generator:      Lg = -mean(D(diffaug(rec, blur=fade)))               weighted by warm * 0.4 * w
                    w  = clamp(||grad Lnll|| / (||grad Lg|| + 1e-6), 0.015, 1e4)  at the decoder's last conv
    discriminator:  Ld = mean(relu(1 - D(aug(x)))) + mean(relu(1 + D(aug(sg(rec)))))
                       + 4.0 * (MSE(D(strong_aug(x)), D_real) + MSE(D(strong_aug(sg(rec))), D_fake))
`aug` = blur(fade) then DiffAug; `strong_aug` = DiffAug without blur (the release's bCR augment).
The bCR targets D_real / D_fake are NOT detached (release behaviour: both passes get gradients).
All randomness goes through an optional `torch.Generator`, so a test can replay an augmentation.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F


# ---- hinge and consistency ---------------------------------------------------------------
def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge: mean(relu(1 - D(real))) + mean(relu(1 + D(fake))). Logits (B, P)."""
    return F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean()


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator side of the hinge game: -mean(D(fake))."""
    return -logits_fake.mean()


def bcr_loss(logits_real_aug: torch.Tensor, logits_real: torch.Tensor, logits_fake_aug: torch.Tensor,
             logits_fake: torch.Tensor, weight: float = 4.0) -> torch.Tensor:
    """Balanced consistency regularisation: weight * (MSE(D(T(x)), D(x)) + MSE(D(T(G)), D(G)))."""
    return weight * (F.mse_loss(logits_real_aug, logits_real) + F.mse_loss(logits_fake_aug, logits_fake))


# ---- augmentation ------------------------------------------------------------------------
def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    if generator is None:
        return torch.rand(shape, device=device)
    # draw on the generator's own device so a CPU generator can drive CUDA tensors
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def gaussian_blur(x: torch.Tensor, fade: float) -> torch.Tensor:
    """Fading blur of the release: sigma = sqrt(H / 2) * fade, radius floor(3 sigma), reflect padding.

    x (B, C, H, W) -> same shape, fp32. Identity when the radius is below 1 (fade 0 included).
    The kernel is the release's exp2(-(t / sigma)^2) (separable, normalised), i.e. a Gaussian whose
    half width at half maximum is sigma; kept for parity with the released training.
    """
    x = x.float()
    if fade <= 0:
        return x
    H, W = x.shape[-2:]
    sigma = math.sqrt(H * 0.5) * fade
    radius = min(math.floor(sigma * 3), H - 1, W - 1)  # reflect padding needs radius < side
    if radius < 1:
        return x
    C = x.shape[1]
    t = torch.arange(-radius, radius + 1, dtype=torch.float32, device=x.device)
    k = torch.exp2(-(t / sigma).square())
    k = k / k.sum()  # (2r+1,)
    x = F.pad(x, [radius] * 4, mode="reflect")
    x = F.conv2d(x, k.view(1, 1, -1, 1).repeat(C, 1, 1, 1), groups=C)  # along H
    return F.conv2d(x, k.view(1, 1, 1, -1).repeat(C, 1, 1, 1), groups=C)  # along W


class DiffAug:
    """Differentiable augmentation (StyleGAN-T / the release), every op applied every call.

    translation +-`translation` of the side (zero fill), brightness +-0.5, saturation x[0, 2],
    contrast x[0.5, 1.5], cutout of a `cutout`-sided square set to 0. Optional fading blur first.
    """

    def __init__(self, translation: float = 0.125, cutout: float = 0.2):
        if not 0 <= translation < 1 or not 0 <= cutout < 1:
            raise ValueError(f"translation and cutout must be in [0, 1), got {translation}, {cutout}")
        self.translation, self.cutout = translation, cutout

    def __call__(self, x: torch.Tensor, blur_fade: float = 0.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """x (B, C, H, W) in [-1, 1] -> augmented (B, C, H, W), fp32."""
        if x.dim() != 4:
            raise ValueError(f"DiffAug expects (B, C, H, W), got {tuple(x.shape)}")
        x = gaussian_blur(x, blur_fade)
        B, _, H, W = x.shape
        dev = x.device
        r = _rand((7, B, 1, 1), generator, dev)  # one uniform per op and sample, as in the release

        # translation: out[h, w] = in[h + th, w + tw], zeros shifted in (via a 1-pixel zero border)
        dh, dw = round(H * self.translation), round(W * self.translation)
        th = (r[0] * (2 * dh + 1)).floor().long() - dh  # (B, 1, 1) in [-dh, dh]
        tw = (r[1] * (2 * dw + 1)).floor().long() - dw
        gb, gh, gw = torch.meshgrid(torch.arange(B, device=dev), torch.arange(H, device=dev),
                                    torch.arange(W, device=dev), indexing="ij")
        gh = (gh + th + 1).clamp(0, H + 1)
        gw = (gw + tw + 1).clamp(0, W + 1)
        x = F.pad(x, [1, 1, 1, 1]).permute(0, 2, 3, 1)[gb, gh, gw].permute(0, 3, 1, 2)

        # colour: brightness, saturation (around the channel mean), contrast (around the image mean)
        x = x + (r[2].unsqueeze(-1) - 0.5)
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * (r[3].unsqueeze(-1) * 2) + mean
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * (r[4].unsqueeze(-1) + 0.5) + mean

        # cutout: a ch x cw square centred at a uniform offset, zeroed
        ch, cw = round(H * self.cutout), round(W * self.cutout)
        if ch > 0 and cw > 0:
            oh = (r[5] * (H + (1 - ch % 2))).floor().long()
            ow = (r[6] * (W + (1 - cw % 2))).floor().long()
            gb, gh, gw = torch.meshgrid(torch.arange(B, device=dev), torch.arange(ch, device=dev),
                                        torch.arange(cw, device=dev), indexing="ij")
            gh = (gh + oh - ch // 2).clamp(0, H - 1)
            gw = (gw + ow - cw // 2).clamp(0, W - 1)
            mask = torch.ones(B, H, W, dtype=x.dtype, device=dev)
            mask[gb, gh, gw] = 0
            x = x * mask.unsqueeze(1)
        return x


# ---- weighting and schedule --------------------------------------------------------------
def adaptive_weight(nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    min_weight: float = 0.015, max_weight: float = 1e4) -> torch.Tensor:
    """clamp(||d nll / d W|| / (||d g / d W|| + 1e-6), min, max), detached; W = decoder's last weight.

    Both gradients keep the graph (retain_graph=True) because the caller back-propagates the
    weighted sum afterwards. A g_loss that does not reach W counts as a zero gradient.
    """
    g_nll = torch.autograd.grad(nll_loss, last_layer, retain_graph=True, allow_unused=True)[0]
    g_adv = torch.autograd.grad(g_loss, last_layer, retain_graph=True, allow_unused=True)[0]
    n_nll = g_nll.norm() if g_nll is not None else last_layer.new_zeros(())
    n_adv = g_adv.norm() if g_adv is not None else last_layer.new_zeros(())
    return (n_nll / (n_adv + 1e-6)).clamp(min_weight, max_weight).detach()


class GanSchedule(NamedTuple):
    """Where the GAN stands at one iteration."""

    active: bool  # it >= disc_start: run the discriminator step and the generator's GAN term
    warm: float  # linear warmup of the generator's GAN weight, 0 -> 1 over warmup_frac * iters
    fade: float  # blur fade, 1 -> 0 over 2 * warmup_frac * iters (1 before the start)


def gan_schedule(it: int, total_iters: int, start_frac: float = 0.375,
                 warmup_frac: float = 0.03) -> GanSchedule:
    """REFERENCE 4.5: start = start_frac * iters; warm = min(1, (it - start) / (warmup_frac * iters));
    fade = 1 - min(1, (it - start) / (2 * warmup_frac * iters)). Values below 1e-6 snap to 0."""
    if total_iters <= 0 or not 0 <= start_frac <= 1 or warmup_frac < 0:
        raise ValueError(f"bad GAN schedule: total_iters={total_iters}, start_frac={start_frac}, "
                         f"warmup_frac={warmup_frac}")
    start = start_frac * total_iters
    if it < start:
        return GanSchedule(False, 0.0, 1.0)
    warm_iters = max(warmup_frac * total_iters, 1.0)  # the release guards with max(., 1) too
    done = it - start
    warm = min(1.0, done / warm_iters)
    fade = 1.0 - min(1.0, done / (2 * warm_iters))
    return GanSchedule(True, warm if warm >= 1e-6 else 0.0, fade if fade >= 1e-6 else 0.0)


def discriminator_loss(disc: Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor, fake: torch.Tensor,
                       diffaug: DiffAug, fade: float, bcr_weight: float = 4.0,
                       generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """One discriminator step's loss (hinge + bCR) on real and reconstructed images (B, 3, H, W).

    `fake` is detached here. Returns {"hinge", "bcr", "total", "acc_real", "acc_fake"}; the accuracies
    (percent of logits on the right side of 0) are for logging only.
    """
    fake = fake.detach()
    logits_real = disc(diffaug(real, fade, generator)).float()  # (B, P)
    logits_fake = disc(diffaug(fake, fade, generator)).float()
    hinge = hinge_d_loss(logits_real, logits_fake)
    if bcr_weight > 0:
        bcr = bcr_loss(disc(diffaug(real, 0.0, generator)).float(), logits_real,
                       disc(diffaug(fake, 0.0, generator)).float(), logits_fake, bcr_weight)
    else:
        bcr = hinge.new_zeros(())
    return {
        "hinge": hinge,
        "bcr": bcr,
        "total": hinge + bcr,
        "acc_real": (logits_real.detach() > 0).float().mean() * 100,
        "acc_fake": (logits_fake.detach() < 0).float().mean() * 100,
    }
