"""The public tokenizer API: codes contract, determinism, checkpoint round trip, clear errors."""
import json

import pytest
import torch

from unitok import UniTok, load_tokenizer, preset
from unitok.config import UniTokConfig


def test_codes_contract(debug_model):
    x = torch.rand(3, 3, 32, 64) * 2 - 1
    codes = debug_model.encode(x)
    assert codes.shape == (3, 4, 2, 4) and codes.dtype == torch.int64
    assert codes.min() >= 0 and codes.max() < debug_model.codebook_size
    img = debug_model.decode(codes)
    assert img.shape == (3, 3, 32, 64) and img.min() >= -1 and img.max() <= 1
    assert torch.equal(debug_model.reconstruct(x), img)
    # flat square codes are accepted (official (B, K, L) layout)
    sq = debug_model.encode(x[:, :, :, :32])
    assert torch.equal(debug_model.decode(sq.flatten(2)), debug_model.decode(sq))


def test_encode_decode_deterministic(debug_model, images):
    assert torch.equal(debug_model.encode(images), debug_model.encode(images))
    c = debug_model.encode(images)
    assert torch.equal(debug_model.decode(c), debug_model.decode(c))


def test_save_load_round_trip_bit_exact(debug_model, images, tmp_path):
    debug_model.save_pretrained(tmp_path / "tok")
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_tokenizer(tmp_path / "tok")
    assert not loaded.training
    a, b = debug_model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(loaded.encode(images), debug_model.encode(images))
    assert torch.equal(loaded.decode(debug_model.encode(images)), debug_model.decode(debug_model.encode(images)))
    assert loaded.cfg == debug_model.cfg
    # overwrite in place keeps a valid folder
    debug_model.save_pretrained(tmp_path / "tok")
    assert UniTok.from_pretrained(tmp_path / "tok").cfg == debug_model.cfg


def test_save_pretrained_replaces_only_a_checkpoint_folder(debug_model, tmp_path):
    """Saving into a folder that holds anything but an earlier checkpoint's own files is refused and deletes
    nothing (it used to swap the whole folder out: `unitok.convert weights/unitok_tokenizer.pth weights` deleted
    the .pth and everything beside it); a new, an empty and a checkpoint folder are written."""
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "unitok_tokenizer.pth").write_bytes(b"official")
    (weights / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a UniTok checkpoint folder"):
        debug_model.save_pretrained(weights)
    assert sorted(p.name for p in weights.iterdir()) == ["notes.txt", "unitok_tokenizer.pth"]
    # a foreign config.json (another library's) does not make it a checkpoint folder
    (weights / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(FileExistsError, match="not a UniTok checkpoint folder"):
        debug_model.save_pretrained(weights)
    assert (weights / "config.json").read_text() == '{"model_type": "llama"}'
    # a checkpoint folder with other files beside the checkpoint's own
    debug_model.save_pretrained(tmp_path / "tok")
    (tmp_path / "tok" / "README.md").write_text("card")
    with pytest.raises(FileExistsError, match=r"also holds \['README.md'\]"):
        debug_model.save_pretrained(tmp_path / "tok")
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        debug_model.save_pretrained(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    debug_model.save_pretrained(tmp_path / "empty")
    assert UniTok.from_pretrained(tmp_path / "empty").cfg == debug_model.cfg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file", "tok", "weights"]  # no temporaries left


def test_config_round_trip_and_validation():
    cfg = preset("large")
    assert UniTokConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown config keys"):
        UniTokConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="multiple of 16"):
        preset("debug", ["--img-size=40"])
    with pytest.raises(ValueError, match="divisible"):
        preset("debug", ["--quantizer.latent-dim=18"])
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge")
    assert preset("debug", ["--quantizer.kind=rq"]).quantizer.kind == "rq"


@pytest.mark.parametrize("bad, msg", [
    (torch.rand(2, 3, 32, 32) * 4 - 2, r"\[-1, 1\]"),
    (torch.rand(3, 32, 32), "shape"),
    (torch.rand(2, 1, 32, 32), "shape"),
    (torch.rand(2, 3, 30, 32), "multiples of 16"),
    (torch.randint(0, 2, (2, 3, 32, 32)), "floating point"),
])
def test_bad_images_raise_clear_errors(debug_model, bad, msg):
    with pytest.raises(ValueError, match=msg):
        debug_model.encode(bad)


def test_bad_codes_raise_clear_errors(debug_model):
    with pytest.raises(ValueError, match="in \\[0, 64\\)"):
        debug_model.decode(torch.full((1, 4, 2, 2), 64))
    with pytest.raises(ValueError, match="\\(B, 4, h, w\\)"):
        debug_model.decode(torch.zeros(1, 3, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="not square"):
        debug_model.decode(torch.zeros(1, 4, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        debug_model.decode(torch.zeros(1, 4, 2, 2))


def test_missing_and_truncated_checkpoints(debug_model, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_tokenizer(tmp_path / "empty")
    debug_model.save_pretrained(tmp_path / "tok")
    w = tmp_path / "tok" / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        load_tokenizer(tmp_path / "tok")
    (tmp_path / "tok" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_tokenizer(tmp_path / "tok")


def test_a_bf16_checkpoint_loads_in_fp32_and_encodes(tmp_path):
    """A tokenizer saved with bf16 weights (a cast export) loads in fp32, as the quantizer path needs, and
    encodes exactly as the same weights cast to fp32 by hand; extraction and chat load it this way."""
    from unitok import UniTok, load_tokenizer, preset

    torch.manual_seed(0)
    model = UniTok(preset("debug")).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    loaded = load_tokenizer(tmp_path / "bf16")
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert torch.equal(loaded.encode(x), model.float().eval().encode(x))
