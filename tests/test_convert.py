"""Official `unitok_tokenizer.pth` compatibility (REFERENCE.md 3.2-3.3)."""
import dataclasses
import re
from collections import OrderedDict

import pytest
import torch

from official_layout import Dims, official_shapes
from unitok import UniTok, load_tokenizer, preset
from unitok.convert import config_from_official_args, load_official, main, official_args_from_config

LARGE_ARGS = OrderedDict(
    model="vitamin_large", img_size=256, vocab_size=32768, vocab_width=64, num_codebooks=8, quant_proj="attn",
    num_query=0, embed_dim=768, text_width=768, text_heads=12, text_layers=12, text_vocab_size=49408,
    text_context_length=77, vq_beta=0.25, le=0.0, e_temp=0.01, drop_path=0.1, grad_ckpt=True,
    resize_ratio=1.125, dtype=torch.bfloat16, exp_name="unitok_pretrain", lr=5e-4)


class NotATensor:
    """An arbitrary class: weights_only loading must refuse to unpickle it."""


def test_full_large_key_set_maps_completely_on_meta():
    cfg = config_from_official_args(LARGE_ARGS)
    assert cfg == preset("large")
    with torch.device("meta"):
        model = UniTok(cfg)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    official = official_shapes(Dims())
    assert len(official) == 1335
    assert set(ours) - set(official) == set() and set(official) - set(ours) == set()
    assert {k for k in official if official[k] != ours[k]} == set()
    assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - 820.30) < 0.01


def _small_official_file(tmp_path, attn="full"):
    """An official-layout file at a tiny size: ViTamin trunk shrunk via a patched preset."""
    torch.manual_seed(0)
    cfg = preset("debug")
    model = UniTok(cfg).eval()
    state = model.state_dict()
    # the table in official_layout.py is independent of the model: check it covers our debug model too
    dims = Dims(D=32, stem=8, c0=8, c1=16, depths=(1, 1), enc_blocks=1, dec_blocks=1, up_depths=(1, 1), C=16,
                K=4, V=64, E=32, T=32, text_layers=1, ctx=16)
    table = official_shapes(dims)
    assert {k: tuple(v.shape) for k, v in state.items()} == table
    ckpt = {"args": OrderedDict(LARGE_ARGS), "epoch": 1, "iter": 10,
            "trainer": {"config": {"wei_l1": 0.2}, "unitok": OrderedDict(state), "disc": {}}}
    path = tmp_path / "unitok_tokenizer.pth"
    torch.save(ckpt, path)
    return model, path


def test_official_file_loads_with_same_codes_and_pixels(tmp_path, monkeypatch):
    model, path = _small_official_file(tmp_path)
    # the file's args say vitamin_large; point the trunk table at the debug sizes for this test
    import unitok.convert as conv
    monkeypatch.setattr(conv, "config_from_official_args", lambda args, attn_mode="full": preset(
        "debug", [f"--projection.attn-mode={attn_mode}"]))
    loaded = load_tokenizer(path)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(loaded.encode(x), model.encode(x))
    assert torch.equal(loaded.decode(model.encode(x)), model.decode(model.encode(x)))
    causal = load_tokenizer(path, attn_mode="causal")
    assert causal.cfg.projection.attn_mode == "causal" and causal.quant_proj.attn.causal
    # a snapshot of the Hub repository (its own config.json beside the .pth) given as a folder: it failed naming a
    # missing model.safetensors
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "config.json").write_text('{"architectures": ["UniTok"]}')
    path.rename(tmp_path / "hub" / path.name)
    path = tmp_path / "hub" / path.name
    assert torch.equal(load_tokenizer(tmp_path / "hub").encode(x), model.encode(x))
    # CLI conversion writes our folder format
    main([str(path), str(tmp_path / "converted")])
    again = load_tokenizer(tmp_path / "converted")
    assert torch.equal(again.encode(x), model.encode(x))
    # the fingerprint that code folders record: the same weights in either format, another for causal attention
    assert loaded.fingerprint() == again.fingerprint() == model.fingerprint() != causal.fingerprint()
    with torch.no_grad():  # a decoder fine-tune keeps the codes, and so the fingerprint; the code path does not
        next(again.decoder.parameters()).add_(1.0)
        assert again.fingerprint() == model.fingerprint()
        again.quantizer.codebooks[0].codebook.weight.add_(1e-3)
        assert again.fingerprint() != model.fingerprint()
    # ... and extraction from the official file takes its attention mode (it always loaded it as full)
    from PIL import Image

    from unitok.extract import main as extract

    (tmp_path / "imgs").mkdir()
    for i in range(2):
        Image.new("RGB", (40, 32), (60 * i, 90, 200)).save(tmp_path / "imgs" / f"{i:03d}.png")
    for mode, want in (("full", model), ("causal", causal)):
        out = tmp_path / f"codes_{mode}"
        manifest = extract(["--tokenizer", str(path), "--attn-mode", mode, "--input", str(tmp_path / "imgs"),
                            "--input-format", "files", "--output", str(out), "--threads", "1"])["manifest"]
        assert manifest["tokenizer_fingerprint"] == want.fingerprint() and manifest["totals"]["samples"] == 2


def test_official_unknown_and_missing_keys_are_named(tmp_path, monkeypatch):
    model, path = _small_official_file(tmp_path)
    import unitok.convert as conv
    monkeypatch.setattr(conv, "config_from_official_args", lambda args, attn_mode="full": preset("debug"))
    ckpt = torch.load(path, weights_only=True)
    ckpt["trainer"]["unitok"]["encoder.extra_thing"] = torch.zeros(1)
    del ckpt["trainer"]["unitok"]["decoder.norm.bias"]
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match=r"decoder\.norm\.bias.*encoder\.extra_thing"):
        load_official(path)


def test_official_args_round_trip():
    for name in ("small", "base", "large"):
        cfg = preset(name)
        assert config_from_official_args(official_args_from_config(cfg)) == cfg
    with pytest.raises(ValueError, match="unsupported official model"):
        config_from_official_args({**LARGE_ARGS, "model": "vitamin_huge"})
    with pytest.raises(ValueError, match="lack"):
        config_from_official_args({k: v for k, v in LARGE_ARGS.items() if k != "vocab_width"})


def test_convert_refuses_an_out_dir_that_is_or_holds_its_input(tmp_path, monkeypatch):
    """`python -m unitok.convert weights/unitok_tokenizer.pth weights` would replace the folder that holds the file
    being converted: refused before anything is read or written, every file stays."""
    _, path = _small_official_file(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    import unitok.convert as conv
    monkeypatch.setattr(conv, "config_from_official_args", lambda args, attn_mode="full": preset("debug"))
    before = sorted(p.name for p in tmp_path.iterdir())
    for out in (tmp_path, path, tmp_path / ".." / tmp_path.name):
        with pytest.raises(ValueError, match="is or contains the checkpoint"):
            main([str(path), str(out)])
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    main([str(path), str(tmp_path / "converted")])  # a folder beside it is fine
    assert load_tokenizer(tmp_path / "converted").cfg == preset("debug")


@pytest.mark.parametrize("overrides, field", [
    (["--projection.num-heads=8"], "projection.num_heads=8"),  # same shapes as 16 heads, other outputs
    (["--projection.mlp-ratio=4"], "projection.mlp_ratio=4.0"),
    (["--decoder.num-layers=2"], "decoder.num_layers=2"),
    (["--decoder.stage-widths", "64", "128"], "decoder.stage_widths=(64, 128)"),
    (["--decoder.drop-path=0.0"], "decoder.drop_path=0.0"),  # the args hold one drop_path for both
])
def test_official_args_refuse_a_config_they_cannot_rebuild(overrides, field):
    """The official args name a trunk and a few sizes; a config they would rebuild differently is refused, naming
    the field, instead of exported as args of another model."""
    with pytest.raises(ValueError, match="cannot carry this config: " + re.escape(field)):
        official_args_from_config(preset("large", overrides))


def test_official_args_carry_the_rest_and_leave_out_runtime_fields():
    """The attention mode is passed beside the args (the file never records it) and activation checkpointing
    does not change what the model computes: both export."""
    cfg = preset("large", ["--projection.attn-mode=causal", "--grad-checkpointing"])
    back = config_from_official_args(official_args_from_config(cfg), attn_mode="causal")
    assert dataclasses.replace(back, grad_checkpointing=True) == cfg


def test_truncated_foreign_and_unsafe_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_tokenizer(tmp_path / "missing.pth")
    _, path = _small_official_file(tmp_path)
    data = path.read_bytes()
    trunc = tmp_path / "trunc.pth"
    trunc.write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="trunc.pth"):
        load_tokenizer(trunc)
    foreign = tmp_path / "foreign.pth"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(ValueError, match="official layout"):
        load_tokenizer(foreign)
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"args": {"model": NotATensor()}, "trainer": {"unitok": {}}}, unsafe)
    with pytest.raises(ValueError, match="unsafe.pth"):
        load_tokenizer(unsafe)  # weights_only refuses arbitrary objects
