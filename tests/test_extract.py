"""unitok.extract: preprocessing, a real 2-rank torchrun extraction, idempotent reruns, code equality."""
from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from unitok.extract import PAD_COLOR, main, preprocess, to_model_input

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def img_bytes(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def noise(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


# ---- preprocessing --------------------------------------------------------------------------------------
def test_generation_mode_resizes_short_side_and_centre_crops():
    stripes = np.zeros((32, 96, 3), np.uint8)
    stripes[:, :32] = (255, 0, 0)
    stripes[:, 32:64] = (0, 255, 0)
    stripes[:, 64:] = (0, 0, 255)
    out = preprocess(Image.fromarray(stripes), "generation", 32)
    assert out.shape == (32, 32, 3) and (out == (0, 255, 0)).all()  # exactly the middle stripe
    big = preprocess(Image.fromarray(np.full((64, 128, 3), 200, np.uint8)), "generation", 32)
    assert big.shape == (32, 32, 3) and (np.abs(big.astype(int) - 200) <= 1).all()


def test_understanding_mode_pads_to_square_with_grey():
    red = Image.fromarray(np.full((32, 64, 3), (255, 0, 0), np.uint8))  # wide: padded above and below
    out = preprocess(red, "understanding", 32)
    assert out.shape == (32, 32, 3)
    assert tuple(out[0, 0]) == PAD_COLOR and tuple(out[-1, -1]) == PAD_COLOR
    assert tuple(out[16, 16]) == (255, 0, 0) and tuple(out[16, 0]) == (255, 0, 0)
    x = to_model_input([out])
    assert x.shape == (1, 3, 32, 32) and x.min() >= -1 and x.max() <= 1


# ---- multi-rank extraction -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A debug tokenizer and three input shards (one undecodable image, one over-wide image)."""
    from unitok import UniTok, preset

    root = tmp_path_factory.mktemp("extract")
    torch.manual_seed(0)
    UniTok(preset("debug")).save_pretrained(root / "tok")
    specs = [  # (key, image bytes or None for garbage, format member)
        [("a0", noise(32, 32, 0), "png"), ("a1", noise(48, 32, 1), "jpg"), ("a2", noise(40, 40, 2), "webp")],
        [("b0", noise(32, 32, 3), "png"), ("b1", None, "jpg"), ("b2", noise(32, 48, 4), "png")],
        [("c0", noise(100, 20, 5), "png"), ("c1", noise(64, 64, 6), "jpg"), ("c2", noise(32, 32, 7), "png")],
    ]
    images = {}
    (root / "in").mkdir()
    for si, spec in enumerate(specs):
        with wds.TarWriter(str(root / f"in/{si:05d}.tar"), mtime=0) as w:
            for key, img, ext in spec:
                fmt = {"jpg": "JPEG"}.get(ext, ext.upper())
                data = b"definitely not an image" if img is None else img_bytes(img, fmt)
                images[key] = data
                w.write({"__key__": key, ext: data, "txt": f"caption of {key}",
                         "json": {"path": f"dir/{key}.{ext}", "source": "test"}})
    return root, images


def run_torchrun(root: Path, out: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "unitok.extract", "--tokenizer", str(root / "tok"),
           "--input", str(root / "in/{00000..00002}.tar"), "--output", str(out), "--size", "32",
           "--batch-size", "2", "--threads", "2"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_two_rank_extraction_idempotent_and_exact(setup, monkeypatch):
    from unitok import load_tokenizer

    root, images = setup
    out = root / "codes"
    proc = run_torchrun(root, out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["totals"] == {"samples": 7, "dropped_aspect": 1, "undecodable": 1, "no_image": 0,
                                  "corrupt_members": 0}
    assert {n: s["rank"] for n, s in manifest["shards"].items()} == {"00000.tar": 0, "00001.tar": 1, "00002.tar": 0}
    assert manifest["num_codebooks"] == 4 and manifest["grid"] == [2, 2] and manifest["missing_shards"] == []

    model = load_tokenizer(root / "tok")
    seen = []
    for si in range(3):
        for s in wds.WebDataset(str(out / f"{si:05d}.tar"), shardshuffle=False):
            key = s["__key__"]
            seen.append(key)
            codes = np.load(io.BytesIO(s["codes.npy"]))
            assert codes.dtype == np.uint16 and codes.shape == (4, 2, 2)
            meta = json.loads(s["json"])
            assert meta["path"].startswith(f"dir/{key}.") and meta["source"] == "test"
            orig = Image.open(io.BytesIO(images[key]))
            assert (meta["width"], meta["height"]) == orig.size
            assert s["txt"].decode() == f"caption of {key}"
            expected = model.encode(to_model_input([preprocess(orig, "generation", 32)]))[0]
            np.testing.assert_array_equal(codes.astype(np.int64), expected.numpy())
    assert seen == ["a0", "a1", "a2", "b0", "b2", "c1", "c2"]  # b1 undecodable, c0 too wide (5:1)

    # rerun (single process): every shard is already done and left untouched
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("*.tar")}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    args = ["--tokenizer", str(root / "tok"), "--input", str(root / "in/{00000..00002}.tar"), "--output", str(out),
            "--size", "32"]
    res = main(args)
    assert res["done"] == [] and sorted(res["skipped"]) == ["00000.tar", "00001.tar", "00002.tar"]
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("*.tar")} == before
    assert res["manifest"]["totals"] == manifest["totals"]
    # a lost shard is redone, byte-identical (tar mtime 0, deterministic encode)
    (out / "00001.tar").unlink()
    res = main(args)
    assert res["done"] == ["00001.tar"] and (out / "00001.tar").read_bytes() == before["00001.tar"][1]
    assert not list(out.glob(".*tmp*"))
