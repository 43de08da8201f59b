"""DINOv2 discriminator: state-dict layout (REFERENCE.md 3.4), frozen hidden backbone, weight loading."""
import warnings

import pytest
import torch

from unitok.models.discriminator import DinoDiscriminator, dinov2_official_to_timm


def _disc(**kw) -> DinoDiscriminator:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DinoDiscriminator(None, random_backbone=True, **kw)


@pytest.fixture(scope="module")
def debug_disc():
    torch.manual_seed(0)
    return _disc(backbone="debug")


def _official_vits14_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict in the official facebookresearch layout of dinov2_vits14_pretrain.pth."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"cls_token": (1, 1, 384), "pos_embed": (1, 1370, 384), "mask_token": (1, 384),
              "patch_embed.proj.weight": (384, 3, 14, 14), "patch_embed.proj.bias": (384,),
              "norm.weight": (384,), "norm.bias": (384,)}
    for i in range(12):
        b = f"blocks.{i}."
        shapes.update({b + "norm1.weight": (384,), b + "norm1.bias": (384,),
                       b + "attn.qkv.weight": (1152, 384), b + "attn.qkv.bias": (1152,),
                       b + "attn.proj.weight": (384, 384), b + "attn.proj.bias": (384,),
                       b + "ls1.gamma": (384,), b + "norm2.weight": (384,), b + "norm2.bias": (384,),
                       b + "mlp.fc1.weight": (1536, 384), b + "mlp.fc1.bias": (1536,),
                       b + "mlp.fc2.weight": (384, 1536), b + "mlp.fc2.bias": (384,), b + "ls2.gamma": (384,)})
    return {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}


def test_release_state_dict_layout_52_keys():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        disc = DinoDiscriminator(None, random_backbone=True)
    assert len(caught) == 1 and "random DINOv2" in str(caught[0].message)
    expected = {"x_scale": (1, 3, 1, 1), "x_shift": (1, 3, 1, 1)}
    for h in range(5):
        p = f"heads.{h}."
        expected.update({p + "0.0.weight": (384, 384, 1), p + "0.0.bias": (384,),
                         p + "0.1.weight": (384,), p + "0.1.bias": (384,),
                         p + "1.fn.0.weight": (384, 384, 9), p + "1.fn.0.bias": (384,),
                         p + "1.fn.1.weight": (384,), p + "1.fn.1.bias": (384,),
                         p + "2.weight": (1, 384, 1), p + "2.bias": (1,)})
    sd = disc.state_dict()
    assert len(sd) == 52
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    # the backbone is outside the module tree: not saved, not an optimizer parameter
    assert sum(p.numel() for p in disc.parameters()) == sum(v.numel() for k, v in sd.items() if k.startswith("heads"))
    assert disc.backbone.embed_dim == 384 and len(disc.backbone.blocks) == 12
    assert disc.backbone.pos_embed.shape == (1, 1370, 384)
    assert torch.allclose(disc.x_scale.view(3) * 1 + disc.x_shift.view(3),  # x = 1 (white) -> ImageNet-normalised
                          (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225]))
    head = disc.heads[0]
    assert head[1].fn[0].padding_mode == "circular" and head[0][1].num_groups == 32
    with pytest.raises(ValueError):
        DinoDiscriminator(None)  # random backbone only on request


def test_forward_shapes_and_gradient_flow(debug_disc):
    disc = debug_disc
    x = (torch.rand(2, 3, 64, 64) * 2 - 1).requires_grad_(True)
    logits = disc(x, generator=torch.Generator().manual_seed(0))
    assert logits.shape == (2, 5 * 4 * 4)  # 64 -> 56 px -> 4 x 4 patches, 5 heads
    assert disc(torch.zeros(1, 3, 70, 42)).shape == (1, 5 * 5 * 3)  # non-square, already multiples of 14
    (-logits.mean()).backward()  # a generator-side loss: gradients reach the images
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in disc.backbone.parameters())
    assert all(p.grad is not None for p in disc.heads.parameters())
    assert disc.heads[0][0][0].weight.shape == (64, 64, 1)  # heads follow the backbone width
    disc.zero_grad(set_to_none=True)
    with pytest.raises(ValueError):
        disc(torch.zeros(1, 3, 10, 10))


def test_features_match_timm_forward(debug_disc):
    disc = debug_disc
    x = torch.randn(2, 3, 56, 56)  # the stored grid: pos_embed used as is
    ours = disc.features(x)
    ref = disc.backbone.forward_intermediates(x, indices=[0, 2, 5, 8, 11], norm=False,
                                              return_prefix_tokens=True, output_fmt="NLC",
                                              intermediates_only=True)
    assert len(ours) == 5
    for f, (patches, prefix) in zip(ours, ref):
        assert f.shape == (2, 64, 16)
        assert torch.allclose(f, (patches + prefix[:, :1]).transpose(1, 2), atol=1e-5)


def test_crop_or_resize_is_seeded(debug_disc):
    x = torch.rand(1, 3, 62, 62) * 2 - 1
    outs = [debug_disc(x, generator=torch.Generator().manual_seed(s)) for s in range(6)]
    assert torch.equal(outs[0], debug_disc(x, generator=torch.Generator().manual_seed(0)))
    assert len({tuple(o.flatten().tolist()) for o in outs}) > 1  # crops at different offsets / area resize


def test_to_moves_the_hidden_backbone():
    disc = _disc(backbone="debug").double()
    assert disc.backbone.cls_token.dtype == torch.float64 and disc.heads[0][2].weight.dtype == torch.float64
    assert disc(torch.zeros(1, 3, 56, 56, dtype=torch.float64)).dtype == torch.float64


def test_load_official_layout_weights(tmp_path):
    state = _official_vits14_state()
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(state, path)
    disc = DinoDiscriminator(path)
    bb = disc.backbone.state_dict()
    assert set(bb) == set(state) - {"mask_token"}
    for k in bb:
        assert torch.equal(bb[k], state[k]), k
    assert len(disc.state_dict()) == 52 and not any(p.requires_grad for p in disc.backbone.parameters())
    assert disc(torch.rand(1, 3, 28, 28) * 2 - 1).shape == (1, 5 * 4)

    missing = tmp_path / "absent" / "dinov2_vits14_pretrain.pth"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        DinoDiscriminator(missing)
    broken = dict(state)
    del broken["blocks.3.ls1.gamma"]
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="blocks.3.ls1.gamma"):
        DinoDiscriminator(tmp_path / "broken.pth")


def test_official_key_mapping():
    w = torch.zeros(1)
    mapped = dinov2_official_to_timm({"mask_token": w, "module.blocks.0.3.attn.qkv.weight": w, "cls_token": w})
    assert set(mapped) == {"blocks.3.attn.qkv.weight", "cls_token"}
    with pytest.raises(ValueError, match="register"):
        dinov2_official_to_timm({"register_tokens": w})
