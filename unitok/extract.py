"""Pre-tokenise images into code shards (REFERENCE 8.5), one input shard range per rank.

    python -m unitok.extract --tokenizer CKPT --input PATTERN [--input PATTERN ...] --output OUT_DIR
        [--mode generation|understanding] [options]        (python -m unitok.extract --help: every option)
    torchrun --nproc_per_node 8 -m unitok.extract ...            (or launch/extract.sh)

Inputs: the layouts of `unitok.image_sources` (webdataset, parquet, files, jsonl; brace ranges and globs).
Output: OUT_DIR/<name>.tar (webdataset, read by mllm.data), same sample keys, members
    codes.npy  uint16 (K, h, w) = tokenizer.encode(preprocessed image), h = w = size / 16
    txt        the caption (when present)
    json       the input metadata (incl. `path`, used to look images up) + decoded width / height
Images are decoded by `unitok.image_io.load_image` (first frame, alpha on white, the same function as
chat and tokenizer training) and preprocessed by `unitok.image_io.preprocess`:
    generation     resize the short side to --size (Lanczos, as Liquid's extractor), centre crop; images
                   with max(w, h) / min(w, h) > --max-aspect are dropped (a crop would lose too much)
    understanding  pad to square with (122, 116, 104), resize to --size (bilinear) (REFERENCE 6.10);
                   every decodable image is kept (--max-aspect does not apply: giving it is an error)
Skipped samples are counted per reason (SKIP_REASONS) with the first few sample ids, in each shard's
<name>.stats.json sidecar and in the manifest, and warned with shard and key; so are samples whose key repeats
in their shard (renamed_keys), which are kept under `<key>_1`, ... so that every key in a code shard is unique.
OUT_DIR must be apart from the inputs: one that is or holds an input is refused.
Rank r of w (RANK / WORLD_SIZE from torchrun or the deepspeed launcher) takes shards r, r + w, ... .
Each finished shard is written atomically (tmp + rename) with its sidecar, and skipped on rerun, so a
crashed job is simply started again; one whose input changed size since (a truncated shard downloaded
again, another dataset's shard of that name) is extracted again. An OUT_DIR holding shards made with another
mode, image size or codebook shape is refused. After a barrier, rank 0 merges the sidecars into OUT_DIR/manifest.json.
"""
from __future__ import annotations

import io
import json
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import numpy as np
import torch
from tyro.conf import UseAppendAction

from runtime.cli import parse, refuse_changed
from runtime.distributed import end_job, job_barrier, share_cpu_cores
# re-exported: older code imports the preprocessing from here
from unitok.image_io import MAX_PIXELS, PAD_COLOR, ImageTooLarge, load_image, preprocess, to_model_input  # noqa: F401
from unitok.image_sources import (INPUT_FORMATS, NUM_EXAMPLES, RENAMED_KEYS, SKIP_REASONS, InputShard,
                                  RawSample, ShardStats, plan_inputs, read_shard)

log = logging.getLogger("unitok.extract")

MANIFEST = "manifest.json"
InputFormat = Literal["auto", "webdataset", "parquet", "files", "jsonl"]
assert get_args(InputFormat) == INPUT_FORMATS
# what must agree between a run and the shards already in its --output
_COMPAT_KEYS = ("mode", "image_size", "num_codebooks", "codebook_size", "tokenizer_fingerprint")
_SINCE_LATER = ("tokenizer_fingerprint",)
"""Keys that an older unitok.extract did not record: their absence is logged, not refused."""


@dataclass
class ExtractConfig:
    """Options of one extraction run."""

    tokenizer: str
    """Tokenizer checkpoint folder (or official .pth), read by `unitok.load_tokenizer`."""
    input: Annotated[list[str], UseAppendAction]
    """Input pattern (brace ranges and globs; tars, parquet files, img2dataset files folders or jsonl
    annotation files, see the module docstring); at least one, repeat the flag for several."""
    output: str
    """Output folder for code shards, stats sidecars and the manifest."""
    attn_mode: Literal["full", "causal"] = "full"
    """Projection attention of an official .pth, which does not record it: full for the April 2025 release,
    causal for the February 2025 one (as `mllm.train --tokenizer-attn-mode`; a checkpoint folder records its own)."""
    mode: Literal["generation", "understanding"] = "generation"
    """generation (resize + centre crop) or understanding (pad to square + resize)."""
    size: int | None = None
    """Output side in pixels; codes are (K, size/16, size/16). None = the tokenizer's training img_size."""
    max_aspect: float = 2.0
    """Generation mode only: drop images whose long/short side ratio exceeds this."""
    batch_size: int = 32
    """Images per tokenizer forward."""
    threads: int = 4
    """Threads reading, decoding and preprocessing images."""
    device: str = "auto"
    """auto = cuda:LOCAL_RANK when CUDA is available, else cpu."""
    local_rank: int | None = None
    """Passed by the deepspeed launcher as --local_rank (used when LOCAL_RANK is not set)."""
    input_format: InputFormat = "auto"
    """auto (per pattern, see the module docstring), webdataset, parquet, files or jsonl."""
    caption_column: str | None = None
    """Parquet column / jsonl field with the caption; None = the first of the usual names present
    (unitok.image_sources: CAPTION_COLUMNS, JSONL_CAPTION_FIELDS)."""
    image_column: str | None = None
    """Parquet column with the image (bytes or {bytes, path}) / jsonl field with the relative image path;
    None = the first of the usual names present (PARQUET_IMAGE_COLUMNS, JSONL_PATH_FIELDS)."""
    image_root: str | None = None
    """Folder that relative image paths (jsonl, parquet rows without bytes) resolve against; None = the
    input file's folder."""
    per_shard: int = 1000
    """jsonl: records per output shard."""
    max_image_pixels: int = MAX_PIXELS
    """Images with more pixels (width x height) are skipped as too_large before decoding."""
    barrier_timeout_min: float = 24 * 60
    """How long the end-of-job barrier waits for the slowest rank, in minutes."""

    def __post_init__(self):
        if self.mode not in ("generation", "understanding"):
            raise ValueError(f"--mode must be generation or understanding, got {self.mode!r}")
        if self.attn_mode not in ("full", "causal"):
            raise ValueError(f"--attn-mode must be full or causal, got {self.attn_mode!r}")
        if self.size is not None and (self.size <= 0 or self.size % 16):
            raise ValueError(f"--size must be a positive multiple of 16, got {self.size}")
        if self.max_aspect < 1:
            raise ValueError("--max-aspect must be >= 1")
        if self.batch_size < 1 or self.threads < 1:
            raise ValueError("--batch-size and --threads must be >= 1")
        if self.input_format not in INPUT_FORMATS:
            raise ValueError(f"--input-format must be one of {INPUT_FORMATS}, got {self.input_format!r}")
        if self.per_shard < 1:
            raise ValueError("--per-shard must be >= 1")
        if self.max_image_pixels < 1:
            raise ValueError("--max-image-pixels must be >= 1")
        if self.barrier_timeout_min <= 0:
            raise ValueError("--barrier-timeout-min must be > 0")
        if not self.input:
            raise ValueError("no --input given")
        if self.mode == "understanding":
            refuse_changed(self, ["max_aspect"], "to --mode understanding (every decodable image is kept)")


# ---- one shard ----------------------------------------------------------------------------------------------
def _encode_npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def decode_sample(raw: RawSample, cfg: ExtractConfig, size: int):
    """-> ("ok", pixels (size, size, 3) uint8, meta, "") | (skip reason, None, None, detail)."""
    if raw.skip:
        return raw.skip, None, None, raw.detail
    data = raw.image
    if data is None:
        return "no_image", None, None, "no image"
    if isinstance(data, Path):
        try:
            data = data.read_bytes()
        except FileNotFoundError:
            return "missing_file", None, None, f"no such file {data}"
        except OSError as e:
            return "undecodable", None, None, f"cannot read {data}: {e}"
    try:
        img = load_image(data, cfg.max_image_pixels)
    except ImageTooLarge as e:
        return "too_large", None, None, f"{e} (--max-image-pixels)"
    except Exception as e:  # PIL raises many types for damaged files
        return "undecodable", None, None, f"{type(e).__name__}: {e}"
    w, h = img.size
    if cfg.mode == "generation" and max(w, h) / max(1, min(w, h)) > cfg.max_aspect:
        return "dropped_aspect", None, None, f"{w}x{h} is beyond --max-aspect {cfg.max_aspect}"
    try:
        pixels = preprocess(img, cfg.mode, size)
    except Exception as e:  # e.g. a 1-pixel-wide image
        return "undecodable", None, None, f"{type(e).__name__}: {e}"
    return "ok", pixels, {**raw.meta, "width": w, "height": h}, ""


def extract_shard(model, shard: InputShard, dst: Path, cfg: ExtractConfig, pool: ThreadPoolExecutor,
                  size: int, header: dict[str, Any], rank: int = 0) -> dict[str, Any]:
    """Tokenise one input shard into `dst` (atomically, with its <stem>.stats.json); returns its stats."""
    import webdataset as wds

    if model.codebook_size > 65536:
        raise ValueError("codebook_size > 65536 does not fit the uint16 code shards")
    stats = ShardStats(shard)
    input_bytes = shard.input_bytes()  # before reading: a change during the read shows at the next run
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    with wds.TarWriter(str(tmp), mtime=0) as writer:
        def flush(batch: list[RawSample]):
            if not batch:
                return
            decoded = list(pool.map(lambda r: decode_sample(r, cfg, size), batch))
            keep = []
            for raw, (status, pix, meta, detail) in zip(batch, decoded):
                if status == "ok":
                    keep.append((raw, pix, meta))
                else:
                    stats.skip(status, raw.key, detail)
            if not keep:
                return
            x = to_model_input([p for _, p, _ in keep]).to(model.device)  # (B, 3, S, S)
            with torch.no_grad():
                codes = model.encode(x).to("cpu", torch.int64).numpy().astype(np.uint16)  # (B, K, h, w)
            for (raw, _, meta), c in zip(keep, codes):
                out = {"__key__": raw.key, "codes.npy": _encode_npy(c), "json": json.dumps(meta).encode()}
                if raw.caption is not None:
                    out["txt"] = raw.caption
                writer.write(out)
                stats.counts["samples"] += 1

        batch: list[RawSample] = []
        for raw in read_shard(shard, cfg, stats):
            batch.append(raw)
            if len(batch) == cfg.batch_size:
                flush(batch)
                batch = []
        flush(batch)
    result = {"input": shard.path, "input_bytes": input_bytes, "format": shard.kind, "rank": rank, **header,
              **stats.counts,
              "examples": {r: v for r, v in stats.examples.items() if v}}
    if shard.kind == "jsonl":
        result.update(first_record=shard.first_record, num_records=shard.num_records)
    side = dst.with_name(shard.stem + ".stats.json")
    side_tmp = side.with_name(f".{side.name}.tmp-{os.getpid()}")
    side_tmp.write_text(json.dumps(result, indent=1))
    os.replace(side_tmp, side)  # the sidecar first: a finished tar always has its stats
    os.replace(tmp, dst)
    return result


# ---- distributed plumbing ------------------------------------------------------------------------------------
def dist_env(local_rank: int | None = None) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the launcher's variables (deepspeed/torchrun, MPI, a SLURM step: as
    the trainers read them; 1 process if unset); `local_rank` (the deepspeed launcher's --local_rank argument)
    is used when no local rank is set."""
    from runtime.distributed import launcher_env

    rank, world, local = launcher_env(local_default=None)
    if local is None:
        local = rank if local_rank is None else local_rank
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return rank, world, local


def check_output_apart(out: Path, shards: list[InputShard]) -> None:
    """ValueError when OUT is, or holds, an input: a code shard named like its input tar would be that tar
    (taken as already done, or written over it), and a later glob over the folder would take codes for inputs."""
    root = out.resolve()
    for s in shards:
        p = Path(s.path).resolve()
        if p == root or root in p.parents:
            raise ValueError(f"--output {out} holds the input {s.path}: write the code shards to a folder apart "
                             f"from the inputs")


def check_output_compatible(out: Path, header: dict[str, Any]) -> None:
    """ValueError when OUT already holds a manifest or sidecars made with another mode, image size, codebook
    shape or tokenizer (`UniTok.fingerprint`: codes of different grids, vocabularies or weights must not be mixed
    in one folder)."""
    files = ([out / MANIFEST] if (out / MANIFEST).is_file() else []) + sorted(out.glob("*.stats.json"))
    for f in files:
        try:
            rec = json.loads(f.read_text())
        except ValueError as e:
            raise ValueError(f"{f} is not valid JSON ({e}); delete it or use another --output") from e
        for k in _COMPAT_KEYS:
            if k not in rec and k in _SINCE_LATER:
                log.warning("%s does not record %s (an older unitok.extract): it cannot be checked that the same "
                            "tokenizer made its codes", f, k)
                continue
            if k not in rec:
                raise ValueError(f"{f} does not record {k} (written by an older unitok.extract); codes of unknown "
                                 f"settings must not be mixed with this run's: use another --output folder")
            if rec[k] != header[k]:
                raise ValueError(
                    f"{f} was written with {k}={rec[k]!r} but this run has {k}={header[k]!r}; codes made with "
                    f"another mode, image size or tokenizer must not be mixed: use another --output folder")


def write_manifest(cfg: ExtractConfig, shards: list[InputShard], header: dict[str, Any],
                   ignored: list[str]) -> dict[str, Any]:
    """Merge per-shard sidecars into OUT/manifest.json (atomically); returns it."""
    out = Path(cfg.output)
    per, missing = {}, []
    for s in shards:
        side = out / (s.stem + ".stats.json")
        if (out / s.name).is_file() and side.is_file():
            per[s.name] = json.loads(side.read_text())
        else:
            missing.append(s.name)
    totals = {k: sum(st.get(k, 0) for st in per.values()) for k in ("samples", *SKIP_REASONS, RENAMED_KEYS)}
    examples: dict[str, list[str]] = {}
    for st in per.values():
        for r, ids in st.get("examples", {}).items():
            examples.setdefault(r, [])
            examples[r] += ids[: NUM_EXAMPLES - len(examples[r])]
    manifest = {"config": asdict(cfg), **header, "num_shards": len(shards), "shards": per,
                "missing_shards": missing, "totals": totals, "examples": examples,
                "ignored_inputs": {"count": len(ignored), "first": ignored[:NUM_EXAMPLES]}}
    tmp = out / f".{MANIFEST}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / MANIFEST)
    return manifest


def run(cfg: ExtractConfig) -> dict[str, Any]:
    """Extract this rank's shards; returns {"done": [...], "skipped": [...], "manifest": ... (rank 0)}."""
    from unitok import load_tokenizer
    from unitok.config import DOWNSAMPLE

    rank, world, local = dist_env(cfg.local_rank)
    shards, ignored = plan_inputs(cfg)
    check_output_apart(Path(cfg.output), shards)
    if ignored and rank == 0:
        log.info("ignored %d path(s) matched by the --input globs that are not inputs of the chosen format, "
                 "e.g. %s", len(ignored), ignored[0])
    device = cfg.device
    if device == "auto":
        device = f"cuda:{local % max(1, torch.cuda.device_count())}" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        share_cpu_cores()
    model = load_tokenizer(cfg.tokenizer, device=device, attn_mode=cfg.attn_mode)
    size = int(cfg.size or model.cfg.img_size)
    if size % DOWNSAMPLE:
        raise ValueError(f"image size {size} is not a multiple of {DOWNSAMPLE}")
    header = {"mode": cfg.mode, "image_size": size, "grid": [size // DOWNSAMPLE, size // DOWNSAMPLE],
              "num_codebooks": model.num_codebooks, "codebook_size": model.codebook_size,
              "tokenizer_fingerprint": model.fingerprint()}
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    check_output_compatible(out, header)
    mine = shards[rank::world]
    for s in mine:  # leftovers of a crashed run (never renamed, so never mistaken for results)
        for junk in out.glob(f".{s.name}.tmp-*"):
            junk.unlink(missing_ok=True)
    todo = [s for s in mine if not (out / s.name).is_file()]
    for s in mine:
        side = out / (s.stem + ".stats.json")
        if s in todo or not side.is_file():
            continue
        rec = json.loads(side.read_text())
        # a finished jsonl shard must hold the same record range (same --per-shard)
        if s.kind == "jsonl" and (rec.get("first_record"), rec.get("num_records")) != (s.first_record, s.num_records):
            raise ValueError(f"{side} holds records {rec.get('first_record')}+{rec.get('num_records')} but this "
                             f"run cuts {s.first_record}+{s.num_records}: rerun with the same --per-shard")
        if "input_bytes" in rec and rec["input_bytes"] != s.input_bytes():  # (older sidecars do not record it)
            log.warning("rank %d: %s was made from %s of %d bytes; %s now has %d: extracting it again", rank,
                        out / s.name, rec.get("input"), rec["input_bytes"], s.path, s.input_bytes())
            todo.append(s)
    skipped = [s.name for s in mine if s not in todo]
    if skipped:
        log.info("rank %d: %d shard(s) already done, skipped", rank, len(skipped))
    done = []
    if todo:
        t0 = time.time()
        with ThreadPoolExecutor(cfg.threads) as pool:
            for i, s in enumerate(todo):
                st = extract_shard(model, s, out / s.name, cfg, pool, size, header, rank)
                done.append(s.name)
                skips = {r: st[r] for r in SKIP_REASONS if st[r]}
                renamed = f", {st[RENAMED_KEYS]} repeated key(s) renamed" if st[RENAMED_KEYS] else ""
                log.info("rank %d: %s -> %s: %d samples%s, skipped %s (%d/%d, %.1fs)", rank, s.path, s.name,
                         st["samples"], renamed, skips or "none", i + 1, len(todo), time.time() - t0)
    job_barrier(world, cfg.barrier_timeout_min)
    result: dict[str, Any] = {"rank": rank, "done": done, "skipped": skipped}
    try:
        if rank == 0:
            result["manifest"] = write_manifest(cfg, shards, header, ignored)
    finally:
        job_barrier(world, cfg.barrier_timeout_min)  # nobody exits (and tears down the group) before the manifest
        end_job()
    return result


def parse_args(argv: list[str] | None = None) -> ExtractConfig:
    """Command line -> ExtractConfig; exits with status 2 and a message on bad flags."""
    return parse(ExtractConfig, argv, prog="python -m unitok.extract", description="images -> UniTok code shards "
                 "(see the docstring of unitok/extract.py and data_recipes/README.md)")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Entry point; bad input raises FileNotFoundError / ValueError (`python -m` prints it as one line)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return run(parse_args(argv))


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:  # bad input (a missing shard, a refused --output): one line
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
