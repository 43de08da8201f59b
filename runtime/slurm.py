"""A SLURM allocation as a deepspeed hostfile (launch/hostfile_from_slurm.sh runs this).

    python -m runtime.slurm [--out FILE]     # writes "host slots=N" per node, prints FILE

Hosts come from `scontrol show hostnames $SLURM_JOB_NODELIST` when scontrol is installed, otherwise
from this module's own reading of SLURM's compressed host lists (`node[01-03,07]`,
`gpu-a[1-2],gpu-b5`, `rack[1-2]-n[1-2]`): no scontrol is needed inside a container. Slots per node:
SLURM_GPUS_ON_NODE, else SLURM_NTASKS_PER_NODE; neither set is an error that names them.
Standard library only, so any python on the node runs it.
"""
from __future__ import annotations

import argparse
import itertools
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path


def _split_top_level(spec: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, cur = [], 0, []
    for ch in spec:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in host list {spec!r}")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise ValueError(f"unbalanced '[' in host list {spec!r}")
    parts.append("".join(cur))
    return [p for p in (p.strip() for p in parts) if p]


def _expand_range(body: str, spec: str) -> list[str]:
    """`01-03,07` -> ["01", "02", "03", "07"] (zero padding kept, as SLURM does)."""
    out = []
    for item in body.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
        if not m:
            raise ValueError(f"bad range {item!r} in host list {spec!r}")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise ValueError(f"descending range {item!r} in host list {spec!r}")
        width = len(lo) if lo.startswith("0") else 0
        out += [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    return out


def expand_nodelist(spec: str) -> list[str]:
    """SLURM's compressed host list -> host names, in SLURM's order."""
    hosts = []
    for entry in _split_top_level(spec):
        pieces = re.split(r"\[([^\]]*)\]", entry)  # text, range, text, range, ..., text
        choices = [[p] if i % 2 == 0 else _expand_range(p, spec) for i, p in enumerate(pieces)]
        hosts += ["".join(c) for c in itertools.product(*choices)]
    return hosts


def hosts_of_allocation(env: dict[str, str]) -> list[str]:
    spec = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not spec:
        raise SystemExit("SLURM_JOB_NODELIST is not set: run inside a SLURM allocation (salloc/sbatch)")
    if shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "hostnames", spec], check=True, capture_output=True, text=True)
        return out.stdout.split()
    return expand_nodelist(spec)


def slots_per_node(env: dict[str, str]) -> int:
    for name in ("SLURM_GPUS_ON_NODE", "SLURM_NTASKS_PER_NODE"):
        if env.get(name):
            if not env[name].isdigit() or int(env[name]) < 1:  # slots=0: DeepSpeed started no rank and exited 0
                raise SystemExit(f"{name}={env[name]}: no processes to start per node; request GPUs "
                                 "(--gpus-per-node) or tasks per node (--ntasks-per-node)")
            return int(env[name])
    raise SystemExit("neither SLURM_GPUS_ON_NODE nor SLURM_NTASKS_PER_NODE is set: request GPUs "
                     "(--gpus-per-node) or tasks per node (--ntasks-per-node)")


def write_hostfile(path: Path, hosts: list[str], slots: int) -> None:
    """Atomically; every node writes the same file, and where TMPDIR is shared, at once: a temporary name
    per host and process (a shared one was renamed away under another node, which then failed)."""
    tmp = path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    tmp.write_text("".join(f"{h} slots={slots}\n" for h in hosts))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m runtime.slurm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="hostfile to write (default: $TMPDIR/hostfile.$SLURM_JOB_ID)")
    a = p.parse_args(argv)
    env = dict(os.environ)
    out = Path(a.out or Path(env.get("TMPDIR", "/tmp")) / f"hostfile.{env.get('SLURM_JOB_ID', 'local')}")
    write_hostfile(out, hosts_of_allocation(env), slots_per_node(env))
    print(out)


if __name__ == "__main__":
    main(sys.argv[1:])
