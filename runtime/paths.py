"""File patterns as every data entry point reads them (recipes, tokenizer shard lists, extraction
inputs): brace ranges expand to exact names; globs expand to what exists, sorted, so every rank and
every run sees the same order (the way to read releases whose numbering has gaps)."""
from __future__ import annotations

import glob
import os

GLOB_CHARS = frozenset("*?[")


def is_glob(pattern: str) -> bool:
    """Whether `pattern` (already brace-expanded) holds a glob character."""
    return bool(GLOB_CHARS & set(pattern))


def expand_glob(pattern: str) -> list[str]:
    """Sorted matches of a glob (`**` spans folders, `~` expands); [] when nothing matches."""
    return sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
