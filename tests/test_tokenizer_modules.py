"""Shapes per module, projection semantics, and the fp32 guard."""
import pytest
import torch
from torch.utils.checkpoint import checkpoint

from unitok.models.projection import KVCache

from unitok import UniTok, preset
from unitok.config import EncoderConfig
from unitok.models.decoder import Upsample2d, ViTaminDecoder
from unitok.models.encoder import ViTaminEncoder
from unitok.models.projection import AttnProjection, build_projection


def test_encoder_decoder_shapes_square_and_non_square():
    cfg = preset("debug")
    enc = ViTaminEncoder(cfg.encoder)
    dec = ViTaminDecoder(cfg.decoder, cfg.encoder)
    for H, W in [(32, 32), (16, 48), (64, 32)]:
        tok = enc(torch.randn(2, 3, H, W))
        assert tok.shape == (2, (H // 16) * (W // 16), cfg.encoder.width)
        img = dec(tok, (H // 16, W // 16))
        assert img.shape == (2, 3, H, W)
    with pytest.raises(ValueError):
        dec(tok, (3, 3))


def test_decoder_widths_mirror_the_encoder_unless_set(tmp_path):
    """`decoder.stage_widths` None keeps the release's layout (the encoder's widths); set, it sizes only the
    upsampler's convolutions, and the export keeps it."""
    import dataclasses

    cfg = preset("debug")
    mirrored = ViTaminDecoder(cfg.decoder, cfg.encoder)
    assert mirrored.up_conv1.conv.weight.shape[0] == cfg.encoder.stage_widths[1]
    assert mirrored.up_conv4.conv1.conv.weight.shape[1] == cfg.encoder.stage_widths[0]
    narrow = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, stage_widths=(4, 12)))
    model = UniTok(narrow)
    assert model.decoder.up_conv1.conv.weight.shape[0] == 12 and model.decoder.up_conv4.conv1.conv.weight.shape[1] == 4
    assert model.encoder.patch_embed.backbone.stages[1][0].conv3_1x1.weight.shape[0] == cfg.encoder.stage_widths[1]
    assert model(torch.rand(2, 3, 32, 32) * 2 - 1)["img_rec"].shape == (2, 3, 32, 32)
    model.save_pretrained(tmp_path)
    assert UniTok.from_pretrained(tmp_path).cfg.decoder.stage_widths == (4, 12)
    with pytest.raises(ValueError, match="decoder.stage_widths"):
        dataclasses.replace(cfg.decoder, stage_widths=(8,))


def test_encoder_stage_shapes():
    cfg = EncoderConfig(stem_width=8, stage_widths=(8, 16), stage_depths=(1, 2), width=32, num_layers=1, num_heads=2)
    trunk = ViTaminEncoder(cfg).patch_embed.backbone
    x = torch.randn(1, 3, 64, 64)
    x = trunk.stem(x); assert x.shape == (1, 8, 32, 32)
    x = trunk.stages[0](x); assert x.shape == (1, 8, 16, 16)
    x = trunk.stages[1](x); assert x.shape == (1, 16, 8, 8)
    assert trunk.pool(x).shape == (1, 32, 4, 4)


def test_projection_compression_averages_heads_and_expansion_concatenates():
    torch.manual_seed(0)
    down = AttnProjection(32, 8, num_heads=4)   # head_dim 8 == out: heads averaged
    up = AttnProjection(8, 32, num_heads=4)     # head_dim 8, 4 heads concatenated -> 32
    x = torch.randn(2, 5, 32)
    assert down(x).shape == (2, 5, 8) and up(down(x)).shape == (2, 5, 32)
    # check the head averaging against an explicit per-head computation
    a = down.attn
    q, k, v = a.qkv_heads(x)
    heads = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, -1) @ v  # (B, H, N, 8)
    assert torch.allclose(a(x), a.proj(heads.mean(1)), atol=1e-5)
    q, k, v = up.attn.qkv_heads(torch.randn(2, 5, 8))
    assert q.shape == (2, 4, 5, 8)
    assert torch.equal(up.attn.zero_k_bias, torch.zeros(32))
    assert not any(n.endswith("zero_k_bias") for n, _ in up.named_parameters())


def test_causal_projection_is_causal_and_incremental_cache_is_exact():
    torch.manual_seed(0)
    proj = AttnProjection(8, 32, num_heads=4, causal=True).eval()
    x = torch.randn(2, 6, 8)
    full = proj(x)
    x2 = x.clone()
    x2[:, 4:] += torch.randn(2, 2, 8)
    assert torch.allclose(proj(x2)[:, :4], full[:, :4], atol=1e-6)  # later inputs never change earlier outputs
    assert not torch.allclose(proj(x2)[:, 4:], full[:, 4:])
    cache = KVCache()
    steps = [proj(x[:, :3], kv_cache=cache)] + [proj(x[:, t:t + 1], kv_cache=cache) for t in range(3, 6)]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)
    full_attn = AttnProjection(8, 32, num_heads=4, causal=False)
    full_attn.load_state_dict(proj.state_dict())
    assert not torch.allclose(full_attn(x2)[:, :4], full_attn(x)[:, :4])


def test_linear_projection_ablation():
    cfg = preset("debug", ["--projection.kind=linear"])
    m = UniTok(cfg)
    assert isinstance(m.quant_proj, torch.nn.Linear)
    codes = m.encode(torch.rand(1, 3, 32, 32) * 2 - 1)
    assert m.decode(codes).shape == (1, 3, 32, 32)
    assert build_projection("linear", 8, 4, 1, False)(torch.randn(1, 2, 8)).shape == (1, 2, 4)


def test_text_tower_and_clip_heads(debug_model, images):
    tokens = torch.randint(0, 1000, (2, debug_model.cfg.text.context_length))
    t = debug_model.encode_text(tokens)
    i = debug_model.encode_image(images)
    assert t.shape == i.shape == (2, debug_model.cfg.embed_dim)
    assert torch.allclose(t.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(i.norm(dim=-1), torch.ones(2), atol=1e-5)
    # encode_image takes the quantized path: equals forward's CLIP feature
    out = debug_model(images)
    assert torch.allclose(out["clip_image_features"], i, atol=1e-5)


def test_forward_outputs(debug_model, images):
    debug_model.train()
    tokens = torch.randint(0, 1000, (2, debug_model.cfg.text.context_length))
    out = debug_model(images, tokens, num_decode=1)
    assert out["img_rec"].shape == (1, 3, 32, 32)
    assert out["codes"].shape == (2, 4, 2, 2)
    assert out["codebook_usage"].shape == (4,)
    assert out["clip_text_features"].shape == (2, 32)
    assert abs(out["logit_scale"].item() - 1 / 0.07) < 1e-3
    loss = out["img_rec"].square().mean() + out["vq_loss"] + out["clip_image_features"].sum()
    loss.backward()
    assert debug_model.encoder.blocks[0].attn.qkv.weight.grad is not None
    assert debug_model.decoder.last_layer_weight().grad is not None


def test_quantizer_path_runs_in_fp32_under_autocast(debug_model, images):
    seen, enc_dtype = {}, {}

    def record(store, key, get):
        def hook(module, inputs, output):
            store.setdefault(key, get(inputs, output))  # returns None: output unchanged
        return hook

    debug_model.quantizer.register_forward_hook(record(seen, "q_in", lambda i, o: i[0].dtype))
    debug_model.post_quant_proj.register_forward_hook(record(seen, "post_out", lambda i, o: o.dtype))
    debug_model.quant_proj.register_forward_hook(record(seen, "quant_out", lambda i, o: o.dtype))
    debug_model.encoder.blocks[0].attn.qkv.register_forward_hook(record(enc_dtype, "d", lambda i, o: o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = debug_model(images)
        codes_bf16 = debug_model.encode(images)
    assert enc_dtype["d"] == torch.bfloat16  # the trunk does use autocast
    assert seen == {"quant_out": torch.float32, "q_in": torch.float32, "post_out": torch.float32}
    assert out["vq_loss"].dtype == torch.float32
    assert codes_bf16.dtype == torch.int64


def test_grad_checkpointing_gives_same_gradients(images, monkeypatch):
    import unitok.models.encoder as encoder

    torch.manual_seed(0)
    a = UniTok(preset("debug")).train()
    b = UniTok(preset("debug", ["--grad-checkpointing"])).train()
    b.load_state_dict(a.state_dict())
    trunk_calls = []
    monkeypatch.setattr(encoder, "checkpoint", lambda f, *x, **kw: trunk_calls.append(f) or checkpoint(f, *x, **kw))
    grads = []
    for m in (a, b):
        torch.manual_seed(1)
        out = m(images)
        (out["img_rec"].square().mean() + out["vq_loss"]).backward()
        grads.append([p.grad.clone() for p in (m.encoder.blocks[0].mlp.w0.weight,
                                                m.encoder.patch_embed.backbone.stem.conv1.weight)])
    # the conv trunk too: the stem and both MBConv stages are checkpointed (as in the release)
    backbone = b.encoder.patch_embed.backbone
    assert trunk_calls == [backbone.stem, *backbone.stages]
    for g0, g1 in zip(*grads):
        assert torch.allclose(g0, g1, atol=1e-6)


def _nearest_then_conv(up, x):
    """The release's form of Upsample2d: nearest x2, then the 3x3 conv."""
    return up.conv(torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest"))


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 8, 4, 4), (2, 16, 1, 3)])
def test_upsample_as_one_transposed_conv_equals_nearest_then_conv(shape):
    torch.manual_seed(0)
    up = Upsample2d(shape[1], 5).double()
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    outs, grads = [], []
    for fn in (up, lambda t: _nearest_then_conv(up, t)):
        up.zero_grad()
        x.grad = None
        y = fn(x)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        outs.append(y)
        grads.append([x.grad.clone(), up.conv.weight.grad.clone(), up.conv.bias.grad.clone()])
    assert outs[0].shape == (shape[0], 5, 2 * shape[2], 2 * shape[3])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)
    for g0, g1 in zip(*grads):  # input, weight and bias gradients
        torch.testing.assert_close(g0, g1, rtol=1e-12, atol=1e-12)
    assert [k for k, _ in up.state_dict().items()] == ["conv.weight", "conv.bias"]  # checkpoint layout kept


def test_decoder_with_fast_upsampling_equals_the_direct_form(monkeypatch):
    torch.manual_seed(0)
    cfg = preset("debug")
    dec = ViTaminDecoder(cfg.decoder, cfg.encoder).eval()
    tokens = torch.randn(2, 6, cfg.encoder.width)
    with torch.no_grad():
        fast = dec(tokens, (2, 3))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast_bf16 = dec(tokens, (2, 3)).float()
        monkeypatch.setattr(Upsample2d, "forward", _nearest_then_conv)
        direct = dec(tokens, (2, 3))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            direct_bf16 = dec(tokens, (2, 3)).float()
    torch.testing.assert_close(fast, direct, rtol=1e-5, atol=1e-5)  # fp32 rounding only
    # under bf16 autocast the two forms differ by no more than bf16 rounding itself moves the direct form
    assert (fast_bf16 - direct_bf16).abs().max() <= 3 * (direct_bf16 - direct).abs().max()
