"""MLLM training: tokens/s and per-rank model-state memory at 1 and 2 ranks (ZeRO-3), and MFU on a GPU.

Builds the demo assets (quick sizes: data, a debug tokenizer trained briefly, codes, a tiny Llama),
then runs `mllm.train` through the deepspeed launcher for a few steps at each world size and reads
the trainer's own log lines: "model-state MB" per rank (parameters + fp32 master + Adam moments this
rank holds) and tokens/s (non-pad positions). On a GPU the trainer also prints MFU.

    python benchmarks/mllm_train.py [--out runs/bench_mllm] [--hidden 256] [--layers 4] [--steps 6]
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

from experiments import demo  # noqa: E402


@dataclass
class BenchConfig:
    """MLLM training throughput and memory at several world sizes."""

    out: str = "runs/bench_mllm"
    """Work folder (demo assets, runs, logs)."""
    hidden: int = 256
    """Tiny Llama width."""
    layers: int = 4
    """Tiny Llama layers."""
    steps: int = 6
    """Training steps per world size."""
    ranks: tuple[int, ...] = (1, 2)
    """World sizes to measure."""
    ds_config: str = "zero3"
    """DeepSpeed config name."""


def main(argv: list[str] | None = None) -> None:
    import tyro

    a = tyro.cli(BenchConfig, args=argv, description=__doc__)
    out = Path(a.out)
    sizes = demo.DemoSizes(**{**vars(demo.QUICK), "hidden": a.hidden, "layers": a.layers})
    demo.step_data(out, sizes)
    demo.step_text_model(out, sizes)
    demo.step_tokenizer(out, sizes, 1)
    demo.step_codes(out, 1)
    rows = []
    for n in a.ranks:
        run = out / f"run_{a.ds_config}_{n}"
        log = out / "logs" / f"train_{n}.log"
        log.unlink(missing_ok=True)
        demo._deepspeed("mllm.train", [
            "--stage", "pretrain", "--llama-dir", str(out / "llama"), "--tokenizer", str(out / "tokenizer" / "export"),
            "--recipe", str(demo.ROOT / "data_recipes/demo.yaml"), "--data-root", str(out / "data"),
            "--run-dir", str(run), "--micro-batch", "4", "--grad-accum", "1", "--max-len", "256",
            "--num-workers", "0", "--total-steps", str(a.steps), "--save-every", str(a.steps), "--log-every", "1",
            "--resume", "none", "--no-export", "--ds-config", a.ds_config], n, log)
        text = log.read_text()
        mem = [float(x) for x in re.findall(r"rank \d+: model-state MB ([\d.]+)", text)][-n:]
        tps = [float(x) for x in re.findall(r"([\d.]+) tok/s", text)][1:]  # drop the first (warm-up) step
        mfu = re.findall(r"mfu ([\d.]+)%", text)
        rows.append((n, max(mem), sum(tps) / max(1, len(tps)), mfu[-1] if mfu else "-"))
    base = rows[0][1]
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (gloo)"
    print(f"# {dev}; tiny Llama {a.layers} x {a.hidden}, {a.ds_config}, micro batch 4 x 256 positions, {a.steps} steps")
    print("| ranks | model-state MB per rank | vs 1 rank | tokens/s (all ranks) | MFU % |")
    print("|---|---|---|---|---|")
    for n, m, t, f in rows:
        print(f"| {n} | {m:.2f} | {m / base:.2f} | {t:.0f} | {f} |")


if __name__ == "__main__":
    main()
