"""Source readers: raw records from files in a deterministic, resumable order, with bad-data counters.

Kinds (on-disk formats in data_recipes/README.md):
    text          JSONL (.jsonl, .jsonl.gz, .jsonl.zst / .jsonl.zstd as DCLM's release / pools name them) or parquet;
                  one document per row in field `text`.
    pairs         code shards (webdataset tars): `codes.npy` uint16 (K, h, w), `txt` caption, optional
                  `json` (extra caption fields, `path`); each pair becomes text-to-image with
                  probability t2i_ratio, else a caption sample.
    t2i           code shards, always text-to-image (finetune sets).
    instructions  LLaVA / Mini-Gemini conversations: a JSON list or JSONL, `{id, image, conversations}`;
                  image codes are looked up by relative path in code shards (their json `path`).

Order. A source is a list of files ("shards"). Epoch e visits the shards in a permutation seeded by
(seed, source name, e); within a tar or instruction shard the records are permuted too (the shard is
read whole: code shards are small). Text files are read in order (DCLM ships pre-shuffled), so resume
can seek to a byte offset. Splitting over ranks/workers: by shard when there are at least as many
shards as splits, else by record (every split reads the shard and keeps every n-th record).

Position = (epoch, shard, record, chunk, offset): the next record to read; any position restarts the
stream exactly, so resume never replays the data stream. Per-record randomness (t2i vs caption,
caption dropout, caption choice) is a hash of (seed, source, epoch, shard, record), not RNG state.
A pair without a caption (none, empty or the release's 'no') drawn as text-to-image is a null-prompt sample, as
in the release; drawn as a caption sample it is skipped (empty_text). A caption too long for max_len is cut to
fit (counted as truncated_caption); a document cut by `text_overflow: truncate` is counted as truncated.

Bad data is skipped and counted per source: missing_image, malformed (JSON line, conversation, text
that is not valid Unicode), empty_text (also a `null` text), too_long (longer than max_len after image
expansion), corrupt (tar/member unreadable, compressed or parquet file damaged: the rest of the file is
skipped). Each reason also keeps the ids of its first MAX_EXAMPLES samples (file and key or line), so a
count in the log can be traced to the data. An error of a whole file is counted by one split only (see
`owns_file`), so the counters merged over ranks and workers hold one per damaged file.
"""
from __future__ import annotations

import gzip
import io
import json
import logging
import os
import posixpath
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Iterator

import numpy as np
from tyro.conf import Positional, arg

from mllm.data import templates as T
from mllm.data.collate import Sample
from mllm.data.recipe import Recipe, SourceConfig

log = logging.getLogger(__name__)

SKIP_REASONS = ("missing_image", "malformed", "empty_text", "too_long", "corrupt")
MAX_EXAMPLES = 3  # sample ids kept per skip reason
# Text file suffixes the `text` kind reads (the DCLM release ships `.jsonl.zst`, its S3 pools `.jsonl.zstd`).
TEXT_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".jsonl.zst", ".jsonl.zstd", ".parquet")
_MASK64 = (1 << 64) - 1


# ---- deterministic randomness ----------------------------------------------------------------------
def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def hash_uniform(*keys: int) -> float:
    """A uniform float in [0, 1) that is a pure function of integer keys (stateless, so resumable)."""
    h = 0
    for k in keys:
        h = _splitmix64(h ^ (int(k) & _MASK64))
    return (h >> 11) * 2.0 ** -53


def name_key(name: str) -> int:
    """Stable integer for a source name (adding a source does not change the others' order)."""
    return zlib.crc32(name.encode("utf-8"))


def permutation(n: int, *keys: int) -> np.ndarray:
    """Permutation of range(n) seeded by keys."""
    return np.random.default_rng([int(k) & _MASK64 for k in keys]).permutation(n)


# ---- records and positions ---------------------------------------------------------------------------
@dataclass
class TextRecord:
    """One text document."""

    key: str
    text: str


@dataclass
class PairRecord:
    """One image (as codes) with its caption and json metadata."""

    key: str
    codes: np.ndarray
    """(K, h, w) integer codes."""
    caption: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class InstructionRecord:
    """One conversation with the codes of its images."""

    key: str
    conversations: list[dict[str, Any]]
    images: list[np.ndarray] = field(default_factory=list)


@dataclass
class Position:
    """Where a source stream continues: the next record to read."""

    epoch: int = 0
    shard: int = 0
    """Index into this epoch's (split-filtered) shard order."""
    record: int = 0
    """Index into the shard's record order."""
    chunk: int = 0
    """Next sample of a record that produced several (split text)."""
    offset: int = 0
    """Byte offset of `record` in a plain JSONL file (fast resume); 0 elsewhere."""

    def to_list(self) -> list[int]:
        """JSON-able form."""
        return [self.epoch, self.shard, self.record, self.chunk, self.offset]

    @classmethod
    def from_list(cls, v) -> "Position":
        """Inverse of to_list."""
        return cls(*[int(x) for x in v])


def structured_stats(counters: dict[str, int], examples: dict[str, list[str]]) -> dict[str, Any]:
    """A source's raw counters (kind counts and "skipped/<reason>") and skip examples -> {records, samples,
    <kind counts>, skipped: {reason: n}, examples: {reason: [ids]}}."""
    out: dict[str, Any] = {"records": 0, "samples": 0}
    skipped = {r: 0 for r in SKIP_REASONS}
    for k, v in counters.items():
        if k.startswith("skipped/"):
            skipped[k[len("skipped/"):]] = v
        else:
            out[k] = v
    out["skipped"] = skipped
    out["examples"] = {r: list(v) for r, v in examples.items()}
    return out


class _ProbeDone(Exception):
    """Source.probe's record budget is spent (raised from inside a reader)."""


class Skip(Exception):
    """A record is bad; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


# ---- base ----------------------------------------------------------------------------------------------
class Source:
    """A source of one recipe entry: iterate it for raw records, `stream()` for templated samples."""

    kind = ""

    def __init__(self, cfg: SourceConfig, files: list[Path], tokenizer=None, *, seed: int = 0,
                 max_len: int | None = None, boi_id: int = T.BOI_TOKEN_ID, eoi_id: int = T.EOI_TOKEN_ID,
                 codebooks: tuple[int, int] | None = None):
        if not files:
            raise ValueError(f"source {cfg.name!r} has no files")
        self.cfg, self.files, self.tokenizer = cfg, list(files), tokenizer
        self.seed, self.max_len, self.boi_id, self.eoi_id = seed, max_len, boi_id, eoi_id
        self.codebooks = codebooks  # (K sub-codes per position, codes per sub-codebook) of the model, if known
        self.counters: dict[str, int] = {}
        self.examples: dict[str, list[str]] = {}
        """skip reason -> ids of its first MAX_EXAMPLES samples"""
        self._warned: set[str] = set()
        self._probe_left: int | None = None  # Source.probe: records left to read in this file

    @property
    def name(self) -> str:
        """The recipe's source name."""
        return self.cfg.name

    # -- counters
    def count(self, key: str, n: int = 1) -> None:
        """Increment a counter."""
        self.counters[key] = self.counters.get(key, 0) + n

    def skip(self, reason: str, detail: str = "") -> None:
        """Count a skipped record, keep its id (`detail` starts with it) if among the first few, and
        warn once per reason."""
        self.count("skipped/" + reason)
        ex = self.examples.setdefault(reason, [])
        if len(ex) < MAX_EXAMPLES:
            ex.append(detail[:200])
        if reason not in self._warned:
            self._warned.add(reason)
            log.warning("source %s: skipping bad data (%s) %s; further ones are only counted",
                        self.name, reason, detail[:200])
        self._spend_probe()

    def _spend_probe(self) -> None:
        if self._probe_left is not None:
            self._probe_left -= 1
            if self._probe_left <= 0:
                raise _ProbeDone

    def stats(self) -> dict[str, Any]:
        """{records, samples, <kind counts>, skipped: {reason: n}, examples: {reason: [ids]}}."""
        return structured_stats(self.counters, self.examples)

    # -- order
    def shard_order(self, epoch: int, split: int, num_splits: int) -> tuple[list[int], bool]:
        """(shard ids of this split in epoch order, whether records are split instead of shards)."""
        n = len(self.files)
        order = (permutation(n, self.seed, name_key(self.name), epoch).tolist() if self.cfg.shuffle
                 else list(range(n)))
        if n >= num_splits:
            return order[split::num_splits], False
        return order, True

    @staticmethod
    def owns_file(shard: int, split: int, num_splits: int, by_record: bool) -> bool:
        """Whether this split counts errors of a whole file: split by record, every split reads the file
        and would count its damage once each; only split shard % num_splits does."""
        return not by_record or shard % num_splits == split

    def record_order(self, n: int, epoch: int, shard: int) -> list[int]:
        """Order of the n records of a whole-read shard."""
        if not self.cfg.shuffle:
            return list(range(n))
        return permutation(n, self.seed, name_key(self.name), epoch, shard, 1).tolist()

    def uniform(self, epoch: int, shard: int, record: int, purpose: int) -> float:
        """Per-record random number (pure function of the record's identity)."""
        return hash_uniform(self.seed, name_key(self.name), epoch, shard, record, purpose)

    # -- to be implemented per kind
    def shard_records(self, shard: int, epoch: int, start: Position, split: int, num_splits: int,
                      by_record: bool) -> Iterator[tuple[int, Any, int, int]]:
        """Yield (record index, record, its byte offset, byte offset of the next record) from `start`
        on (offsets only for seekable text files, else 0); bad records are counted, not yielded."""
        raise NotImplementedError

    def to_samples(self, record, epoch: int, shard: int, index: int) -> list[Sample]:
        """Template one record (counted skips give [])."""
        raise NotImplementedError

    def probe(self, n_files: int, n_records: int) -> tuple[int, int, list[Path]]:
        """Template the first `n_records` records (good or skipped) of up to `n_files` files spread over the
        list (first, last, between), in file order: (records read, records that gave samples, files read).
        Skips are counted and kept as in a run. A run takes a whole pass over every file to find out that a
        source has no usable record; this reads a bounded few."""
        n = len(self.files)
        picks = sorted({round(i * (n - 1) / max(n_files - 1, 1)) for i in range(min(n_files, n))})
        read = usable = 0
        for shard in picks:
            self._probe_left = n_records
            try:
                for idx, rec, _, _ in self.shard_records(shard, 0, Position(), 0, 1, False):
                    self._probe_left, left = None, self._probe_left  # a skip while templating is this record's
                    usable += bool(self.to_samples(rec, 0, shard, idx))
                    self._probe_left = left
                    self._spend_probe()
            except _ProbeDone:
                pass
            read += n_records - self._probe_left
            self._probe_left = None
        return read, usable, [self.files[i] for i in picks]

    def check_codes(self, codes: np.ndarray) -> np.ndarray:
        """`codes` if the model can embed them; ValueError otherwise (counted as corrupt by the caller). Out of
        range, they crashed the forward with a bare IndexError on CPU, a device-side assert on a GPU."""
        if self.codebooks is not None:
            k, v = self.codebooks
            if codes.shape[0] != k:
                raise ValueError(f"codes have {codes.shape[0]} sub-codes per position, the model {k}")
            if codes.size and (int(codes.min()) < 0 or int(codes.max()) >= v):
                raise ValueError(f"codes range over [{int(codes.min())}, {int(codes.max())}], the model's codebooks "
                                 f"hold {v} codes (another tokenizer's shards?)")
        return codes

    # -- iteration
    def _check_len(self, s: Sample, key: str) -> Sample | None:
        if self.max_len is not None and s.expanded_length() > self.max_len:
            self.skip("too_long", f"{key}: {s.expanded_length()} positions > max_len {self.max_len}")
            return None
        return s

    def records(self, start: Position | None = None, split: int = 0, num_splits: int = 1,
                infinite: bool = False) -> Iterator[tuple[Any, int, int, int]]:
        """Raw records from `start`: (record, epoch, global shard id, record index)."""
        pos = start or Position()
        epoch, si, ri, off = pos.epoch, pos.shard, pos.record, pos.offset
        while True:
            order, by_record = self.shard_order(epoch, split, num_splits)
            while si < len(order):
                p = Position(epoch, si, ri, 0, off)
                for idx, rec, _, _ in self.shard_records(order[si], epoch, p, split, num_splits, by_record):
                    yield rec, epoch, order[si], idx
                si, ri, off = si + 1, 0, 0
            if not infinite:
                return
            epoch, si = epoch + 1, 0

    def __iter__(self) -> Iterator[Any]:
        """One pass of raw records (epoch 0, no split)."""
        for rec, *_ in self.records():
            yield rec

    def stream(self, start: Position | None = None, split: int = 0, num_splits: int = 1,
               infinite: bool = True) -> Iterator[tuple[Sample, Position]]:
        """Templated samples with the position that follows each one."""
        pos = start or Position()
        epoch, si, ri, chunk, off = pos.epoch, pos.shard, pos.record, pos.chunk, pos.offset
        fresh_epoch = si == 0 and ri == 0 and chunk == 0
        empty: set[int] = set()  # shards read in this split's passes since it last produced a sample
        empty_passes = 0
        while True:
            produced = False
            order, by_record = self.shard_order(epoch, split, num_splits)
            while si < len(order):
                g = order[si]
                p = Position(epoch, si, ri, 0, off)
                for idx, rec, own_off, next_off in self.shard_records(g, epoch, p, split, num_splits, by_record):
                    samples = self.to_samples(rec, epoch, g, idx)
                    for c in range(chunk, len(samples)):
                        self.count("samples")
                        produced = True
                        if c + 1 < len(samples):
                            yield samples[c], Position(epoch, si, idx, c + 1, own_off)
                        else:
                            yield samples[c], Position(epoch, si, idx + 1, 0, next_off)
                    chunk = 0
                si, ri, off = si + 1, 0, 0
            if not infinite:
                return
            if produced:
                empty, empty_passes = set(), 0
            elif fresh_epoch:
                # A split reads a share of the shards, reshuffled every epoch: an empty pass may be one bad shard's.
                # Only when its empty passes have covered every file (or the order never changes, or 50 passes)
                # is the source unusable here; training would otherwise wait on it forever.
                empty |= set(order)
                empty_passes += 1
                if len(empty) == len(self.files) or not self.cfg.shuffle or empty_passes >= 50:
                    raise ValueError(f"source {self.name!r} produced no usable sample in {empty_passes} pass(es) over "
                                     f"{len(empty)} of its {len(self.files)} files for split {split}/{num_splits}; "
                                     f"stats: {self.stats()}")
            epoch, si, ri, chunk, off, fresh_epoch = epoch + 1, 0, 0, 0, 0, True


# ---- text ------------------------------------------------------------------------------------------------
def _require(module: str, path: Path, what: str):
    try:
        return __import__(module)
    except ImportError:
        raise ImportError(f"reading {path} needs the optional package `{module}` ({what}); "
                          f"install it with `pip install {module}` or convert the file to plain .jsonl") from None


def check_text_file(path: Path, source: str) -> None:
    """ValueError for a suffix the text reader does not know; ImportError if its reader is missing."""
    name = path.name.lower()
    if not name.endswith(TEXT_SUFFIXES):
        raise ValueError(f"source {source!r}: unsupported text file {path} (suffixes: {', '.join(TEXT_SUFFIXES)})")
    if name.endswith((".zst", ".zstd")):
        _require("zstandard", path, "zstd-compressed JSONL")
    elif name.endswith(".parquet"):
        _require("pyarrow", path, "parquet")


class _ZstdReader(io.RawIOBase):
    """The decompressed bytes of a .zst file, frame after frame, raising zstd.ZstdError where the file ends
    inside a frame. Written here because zstandard's `stream_reader` ends a cut file silently (0.25): an
    interrupted download would read as a shorter shard, with nothing counted."""

    def __init__(self, path: Path, zstd):
        self._file, self._zstd = open(path, "rb"), zstd
        self._dctx = zstd.ZstdDecompressor()
        self._frame = None  # the frame being decompressed (None: between frames)
        self._out, self._pos = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while self._pos == len(self._out):
            chunk = self._file.read(1 << 20)
            if not chunk:
                if self._frame is not None and not self._frame.eof:
                    raise self._zstd.ZstdError("the file ends inside a zstd frame (truncated)")
                return 0
            self._out, self._pos = b"", 0
            while chunk:  # a chunk may finish one frame and start the next
                if self._frame is None or self._frame.eof:
                    self._frame = self._dctx.decompressobj()
                self._out += self._frame.decompress(chunk)
                chunk = self._frame.unused_data if self._frame.eof else b""
        n = min(len(b), len(self._out) - self._pos)
        b[:n] = self._out[self._pos:self._pos + n]
        self._pos += n
        return n

    def close(self) -> None:
        self._file.close()
        super().close()


class TextSource(Source):
    """Documents from JSONL / JSONL.gz / JSONL.zst / parquet files (field `text_field`)."""

    kind = "text"

    def __init__(self, cfg, files, tokenizer=None, **kw):
        super().__init__(cfg, files, tokenizer, **kw)
        for f in self.files:  # fail at construction, not hours into a run
            check_text_file(f, cfg.name)

    def _lines(self, path: Path, start: Position, owner: bool = True) -> Iterator[tuple[int, bytes, int, int]]:
        """(line index, raw line, its byte offset, offset after it) from start.record; plain JSONL seeks
        to start.offset, compressed files skip lines by count (offsets 0). A damaged compressed file (cut
        short, bad CRC, not compressed at all) ends at the damage, counted as corrupt if `owner`."""
        name = path.name.lower()
        if name.endswith(".jsonl") or name.endswith(".json"):
            with open(path, "rb") as f:
                f.seek(start.offset)
                idx, off = start.record, start.offset
                for line in f:
                    yield idx, line, off, off + len(line)
                    off += len(line)
                    idx += 1
            return
        errors: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error)  # gzip: BadGzipFile is an OSError
        if name.endswith(".gz"):
            fh = gzip.open(path, "rb")  # (.zst / .zstd below)
        else:
            zstd = _require("zstandard", path, "zstd-compressed JSONL")
            fh = io.BufferedReader(_ZstdReader(path, zstd), buffer_size=1 << 16)
            errors += (zstd.ZstdError,)
        n = 0  # lines read whole
        try:
            with fh:  # compressed streams cannot seek: skip lines by count
                for idx, line in enumerate(fh):
                    n = idx + 1
                    if idx >= start.record:
                        yield idx, line, 0, 0
        except errors as e:
            # An interrupted download or an error page saved under the shard's name: the lines before the
            # damage were used, the rest of the file is lost. Raising would end training, and a resume
            # would reach the same line again.
            if owner:
                self.skip("corrupt", f"{path}:{n + 1}: {type(e).__name__}: {e} (rest of the file skipped)")

    def shard_records(self, shard, epoch, start, split, num_splits, by_record):
        path = self.files[shard]
        field = self.cfg.text_field
        if path.name.lower().endswith(".parquet"):
            _require("pyarrow", path, "parquet")
            import pyarrow
            import pyarrow.parquet as pq

            idx = 0
            try:
                for batch in pq.ParquetFile(str(path)).iter_batches(columns=[field]):
                    for value in batch.column(0).to_pylist():
                        if idx >= start.record and (not by_record or idx % num_splits == split):
                            rec = self._text_record(f"{path.name}:row {idx}", value)
                            if rec is not None:
                                yield idx, rec, 0, 0
                        idx += 1
            except (OSError, pyarrow.ArrowException) as e:  # as compressed JSONL: the rest of the file is lost
                if self.owns_file(shard, split, num_splits, by_record):
                    self.skip("corrupt", f"{path}:row {idx}: {type(e).__name__}: {e} (rest of the file skipped)")
            return
        owner = self.owns_file(shard, split, num_splits, by_record)
        for idx, line, own, off in self._lines(path, start, owner):
            if by_record and idx % num_splits != split:
                continue
            if not line.strip():
                continue  # blank separator lines are not records
            try:
                obj = json.loads(line)
                value = obj.get(field) if isinstance(obj, dict) else None  # null text: empty_text
            except (ValueError, UnicodeDecodeError) as e:
                self.skip("malformed", f"{path.name}:{idx + 1}: {e}")
                continue
            if not isinstance(obj, dict) or field not in obj:
                self.skip("malformed", f"{path.name}:{idx + 1}: no field {field!r}")
                continue
            rec = self._text_record(f"{path.name}:{idx + 1}", value)  # file:line
            if rec is not None:
                yield idx, rec, own, off

    def _text_record(self, key: str, value) -> TextRecord | None:
        if value is None:  # DCLM rows can carry `"text": null`
            self.skip("empty_text", f"{key}: {self.cfg.text_field!r} is null")
            return None
        if not isinstance(value, str):
            self.skip("malformed", f"{key}: field {self.cfg.text_field!r} is not a string")
            return None
        if not value.strip():
            self.skip("empty_text", key)
            return None
        self.count("records")
        return TextRecord(key, value)

    def to_samples(self, record, epoch, shard, index):
        try:
            out = T.text_samples(self.tokenizer, record.text, self.max_len, self.cfg.text_overflow)
        except ValueError as e:  # text that is not valid Unicode
            self.skip("malformed", f"{record.key}: {e}")
            return []
        if not out:
            self.skip("too_long", f"{record.key}: longer than max_len {self.max_len} (text_overflow skip)")
        elif self.cfg.text_overflow == "truncate" and out[0].input_ids[-1] != T.special_ids(self.tokenizer)[1]:
            self.count("truncated")  # (a window that ends before the document's eos)
        return out


# ---- code shards -----------------------------------------------------------------------------------------
def read_tar_samples(path: Path, on_error) -> list[dict[str, Any]]:
    """All samples of a webdataset tar ({__key__, ext: bytes}); read errors go to on_error(exn)."""
    import webdataset as wds

    errors = []

    def handler(exn):
        errors.append(exn)
        on_error(exn)
        return True  # keep what was read before the damage

    samples = list(wds.tariterators.tarfile_samples([{"url": str(path)}], handler=handler))
    if not errors and not _has_end_marker(path):
        # tarfile stops silently when a file is cut at a header boundary; a complete archive ends
        # with two zero blocks.
        on_error(ValueError(f"{path} is truncated (no end-of-archive marker)"))
    return samples


def _has_end_marker(path: Path) -> bool:
    size = path.stat().st_size
    if size < 1024:
        return False
    with open(path, "rb") as f:
        f.seek(size - 1024)
        return f.read(1024) == bytes(1024)


def decode_codes(data: bytes) -> np.ndarray:
    """codes.npy bytes -> (K, h, w) integer array; ValueError if unreadable."""
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # numpy raises several types for damaged bytes
        raise ValueError(f"unreadable codes.npy: {e}") from e
    if arr.ndim != 3 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"codes.npy must be an integer (K, h, w) array, got {arr.dtype} {arr.shape}")
    return arr


class PairSource(Source):
    """Image codes + captions from code shards; text-to-image with probability t2i_ratio, else caption."""

    kind = "pairs"

    def __init__(self, cfg, files, tokenizer=None, **kw):
        super().__init__(cfg, files, tokenizer, **kw)
        self._cache: tuple[int, list] | None = None  # (shard id, samples): the shard being read

    def _shard(self, shard: int, owner: bool = True) -> list[dict[str, Any]]:
        if self._cache is None or self._cache[0] != shard:
            path = self.files[shard]
            on_error = (lambda e: self.skip("corrupt", f"{path}: {e}")) if owner else (lambda e: None)
            self._cache = (shard, read_tar_samples(path, on_error))
        return self._cache[1]

    def shard_records(self, shard, epoch, start, split, num_splits, by_record):
        samples = self._shard(shard, self.owns_file(shard, split, num_splits, by_record))
        order = self.record_order(len(samples), epoch, shard)
        for idx in range(start.record, len(order)):
            if by_record and idx % num_splits != split:
                continue
            rec = self._decode(samples[order[idx]])
            if rec is not None:
                yield idx, rec, 0, 0

    def _decode(self, s: dict[str, Any]) -> PairRecord | None:
        key = f"{Path(s.get('__url__', '')).name}:{s.get('__key__')}"
        if "codes.npy" not in s:
            self.skip("missing_image", f"{key} has no codes.npy")
            return None
        try:
            codes = self.check_codes(decode_codes(s["codes.npy"]))
        except ValueError as e:
            self.skip("corrupt", f"{key}: {e}")
            return None
        try:
            caption = s.get("txt", b"").decode("utf-8").strip()
            meta = json.loads(s["json"]) if "json" in s else {}
            if not isinstance(meta, dict):
                raise ValueError("json member is not an object")
        except (ValueError, UnicodeDecodeError) as e:
            self.skip("malformed", f"{key}: {e}")
            return None
        self.count("records")
        return PairRecord(key, codes, caption, meta)

    def choose_caption(self, rec: PairRecord, u: float) -> str:
        """The release's rule: the `caption_field` caption with probability caption_field_prob when
        both exist, else whichever exists ('no', the release's mark of an absent caption, counts as absent)."""
        alt = rec.meta.get(self.cfg.caption_field) if self.cfg.caption_field else None
        alt, main = (c.strip() if isinstance(c, str) and c.strip() != "no" else "" for c in (alt, rec.caption))
        if alt and main:
            return alt if u < self.cfg.caption_field_prob else main
        return alt or main

    def to_samples(self, record, epoch, shard, index):
        caption = self.choose_caption(record, self.uniform(epoch, shard, index, 1))
        t2i = self.uniform(epoch, shard, index, 0) < self.cfg.t2i_ratio
        if not caption and not t2i:
            self.skip("empty_text", record.key)
            return []
        # text-to-image without a caption is a null-prompt sample, as in the release
        null = t2i and (not caption or self.uniform(epoch, shard, index, 2) < self.cfg.caption_dropout)
        tag = "null_prompt" if null else "t2i" if t2i else "caption"

        def build(text: str) -> Sample:
            if t2i:
                return T.t2i_sample(self.tokenizer, None if null else text, record.codes, self.boi_id, self.eoi_id)
            return T.caption_sample(self.tokenizer, text, record.codes, self.boi_id, self.eoi_id)

        try:
            s = build(caption)
            # A caption too long for max_len is cut to fit, as the release cuts captions to 1750 tokens (its
            # 2048 less one image); re-tokenising the cut text can differ by a token, hence the loop.
            for _ in range(3):
                over = s.expanded_length() - self.max_len if self.max_len is not None and not null else 0
                if over <= 0:
                    break
                caption = T.shorten(self.tokenizer, caption, len(T.encode_plain(self.tokenizer, caption)) - over)
                if not caption:
                    break
                s = build(caption)
                if s.expanded_length() <= self.max_len:
                    self.count("truncated_caption")
        except ValueError as e:  # a caption (from the json member) that is not valid Unicode
            self.skip("malformed", f"{record.key}: {e}")
            return []
        if self._check_len(s, record.key) is None:
            return []
        self.count(tag)
        return [s]


class T2ISource(PairSource):
    """Finetune text-to-image sets: code shards, every pair is a text-to-image sample."""

    kind = "t2i"


# ---- instructions -----------------------------------------------------------------------------------------
class CodeIndex:
    """Relative image path -> location of its codes.npy inside code shards (random access by offset).

    Built by scanning the shards' json `path` fields; optionally cached as JSON (rebuilt when the
    shards' sizes or mtimes change). Lookups fall back to the path without its extension (Mini-Gemini
    ocr_vqa images are .jpg in the json but may be stored as .png).
    """

    VERSION = 1

    def __init__(self, shards: list[Path], cache: Path | None = None, on_error=None):
        self.shards = [Path(p) for p in shards]
        self.on_error = on_error or (lambda e: log.warning("code index: %s", e))
        sig = [[str(p), p.stat().st_size, int(p.stat().st_mtime)] for p in self.shards]
        self.entries: dict[str, list[int]] = {}
        if cache is not None and Path(cache).is_file():
            try:
                data = json.loads(Path(cache).read_text())
                if data.get("version") == self.VERSION and data.get("shards") == sig:
                    self.entries = data["entries"]
            except (ValueError, KeyError):
                self.entries = {}
        if not self.entries:
            self._build()
            if cache is not None:  # atomically, next to the shards: readers never see a partial index
                tmp = Path(f"{cache}.tmp-{os.getpid()}")
                try:
                    tmp.write_text(json.dumps({"version": self.VERSION, "shards": sig, "entries": self.entries}))
                    os.replace(tmp, cache)
                except OSError as e:
                    tmp.unlink(missing_ok=True)
                    raise OSError(f"cannot write the image index {cache}: {e.strerror or e}") from None
        # one image under several spellings (./coco/a.jpg, coco/a.jpg): pack_images keeps one, the lookup
        # compares normalized paths
        self._normal = {posixpath.normpath(k): v for k, v in self.entries.items()}
        self._stems = {os.path.splitext(k)[0]: v for k, v in self._normal.items()}

    def _build(self) -> None:
        for si, path in enumerate(self.shards):
            members: dict[str, dict[str, Any]] = {}
            try:
                with tarfile.open(path, "r:") as tf:
                    for m in tf:
                        if not m.isreg():
                            continue
                        base = os.path.basename(m.name)
                        key, _, ext = base.partition(".")
                        key = os.path.join(os.path.dirname(m.name), key)
                        d = members.setdefault(key, {})
                        if ext == "json":
                            d["json"] = tf.extractfile(m).read()
                        elif ext == "codes.npy":
                            d["loc"] = [si, m.offset_data, m.size]
            except (tarfile.TarError, OSError) as e:
                self.on_error(f"{path}: {e}")
            for key, d in members.items():
                if "json" not in d or "loc" not in d:
                    continue
                try:
                    rel = json.loads(d["json"]).get("path")
                except (ValueError, AttributeError):
                    continue
                if isinstance(rel, str) and rel:
                    self.entries[rel] = d["loc"]

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, path: str) -> bool:
        return self.locate(path) is not None

    def locate(self, path: str) -> list[int] | None:
        """[shard, offset, size] or None."""
        if loc := self.entries.get(path):
            return loc
        path = posixpath.normpath(path)
        return self._normal.get(path) or self._stems.get(os.path.splitext(path)[0])

    def load(self, path: str) -> np.ndarray | None:
        """Codes of an image, None if unknown; ValueError if the member is damaged."""
        loc = self.locate(path)
        if loc is None:
            return None
        si, off, size = loc
        with open(self.shards[si], "rb") as f:
            f.seek(off)
            data = f.read(size)
        if len(data) != size:
            raise ValueError(f"{self.shards[si]} is truncated at the codes of {path}")
        return decode_codes(data)


class InstructionSource(Source):
    """LLaVA / Mini-Gemini conversations (JSON list or JSONL files) with images from code shards."""

    kind = "instructions"

    def __init__(self, cfg, files, tokenizer=None, image_files: list[Path] = (), index_path: Path | None = None,
                 index_cache: dict | None = None, **kw):
        super().__init__(cfg, files, tokenizer, **kw)
        self.image_files = list(image_files)
        self.index_path = index_path
        self._index: CodeIndex | None = None
        self._index_cache = index_cache  # shared between streams of one process
        self._cache: tuple[int, list] | None = None
        self._split = 0  # the split being read (shard_records)

    @property
    def index(self) -> CodeIndex:
        """The path -> codes index (built on first use)."""
        if self._index is None:
            key = (tuple(map(str, self.image_files)), str(self.index_path))
            if self._index_cache is not None and key in self._index_cache:
                self._index = self._index_cache[key]
            else:
                # every reader without a cached image_index builds its own; one counts the shards it
                # cannot read, as owns_file does for a whole file
                owner = self._split == 0
                self._index = CodeIndex(self.image_files, self.index_path,
                                        on_error=lambda e: self.skip("corrupt", str(e)) if owner else None)
                if self._index_cache is not None:
                    self._index_cache[key] = self._index
        return self._index

    def _shard(self, shard: int, owner: bool = True) -> list:
        """Raw items of one file as (id for messages, item): parsed dicts of a JSON list ("file[i]") or
        raw lines of a JSONL file ("file:line", parsed lazily); an unreadable file is counted if `owner`."""
        if self._cache is None or self._cache[0] != shard:
            path = self.files[shard]
            items: list = []
            try:
                if path.name.lower().endswith(".jsonl"):
                    items = [(f"{path.name}:{n}", ln) for n, ln in enumerate(path.read_bytes().splitlines(), 1)
                             if ln.strip()]
                else:
                    rows = json.loads(path.read_bytes())
                    if not isinstance(rows, list):
                        raise ValueError("top level is not a list")
                    items = [(f"{path.name}[{i}]", row) for i, row in enumerate(rows)]
            except (ValueError, UnicodeDecodeError) as e:
                if owner:
                    self.skip("malformed", f"{path}: {e}")
                items = []
            self._cache = (shard, items)
        return self._cache[1]

    def shard_records(self, shard, epoch, start, split, num_splits, by_record):
        self._split = split
        items = self._shard(shard, self.owns_file(shard, split, num_splits, by_record))
        order = self.record_order(len(items), epoch, shard)
        for idx in range(start.record, len(order)):
            if by_record and idx % num_splits != split:
                continue
            where, item = items[order[idx]]
            rec = self._decode(item, where)
            if rec is not None:
                yield idx, rec, 0, 0

    def _decode(self, item, where: str) -> InstructionRecord | None:
        try:
            obj = json.loads(item) if isinstance(item, (bytes, str)) else item
            if not isinstance(obj, dict) or not isinstance(obj.get("conversations"), list):
                raise ValueError("expected an object with a `conversations` list")
        except (ValueError, UnicodeDecodeError) as e:
            self.skip("malformed", f"{where}: {e}")
            return None
        if "id" in obj:
            where = f"{where} id={obj['id']}"
        img = obj.get("image")
        paths = [] if img in (None, "") else ([img] if isinstance(img, str) else img)
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            self.skip("malformed", f"{where}: `image` must be a path or a list of paths")
            return None
        images = []
        for p in paths:
            try:
                codes = self.index.load(p) if self.image_files else None
                if codes is not None:
                    self.check_codes(codes)
            except ValueError as e:
                self.skip("corrupt", f"{where}: {e}")
                return None
            if codes is None:
                self.skip("missing_image", f"{where}: no codes for image {p!r}")
                return None
            images.append(codes)
        self.count("records")
        return InstructionRecord(where, obj["conversations"], images)

    def _leading_rounds(self, record) -> Sample | None:
        """The longest run of leading turns (whole question-answer rounds, with every image) that fits max_len,
        counted as truncated_conversation; None when not even the first round fits. The rest of the conversation
        was dropped with its first rounds (LLaVA cuts the tokens at its max length, mid-answer or mid-image)."""
        turns = record.conversations
        images = [t.get("value", "").count(T.IMAGE_PLACEHOLDER) for t in turns]
        for n in range(len(turns) - 1, 1, -1):
            if sum(images[:n]) != sum(images):  # an image's turn cut: it would move to the front
                continue
            try:
                s = T.conversation_sample(self.tokenizer, turns[:n], record.images, self.cfg.template)
            except ValueError:  # the cut dropped an image's placeholder, or left no answer
                continue
            if s.expanded_length() <= self.max_len:
                self.count("truncated_conversation")
                return s
        return None

    def to_samples(self, record, epoch, shard, index):
        try:
            s = T.conversation_sample(self.tokenizer, record.conversations, record.images, self.cfg.template)
        except ValueError as e:
            self.skip("malformed", f"{record.key}: {e}")
            return []
        if self.max_len is not None and s.expanded_length() > self.max_len:
            s = self._leading_rounds(record) or s  # the first whole rounds that fit, else too_long below
        if self._check_len(s, record.key) is None:
            return []
        self.count("with_image" if record.images else "text_only")
        return [s]


# ---- factory ------------------------------------------------------------------------------------------------
SOURCE_CLASSES = {"text": TextSource, "pairs": PairSource, "t2i": T2ISource, "instructions": InstructionSource}


def build_source(recipe: Recipe, cfg: SourceConfig, tokenizer=None, *, seed: int = 0, max_len: int | None = None,
                 boi_id: int = T.BOI_TOKEN_ID, eoi_id: int = T.EOI_TOKEN_ID,
                 index_cache: dict | None = None, codebooks: tuple[int, int] | None = None) -> Source:
    """Instantiate the reader of one recipe source."""
    kw: dict[str, Any] = dict(seed=seed, max_len=max_len, boi_id=boi_id, eoi_id=eoi_id, codebooks=codebooks)
    if cfg.kind == "instructions":
        kw.update(image_files=recipe.image_files(cfg), index_path=recipe.image_index(cfg), index_cache=index_cache)
    return SOURCE_CLASSES[cfg.kind](cfg, recipe.files(cfg), tokenizer, **kw)


@dataclass
class SplitJsonConfig:
    """Split a big LLaVA JSON list (e.g. mgm_instruction.json) into JSONL shards (`split-json`)."""

    src: Annotated[Positional[str], arg(metavar="IN_JSON")]
    """The JSON list to split."""
    out_dir: Annotated[Positional[str], arg(metavar="OUT_DIR")]
    """Folder for the shards 00000.jsonl, 00001.jsonl, ..."""
    per_shard: int = 10000
    """Records per shard."""

    def __post_init__(self):
        if self.per_shard < 1:
            raise ValueError(f"--per-shard must be >= 1, got {self.per_shard}")


def _jsonl_line(x) -> str:
    line = json.dumps(x, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate ("\ud83d" in the input) has no UTF-8 form: keep the escape
        line = json.dumps(x)
    return line + "\n"


def split_json_list(src: str | os.PathLike, out_dir: str | os.PathLike,
                    per_shard: int = SplitJsonConfig.per_shard) -> list[Path]:
    """Split a big LLaVA JSON list (e.g. mgm_instruction.json) into JSONL shards 00000.jsonl, ...

    Many small shards shuffle better and spare every rank from parsing a multi-GB JSON file. Records are
    copied as they are: one with a lone surrogate escape keeps it (the reader counts it as malformed).
    """
    items = json.loads(Path(src).read_bytes())
    if not isinstance(items, list):
        raise ValueError(f"{src}: top level is not a JSON list")
    if not items:
        raise ValueError(f"{src}: the list is empty")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = -(-len(items) // per_shard)
    # shards of an earlier split that this one does not overwrite would be read beside it (the recipes glob
    # OUT_DIR/*.jsonl): their records twice
    stale = sorted(p.name for p in out.glob("*.jsonl") if p.name not in {f"{i:05d}.jsonl" for i in range(n)})
    if stale:
        raise FileExistsError(f"{out} holds {len(stale)} .jsonl files this split does not write (e.g. {stale[:3]}), "
                              "which a recipe would read beside it: remove them or choose an empty folder")
    paths = []
    for i in range(0, len(items), per_shard):
        p = out / f"{i // per_shard:05d}.jsonl"
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text("".join(_jsonl_line(x) for x in items[i:i + per_shard]), encoding="utf-8")
        os.replace(tmp, p)
        paths.append(p)
    return paths


# the subcommands of `python -m mllm.data.sources` (tyro: one per config class)
COMMANDS = {"split-json": SplitJsonConfig}


def main(argv: list[str] | None = None) -> None:
    """`python -m mllm.data.sources split-json IN.json OUT_DIR [--per-shard N]`."""
    import tyro

    cfg = tyro.extras.subcommand_cli_from_dict(COMMANDS, prog="python -m mllm.data.sources", args=argv,
                                               description="tools for the data sources",
                                               config=(tyro.conf.FlagCreatePairsOff,))
    paths = split_json_list(cfg.src, cfg.out_dir, cfg.per_shard)
    print(f"wrote {len(paths)} shards to {cfg.out_dir}")


if __name__ == "__main__":
    main()
