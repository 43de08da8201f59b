"""Stage one: train the UniTok tokenizer with DeepSpeed (two engines: tokenizer and discriminator).

    deepspeed --num_gpus 8 -m unitok.train --preset large --data.shards '/data/{00000..01000}.tar' \
        --total-steps 78125 --run-dir runs/unitok
    (or launch/tokenizer.sh ...; torchrun works too; on CPU set DS_ACCELERATOR=cpu)

Per step (REFERENCE.md 4.2-4.7):
    generator:     0.2 L1 + 1.0 L2 + 1.0 LPIPS + VQ + CLIP  [+ 0.4 * warm * adaptive_w * hinge_G  after the GAN starts]
    discriminator: hinge + 4.0 bCR on DiffAug(real) / DiffAug(sg(rec)) with the fading blur (after the GAN starts)
AdamW (0.9, 0.95), wd 0.02 with the release's no-decay rule, warmup then cosine to 0.1x, clip 10,
logit scale clamped to [0, ln 100] after every step. Checkpoints follow runtime/checkpoint.py;
`--resume auto` continues exactly (model, optimizers, schedulers, data position, RNG).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from runtime.cli import strip_launcher_args
from runtime.loop import RunConfig, StopRun, Task, finite_everywhere, run
from runtime.optim import OptimConfig
from unitok.config import UniTokConfig, preset
from unitok.data import DataConfig, ImageTextLoader


@dataclass
class GanConfig:
    """Discriminator (frozen DINOv2-S + trainable heads) and the GAN schedule."""

    enabled: bool = True
    """Train with the adversarial loss at all."""
    dino_weights: str | None = None
    """Local `dinov2_vits14_pretrain.pth` (official layout). Required unless random_backbone."""
    random_backbone: bool = False
    """Random DINOv2 backbone (tests and the demo only; one warning)."""
    backbone: Literal["vits14", "debug"] = "vits14"
    """DINOv2 size: the release's ViT-S/14, or a tiny one for CPU tests."""
    lr: float = 2e-5
    """Discriminator peak learning rate."""
    betas: tuple[float, float] = (0.5, 0.9)
    """Discriminator AdamW betas."""
    weight_decay: float = 0.2
    """Discriminator weight decay."""
    start_frac: float = 0.375
    """GAN starts at this fraction of training."""
    warmup_frac: float = 0.03
    """Warmup of the generator's GAN weight (and half the blur fade), fraction of training."""
    weight: float = 0.4
    """Generator GAN weight (times warmup and the adaptive weight)."""
    bcr: float = 4.0
    """Balanced consistency regularisation weight."""


@dataclass
class LossConfig:
    """Generator loss weights and the perceptual network."""

    l1: float = 0.2
    """L1 reconstruction weight."""
    l2: float = 1.0
    """MSE reconstruction weight."""
    lpips: float = 1.0
    """LPIPS weight (applied only at image sides >= 48)."""
    vq: float = 1.0
    """Quantizer loss weight (commitment beta is inside)."""
    clip: float = 1.0
    """Contrastive loss weight."""
    lpips_weights: str | None = None
    """Local VGG16 (torchvision) or LPIPS state dict. Required unless lpips_random_backbone or lpips=0."""
    lpips_random_backbone: bool = False
    """Random VGG trunk (tests and the demo only; one warning)."""


def _tokenizer_optim() -> OptimConfig:
    return OptimConfig(lr=5e-4, betas=(0.9, 0.95), weight_decay=0.02, eps=1e-6, warmup_frac=0.01, end_ratio=0.1,
                       grad_clip=10.0)


@dataclass
class TrainConfig(RunConfig):
    """A tokenizer training run (the shared run flags are runtime/loop.py's RunConfig)."""

    run_dir: str = "runs/unitok"
    """Output folder: config.json, log, metrics.jsonl, checkpoints, images, export."""
    preset: str = "large"
    """Model preset (debug, small, base, large); `--model.*` overrides it."""
    model: UniTokConfig = field(default_factory=UniTokConfig)
    """Tokenizer architecture."""
    data: DataConfig = field(default_factory=DataConfig)
    """Image-text shards (local_batch_size is the micro batch per rank)."""
    optim: OptimConfig = field(default_factory=_tokenizer_optim)
    """Tokenizer optimizer (no weight decay on 1-D tensors, norms, biases, the logit scale)."""
    gan: GanConfig = field(default_factory=GanConfig)
    """Discriminator and GAN schedule."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Generator loss weights."""
    num_decode: int = 0
    """Images per micro batch that are decoded for the pixel losses (0 = all; the release decodes all). With no
    pixel loss and no GAN on (contrastive-only training) none is decoded; with --loss.clip 0 the text tower is
    not run."""
    image_every: int = 0
    """Steps between PNG grids of originals and reconstructions (0 = only at the end; none without decoding)."""
    clip_init: str | None = None
    """Local open_clip checkpoint whose visual trunk and text tower initialise the model (the paper's
    CLIP-init variant); random init when unset."""

    @staticmethod
    def stream_flags(config):
        d = config["data"]
        return {"--seed": config["seed"], "--data.local-batch-size": d["local_batch_size"],
                "--data.num-workers": max(1, d["num_workers"]),  # (0 loads in one process: a stream like 1's)
                "--data.train": d["train"], "--data.num-batches-per-epoch": d["num_batches_per_epoch"]}

    def __post_init__(self):
        super().__post_init__()
        if self.data.seed not in (0, self.seed):  # one seed: the data's is --seed's (it was silently replaced)
            raise ValueError(f"--data.seed {self.data.seed}: the trainer seeds its data from --seed; give --seed")
        self.data.seed = self.seed
        if self.num_decode < 0 or self.image_every < 0:
            raise ValueError("num_decode and image_every must be >= 0")
        if self.data.img_size % 16:
            raise ValueError(f"data.img_size={self.data.img_size} must be a multiple of 16")
        if self.data.context_length != self.model.text.context_length:
            raise ValueError(f"data.context_length={self.data.context_length} differs from "
                             f"model.text.context_length={self.model.text.context_length}")

    def validate_inputs(self) -> None:
        """Checks that need the final overrides (called once parsing is done, before any engine starts)."""
        if self.loss.lpips > 0 and self.loss.lpips_weights is None and not self.loss.lpips_random_backbone:
            raise ValueError("loss.lpips > 0 needs --loss.lpips-weights FILE (or --loss.lpips-random-backbone "
                             "for tests), or set --loss.lpips 0")
        if self.gan.enabled and self.gan.dino_weights is None and not self.gan.random_backbone:
            raise ValueError("the GAN needs --gan.dino-weights FILE (or --gan.random-backbone for tests), "
                             "or --gan.no-enabled")
        if self.optim.lr is None:
            raise ValueError("--optim.lr must be given")
        from runtime.ds_config import read_ds_config
        from runtime.weights import fetch_hint

        path, ds = read_ds_config(self.ds_config)
        if ds.get("zero_optimization", {}).get("stage", 0) == 3:
            raise ValueError(f"--ds-config {self.ds_config} ({path}) is ZeRO-3: the tokenizer trains with ZeRO "
                             "0-2 (zero2). ZeRO-3 partitions the parameters that its logit-scale clamp, the GAN's "
                             "adaptive weight and the export read whole")

        for flag, path, entry in (("--loss.lpips-weights", self.loss.lpips_weights, "lpips-vgg16"),
                                  ("--gan.dino-weights", self.gan.dino_weights, "dinov2-vits14"),
                                  ("--clip-init", self.clip_init, "vitamin-l-256")):
            if path is not None and not Path(path).is_file():
                raise FileNotFoundError(f"{flag}: file not found: {path}; {fetch_hint(entry)}")


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """`--preset NAME` picks the model defaults; everything else is a tyro override."""
    import tyro

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="large")
    known, rest = pre.parse_known_args(strip_launcher_args(argv))
    model = preset(known.preset)
    data = DataConfig(img_size=model.img_size, context_length=model.text.context_length)
    default = TrainConfig(preset=known.preset, model=model, data=data)
    cfg = tyro.cli(TrainConfig, default=default, args=rest)
    cfg.validate_inputs()
    return cfg


def disc_lr_lambda(cfg: TrainConfig, gan_total: int):
    """The discriminator's lr multiplier per discriminator step: warmup and cosine from the GAN's start (a fraction
    of `gan_total`, the total the GAN's schedule was set by) to `cfg.total_steps`."""
    from runtime.optim import warmup_cosine

    start = int(cfg.gan.start_frac * gan_total)
    d_total, d_warm = max(1, cfg.total_steps - start), int(cfg.gan.warmup_frac * gan_total)
    return lambda s: warmup_cosine(s, d_total, d_warm, cfg.optim.end_ratio)


# ---- the task ----------------------------------------------------------------------------------
class TokenizerTask(Task):
    """The tokenizer engine, the discriminator engine and the losses, driven by runtime/loop.py."""

    project = "unitok"

    def __init__(self, cfg: TrainConfig, engine, disc_engine, perceptual, contrastive, diffaug, loader=None):
        self.cfg, self.engine, self.disc_engine, self.loader = cfg, engine, disc_engine, loader
        self.engines = {"tokenizer": engine, **({"disc": disc_engine} if disc_engine is not None else {})}
        self.perceptual, self.contrastive, self.diffaug = perceptual, contrastive, diffaug
        from runtime.ds_config import resolve_precision

        self.bf16 = resolve_precision(cfg.precision) == "bf16"
        self.gan_total = cfg.total_steps  # the total the GAN's start and warmup are fractions of (see load_checkpoint)
        # A part whose output no loss reads is not run: the decoder when no pixel loss and no GAN is on
        # (contrastive-only training), the text tower when the contrastive weight is 0 (reconstruction only).
        # The encoder's gradients are the same either way (those losses contributed exact zeros to them); the
        # skipped part gets no gradient, so it stays as initialised up to weight decay, and unused.
        c = cfg.loss
        self.decodes = c.l1 > 0 or c.l2 > 0 or (c.lpips > 0 and perceptual is not None) or disc_engine is not None
        self.uses_text = c.clip > 0
        self._last_conv_input: torch.Tensor | None = None
        self._usage: list[torch.Tensor] = []  # per-codebook usage of this step's trained micro batches
        # The GAN's randomness (DiffAug, discriminator crops) has its own generator, saved with each
        # checkpoint: library code (e.g. a DataLoader iterator) also draws from the global RNG, and a
        # resumed run must replay exactly the same augmentations.
        self.rng = torch.Generator(device=engine.device).manual_seed(cfg.seed + engine.global_rank)
        last_conv = self.model.decoder.up_conv4.conv2
        last_conv.register_forward_hook(lambda m, i, o: setattr(self, "_last_conv_input", i[0].detach()))

    def adaptive_weight(self, nll: torch.Tensor, g: torch.Tensor, rec: torch.Tensor) -> torch.Tensor:
        """||dL_nll/dW|| / (||dL_g/dW|| + 1e-6) at the decoder's last conv W, clamped to [0.015, 1e4].

        Computed from d(loss)/d(rec) and the conv's saved input with `conv2d_weight` instead of
        `autograd.grad(loss, W)`: DeepSpeed 0.19 hooks every engine parameter's gradient and runs
        its reduction epilogue when such a hook fires, so a side gradient w.r.t. an engine
        parameter corrupts the next real backward. The value is the same.
        """
        return self._adaptive_weight(self.rec_grads(nll, g, rec))

    def _adaptive_weight(self, rec_grads: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        conv = self.model.decoder.up_conv4.conv2
        norms = []
        for g_out in rec_grads:
            gw = torch.nn.grad.conv2d_weight(self._last_conv_input.float(), conv.weight.shape, g_out,
                                             stride=conv.stride, padding=conv.padding)
            norms.append(gw.norm())
        return (norms[0] / (norms[1] + 1e-6)).clamp(0.015, 1e4).detach()

    @staticmethod
    def rec_grads(nll: torch.Tensor, g: torch.Tensor, rec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(dL_nll/d rec, dL_g/d rec) in fp32. Their graphs above rec are freed (the model's below it is kept):
        the objective's backward reuses these gradients instead of running LPIPS and the discriminator again."""
        return tuple(torch.autograd.grad(loss, rec)[0].float() for loss in (nll, g))

    @property
    def model(self):
        return self.engine.module

    def autocast(self):
        """bf16 autocast when the run uses bf16 (`--precision`, resolved once at start-up), else a no-op."""
        return torch.autocast(self.engine.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def gan_state(self, step: int):
        from unitok.losses import gan_schedule

        if self.disc_engine is None:
            return None
        return gan_schedule(step, self.gan_total, self.cfg.gan.start_frac, self.cfg.gan.warmup_frac)

    def generator_losses(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        """Forward the tokenizer; return loss terms (scalars), "loss" (the objective), and "rec"
        (detached images) and "codebook_usage"."""
        from unitok.losses import hinge_g_loss, reconstruction_loss

        c = self.cfg.loss
        images, texts = batch["images"], batch["texts"]
        n = (self.cfg.num_decode or images.shape[0]) if self.decodes else 0
        # The module is called directly, not through `engine(...)`: DeepSpeed 0.19 hooks the engine's
        # forward outputs and runs its gradient-reduction epilogue on ANY backward through them,
        # including the side gradients of the adaptive GAN weight. engine.backward() below still
        # drives the real backward and reduction.
        with self.autocast():
            out = self.model(images, texts if self.uses_text else None, n)
        target, rec = images[:n], out["img_rec"]
        terms, nll = {}, 0.0
        if rec is not None:
            terms = reconstruction_loss(rec, target, c.l1, c.l2)
            nll = terms.pop("rec")
        if c.lpips > 0 and self.perceptual is not None:
            terms["lpips"] = self.perceptual(rec, target)
            nll = nll + c.lpips * terms["lpips"]
        terms["vq"] = out["vq_loss"]
        rest = c.vq * terms["vq"]  # the terms that do not go through rec
        if self.uses_text:
            terms["clip"] = self.contrastive(out["clip_image_features"], out["clip_text_features"],
                                             out["logit_scale"])
            rest = rest + c.clip * terms["clip"]
        if self.cfg.model.quantizer.entropy_weight > 0:
            terms["entropy"] = out["entropy_loss"]
            rest = rest + self.cfg.model.quantizer.entropy_weight * terms["entropy"]
        total = objective = nll + rest
        gs = self.gan_state(step)
        if gs is not None and gs.active:
            disc = self.disc_engine.module
            disc.requires_grad_(False)  # the generator pass must not touch the discriminator's grads
            logits = disc(self.diffaug(rec, gs.fade, self.rng), generator=self.rng)
            disc.requires_grad_(True)
            terms["g"] = hinge_g_loss(logits.float())
            g_nll, g_adv = self.rec_grads(nll, terms["g"], rec)
            terms["g_weight"] = self._adaptive_weight((g_nll, g_adv)) * gs.warm * self.cfg.gan.weight
            total = (total + terms["g_weight"] * terms["g"]).detach()
            # nll and g reach the model through rec only, and their gradients there are computed for the weight:
            # this objective has the same gradient without a second backward through LPIPS's VGG16 and the
            # discriminator's backbone (about 5% of a GAN step's compute at 256 px).
            objective = rest + (rec.float() * (g_nll + terms["g_weight"] * g_adv)).sum()
        terms["loss"] = total
        terms["usage"] = out["codebook_usage"].mean()
        terms["logit_scale"] = out["logit_scale"].detach()
        return {**terms, "_objective": objective, "rec": None if rec is None else rec.detach(),
                "codebook_usage": out["codebook_usage"].detach()}

    def discriminator_losses(self, images: torch.Tensor, rec: torch.Tensor, step: int):
        """hinge + bCR on real and (detached) reconstructed images, after the GAN start; else {}."""
        from unitok.losses import discriminator_loss

        gs = self.gan_state(step)
        if gs is None or not gs.active:
            return {}
        real = images[: rec.shape[0]]
        return discriminator_loss(lambda x: self.disc_engine(x, generator=self.rng), real, rec, self.diffaug,
                                  gs.fade, self.cfg.gan.bcr, generator=self.rng)

    # ---- the loop's interface (runtime/loop.py) ----
    def forward(self, batch, step):
        # The loader's tensors are on the CPU (pinned); the model is on the engine's device. "images" goes on in
        # the output for the discriminator's step (backward).
        batch = {k: v.to(self.engine.device, non_blocking=True) for k, v in batch.items()}
        self._usage_before = self.model.quantizer.usage_state()  # the forward updates the usage EMA (see discard)
        return {**self.generator_losses(batch, step), "images": batch["images"]}

    def discard(self, out):
        """A dropped micro batch's codes leave the usage EMA as it was (it counted micro batches that trained none)."""
        self.model.quantizer.load_usage_state(self._usage_before)

    def backward(self, out, batch, step):
        """Generator update, then the discriminator's on the same micro batch (after the GAN start)."""
        self.engine.backward(out["_objective"])
        self.engine.step()
        self._usage.append(out["codebook_usage"])
        disc = self.discriminator_losses(out["images"], out["rec"], step)
        if not disc:
            return {}
        if not finite_everywhere(disc["total"]):
            if self.cfg.nan_policy == "stop":
                raise StopRun(f"step {step + 1}: non-finite discriminator loss {float(disc['total'])}")
            from runtime.log import get_logger

            get_logger().warning(f"step {step + 1}: non-finite discriminator loss {float(disc['total'])}; this micro "
                                 "batch adds nothing to the discriminator's step")
            # a zero loss on its parameters instead: the discriminator engine still counts the micro batch, so
            # its accumulation boundary stays the generator's (skipping it put every later step out of line)
            zero = sum(p.sum() for p in self.disc_engine.module.parameters() if p.requires_grad) * 0.0
            self.disc_engine.backward(zero)
            self.disc_engine.step()
            return {}
        self.disc_engine.backward(disc["total"])
        self.disc_engine.step()
        return {f"d_{'loss' if k == 'total' else k}": v for k, v in disc.items()}

    def count(self, batch):
        return batch["images"].shape[0], 0

    def batch_hash(self, batch):
        return hashlib.sha1(batch["texts"].cpu().numpy().tobytes()).hexdigest()[:12]

    def after_step(self, step, record, batch, out):
        from runtime.checkpoint import step_name
        from runtime.distributed import is_main_process

        self.model.clamp_logit_scale()
        # the mean over the step's trained micro batches, as `usage` is (it was the last micro batch's alone)
        record["usage_per_codebook"] = [round(u, 3) for u in torch.stack(self._usage).mean(0).tolist()]
        self._usage.clear()
        self._last = (out["images"], out["rec"])
        if self.cfg.image_every and step % self.cfg.image_every == 0 and self.decodes and is_main_process():
            save_grid(Path(self.cfg.run_dir) / "images" / f"{step_name(step)}.png", *self._last)

    def data_stats(self):
        """Every rank's skip counters, summed (a collective: all ranks call it at the same steps; only
        rank 0 logs, and its own counters are its shards' only)."""
        from runtime.distributed import get_world_size
        from unitok.data import SkipStats

        if get_world_size() == 1:
            return self.loader.stats
        gathered: list = [None] * get_world_size()
        torch.distributed.all_gather_object(gathered, self.loader.stats.as_dict())
        total = SkipStats()
        for counts in gathered:
            total.add(counts)
        return total

    def on_log(self, step, record, tokens_per_s):
        stats = self.data_stats()
        record["data"] = stats.as_dict()  # metrics.jsonl: counts by reason, all ranks, since the run's start
        return f" | skipped samples (all ranks) {stats.skipped_line()}", {
            f"skipped/{k}": v for k, v in stats.counts.items() if k != "samples"}

    def state_dict(self):
        # usage_steps is not in the weights (the released ones have none), but it sets the usage EMA's
        # decay and whether the next step overwrites it: a resume must continue it, not restart at 0
        return {"gan_rng": self.rng.get_state(), "usage_steps": int(self.model.quantizer.usage_steps),
                "gan_total": self.gan_total}

    def load_checkpoint(self, ckpt, rank_state, step, log):
        """As the loop's; a run resumed with another --total-steps after its GAN started keeps the GAN's start and
        warmup where they were (as fractions of the new total they would move, and could switch it off again:
        a 78k-step run extended to 100k at step 30k would drop the GAN for about 7500 steps)."""
        exact = super().load_checkpoint(ckpt, rank_state, step, log)
        g, was = self.cfg.gan, (rank_state.get("task") or {}).get("gan_total")
        if exact and self.disc_engine is not None and was is not None and was != self.cfg.total_steps:
            from unitok.losses import gan_schedule

            now = gan_schedule(step, self.cfg.total_steps, g.start_frac, g.warmup_frac).active
            if gan_schedule(step, was, g.start_frac, g.warmup_frac).active:
                self.gan_total = was
                start = int(g.start_frac * was)
                sched = self.disc_engine.lr_scheduler  # (one lambda per parameter group)
                sched.lr_lambdas = [disc_lr_lambda(self.cfg, was)] * len(sched.lr_lambdas)
                log.warning(f"the GAN started at step {start} ({g.start_frac:g} of the first {was} steps) and keeps "
                            f"that start and its warmup; its learning rate decays to step {self.cfg.total_steps}"
                            + ("" if now else f" (as a fraction of {self.cfg.total_steps} steps it would be off "
                                              f"until step {int(g.start_frac * self.cfg.total_steps)})"))
        return exact

    def load_state_dict(self, state):
        self.rng.set_state(state["gan_rng"])
        if "usage_steps" in state:  # (checkpoints of older versions: the EMA restarts, as it did)
            self.model.quantizer.usage_steps = int(state["usage_steps"])

    def finish(self, run_dir, ckpts, trained, log):
        from runtime.distributed import is_main_process

        stats = self.data_stats()
        if not is_main_process():
            return
        if trained and self.decodes:
            save_grid(run_dir / "images" / "final.png", *self._last)
        if self.cfg.export:
            self.model.save_pretrained(run_dir / "export")
            log.info(f"exported {run_dir / 'export'}")
        log.info(f"data (all ranks): {stats}")


# ---- building ----------------------------------------------------------------------------------
# Model tensors that --clip-init may leave at their own init: open_clip's ViTamin pools with `fc_norm` where our
# encoder has `norm`, and its `pos_embed` (skipped below) is for another grid. The release's CLIP-init has the
# same three gaps; any other encoder / text tower tensor that stays random is an error.
CLIP_INIT_GAPS = ("encoder.norm.weight", "encoder.norm.bias", "encoder.pos_embed")


def load_clip_init(model, path: str, log) -> None:
    """The CLIP-init variant: `visual.trunk.*` -> `encoder.*`, `text.*` -> `text_encoder.*`. Every encoder and
    text tower tensor must come from the checkpoint with the model's shape, except CLIP_INIT_GAPS: a checkpoint
    of another architecture (e.g. a wider text tower) raises instead of silently training a half-random tower."""
    if not Path(path).is_file():
        from runtime.weights import fetch_hint

        raise FileNotFoundError(f"open_clip checkpoint for --clip-init not found: {path}; "
                                f"{fetch_hint('vitamin-l-256')}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    mapped = {}
    for k, v in state.items():
        k = k.removeprefix("module.")
        if "head" in k or "pos_embed" in k:
            continue
        if k.startswith("visual.trunk."):
            mapped["encoder." + k[len("visual.trunk."):]] = v
        elif k.startswith("text."):
            mapped["text_encoder." + k[len("text."):]] = v
    own = model.state_dict()
    usable = {k: v for k, v in mapped.items() if k in own and own[k].shape == v.shape}
    mismatched = [f"{k} {tuple(v.shape)} vs the model's {tuple(own[k].shape)}" for k, v in mapped.items()
                  if k in own and own[k].shape != v.shape]
    unfilled = [k for k in own if k.startswith(("encoder.", "text_encoder.")) and k not in mapped
                and k not in CLIP_INIT_GAPS]
    if mismatched or unfilled:
        problems = []
        if mismatched:
            problems.append(f"{len(mismatched)} tensors have another shape (e.g. {'; '.join(mismatched[:3])})")
        if unfilled:
            problems.append(f"{len(unfilled)} encoder/text tower tensors of the model are not in it "
                            f"(e.g. {', '.join(unfilled[:5])})")
        raise ValueError(f"--clip-init {path} does not fit the model's architecture: {'; '.join(problems)}; "
                         f"{len(usable)} of {len(mapped)} visual.trunk.* / text.* tensors match. Give the open_clip "
                         "checkpoint of the same architecture (ViTamin-L-256 for --preset large)")
    extra = sorted(set(mapped) - set(usable))  # e.g. ViTamin's fc_norm, which our encoder has no use for
    model.load_state_dict(usable, strict=False)
    log.info(f"clip init: loaded {len(usable)} tensors from {path}; not in the model: {len(extra)} "
             f"{extra[:5]}; left at init: {[k for k in CLIP_INIT_GAPS if k in own]}")


def build(cfg: TrainConfig, info, log):
    """Model, discriminator, losses and the two DeepSpeed engines."""
    import deepspeed

    from runtime.compile import compile_blocks, refuse_with_zero3
    from runtime.ds_config import load_ds_config, resolve_precision
    from runtime.optim import lambda_scheduler, param_groups
    from unitok.losses import ContrastiveLoss, DiffAug, PerceptualLoss
    from unitok.models.discriminator import DinoDiscriminator
    from unitok.models.unitok import BLOCK_TYPES, UniTok

    model = UniTok(cfg.model)
    if cfg.clip_init:
        load_clip_init(model, cfg.clip_init, log)
    n_params = sum(p.numel() for p in model.parameters())
    log.info(f"tokenizer: {n_params / 1e6:.2f}M parameters, preset {cfg.preset}")
    # bf16 for the tokenizer means fp32 weights under a bf16 autocast forward (its quantizer path must
    # see fp32 weights), which DeepSpeed calls torch_autocast.
    precision = "autocast" if resolve_precision(cfg.precision) == "bf16" else "fp32"
    log.info("precision: " + ("bf16 autocast forward, fp32 weights and quantizer" if precision == "autocast"
                              else "fp32"))
    ds = load_ds_config(cfg.ds_config, micro_batch=cfg.data.local_batch_size, grad_accum=cfg.grad_accum,
                        world_size=info.world_size, grad_clip=cfg.optim.grad_clip, precision=precision)
    refuse_with_zero3(cfg.compile, ds)
    if cfg.compile:
        log.info(f"compile: {compile_blocks(model, static=BLOCK_TYPES, backend=cfg.compile)} blocks ({cfg.compile})")
    o = cfg.optim
    opt = o.adamw(param_groups(model, o.weight_decay))
    log.info("optimizer: " + o.summary())
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=o.schedule(opt, cfg.total_steps),
                                           config=ds)
    disc_engine = None
    if cfg.gan.enabled:
        g = cfg.gan
        disc = DinoDiscriminator(g.dino_weights, random_backbone=g.random_backbone, backbone=g.backbone)
        disc.backbone.to(info.device)
        d_opt = o.adamw(param_groups(disc, g.weight_decay), lr=g.lr, betas=g.betas)
        d_sched = lambda_scheduler(d_opt, disc_lr_lambda(cfg, cfg.total_steps))
        d_ds = load_ds_config(cfg.ds_config, micro_batch=cfg.data.local_batch_size, grad_accum=cfg.grad_accum,
                              world_size=info.world_size, grad_clip=o.grad_clip, precision=precision)
        disc_engine, _, _, _ = deepspeed.initialize(model=disc, optimizer=d_opt, lr_scheduler=d_sched, config=d_ds)
    perceptual = None
    if cfg.loss.lpips > 0:
        perceptual = PerceptualLoss(cfg.loss.lpips_weights, random_backbone=cfg.loss.lpips_random_backbone)
        perceptual.to(info.device)
    loader = ImageTextLoader(cfg.data, rank=info.rank, world_size=info.world_size)
    return TokenizerTask(cfg, engine, disc_engine, perceptual, ContrastiveLoss(), DiffAug(), loader)


# ---- the run -----------------------------------------------------------------------------------
def save_grid(path: Path, images: torch.Tensor, rec: torch.Tensor, n: int = 8) -> None:
    """Originals (top row) over reconstructions (bottom row)."""
    from torchvision.utils import save_image

    n = min(n, images.shape[0], rec.shape[0])
    grid = torch.cat([images[:n], rec[:n]]).float().clamp(-1, 1) * 0.5 + 0.5
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid.cpu(), path, nrow=n)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) training; returns the last step's record."""
    return run(cfg, build)


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    train(parse_config(argv))


if __name__ == "__main__":
    main()
