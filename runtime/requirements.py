"""The dependency floors of pyproject.toml, checked on import where an older package fails far from the cause.

pip enforces them on `pip install -e .`; an environment assembled by hand (`pip install --no-deps`, a checkout
on PYTHONPATH, a later downgrade) does not, and there transformers 5.23 fails mid-forward with
"'BaseModelOutputWithPast' object has no attribute 'cache'". `require("transformers")` raises an ImportError
that names the installed version, the floor and the pip command instead. The floors are read from the
checkout's pyproject.toml (the installed metadata where there is none), so they are written once.
"""
from __future__ import annotations

import importlib.metadata as md
import tomllib
from functools import cache
from pathlib import Path

from packaging.requirements import Requirement

DIST = "unitok-mllm"
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


@cache
def declared() -> dict[str, Requirement]:
    """Distribution name -> its requirement in pyproject.toml's `dependencies`."""
    if PYPROJECT.is_file():
        lines = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    else:  # installed from a wheel: the metadata, less the extras
        lines = [r for r in md.requires(DIST) or [] if "extra ==" not in r]
    return {r.name: r for r in map(Requirement, lines)}


def require(*names: str) -> None:
    """ImportError unless each of `names` (distribution names from pyproject.toml) is installed in a version
    its requirement admits; reads versions from the metadata, so nothing is imported."""
    bad = []
    for name in names:
        req = declared()[name]
        try:
            have = md.version(name)
        except md.PackageNotFoundError:
            bad.append((req, "not installed"))
            continue
        if not req.specifier.contains(have, prereleases=True):
            bad.append((req, have))
    if bad:
        found = "; ".join(f"{req} is required, {have} is installed" for req, have in bad)
        upgrade = " ".join(f"'{req}'" for req, _ in bad)
        raise ImportError(f"{found} (pyproject.toml). Run: pip install -U {upgrade}")
