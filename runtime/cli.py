"""Command-line plumbing shared by every entry point of `unitok`, `mllm` and `experiments` (chat, web, export,
evaluation, extraction, conversion, packing).

Every command line is parsed from its dataclass config by tyro: each flag is a field (`snake_case` field
-> `--kebab-case` flag; `--snake_case` is accepted too), its default is the field's default and its help
line the field's docstring, so a default is written once. Flags that do not apply to the chosen mode
are refused by the config's `__post_init__` through `refuse_changed`, which names them.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from typing import Any, Iterable, Sequence, TypeVar

T = TypeVar("T")


def parse(cls: type[T], argv: Sequence[str] | None, prog: str, description: str | None = None,
          default: T | None = None) -> T:
    """`argv` (None = sys.argv[1:]) -> a `cls` instance. Booleans are plain switches (`--official-mllm`, no
    `--no-...` twin). On bad input (unknown flag, bad value, a `ValueError` from `__post_init__`) tyro
    prints the problem and exits with status 2, as argparse does; `--help` exits with status 0."""
    import tyro

    kw: dict[str, Any] = {} if default is None else {"default": default}
    return tyro.cli(cls, args=argv, prog=prog, description=description,
                    config=(tyro.conf.FlagCreatePairsOff,), **kw)


def strip_launcher_args(argv: list[str] | None) -> list[str]:
    """Drop `--local_rank=N`, which the deepspeed launcher appends (the environment carries it too)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--local_rank", "--local-rank", type=int)
    return pre.parse_known_args(sys.argv[1:] if argv is None else argv)[1]


def flag(path: str) -> str:
    """The command-line flag of a (dotted) field path whose sections omit their prefix: "gen.top_k" -> --top-k."""
    return "--" + path.rsplit(".", 1)[-1].replace("_", "-")


def field_default(owner: Any, name: str) -> Any:
    """The declared default of field `name` of the dataclass instance `owner` (MISSING when required)."""
    f = {f.name: f for f in dataclasses.fields(owner)}[name]
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def changed(cfg: Any, paths: Iterable[str]) -> list[str]:
    """Flags (see `flag`) of the dotted field paths of `cfg` whose value differs from the field's default."""
    out = []
    for path in paths:
        *parents, name = path.split(".")
        owner = functools.reduce(getattr, parents, cfg)
        if getattr(owner, name) != field_default(owner, name):
            out.append(flag(path))
    return out


def refuse_changed(cfg: Any, paths: Iterable[str], reason: str) -> None:
    """ValueError naming the flags among `paths` that were set (differ from their defaults): they do not
    apply `reason` (e.g. "to --ask: it writes no images")."""
    given = changed(cfg, paths)
    if given:
        verb = "does" if len(given) == 1 else "do"
        raise ValueError(f"{', '.join(given)} {verb} not apply {reason}")
