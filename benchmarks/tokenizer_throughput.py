"""Tokenizer throughput: encode, decode and training-step images/s, and the memory the first step adds.

Rows (`--rows`):
  step  forward + L1 + L2 + VQ + contrastive loss + backward (+ an AdamW step unless --no-optimizer-step)
  full  the trainer's whole step: the above + LPIPS (random VGG16 trunk) + the GAN (DINOv2 discriminator
        with a random backbone): the generator's adaptive-weighted hinge term, then the discriminator's
        hinge + bCR step; both AdamW steps (gradient clipping as configured in the trainer)
Both rows run `unitok.train.TokenizerTask`'s own step (generator_losses, discriminator_losses, backward)
over plain modules in one process instead of DeepSpeed engines, with the GAN past its warm-up (no blur).

Each (device, preset, row, run) is measured in a fresh spawned process, so one measurement's memory
cannot leak into the next: build everything, read the resident memory, run the first training step and
read the peak; then time --iters more steps (the first step is the warm-up; the median is reported);
then, in the first row's process only, encode and decode in eval mode under no_grad (one warm-up call,
median of --iters). Memory on CPU: the peak RSS of the first step (VmHWM, reset to the current RSS just
before the step where Linux allows it, else ru_maxrss) minus the RSS before it (psutil); on a GPU: peak
allocated minus allocated before the step. Over --runs, speeds are the best run, memory the largest.

`--config issue14` is issue 14's configuration on CPU: the `base` preset (ViTamin-B encoder and decoder,
12-layer 768-wide text tower, 8 x 4096 x 8 codes, attention projections), 256 px, batch 4, gradient
checkpointing on, drop path 0, the `step` row without an optimizer step, then the `full` row; median of 3
after a warm-up, best of 2 runs; it prints the targets with pass/fail.

    python benchmarks/tokenizer_throughput.py [--presets debug small] [--batch 8] [--iters 3] [--res N]
    python benchmarks/tokenizer_throughput.py --config issue14      # issue 14's table (many minutes on 2 cores)
    python benchmarks/tokenizer_throughput.py --presets large --rows full --device cuda --precision bf16
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import multiprocessing
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from runtime.cli import parse, refuse_changed  # noqa: E402

# issue 14: targets for the `step` row and the codec on the project's CPU machine (x86_64, 2 cores).
# (key, label, comparison, target); the release measured 0.124 / 3.1 / 2.36 / 0.72.
ISSUE14_TARGETS = (
    ("train", "train images/s (L1 + L2 + VQ + contrastive, backward)", ">=", 0.15),
    ("step_adds_gb", "peak memory the first training step adds, GB", "<=", 3.0),
    ("encode", "encode images/s", ">=", 2.9),
    ("decode", "decode images/s", ">=", 0.87),
)
ISSUE14 = dict(presets=["base"], res=256, batch=4, grad_checkpointing=True, drop_path=0.0, no_optimizer_step=True,
               iters=3, runs=2, rows=["step", "full"], device="cpu", precision="fp32")


@dataclass
class Options:
    """What to measure."""

    config: Literal["custom", "issue14"] = "custom"
    """`custom`: the flags below. `issue14`: issue 14's configuration (see the module docstring); the flags
    it sets may not be given with it."""
    presets: list[str] = field(default_factory=lambda: ["debug", "small"])
    """Tokenizer presets (unitok.config.PRESETS)."""
    rows: list[Literal["step", "full"]] = field(default_factory=lambda: ["step"])
    """Training steps to measure: `step` (reconstruction, VQ, contrastive) and/or `full` (+ LPIPS + GAN)."""
    batch: int = 8
    """Images per step."""
    iters: int = 3
    """Timed iterations per measurement, after one warm-up; the median is reported."""
    runs: int = 1
    """Fresh processes per (device, preset, row); speeds are the best run, memory the largest."""
    res: int | None = None
    """Image side; None = the preset's img_size."""
    grad_checkpointing: bool = False
    """Activation checkpointing of the ViT blocks, text tower and quantizer path."""
    drop_path: float | None = None
    """Stochastic depth rate of the encoder and decoder; None = the preset's."""
    no_optimizer_step: bool = False
    """The `step` row without the AdamW step after the backward: forward, losses, backward only (the
    `full` row always steps both optimizers, as the trainer does)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: CPU, and the GPU too when one is present."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: fp32 on CPU, bf16 autocast on a GPU (the trainer's rule)."""
    gan_backbone: Literal["vits14", "debug"] = "vits14"
    """DINOv2 size of the `full` row's discriminator (debug: tiny, for the CPU smoke test)."""
    compile: str | None = None
    """torch.compile backend for the tokenizer's repeated blocks, as the trainers' --compile (inductor,
    aot_eager); None: eager. The first step, whose memory is reported, then includes the compilation."""
    json: str | None = None
    """Also write the rows to this JSON file."""

    def __post_init__(self):
        if self.config == "issue14":
            refuse_changed(self, list(ISSUE14), "with --config issue14: it sets them")
            for k, v in ISSUE14.items():
                setattr(self, k, v)
        from unitok.config import PRESETS

        unknown = [n for n in self.presets if n not in PRESETS]
        if unknown:
            raise ValueError(f"unknown preset(s) {unknown}; choose from {sorted(PRESETS)}")
        if not self.rows:
            raise ValueError("--rows needs at least one of step, full")
        if self.batch <= 0 or self.iters <= 0 or self.runs <= 0:
            raise ValueError("--batch, --iters and --runs must be positive")
        if self.res is not None and (self.res <= 0 or self.res % 16):
            raise ValueError(f"--res {self.res} must be a positive multiple of 16")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no GPU is visible")


@dataclass
class Job:
    """One measurement, run in a fresh process."""

    preset: str
    row: str
    device: str
    precision: str
    res: int | None
    batch: int
    iters: int
    grad_checkpointing: bool
    drop_path: float | None
    optimizer_step: bool
    gan_backbone: str
    codec: bool
    """Also time encode and decode."""
    compile: str | None = None
    """torch.compile backend (None: eager)."""


# ---- the engine stand-in -------------------------------------------------------------------------
class LocalEngine:
    """The part of a DeepSpeed engine that `TokenizerTask` uses (module, device, global_rank, __call__,
    backward, step), over a plain module and optimizer: one process, no launcher. `step` clips the gradient
    norm like the trainer's DeepSpeed config, steps (when there is an optimizer) and frees the gradients."""

    global_rank = 0

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer | None, device: torch.device,
                 grad_clip: float | None, bf16: bool = False):
        self.module, self.optimizer, self.device, self.grad_clip = module, optimizer, device, grad_clip
        self.bf16 = bf16

    def __call__(self, *args, **kwargs):
        # the trainer's discriminator engine runs its forward under DeepSpeed's bf16 autocast (torch_autocast)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        if self.optimizer is not None:
            if self.grad_clip:
                torch.nn.utils.clip_grad_norm_([p for p in self.module.parameters() if p.grad is not None],
                                               self.grad_clip)
            self.optimizer.step()
        self.module.zero_grad(set_to_none=True)


def build_task(job: Job, device: torch.device):
    """The trainer's TokenizerTask for `job.row` over LocalEngines, and its train config."""
    from runtime.optim import param_groups
    from unitok.config import preset
    from unitok.data import DataConfig
    from unitok.losses import ContrastiveLoss, DiffAug, PerceptualLoss
    from unitok.models.unitok import UniTok
    from unitok.train import GanConfig, LossConfig, TokenizerTask, TrainConfig

    model_cfg = preset(job.preset)
    model_cfg.img_size = job.res or model_cfg.img_size
    model_cfg.grad_checkpointing = job.grad_checkpointing
    if job.drop_path is not None:
        model_cfg.encoder.drop_path = model_cfg.decoder.drop_path = job.drop_path
    full = job.row == "full"
    # GAN active from step 0 of 1000; steps are timed at step 500, past the warm-up (weight 1, no blur)
    cfg = TrainConfig(preset=job.preset, model=model_cfg, precision=job.precision, total_steps=1000, export=False,
                      compile=job.compile,
                      data=DataConfig(img_size=model_cfg.img_size, context_length=model_cfg.text.context_length),
                      loss=dataclasses.replace(LossConfig(), lpips=1.0 if full else 0.0, lpips_random_backbone=full),
                      gan=dataclasses.replace(GanConfig(), enabled=full, random_backbone=full, start_frac=0.0,
                                              backbone=job.gan_backbone))
    torch.manual_seed(0)
    model = UniTok(model_cfg).to(device).train()
    if cfg.compile:  # as unitok.train.build does
        from runtime.compile import compile_blocks
        from unitok.models.unitok import BLOCK_TYPES

        compile_blocks(model, static=BLOCK_TYPES, backend=cfg.compile)
    o = cfg.optim
    opt = None
    if full or job.optimizer_step:
        opt = o.adamw(param_groups(model, o.weight_decay))
    engine = LocalEngine(model, opt, device, o.grad_clip)
    disc_engine = perceptual = None
    if full:
        from unitok.models.discriminator import DinoDiscriminator

        g = cfg.gan
        disc = DinoDiscriminator(None, random_backbone=True, backbone=g.backbone).to(device).train()
        d_opt = o.adamw(param_groups(disc, g.weight_decay), lr=g.lr, betas=g.betas)
        disc_engine = LocalEngine(disc, d_opt, device, o.grad_clip, bf16=cfg.precision == "bf16")
        perceptual = PerceptualLoss(None, random_backbone=True).to(device)
    return TokenizerTask(cfg, engine, disc_engine, perceptual, ContrastiveLoss(), DiffAug()), cfg


# ---- measuring -----------------------------------------------------------------------------------
def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss(reset: bool) -> int:
    """Peak RSS in bytes: VmHWM after a reset (Linux), else ru_maxrss (which also counts what came before)."""
    if reset:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _median_seconds(fn: Callable[[], object], iters: int, device: torch.device, warmup: bool = True) -> float:
    """Median seconds per call of `iters` calls (after one untimed call when `warmup`)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if warmup:
        fn()
    times = []
    for _ in range(iters):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(job: Job) -> dict:
    """One fresh-process measurement -> a result row (speeds in images/s, memory in GB)."""
    import gc
    import warnings

    warnings.filterwarnings("ignore", message=".*random.*backbone|.*random VGG16 trunk")
    device = torch.device(job.device)
    task, cfg = build_task(job, device)
    model = task.model
    size = cfg.model.img_size
    g = torch.Generator().manual_seed(0)
    batch = {"images": (torch.rand(job.batch, 3, size, size, generator=g) * 2 - 1).to(device),
             "texts": torch.randint(0, cfg.model.text.vocab_size, (job.batch, cfg.model.text.context_length),
                                    generator=g).to(device)}
    step_no = cfg.total_steps // 2

    def train_step():
        out = task.forward(batch, step_no)
        task.backward(out, batch, step_no)
        model.clamp_logit_scale()  # TokenizerTask.after_step's model update

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        before, reset = _rss(), _reset_peak_rss()
    train_step()  # the first step: memory, and the warm-up of the timed steps
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(device)
        method = "cuda max_memory_allocated"
    else:
        peak = _peak_rss(reset)
        method = "VmHWM after reset" if reset else "ru_maxrss"
    t_train = _median_seconds(train_step, job.iters, device, warmup=False)
    row = {"preset": job.preset, "row": job.row, "device": job.device, "precision": job.precision, "res": size,
           "batch": job.batch, "grad_checkpointing": job.grad_checkpointing,
           "drop_path": cfg.model.encoder.drop_path, "optimizer_step": task.engine.optimizer is not None,
           "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "train": job.batch / t_train,
           "step_adds_gb": (peak - before) / 1e9, "peak_gb": peak / 1e9, "memory": method, "compile": job.compile,
           "encode": None, "decode": None}
    if job.codec:
        model.eval()
        amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=task.bf16)
        with torch.no_grad(), amp:
            codes = model.encode(batch["images"])
            row["encode"] = job.batch / _median_seconds(lambda: model.encode(batch["images"]), job.iters, device)
            row["decode"] = job.batch / _median_seconds(lambda: model.decode(codes), job.iters, device)
    return row


def run_fresh(job: Job) -> dict:
    """`measure(job)` in a new spawned process (its own RSS and peak)."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(measure, job).result()


def best_of(runs: list[dict]) -> dict:
    """Speeds: the best run; memory: the largest."""
    out = dict(runs[0], runs=len(runs))
    for k in ("train", "encode", "decode"):
        vals = [r[k] for r in runs if r[k] is not None]
        out[k] = max(vals) if vals else None
    for k in ("step_adds_gb", "peak_gb"):
        out[k] = max(r[k] for r in runs)
    return out


# ---- reporting -----------------------------------------------------------------------------------
def _fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def table(rows: list[dict]) -> list[str]:
    """The measurement table, markdown."""
    out = ["| preset | row | device | precision | res | batch | ckpt | params (M) | train img/s | "
           "step adds GB | peak GB | encode img/s | decode img/s |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        row = r["row"] + ("" if r["row"] == "full" or r["optimizer_step"] else " (no optimizer step)")
        out.append(f"| {r['preset']} | {row} | {r['device']} | {r['precision']} | {r['res']} | {r['batch']} | "
                   f"{'on' if r['grad_checkpointing'] else 'off'} | {r['params_m']:.1f} | {_fmt(r['train'], 3)} | "
                   f"{_fmt(r['step_adds_gb'])} | {_fmt(r['peak_gb'])} | {_fmt(r['encode'])} | "
                   f"{_fmt(r['decode'])} |")
    return out


def issue14_table(rows: list[dict]) -> list[str]:
    """Issue 14's figures against its targets (the `step` row and the codec), then the `full` row."""
    step = next(r for r in rows if r["row"] == "step")
    full = next((r for r in rows if r["row"] == "full"), None)
    out = ["| figure | value | target | pass |", "|---|---|---|---|"]
    for key, label, op, target in ISSUE14_TARGETS:
        v = step[key]
        ok = v is not None and (v >= target if op == ">=" else v <= target)
        out.append(f"| {label} | {_fmt(v, 3)} | {op} {target} | {'PASS' if ok else 'FAIL'} |")
    if full is not None:
        out.append(f"| full step images/s (+ LPIPS + GAN, both AdamW steps) | {_fmt(full['train'], 3)} | - | - |")
        out.append(f"| peak memory the first full step adds, GB | {_fmt(full['step_adds_gb'], 3)} | - | - |")
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    """Measure, print the table(s), and return the rows."""
    a = parse(Options, argv, prog="python benchmarks/tokenizer_throughput.py", description=__doc__)
    if a.device == "auto":
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        devices = [a.device]
    rows = []
    for dev in devices:
        precision = a.precision if a.precision != "auto" else ("bf16" if dev == "cuda" else "fp32")
        for name in a.presets:
            for row in a.rows:
                job = Job(name, row, dev, precision, a.res, a.batch, a.iters, a.grad_checkpointing, a.drop_path,
                          not a.no_optimizer_step, a.gan_backbone, codec=row == a.rows[0], compile=a.compile)
                rows.append(best_of([run_fresh(job) for _ in range(a.runs)]))
    # the vector ISA torch dispatches to (AVX2, AVX512...): hosts of one machine class differ in it, and the
    # figures with it, so compare only runs with the same header
    print(f"# machine: {platform.machine()} {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}"
          + (f", {torch.cuda.get_device_name()}" if "cuda" in devices else "")
          + f"; median of {a.iters} after a warm-up, best of {a.runs} run(s); memory: {rows[0]['memory']}"
          + f"; {'compiled blocks (' + a.compile + ')' if a.compile else 'eager'}")
    print("\n".join(table(rows)))
    if a.config == "issue14":
        print("\n# issue 14: base preset, 256 px, batch 4, gradient checkpointing, drop path 0, CPU")
        print("\n".join(issue14_table(rows)))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
