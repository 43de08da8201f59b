"""Pack the images that LLaVA / Mini-Gemini conversation files refer to into webdataset image shards.

    python -m mllm.data.pack_images --conversations MGM-Finetune/mgm_instruction.json \
        [--conversations MORE.json ...] --image-root MGM-Finetune --out raw/mgm [--per-shard 1000] [--threads 8]
    torchrun --nproc_per_node 8 -m mllm.data.pack_images ...        (or the deepspeed launcher)

Input: JSON lists (or `.jsonl` files) of {"id", "image": "rel/path.jpg" | [paths] | absent, "conversations"}.
The unique image paths are sorted; shard i holds paths[i * per_shard : (i + 1) * per_shard], so the
layout is a pure function of the path list and every rank (and every rerun) agrees on it. Paths are
unique after `posixpath.normpath` ("./coco/a.jpg" and "coco/a.jpg" name one image, packed once): the
one kept is the normalized spelling where a file writes it so, else the first; the others are listed
in the member's json as "aliases".
Each path is resolved under --image-root: the exact path first, then the same stem with another
extension (LLaVA's ocr_vqa writes `.jpg` but stores `.png` / `.gif`). Paths that cannot be used are
counted per reason and skipped:
    not_found      no candidate file exists
    empty_file     every candidate found has zero bytes
    outside_root   absolute path or a `..` escape
    not_an_image   a file whose suffix is no image suffix (none, .jfif, ...) and whose header PIL does not
                   read as JPEG, PNG, GIF, WebP, BMP or TIFF (with such a header it is packed under that name)
Output: OUT/{i:05d}.tar, one sample per usable image, members
    __key__        8-digit index of the path in the sorted unique list
    <ext>          the file bytes, copied (no decoding; the extractor decodes): jpg (also for .jpeg), png, gif, webp,
                   bmp, tif (also for .tiff)
    json           {"path": path as written in the conversation file, "found_as": path found (only if another
                   extension), "aliases": other spellings of the path (only if any)}
plus OUT/{i:05d}.stats.json (counts, the full list of unusable paths) and OUT/manifest.json (merged
counts, first examples per reason, a fingerprint of the path list + per_shard). Shards are written
atomically (tmp + os.replace) and skipped on rerun; an OUT packed from a different path list or
per_shard is refused. Rank r of w takes shards r, r + w, ...; rank 0 writes the manifest after a
gloo barrier.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import posixpath
import stat
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

from PIL import Image
from tyro.conf import UseAppendAction

from runtime.cli import parse
from runtime.distributed import end_job, job_barrier

log = logging.getLogger("mllm.data.pack_images")

REASONS = ("not_found", "empty_file", "outside_root", "not_an_image")
FALLBACK_EXTS = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".JPG", ".PNG")
MEMBER_EXT = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".gif": "gif", ".webp": "webp", ".bmp": "bmp",
              ".tif": "tif", ".tiff": "tif"}
PIL_MEMBER_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "GIF": "gif", "WEBP": "webp", "BMP": "bmp", "TIFF": "tif"}
"""PIL's format name -> member name, for files whose suffix says nothing (none, .jfif, .image)."""
NUM_EXAMPLES = 5
MANIFEST = "manifest.json"
TAR_MTIME = 0  # fixed member mtime: the same inputs give byte-identical tars on any rank or rerun


@dataclass
class PackConfig:
    """Options of one packing run."""

    conversations: Annotated[list[str], UseAppendAction]
    """LLaVA / Mini-Gemini conversation file: a JSON list, or JSONL when the name ends in .jsonl; at least
    one, repeat the flag for several."""
    image_root: str
    """Folder that the conversations' relative image paths resolve against (e.g. MGM-Finetune)."""
    out: str
    """Output folder for the image shards, their stats sidecars and manifest.json."""
    per_shard: int = 1000
    """Unique image paths per shard (found or not; the layout depends on the path list only)."""
    threads: int = 8
    """Threads that resolve and read image files (packing is I/O bound)."""
    barrier_timeout_min: float = 24 * 60
    """How long the gloo barrier waits for the slowest rank, in minutes."""
    local_rank: int | None = None
    """Passed by the deepspeed launcher as --local_rank; packing uses no device, so it is only accepted."""
    extensions: tuple[str, ...] = field(default=FALLBACK_EXTS)
    """Extensions tried, in order, when the exact path does not exist."""

    def __post_init__(self):
        if not self.conversations:
            raise ValueError("--conversations: give at least one conversation file")
        if self.per_shard < 1:
            raise ValueError(f"--per-shard must be >= 1, got {self.per_shard}")
        if self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}")
        if self.barrier_timeout_min <= 0:
            raise ValueError("--barrier-timeout-min must be > 0")


# ---- conversation files --------------------------------------------------------------------------------------
def _entry_images(obj: Any) -> list[str] | None:
    """The image paths of one entry ([] = text-only); None when malformed (the same rule as training)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("conversations"), list):
        return None
    img = obj.get("image")
    paths = [] if img in (None, "") else ([img] if isinstance(img, str) else img)
    if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
        return None
    return paths


def _file_entries(p: Path):
    """(location, parsed entry or None for a bad JSONL line) of one conversation file."""
    if p.name.lower().endswith(".jsonl"):
        for n, line in enumerate(p.read_bytes().splitlines(), 1):
            if line.strip():
                try:
                    yield n, json.loads(line)
                except (ValueError, UnicodeDecodeError):
                    yield n, None
        return
    try:
        data = json.loads(p.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{p}: not valid JSON ({e}); JSONL files must end in .jsonl") from e
    if not isinstance(data, list):
        raise ValueError(f"{p}: top level is a {type(data).__name__}, expected a JSON list of conversations")
    yield from enumerate(data)


def read_conversations(files: list[str]) -> tuple[list[str], dict[str, Any]]:
    """(sorted unique image paths, {"counts", "malformed_examples", "entry_images", "aliases"}) of the files.

    Paths are unique after normalization; "aliases" maps a kept spelling to the others (see the module doc).

    A JSON list that does not parse is an error naming the file; a bad JSONL line, or an entry without
    a `conversations` list or with a non-path `image`, is counted as `malformed` (as training does).
    """
    spellings: dict[str, set[str]] = {}  # normalized path -> the spellings that name it
    counts = {"entries": 0, "with_image": 0, "text_only": 0, "malformed": 0, "image_refs": 0}
    malformed: list[str] = []
    entry_images: list[tuple[str, ...]] = []  # per entry with images, for `entries_missing_image`
    for f in files:
        p = Path(f)
        if not p.is_file():
            raise FileNotFoundError(f"conversation file not found: {p}")
        jsonl = p.name.lower().endswith(".jsonl")
        for where, obj in _file_entries(p):
            counts["entries"] += 1
            imgs = _entry_images(obj)
            if imgs is None:
                counts["malformed"] += 1
                if len(malformed) < NUM_EXAMPLES:
                    malformed.append(f"{p}:{where}" if jsonl else f"{p}[{where}]")
            elif imgs:
                counts["with_image"] += 1
                counts["image_refs"] += len(imgs)
                for q in imgs:
                    spellings.setdefault(posixpath.normpath(q), set()).add(q)
                entry_images.append(tuple(imgs))
            else:
                counts["text_only"] += 1
    kept = {n: n if n in sp else min(sp) for n, sp in spellings.items()}
    aliases = {kept[n]: sorted(sp - {kept[n]}) for n, sp in spellings.items() if len(sp) > 1}
    counts["unique_images"] = len(kept)
    return sorted(kept.values()), {"counts": counts, "malformed_examples": malformed, "entry_images": entry_images,
                                   "aliases": aliases}


def fingerprint(paths: list[str], per_shard: int, aliases: dict[str, list[str]] | None = None) -> str:
    """sha256 of the sorted path list, per_shard and the aliases (written into the members' json): two
    packings with the same ones have the same shards."""
    h = hashlib.sha256()
    for q in paths:
        h.update(q.encode("utf-8", "surrogatepass") + b"\n")
    h.update(f"per_shard={per_shard}".encode())
    for q, other in sorted((aliases or {}).items()):  # none: the fingerprint of packings before aliases
        h.update(json.dumps([q, other]).encode("utf-8", "surrogatepass") + b"\n")
    return h.hexdigest()


# ---- resolving and packing -----------------------------------------------------------------------------------
def resolve(root: Path, rel: str, exts: tuple[str, ...] = FALLBACK_EXTS) -> tuple[str, str | None]:
    """(reason, relative path found): reason is "ok" or one of REASONS.

    Only a lexical check guards the root: symlinked image folders (coco -> /datasets/coco) are common.
    """
    norm = posixpath.normpath(rel)
    if posixpath.isabs(rel) or os.path.isabs(rel) or norm == ".." or norm.startswith("../"):
        return "outside_root", None
    stem, ext = posixpath.splitext(norm)
    cands = [norm] + [stem + e for e in exts if e != ext]
    empty = None
    for c in cands:
        try:
            st = (root / c).stat()
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        if st.st_size > 0:
            return "ok", c
        empty = empty or c
    return ("empty_file", empty) if empty else ("not_found", None)


def member_ext(found: str, data: bytes) -> str | None:
    """Member name of the file found: from its suffix (jpg for .jpg/.jpeg), else from the format its header
    names (PIL reads the header only); None if it is no image format the extractor reads. A member named by
    another suffix (`bin`, `jfif`) would be packed and then skipped by the extractor as having no image."""
    if ext := MEMBER_EXT.get(posixpath.splitext(found)[1].lower()):
        return ext
    try:
        with Image.open(io.BytesIO(data)) as img:
            return PIL_MEMBER_EXT.get(img.format)
    except Exception:  # PIL raises several types for what it cannot identify
        return None


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode = len(data), TAR_MTIME, 0o644
    tf.addfile(ti, io.BytesIO(data))


def _load(root: Path, rel: str, exts: tuple[str, ...]) -> tuple[str, str | None, bytes | None]:
    reason, found = resolve(root, rel, exts)
    if reason != "ok":
        return reason, found, None
    data = (root / found).read_bytes()
    return ("ok", found, data) if data else ("empty_file", found, None)  # emptied since the stat


def pack_shard(cfg: PackConfig, shard: int, paths: list[str], fp: str, pool: ThreadPoolExecutor,
               aliases: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """Write OUT/{shard:05d}.tar (+ .stats.json) atomically; returns the stats."""
    out, root = Path(cfg.out), Path(cfg.image_root)
    first = shard * cfg.per_shard
    mine = paths[first:first + cfg.per_shard]
    stats: dict[str, Any] = {"shard": shard, "fingerprint": fp, "num_paths": len(mine), "packed": 0, "bytes": 0,
                             "other_ext": 0, **{r: 0 for r in REASONS}, "found_as": [], "unusable": []}
    name = f"{shard:05d}"
    tmp = out / f".{name}.tar.tmp-{os.getpid()}"
    side_tmp = out / f".{name}.stats.json.tmp-{os.getpid()}"
    exts = tuple(cfg.extensions)
    try:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
            # pool.map keeps the order; chunks bound the bytes held in memory at once
            for c in range(0, len(mine), 64):
                chunk = mine[c:c + 64]
                loaded = pool.map(lambda r: _load(root, r, exts), chunk)
                for i, (rel, (reason, found, data)) in enumerate(zip(chunk, loaded)):
                    if reason != "ok":
                        stats[reason] += 1
                        stats["unusable"].append([rel, reason])
                        continue
                    ext = member_ext(found, data)
                    if ext is None:
                        stats["not_an_image"] += 1
                        stats["unusable"].append([rel, "not_an_image"])
                        continue
                    key = f"{first + c + i:08d}"  # index in the sorted unique list: stable across runs
                    meta: dict[str, Any] = {"path": rel}
                    if found != posixpath.normpath(rel):  # resolve() returns the normalized path
                        meta["found_as"] = found
                        stats["other_ext"] += 1
                        stats["found_as"].append([rel, found])
                    if aliases and rel in aliases:
                        meta["aliases"] = aliases[rel]
                    _add(tf, f"{key}.{ext}", data)
                    _add(tf, f"{key}.json", json.dumps(meta, ensure_ascii=False).encode())
                    stats["packed"] += 1
                    stats["bytes"] += len(data)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    side_tmp.write_text(json.dumps(stats, ensure_ascii=False))
    os.replace(side_tmp, out / f"{name}.stats.json")  # the sidecar first: a finished tar always has its stats
    os.replace(tmp, out / f"{name}.tar")
    return stats


# ---- distributed plumbing ------------------------------------------------------------------------------------
def check_previous(out: Path, fp: str) -> None:
    """Refuse an OUT that holds a manifest or shard sidecars of a different packing."""
    for f in [out / MANIFEST, *sorted(out.glob("*.stats.json"))]:
        if not f.is_file():
            continue
        try:
            old = json.loads(f.read_text()).get("fingerprint")
        except (ValueError, OSError) as e:
            raise ValueError(f"{f}: unreadable ({e}); remove it, or pack into a fresh --out") from e
        if old != fp:
            raise ValueError(f"{f} belongs to a different packing (fingerprint {str(old)[:12]}..., this run "
                             f"{fp[:12]}...: other conversation files or --per-shard); refusing to mix them. "
                             f"Pack into a fresh --out, or delete {out} first.")


def write_manifest(cfg: PackConfig, num_shards: int, fp: str, entries: dict[str, Any]) -> dict[str, Any]:
    """Merge the sidecars into OUT/manifest.json (atomically); returns it."""
    out = Path(cfg.out)
    counts = {**entries["counts"], "packed": 0, "bytes": 0, "other_ext": 0, **{r: 0 for r in REASONS}}
    examples: dict[str, list[str]] = {r: [] for r in (*REASONS, "other_ext", "malformed")}
    examples["malformed"] = entries["malformed_examples"]
    unusable: set[str] = set()
    missing = []
    for i in range(num_shards):
        tar, side = out / f"{i:05d}.tar", out / f"{i:05d}.stats.json"
        if not (tar.is_file() and side.is_file()):
            missing.append(tar.name)
            continue
        s = json.loads(side.read_text())
        for k in ("packed", "bytes", "other_ext", *REASONS):
            counts[k] += s.get(k, 0)  # (not_an_image: not in the sidecars of older versions)
        for rel, reason in s["unusable"]:
            unusable.add(posixpath.normpath(rel))
            if len(examples[reason]) < NUM_EXAMPLES:
                examples[reason].append(rel)
        for rel, found in s["found_as"]:
            if len(examples["other_ext"]) < NUM_EXAMPLES:
                examples["other_ext"].append(f"{rel} -> {found}")
    if missing:
        raise RuntimeError(f"{len(missing)} shard(s) missing after all ranks finished, e.g. {out / missing[0]}")
    # conversations that training will skip as `missing_image`
    counts["entries_missing_image"] = sum(any(posixpath.normpath(q) in unusable for q in imgs)
                                          for imgs in entries["entry_images"])
    cfg_d = {k: v for k, v in asdict(cfg).items() if k not in ("local_rank", "threads", "barrier_timeout_min")}
    cfg_d["extensions"] = list(cfg.extensions)
    manifest = {"config": cfg_d, "fingerprint": fp, "per_shard": cfg.per_shard, "num_shards": num_shards,
                "counts": counts, "examples": examples}
    tmp = out / f".{MANIFEST}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
    os.replace(tmp, out / MANIFEST)
    return manifest


def summary_line(m: dict[str, Any], out: str) -> str:
    """The one-line result printed at the end."""
    c, ex = m["counts"], m["examples"]
    parts = [f"{r}={c[r]}" + (f" {ex[r]}" if ex[r] else "") for r in REASONS]
    return (f"pack_images: packed {c['packed']} of {c['unique_images']} unique images ({c['bytes'] / 1e6:.1f} MB) "
            f"into {m['num_shards']} shards in {out}; unusable: {', '.join(parts)}; found with another extension: "
            f"{c['other_ext']}; entries: {c['entries']} ({c['with_image']} with images, {c['text_only']} text_only, "
            f"{c['malformed']} malformed" + (f" {ex['malformed']}" if ex["malformed"] else "")
            + f", {c['entries_missing_image']} with an unusable image)")


def next_steps(cfg: PackConfig, num_shards: int) -> str:
    """The follow-up commands: extraction, and splitting the JSON lists into JSONL shards."""
    from mllm.data.sources import SplitJsonConfig

    out = cfg.out.rstrip("/")
    shards = f"{out}/{{00000..{num_shards - 1:05d}}}.tar" if num_shards > 1 else f"{out}/00000.tar"
    # where data_recipes/stage2_finetune.yaml reads them (DATA: the recipe's root, or --data-root)
    lines = ["next:", f"  python -m unitok.extract --tokenizer TOKENIZER --input '{shards}' "
                      "--output DATA/mgm/codes --mode understanding"]
    lists = [f for f in cfg.conversations if not f.lower().endswith(".jsonl")]
    for f in lists:  # several lists: a folder each (their shard names would collide), for the recipe's `paths`
        dest = "DATA/mgm/instructions" + (f"/{Path(f).stem}" if len(lists) > 1 else "")
        lines.append(f"  python -m mllm.data.sources split-json {f} {dest} --per-shard {SplitJsonConfig.per_shard}")
    return "\n".join(lines)


def run(cfg: PackConfig) -> dict[str, Any]:
    """Pack this rank's shards; returns {"done", "skipped", "manifest" (rank 0)}."""
    from runtime.distributed import launcher_env

    rank, world, _ = launcher_env()
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}")
    root = Path(cfg.image_root)
    if not root.is_dir():
        raise FileNotFoundError(f"image root not found (or not a folder): {root}")
    t0 = time.time()
    paths, entries = read_conversations(cfg.conversations)
    fp = fingerprint(paths, cfg.per_shard, entries["aliases"])
    num_shards = -(-len(paths) // cfg.per_shard)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    check_previous(out, fp)
    if rank == 0:
        log.info("%d conversation entries, %d unique image paths -> %d shards of %d (%.1fs)",
                 entries["counts"]["entries"], len(paths), num_shards, cfg.per_shard, time.time() - t0)
    mine = list(range(rank, num_shards, world))
    for i in mine:  # leftovers of a crashed run (never renamed, so never mistaken for results)
        for junk in out.glob(f".{i:05d}.*.tmp-*"):
            junk.unlink(missing_ok=True)
    todo = [i for i in mine if not (out / f"{i:05d}.tar").is_file()]
    skipped = [i for i in mine if i not in todo]
    if skipped:
        log.info("rank %d: %d shard(s) already done, skipped", rank, len(skipped))
    done = []
    t0 = time.time()
    with ThreadPoolExecutor(cfg.threads) as pool:
        for n, i in enumerate(todo):
            s = pack_shard(cfg, i, paths, fp, pool, entries["aliases"])
            done.append(i)
            log.info("rank %d: %05d.tar: %d/%d packed (%d other ext), %s, %.1f MB (%d/%d, %.1fs)", rank, i,
                     s["packed"], s["num_paths"], s["other_ext"], ", ".join(f"{r} {s[r]}" for r in REASONS),
                     s["bytes"] / 1e6, n + 1, len(todo), time.time() - t0)
    job_barrier(world, cfg.barrier_timeout_min)
    result: dict[str, Any] = {"rank": rank, "done": done, "skipped": skipped}
    try:
        if rank == 0:
            result["manifest"] = m = write_manifest(cfg, num_shards, fp, entries)
            print(summary_line(m, cfg.out), flush=True)
            print(next_steps(cfg, num_shards), flush=True)
    finally:
        job_barrier(world, cfg.barrier_timeout_min)  # nobody exits (and tears down the group) before the manifest
        end_job()
    return result


def parse_args(argv: list[str] | None = None) -> PackConfig:
    """Command line -> PackConfig; exits with status 2 and a message on bad flags."""
    return parse(PackConfig, argv, prog="python -m mllm.data.pack_images",
                 description="conversation files + image folder -> webdataset image shards "
                             "(see the docstring of mllm/data/pack_images.py)")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """CLI entry point."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
