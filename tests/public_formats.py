"""Small faithful copies of the public image releases' on-disk layouts, written into a tmp folder.

Each writer takes `items`, a list of (variant name, file bytes) from `real_data.image_variants()`, and
returns {output sample key: variant name} (None for rows that carry no usable image on purpose).

    img2dataset_webdataset  OUT/00000.tar ({key}.jpg/.txt/.json) + 00000.parquet + 00000_stats.json
    img2dataset_parquet     OUT/00000.parquet (key, url, caption, status, ..., jpg) + 00000_stats.json
    img2dataset_files       OUT/00000/{key}.jpg/.txt/.json + 00000.parquet + 00000_stats.json
    hub_parquet             OUT/data/train-00000-of-0000N.parquet: image struct {bytes, path} + prompt
    journeydb               OUT/annot.jsonl ({img_path: ./000/x.jpg, prompt, Task1, Task2}) + OUT/imgs/000/..

img2dataset facts mirrored here (img2dataset/writer.py, downloader.py): keys are the shard id (5 digits)
followed by the index in the shard (4 digits); every member of a `files` / `webdataset` sample is named
`.jpg` whatever the bytes are; failed downloads appear only in the metadata parquet (and, for the
parquet output format, as rows with a null `jpg`); the json holds url, caption, key, status,
error_message, width, height, original_width, original_height, exif, sha256.
"""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

from PIL import Image

from real_data import caption_for, image_variants

SAMPLE_DIGITS = 4  # img2dataset's oom_sample_per_shard for shards of < 10000 samples


def _size(data: bytes) -> tuple[int | None, int | None]:
    try:
        return Image.open(io.BytesIO(data)).size
    except Exception:  # the broken variants: img2dataset would have recorded no size either
        return None, None


def _meta(key: str, name: str | None, data: bytes | None) -> dict:
    """img2dataset's per-sample metadata (the json member / a metadata parquet row)."""
    ok = data is not None
    w, h = _size(data) if ok else (None, None)
    return {"url": f"https://images.example.com/{key}/{name or 'gone.jpg'}", "key": key,
            "caption": caption_for(name) if name else "a photo that is gone",
            "status": "success" if ok else "failed_to_download",
            "error_message": None if ok else "HTTP Error 404: Not Found", "width": w, "height": h,
            "original_width": w, "original_height": h, "exif": "{}" if ok else None,
            "sha256": hashlib.sha256(data).hexdigest() if ok else None}


def _chunks(items: list, per_shard: int) -> list[list]:
    return [items[i:i + per_shard] for i in range(0, len(items), per_shard)]


def _write_meta_parquet(path: Path, rows: list[dict], image_column: str | None = None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    fields = [pa.field("url", pa.string()), pa.field("key", pa.string()), pa.field("caption", pa.string()),
              pa.field("status", pa.string()), pa.field("error_message", pa.string()),
              pa.field("width", pa.int64()), pa.field("height", pa.int64()), pa.field("original_width", pa.int64()),
              pa.field("original_height", pa.int64()), pa.field("exif", pa.string()), pa.field("sha256", pa.string())]
    if image_column:
        fields.append(pa.field(image_column, pa.binary()))
    schema = pa.schema(fields)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def _write_stats(path: Path, shard_id: int, metas: list[dict]) -> None:
    ok = sum(m["status"] == "success" for m in metas)
    path.write_text(json.dumps({
        "count": len(metas), "successes": ok, "failed_to_download": len(metas) - ok, "failed_to_resize": 0,
        "duration": 1.5, "bytes_downloaded": 0, "start_time": 1700000000.0, "end_time": 1700000001.5,
        "status_dict": {"success": ok, **({"HTTP Error 404: Not Found": len(metas) - ok} if ok < len(metas) else {})},
        "shard_id": shard_id}, indent=4))


def _shard_rows(items, per_shard, first_shard, failed_per_shard):
    """[(shard id, [(key, name | None, bytes | None)])]: `failed_per_shard` failed downloads end each shard."""
    out = []
    for si, chunk in enumerate(_chunks(items, per_shard)):
        sid = first_shard + si
        rows = [(name, data) for name, data in chunk] + [(None, None)] * failed_per_shard
        out.append((sid, [(f"{sid:05d}{i:0{SAMPLE_DIGITS}d}", n, d) for i, (n, d) in enumerate(rows)]))
    return out


def img2dataset_webdataset(out: Path, items: list[tuple[str, bytes]], per_shard: int = 8, first_shard: int = 0,
                           failed_per_shard: int = 1) -> dict[str, str | None]:
    """`img2dataset --output_format webdataset`: tars of successes, metadata parquet + stats of all rows."""
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    keys: dict[str, str | None] = {}
    for sid, rows in _shard_rows(items, per_shard, first_shard, failed_per_shard):
        metas = [_meta(k, n, d) for k, n, d in rows]
        with wds.TarWriter(str(out / f"{sid:05d}.tar")) as w:
            for (key, name, data), meta in zip(rows, metas):
                if data is None:
                    continue  # failed downloads are only in the parquet
                w.write({"__key__": key, "jpg": data, "txt": meta["caption"], "json": json.dumps(meta, indent=4)})
                keys[key] = name
        _write_meta_parquet(out / f"{sid:05d}.parquet", metas)
        _write_stats(out / f"{sid:05d}_stats.json", sid, metas)
    return keys


def img2dataset_parquet(out: Path, items: list[tuple[str, bytes]], per_shard: int = 8, first_shard: int = 0,
                        failed_per_shard: int = 1) -> dict[str, str | None]:
    """`img2dataset --output_format parquet`: one parquet per shard with a `jpg` column (null = failed)."""
    out.mkdir(parents=True, exist_ok=True)
    keys: dict[str, str | None] = {}
    for sid, rows in _shard_rows(items, per_shard, first_shard, failed_per_shard):
        metas = [_meta(k, n, d) for k, n, d in rows]
        _write_meta_parquet(out / f"{sid:05d}.parquet", [{**m, "jpg": d} for m, (_, _, d) in zip(metas, rows)],
                            image_column="jpg")
        _write_stats(out / f"{sid:05d}_stats.json", sid, metas)
        keys.update({k: n for k, n, _ in rows})
    return keys


def img2dataset_files(out: Path, items: list[tuple[str, bytes]], per_shard: int = 8, first_shard: int = 0,
                      failed_per_shard: int = 1) -> dict[str, str | None]:
    """`img2dataset --output_format files`: OUT/<shard>/<key>.jpg/.txt/.json + metadata parquet + stats."""
    out.mkdir(parents=True, exist_ok=True)
    keys: dict[str, str | None] = {}
    for sid, rows in _shard_rows(items, per_shard, first_shard, failed_per_shard):
        sub = out / f"{sid:05d}"
        sub.mkdir()
        metas = [_meta(k, n, d) for k, n, d in rows]
        for (key, name, data), meta in zip(rows, metas):
            if data is None:
                continue
            (sub / f"{key}.jpg").write_bytes(data)
            (sub / f"{key}.txt").write_text(meta["caption"])
            (sub / f"{key}.json").write_text(json.dumps(meta, indent=4))
            keys[key] = name
        _write_meta_parquet(out / f"{sid:05d}.parquet", metas)
        _write_stats(out / f"{sid:05d}_stats.json", sid, metas)
    return keys


def hub_parquet(out: Path, items: list[tuple[str, bytes]], num_files: int = 2,
                missing_path: str | None = "images/lost.jpg") -> dict[str, str | None]:
    """A hub dataset export (`datasets` Image feature): OUT/data/train-0000i-of-0000N.parquet with columns
    image {bytes, path}, prompt, id, aesthetic_score, tags (a list: not a scalar). With `missing_path`, the
    last file ends with a row whose image has only that path (no bytes) and no file behind it. Keys are
    row indices within each file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([pa.field("image", pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])),
                        pa.field("prompt", pa.string()), pa.field("id", pa.int64()),
                        pa.field("aesthetic_score", pa.float64()), pa.field("tags", pa.list_(pa.string()))])
    (out / "data").mkdir(parents=True, exist_ok=True)
    per = -(-len(items) // num_files)
    keys: dict[str, str | None] = {}
    for fi in range(num_files):
        chunk = items[fi * per:(fi + 1) * per]
        rows = [{"image": {"bytes": data, "path": name}, "prompt": caption_for(name), "id": fi * per + i,
                 "aesthetic_score": 5.0 + i / 10, "tags": ["photo", name]} for i, (name, data) in enumerate(chunk)]
        if missing_path and fi == num_files - 1:
            rows.append({"image": {"bytes": None, "path": missing_path}, "prompt": "a lost photo", "id": -1,
                         "aesthetic_score": None, "tags": []})
        pq.write_table(pa.Table.from_pylist(rows, schema=schema),
                       out / "data" / f"train-{fi:05d}-of-{num_files:05d}.parquet")
        keys.update({f"{fi}/{i:09d}": (r["image"]["path"] if r["image"]["bytes"] is not None else None)
                     for i, r in enumerate(rows)})
    return keys


def journeydb(out: Path, items: list[tuple[str, bytes]], missing: int = 1, bad_lines: int = 1,
              no_path: int = 1) -> tuple[Path, Path, list[str | None]]:
    """JourneyDB layout: OUT/annot.jsonl (train_anno_realease_repath.jsonl records: img_path "./000/<id>.jpg",
    prompt, Task1, Task2) and the images unpacked from imgs/000.tgz under OUT/imgs/000/. Appended: `missing`
    records whose image file is absent, `bad_lines` malformed lines, `no_path` records without img_path,
    plus one blank line. Returns (jsonl path, image root, the variant name of each record in file order,
    None for the appended ones)."""
    root = out / "imgs"
    (root / "000").mkdir(parents=True, exist_ok=True)
    records: list[dict | None] = []
    for i, (name, data) in enumerate(items):
        rel = f"./000/{hashlib.md5(name.encode()).hexdigest()}.jpg"  # JourneyDB names are hashes, all .jpg
        (root / rel).write_bytes(data)
        records.append({"img_path": rel, "prompt": f"{caption_for(name)}, highly detailed --ar 4:3 --v 5",
                        "Task1": {"Style": ["photo"], "Content": [name.split(".")[0]], "Atmosphere": [], "Other": []},
                        "Task2": {"Caption": caption_for(name), "Question": [], "Options": [], "Answer": []}})
    records += [{"img_path": f"./000/missing{j}.jpg", "prompt": "gone", "Task2": {"Caption": "gone"}}
                for j in range(missing)]
    records += [None] * bad_lines
    records += [{"prompt": "an annotation without an image path"} for _ in range(no_path)]
    lines = [json.dumps(r) if r is not None else '{"img_path": "./000/x.jpg", "prompt": ' for r in records]
    lines.insert(len(lines) // 2, "")  # a blank line: not a record
    path = out / "annot.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, root, [name for name, _ in items] + [None] * (len(records) - len(items))


# ---- Mini-Gemini (MGM-Finetune) ------------------------------------------------------------------------------
# A small, faithful MGM-Finetune layout: images live at the paths the json names (vg/VG_100K/... and
# vg/VG_100K_2/...), ocr_vqa names `.jpg` but stores `.png` / `.gif`, and there are a zero-byte file, an
# absent file, a `..` escape, an absolute path, text-only and malformed entries, integer ids, a first
# turn from `gpt` and a multi-image entry, spread over a JSON list and a JSONL file.
# relative path in the json -> (file stored on disk relative to the root, real_data variant)
STORED = {
    "coco/train2017/000000000009.jpg": ("coco/train2017/000000000009.jpg", "astronaut.jpg"),
    "coco/train2017/000000000025.jpg": ("coco/train2017/000000000025.jpg", "cmyk.jpg"),
    "coco/train2017/000000000030.jpg": ("coco/train2017/000000000030.jpg", "empty.jpg"),  # zero bytes
    "gqa/images/2354786.jpg": ("gqa/images/2354786.jpg", "camera_gray.jpg"),
    "vg/VG_100K/2.jpg": ("vg/VG_100K/2.jpg", "wide.jpg"),
    "vg/VG_100K_2/1.jpg": ("vg/VG_100K_2/1.jpg", "tiny.jpg"),
    "ocr_vqa/images/140031996.jpg": ("ocr_vqa/images/140031996.png", "rgba.png"),  # .jpg in json, .png on disk
    "ocr_vqa/images/1453600173.jpg": ("ocr_vqa/images/1453600173.gif", "animated.gif"),  # ... and .gif
    "textvqa/train_images/0a0bc91825468c45.jpg": ("textvqa/train_images/0a0bc91825468c45.jpg", "truncated.jpg"),
    "textvqa/train_images/011e7e629fb9ae7b.jpg": ("textvqa/train_images/011e7e629fb9ae7b.jpg", "tall.png"),
    "web-celebrity/images/Tom_Hanks_1.jpeg": ("web-celebrity/images/Tom_Hanks_1.jpeg", "coffee.png"),
    "wikiart/images/monet_1.webp": ("wikiart/images/monet_1.webp", "chelsea.webp"),
}
MISSING = "gqa/images/missing_404.jpg"
ESCAPE = "../escape.jpg"


def _turns(first: str = "human", n: int = 2, image: bool = True) -> list[dict]:
    roles = ["human", "gpt"] if first == "human" else ["gpt", "human"]
    return [{"from": roles[i % 2], "value": ("<image>\nWhat is shown?" if image and i == 0 else f"turn {i}")}
            for i in range(n)]


def mini_gemini(base: Path) -> dict:
    """base/MGM-Finetune/ with images (the STORED table), mgm_instruction.json (a JSON list) and
    base/extra.jsonl; returns {base, root, conv, extra, abs}."""
    root = base / "MGM-Finetune"
    v = image_variants()
    for disk, name in STORED.values():
        (root / disk).parent.mkdir(parents=True, exist_ok=True)
        (root / disk).write_bytes(v[name])
    (base / "escape.jpg").write_bytes(v["astronaut.jpg"])  # exists, but outside the root: must not be read
    abs_path = str(base / "escape.jpg")
    rows = [
        {"id": "000000000009", "image": "coco/train2017/000000000009.jpg", "conversations": _turns()},
        {"id": 2354786, "image": "gqa/images/2354786.jpg", "conversations": _turns(n=4)},  # integer id
        {"id": "vg_2", "image": "vg/VG_100K/2.jpg", "conversations": _turns()},
        {"id": "vg_1", "image": "vg/VG_100K_2/1.jpg", "conversations": _turns()},
        {"id": "140031996", "image": "ocr_vqa/images/140031996.jpg", "conversations": _turns()},
        {"id": "1453600173", "image": "ocr_vqa/images/1453600173.jpg", "conversations": _turns()},
        {"id": "tv_0", "image": "textvqa/train_images/0a0bc91825468c45.jpg", "conversations": _turns()},
        {"id": "tv_1", "image": "textvqa/train_images/011e7e629fb9ae7b.jpg", "conversations": _turns()},
        {"id": "sharegpt_1", "conversations": _turns(image=False)},  # text-only
        {"id": 42, "image": None, "conversations": _turns(image=False)},  # text-only, integer id
        {"id": "gpt_first", "image": "coco/train2017/000000000025.jpg", "conversations": _turns("gpt", 3)},
        {"id": "multi", "image": ["coco/train2017/000000000009.jpg", "web-celebrity/images/Tom_Hanks_1.jpeg"],
         "conversations": [{"from": "human", "value": "<image>\n<image>\nSame person?"},
                           {"from": "gpt", "value": "No."}]},
        {"id": "empty", "image": "coco/train2017/000000000030.jpg", "conversations": _turns()},
        {"id": "absent", "image": MISSING, "conversations": _turns()},
        {"id": "escape", "image": ESCAPE, "conversations": _turns()},
        {"id": "bad_image", "image": 5, "conversations": _turns()},  # malformed
        {"id": "no_turns", "image": "coco/train2017/000000000009.jpg"},  # malformed
    ]
    conv = root / "mgm_instruction.json"
    conv.write_text(json.dumps(rows))
    extra = base / "extra.jsonl"
    lines = [json.dumps({"id": 7, "image": "wikiart/images/monet_1.webp", "conversations": _turns()}),
             json.dumps({"id": "abs", "image": abs_path, "conversations": _turns()}),  # absolute: outside_root
             json.dumps({"id": "text", "conversations": _turns(image=False)}),
             "{not json",  # malformed
             "",
             json.dumps({"id": "dup", "image": "vg/VG_100K/2.jpg", "conversations": _turns()})]
    extra.write_text("\n".join(lines) + "\n")
    return {"base": base, "root": root, "conv": conv, "extra": extra, "abs": abs_path}


