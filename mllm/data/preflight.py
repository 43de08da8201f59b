"""Check a recipe's data before a run builds its model or starts DeepSpeed.

Everything that would otherwise fail minutes or hours into a run fails here, with a message naming
the recipe, the source and the file:
- a missing file, or a glob that matches nothing (Recipe.check_paths);
- a file whose suffix the source's kind cannot read (text: TEXT_SUFFIXES; pairs/t2i and image
  shards: .tar; instructions: .json/.jsonl), or whose optional reader is not installed;
- a source whose files are all empty (zero bytes);
- code shards extracted at different image sizes, or at a size other than the model's
  (`expect_image_size`), or by different tokenizers, read from the `manifest.json` that
  `unitok.extract` writes next to them (the trainer compares the tokenizer with its own);
- an instructions source whose path -> codes index cannot be built or written (`build_index`).
The index is written to the recipe's `image_index` file (resolved against the recipe root), so the
run's data workers only read it. Call it on one rank first (it writes the index) and then on the
others after a barrier (they read it).

`probe` then reads a few records of each source through the run's own readers and templates, with the
text tokenizer and max_len: a source none of whose probed records gives a sample (a wrong `text_field`,
conversation images that are not in the code shards, max_len below one image) is refused, naming the
skip reasons and sample ids; one where most are skipped is warned about. Without it, a run finds that
out only after reading every file of the source once, after the model was built.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from mllm.data.recipe import Recipe, SourceConfig
from mllm.data import templates as T
from mllm.data.sources import CodeIndex, build_source, check_text_file
from unitok.extract import MANIFEST as CODE_MANIFEST  # written by unitok.extract next to its code shards

log = logging.getLogger(__name__)


@dataclass
class DataReport:
    """What preflight found: files per source and the image size of the code shards."""

    files: dict[str, int] = field(default_factory=dict)
    """source name -> number of data files (plus code shards for instructions)."""
    image_size: int | None = None
    """Pixel side the code shards were extracted at (None: no manifest found)."""
    tokenizer_fingerprint: str | None = None
    """`UniTok.fingerprint` of the tokenizer that extracted the code shards (None: not recorded)."""
    index_entries: dict[str, int] = field(default_factory=dict)
    """instructions source -> images in its path -> codes index."""
    probed: dict[str, tuple[int, int]] = field(default_factory=dict)
    """source -> (records read by `probe`, records that gave samples)."""

    def summary(self) -> str:
        """One log line."""
        parts = [f"{k}: {v} files" for k, v in self.files.items()]
        parts += [f"{k}: {v} indexed images" for k, v in self.index_entries.items()]
        parts += [f"{k}: {u} of {n} probed records usable" for k, (n, u) in self.probed.items()]
        size = f"image size {self.image_size}" if self.image_size else "image size not recorded"
        return f"data: {', '.join(parts)}; {size}"


def _where(recipe: Recipe, src: SourceConfig) -> str:
    return f"recipe {recipe.name!r}, source {src.name!r}"


def _check_suffixes(recipe: Recipe, src: SourceConfig, files: list[Path], images: list[Path]) -> None:
    for f in files:
        if src.kind == "text":
            try:
                check_text_file(f, src.name)
            except ValueError as e:
                raise ValueError(f"recipe {recipe.name!r}: {e}") from None
        elif src.kind in ("pairs", "t2i") and not f.name.endswith(".tar"):
            raise ValueError(f"{_where(recipe, src)}: {f} is not a code shard (.tar written by unitok.extract)")
        elif src.kind == "instructions" and not f.name.lower().endswith((".json", ".jsonl")):
            raise ValueError(f"{_where(recipe, src)}: {f} is not a conversation file (.json or .jsonl)")
    for f in images:
        if not f.name.endswith(".tar"):
            raise ValueError(f"{_where(recipe, src)}: image_paths entry {f} is not a code shard (.tar)")


def _manifest(folder: Path) -> tuple[int | None, str | None]:
    """Image size and tokenizer fingerprint recorded by unitok.extract in folder/manifest.json (None when
    absent)."""
    path = folder / CODE_MANIFEST
    if not path.is_file():
        return None, None
    try:
        m = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    size = m.get("image_size", (m.get("config") or {}).get("size"))
    return (int(size) if size is not None else None), m.get("tokenizer_fingerprint")


def preflight(recipe: Recipe, expect_image_size: int | None = None, build_index: bool = True) -> DataReport:
    """Run every check of the module docstring; returns what was found (raises on the first problem)."""
    recipe.check_paths()
    report = DataReport()
    sizes: dict[int, Path] = {}
    tokenizers: dict[str, Path] = {}
    for src in recipe.sources:
        files = recipe.files(src)
        images = recipe.image_files(src)
        if not files:
            raise ValueError(f"{_where(recipe, src)}: `paths` expand to no file")
        if src.kind == "instructions" and not images:  # text-only conversations (README): allowed, and said
            log.warning("%s: no `image_paths`: its conversations are read as text only, and one with an image is "
                        "skipped as missing_image", _where(recipe, src))
        _check_suffixes(recipe, src, files, images)
        if all(f.stat().st_size == 0 for f in files):
            raise ValueError(f"{_where(recipe, src)}: all {len(files)} files are empty (first: {files[0]})")
        report.files[src.name] = len(files) + len(images)
        code_files = images if src.kind == "instructions" else files if src.kind in ("pairs", "t2i") else []
        for folder in sorted({f.parent for f in code_files}):
            size, fingerprint = _manifest(folder)
            if size is not None:
                sizes.setdefault(size, folder / CODE_MANIFEST)
            if fingerprint is not None:
                tokenizers.setdefault(fingerprint, folder / CODE_MANIFEST)
        if src.kind == "instructions" and build_index and images:
            report.index_entries[src.name] = _build_index(recipe, src, images)
    if len(sizes) > 1:
        listed = ", ".join(f"{s} px ({p})" for s, p in sorted(sizes.items()))
        raise ValueError(f"recipe {recipe.name!r}: code shards were extracted at different image sizes: {listed}; "
                         "re-extract them at one size")
    if len(tokenizers) > 1:
        listed = ", ".join(f"{t} ({p})" for t, p in sorted(tokenizers.items()))
        raise ValueError(f"recipe {recipe.name!r}: code shards were extracted by different tokenizers: {listed}; "
                         "the MLLM reads every code through one tokenizer's codebook: re-extract them with it")
    report.tokenizer_fingerprint = next(iter(tokenizers), None)
    if sizes:
        report.image_size = next(iter(sizes))
        if expect_image_size is not None and report.image_size != expect_image_size:
            raise ValueError(f"recipe {recipe.name!r}: code shards were extracted at {report.image_size} px "
                             f"({sizes[report.image_size]}) but the model was trained at {expect_image_size} px")
    return report


def _build_index(recipe: Recipe, src: SourceConfig, images: list[Path]) -> int:
    errors: list[str] = []
    cache = recipe.image_index(src)
    if cache is not None and not cache.parent.is_dir():
        raise FileNotFoundError(f"{_where(recipe, src)}: the folder of image_index {cache} does not exist")
    try:
        index = CodeIndex(images, cache, on_error=errors.append)
    except OSError as e:
        raise OSError(f"{_where(recipe, src)}: cannot write image_index {cache}: {e}") from None
    if errors:
        log.warning("%s: %d unreadable code shard(s) while indexing, first: %s", _where(recipe, src), len(errors),
                    errors[0])
    if len(index) == 0:
        raise ValueError(f"{_where(recipe, src)}: none of the {len(images)} code shards (first: {images[0]}) has "
                         "samples with a json `path`, so no conversation image can be found; pack the images "
                         "with `python -m mllm.data.pack_images` and extract them with unitok.extract")
    return len(index)


PROBE_FILES = 3  # files read per source by `probe`: first, last and one between
PROBE_RECORDS = 64  # records read per file


def probe(recipe: Recipe, tokenizer, max_len: int, n_files: int = PROBE_FILES,
          n_records: int = PROBE_RECORDS) -> dict[str, tuple[int, int]]:
    """Template the first records of a few files of each source as the run will (see the module docstring):
    source -> (records read, records that gave samples). Raises when a source gives none; warns when fewer
    than half do. Run after `preflight` (instructions read its image index)."""
    boi, eoi = T.image_marker_ids(tokenizer)
    out: dict[str, tuple[int, int]] = {}
    for cfg in recipe.sources:
        src = build_source(recipe, cfg, tokenizer, max_len=max_len, boi_id=boi, eoi_id=eoi)
        read, usable, files = src.probe(n_files, n_records)
        out[cfg.name] = (read, usable)
        stats = src.stats()
        why = "; ".join(f"{r} {n} (e.g. {', '.join(stats['examples'].get(r, [])[:2])})"
                        for r, n in stats["skipped"].items() if n)
        where = f"{_where(recipe, cfg)}: the first {n_records} records of {', '.join(map(str, files))}"
        if read and not usable:
            raise ValueError(f"{where}: none of {read} gives a training sample (max_len {max_len}): {why}")
        if usable < read / 2:
            log.warning("%s: only %d of %d give a training sample: %s", where, usable, read, why)
    return out
