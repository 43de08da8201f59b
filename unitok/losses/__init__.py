"""Stage-one losses: reconstruction, perceptual (LPIPS), adversarial (hinge, bCR, DiffAug), contrastive.

Each loss lives in its own file; the training task sums the named terms they return.
"""
from unitok.losses.adversarial import (DiffAug, GanSchedule, adaptive_weight, bcr_loss, discriminator_loss,
                                       gan_schedule, gaussian_blur, hinge_d_loss, hinge_g_loss)
from unitok.losses.contrastive import ContrastiveLoss
from unitok.losses.perceptual import PerceptualLoss
from unitok.losses.reconstruction import reconstruction_loss

__all__ = [
    "ContrastiveLoss", "DiffAug", "GanSchedule", "PerceptualLoss", "adaptive_weight", "bcr_loss",
    "discriminator_loss", "gan_schedule", "gaussian_blur", "hinge_d_loss", "hinge_g_loss",
    "reconstruction_loss",
]
