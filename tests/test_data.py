"""The webdataset image-text pipeline over shards written in tmp_path (REFERENCE.md 4.8)."""
import io
import json
import random
from unittest import mock

import pytest
import torch
import webdataset as wds

from experiments.synthetic import draw_shape, write_shards
from unitok.data import DataConfig, ImageTextLoader, get_tokenizer, val_transform

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # wds.warn_and_continue on bad members


def _cfg(shards, **kw) -> DataConfig:
    base = dict(shards=shards, img_size=32, local_batch_size=4, num_workers=0, context_length=16,
                shuffle_buffer=16, shuffle_initial=4)
    base.update(kw)
    return DataConfig(**base)


def test_batches_shapes_ranges_and_tokens(tmp_path):
    shards = write_shards(tmp_path, num_shards=2, samples_per_shard=8, size=40, seed=0)
    loader = ImageTextLoader(_cfg(shards, train=False))  # fixed order: shard 0 first
    batches = list(loader)
    assert len(batches) == 4 and loader.stats.counts["samples"] == 16 and loader.stats.skipped == 0
    b = batches[0]
    assert b["images"].shape == (4, 3, 32, 32) and b["images"].dtype == torch.float32
    assert b["texts"].shape == (4, 16) and b["texts"].dtype == torch.int64
    assert -1 <= b["images"].min() < 0 < b["images"].max() <= 1
    # the first batch is exactly the first 4 samples of shard 0, transformed and tokenized
    samples = list(wds.WebDataset(shards[0], shardshuffle=False).decode("pilrgb"))[:4]
    expected = torch.stack([val_transform(s["png"], 32) for s in samples])
    assert torch.equal(b["images"], expected)
    assert torch.equal(b["texts"], get_tokenizer("ViT-B-32", 16)([s["txt"] for s in samples]))
    # training crops: random, seeded, still in range
    train = list(ImageTextLoader(_cfg(shards)))
    again = list(ImageTextLoader(_cfg(shards)))
    assert all(torch.equal(x["images"], y["images"]) for x, y in zip(train, again))
    assert all(-1 <= x["images"].min() and x["images"].max() <= 1 for x in train)
    assert not all(torch.equal(x["images"], y["images"]) for x, y in zip(train, batches))


def _write_bad_shard(path):
    rng = random.Random(0)
    good = []
    for i in range(5):
        buf = io.BytesIO()
        draw_shape("circle", "red", "white", 32, rng).save(buf, format="PNG")
        good.append({"__key__": f"good{i}", "png": buf.getvalue(), "txt": "a red circle on a white background"})
    with wds.TarWriter(str(path)) as sink:
        sink.write(good[0])
        sink.write({"__key__": "corrupt", "jpg": b"\xff\xd8 this is not a jpeg", "txt": "broken"})
        sink.write(good[1])
        sink.write({"__key__": "nocaption", "png": good[2]["png"]})
        sink.write(good[2])
        sink.write({"__key__": "noimage", "txt": "a caption without an image"})
        sink.write({"__key__": "nothing", "json": b"{}"})  # neither: one skip (missing_image), not two
        for g in good[3:]:
            sink.write(g)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_samples_are_skipped_and_counted(tmp_path, num_workers):
    _write_bad_shard(tmp_path / "bad.tar")
    good = write_shards(tmp_path / "good", num_shards=1, samples_per_shard=3, size=32)
    loader = ImageTextLoader(_cfg([str(tmp_path / "bad.tar"), *good], local_batch_size=2,
                                  num_workers=num_workers, train=False))
    batches = list(loader)
    counts = loader.stats.as_dict()  # the counts crossed from the workers to the main process
    assert counts == {"samples": 8, "read_errors": 0, "decode_errors": 1, "missing_image": 2, "missing_text": 1}
    # 2 workers: bad.tar gives 5 samples -> 2 batches, the good shard 3 -> 1; one pass drops partials
    assert len(batches) == (4 if num_workers == 0 else 3)
    assert loader.state_dict()["stats"] == counts


def _same(xs, ys) -> bool:
    return len(xs) == len(ys) and all(torch.equal(x["images"], y["images"]) and torch.equal(x["texts"], y["texts"])
                                      for x, y in zip(xs, ys))


@pytest.mark.parametrize("num_workers,per_epoch,stop", [(0, 0, 3), (2, 0, 4), (2, 7, 5)])
def test_resume_continues_exactly(tmp_path, num_workers, per_epoch, stop):
    # uneven shards (3 x 6 and 2 x 5 samples): workers run out at different times in one-pass mode;
    # per_epoch = 7 exceeds one pass of a worker and forces a second, reshuffled pass
    shards = (write_shards(tmp_path / "a", num_shards=3, samples_per_shard=6, size=32, seed=1)
              + write_shards(tmp_path / "b", num_shards=2, samples_per_shard=5, size=32, seed=2))
    cfg = _cfg(shards, num_workers=num_workers, num_batches_per_epoch=per_epoch)
    full = ImageTextLoader(cfg)
    epoch0, epoch1 = list(full), list(full)
    if per_epoch:
        assert len(epoch0) == len(epoch1) == per_epoch
    assert not _same(epoch0, epoch1)  # the shard and sample order depend on the epoch
    first = ImageTextLoader(cfg)
    head = []
    for batch in first:
        head.append(batch)
        if len(head) == stop:
            break
    state = json.loads(json.dumps(first.state_dict()))  # checkpoints store it as JSON
    assert state["epoch"] == 0 and state["batches"] == stop
    resumed = ImageTextLoader(cfg)
    resumed.load_state_dict(state)
    tail = list(resumed)
    assert _same(head + tail, epoch0)
    assert resumed.stats.counts["samples"] == full.stats.counts["samples"] // 2
    # a resume inside epoch 1 as well
    mid = ImageTextLoader(cfg)
    list(mid)
    it = iter(mid)
    one = [next(it)]
    state = mid.state_dict()
    del it
    again = ImageTextLoader(cfg)
    again.load_state_dict(state)
    assert _same(one + list(again), epoch1)


def test_two_ranks_get_disjoint_samples(tmp_path, monkeypatch):
    shards = write_shards(tmp_path, num_shards=4, samples_per_shard=8, size=32, seed=5)
    seen = []
    for rank in range(2):
        batches = list(ImageTextLoader(_cfg(shards), rank=rank, world_size=2))
        assert len(batches) == 4  # 2 shards x 8 samples / 4 per batch
        seen.append({bytes(img.numpy().tobytes()) for b in batches for img in b["images"]})
    assert len(seen[0]) == len(seen[1]) == 16 and not seen[0] & seen[1]
    # without explicit arguments the split follows RANK / WORLD_SIZE (wds.split_by_node)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    env_loader = ImageTextLoader(_cfg(shards))
    assert env_loader.rank == 1 and env_loader.world_size == 2
    assert {bytes(img.numpy().tobytes()) for b in env_loader for img in b["images"]} == seen[1]


@pytest.mark.parametrize("name,message", [
    ("ViT-B-16-SigLIP", "a Hugging Face one (timm/ViT-B-16-SigLIP) that it downloads at run time"),
    ("hf-hub:timm/ViT-B-16-SigLIP", "is not a built-in open_clip model name"),
    ("ViT-B-32x", "is not a built-in open_clip model name"),  # a typo: open_clip would fall back silently
])
def test_tokenizer_names_open_clip_would_download_are_refused_at_config_time(name, message, capsys):
    """Only open_clip's bundled BPE tokenizer works offline: a --data.tokenizer that open_clip serves with a Hub
    tokenizer fails when the config is made, naming the flag, without a network lookup (the old path spent
    most of a minute in download retries once the loader started)."""
    import open_clip

    from unitok.train import parse_config

    with mock.patch.object(open_clip, "get_tokenizer", side_effect=AssertionError("open_clip.get_tokenizer ran")):
        with pytest.raises(ValueError, match="--data.tokenizer") as err:
            DataConfig(tokenizer=name)
        assert message in str(err.value)
        with pytest.raises(ValueError, match="--data.tokenizer"):
            get_tokenizer(name, 16)
        with pytest.raises(SystemExit) as exit_:
            parse_config(["--preset", "debug", "--data.tokenizer", name])
    assert exit_.value.code == 2 and "--data.tokenizer" in capsys.readouterr().err
    assert DataConfig(tokenizer="ViT-L-14").tokenizer == "ViT-L-14"  # another bundled-BPE name is taken


def test_config_and_loader_errors(tmp_path):
    shards = write_shards(tmp_path, num_shards=2, samples_per_shard=2, size=32)
    with pytest.raises(ValueError):
        DataConfig(img_size=0)
    with pytest.raises(ValueError):
        DataConfig(crop_scale=(0.5, 1.5))
    with pytest.raises(ValueError, match="at least 4"):
        ImageTextLoader(_cfg(shards, num_workers=2), rank=0, world_size=2)
    with pytest.raises(FileNotFoundError):
        ImageTextLoader(_cfg([str(tmp_path / "missing.tar")]))
    state = ImageTextLoader(_cfg(shards)).state_dict()
    with pytest.raises(ValueError, match=r"other data settings \(seed: 0 -> 1\); an exact resume"):
        ImageTextLoader(_cfg(shards, seed=1)).load_state_dict(state)
    # another shard list of the same length and first name (a file replaced, another dataset numbered alike):
    # the saved positions index the old list, and it resumed silently (20 % of an epoch skipped, some twice)
    other = write_shards(tmp_path / "other", num_shards=3, samples_per_shard=2, size=32)
    (tmp_path / "other" / "00001.tar").rename(tmp_path / "other" / "00009.tar")
    swapped = [other[0], str(tmp_path / "other" / "00009.tar")]
    with pytest.raises(ValueError, match=r"other data settings \(shard_names: \w+ -> \w+\)"):
        ImageTextLoader(_cfg(swapped)).load_state_dict(state)
    older = {**state, "fingerprint": {k: v for k, v in state["fingerprint"].items() if k != "shard_names"}}
    ImageTextLoader(_cfg(shards)).load_state_dict(older)  # a checkpoint of an earlier version still resumes


def test_an_epoch_without_one_full_batch_raises_instead_of_waiting_forever(tmp_path):
    """Shards without captions (img2dataset run without a caption column), or fewer usable samples per worker
    than a batch: every epoch was empty and the loader restarted it forever; the run hung without a word."""
    rng = random.Random(0)
    with wds.TarWriter(str(tmp_path / "00000.tar")) as sink:
        for i in range(6):
            buf = io.BytesIO()
            draw_shape("circle", "red", "white", 32, rng).save(buf, format="PNG")
            sink.write({"__key__": f"s{i}", "png": buf.getvalue()})  # no txt
    loader = ImageTextLoader(_cfg([str(tmp_path / "00000.tar")], local_batch_size=2))
    with pytest.raises(RuntimeError, match=r"rank 0: a whole epoch over its share of the 1 shards gave no batch of 2 "
                                           r"usable samples: .*'missing_text': 6"):
        next(iter(loader))
    # a resumed epoch may end without a batch (saved at its last one): that is not an error
    shards = write_shards(tmp_path / "ok", num_shards=1, samples_per_shard=4, size=32)
    ok = ImageTextLoader(_cfg(shards, local_batch_size=2))
    it = iter(ok)
    next(it), next(it)
    state = ok.state_dict()
    again = ImageTextLoader(_cfg(shards, local_batch_size=2))
    again.load_state_dict(state)
    assert list(again) == [] and len(list(again)) == 2  # the rest of epoch 0 (none), then epoch 1


def test_real_image_modes_decode_like_extraction_and_warnings_name_shard_and_key(tmp_path):
    """GIF / RGBA / CMYK members decode through unitok.image_io (first frame, alpha on white); a truncated
    JPEG is skipped with a warning that names the shard and the sample key."""
    from real_data import caption_for, image_variants

    v = image_variants()
    shard = tmp_path / "real.tar"
    with wds.TarWriter(str(shard)) as sink:
        for i, name in enumerate(["animated.gif", "rgba.png", "truncated.jpg", "cmyk.jpg"]):
            sink.write({"__key__": f"k{i}", name.split(".")[1]: v[name], "txt": caption_for(name)})
    loader = ImageTextLoader(_cfg([str(shard)], local_batch_size=1, train=False))
    with pytest.warns(UserWarning) as record:
        batches = list(loader)
    assert loader.stats.as_dict() == {"samples": 3, "read_errors": 0, "decode_errors": 1, "missing_image": 0,
                                      "missing_text": 0}
    assert any(f"{shard}: sample k2: cannot decode" in str(w.message) for w in record)
    rgba = batches[1]["images"][0]  # (3, 32, 32): 96x64 -> 48x32 -> centre crop from x = 8; x < 16 was transparent
    assert torch.equal(rgba[:, :, :12], torch.ones(3, 32, 12))  # white, not the photo under the alpha
    assert rgba[:, :, 20:].mean() < 0.5


def test_training_decodes_a_large_jpeg_reduced_and_nothing_else(tmp_path, monkeypatch):
    """Training decodes a JPEG at least twice 2 x img_size on its short side at 1/2 or 1/4 scale (DCT domain),
    keeping that short side >= 2 x img_size (a phone photo decoded every pixel for a 32- to 256-px crop: ~3x the
    time), pixels close to the full decode's. Evaluation, PNGs and small JPEGs decode every pixel."""
    import numpy as np
    from PIL import Image

    import unitok.data as D
    import unitok.image_io as io_mod
    from real_data import _crop
    from unitok.image_io import load_image

    photo = io.BytesIO()
    _crop("astronaut", 1200, 900).save(photo, "JPEG", quality=95)
    big = photo.getvalue()
    assert load_image(big).size == (1200, 900)
    assert load_image(big, min_side=64).size == (300, 225)  # 1/4 at most (1/8 keeps only each block's mean)
    assert load_image(big, min_side=300).size == (600, 450)  # 1/2: short side 450 >= 300
    assert load_image(big, min_side=500).size == (1200, 900)  # under twice: every pixel
    png, mpo = io.BytesIO(), io.BytesIO()
    Image.open(io.BytesIO(big)).save(png, "PNG")
    assert load_image(png.getvalue(), min_side=64).size == (1200, 900)
    # most phone photos are MPO (a JPEG holding a second image: a gain or depth map); frame 0 reduces the same
    first = Image.open(io.BytesIO(big))
    first.save(mpo, "MPO", save_all=True, append_images=[first.resize((300, 225))])
    assert Image.open(io.BytesIO(mpo.getvalue())).format == "MPO"
    assert load_image(mpo.getvalue(), min_side=64).size == (300, 225)
    # the reduction leaves every random crop at least img_size (never upsampled), whatever --data.crop-scale
    for lo, size in ((0.9, 32), (0.08, 128)):  # (2 x img_size left crops of 0.08 at 127 px for 128)
        cfg = _cfg("x.tar", img_size=size, crop_scale=(lo, 1.0))
        img = load_image(big, min_side=D.draft_side(cfg))
        assert (lo * img.width * img.height * 3 / 4) ** 0.5 >= size  # the smallest crop's short side (aspect 3:4)
    for side in (64, 300):  # the pixels a crop is resized from: as the full decode's
        a, b = (np.asarray(im.resize((64, 64), Image.BICUBIC), dtype=float)
                for im in (load_image(big), load_image(big, min_side=side)))
        assert 10 * np.log10(255 ** 2 / ((a - b) ** 2).mean()) > 45
    sizes, real = [], io_mod.load_image

    def spy(src, max_pixels=io_mod.MAX_PIXELS, min_side=None):
        img = real(src, max_pixels, min_side)
        sizes.append(img.size)
        return img

    monkeypatch.setattr(io_mod, "load_image", spy)
    with wds.TarWriter(str(tmp_path / "big.tar")) as sink:
        for i in range(2):
            sink.write({"__key__": f"k{i}", "jpg": big, "txt": "an astronaut"})
    for train in (True, False):
        next(iter(ImageTextLoader(_cfg([str(tmp_path / "big.tar")], local_batch_size=2, train=train))))
    assert D.draft_side(_cfg("x.tar")) == 78  # img_size 32, crop scale 0.9: 1/4 leaves 225
    assert sizes == [(300, 225)] * 2 + [(1200, 900)] * 2


def test_val_transform_bounds_extreme_aspects_and_leaves_others_as_before(monkeypatch):
    """A 200000x2 image would be resized to 3.2e6 x 32 before the crop: beyond 4:1 the long side is centre-cropped
    first. Images up to 4:1 give exactly Resize + CenterCrop."""
    import numpy as np
    import torchvision.transforms.functional as TF
    from PIL import Image
    from torchvision.transforms import InterpolationMode

    rng = np.random.default_rng(0)
    for hw in ((40, 160), (160, 40), (48, 80)):  # 4:1 exactly, 1:4, a photo
        img = Image.fromarray(rng.integers(0, 255, (*hw, 3), dtype=np.uint8))
        before = TF.center_crop(TF.resize(img, 32, InterpolationMode.BICUBIC), [32, 32])
        assert torch.equal(val_transform(img, 32), TF.to_tensor(before) * 2 - 1)
    stripes = np.zeros((40, 400, 3), np.uint8)  # 10:1, red | green | blue: the crop still shows the green middle
    stripes[:, :160], stripes[:, 160:240], stripes[:, 240:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    assert torch.equal(val_transform(Image.fromarray(stripes), 32), torch.tensor([-1.0, 1.0, -1.0])[:, None, None]
                       .expand(3, 32, 32))
    resize = Image.Image.resize

    def bounded(self, size, *a, **k):
        if size[0] * size[1] > 1_000_000:
            raise MemoryError(f"a {size[0]}x{size[1]} image")
        return resize(self, size, *a, **k)

    monkeypatch.setattr(Image.Image, "resize", bounded)
    for wh in ((200_000, 2), (2, 200_000)):
        x = val_transform(Image.new("RGB", wh, (255, 0, 0)), 32)
        assert x.shape == (3, 32, 32) and torch.equal(x[0], torch.ones(32, 32))
