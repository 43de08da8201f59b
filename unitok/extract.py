"""Pre-tokenise image shards into code shards (REFERENCE 8.5), one shard range per rank.

    python -m unitok.extract --tokenizer CKPT --input 'shards/{00000..00009}.tar' --output OUT_DIR \
        [--mode generation|understanding] [--size 256] [--max-aspect 2.0] [--batch-size 32]
    torchrun --nproc_per_node 8 -m unitok.extract ...            (or launch/extract.sh)

Input: webdataset tars with an image member (jpg/jpeg/png/webp) and optional txt / json per sample.
Output: OUT_DIR/<input shard name>, same sample keys, members
    codes.npy  uint16 (K, h, w) = tokenizer.encode(preprocessed image)
    txt        the caption (copied when present)
    json       the input json fields (incl. `path`, used to look images up) + original width/height
Preprocessing (both resize with PIL):
    generation     resize the short side to --size (Lanczos, as Liquid's extractor), centre crop
    understanding  pad to square with (122, 116, 104), resize to --size x --size (bilinear) (REFERENCE 6.10)
Images with max(w, h) / min(w, h) > --max-aspect are dropped; undecodable images are skipped; both
are counted. Rank r of w (RANK / WORLD_SIZE from torchrun or the deepspeed launcher) takes input
shards r, r + w, ... . Each finished shard is written atomically (tmp + rename) together with a
<name>.stats.json sidecar, and skipped on rerun, so a crashed job is simply started again. After a
barrier, rank 0 merges the sidecars into OUT_DIR/manifest.json.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

log = logging.getLogger("unitok.extract")

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
PAD_COLOR = (122, 116, 104)  # LLaVA's expand2square background (CLIP mean * 255)
MANIFEST = "manifest.json"


@dataclass
class ExtractConfig:
    """Options of one extraction run."""

    tokenizer: str
    """Tokenizer checkpoint folder (or official .pth), read by `unitok.load_tokenizer`."""
    input: list[str]
    """Input shard patterns (brace expansion)."""
    output: str
    """Output folder for code shards, stats sidecars and the manifest."""
    mode: str = "generation"
    """generation (resize + centre crop) or understanding (pad to square + resize)."""
    size: int = 256
    """Output side in pixels; codes are (K, size/16, size/16)."""
    max_aspect: float = 2.0
    """Drop images whose long/short side ratio exceeds this."""
    batch_size: int = 32
    """Images per tokenizer forward."""
    threads: int = 4
    """Threads decoding and preprocessing images."""
    device: str = "auto"
    """auto = cuda:LOCAL_RANK when CUDA is available, else cpu."""
    local_rank: int | None = None
    """--local_rank as passed by the deepspeed launcher (fallback when LOCAL_RANK is not set)."""

    def __post_init__(self):
        if self.mode not in ("generation", "understanding"):
            raise ValueError(f"--mode must be generation or understanding, got {self.mode!r}")
        if self.size <= 0 or self.size % 16:
            raise ValueError(f"--size must be a positive multiple of 16, got {self.size}")
        if self.max_aspect < 1:
            raise ValueError("--max-aspect must be >= 1")
        if self.batch_size < 1 or self.threads < 1:
            raise ValueError("--batch-size and --threads must be >= 1")


# ---- preprocessing --------------------------------------------------------------------------------------
def preprocess(img: Image.Image, mode: str, size: int) -> np.ndarray:
    """PIL image -> uint8 (size, size, 3) as the tokenizer sees it (see the module docstring)."""
    img = img.convert("RGB")
    w, h = img.size
    if mode == "generation":
        s = size / min(w, h)
        nw, nh = max(size, round(w * s)), max(size, round(h * s))
        img = img.resize((nw, nh), Image.LANCZOS)
        left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
        img = img.crop((left, top, left + size, top + size))
    elif mode == "understanding":
        if w != h:
            side = max(w, h)
            canvas = Image.new("RGB", (side, side), PAD_COLOR)
            canvas.paste(img, ((side - w) // 2, (side - h) // 2))
            img = canvas
        img = img.resize((size, size), Image.BILINEAR)
    else:
        raise ValueError(f"unknown mode {mode!r}")
    return np.asarray(img, dtype=np.uint8)


def to_model_input(pixels: list[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W, 3) arrays -> float (B, 3, H, W) in [-1, 1]."""
    x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def _encode_npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


# ---- one shard ----------------------------------------------------------------------------------------------
def _decode_one(sample: dict[str, Any], mode: str, size: int, max_aspect: float):
    """-> ("ok", pixels, meta) | ("undecodable"|"aspect"|"no_image", None, None)."""
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        return "no_image", None, None
    try:
        img = Image.open(io.BytesIO(sample[ext]))
        img.load()
        w, h = img.size
        if max(w, h) / max(1, min(w, h)) > max_aspect:
            return "aspect", None, None
        pixels = preprocess(img, mode, size)
    except Exception:  # PIL raises many types for damaged files
        return "undecodable", None, None
    try:
        meta = json.loads(sample["json"]) if "json" in sample else {}
        if not isinstance(meta, dict):
            meta = {"json": meta}
    except ValueError:
        meta = {}
    meta.update(width=w, height=h)
    return "ok", pixels, meta


def extract_shard(model, src: Path, dst: Path, cfg: ExtractConfig, pool: ThreadPoolExecutor,
                  rank: int = 0) -> dict[str, Any]:
    """Tokenise one input shard into `dst` (atomically); returns its stats."""
    import webdataset as wds

    stats = {"input": str(src), "rank": rank, "samples": 0, "dropped_aspect": 0, "undecodable": 0, "no_image": 0,
             "corrupt_members": 0}

    def handler(exn):
        stats["corrupt_members"] += 1
        log.warning("%s: unreadable data skipped: %s", src, exn)
        return True

    if model.codebook_size > 65536:
        raise ValueError("codebook_size > 65536 does not fit the uint16 code shards")
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    samples = wds.tariterators.tarfile_samples([{"url": str(src)}], handler=handler)
    with wds.TarWriter(str(tmp), mtime=0) as writer:
        def flush(batch):
            if not batch:
                return
            decoded = list(pool.map(lambda s: _decode_one(s, cfg.mode, cfg.size, cfg.max_aspect), batch))
            keep = []
            for s, (status, pix, meta) in zip(batch, decoded):
                if status == "ok":
                    keep.append((s, pix, meta))
                else:
                    stats["dropped_aspect" if status == "aspect" else status] += 1
            if not keep:
                return
            x = to_model_input([p for _, p, _ in keep]).to(model.device)
            codes = model.encode(x).to("cpu", torch.int64).numpy().astype(np.uint16)  # (B, K, h, w)
            for (s, _, meta), c in zip(keep, codes):
                out = {"__key__": s["__key__"], "codes.npy": _encode_npy(c), "json": json.dumps(meta).encode()}
                if "txt" in s:
                    out["txt"] = s["txt"]
                writer.write(out)
                stats["samples"] += 1

        batch: list[dict[str, Any]] = []
        for s in samples:
            batch.append(s)
            if len(batch) == cfg.batch_size:
                flush(batch)
                batch = []
        flush(batch)
    side = dst.with_name(dst.stem + ".stats.json")
    side_tmp = side.with_name(f".{side.name}.tmp-{os.getpid()}")
    side_tmp.write_text(json.dumps(stats, indent=1))
    os.replace(side_tmp, side)  # the sidecar first: a finished tar always has its stats
    os.replace(tmp, dst)
    return stats


# ---- distributed plumbing ------------------------------------------------------------------------------------
def dist_env(local_rank: int | None = None) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun / deepspeed launcher variables (1 process if unset);
    `local_rank` (the deepspeed launcher's --local_rank argument) is used when LOCAL_RANK is unset."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", str(rank if local_rank is None else local_rank)))
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return rank, world, local


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")  # only a barrier: gloo works on CPU and GPU nodes alike
        dist.barrier()


def input_shards(patterns: list[str]) -> list[Path]:
    """Expanded input shards; ValueError on missing files or duplicate output names."""
    from braceexpand import braceexpand

    paths = [Path(q) for p in patterns for q in braceexpand(p)]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"input shard not found: {missing[0]}" +
                                (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    names = [p.name for p in paths]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"input shards share output names {dup[:5]}; extract each folder to its own --output")
    if not paths:
        raise ValueError("no input shards")
    return paths


def write_manifest(cfg: ExtractConfig, shards: list[Path], model_info: dict[str, Any]) -> dict[str, Any]:
    """Merge per-shard sidecars into OUT/manifest.json (atomically); returns it."""
    out = Path(cfg.output)
    per, missing = {}, []
    for p in shards:
        side = out / (Path(p.name).stem + ".stats.json")
        if (out / p.name).is_file() and side.is_file():
            per[p.name] = json.loads(side.read_text())
        else:
            missing.append(p.name)
    keys = ("samples", "dropped_aspect", "undecodable", "no_image", "corrupt_members")
    totals = {k: sum(s.get(k, 0) for s in per.values()) for k in keys}
    manifest = {"config": asdict(cfg), **model_info, "num_shards": len(shards), "shards": per,
                "missing_shards": missing, "totals": totals}
    tmp = out / f".{MANIFEST}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / MANIFEST)
    return manifest


def run(cfg: ExtractConfig) -> dict[str, Any]:
    """Extract this rank's shards; returns {"done": [...], "skipped": [...], "manifest": ... (rank 0)}."""
    from unitok import load_tokenizer

    rank, world, local = dist_env(cfg.local_rank)
    shards = input_shards(cfg.input)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    mine = shards[rank::world]
    for p in mine:  # leftovers of a crashed run (never renamed, so never mistaken for results)
        for junk in out.glob(f".{p.name}.tmp-*"):
            junk.unlink(missing_ok=True)
    todo = [p for p in mine if not (out / p.name).is_file()]
    skipped = [p.name for p in mine if p not in todo]
    if skipped:
        log.info("rank %d: %d shard(s) already done, skipped", rank, len(skipped))
    done = []
    device = cfg.device
    if device == "auto":
        device = f"cuda:{local % max(1, torch.cuda.device_count())}" if torch.cuda.is_available() else "cpu"
    model = load_tokenizer(cfg.tokenizer, device=device)
    model_info = {"num_codebooks": model.num_codebooks, "codebook_size": model.codebook_size,
                  "grid": [cfg.size // 16, cfg.size // 16]}
    if todo:
        t0 = time.time()
        with ThreadPoolExecutor(cfg.threads) as pool:
            for i, p in enumerate(todo):
                st = extract_shard(model, p, out / p.name, cfg, pool, rank)
                done.append(p.name)
                log.info("rank %d: %s -> %d samples (%d/%d, %.1fs)", rank, p.name, st["samples"], i + 1,
                         len(todo), time.time() - t0)
    _barrier(world)
    result: dict[str, Any] = {"rank": rank, "done": done, "skipped": skipped}
    if rank == 0:
        result["manifest"] = write_manifest(cfg, shards, model_info)
    _barrier(world)  # nobody exits (and tears down the group) before the manifest exists
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return result


def parse_args(argv: list[str] | None = None) -> ExtractConfig:
    """Command line -> ExtractConfig."""
    ap = argparse.ArgumentParser(prog="python -m unitok.extract", description="images -> UniTok code shards")
    ap.add_argument("--tokenizer", required=True, help="tokenizer checkpoint folder or official .pth")
    ap.add_argument("--input", required=True, action="append",
                    help="input shard pattern with brace expansion; repeat for several")
    ap.add_argument("--output", required=True, help="output folder")
    ap.add_argument("--mode", default="generation", choices=["generation", "understanding"])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--max-aspect", type=float, default=2.0)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None,
                    help="set by the deepspeed launcher; LOCAL_RANK from the environment wins")
    a = ap.parse_args(argv)
    return ExtractConfig(tokenizer=a.tokenizer, input=a.input, output=a.output, mode=a.mode, size=a.size,
                         max_aspect=a.max_aspect, batch_size=a.batch_size, threads=a.threads, device=a.device,
                         local_rank=a.local_rank)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """CLI entry point."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
