"""`python -m mllm.data.pack_images` on a small, faithful MGM-Finetune layout built from real photos.

The layout mirrors the release: images live at the paths the json names (vg/VG_100K/... and
vg/VG_100K_2/...), ocr_vqa names `.jpg` but stores `.png` / `.gif`, and there are a zero-byte file, an
absent file, a `..` escape, an absolute path, text-only and malformed entries, integer ids, a first
turn from `gpt` and a multi-image entry, spread over a JSON list and a JSONL file.
"""
from __future__ import annotations

import hashlib
import json
import os
import tarfile
from pathlib import Path

import pytest

from mllm.data import pack_images as P
from public_formats import ESCAPE, MISSING, STORED, mini_gemini
from runtime.launch import torchrun_module

ROOT = Path(__file__).resolve().parents[1]

PACKED = {k: v for k, v in STORED.items() if v[1] != "empty.jpg"}
MEMBER_EXT = {"jpg": "jpg", "jpeg": "jpg", "png": "png", "gif": "gif", "webp": "webp"}


@pytest.fixture(scope="module")
def mgm(tmp_path_factory) -> dict:
    """MGM-Finetune/ with images, mgm_instruction.json (JSON list) and extra.jsonl."""
    return mini_gemini(tmp_path_factory.mktemp("pack"))


def _args(mgm: dict, out: Path, per_shard: int = 3) -> list[str]:
    return ["--conversations", str(mgm["conv"]), "--conversations", str(mgm["extra"]), "--image-root",
            str(mgm["root"]), "--out", str(out), "--per-shard", str(per_shard), "--threads", "2"]


def _digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())
            if p.name != P.MANIFEST}


def _members(out: Path) -> dict[str, dict[str, bytes]]:
    """__key__ -> {ext: bytes} over all shards."""
    samples: dict[str, dict[str, bytes]] = {}
    for tar in sorted(out.glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return samples


@pytest.fixture(scope="module")
def packed(mgm, tmp_path_factory):
    """One in-process 1-rank run (per_shard 3)."""
    out = tmp_path_factory.mktemp("out") / "raw_mgm"
    env = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if k in os.environ}
    try:
        res = P.main(_args(mgm, out))
    finally:
        os.environ.update(env)
    return out, res


def test_counts_and_manifest(mgm, packed):
    out, res = packed
    m = json.loads((out / P.MANIFEST).read_text())
    assert m == res["manifest"]
    c = m["counts"]
    unique = len(STORED) + 3  # + missing, ../escape.jpg, the absolute path
    assert (c["entries"], c["with_image"], c["text_only"], c["malformed"]) == (22, 16, 3, 3)
    assert c["image_refs"] == 17 and c["unique_images"] == unique
    assert (c["packed"], c["not_found"], c["empty_file"], c["outside_root"], c["other_ext"]) == (11, 1, 1, 2, 2)
    assert c["entries_missing_image"] == 4  # empty, absent, escape, abs
    assert m["num_shards"] == -(-unique // 3) == 5 and m["per_shard"] == 3
    assert m["examples"]["not_found"] == [MISSING]
    assert m["examples"]["empty_file"] == ["coco/train2017/000000000030.jpg"]
    assert sorted(m["examples"]["outside_root"]) == sorted([ESCAPE, mgm["abs"]])
    assert m["examples"]["malformed"] == [f"{mgm['conv']}[15]", f"{mgm['conv']}[16]", f"{mgm['extra']}:4"]
    assert m["fingerprint"] == P.fingerprint(sorted([*STORED, MISSING, ESCAPE, mgm["abs"]]), 3)
    assert sorted(res["done"]) == list(range(5)) and res["skipped"] == []


def test_members_are_the_source_files(mgm, packed):
    out, _ = packed
    paths = sorted([*STORED, MISSING, ESCAPE, mgm["abs"]])
    samples = _members(out)
    by_path = {}
    for key, s in samples.items():
        meta = json.loads(s.pop("json"))
        assert len(s) == 1, s.keys()
        (ext, data), = s.items()
        assert paths[int(key)] == meta["path"] and len(key) == 8
        assert meta["path"] not in by_path  # every image once
        by_path[meta["path"]] = (ext, data, meta.get("found_as"))
    assert set(by_path) == set(PACKED)
    for rel, (disk, _) in PACKED.items():
        ext, data, found_as = by_path[rel]
        assert data == (mgm["root"] / disk).read_bytes()  # copied byte for byte, truncated.jpg included
        assert ext == MEMBER_EXT[disk.rsplit(".", 1)[1]]
        assert found_as == (None if disk == rel else disk)
    assert by_path["ocr_vqa/images/1453600173.jpg"][0] == "gif"
    assert by_path["web-celebrity/images/Tom_Hanks_1.jpeg"][0] == "jpg"
    # each shard holds exactly the slice paths[3i : 3i + 3] (minus unusable ones)
    for tar in sorted(out.glob("*.tar")):
        i = int(tar.stem)
        with tarfile.open(tar) as tf:
            keys = {int(n.split(".")[0]) for n in tf.getnames()}
        assert keys <= set(range(3 * i, 3 * i + 3))


def test_webdataset_reads_the_shards(packed):
    import webdataset as wds

    out, _ = packed
    seen = {}
    for tar in sorted(out.glob("*.tar")):
        for s in wds.WebDataset(str(tar), shardshuffle=False):
            seen[json.loads(s["json"])["path"]] = next(e for e in ("jpg", "png", "gif", "webp") if e in s)
    assert set(seen) == set(PACKED)
    assert seen["ocr_vqa/images/140031996.jpg"] == "png" and seen["wikiart/images/monet_1.webp"] == "webp"


def test_files_without_an_image_suffix_are_named_by_their_header(mgm, tmp_path):
    """A file with no suffix or .jfif is packed under the member name of its format (named `bin` / `jfif`, the
    extractor skipped it as having no image); one that is no image is counted, not packed."""
    from unitok.image_sources import IMAGE_EXTS

    root = tmp_path / "root"
    (root / "web").mkdir(parents=True)
    png = next(p for p in mgm["root"].rglob("*.png"))
    jpg = next(p for p in mgm["root"].rglob("*.jpg") if p.stat().st_size > 1000)
    (root / "web/noext").write_bytes(png.read_bytes())
    (root / "web/s.jfif").write_bytes(jpg.read_bytes())
    (root / "web/notes").write_text("not an image")
    conv = tmp_path / "c.json"
    conv.write_text(json.dumps([{"id": str(i), "image": f"web/{n}", "conversations": []}
                                for i, n in enumerate(("noext", "s.jfif", "notes"))]))
    env = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if k in os.environ}
    try:
        res = P.main(["--conversations", str(conv), "--image-root", str(root), "--out", str(tmp_path / "o")])
    finally:
        os.environ.update(env)
    c = res["manifest"]["counts"]
    assert (c["packed"], c["not_an_image"]) == (2, 1) and res["manifest"]["examples"]["not_an_image"] == ["web/notes"]
    members = {json.loads(s.pop("json"))["path"]: s for s in _members(tmp_path / "o").values()}
    assert {p: list(s) for p, s in members.items()} == {"web/noext": ["png"], "web/s.jfif": ["jpg"]}
    assert all(ext in IMAGE_EXTS for s in members.values() for ext in s)


def test_summary_and_next_steps_printed(mgm, tmp_path, capsys):
    P.main(_args(mgm, tmp_path / "o", per_shard=100))
    text = capsys.readouterr().out
    line = next(ln for ln in text.splitlines() if ln.startswith("pack_images:"))
    assert "packed 11 of 15" in line and f"not_found=1 ['{MISSING}']" in line
    assert "empty_file=1" in line and "outside_root=2" in line and "3 text_only" in line
    assert "--mode understanding" in text and "00000.tar" in text
    assert f"mllm.data.sources split-json {mgm['conv']}" in text and "extra.jsonl" not in text.split("next:")[1]


@pytest.mark.slow
def test_two_ranks_match_one_rank(mgm, packed, tmp_path):
    out1, _ = packed
    out2 = tmp_path / "two"
    p = torchrun_module("mllm.data.pack_images", _args(mgm, out2), timeout=240)
    assert _digests(out2) == _digests(out1)  # byte-identical tars and sidecars
    m1, m2 = (json.loads((o / P.MANIFEST).read_text()) for o in (out1, out2))
    m1.pop("config"), m2.pop("config")
    assert m1 == m2
    assert p.stdout.count("pack_images: packed 11 of 15") == 1  # rank 0 only


def test_rerun_skips_redoes_and_cleans(mgm, packed, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(packed[0], out)
    before = _digests(out)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    res = P.main(_args(mgm, out))
    assert res["done"] == [] and sorted(res["skipped"]) == list(range(5))
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == mtimes
    (out / "00002.tar").unlink()
    stale = out / ".00001.tar.tmp-99999"  # a crashed run's leftover
    stale.write_bytes(b"partial")
    res = P.main(_args(mgm, out))
    assert res["done"] == [2] and not stale.exists()
    assert _digests(out) == before


def test_refuses_a_different_packing(mgm, packed, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(packed[0], out)
    with pytest.raises(ValueError, match=r"manifest\.json belongs to a different packing"):
        P.main(_args(mgm, out, per_shard=4))
    args = _args(mgm, out)
    args[args.index("--conversations") + 2: args.index("--image-root")] = []  # drop --conversations extra.jsonl
    with pytest.raises(ValueError, match="different packing"):
        P.main(args)
    (out / P.MANIFEST).unlink()  # a crashed first run: only sidecars tell
    with pytest.raises(ValueError, match=r"00000\.stats\.json belongs to a different packing"):
        P.main(_args(mgm, out, per_shard=4))


def test_clear_errors(mgm, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="conversation file not found: .*nope.json"):
        P.main(["--conversations", str(tmp_path / "nope.json"), "--image-root", str(mgm["root"]),
                "--out", str(tmp_path / "o")])
    bad = tmp_path / "bad.json"
    bad.write_text('[{"id": 1, "conversations": []},')
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        P.main(["--conversations", str(bad), "--image-root", str(mgm["root"]), "--out", str(tmp_path / "o")])
    with pytest.raises(FileNotFoundError, match="image root not found.*no_root"):
        P.main(["--conversations", str(mgm["conv"]), "--image-root", str(tmp_path / "no_root"),
                "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit):  # PackConfig's ValueError, reported by tyro
        P.main(_args(mgm, tmp_path / "o", per_shard=0))
    assert "--per-shard must be >= 1, got 0" in " ".join(capsys.readouterr().err.replace("│", "").split())
    with pytest.raises(SystemExit):  # a second file goes after its own --conversations
        P.main(["--conversations", str(mgm["conv"]), str(mgm["extra"]), "--image-root", str(mgm["root"]),
                "--out", str(tmp_path / "o")])
    assert str(mgm["extra"]) in "".join(capsys.readouterr().err.replace("│", "").split())  # named, however wrapped


def test_spellings_of_one_path_are_packed_once(tmp_path):
    """"./coco/a.jpg" and "coco/a.jpg" name one image: one member (the other spelling in its json "aliases"),
    and a path found as its normalized form is not "found with another extension"."""
    root = tmp_path / "root"
    (root / "coco").mkdir(parents=True)
    for name in ("a.jpg", "c.jpg"):
        (root / "coco" / name).write_bytes(b"image " + name.encode())
    conv = tmp_path / "c.json"
    conv.write_text(json.dumps([{"id": i, "image": p, "conversations": []}
                                for i, p in enumerate(["./coco/a.jpg", "coco/a.jpg", "coco//c.jpg", "./gone.jpg"])]))
    out = tmp_path / "out"
    m = P.main(["--conversations", str(conv), "--image-root", str(root), "--out", str(out)])["manifest"]
    c = m["counts"]
    assert (c["unique_images"], c["packed"], c["other_ext"], c["not_found"]) == (3, 2, 0, 1)
    assert c["entries_missing_image"] == 1  # "./gone.jpg", matched however it is spelled
    metas = [json.loads(s["json"]) for s in _members(out).values()]
    assert sorted(metas, key=lambda x: x["path"]) == [{"path": "coco//c.jpg"},
                                                       {"path": "coco/a.jpg", "aliases": ["./coco/a.jpg"]}]
