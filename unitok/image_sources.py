"""Where extraction's images come from: the public releases' image layouts -> raw samples.

`plan_inputs(cfg)` turns --input patterns into units of work (`InputShard`, one output code shard
each); `read_shard(shard, cfg, stats)` yields that shard's `RawSample`s (image bytes or a file to
read, caption, metadata) from `READERS[shard.kind]`, with keys made unique in the shard, counting what
it cannot read and the keys it renames in `stats` (`ShardStats`).
`cfg` is a `unitok.extract.ExtractConfig` (fields input, input_format, per_shard, caption_column,
image_column, image_root). Decoding and tokenising are `unitok.extract`'s job.

Inputs (a pattern takes brace ranges `{00000..00099}` and globs `*`, `?`, `[..]`; matches are sorted):
    webdataset  `*.tar` with one image member per sample (jpg jpeg png webp gif bmp tif tiff) and
                optional txt / json: img2dataset's `--output_format webdataset`, DataComp, demo shards.
                One output shard per tar, same name.
    parquet     `*.parquet` with embedded image bytes: img2dataset's `--output_format parquet` (column
                `jpg`) or hub sets (column `image` = struct {bytes, path}, the HF datasets Image feature;
                a row with only `path` is read from --image-root, default the parquet's folder). Caption
                column: --caption-column, else the first of caption / prompt / text / txt. Key: column
                `key`, else the row index. Other scalar columns go into the json. Output `<stem>.tar`.
    files       a folder of img2dataset's `--output_format files`: subfolders `00000/` holding
                `000000000.jpg` + `.txt` + `.json`; each subfolder (or a folder given directly that
                holds images) is one shard, output `<subfolder>.tar`.
    jsonl       an annotation file with one record per image (JourneyDB): caption field --caption-column
                (else prompt / caption / text), relative image path field --image-column (else img_path /
                image / path) under --image-root (default the file's folder). Records are cut into shards of
                --per-shard, output `<stem>-00000.tar`, ...; the json `path` is the relative path as written.
    --input-format auto picks, per pattern, the first of webdataset / files / parquet / jsonl that the
    pattern matched; paths of other kinds matched by a glob (img2dataset's `_stats.json` and metadata
    `.parquet` next to its tars, for example) are ignored and counted in the log and the manifest.
"""
from __future__ import annotations

import json
import logging
import os
import re
import tarfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from runtime.paths import expand_glob, is_glob

if TYPE_CHECKING:
    from unitok.extract import ExtractConfig

log = logging.getLogger("unitok.extract")

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
INPUT_FORMATS = ("auto", "webdataset", "parquet", "files", "jsonl")
SKIP_REASONS = ("dropped_aspect", "undecodable", "too_large", "no_image", "missing_file", "corrupt_members")
"""dropped_aspect: generation mode, aspect above --max-aspect; undecodable: not an image, truncated, damaged;
too_large: over --max-image-pixels; no_image: a sample / row / record without image data or path;
missing_file: a parquet / jsonl image path that does not exist; corrupt_members: unreadable tar members,
parquet row groups or jsonl lines (their samples are unknown)."""
RENAMED_KEYS = "renamed_keys"
"""Counted like a skip reason, but the sample is kept: its key (cleaned) repeats an earlier sample's of the
shard (a hub parquet's `key` column with repeats, or `img.1` next to `img_1`), so it is written as
`<key>_1`, `<key>_2`, ... (webdataset would merge or drop samples sharing a key). Its json keeps what
the input recorded (a parquet's `key` column as written)."""
NUM_EXAMPLES = 5  # sample ids kept (and warnings logged) per skip reason and shard
CAPTION_COLUMNS = ("caption", "prompt", "text", "txt")
JSONL_CAPTION_FIELDS = ("prompt", "caption", "text")
PARQUET_IMAGE_COLUMNS = ("jpg", "png", "jpeg", "webp", "image", "img")
JSONL_PATH_FIELDS = ("img_path", "image", "path")

# ---- input planning -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class InputShard:
    """One unit of work: an input file / folder (or a record range of a jsonl file) -> one output tar."""

    kind: str
    """webdataset | parquet | files | jsonl."""
    path: str
    """The tar, parquet, folder or jsonl file."""
    name: str
    """Output file name in --output (<name>.tar)."""
    first_record: int = 0
    """jsonl: index of the first record (non-blank line) of this shard."""
    offset: int = 0
    """jsonl: byte offset of that record."""
    num_records: int = 0
    """jsonl: records in this shard."""

    @property
    def stem(self) -> str:
        """Output name without .tar (the sidecar is <stem>.stats.json)."""
        return self.name[:-4]

    def input_bytes(self) -> int:
        """Size of the input (a folder: of its files), recorded with the codes so that a rerun notices an
        input that changed since (a truncated shard downloaded again, another dataset's shard of the same
        name). Size, not mtime: a copy to another disk keeps the codes."""
        p = Path(self.path)
        if p.is_dir():
            return sum(e.stat().st_size for e in os.scandir(p) if e.is_file())
        return p.stat().st_size


def _kind_of(p: Path) -> str | None:
    if p.is_dir():
        return "files"
    name = p.name.lower()
    if name.endswith(".tar"):
        return "webdataset"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".jsonl"):
        return "jsonl"
    return None


def _has_images(folder: Path) -> bool:
    with os.scandir(folder) as it:
        return any(e.is_file() and e.name.rsplit(".", 1)[-1].lower() in IMAGE_EXTS for e in it)


def _files_shards(folder: Path) -> list[InputShard]:
    """img2dataset `files` layout: the folder itself if it holds images, else its image subfolders."""
    if _has_images(folder):
        return [InputShard("files", str(folder), folder.name + ".tar")]
    subs = sorted(d for d in folder.iterdir() if d.is_dir() and _has_images(d))
    if not subs:
        raise ValueError(f"{folder} holds no images and no subfolders with images (img2dataset files layout "
                         f"expected); for tars or parquet files pass a pattern such as '{folder}/*.tar'")
    return [InputShard("files", str(d), d.name + ".tar") for d in subs]


def _jsonl_shards(path: Path, per_shard: int) -> list[InputShard]:
    """Cut a jsonl file into record ranges of `per_shard` non-blank lines (one pass, byte offsets)."""
    starts, n, pos = [], 0, 0
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                if n % per_shard == 0:
                    starts.append((n, pos))
                n += 1
            pos += len(line)
    stem = path.name[: -len(".jsonl")] if path.name.lower().endswith(".jsonl") else path.stem
    return [InputShard("jsonl", str(path), f"{stem}-{i:05d}.tar", first, off, min(per_shard, n - first))
            for i, (first, off) in enumerate(starts)]


def plan_inputs(cfg: ExtractConfig) -> tuple[list[InputShard], list[str]]:
    """Expand the --input patterns into shards (deterministic order); returns (shards, ignored paths).

    FileNotFoundError for a path or pattern that matches nothing, ValueError for duplicate output names or
    an explicitly named path whose format cannot be told."""
    from braceexpand import braceexpand

    order = ("webdataset", "files", "parquet", "jsonl")
    shards: list[InputShard] = []
    ignored: list[str] = []
    for pattern in cfg.input:
        explicit: list[Path] = []
        globbed: list[Path] = []
        for q in braceexpand(pattern):
            if is_glob(q):
                hits = expand_glob(q)
                if not hits:
                    raise FileNotFoundError(f"no input matches {q!r}")
                globbed += [Path(h) for h in hits]
            else:
                if not Path(q).exists():
                    raise FileNotFoundError(f"input not found: {q}")
                explicit.append(Path(q))
        kinds = {p: _kind_of(p) for p in explicit + globbed}
        if cfg.input_format != "auto":
            want = cfg.input_format
            picked = explicit + [p for p in globbed if kinds[p] == want]
            ignored += [str(p) for p in globbed if kinds[p] != want]
            kinds = {p: want for p in picked}
        else:
            for p in explicit:
                if kinds[p] is None:
                    raise ValueError(f"cannot tell the input format of {p}; pass --input-format")
            want = next((k for k in order if any(kinds[p] == k for p in globbed)), None)
            picked = explicit + [p for p in globbed if kinds[p] == want]
            ignored += [str(p) for p in globbed if kinds[p] != want]
        if not picked:
            raise FileNotFoundError(f"--input {pattern!r} matches no {cfg.input_format} input")
        for p in picked:
            kind = kinds[p]
            if kind == "files":
                if not p.is_dir():
                    raise ValueError(f"--input-format files needs folders, got the file {p}")
                shards += _files_shards(p)
            elif kind == "jsonl":
                shards += _jsonl_shards(p, cfg.per_shard)
            else:
                if not p.is_file():
                    raise ValueError(f"{kind} input {p} is not a file")
                name = p.name if kind == "webdataset" else p.name.rsplit(".", 1)[0] + ".tar"
                if kind == "webdataset" and not name.lower().endswith(".tar"):
                    name += ".tar"
                shards.append(InputShard(kind, str(p), name))
    dup = sorted(n for n, c in Counter(s.name for s in shards).items() if c > 1)
    if dup:
        raise ValueError(f"inputs share output names {dup[:5]}; extract each source to its own --output")
    if not shards:
        raise ValueError("no input shards")
    return shards, ignored


# ---- readers: one input shard -> raw samples ---------------------------------------------------------------
@dataclass
class RawSample:
    """A sample before decoding."""

    key: str
    """Sample key in the output shard."""
    image: bytes | Path | None
    """Image file bytes, a file to read (in a worker thread), or None (no image)."""
    caption: bytes | None
    """Caption (UTF-8), copied to the output `txt`."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Metadata, written to the output `json` (plus width / height)."""
    skip: str | None = None
    """A reason already known to the reader (see SKIP_REASONS)."""
    detail: str = ""
    """Why it is skipped (for the warning)."""


class ShardStats:
    """Counts per skip reason plus the first sample ids per reason; warns for those first ones."""

    def __init__(self, shard: InputShard):
        self.shard = shard
        self.counts = {"samples": 0, **{r: 0 for r in SKIP_REASONS}, RENAMED_KEYS: 0}
        self.examples: dict[str, list[str]] = {r: [] for r in (*SKIP_REASONS, RENAMED_KEYS)}

    def skip(self, reason: str, key: str, detail: str = "") -> None:
        """Count one skipped sample (or unreadable member) with the id `<input path>:<key>`."""
        self._note(reason, key, f"skipped ({reason})" + (f": {detail}" if detail else ""))

    def rename(self, key: str, new: str) -> None:
        """Count one sample written as `new` because an earlier sample of the shard has `key`."""
        self._note(RENAMED_KEYS, key, f"repeats an earlier sample's key: written as {new}")

    def _note(self, reason: str, key: str, message: str) -> None:
        self.counts[reason] += 1
        if len(self.examples[reason]) < NUM_EXAMPLES:
            sid = f"{self.shard.path}:{key}"
            self.examples[reason].append(sid)
            log.warning("%s %s", sid, message)


def _clean_key(key: str) -> str:
    # webdataset splits member names at the first dot of the basename: keys must hold neither "." nor "/"
    return str(key).replace("/", "_").replace(".", "_")


def _pick(names, wanted: str | None, defaults: tuple[str, ...], what: str, src: str) -> str | None:
    if wanted is not None:
        if wanted not in names:
            raise ValueError(f"{src}: no {what} {wanted!r} (has {sorted(names)})")
        return wanted
    return next((n for n in defaults if n in names), None)


def _text(v: Any) -> bytes | None:
    if v is None:
        return None
    return v if isinstance(v, bytes) else str(v).encode()


_MEMBER = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's rule: key = path up to the first dot of the name


def _tar_groups(shard: InputShard, stats: ShardStats) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) per run of consecutive members sharing a key, as webdataset groups them. A read
    error (truncated or damaged tar) counts one corrupt member and ends the shard; the sample being read
    then is dropped with it."""
    key, group = None, {}
    try:
        with tarfile.open(shard.path, "r|*") as tar:  # streaming: one pass, no index
            for m in tar:
                hit = _MEMBER.match(m.name) if m.isfile() else None
                if hit is None:
                    continue
                k, ext = hit.group(1), hit.group(2).lower()
                if k != key:
                    if group:
                        yield key, group
                    key, group = k, {}
                f = tar.extractfile(m)
                group[ext] = f.read() if f is not None else b""
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        stats.skip("corrupt_members", key or "start", f"{type(e).__name__}: {e}")
        return
    if group:
        yield key, group


def _read_webdataset(shard: InputShard, cfg: ExtractConfig, stats: ShardStats) -> Iterator[RawSample]:
    for key, s in _tar_groups(shard, stats):
        ext = next((e for e in IMAGE_EXTS if e in s), None)
        try:
            meta = json.loads(s["json"]) if "json" in s else {}
            if not isinstance(meta, dict):
                meta = {"json": meta}
        except (ValueError, UnicodeDecodeError):
            meta = {}
        if ext is None:
            yield RawSample(key, None, s.get("txt"), meta, skip="no_image", detail=f"members {sorted(s)}")
        else:
            yield RawSample(key, s[ext], s.get("txt"), meta)


def _resolve(rel: str, cfg: ExtractConfig, shard: InputShard) -> Path:
    root = Path(cfg.image_root) if cfg.image_root else Path(shard.path).parent
    return root / rel


def _read_parquet(shard: InputShard, cfg: ExtractConfig, stats: ShardStats) -> Iterator[RawSample]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError("parquet inputs need pyarrow: pip install pyarrow") from e

    try:
        pf = pq.ParquetFile(shard.path)
    except (OSError, ValueError) as e:  # truncated download: counted like an unreadable tar
        stats.skip("corrupt_members", "file", f"{type(e).__name__}: {e}")
        return
    names = pf.schema_arrow.names
    img_col = _pick(names, cfg.image_column, PARQUET_IMAGE_COLUMNS, "image column", shard.path)
    if img_col is None:
        raise ValueError(f"{shard.path} has no image column (columns {names}); pass --image-column. "
                         "img2dataset's .parquet next to its tars holds only metadata: extract the tars")
    cap_col = _pick(names, cfg.caption_column, CAPTION_COLUMNS, "caption column", shard.path)
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=256):
            for rec in batch.to_pylist():
                key = _clean_key(rec["key"]) if rec.get("key") not in (None, "") else f"{row:09d}"
                row += 1
                meta = {k: v for k, v in rec.items()
                        if k not in (img_col, cap_col) and (v is None or isinstance(v, (str, int, float, bool)))}
                caption = _text(rec.get(cap_col)) if cap_col else None
                v = rec[img_col]
                if isinstance(v, dict):  # HF datasets Image feature: {bytes, path}
                    path = v.get("path")
                    if path:
                        meta.setdefault("path", path)
                    if v.get("bytes") is not None:
                        v = v["bytes"]
                    elif path:
                        v = _resolve(path, cfg, shard)
                    else:
                        v = None
                if v is None:
                    yield RawSample(key, None, caption, meta, skip="no_image", detail=f"empty {img_col!r}")
                elif isinstance(v, (bytes, Path)):
                    yield RawSample(key, v, caption, meta)
                else:
                    yield RawSample(key, None, caption, meta, skip="no_image",
                                    detail=f"{img_col!r} holds {type(v).__name__}, not image bytes")
    except (OSError, ValueError) as e:  # pyarrow's errors derive from these: a damaged row group ends the file
        stats.skip("corrupt_members", f"row {row}", f"{type(e).__name__}: {e}")


def _read_files(shard: InputShard, cfg: ExtractConfig, stats: ShardStats) -> Iterator[RawSample]:
    groups: dict[str, dict[str, Path]] = {}
    for p in sorted(Path(shard.path).iterdir()):
        if p.is_file() and "." in p.name[1:] and not p.name.startswith("."):  # (.DS_Store, ._IMG.jpg: the OS's)
            # the last dot: IMG_0001.edited.jpg is an image and cat.1.png / cat.2.png are two samples;
            # a caption or metadata side file shares the image's stem (cat.1.txt)
            stem, ext = p.name.rsplit(".", 1)
            groups.setdefault(stem, {})[ext.lower()] = p
    for stem, members in groups.items():
        key = _clean_key(stem)  # "a.b" and "a_b" give one key: read_shard renames the second
        ext = next((e for e in IMAGE_EXTS if e in members), None)
        caption = members["txt"].read_bytes() if "txt" in members else None
        meta: dict[str, Any] = {}
        if "json" in members:
            try:
                meta = json.loads(members["json"].read_text())
                meta = meta if isinstance(meta, dict) else {"json": meta}
            except (ValueError, UnicodeDecodeError):
                meta = {}
        if ext is None and ("txt" in members or "json" in members):  # a sample without its image
            yield RawSample(key, None, caption, meta, skip="no_image", detail=f"files {sorted(members)}")
        elif ext is None:  # no sample at all (Thumbs.db, desktop.ini, a README.md)
            continue
        else:
            yield RawSample(key, members[ext], caption, meta)


def _read_jsonl(shard: InputShard, cfg: ExtractConfig, stats: ShardStats) -> Iterator[RawSample]:
    with open(shard.path, "rb") as f:
        f.seek(shard.offset)
        idx = shard.first_record
        end = shard.first_record + shard.num_records
        for line in f:
            if idx >= end:
                break
            if not line.strip():
                continue
            key = f"{idx:09d}"
            idx += 1
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict):
                    raise ValueError(f"a {type(rec).__name__}, not an object")
            except (ValueError, UnicodeDecodeError) as e:
                stats.skip("corrupt_members", f"record {key}", f"bad json: {e}")
                continue
            cap_f = cfg.caption_column or next((k for k in JSONL_CAPTION_FIELDS if k in rec), None)
            path_f = cfg.image_column or next((k for k in JSONL_PATH_FIELDS if k in rec), None)
            rel = rec.get(path_f) if path_f else None
            meta = {k: v for k, v in rec.items() if k not in (cap_f, path_f)}
            caption = _text(rec.get(cap_f)) if cap_f else None
            if not isinstance(rel, str) or not rel:
                yield RawSample(key, None, caption, meta, skip="no_image", detail="no image path")
                continue
            meta["path"] = rel
            yield RawSample(key, _resolve(rel, cfg, shard), caption, meta)


READERS = {"webdataset": _read_webdataset, "parquet": _read_parquet, "files": _read_files, "jsonl": _read_jsonl}


def read_shard(shard: InputShard, cfg: ExtractConfig, stats: ShardStats) -> Iterator[RawSample]:
    """The shard's samples (READERS[shard.kind]) with unique keys: a key seen before in the shard becomes
    `<key>_<n>` (the first n free), counted as renamed_keys. A code shard must not hold a key twice: webdataset
    groups consecutive members by key, so the loader would read one sample (and errors) where the manifest
    counts two. Skipped samples take their key too, so that the names do not depend on decoding."""
    used: set[str] = set()
    repeats: Counter[str] = Counter()  # per original key: the last suffix tried (keeps renaming linear)
    for raw in READERS[shard.kind](shard, cfg, stats):
        key = raw.key
        while key in used:
            repeats[raw.key] += 1
            key = f"{raw.key}_{repeats[raw.key]}"
        if key != raw.key:
            stats.rename(raw.key, key)
            raw.key = key
        used.add(key)
        yield raw
