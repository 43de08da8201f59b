"""experiments.synthetic, the shapes world of the demo, the ablation grid and the library tests: writers are
deterministic, captions and metadata match the pixels, and the checker reads rendered scenes back."""
import io
import json
import random
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from experiments.synthetic import (BACKGROUNDS, FOREGROUNDS, SHAPES, DemoDataConfig, classify_image, draw_shape,
                                   random_scene, write_demo_data, write_eval_folders, write_shards)


def _read_tar(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def _assert_matches_pixels(meta: dict, png: bytes, caption: str, size: int = 32) -> None:
    """The caption names the scene in the metadata, and the pixels show it (PNG: exact colours)."""
    assert all(meta[k] in caption for k in ("shape", "color", "background")), (caption, meta)
    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert img.shape == (size, size, 3)
    bg = BACKGROUNDS[meta["background"]]
    assert tuple(img[0, 0]) == bg or tuple(img[-1, -1]) == bg  # the shape never covers two corners
    assert (img == np.array(FOREGROUNDS[meta["color"]])).all(-1).sum() > 30  # the shape is drawn


def test_shards_are_deterministic_and_consistent(tmp_path):
    a = write_shards(tmp_path / "a", num_shards=2, samples_per_shard=30, size=32, seed=3)
    b = write_shards(tmp_path / "b", num_shards=2, samples_per_shard=30, size=32, seed=3)
    c = write_shards(tmp_path / "c", num_shards=2, samples_per_shard=6, size=32, seed=4)
    assert [p.rsplit("/", 1)[1] for p in a] == ["00000.tar", "00001.tar"]
    assert [open(p, "rb").read() for p in a] == [open(p, "rb").read() for p in b]
    assert open(a[0], "rb").read() != open(c[0], "rb").read()
    members = _read_tar(a[0])
    assert len(members) == 30 * 3
    for name in [n for n in members if n.endswith(".txt")]:
        key = name[:-4]
        _assert_matches_pixels(json.loads(members[key + ".json"]), members[key + ".png"], members[name].decode())


def test_classify_image_reads_rendered_scenes_back():
    rng = random.Random(0)
    for size in (32, 64):
        for _ in range(100):
            shape, color, background = random_scene(rng)
            got = classify_image(draw_shape(shape, color, background, size, rng))
            assert got == {"shape": shape, "color": color, "background": background}, (size, got)


def test_classify_image_reads_shape_through_blur():
    """Reconstructions and generated images are soft: blur rounds a square's corners and a triangle's tip.
    The checker still reads each shape of blurred renders right (sigma 1.5 px at 32 px: 99 % measured over
    600; the fill-ratio rule it replaced read 85 % and fails this test)."""
    from PIL import ImageFilter

    rng = random.Random(3)
    right, n = {s: 0 for s in SHAPES}, {s: 0 for s in SHAPES}
    for _ in range(300):
        shape, color, background = random_scene(rng)
        got = classify_image(draw_shape(shape, color, background, 32, rng).filter(ImageFilter.GaussianBlur(1.5)))
        n[shape] += 1
        right[shape] += got["shape"] == shape
    assert all(right[s] >= 0.95 * n[s] for s in SHAPES), (right, n)


def test_eval_folders_hold_every_scene(tmp_path):
    ev, zs = write_eval_folders(tmp_path, size=32, num_images=5, per_class=2)
    assert len(list(ev.glob("*.png"))) == 5
    classes = sorted(d.name for d in zs.iterdir())
    assert len(classes) == len(SHAPES) * len(FOREGROUNDS) * len(BACKGROUNDS) == 54
    assert "red_circle_on_a_white_background" in classes
    img = Image.open(zs / "red_circle_on_a_white_background" / "001.png")
    assert classify_image(img) == {"shape": "circle", "color": "red", "background": "white"}


def test_demo_data_is_deterministic_and_consistent(tmp_path):
    c = DemoDataConfig(num_images=24, images_per_shard=10, num_eval_images=6, num_text=10, text_per_file=4, seed=5)
    m = write_demo_data(tmp_path / "a", c)
    write_demo_data(tmp_path / "b", c)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 3 + 2 + 3 + 1 + 1  # image shards, eval tar + questions, text files, instructions, manifest
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    samples = list(wds.WebDataset(str(tmp_path / "a/images/{00000..00002}.tar"), shardshuffle=False))
    assert len(samples) == m["num_images"] == 24
    paths = {}
    for s in samples:
        meta = json.loads(s["json"])
        _assert_matches_pixels(meta, s["png"], s["txt"].decode())
        paths[meta["path"]] = meta
    conv = json.loads((tmp_path / "a/instructions/train.json").read_text())
    with_img = [c for c in conv if "image" in c]
    assert len(with_img) == 24 and len(conv) > 24
    for row in with_img:
        meta = paths[row["image"]]  # every referenced image exists in the shards
        for q, a in zip(row["conversations"][::2], row["conversations"][1::2]):
            if "shape" in q["value"] and "color" not in q["value"]:
                assert a["value"] == f"A {meta['shape']}."
            if q["value"].endswith("What color is the shape?"):
                assert a["value"].lower() == meta["color"] + "."


def test_tokenizer_images_are_a_separate_draw_that_leaves_the_rest_unchanged(tmp_path):
    base = dict(num_images=12, images_per_shard=5, num_eval_images=4, num_text=6, text_per_file=3, seed=1)
    plain = write_demo_data(tmp_path / "plain", DemoDataConfig(**base))
    m = write_demo_data(tmp_path / "tok", DemoDataConfig(**base, num_tokenizer_images=11))
    assert plain["tokenizer_shards"] == plain["image_shards"] == "images/{00000..00002}.tar"
    assert m["tokenizer_shards"] == "tokenizer_images/{00000..00002}.tar"
    # every file the MLLM and the report read is byte-identical with or without the tokenizer's images
    for f in (tmp_path / "plain").rglob("*"):
        if f.is_file() and f.name != "manifest.json":
            assert (tmp_path / "tok" / f.relative_to(tmp_path / "plain")).read_bytes() == f.read_bytes(), f
    samples = list(wds.WebDataset(str(tmp_path / "tok" / m["tokenizer_shards"]), shardshuffle=False))
    assert len(samples) == 11 and all(s["__key__"].startswith("tokenizer") for s in samples)
    for s in samples:
        _assert_matches_pixels(json.loads(s["json"]), s["png"], s["txt"].decode())
    mllm_keys = {s["__key__"] for s in wds.WebDataset(str(tmp_path / "tok" / m["image_shards"]), shardshuffle=False)}
    assert mllm_keys.isdisjoint(s["__key__"] for s in samples)
    with pytest.raises(ValueError, match="num_tokenizer_images"):
        DemoDataConfig(num_tokenizer_images=-1)
    # the demo reads both patterns from the manifest, and says what to do with a data folder that predates the key
    from experiments.demo import image_shards

    (tmp_path / "tok").rename(tmp_path / "data")
    assert image_shards(tmp_path, "tokenizer_shards") == str(tmp_path / "data" / m["tokenizer_shards"])
    assert image_shards(tmp_path) == str(tmp_path / "data" / m["image_shards"])
    old = {k: v for k, v in m.items() if k != "tokenizer_shards"}
    (tmp_path / "data" / "manifest.json").write_text(json.dumps(old))
    with pytest.raises(RuntimeError, match="manifest.json names no tokenizer_shards.*--fresh"):
        image_shards(tmp_path, "tokenizer_shards")
