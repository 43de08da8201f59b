"""The prepared GPU check: one table of the project's GPU figures, in at most 8 minutes on one H100/H200.

    bash benchmarks/gpu_check.sh [--out runs/gpu_check]     # on a GPU machine
    bash benchmarks/gpu_check.sh --cpu                      # tiny CPU mode (also GPU_CHECK_MODE=cpu)

Each step runs an existing benchmark script as a subprocess with its own timeout (the timeouts add up to
8 minutes in GPU mode); its output goes to OUT/logs/STEP.log, and the table to stdout and OUT/table.md:
  tokenizer   benchmarks/tokenizer_throughput.py: `large` at 256 px, bf16 autocast, batch 16, the trainer's
              full step (LPIPS + GAN, both AdamW steps): train images/s, peak memory (GPU: peak allocated),
              encode and decode images/s
  mllm        benchmarks/mllm_train.py: a 1B-class MLLM (random 16 x 2048 Llama with 16 heads + embedder +
              depth head) under ZeRO-3 on 1 GPU, bf16, flash-attn when installed (else SDPA, and the row says
              so), packed rows of 4 x 2048: tokens/s and MFU from the trainer's log
  generation  benchmarks/generation.py `small` in bf16: cached text-to-image positions/s (16 x 16, CFG) and
              answer tokens/s
  attention   benchmarks/attention_parity.py: flash-attn vs SDPA logits in bf16 (a "flash-attn not installed"
              row when the package is absent)
The CPU mode runs the same steps at debug sizes in fp32 (attention: SDPA vs eager) and prints the same rows;
the test suite runs it (tests/test_benchmarks.py) so the script cannot rot. A failed or timed-out step prints
FAIL in each of its rows, and the exit status is 1 when any row failed.
"""
from __future__ import annotations

import importlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from runtime.cli import parse  # noqa: E402
from runtime.launch import job_env  # noqa: E402

BENCH = ROOT / "benchmarks"
NEEDED = ("tyro", "deepspeed", "transformers", "huggingface_hub", "open_clip", "timm", "lpips", "webdataset",
          "pydantic", "unitok", "mllm")
"""What the steps import: checked first, so that a machine without them fails in seconds, not step by step."""


def missing_packages() -> str | None:
    """Why the steps cannot run here (a package missing or below the project's floor), or None."""
    gone = []
    for name in NEEDED:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 (ImportError, or mllm's floor check: a RuntimeError)
            gone.append(f"{name} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    if not gone:
        return None
    return ("cannot import " + "; ".join(gone) + ". On a machine without internet: run `bash "
            "benchmarks/gpu_wheels.sh` where PyPI is reachable and bring .whl/ along (gpu_check.sh installs it)")


def flash_attn_version() -> str | None:
    """flash-attn's version when it imports (an installed wheel built for another torch fails to: the trainer then
    uses SDPA, and so must the table's labels), else None."""
    try:
        import flash_attn
    except Exception:  # noqa: BLE001
        return None
    return getattr(flash_attn, "__version__", "?")


@dataclass
class Options:
    """Where to write, and which mode."""

    out: str = "runs/gpu_check"
    """Folder for the logs, the step outputs and table.md (the MLLM assets under it are reused by a rerun)."""
    cpu: bool = False
    """Tiny CPU mode (debug sizes, fp32; GPU_CHECK_MODE=cpu does the same). Without it a GPU must be visible."""
    timeout_scale: float = 1.0
    """Multiplies every step's timeout (a slow or shared machine)."""

    def __post_init__(self):
        if self.timeout_scale <= 0:
            raise ValueError("--timeout-scale must be positive")


@dataclass
class Row:
    """One line of the table."""

    area: str
    figure: str
    value: str = "-"
    status: str = "FAIL (not run)"


@dataclass
class Step:
    """One subprocess, its timeout and how its output becomes rows."""

    name: str
    argv: list[str]
    timeout_s: float
    read: Callable[[str], list[Row]]
    """The step's stdout -> its rows; raising marks them FAIL."""
    figures: list[tuple[str, str]]
    """(area, figure) of its rows, for the FAIL rows when it does not finish."""


def md_table(text: str) -> list[dict[str, str]]:
    """The last markdown table in `text` -> one dict per body row, keyed by the header cells."""
    lines = [ln.strip() for ln in text.splitlines()]
    starts = [i for i in range(len(lines) - 1) if lines[i].startswith("|") and lines[i + 1].startswith("|---")]
    if not starts:
        raise ValueError("no markdown table in the output")
    i = starts[-1]
    cells = lambda ln: [c.strip() for c in ln.strip("|").split("|")]  # noqa: E731
    head = cells(lines[i])
    rows = []
    for ln in lines[i + 2:]:
        if not ln.startswith("|"):
            break
        rows.append(dict(zip(head, cells(ln))))
    return rows


def _num(x: float | None, digits: int = 2) -> str:
    if x is None:
        raise ValueError("missing figure")
    return f"{x:.{digits}f}"


# ---- the steps ---------------------------------------------------------------------------------------
def steps(cpu: bool, out: Path) -> list[Step]:
    """The four steps at GPU or CPU sizes."""
    py = sys.executable
    flash = flash_attn_version() is not None
    tok_json, attn_json = out / "tokenizer.json", out / "attention.json"
    if cpu:
        tok = ["--presets", "debug", "--res", "48", "--batch", "2", "--iters", "1", "--gan-backbone", "debug",
               "--device", "cpu", "--precision", "fp32"]
        mllm = ["--hidden", "64", "--layers", "2", "--heads", "2", "--micro-batch", "2", "--max-len", "128",
                "--steps", "3"]
        gen = ["--presets", "debug", "--grid", "4", "--batch", "1", "--answer-tokens", "8"]
        attn = ["--preset", "debug", "--seq", "32", "--impls", "sdpa", "eager"]
        timeouts = (150, 180, 120, 90)
        tok_area, mllm_area = "tokenizer debug, 48 px, fp32, CPU", "MLLM 2 x 64 Llama, ZeRO-3, 1 rank, fp32, CPU"
        gen_area, attn_area = "generation debug, fp32, CPU", "attention SDPA vs eager, fp32, CPU"
    else:
        tok = ["--presets", "large", "--res", "256", "--batch", "16", "--iters", "3", "--device", "cuda",
               "--precision", "bf16"]
        mllm = ["--hidden", "2048", "--layers", "16", "--heads", "16", "--micro-batch", "4", "--max-len", "2048",
                "--steps", "8"]
        gen = ["--presets", "small", "--grid", "16", "--batch", "2", "--device", "cuda", "--dtype", "bf16"]
        attn = ["--preset", "small", "--seq", "512", "--device", "cuda", "--dtype", "bf16",
                "--impls", "flash_attention_2", "sdpa"]
        timeouts = (140, 210, 90, 40)  # 480 s: the 8-minute budget
        tok_area = "tokenizer large, 256 px, bf16, batch 16"
        attn_impl = "flash-attn" if flash else "SDPA (flash-attn not importable)"
        mllm_area = f"MLLM 1B-class, ZeRO-3, 1 GPU, bf16, {attn_impl}"
        gen_area, attn_area = "generation small, bf16", "attention flash-attn vs SDPA, bf16"
    cpu_mfu = "n/a on CPU"

    def read_tok(_: str) -> list[Row]:
        r = json.loads(tok_json.read_text())[0]
        mem = "peak allocated" if r["device"] == "cuda" else "peak RSS"
        return [Row(tok_area, "train images/s, full step (LPIPS + GAN)", _num(r["train"], 3), "ok"),
                Row(tok_area, f"peak memory GB ({mem}; the first step adds {r['step_adds_gb']:.2f})",
                    _num(r["peak_gb"]), "ok"),
                Row(tok_area, "encode images/s", _num(r["encode"]), "ok"),
                Row(tok_area, "decode images/s", _num(r["decode"]), "ok")]

    def read_mllm(stdout: str) -> list[Row]:
        r = md_table(stdout)[0]
        tps = float(r["tokens/s (all ranks)"])
        mfu = r["MFU %"]
        if cpu:
            mfu_row = Row(mllm_area, "MFU %", cpu_mfu, "ok")
        else:
            mfu_row = Row(mllm_area, "MFU %", mfu, "ok" if mfu not in ("", "-") else "FAIL (no MFU in the log)")
        return [Row(mllm_area, "tokens/s", f"{tps:.0f}", "ok"), mfu_row]

    def read_gen(stdout: str) -> list[Row]:
        r = md_table(stdout)[0]
        return [Row(gen_area, "cached text-to-image positions/s", r["cached positions/s"], "ok"),
                Row(gen_area, "answer tokens/s", r["answer tokens/s"], "ok")]

    def read_attn(_: str) -> list[Row]:
        rows = json.loads(attn_json.read_text())
        if rows[0]["error"] is None:
            return [Row(attn_area, "max abs logit difference / max abs logit", rows[0]["status"], "skip")]
        worst = max(rows, key=lambda r: r["error"])
        ok = all(r["status"] == "PASS" for r in rows)
        return [Row(attn_area, "max abs logit difference / max abs logit",
                    f"{worst['error']:.2e} (tolerance {worst['tolerance']:.0e})", "ok" if ok else "FAIL")]

    return [
        Step("tokenizer", [py, str(BENCH / "tokenizer_throughput.py"), *tok, "--rows", "full", "--json", str(tok_json)],
             timeouts[0], read_tok, [(tok_area, f) for f in ("train images/s, full step (LPIPS + GAN)",
                                                             "peak memory GB", "encode images/s", "decode images/s")]),
        Step("mllm", [py, str(BENCH / "mllm_train.py"), "--out", str(out / "mllm"), "--ranks", "1",
                      "--ds-config", "zero3", "--tokenizer-steps", "0", *mllm],
             timeouts[1], read_mllm, [(mllm_area, "tokens/s"), (mllm_area, "MFU %")]),
        Step("generation", [py, str(BENCH / "generation.py"), *gen], timeouts[2], read_gen,
             [(gen_area, "cached text-to-image positions/s"), (gen_area, "answer tokens/s")]),
        Step("attention", [py, str(BENCH / "attention_parity.py"), *attn, "--json", str(attn_json)], timeouts[3],
             read_attn, [(attn_area, "max abs logit difference / max abs logit")]),
    ]


def run_step(step: Step, out: Path, env: dict[str, str], scale: float = 1.0) -> tuple[list[Row], float]:
    """Run one step with its timeout -> its rows (FAIL rows when it fails, times out or its output does not
    read) and its wall seconds. Everything it prints goes to OUT/logs/STEP.log."""
    log = out / "logs" / f"{step.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    timeout = step.timeout_s * scale
    t = time.perf_counter()
    with log.open("w") as f:
        f.write("$ " + " ".join(step.argv) + "\n")
        f.flush()
        # stdout is kept for parsing; stderr (warnings, the launchers' chatter) goes straight to the log. Its own
        # session, so a timeout ends the whole process group (deepspeed's rank processes, spawned workers).
        p = subprocess.Popen(step.argv, stdout=subprocess.PIPE, stderr=f, text=True, env=env, cwd=ROOT,
                             start_new_session=True)
        try:
            stdout, _ = p.communicate(timeout=timeout)
            why = None if p.returncode == 0 else f"exit status {p.returncode}"
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            stdout, _ = p.communicate()
            why = f"timeout {timeout:.0f} s"
        f.write(stdout)
    seconds = time.perf_counter() - t
    if why is None:
        try:
            return step.read(stdout), seconds
        except Exception as e:  # noqa: BLE001 (any unreadable output is this step's failure)
            why = f"unreadable output: {type(e).__name__}: {e}"
    rel = os.path.relpath(log, Path.cwd())
    return [Row(area, fig, "-", f"FAIL ({why}; see {rel})") for area, fig in step.figures], seconds


def step_env(cpu: bool) -> dict[str, str]:
    """The steps' environment."""
    env = {**job_env(cpu=cpu), "PYTHONUNBUFFERED": "1"}
    if cpu:
        # One thread per process: the CPU mode checks that every step runs, not speed, and on a shared 2-core
        # machine torch's default threads oversubscribe it (spinning OpenMP threads made steps 10-100x slower).
        env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    else:  # a CPU habit's DS_ACCELERATOR=cpu would put DeepSpeed on its CPU accelerator beside NCCL ranks
        env.pop("DS_ACCELERATOR", None)
    return env


def header(cpu: bool, out: Path) -> list[str]:
    """Machine, software and where the logs are."""
    import torch

    from runtime.checkpoint import git_sha

    sha = git_sha()[:7]
    fa = f"flash-attn {v}" if (v := flash_attn_version()) is not None else "flash-attn not importable"
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() and not cpu else \
        f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    return [f"# gpu_check, {'CPU' if cpu else 'GPU'} mode, {time.strftime('%Y-%m-%d %H:%M')}: {dev}, "
            f"torch {torch.__version__}, {fa}, git {sha}; logs in {out / 'logs'}"]


def main(argv: list[str] | None = None) -> int:
    """Run every step, print the table, return the exit status (1 when a row failed)."""
    if problem := missing_packages():
        print(f"gpu_check: {problem}", file=sys.stderr)
        return 2
    a = parse(Options, argv, prog="bash benchmarks/gpu_check.sh", description=__doc__)
    cpu = a.cpu or os.environ.get("GPU_CHECK_MODE", "").lower() == "cpu"
    import torch

    if not cpu and not torch.cuda.is_available():
        print("gpu_check: no GPU is visible; run `bash benchmarks/gpu_check.sh --cpu` for the tiny CPU mode",
              file=sys.stderr)
        return 2
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = step_env(cpu)
    head = header(cpu, out) + ["", "| area | figure | value | status |", "|---|---|---|---|"]
    print("\n".join(head), flush=True)
    rows, times = [], []
    for step in steps(cpu, out):
        print(f"[gpu_check] {step.name} (timeout {step.timeout_s * a.timeout_scale:.0f} s) ...", file=sys.stderr,
              flush=True)
        got, seconds = run_step(step, out, env, a.timeout_scale)
        rows += got
        times.append(f"{step.name} {seconds:.0f} s")
        # each step's rows as soon as they exist: a run cut short (the machine's time) keeps what it measured
        print("\n".join(f"| {r.area} | {r.figure} | {r.value} | {r.status} |" for r in got), flush=True)
        table = head + [f"| {r.area} | {r.figure} | {r.value} | {r.status} |" for r in rows]
        (out / "table.md").write_text("\n".join(table + ["", "# wall time: " + ", ".join(times)]) + "\n")
    print("\n# wall time: " + ", ".join(times))
    return 1 if any(r.status.startswith("FAIL") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
