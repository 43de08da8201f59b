"""The quick demo's checks over training seeds: what trained runs reach, and what stages that do not learn read.

    python benchmarks/demo_floors.py [--seeds 0 1 2 3 4] [--frozen stage2] [--out runs/demo_floors]

Runs `experiments.demo --quick --no-chat --seed S` for each seed (a finished seed is read, not rerun) and prints
experiments.demo.quick_checks per seed: the figures tests/test_demo.py bounds (QUICK_FLOORS, QUICK_LOSS_CEILINGS),
then each column's min and max beside its bound. `--frozen STEP...` (tokenizer, stage1, stage2) trains those steps
at learning rate 1e-9, so that their rows show what a stage that does not learn reads: a bound is only a test if
those rows fail it and every trained seed passes. About 1 minute per seed on 2 CPU cores (5 seeds: 5.1 min).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from experiments import demo  # noqa: E402

STEPS = ("tokenizer", "stage1", "stage2")


@dataclass
class Options:
    """The quick demo's floors, measured over seeds."""

    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    """Training seeds (`experiments.demo --seed`)."""
    frozen: tuple[str, ...] = ()
    """Steps trained at learning rate 1e-9 (of tokenizer, stage1, stage2)."""
    out: str = "runs/demo_floors"
    """Work folder: one quick demo per seed under OUT/<frozen steps or trained>/seed<S>."""

    def __post_init__(self):
        unknown = sorted(set(self.frozen) - set(STEPS))
        if unknown:
            raise ValueError(f"--frozen takes {', '.join(STEPS)}; got {', '.join(unknown)}")


def freeze(steps: tuple[str, ...]) -> None:
    """Make the demo train `steps` at learning rate 1e-9 (the trainers refuse 0). The demo builds each step's
    command line in one place (`demo._deepspeed`); the appended flag wins over the demo's own `--optim.lr`."""
    launch = demo._deepspeed

    def call(module: str, args: list[str], ranks: int, log_file: Path) -> None:
        step = {"unitok.train": "tokenizer", "mllm.train": "stage1" if "pretrain" in args else "stage2"}.get(module)
        launch(module, [*args, "--optim.lr", "1e-9"] if step in steps else args, ranks, log_file)

    demo._deepspeed = call


def table(rows: dict[int, list[tuple[str, float, str, bool]]]) -> list[str]:
    """Markdown: one row per seed, then the min, the max and the bound of each column."""
    names = [name for name, *_ in next(iter(rows.values()))]
    lines = ["| seed | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for seed, checks in rows.items():
        lines.append(f"| {seed} | " + " | ".join(f"{v:.3f}" + ("" if ok else " FAIL") for _, v, _, ok in checks) + " |")
    columns = list(zip(*[[v for _, v, _, _ in checks] for checks in rows.values()]))
    lines.append("| min | " + " | ".join(f"{min(c):.3f}" for c in columns) + " |")
    lines.append("| max | " + " | ".join(f"{max(c):.3f}" for c in columns) + " |")
    lines.append("| bound | " + " | ".join(b for _, _, b, _ in next(iter(rows.values()))) + " |")
    return lines


def main(argv: list[str] | None = None) -> None:
    import tyro

    o = tyro.cli(Options, args=argv, description=__doc__)
    freeze(o.frozen)
    folder = Path(o.out) / ("frozen-" + "-".join(o.frozen) if o.frozen else "trained")
    rows = {}
    for seed in o.seeds:
        out = folder / f"seed{seed}"
        demo.run(out, demo.QUICK, chat=False, seed=seed)
        rows[seed] = demo.quick_checks(out)
    print(f"\nquick demo checks, {'frozen: ' + ', '.join(o.frozen) if o.frozen else 'every step trained'}")
    print("\n".join(table(rows)))
    failing = sum(not all(ok for *_, ok in checks) for checks in rows.values())
    print(f"{failing} of {len(rows)} seeds fail a bound")


if __name__ == "__main__":
    main()
