"""unitok.extract and unitok.image_io: decoding of real-photo variants, preprocessing, one real extraction
on two simulated nodes (launch/extract.sh, DeepSpeed's no-ssh mode) over copies of every public input layout (img2dataset webdataset / parquet / files,
hub parquet, JourneyDB jsonl), exact skip counts, resumable reruns, refused mixing, and codes identical
to the chat engine's."""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import public_formats as pf
from real_data import BROKEN, DECODABLE, caption_for, image_variants
from unitok.image_io import PAD_COLOR, ImageTooLarge, load_image, preprocess, to_model_input

SIZE = 32  # the debug preset's img_size: the default --size


def read_codes(path: Path) -> dict[str, dict]:
    """Output code shard -> {key: {"codes", "meta", "txt"}} (in file order)."""
    import webdataset as wds

    out = {}
    for s in wds.WebDataset(str(path), shardshuffle=False, empty_check=False):
        out[s["__key__"]] = {"codes": np.load(io.BytesIO(s["codes.npy"])), "meta": json.loads(s["json"]),
                             "txt": s["txt"].decode() if "txt" in s else None}
    return out


def encode_file(model, data: bytes, mode: str) -> np.ndarray:
    """What extraction must produce for one image file: (K, h, w)."""
    x = to_model_input([preprocess(load_image(data), mode, SIZE)])
    with torch.no_grad():
        return model.encode(x)[0].numpy()


# ---- image_io -------------------------------------------------------------------------------------------
def test_load_image_decodes_every_real_variant_and_rejects_broken_ones():
    v = image_variants()
    for name in DECODABLE:
        img = load_image(v[name])
        assert img.mode == "RGB" and img.size == Image.open(io.BytesIO(v[name])).size, name
    for name in ("rgba.png", "la.png"):  # left half fully transparent -> white, right half opaque photo
        a = np.asarray(load_image(v[name]))
        w = a.shape[1]
        assert (a[:, : w // 2] == 255).all(), name
        assert a[:, w // 2:].mean() < 200, name
    pal = Image.open(io.BytesIO(v["palette_transparent.png"]))
    idx = np.asarray(pal)
    a = np.asarray(load_image(v["palette_transparent.png"]))
    assert (idx == 0).any() and (a[idx == 0] == 255).all()  # transparent palette index -> white
    assert (a[idx != 0] != 255).any()
    gif = Image.open(io.BytesIO(v["animated.gif"]))
    frame0 = np.asarray(gif.convert("RGB"))
    gif.seek(1)
    frame1 = np.asarray(gif.convert("RGB"))
    g = np.asarray(load_image(v["animated.gif"]))
    assert np.array_equal(g, frame0) and not np.array_equal(g, frame1)  # the first frame
    gray16 = np.asarray(Image.open(io.BytesIO(v["gray16.png"])), dtype=np.float64) / 257  # 0..65535 -> 0..255
    g16 = np.asarray(load_image(v["gray16.png"])).astype(np.float64)
    assert np.abs(g16[..., 0] - gray16).max() <= 0.5 and 50 < g16.mean() < 200  # scaled, not clipped to white
    cmyk = np.asarray(load_image(v["cmyk.jpg"])).astype(int)
    webp = np.asarray(load_image(v["chelsea.webp"])).astype(int)  # the same photo through another codec
    assert np.abs(cmyk - webp).mean() < 12
    for name in BROKEN:
        with pytest.raises(Exception):
            load_image(v[name])
    with pytest.raises(ImageTooLarge, match="max_pixels=199,999"):
        load_image(v["wide.jpg"], max_pixels=199_999)
    assert load_image(v["wide.jpg"], max_pixels=200_000).size == (1000, 200)


def test_pil_own_limit_neither_mislabels_nor_undercuts_max_pixels(monkeypatch):
    """PIL refuses images over twice Image.MAX_IMAGE_PIXELS itself (about 179 MP): such an image is too large,
    not undecodable, and a larger max_pixels admits it. Scaled down: PIL's limit at 1000 pixels."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    png = io.BytesIO()
    Image.new("RGB", (100, 50), "red").save(png, "PNG")  # 5000 pixels, over twice PIL's limit
    with pytest.raises(ImageTooLarge, match="image is 5,000 pixels, over max_pixels=500"):
        load_image(png.getvalue(), max_pixels=500)  # PIL's error, before the size is known
    assert load_image(png.getvalue(), max_pixels=6000).size == (100, 50)


def test_an_animated_gif_cut_after_its_first_frame_gives_that_frame():
    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(4)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:])
    cut = gif.getvalue()[: int(len(gif.getvalue()) * 0.3)]  # an interrupted download, cut inside frame 2
    with pytest.raises(IndexError):  # what counting its frames gave (it was skipped as undecodable)
        Image.open(io.BytesIO(cut)).n_frames
    first = np.asarray(Image.open(io.BytesIO(gif.getvalue())).convert("RGB"))
    np.testing.assert_array_equal(np.asarray(load_image(cut)), first)


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


def test_transparent_16bit_gray_is_scaled_before_the_transparent_value_goes_white():
    """A 16-bit grayscale PNG with a tRNS value: scaled to 8 bits like one without, that value -> white."""
    a = np.array([[0, 30000], [65535, 1000]], np.uint16)
    out = {}
    for kw in ({}, {"transparency": 1000}):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG", **kw)
        out[bool(kw)] = np.asarray(load_image(buf.getvalue()))[..., 0].tolist()
    assert out[False] == [[0, 117], [255, 4]] and out[True] == [[0, 117], [255, 255]]


def _refuse_big_pil_images(monkeypatch, limit=1_000_000):
    """PIL raises MemoryError before allocating a new or resized image of more than `limit` pixels."""
    new, resize = Image.new, Image.Image.resize

    def check(size):
        if size[0] * size[1] > limit:
            raise MemoryError(f"a {size[0]}x{size[1]} image")

    def bounded_new(mode, size, *a, **k):
        check(size)
        return new(mode, size, *a, **k)

    def bounded_resize(self, size, *a, **k):
        check(size)
        return resize(self, size, *a, **k)

    monkeypatch.setattr(Image, "new", bounded_new)
    monkeypatch.setattr(Image.Image, "resize", bounded_resize)


def test_extreme_aspects_preprocess_in_bounded_memory_and_photos_as_before(monkeypatch):
    """200000x2 would pad to a 4e10-pixel canvas (understanding) or resize to 3.2e6 x 32 (generation)."""
    from unitok import image_io

    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (48, 80, 3), dtype=np.uint8))
    before = {  # the pipelines as they were, for an image that needs no bounding
        "understanding": np.asarray(image_io.pad_to_square(photo).resize((SIZE, SIZE), Image.BILINEAR)),
        "generation": np.asarray(photo.resize((53, 32), Image.LANCZOS).crop((10, 0, 42, 32))),
    }
    _refuse_big_pil_images(monkeypatch)
    for mode, expected in before.items():
        assert np.array_equal(preprocess(photo, mode, SIZE), expected), mode
    for wh in ((200_000, 2), (2, 200_000)):
        img = Image.new("RGB", wh, (10, 200, 30))
        assert (preprocess(img, "generation", SIZE) == (10, 200, 30)).all()
        out = preprocess(img, "understanding", SIZE)
        assert out.shape == (SIZE, SIZE, 3) and (out[0, 0] == PAD_COLOR).all() and (out[-1, -1] == PAD_COLOR).all()
    # the shrink before padding barely moves a banner (the canvas limit lowered so the reference fits in memory)
    monkeypatch.undo()
    ramp = np.broadcast_to(np.linspace(0, 255, 1200)[None, :, None], (60, 1200, 3)).astype(np.uint8)
    for banner in (Image.fromarray(ramp), Image.fromarray(ramp.transpose(1, 0, 2).copy())):
        reference = np.asarray(image_io.pad_to_square(banner).resize((SIZE, SIZE), Image.BILINEAR)).astype(int)
        with monkeypatch.context() as m:
            m.setattr(image_io, "MAX_PIXELS", 100_000)
            diff = np.abs(preprocess(banner, "understanding", SIZE).astype(int) - reference)
        assert diff.mean() < 0.5 and diff.max() <= 8


# ---- input planning -----------------------------------------------------------------------------------------
def test_plan_inputs_globs_braces_side_files_and_name_clashes(tmp_path):
    from unitok.extract import ExtractConfig, plan_inputs

    items = list(image_variants().items())[:3]
    pf.img2dataset_webdataset(tmp_path / "coyo", items, per_shard=2)
    pf.img2dataset_files(tmp_path / "files", items, per_shard=2, first_shard=5)
    jsonl, _, _ = pf.journeydb(tmp_path / "jdb", items)  # 3 + 3 records (1 line is malformed, 1 blank)

    def plan(*inputs, **kw):
        return plan_inputs(ExtractConfig(tokenizer="t", input=list(inputs), output="o", **kw))

    shards, ignored = plan(str(tmp_path / "coyo/*"))
    assert [s.name for s in shards] == ["00000.tar", "00001.tar"] and {s.kind for s in shards} == {"webdataset"}
    assert sorted(Path(p).name for p in ignored) == ["00000.parquet", "00000_stats.json", "00001.parquet",
                                                     "00001_stats.json"]
    shards, ignored = plan(str(tmp_path / "coyo/{00000..00001}.tar"), str(tmp_path / "files"))
    assert [(s.kind, s.name) for s in shards] == [("webdataset", "00000.tar"), ("webdataset", "00001.tar"),
                                                  ("files", "00005.tar"), ("files", "00006.tar")] and not ignored
    shards, _ = plan(str(tmp_path / "files/*"))  # subfolders win over the metadata parquet files
    assert [s.name for s in shards] == ["00005.tar", "00006.tar"]
    shards, _ = plan(str(jsonl), per_shard=4)
    assert [(s.name, s.first_record, s.num_records) for s in shards] == [("annot-00000.tar", 0, 4),
                                                                         ("annot-00001.tar", 4, 2)]
    shards, ignored = plan(str(tmp_path / "coyo/*"), input_format="parquet")
    assert [s.kind for s in shards] == ["parquet", "parquet"] and len(ignored) == 4
    with pytest.raises(ValueError, match="share output names"):
        plan(str(tmp_path / "coyo/00000.tar"), str(tmp_path / "coyo/00000.parquet"))
    with pytest.raises(FileNotFoundError, match="no input matches"):
        plan(str(tmp_path / "coyo/*.zip"))
    with pytest.raises(ValueError, match="cannot tell the input format"):
        plan(str(tmp_path / "coyo/00000_stats.json"))


def test_files_layout_splits_names_at_the_last_dot(tmp_path):
    """IMG_0001.edited.jpg is an image; cat.1.png and cat.2.png are two samples, each with its own caption;
    names that clean to one key (a.b, a_b) stay two samples."""
    from unitok.image_sources import InputShard, ShardStats, read_shard

    for name in ("IMG_0001.edited.jpg", "cat.1.png", "cat.2.png", "a.b.png", "a_b.png"):
        (tmp_path / name).write_bytes(b"image bytes")
    (tmp_path / "cat.1.txt").write_text("the first cat")
    (tmp_path / "IMG_0001.edited.json").write_text('{"source": "phone"}')
    (tmp_path / "lost.txt").write_text("a caption whose image is gone")  # a sample without its image: counted
    for name in (".DS_Store", "._cat.1.png", "Thumbs.db", "desktop.ini"):  # the OS's files: no samples
        (tmp_path / name).write_bytes(b"\0\1")
    shard = InputShard("files", str(tmp_path), "x.tar")
    got = {r.key: (r.image and r.image.name, r.caption, r.meta, r.skip)
           for r in read_shard(shard, None, ShardStats(shard))}
    assert got == {"IMG_0001_edited": ("IMG_0001.edited.jpg", None, {"source": "phone"}, None),
                   "a_b": ("a.b.png", None, {}, None), "a_b_1": ("a_b.png", None, {}, None),
                   "cat_1": ("cat.1.png", b"the first cat", {}, None), "cat_2": ("cat.2.png", None, {}, None),
                   "lost": (None, b"a caption whose image is gone", {}, "no_image")}


def test_command_line_refuses_flags_of_the_other_mode(capsys):
    """--max-aspect only filters generation-mode crops: with --mode understanding it is an error."""
    from unitok.extract import ExtractConfig, parse_args

    base = ["--tokenizer", "t", "--input", "a/*.tar", "--input", "b/*.tar", "--output", "o"]
    cfg = parse_args([*base, "--max-aspect", "3", "--local_rank=1"])  # the deepspeed launcher's spelling
    assert (cfg.input, cfg.max_aspect, cfg.local_rank, cfg.mode) == (["a/*.tar", "b/*.tar"], 3.0, 1, "generation")
    assert parse_args([*base, "--mode", "understanding"]).max_aspect == 2.0
    with pytest.raises(SystemExit) as e:
        parse_args([*base, "--mode", "understanding", "--max-aspect", "3"])
    assert e.value.code == 2
    assert "--max-aspect does not apply to --mode understanding" in " ".join(
        capsys.readouterr().err.replace("│", "").split())
    with pytest.raises(ValueError, match="--max-aspect does not apply"):  # the same rule without a command line
        ExtractConfig(tokenizer="t", input=["a"], output="o", mode="understanding", max_aspect=1.5)


# ---- every public layout, 2 ranks ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def formats(tmp_path_factory):
    """A debug tokenizer and copies of each public layout, all 15 real-photo variants in each."""
    from unitok import UniTok, preset

    root = tmp_path_factory.mktemp("extract")
    torch.manual_seed(0)
    UniTok(preset("debug")).save_pretrained(root / "tok")
    items = list(image_variants().items())
    raw = root / "raw"
    keys = {"coyo": pf.img2dataset_webdataset(raw / "coyo", items),
            "laion": pf.img2dataset_parquet(raw / "laion", items, first_shard=2),
            "files": pf.img2dataset_files(raw / "files", items, first_shard=4),
            "hub": pf.hub_parquet(raw / "hub", items)}
    jsonl, img_root, names = pf.journeydb(raw / "jdb", items)
    args = ["--tokenizer", str(root / "tok"), "--input", str(raw / "coyo/*"), "--input", str(raw / "laion/*"),
            "--input", str(raw / "files"), "--input", str(raw / "hub/data/train-{00000..00001}-of-00002.parquet"),
            "--input", str(jsonl), "--image-root", str(img_root), "--per-shard", "6", "--mode", "understanding",
            "--batch-size", "4", "--threads", "2"]
    return {"root": root, "raw": raw, "items": dict(items), "keys": keys, "jsonl": jsonl, "img_root": img_root,
            "jdb_names": names, "args": args}


@pytest.fixture(scope="module")
def extracted(formats):
    """ONE understanding-mode extraction over all layouts (no --size: the tokenizer's 32 px) on two nodes of
    one rank each: launch/extract.sh started once per node (DeepSpeed's no-ssh mode) -> (out, log)."""
    from runtime.launch import NodeLaunch

    out = formats["root"] / "codes"
    nodes = NodeLaunch("extract.sh", [*formats["args"], "--output", str(out)], formats["root"] / "nodes").wait()
    for code, log in nodes:
        assert code == 0, log[-3000:]
    return out, "\n".join(log for _, log in nodes)


EXPECTED = {  # output shard -> counts (understanding mode keeps wide / tall; 2 broken files per 15 variants)
    "00000.tar": {"samples": 8}, "00001.tar": {"samples": 5, "undecodable": 2},  # webdataset (+ side files)
    "00002.tar": {"samples": 8, "no_image": 1}, "00003.tar": {"samples": 5, "undecodable": 2, "no_image": 1},
    "00004.tar": {"samples": 8}, "00005.tar": {"samples": 5, "undecodable": 2},  # files
    "train-00000-of-00002.tar": {"samples": 8},
    "train-00001-of-00002.tar": {"samples": 5, "undecodable": 2, "missing_file": 1},
    "annot-00000.tar": {"samples": 6}, "annot-00001.tar": {"samples": 6},
    "annot-00002.tar": {"samples": 1, "undecodable": 2, "missing_file": 1, "corrupt_members": 1, "no_image": 1},
}


def _counts(d: dict) -> dict:
    from unitok.extract import SKIP_REASONS

    return {k: d[k] for k in ("samples", *SKIP_REASONS) if d[k]}


@pytest.mark.slow
def test_two_node_extraction_of_every_public_layout(formats, extracted):
    from unitok import load_tokenizer

    out, log = extracted
    assert "node_rank=0" in log and "node_rank=1" in log and "{'node-a': [0], 'node-b': [1]}" in log
    raw = formats["raw"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert {n: _counts(s) for n, s in manifest["shards"].items()} == EXPECTED
    assert list(manifest["shards"]) == list(EXPECTED)
    assert {n: s["rank"] for n, s in manifest["shards"].items()} == {n: i % 2 for i, n in enumerate(EXPECTED)}
    assert manifest["totals"] == {"samples": 65, "dropped_aspect": 0, "undecodable": 10, "too_large": 0,
                                  "no_image": 3, "missing_file": 2, "corrupt_members": 1, "renamed_keys": 0}
    assert (manifest["image_size"], manifest["grid"], manifest["mode"]) == (32, [2, 2], "understanding")
    assert (manifest["num_codebooks"], manifest["codebook_size"], manifest["missing_shards"]) == (4, 64, [])
    assert manifest["ignored_inputs"]["count"] == 6  # coyo: 2 parquet + 2 stats; laion: 2 stats
    for n in EXPECTED:
        side = json.loads((out / n.replace(".tar", ".stats.json")).read_text())
        assert (side["image_size"], side["grid"], side["mode"]) == (32, [2, 2], "understanding")
    # the first 5 sample ids per reason, across shards in order; warnings name shard and key
    assert manifest["examples"]["undecodable"] == [f"{raw}/coyo/00001.tar:000010005", f"{raw}/coyo/00001.tar:000010006",
                                                   f"{raw}/laion/00003.parquet:000030005",
                                                   f"{raw}/laion/00003.parquet:000030006",
                                                   f"{raw}/files/00005:000050005"]
    jl = formats["jsonl"]
    assert manifest["examples"]["missing_file"] == [f"{raw}/hub/data/train-00001-of-00002.parquet:000000007",
                                                    f"{jl}:000000015"]
    assert manifest["examples"]["corrupt_members"] == [f"{jl}:record 000000016"]
    assert manifest["examples"]["no_image"] == [f"{raw}/laion/00002.parquet:000020008",
                                                f"{raw}/laion/00003.parquet:000030007", f"{jl}:000000017"]
    assert f"{raw}/coyo/00001.tar:000010005 skipped (undecodable)" in log
    assert f"{jl}:000000015 skipped (missing_file): no such file" in log

    # every kept sample: codes exactly as image_io + the tokenizer give them, metadata per layout
    model = load_tokenizer(formats["root"] / "tok")
    items, keys = formats["items"], formats["keys"]
    seen = 0
    for shard in EXPECTED:
        for key, s in read_codes(out / shard).items():
            if shard.startswith("annot"):
                name = formats["jdb_names"][int(key)]
                assert s["meta"]["path"].startswith("./000/") and s["meta"]["Task2"]["Caption"] == caption_for(name)
                assert "prompt" not in s["meta"] and "img_path" not in s["meta"]
                assert s["txt"] == f"{caption_for(name)}, highly detailed --ar 4:3 --v 5"
            elif shard.startswith("train"):
                name = keys["hub"][f"{int(shard[6:11])}/{key}"]
                assert s["meta"]["path"] == name and s["txt"] == caption_for(name)
                assert "tags" not in s["meta"] and "image" not in s["meta"] and isinstance(s["meta"]["id"], int)
            else:
                fmt = {"0": "coyo", "1": "coyo", "2": "laion", "3": "laion"}.get(shard[4], "files")
                name = keys[fmt][key]
                assert s["meta"]["key"] == key and s["meta"]["status"] == "success" and "jpg" not in s["meta"]
                assert s["txt"] == caption_for(name)
            assert s["codes"].dtype == np.uint16 and s["codes"].shape == (4, 2, 2)
            assert (s["meta"]["width"], s["meta"]["height"]) == Image.open(io.BytesIO(items[name])).size
            np.testing.assert_array_equal(s["codes"].astype(np.int64), encode_file(model, items[name], "understanding"))
            seen += 1
    assert seen == 65
    gif = read_codes(out / "00000.tar")["000000007"]  # GIF read (first frame), wide and tall kept
    assert (gif["meta"]["width"], gif["meta"]["height"]) == (64, 43)
    assert {"000010002", "000010003"} <= set(read_codes(out / "00001.tar"))


def _in_process(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)


@pytest.mark.slow
def test_rerun_skips_finished_shards_and_redoes_a_lost_one(formats, extracted, monkeypatch):
    from unitok.extract import main

    _in_process(monkeypatch)
    out, _ = extracted
    args = [*formats["args"], "--output", str(out)]
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("*.tar")}
    totals = json.loads((out / "manifest.json").read_text())["totals"]
    res = main(args)
    assert res["done"] == [] and sorted(res["skipped"]) == sorted(EXPECTED)
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("*.tar")} == before
    (out / "annot-00001.tar").unlink()
    res = main(args)
    assert res["done"] == ["annot-00001.tar"] and len(res["skipped"]) == len(EXPECTED) - 1
    assert (out / "annot-00001.tar").read_bytes() == before["annot-00001.tar"][1]  # mtime 0, deterministic
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar") if p.name != "annot-00001.tar"} == \
        {n: m for n, (m, _) in before.items() if n != "annot-00001.tar"}
    assert res["manifest"]["totals"] == totals and not list(out.glob(".*tmp*"))
    with pytest.raises(ValueError, match=r"annot-00000.stats.json holds records 0\+6 but this run cuts 0\+5"):
        main([*args, "--per-shard", "5"])  # the later --per-shard wins


@pytest.mark.slow
def test_other_size_or_mode_in_the_same_output_is_refused(formats, extracted, monkeypatch):
    from unitok.extract import main

    _in_process(monkeypatch)
    out, _ = extracted
    listing = sorted(p.name for p in out.iterdir())
    with pytest.raises(ValueError, match=r"manifest.json was written with image_size=32 but this run has "
                                         r"image_size=48"):
        main([*formats["args"], "--output", str(out), "--size", "48"])
    with pytest.raises(ValueError, match=r"mode='understanding' but this run has mode='generation'"):
        main([*formats["args"], "--output", str(out), "--mode", "generation"])
    # another checkpoint of the same shape (a longer-trained tokenizer): its codes were added to the folder
    from unitok import UniTok, preset

    torch.manual_seed(1)
    UniTok(preset("debug")).save_pretrained(formats["root"] / "tok_other")
    other = [*formats["args"], "--output", str(out)]
    other[other.index("--tokenizer") + 1] = str(formats["root"] / "tok_other")
    with pytest.raises(ValueError, match=r"manifest.json was written with tokenizer_fingerprint='[0-9a-f]{16}' but "
                                         r"this run has tokenizer_fingerprint='[0-9a-f]{16}'"):
        main(other)
    assert sorted(p.name for p in out.iterdir()) == listing  # nothing written
    (out / "manifest.json").rename(out / "manifest.bak")  # sidecars alone are enough to refuse
    try:
        with pytest.raises(ValueError, match=r"00000.stats.json was written with image_size=32"):
            main([*formats["args"], "--output", str(out), "--size", "48"])
    finally:
        (out / "manifest.bak").rename(out / "manifest.json")
    side = out / "00000.stats.json"  # a sidecar of an older extract.py (no settings recorded) is refused too
    old = side.read_text()
    for f in (side, out / "manifest.json"):  # ... but not for the tokenizer, which older versions did not record
        f.write_text(json.dumps({k: v for k, v in json.loads(f.read_text()).items() if k != "tokenizer_fingerprint"}))
    assert main([*formats["args"], "--output", str(out)])["done"] == []
    assert "tokenizer_fingerprint" in json.loads((out / "manifest.json").read_text())  # rewritten by this run
    side.write_text(json.dumps({k: v for k, v in json.loads(old).items() if k != "image_size"}))
    try:
        with pytest.raises(ValueError, match=r"00000.stats.json does not record image_size"):
            main([*formats["args"], "--output", str(out)])
    finally:
        side.write_text(old)


def test_generation_mode_drops_wide_and_tall_and_counts_a_truncated_tar(formats, tmp_path, monkeypatch):
    import tarfile

    from unitok import load_tokenizer
    from unitok.extract import main

    _in_process(monkeypatch)
    raw = formats["raw"]
    bad = tmp_path / "bad"
    bad.mkdir()
    data = (raw / "coyo/00000.tar").read_bytes()
    with tarfile.open(raw / "coyo/00000.tar") as t:
        m = t.getmember("000000002.jpg")
    (bad / "00009.tar").write_bytes(data[: m.offset_data + m.size // 2])  # cut inside the third sample's jpg
    res = main(["--tokenizer", str(formats["root"] / "tok"), "--input", str(raw / "coyo/*.tar"),
                "--input", str(bad / "00009.tar"), "--output", str(tmp_path / "gen"), "--batch-size", "3"])
    man = res["manifest"]
    assert {n: _counts(s) for n, s in man["shards"].items()} == {
        "00000.tar": {"samples": 8}, "00001.tar": {"samples": 3, "undecodable": 2, "dropped_aspect": 2},
        "00009.tar": {"samples": 2, "corrupt_members": 1}}
    assert man["examples"]["dropped_aspect"] == [f"{raw}/coyo/00001.tar:000010002", f"{raw}/coyo/00001.tar:000010003"]
    assert (man["mode"], man["image_size"], man["grid"]) == ("generation", 32, [2, 2])
    got = read_codes(tmp_path / "gen/00009.tar")
    assert list(got) == ["000000000", "000000001"]
    model = load_tokenizer(formats["root"] / "tok")
    gif = read_codes(tmp_path / "gen/00000.tar")["000000007"]["codes"]
    np.testing.assert_array_equal(gif.astype(np.int64), encode_file(model, formats["items"]["animated.gif"],
                                                                     "generation"))
    # the truncated shard downloaded again: a rerun extracts it again (it kept its 2 samples before)
    (bad / "00009.tar").write_bytes(data)
    again = main(["--tokenizer", str(formats["root"] / "tok"), "--input", str(raw / "coyo/*.tar"),
                  "--input", str(bad / "00009.tar"), "--output", str(tmp_path / "gen"), "--batch-size", "3"])
    assert again["done"] == ["00009.tar"] and sorted(again["skipped"]) == ["00000.tar", "00001.tar"]
    assert _counts(again["manifest"]["shards"]["00009.tar"]) == {"samples": 8}
    assert (tmp_path / "gen/00009.tar").read_bytes() == (tmp_path / "gen/00000.tar").read_bytes()


def test_repeated_parquet_keys_are_renamed_so_the_loader_reads_every_sample(formats, tmp_path, monkeypatch):
    """A parquet whose `key` column repeats (x, x) or collides once cleaned (img.1, img_1), as hub sets may: each
    sample keeps its codes under a key of its own, and the manifest counts what mllm.data's reader gets (it keeps
    only the first of consecutive members sharing a key)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mllm.data.sources import read_tar_samples
    from unitok.extract import main

    _in_process(monkeypatch)
    names = ["astronaut.jpg", "coffee.png", "camera_gray.jpg", "cmyk.jpg", "rgba.png"]
    pf.img2dataset_parquet(tmp_path / "in", [(n, formats["items"][n]) for n in names], failed_per_shard=0)
    src = tmp_path / "in/00000.parquet"
    table = pq.read_table(src)
    keys = ["img.1", "img_1", "x", "x", "x_1"]
    pq.write_table(table.set_column(table.schema.get_field_index("key"), "key", pa.array(keys)), src)
    man = main(["--tokenizer", str(formats["root"] / "tok"), "--input", str(src), "--output", str(tmp_path / "out"),
                "--mode", "understanding", "--batch-size", "2", "--threads", "1"])["manifest"]
    errors = []
    got = read_tar_samples(tmp_path / "out/00000.tar", errors.append)
    assert errors == [] and len(got) == man["totals"]["samples"] == 5
    assert man["totals"]["renamed_keys"] == 3
    assert man["examples"]["renamed_keys"] == [f"{src}:img_1", f"{src}:x", f"{src}:x_1"]
    assert [s["__key__"] for s in got] == ["img_1", "img_1_1", "x", "x_1", "x_1_1"]  # in row order
    assert [json.loads(s["json"])["key"] for s in got] == keys  # the json keeps the key as written
    assert [s["txt"].decode() for s in got] == [caption_for(n) for n in names]


def test_output_folder_holding_the_inputs_is_refused(formats, tmp_path, monkeypatch):
    """--output set to the input folder (or a folder above it) would take each input tar for its own finished
    code shard: refused before anything is written, naming the flag."""
    import re

    from unitok.extract import main

    _in_process(monkeypatch)
    raw = tmp_path / "raw"
    pf.img2dataset_webdataset(raw / "coyo", list(formats["items"].items())[:3])
    before = sorted(p.name for p in raw.rglob("*"))
    for out in (raw / "coyo", raw):
        with pytest.raises(ValueError, match=re.escape(f"--output {out} holds the input {raw}/coyo/00000.tar")):
            main(["--tokenizer", str(formats["root"] / "tok"), "--input", str(raw / "coyo/*.tar"),
                  "--output", str(out)])
    assert sorted(p.name for p in raw.rglob("*")) == before  # no manifest, no sidecar


def test_command_line_reports_bad_input_in_one_line(tmp_path):
    """A brace range with a missing shard is refused before any work, as one line and exit status 1."""
    import subprocess
    import sys

    for name in ("00000.tar", "00002.tar"):
        (tmp_path / name).write_bytes(b"")
    res = subprocess.run([sys.executable, "-m", "unitok.extract", "--tokenizer", str(tmp_path / "tok"), "--input",
                          str(tmp_path / "{00000..00002}.tar"), "--output", str(tmp_path / "out")],
                         cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.splitlines()[-1] == f"error: input not found: {tmp_path}/00001.tar"
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_chat_engine_gives_the_codes_extraction_wrote(formats, extracted):
    """The same file through `MLLMEngine.open_image` + `encode_images` and through understanding-mode
    extraction (jsonl layout: the images are files on disk) gives identical codes."""
    import mllm  # noqa: F401
    from mllm import UniMLLMForCausalLM
    from mllm.engine import MLLMEngine
    from mllm.data.tiny_tokenizer import make_llama_tokenizer
    from mllm_tiny import tiny_config
    from transformers import AutoTokenizer
    from unitok import load_tokenizer

    out, _ = extracted
    make_llama_tokenizer(formats["root"] / "llama")
    torch.manual_seed(0)
    engine = MLLMEngine(UniMLLMForCausalLM(tiny_config(vocab_size=512)), AutoTokenizer.from_pretrained(
        formats["root"] / "llama"), load_tokenizer(formats["root"] / "tok"))  # image size: the tokenizer's 32
    codes = {}
    for shard in ("annot-00000.tar", "annot-00001.tar"):
        codes.update({s["meta"]["path"]: s["codes"] for s in read_codes(out / shard).values()})
    got = {}
    for name in ("wide.jpg", "rgba.png", "animated.gif", "palette_transparent.png", "gray16.png", "cmyk.jpg"):
        rel = f"./000/{hashlib.md5(name.encode()).hexdigest()}.jpg"
        got[name] = engine.encode_images([engine.open_image(formats["img_root"] / rel)])[0].numpy()
        np.testing.assert_array_equal(got[name], codes[rel].astype(np.int64), err_msg=name)
    assert len({g.tobytes() for g in got.values()}) > 1  # the images give different codes: the check can fail
