"""MLLM training: tokens/s and per-rank model-state memory at 1 and 2 ranks (ZeRO-3), and MFU on a GPU.

Builds the demo assets (quick sizes: data, a debug tokenizer trained briefly, codes, a tiny Llama),
then runs `mllm.train` through the deepspeed launcher for a few steps at each world size and reads
the trainer's own log lines: "model-state MiB" per rank (parameters + fp32 master + Adam moments this
rank holds) and tokens/s (non-pad positions). On a GPU the trainer also prints MFU.

    python benchmarks/mllm_train.py [--out runs/bench_mllm] [--hidden 256] [--layers 4] [--steps 6]
    python benchmarks/mllm_train.py --hidden 2048 --layers 16 --heads 16 --ranks 1 --max-len 2048   # 1B-class, GPU
"""
from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
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
    heads: int = 4
    """Llama attention heads (head width = hidden / heads; flash-attn needs at most 256)."""
    micro_batch: int = 4
    """Rows per rank per step."""
    max_len: int = 256
    """Positions per (packed) row."""
    tokenizer_steps: int = 40
    """Training steps of the debug tokenizer whose codes feed the MLLM; 0 = an untrained one (its quality does
    not matter to the speed, and it saves a launch)."""
    steps: int = 6
    """Training steps per world size (the first is a warm-up, left out of tokens/s and MFU)."""
    ranks: tuple[int, ...] = (1, 2)
    """World sizes to measure."""
    ds_config: str = "zero3"
    """DeepSpeed config name."""

    def __post_init__(self):
        if self.steps < 2:
            raise ValueError(f"--steps {self.steps}: at least 2 (the first is a warm-up, not measured)")


def harmonic_mean(rates: list[float]) -> float:
    return len(rates) / sum(1 / r for r in rates) if rates and min(rates) > 0 else 0.0


def resize_llama(folder: Path, hidden: int, layers: int, heads: int, max_len: int) -> None:
    """Rewrite the demo's random Llama in `folder` when its width, depth, heads or positions differ from those
    asked for (the demo writes 4 heads and 1024 positions, and keeps an existing folder whatever its size)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig.from_pretrained(folder)
    positions = max(1024, max_len)
    if (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.max_position_embeddings) == (
            hidden, layers, heads, positions):
        return
    if hidden % heads:
        raise ValueError(f"--hidden {hidden} is not divisible by --heads {heads}")
    cfg.hidden_size, cfg.num_hidden_layers, cfg.max_position_embeddings = hidden, layers, positions
    cfg.num_attention_heads = cfg.num_key_value_heads = heads
    cfg.intermediate_size = hidden * 8 // 3 // 8 * 8
    cfg.head_dim = hidden // heads
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)


def untrained_tokenizer(export: Path) -> None:
    """A randomly initialised debug-preset tokenizer in `export` (where there is none yet)."""
    from unitok import UniTok, preset

    if not (export / "model.safetensors").is_file():
        torch.manual_seed(0)
        UniTok(preset("debug")).save_pretrained(export)


def extract_codes(out: Path, size: int) -> None:
    """The training codes that data_recipes/demo.yaml reads: one process without a launcher."""
    data = out / "data"
    if (data / "codes" / "manifest.json").is_file():
        return
    log = out / "logs" / "extract.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        subprocess.run([sys.executable, "-m", "unitok.extract", "--tokenizer", str(out / "tokenizer" / "export"),
                        "--input", demo.image_shards(out), "--output", str(data / "codes"), "--size", str(size)],
                       check=True, stdout=f, stderr=subprocess.STDOUT, cwd=demo.ROOT)


def main(argv: list[str] | None = None) -> None:
    import tyro

    a = tyro.cli(BenchConfig, args=argv, description=__doc__)
    out = Path(a.out)
    sizes = demo.DemoSizes(**{**vars(demo.QUICK), "hidden": a.hidden, "layers": a.layers,
                              "tokenizer_steps": a.tokenizer_steps})
    demo.step_data(out, sizes)
    demo.step_text_model(out, dataclasses.replace(sizes, hidden=64, layers=1))  # the text tokenizer; resized below
    resize_llama(out / "llama", a.hidden, a.layers, a.heads, a.max_len)
    if a.tokenizer_steps == 0:
        untrained_tokenizer(out / "tokenizer" / "export")
    demo.step_tokenizer(out, sizes)  # QUICK: 1 rank
    extract_codes(out, sizes.image_size)
    rows = []
    for n in a.ranks:
        run = out / f"run_{a.ds_config}_{n}"
        log = out / "logs" / f"train_{n}.log"
        log.unlink(missing_ok=True)
        shutil.rmtree(run, ignore_errors=True)  # a new run each time (--resume none refuses a folder with checkpoints)
        demo._deepspeed("mllm.train", [
            "--stage", "pretrain", "--llama-dir", str(out / "llama"), "--tokenizer", str(out / "tokenizer" / "export"),
            "--recipe", str(demo.ROOT / "data_recipes/demo.yaml"), "--data-root", str(out / "data"),
            "--run-dir", str(run), "--micro-batch", str(a.micro_batch), "--grad-accum", "1",
            "--max-len", str(a.max_len),
            "--num-workers", "0", "--total-steps", str(a.steps), "--save-every", str(a.steps), "--log-every", "1",
            "--resume", "none", "--no-export", "--no-save-final", "--ds-config", a.ds_config], n, log)
        text = log.read_text()
        mem = [float(x) for x in re.findall(r"rank \d+: model-state MiB ([\d.]+)", text)][-n:]
        # steps 2..N (the first is a warm-up). Every step trains the same number of positions, so the harmonic mean
        # of the per-step rates is total tokens / total time (an arithmetic mean let a slow step count for less);
        # MFU is proportional to the rate: the same mean over the same steps (it was the last step's alone).
        tps = [float(x) for x in re.findall(r"([\d.]+) tok/s", text)][1:]
        mfu = [float(x) for x in re.findall(r"mfu ([\d.]+)%", text)][1:]
        rows.append((n, max(mem), harmonic_mean(tps), f"{harmonic_mean(mfu):.1f}" if mfu else "-"))
    base = rows[0][1]
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (gloo)"
    print(f"# {dev}; Llama {a.layers} x {a.hidden} ({a.heads} heads), {a.ds_config}, micro batch {a.micro_batch} x "
          f"{a.max_len} positions, {a.steps} steps")
    print("| ranks | model-state MiB per rank | vs 1 rank | tokens/s (all ranks) | MFU % |")
    print("|---|---|---|---|---|")
    for n, m, t, f in rows:
        print(f"| {n} | {m:.2f} | {m / base:.2f} | {t:.0f} | {f} |")


if __name__ == "__main__":
    main()
