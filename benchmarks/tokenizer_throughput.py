"""Tokenizer throughput: encode, decode and training-step images/s and peak memory.

Runs the `debug` and `small` presets on CPU, and on the GPU too when one is present (bf16 autocast).
The training step is forward + reconstruction/VQ/CLIP losses + backward + AdamW step (no LPIPS or
GAN: those are measured by the trainer's benchmark rows).

    python benchmarks/tokenizer_throughput.py [--presets debug small] [--batch 8] [--iters 3] [--res N]
"""
from __future__ import annotations

import platform
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from unitok import UniTok, preset  # noqa: E402
from runtime.cli import parse  # noqa: E402


def peak_mem_mb(device: torch.device) -> float:
    """Peak allocated memory on the GPU, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, iters: int, device: torch.device) -> float:
    """Seconds per call after one warm-up call."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters


def bench(name: str, device: torch.device, batch: int, iters: int, res: int | None) -> dict:
    cfg = preset(name)
    size = res or cfg.img_size
    torch.manual_seed(0)
    model = UniTok(cfg).to(device)
    x = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    text = torch.randint(0, cfg.text.vocab_size, (batch, cfg.text.context_length), device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.eval()
    with amp:
        codes = model.encode(x)
        t_enc = timed(lambda: model.encode(x), iters, device)
        t_dec = timed(lambda: model.decode(codes), iters, device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))

    def step():
        with amp:
            out = model(x, text)
            rec = out["img_rec"]
            logits = out["logit_scale"] * out["clip_image_features"] @ out["clip_text_features"].T
            labels = torch.arange(batch, device=device)
            loss = (0.2 * F.l1_loss(rec, x) + F.mse_loss(rec, x) + out["vq_loss"]
                    + (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t_train = timed(step, iters, device)
    return {"preset": name, "device": device.type, "res": size, "batch": batch,
            "encode": batch / t_enc, "decode": batch / t_dec, "train": batch / t_train,
            "peak_mb": peak_mem_mb(device),
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6}


@dataclass
class Options:
    """What to measure."""

    presets: list[str] = field(default_factory=lambda: ["debug", "small"])
    """Tokenizer presets (unitok.config.PRESETS)."""
    batch: int = 8
    """Images per step."""
    iters: int = 3
    """Timed iterations per measurement."""
    res: int | None = None
    """Image side; None = the preset's img_size."""


def main(argv: list[str] | None = None) -> None:
    a = parse(Options, argv, prog="python benchmarks/tokenizer_throughput.py", description=__doc__)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    rows = [bench(n, d, a.batch, a.iters, a.res) for d in devices for n in a.presets]
    print(f"# machine: {platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    print("| preset | device | res | batch | params (M) | encode img/s | decode img/s | train img/s | peak MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['preset']} | {r['device']} | {r['res']} | {r['batch']} | {r['params_m']:.1f} | "
              f"{r['encode']:.1f} | {r['decode']:.1f} | {r['train']:.2f} | {r['peak_mb']:.0f} |")


if __name__ == "__main__":
    main()
