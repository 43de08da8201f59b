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
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from unitok.config import UniTokConfig, preset
from unitok.data import DataConfig, ImageTextLoader


@dataclass
class OptimConfig:
    """Tokenizer optimizer and schedule."""

    lr: float = 5e-4
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    weight_decay: float = 0.02
    """AdamW weight decay (not on 1-D tensors, norms, biases, logit scale)."""
    eps: float = 1e-6
    """AdamW epsilon."""
    warmup_frac: float = 0.01
    """Linear warmup as a fraction of total steps."""
    end_ratio: float = 0.1
    """Final LR as a fraction of the peak (cosine)."""
    grad_clip: float = 10.0
    """Max gradient norm."""


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


@dataclass
class DebugConfig:
    """Fault injection for the reliability tests (all off by default)."""

    kill_at_step: int = -1
    """SIGKILL this process right after finishing this step (and its checkpoint, if one is due)."""
    kill_during_save: bool = False
    """With kill_at_step: SIGKILL in the middle of that step's checkpoint instead (before it is complete)."""
    nan_at_step: int = -1
    """Make the generator loss NaN on the first micro batch of this step (tests the NaN guard)."""


@dataclass
class TrainConfig:
    """A tokenizer training run."""

    run_dir: str = "runs/unitok"
    """Output folder: checkpoints, logs, images, export."""
    preset: str = "large"
    """Model preset (debug, small, base, large); `--model.*` overrides it."""
    model: UniTokConfig = field(default_factory=UniTokConfig)
    """Tokenizer architecture."""
    data: DataConfig = field(default_factory=DataConfig)
    """Image-text shards (local_batch_size is the micro batch per rank)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Tokenizer optimizer."""
    gan: GanConfig = field(default_factory=GanConfig)
    """Discriminator and GAN schedule."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Generator loss weights."""
    total_steps: int = 1000
    """Optimizer steps of the whole run."""
    grad_accum: int = 1
    """Micro batches per optimizer step."""
    num_decode: int = 0
    """Images per micro batch that are decoded for the pixel losses (0 = all; the release decodes all)."""
    ds_config: str = "zero2"
    """DeepSpeed config name in ds_configs/ or a path (ZeRO/offload only)."""
    precision: Literal["auto", "autocast", "fp32"] = "auto"
    """auto: bf16 autocast on GPU, fp32 on CPU."""
    seed: int = 0
    """Base seed (each rank uses seed + rank)."""
    resume: str = "auto"
    """auto (latest checkpoint in run_dir, if any), none, or a checkpoint folder."""
    save_every: int = 500
    """Checkpoint every N steps (and at the end)."""
    keep_last: int = 3
    """Checkpoints kept."""
    log_every: int = 10
    """Steps between log lines."""
    image_every: int = 0
    """Steps between PNG grids of originals and reconstructions (0 = only at the end)."""
    nan_policy: Literal["skip", "stop"] = "skip"
    """On a non-finite loss: skip the step (all ranks) or stop the run (exit code 3)."""
    clip_init: str | None = None
    """Local open_clip checkpoint whose visual trunk and text tower initialise the model (the paper's
    CLIP-init variant); random init when unset."""
    metrics: Literal["none", "tensorboard", "wandb"] = "none"
    """Metrics sink (wandb honours WANDB_MODE=offline)."""
    export: bool = True
    """Write run_dir/export (config.json + model.safetensors) at the end."""
    debug: DebugConfig = field(default_factory=DebugConfig)
    """Fault injection for tests."""

    def __post_init__(self):
        for name in ("total_steps", "grad_accum", "save_every", "keep_last", "log_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
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
        for path in (self.loss.lpips_weights, self.gan.dino_weights, self.clip_init):
            if path is not None and not Path(path).is_file():
                raise FileNotFoundError(f"file not found: {path}")


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """`--preset NAME` picks the model defaults; everything else is a tyro override."""
    import tyro

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="large")
    pre.add_argument("--local_rank", "--local-rank", type=int)  # added by the deepspeed launcher; env has it
    known, rest = pre.parse_known_args(argv)
    model = preset(known.preset)
    data = DataConfig(img_size=model.img_size, context_length=model.text.context_length)
    default = TrainConfig(preset=known.preset, model=model, data=data)
    cfg = tyro.cli(TrainConfig, default=default, args=rest)
    cfg.validate_inputs()
    return cfg


# ---- the task ----------------------------------------------------------------------------------
class TokenizerTask:
    """Holds the tokenizer engine, the discriminator engine and the losses; returns named terms."""

    def __init__(self, cfg: TrainConfig, engine, disc_engine, perceptual, contrastive, diffaug):
        self.cfg, self.engine, self.disc_engine = cfg, engine, disc_engine
        self.perceptual, self.contrastive, self.diffaug = perceptual, contrastive, diffaug
        self._last_conv_input: torch.Tensor | None = None
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
        conv = self.model.decoder.up_conv4.conv2
        norms = []
        for loss in (nll, g):
            (g_out,) = torch.autograd.grad(loss, rec, retain_graph=True)
            h = self._last_conv_input
            gw = torch.nn.grad.conv2d_weight(h.float(), conv.weight.shape, g_out.float(), stride=conv.stride,
                                             padding=conv.padding)
            norms.append(gw.norm())
        return (norms[0] / (norms[1] + 1e-6)).clamp(0.015, 1e4).detach()

    @property
    def model(self):
        return self.engine.module

    def autocast(self):
        """bf16 autocast when the run uses it (GPU), else a no-op context."""
        on = self.cfg.precision != "fp32" and torch.cuda.is_available()
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=on)

    def gan_state(self, step: int):
        from unitok.losses import gan_schedule

        if self.disc_engine is None:
            return None
        return gan_schedule(step, self.cfg.total_steps, self.cfg.gan.start_frac, self.cfg.gan.warmup_frac)

    def generator_losses(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        """Forward the tokenizer; return loss terms (scalars), "total", and "rec" (detached images)."""
        from unitok.losses import hinge_g_loss, reconstruction_loss

        c = self.cfg.loss
        images, texts = batch["images"], batch["texts"]
        n = self.cfg.num_decode or images.shape[0]
        # The module is called directly, not through `engine(...)`: DeepSpeed 0.19 hooks the engine's
        # forward outputs and runs its gradient-reduction epilogue on ANY backward through them,
        # including the side gradients of the adaptive GAN weight. engine.backward() below still
        # drives the real backward and reduction.
        with self.autocast():
            out = self.model(images, texts, n)
        target, rec = images[:n], out["img_rec"]
        terms = reconstruction_loss(rec, target, c.l1, c.l2)
        nll = terms.pop("rec")
        if c.lpips > 0 and self.perceptual is not None:
            terms["lpips"] = self.perceptual(rec, target)
            nll = nll + c.lpips * terms["lpips"]
        terms["vq"] = out["vq_loss"]
        terms["clip"] = self.contrastive(out["clip_image_features"], out["clip_text_features"], out["logit_scale"])
        total = nll + c.vq * terms["vq"] + c.clip * terms["clip"]
        if self.cfg.model.quantizer.entropy_weight > 0:
            terms["entropy"] = out["entropy_loss"]
            total = total + self.cfg.model.quantizer.entropy_weight * terms["entropy"]
        gs = self.gan_state(step)
        if gs is not None and gs.active:
            disc = self.disc_engine.module
            disc.requires_grad_(False)  # the generator pass must not touch the discriminator's grads
            logits = disc(self.diffaug(rec, gs.fade, self.rng), generator=self.rng)
            disc.requires_grad_(True)
            terms["g"] = hinge_g_loss(logits.float())
            w = self.adaptive_weight(nll, terms["g"], rec)
            terms["g_weight"] = w * gs.warm * self.cfg.gan.weight
            total = total + terms["g_weight"] * terms["g"]
        terms = {k: v for k, v in terms.items() if k != "total"}
        terms["total"] = total
        terms["usage"] = out["codebook_usage"].mean()
        terms["logit_scale"] = out["logit_scale"].detach()
        return {**terms, "rec": rec.detach(), "codebook_usage": out["codebook_usage"].detach()}

    def discriminator_losses(self, batch: dict[str, torch.Tensor], rec: torch.Tensor, step: int):
        """hinge + bCR on real and (detached) reconstructed images, after the GAN start; else {}."""
        from unitok.losses import discriminator_loss

        gs = self.gan_state(step)
        if gs is None or not gs.active:
            return {}
        real = batch["images"][: rec.shape[0]]
        return discriminator_loss(lambda x: self.disc_engine(x, generator=self.rng), real, rec, self.diffaug,
                                  gs.fade, self.cfg.gan.bcr, generator=self.rng)


# ---- building ----------------------------------------------------------------------------------
def load_clip_init(model, path: str, log) -> None:
    """The CLIP-init variant: `visual.trunk.*` -> `encoder.*`, `text.*` -> `text_encoder.*` (non-strict)."""
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
    if not usable:
        raise ValueError(f"{path}: no visual.trunk.* / text.* tensor matches the model")
    model.load_state_dict(usable, strict=False)
    log.info(f"clip init: loaded {len(usable)} tensors from {path} ({len(mapped) - len(usable)} skipped)")


def build(cfg: TrainConfig, info, log):
    """Model, discriminator, losses and the two DeepSpeed engines."""
    import deepspeed

    from runtime.ds_config import load_ds_config
    from runtime.optim import lambda_scheduler, param_groups, warmup_cosine
    from unitok.losses import ContrastiveLoss, DiffAug, PerceptualLoss
    from unitok.models.discriminator import DinoDiscriminator
    from unitok.models.unitok import UniTok

    model = UniTok(cfg.model)
    if cfg.clip_init:
        load_clip_init(model, cfg.clip_init, log)
    n_params = sum(p.numel() for p in model.parameters())
    log.info(f"tokenizer: {n_params / 1e6:.2f}M parameters, preset {cfg.preset}")
    precision = "autocast" if cfg.precision == "auto" and torch.cuda.is_available() else cfg.precision
    precision = "fp32" if precision == "auto" else precision
    ds = load_ds_config(cfg.ds_config, micro_batch=cfg.data.local_batch_size, grad_accum=cfg.grad_accum,
                        world_size=info.world_size, grad_clip=cfg.optim.grad_clip, precision=precision)
    o = cfg.optim
    opt = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps)
    warm = int(o.warmup_frac * cfg.total_steps)
    sched = lambda_scheduler(opt, lambda s: warmup_cosine(s, cfg.total_steps, warm, o.end_ratio))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds)
    disc_engine = None
    if cfg.gan.enabled:
        g = cfg.gan
        disc = DinoDiscriminator(g.dino_weights, random_backbone=g.random_backbone, backbone=g.backbone)
        disc.backbone.to(info.device)
        d_opt = torch.optim.AdamW(param_groups(disc, g.weight_decay), lr=g.lr, betas=g.betas, eps=o.eps)
        start = int(g.start_frac * cfg.total_steps)
        d_total, d_warm = max(1, cfg.total_steps - start), int(g.warmup_frac * cfg.total_steps)
        d_sched = lambda_scheduler(d_opt, lambda s: warmup_cosine(s, d_total, d_warm, o.end_ratio))
        d_ds = load_ds_config(cfg.ds_config, micro_batch=cfg.data.local_batch_size, grad_accum=cfg.grad_accum,
                              world_size=info.world_size, grad_clip=o.grad_clip, precision=precision)
        disc_engine, _, _, _ = deepspeed.initialize(model=disc, optimizer=d_opt, lr_scheduler=d_sched, config=d_ds)
    perceptual = None
    if cfg.loss.lpips > 0:
        perceptual = PerceptualLoss(cfg.loss.lpips_weights, random_backbone=cfg.loss.lpips_random_backbone)
        perceptual.to(info.device)
    task = TokenizerTask(cfg, engine, disc_engine, perceptual, ContrastiveLoss(), DiffAug())
    return task


# ---- the loop ----------------------------------------------------------------------------------
def _finite_everywhere(x: torch.Tensor) -> bool:
    from runtime.distributed import get_world_size

    bad = (~torch.isfinite(x.detach().float())).float().reshape(1)
    if get_world_size() > 1:
        import torch.distributed as dist

        dist.all_reduce(bad)
    return bad.item() == 0


def _batch_hash(batch: dict[str, torch.Tensor]) -> str:
    return hashlib.sha1(batch["texts"].cpu().numpy().tobytes()).hexdigest()[:12]


def save_grid(path: Path, images: torch.Tensor, rec: torch.Tensor, n: int = 8) -> None:
    """Originals (top row) over reconstructions (bottom row)."""
    from torchvision.utils import save_image

    n = min(n, images.shape[0], rec.shape[0])
    grid = torch.cat([images[:n], rec[:n]]).float().clamp(-1, 1) * 0.5 + 0.5
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid.cpu(), path, nrow=n)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) training; returns the last logged metrics."""
    from runtime.checkpoint import CheckpointManager, git_sha, rng_state, set_rng_state, step_name
    from runtime.distributed import barrier, is_main_process
    from runtime.run import append_metrics, kill_self, start_run, truncate_metrics
    from runtime.log import MetricSink, Progress, format_line, memory_gb

    run_dir = Path(cfg.run_dir)
    resolved = dataclasses.asdict(cfg)
    info, log = start_run(resolved, run_dir, cfg.seed)
    task = build(cfg, info, log)
    loader = ImageTextLoader(dataclasses.replace(cfg.data, seed=cfg.seed), rank=info.rank,
                             world_size=info.world_size)
    ckpts = CheckpointManager(run_dir, cfg.keep_last)
    step = 0
    resume_from = ckpts.resolve(cfg.resume)
    if resume_from is not None:
        task.engine.load_checkpoint(str(resume_from), tag="tokenizer")
        if task.disc_engine is not None:
            task.disc_engine.load_checkpoint(str(resume_from), tag="disc")
        state = ckpts.load_rank_state(resume_from)
        loader.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        task.rng.set_state(state["gan_rng"])
        step = int(ckpts.load_trainer_state(resume_from)["step"])
        log.info(f"resumed from {resume_from} at step {step}")
    metrics_file = run_dir / "metrics.jsonl"
    if is_main_process():
        truncate_metrics(metrics_file, step)  # drop lines of steps that were lost with a crash
    sink = MetricSink(cfg.metrics, run_dir, resolved, project="unitok")
    progress = Progress(step, cfg.total_steps)
    last: dict[str, Any] = {}
    it = iter(loader)

    def save(at: int):
        def write(tmp: Path):
            task.engine.save_checkpoint(str(tmp), tag="tokenizer")
            if cfg.debug.kill_during_save and at == cfg.debug.kill_at_step:
                kill_self()
            if task.disc_engine is not None:
                task.disc_engine.save_checkpoint(str(tmp), tag="disc")
        ckpts.save(at, write, {"data": loader.state_dict(), "rng": rng_state(), "gan_rng": task.rng.get_state()},
                   {"step": at, "config": resolved, "git_sha": git_sha()})
        log.info(f"saved {step_name(at)}")

    consecutive_bad = 0
    while step < cfg.total_steps:
        micro = 0
        while micro < cfg.grad_accum:
            try:
                batch = next(it)
            except StopIteration:
                it = iter(loader)
                batch = next(it)
            batch = {k: v.to(info.device, non_blocking=True) for k, v in batch.items()}
            gen = task.generator_losses(batch, step)
            if step + 1 == cfg.debug.nan_at_step and micro == 0 and consecutive_bad == 0:
                gen["total"] = gen["total"] * float("nan")
            if not _finite_everywhere(gen["total"]):
                # NaN guard: the micro batch is dropped on every rank (no backward, no step) and
                # replaced by the next one, so DeepSpeed's accumulation counters stay aligned.
                bad = {k: float(v) for k, v in gen.items()
                       if isinstance(v, torch.Tensor) and v.dim() == 0 and not math.isfinite(float(v))}
                log.warning(f"step {step}: non-finite generator loss, terms {bad}; micro batch skipped")
                consecutive_bad += 1
                if cfg.nan_policy == "stop" or consecutive_bad >= 20:
                    log.error("stopping on non-finite losses; the last good checkpoint is kept")
                    sys.exit(3)
                continue
            task.engine.backward(gen["total"])
            task.engine.step()
            disc = task.discriminator_losses(batch, gen["rec"], step)
            if disc:
                if _finite_everywhere(disc["total"]):
                    task.disc_engine.backward(disc["total"])
                    task.disc_engine.step()
                else:
                    log.warning(f"step {step}: non-finite discriminator loss {float(disc['total'])}; "
                                "discriminator update skipped")
                    if cfg.nan_policy == "stop":
                        sys.exit(3)
            consecutive_bad = 0
            micro += 1
        step += 1
        task.model.clamp_logit_scale()
        progress.update(cfg.data.local_batch_size * cfg.grad_accum * info.world_size)
        last = _record(step, gen, disc, task, batch)
        if is_main_process():
            append_metrics(metrics_file, last)
        if step % cfg.log_every == 0 or step == cfg.total_steps:
            sps, _, eta = progress.rates(step)
            shown = {k: v for k, v in last.items() if k not in ("step", "data_hash", "usage_per_codebook")}
            log.info(format_line(step, cfg.total_steps, shown, sps, None, memory_gb(info.device), eta)
                     + f" | skipped samples {loader.stats.skipped}")
            sink.log(shown, step)
        if cfg.image_every and step % cfg.image_every == 0 and is_main_process():
            save_grid(run_dir / "images" / f"{step_name(step)}.png", batch["images"], gen["rec"])
        if step % cfg.save_every == 0 or step == cfg.total_steps:
            save(step)
        if step == cfg.debug.kill_at_step:
            kill_self()
    progress.close()
    if is_main_process():
        if last:  # this invocation trained at least one step (a resume at the final step trains none)
            save_grid(run_dir / "images" / "final.png", batch["images"], gen["rec"])
        if cfg.export:
            task.model.save_pretrained(run_dir / "export")
            log.info(f"exported {run_dir / 'export'}")
        log.info(f"data: {loader.stats}")
    barrier()
    sink.close()
    return last


def _record(step: int, gen: dict, disc: dict, task: TokenizerTask, batch) -> dict[str, Any]:
    out: dict[str, Any] = {"step": step}
    for k, v in gen.items():
        if isinstance(v, torch.Tensor) and v.dim() == 0:
            out[k] = float(v.detach())
    for k, v in disc.items():
        out[f"d_{k}"] = float(v)
    norm = task.engine.get_global_grad_norm()
    out["grad_norm"] = float(norm) if norm is not None else 0.0
    out["lr"] = float(task.engine.get_lr()[0])
    out["usage_per_codebook"] = [round(float(u), 3) for u in gen["codebook_usage"]]
    out["data_hash"] = _batch_hash(batch)
    return out



def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    train(parse_config(argv))


if __name__ == "__main__":
    main()
