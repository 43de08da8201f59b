"""Data recipes: declarative YAML mixtures of sources (DESIGN "Recipes"; examples in data_recipes/).

    name: stage2_finetune
    root: data                      # relative source paths resolve against this folder
    sources:
      - name: mgm_instruct
        kind: instructions          # text | pairs | instructions | t2i
        paths: mgm/instructions/{00000..00179}.jsonl   # brace range ...
        image_paths: mgm/codes/*.tar                  # ... or glob (sorted; ** spans folders)
        image_index: mgm/codes/index.json
        budget: 1500000             # samples per mixture epoch ...
      - name: t2i
        kind: t2i
        paths: t2i/codes/{00000..01499}.tar
        budget: 1500000             # ... or `weight:` (relative sampling probability) on every source

Every source uses `weight` or every source uses `budget` (mixing both has no common unit). Unknown
keys, and options that do not apply to a source's kind, raise ValueError (the release silently
ignored typos). Every path, `image_index` included, resolves against the recipe's `root`.
`load_recipe` checks that every expanded path exists and names the first missing one, and that every
glob matches something; `mllm.data.preflight` checks the rest before a run builds its model.
"""
from __future__ import annotations

import dataclasses
import glob
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from braceexpand import braceexpand

from runtime.paths import expand_glob, is_glob

KINDS = ("text", "pairs", "instructions", "t2i")
_COMMON = {"name", "kind", "paths", "weight", "budget", "shuffle"}
_KIND_OPTIONS = {
    "text": {"text_field", "text_overflow"},
    "pairs": {"t2i_ratio", "caption_dropout", "caption_field", "caption_field_prob"},
    "t2i": {"caption_dropout", "caption_field", "caption_field_prob"},
    "instructions": {"template", "image_paths", "image_index"},
}


def resolve(path: str, root: str | os.PathLike = ".") -> Path:
    """`path` against `root` (absolute and ~ paths are kept)."""
    q = Path(os.path.expanduser(path))
    return q if q.is_absolute() else Path(os.path.expanduser(root)) / q  # (--data-root=~/x: bash leaves the ~)


def expand_paths(patterns: list[str], root: str | os.PathLike = ".") -> list[Path]:
    """Brace-expand each pattern (`shards/{00000..00009}.tar`), resolve it against `root`, and expand
    globs (`dclm/**/*.jsonl.zst*`, sorted, so the order is the same on every rank and every run).
    A brace range keeps names that do not exist (check_paths reports them); a glob that matches
    nothing raises FileNotFoundError naming the pattern."""
    out = []
    for p in patterns:
        for q in braceexpand(p):
            full = resolve(q, root)
            if is_glob(q):
                own = os.path.expanduser(q)  # only the pattern is a glob: a `[` in the root folder's name is not
                pattern = own if os.path.isabs(own) else os.path.join(glob.escape(os.path.expanduser(str(root))), own)
                hits = [h for h in expand_glob(pattern) if not os.path.isdir(h)]  # files: `d/*` may match folders
                if not hits:
                    raise FileNotFoundError(f"pattern {full} matches no file")
                out.extend(Path(h) for h in hits)
            else:
                out.append(full)
    return out


@dataclass
class SourceConfig:
    """One source of a recipe and its per-kind options."""

    name: str
    """Unique name, used in stats, logs and resume state."""
    kind: str
    """text (JSONL / JSONL.zst / parquet documents), pairs (code shards: image + caption),
    instructions (LLaVA/Mini-Gemini JSON conversations), t2i (code shards, always text-to-image)."""
    paths: list[str]
    """File patterns with brace expansion, relative to the recipe root."""
    weight: float | None = None
    """Relative sampling probability (weight mode)."""
    budget: int | None = None
    """Samples drawn from this source per mixture epoch (budget mode); the source cycles if smaller."""
    shuffle: bool = True
    """Shuffle shard order per epoch and records within a shard (text files are read in order)."""
    text_field: str = "text"
    """text: the JSON / parquet field holding the document."""
    text_overflow: str = "split"
    """text: documents longer than max_len are split into windows, truncated, or skipped (counted)."""
    t2i_ratio: float = 0.5
    """pairs: probability that a pair becomes a text-to-image sample (else a caption sample)."""
    caption_dropout: float = 0.1
    """pairs/t2i: probability that a text-to-image sample uses the null prompt (CFG)."""
    caption_field: str | None = None
    """pairs/t2i: json field with an alternative caption (e.g. a recaption); None = `txt` only."""
    caption_field_prob: float = 0.8
    """pairs/t2i: probability of using `caption_field` when both captions exist (release: 0.8)."""
    template: str = "vicuna_v1"
    """instructions: conversation template, vicuna_v1 (chat) or plain (LLaVA pretrain captions)."""
    image_paths: list[str] = field(default_factory=list)
    """instructions: code shards holding the images (looked up by their json `path`)."""
    image_index: str | None = None
    """instructions: cache file for the path -> code index, relative to the recipe root like every path
    (built before training if missing or stale, written atomically)."""

    def __post_init__(self):
        if not self.name or not isinstance(self.name, str):
            raise ValueError("every source needs a non-empty string `name`")
        if self.kind not in KINDS:
            raise ValueError(f"source {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if isinstance(self.paths, str):
            self.paths = [self.paths]
        if isinstance(self.image_paths, str):
            self.image_paths = [self.image_paths]
        if not self.paths:
            raise ValueError(f"source {self.name!r}: `paths` is empty")
        if (self.weight is None) == (self.budget is None):
            raise ValueError(f"source {self.name!r}: give exactly one of `weight` or `budget`")
        for key in ("weight", "t2i_ratio", "caption_dropout", "caption_field_prob"):
            v = getattr(self, key)  # YAML reads 1e-3 as a string (YAML 1.1 floats need a dot: 1.0e-3)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise ValueError(f"source {self.name!r}: {key} must be a number, got {v!r} (YAML reads 1e-3 as text: "
                                 "write 0.001 or 1.0e-3)")
        if not all(isinstance(p, str) and p for p in [*self.paths, *self.image_paths]):
            raise ValueError(f"source {self.name!r}: `paths` and `image_paths` must be path strings")
        if self.weight is not None and not (math.isfinite(self.weight) and self.weight > 0):
            raise ValueError(f"source {self.name!r}: weight must be a finite number > 0, got {self.weight}")
        if self.budget is not None and (not isinstance(self.budget, int) or self.budget <= 0):
            raise ValueError(f"source {self.name!r}: budget must be a positive integer, got {self.budget!r}")
        for p in ("t2i_ratio", "caption_dropout", "caption_field_prob"):
            if not 0.0 <= getattr(self, p) <= 1.0:
                raise ValueError(f"source {self.name!r}: {p} must be in [0, 1], got {getattr(self, p)}")
        if self.text_overflow not in ("split", "truncate", "skip"):
            raise ValueError(f"source {self.name!r}: text_overflow must be split, truncate or skip")
        if self.template not in ("vicuna_v1", "plain"):
            raise ValueError(f"source {self.name!r}: template must be vicuna_v1 or plain, got {self.template!r}")
        if self.kind == "t2i":
            self.t2i_ratio = 1.0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SourceConfig":
        """Build from a YAML mapping; rejects unknown keys and options of other kinds."""
        if not isinstance(d, dict):
            raise ValueError(f"each source must be a mapping, got {d!r:.80}")
        kind = d.get("kind")
        if kind not in KINDS:
            raise ValueError(f"source {d.get('name')!r}: kind must be one of {KINDS}, got {kind!r}")
        allowed = _COMMON | _KIND_OPTIONS[kind]
        bad = sorted(set(d) - allowed)
        if bad:
            raise ValueError(f"source {d.get('name')!r} (kind {kind}): unknown or inapplicable keys {bad}; "
                             f"allowed: {sorted(allowed)}")
        for k in ("name", "kind", "paths"):
            if k not in d:
                raise ValueError(f"source {d.get('name')!r}: missing required key {k!r}")
        return cls(**d)


@dataclass
class Recipe:
    """A named mixture of sources."""

    name: str
    """Recipe name (logged)."""
    sources: list[SourceConfig]
    """The sources, each with a weight or a budget."""
    root: str = "."
    """Folder that relative source paths resolve against (relative roots: against the working directory)."""

    def __post_init__(self):
        if not self.sources:
            raise ValueError(f"recipe {self.name!r} has no sources")
        self.sources = [s if isinstance(s, SourceConfig) else SourceConfig.from_dict(s) for s in self.sources]
        names = [s.name for s in self.sources]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"recipe {self.name!r}: duplicate source names {dup}")
        modes = {s.weight is None for s in self.sources}
        if len(modes) > 1:
            raise ValueError(f"recipe {self.name!r}: use `weight` on every source or `budget` on every source")

    @property
    def mode(self) -> str:
        """'weight' or 'budget'."""
        return "budget" if self.sources[0].budget is not None else "weight"

    def files(self, source: SourceConfig) -> list[Path]:
        """Expanded data files of a source."""
        return self._expand(source, source.paths)

    def image_files(self, source: SourceConfig) -> list[Path]:
        """Expanded code shards of an instructions source."""
        return self._expand(source, source.image_paths)

    def image_index(self, source: SourceConfig) -> Path | None:
        """The index cache file of an instructions source, resolved against the root."""
        return resolve(source.image_index, self.root) if source.image_index else None

    def _expand(self, source: SourceConfig, patterns: list[str]) -> list[Path]:
        try:
            return expand_paths(patterns, self.root)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"recipe {self.name!r}, source {source.name!r}: {e}") from None

    def check_paths(self) -> None:
        """FileNotFoundError naming the first missing file (and how many are missing)."""
        for s in self.sources:
            for group in (self.files(s), self.image_files(s)):
                missing = [p for p in group if not p.is_file()]
                if missing:
                    raise FileNotFoundError(f"recipe {self.name!r}, source {s.name!r}: missing {missing[0]}"
                                            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for logging the resolved recipe)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Recipe":
        """Build from a mapping with keys name, sources and optional root."""
        if not isinstance(d, dict):
            raise ValueError("a recipe must be a mapping with `name` and `sources`")
        bad = sorted(set(d) - {"name", "sources", "root"})
        if bad:
            raise ValueError(f"unknown recipe keys {bad}")
        if not isinstance(d.get("sources"), list):
            raise ValueError("recipe `sources` must be a list")
        root = d.get("root")
        return cls(name=str(d.get("name", "recipe")), sources=d["sources"], root="." if root is None else str(root))


def load_recipe(path: str | os.PathLike, root: str | os.PathLike | None = None, check_paths: bool = True) -> Recipe:
    """Read a recipe YAML file; `root` overrides the file's root; missing files raise FileNotFoundError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe file not found: {path}")
    try:
        d = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {e}") from e
    recipe = Recipe.from_dict(d)
    if root is not None:
        recipe.root = str(root)
    if check_paths:
        recipe.check_paths()
    return recipe
