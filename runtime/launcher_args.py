"""LAUNCHER_ARGS for launch/deepspeed_env.sh: `python3 -I runtime/launcher_args.py ARGS HOSTFILE NNODES RESERVED`.

Splits ARGS as a shell would (quotes, no expansion) and prints each word NUL-terminated, then the launcher it
names (DeepSpeed's --launcher, default pdsh) and the number of hosts DeepSpeed will start ranks on, then "ok". That
count decides how deepspeed_env.sh hands the arguments on (quoted for pdsh's shell, or as they are), so it is worked
out the way DeepSpeed's runner does (`fetch_hostfile`, `parse_inclusion_exclusion`, then --num_nodes): the hostfile's
hosts, those of --include, without those --exclude empties, the first NNODES. The layout options the script sets
from the environment are refused (RESERVED: whether the script already passes --num_gpus or --include, which
DeepSpeed refuses beside --include/--exclude). Standard library only (Python 3.9+): it runs before any venv check.
"""
from __future__ import annotations

import re
import shlex
import sys

FROM_ENV = {"--hostfile": "HOSTFILE", "--num_nodes": "NNODES", "--num_gpus": "NGPU", "--master_addr": "MASTER_ADDR",
            "--master_port": "MASTER_PORT", "--no_ssh": "NODE_RANK", "--node_rank": "NODE_RANK",
            "--no_ssh_check": "NODE_RANK", "--force_multi": "HOSTFILE (two or more hosts)"}
"""Options deepspeed_env.sh sets from the environment: given again in LAUNCHER_ARGS, they would change the layout
behind its back (which hosts, hence how the arguments must be quoted)."""


def _hosts(hostfile: str) -> dict[str, list[int]]:
    """{host: slot indices} of a "host slots=N" file, in file order; {} when there is none (this machine only)."""
    try:
        lines = open(hostfile).read().splitlines()
    except OSError:
        return {}
    hosts = {}
    for line in lines:
        line = line.split("#")[0].strip()
        if line:
            m = re.fullmatch(r"(\S+)\s+slots\s*=\s*(\d+)", line)
            if m is None:
                raise ValueError(f"{hostfile}: {line!r} is not 'HOST slots=N'")
            hosts[m[1]] = list(range(int(m[2])))
    return hosts


def _filter(spec: str) -> dict[str, list[int] | None]:
    """DeepSpeed's --include/--exclude syntax: "host1@host2:0,2" -> {host: slots or None (the whole host)}."""
    out = {}
    for part in spec.split("@"):
        host, _, slots = part.partition(":")
        out[host] = [int(s) for s in slots.split(",")] if slots else None
    return out


def active_hosts(hosts: dict[str, list[int]], include: str, exclude: str, num_nodes: int) -> int:
    if not hosts:
        return 1
    if include:
        keep = _filter(include)
        hosts = {h: (s if keep[h] is None else [i for i in s if i in keep[h]]) for h, s in hosts.items() if h in keep}
    if exclude:
        drop = _filter(exclude)
        hosts = {h: ([] if drop[h] is None else [i for i in s if i not in drop[h]]) if h in drop else s
                 for h, s in hosts.items()}
    n = sum(1 for s in hosts.values() if s)
    return min(n, num_nodes) if num_nodes > 0 else n


def main(argv: list[str]) -> None:
    args, hostfile, num_nodes, reserved = argv
    words = shlex.split(args)
    launcher, include, exclude = "pdsh", "", ""
    for i, w in enumerate(words):
        name, eq, value = w.partition("=")
        if not eq:
            value = words[i + 1] if i + 1 < len(words) else ""
        if name in FROM_ENV:
            raise ValueError(f"{name} is set from the environment here: use {FROM_ENV[name]}")
        if name == "--launcher":
            launcher = value.lower()
        elif name in ("--include", "--exclude"):
            if reserved == "1":
                raise ValueError(f"{name} beside NGPU or CUDA_VISIBLE_DEVICES, which DeepSpeed refuses: choose the "
                                 "GPUs one way")
            include, exclude = (value, exclude) if name == "--include" else (include, value)
    n = active_hosts(_hosts(hostfile), include, exclude, int(num_nodes))
    sys.stdout.write("".join(f"{w}\0" for w in [*words, launcher, str(n), "ok"]))


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ValueError as e:  # shlex's "No closing quotation" too
        sys.exit(f"deepspeed_env.sh: LAUNCHER_ARGS={sys.argv[1]}: {e}")
