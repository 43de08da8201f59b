"""Stage-one losses on hand-computed tensors (REFERENCE.md 4.2-4.6), plus a real 2-rank CLIP loss."""
import math
import os
import socket
import warnings

import pytest
import torch
import torch.nn.functional as F

from unitok.losses import (ContrastiveLoss, DiffAug, PerceptualLoss, adaptive_weight, bcr_loss,
                           discriminator_loss, gan_schedule, gaussian_blur, hinge_d_loss, hinge_g_loss,
                           reconstruction_loss)


# ---- reconstruction ------------------------------------------------------------------------
def test_reconstruction_loss_terms():
    rec = torch.tensor([0.5, -1.0, 0.0, 2.0]).view(1, 1, 2, 2)
    target = torch.zeros(1, 1, 2, 2)
    out = reconstruction_loss(rec, target)
    l1, l2 = (0.5 + 1 + 0 + 2) / 4, (0.25 + 1 + 0 + 4) / 4
    assert out["l1"].item() == pytest.approx(l1)
    assert out["l2"].item() == pytest.approx(l2)
    assert out["rec"].item() == pytest.approx(0.2 * l1 + 1.0 * l2)
    assert reconstruction_loss(rec, target, w_l1=1.0, w_l2=0.0)["rec"].item() == pytest.approx(l1)
    with pytest.raises(ValueError):
        reconstruction_loss(rec, torch.zeros(1, 1, 2, 3))


# ---- perceptual ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lpips_random():
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = PerceptualLoss(None, random_backbone=True)
    return loss, caught


def test_perceptual_random_backbone_warns_once_and_is_frozen(lpips_random):
    loss, caught = lpips_random
    assert len(caught) == 1 and "random" in str(caught[0].message)
    assert not any(p.requires_grad for p in loss.parameters())
    loss.train()
    assert not loss.training and not loss.lpips.training  # stays in eval mode
    with pytest.raises(ValueError):
        PerceptualLoss(None)  # a random trunk must be asked for explicitly


def test_perceptual_values_and_gradient(lpips_random):
    loss, _ = lpips_random
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 48, 48, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(2, 3, 48, 48, generator=g)).clamp(-1, 1).requires_grad_(True)
    assert loss(x.clone(), x).item() == 0.0
    value = loss(y, x)
    assert value.item() > 0
    value.backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    # parity with the lpips package's own forward (only the normalisation eps differs)
    ref = loss.lpips(x, y.detach()).mean()
    assert value.item() == pytest.approx(ref.item(), rel=1e-4)
    # and its gradient with the package's; the target (the data) gets none: VGG16 no longer runs its input
    # gradients for the targets (half of LPIPS's backward, discarded)
    y_ref = y.detach().clone().requires_grad_(True)
    loss.lpips(x, y_ref).mean().backward()
    assert torch.allclose(y.grad, y_ref.grad, rtol=1e-3, atol=1e-3 * y_ref.grad.abs().max().item())
    x_grad, y_again = x.clone().requires_grad_(True), y.detach().clone().requires_grad_(True)
    loss(y_again, x_grad).backward()
    assert x_grad.grad is None and torch.equal(y_again.grad, y.grad)
    # below lpr = 48 px the term is skipped
    assert loss(y[..., :40, :40], x[..., :40, :40]).item() == 0.0


def _vgg_conv(loss: PerceptualLoss, s: int, i: int) -> torch.nn.Module:
    return getattr(loss.lpips.net, f"slice{s}")._modules[str(i)]  # lpips keeps torchvision's indices


def test_perceptual_loads_torchvision_vgg16_and_lpips_layouts(tmp_path, lpips_random):
    import torchvision

    torch.manual_seed(1)
    vgg = torchvision.models.vgg16(weights=None)
    path = tmp_path / "vgg16.pth"
    torch.save(vgg.state_dict(), path)
    random_trunk = _vgg_conv(lpips_random[0], 3, 10).weight.clone()
    loss = PerceptualLoss(path)
    assert torch.equal(_vgg_conv(loss, 1, 0).weight, vgg.features[0].weight)
    assert torch.equal(_vgg_conv(loss, 3, 10).weight, vgg.features[10].weight)
    assert torch.equal(_vgg_conv(loss, 5, 28).bias, vgg.features[28].bias)
    assert not torch.equal(_vgg_conv(loss, 3, 10).weight, random_trunk)
    # a full LPIPS state dict (the release's lpips_with_vgg.pth layout), linear heads included
    state = {k: v.clone() for k, v in loss.lpips.state_dict().items() if k.startswith(("net.", "lin"))
             and not k.startswith("lins.")}
    state["lin2.model.1.weight"] = torch.full_like(state["lin2.model.1.weight"], 0.5)
    torch.save(state, tmp_path / "lpips_with_vgg.pth")
    full = PerceptualLoss(tmp_path / "lpips_with_vgg.pth")
    assert torch.equal(_vgg_conv(full, 2, 5).weight, vgg.features[5].weight)
    assert torch.all(full.lpips.lins[2].model[1].weight == 0.5)


def test_perceptual_missing_or_bad_file(tmp_path):
    missing = tmp_path / "nope" / "vgg16.pth"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        PerceptualLoss(missing)
    torch.save({"something.else": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="unrecognised layout"):
        PerceptualLoss(tmp_path / "bad.pth")


# ---- contrastive ---------------------------------------------------------------------------
def _ce(row: list[float], label: int) -> float:
    return -row[label] + math.log(sum(math.exp(v) for v in row))


def test_contrastive_matches_hand_computation_3x3():
    s = 2.0
    img = torch.eye(3)
    txt = F.normalize(torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, -1.0]]), dim=-1)
    r = 2 ** -0.5
    # logits_i[a][b] = s * <img_a, txt_b>, written out by hand
    li = [[s * r, 0.0, 0.0], [s * r, s * 1.0, 0.0], [0.0, 0.0, -s]]
    lt = [list(col) for col in zip(*li)]  # logits_t = logits_i^T
    expected = (sum(_ce(li[a], a) for a in range(3)) / 3 + sum(_ce(lt[a], a) for a in range(3)) / 3) / 2
    loss = ContrastiveLoss(rank=0, world_size=1)(img, txt, torch.tensor(s))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError):
        ContrastiveLoss()(img, txt[:2], s)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_clip_worker(rank: int, world: int, port: int, out_dir: str, img: torch.Tensor, txt: torch.Tensor):
    import torch.distributed as dist

    torch.set_num_threads(1)  # a forked child must not reuse the parent's OpenMP pool (it can hang)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        n = img.shape[0] // world
        i = img[rank * n:(rank + 1) * n].clone().requires_grad_(True)
        t = txt[rank * n:(rank + 1) * n].clone().requires_grad_(True)
        loss = ContrastiveLoss()(i, t, torch.tensor(3.0))  # rank / world read from torch.distributed
        loss.backward()
        torch.save({"loss": loss.detach(), "gi": i.grad, "gt": t.grad}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_contrastive_two_gloo_ranks_match_single_process(tmp_path):
    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    txt = F.normalize(img + 0.5 * torch.randn(6, 8, generator=g), dim=-1)
    # fork: the children inherit the imported modules (spawn would re-import torch/open_clip, ~10 s)
    mp.start_processes(_ddp_clip_worker, args=(2, _free_port(), str(tmp_path), img, txt), nprocs=2,
                       join=True, start_method="fork")
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    i, t = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
    single = ContrastiveLoss(rank=0, world_size=1)(i, t, torch.tensor(3.0))
    single.backward()
    assert (res[0]["loss"] + res[1]["loss"]).item() / 2 == pytest.approx(single.item(), rel=1e-5)
    assert not torch.allclose(res[0]["loss"], res[1]["loss"])  # each rank really scores its own rows
    # the gather's backward sums the 2 ranks' contributions; DDP's averaging divides by 2
    for r in range(2):
        rows = slice(3 * r, 3 * r + 3)
        assert torch.allclose(res[r]["gi"] / 2, i.grad[rows], atol=1e-6)
        assert torch.allclose(res[r]["gt"] / 2, t.grad[rows], atol=1e-6)


# ---- adversarial ---------------------------------------------------------------------------
def test_hinge_and_bcr_values():
    real = torch.tensor([[2.0, 0.5], [-1.0, 0.0]])
    fake = torch.tensor([[-2.0, 0.5], [1.0, -0.5]])
    # relu(1 - real) = [0, .5, 2, 1] -> 0.875;  relu(1 + fake) = [0, 1.5, 2, .5] -> 1.0
    assert hinge_d_loss(real, fake).item() == pytest.approx(1.875)
    assert hinge_g_loss(fake).item() == pytest.approx(0.25)
    # MSE(real + 1, real) = 1;  MSE(fake, fake - 2) = 4  -> 4 * 5
    assert bcr_loss(real + 1, real, fake, fake - 2).item() == pytest.approx(20.0)
    assert bcr_loss(real + 1, real, fake, fake - 2, weight=0.5).item() == pytest.approx(2.5)


def test_adaptive_weight_hand_computed_and_clamped():
    W = torch.nn.Parameter(torch.tensor([[1.0, 2.0, 0.0], [0.0, -1.0, 1.0]]))
    x = torch.tensor([1.0, 1.0, 2.0])
    c = torch.tensor([3.0, -1.0])
    y = W @ x  # (2,)
    nll = y.square().sum()  # d/dW = 2 y x^T
    g = (c * y).sum()  # d/dW = c x^T
    xn = x.norm().item()
    expected = (2 * y.norm().item() * xn) / (c.norm().item() * xn + 1e-6)
    w = adaptive_weight(nll, g, W)
    assert w.item() == pytest.approx(expected, rel=1e-6)
    assert not w.requires_grad
    (nll + w * g).backward()  # the graph was retained for the real backward
    assert W.grad is not None
    y = W @ x
    assert adaptive_weight(y.square().sum(), 1e6 * (c * y).sum(), W).item() == pytest.approx(0.015)
    assert adaptive_weight(y.square().sum(), 1e-9 * (c * y).sum(), W).item() == pytest.approx(1e4)
    assert adaptive_weight(y.square().sum(), torch.tensor(1.0, requires_grad=True), W).item() == pytest.approx(1e4)


def _reference_diffaug(x: torch.Tensor, r: torch.Tensor, cutout: float = 0.2) -> torch.Tensor:
    """Pixel-by-pixel statement of the augmentation, from the same 7 uniforms per sample."""
    B, C, H, W = x.shape
    out = torch.zeros_like(x)
    for b in range(B):
        dh, dw = round(H * 0.125), round(W * 0.125)
        th = math.floor(r[0, b].item() * (2 * dh + 1)) - dh
        tw = math.floor(r[1, b].item() * (2 * dw + 1)) - dw
        for h in range(H):
            for w in range(W):
                if 0 <= h + th < H and 0 <= w + tw < W:
                    out[b, :, h, w] = x[b, :, h + th, w + tw]
        y = out[b] + (r[2, b].item() - 0.5)  # brightness
        m = y.mean(0, keepdim=True)
        y = (y - m) * (2 * r[3, b].item()) + m  # saturation
        m = y.mean()
        y = (y - m) * (r[4, b].item() + 0.5) + m  # contrast
        ch, cw = round(H * cutout), round(W * cutout)
        oh = math.floor(r[5, b].item() * (H + 1 - ch % 2))
        ow = math.floor(r[6, b].item() * (W + 1 - cw % 2))
        h0, w0 = max(oh - ch // 2, 0), max(ow - cw // 2, 0)
        y[:, h0:min(oh - ch // 2 + ch, H), w0:min(ow - cw // 2 + cw, W)] = 0
        out[b] = y
    return out


def test_diffaug_matches_pixel_reference_and_is_seeded():
    aug = DiffAug()
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    out = aug(x, generator=torch.Generator().manual_seed(5))
    r = torch.rand(7, 3, 1, 1, generator=torch.Generator().manual_seed(5))
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.allclose(out, _reference_diffaug(x, r), atol=1e-5)
    assert torch.equal(out, aug(x, generator=torch.Generator().manual_seed(5)))
    assert not torch.allclose(out, aug(x, generator=torch.Generator().manual_seed(6)))
    # the cutout zeroes a square of at most round(0.2 * 16)^2 = 9 pixels per image
    zeros = (out == 0).all(dim=1).flatten(1).sum(1)
    assert torch.all((zeros > 0) & (zeros <= 9))
    assert aug(x.half(), blur_fade=0.5).dtype == torch.float32


def test_gaussian_blur_identity_and_kernel():
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(gaussian_blur(x, 0.0), x)
    assert torch.equal(gaussian_blur(x, 0.05), x)  # radius floor(3 * 4 * 0.05) = 0 -> no blur
    const = torch.full((1, 1, 32, 32), 0.3)
    assert torch.allclose(gaussian_blur(const, 1.0), const, atol=1e-6)
    impulse = torch.zeros(1, 1, 64, 64)
    impulse[0, 0, 32, 32] = 1.0
    sigma = math.sqrt(64 / 2) * 0.5  # fade 0.5 -> sigma 2.83, radius 8
    k = [2 ** -((t / sigma) ** 2) for t in range(-8, 9)]
    k = [v / sum(k) for v in k]
    out = gaussian_blur(impulse, 0.5)
    assert out[0, 0, 32, 32].item() == pytest.approx(k[8] ** 2, rel=1e-5)
    assert out[0, 0, 32 + 8, 32 + 3].item() == pytest.approx(k[16] * k[11], rel=1e-4)
    assert out[0, 0, 32 + 9, 32].item() == 0.0  # beyond the 3-sigma radius


def test_gan_schedule_values():
    total = 1000  # start 375, warmup 30 iterations, blur fade over 60
    assert gan_schedule(0, total) == (False, 0.0, 1.0)
    assert gan_schedule(374, total) == (False, 0.0, 1.0)
    assert gan_schedule(375, total) == (True, 0.0, 1.0)
    active, warm, fade = gan_schedule(390, total)
    assert active and warm == pytest.approx(0.5) and fade == pytest.approx(0.75)
    assert gan_schedule(405, total)[1:] == pytest.approx((1.0, 0.5))
    assert gan_schedule(435, total) == (True, 1.0, 0.0)
    assert gan_schedule(999, total) == (True, 1.0, 0.0)
    with pytest.raises(ValueError):
        gan_schedule(0, 0)


def test_discriminator_loss_terms_and_detached_fake():
    disc = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    real = torch.rand(2, 3, 8, 8) * 2 - 1
    fake = (torch.rand(2, 3, 8, 8) * 2 - 1).requires_grad_(True)
    out = discriminator_loss(disc, real, fake, DiffAug(), fade=0.5, generator=torch.Generator().manual_seed(0))
    assert out["total"].item() == pytest.approx(out["hinge"].item() + out["bcr"].item())
    assert out["bcr"].item() > 0
    out["total"].backward()
    assert fake.grad is None and disc[1].weight.grad is not None
    g = torch.Generator().manual_seed(0)  # replay the same draws by hand for the hinge term
    lr = disc(DiffAug()(real, 0.5, g))
    lf = disc(DiffAug()(fake.detach(), 0.5, g))
    assert out["hinge"].item() == pytest.approx(hinge_d_loss(lr, lf).item(), rel=1e-6)
    no_bcr = discriminator_loss(disc, real, fake, DiffAug(), fade=0.0, bcr_weight=0.0)
    assert no_bcr["bcr"].item() == 0.0 and 0 <= no_bcr["acc_real"].item() <= 100
