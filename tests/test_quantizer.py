"""Quantizer math on hand-made tensors (REFERENCE.md 2.4)."""
import math

import pytest
import torch
import torch.nn.functional as F

from unitok.config import QuantizerConfig
from unitok.models.quantizer import MultiCodebookQuantizer, ResidualQuantizer, build_quantizer


def _mcq(K=2, V=3, C=4, beta=0.25):
    q = MultiCodebookQuantizer(QuantizerConfig(num_codebooks=K, codebook_size=V, latent_dim=C, beta=beta))
    # Codebook 0 and 1 (2-d each): axis-aligned entries, deliberately not unit-norm (normalised at use).
    with torch.no_grad():
        q.codebooks[0].codebook.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]]))
        q.codebooks[1].codebook.weight.copy_(torch.tensor([[0.0, -5.0], [1.0, 1.0], [0.5, 0.0]]))
    return q


def test_mcq_nearest_codes_by_cosine():
    q = _mcq().eval()
    # position 0: chunk0 points along +y -> entry 1; chunk1 along (1,1) -> entry 1
    # position 1: chunk0 along -x -> entry 2; chunk1 along -y -> entry 0
    z = torch.tensor([[[0.1, 7.0, 3.0, 3.0], [-4.0, 0.5, 0.0, -0.2]]])
    codes = q.latent_to_codes(z)
    assert codes.tolist() == [[[1, 2], [1, 0]]]
    out = q(z)
    assert torch.equal(out.codes, codes)
    # quantized value = unit-norm codebook entry per chunk
    expected = torch.tensor([[[0.0, 1.0, 2 ** -0.5, 2 ** -0.5], [-1.0, 0.0, 0.0, -1.0]]])
    assert torch.allclose(out.z_q, expected, atol=1e-6)
    assert torch.allclose(q.codes_to_latent(codes), expected, atol=1e-6)


def test_mcq_loss_value_matches_hand_computation():
    q = _mcq(beta=0.25).eval()
    z = torch.tensor([[[0.1, 7.0, 3.0, 3.0], [-4.0, 0.5, 0.0, -0.2]]])
    out = q(z)
    u = torch.cat([F.normalize(z[..., :2], dim=-1), F.normalize(z[..., 2:], dim=-1)], -1).view(-1)
    qv = out.z_q.view(-1)
    mse = ((qv - u) ** 2).mean()
    assert math.isclose(out.vq_loss.item(), 1.25 * mse.item(), rel_tol=1e-5)  # beta*mse + mse


def test_straight_through_gradient_and_codebook_gradient():
    q = _mcq().train()
    z = torch.tensor([[[0.1, 7.0, 3.0, 3.0], [-4.0, 0.5, 0.0, -0.2]]], requires_grad=True)
    out = q(z)
    # straight-through: d(sum z_q)/dz equals the gradient of sum(l2norm(chunks)) wrt z
    (g_st,) = torch.autograd.grad(out.z_q.sum(), z, retain_graph=True)
    z2 = z.detach().clone().requires_grad_(True)
    ref = torch.cat([F.normalize(z2[..., :2], dim=-1), F.normalize(z2[..., 2:], dim=-1)], -1).sum()
    (g_ref,) = torch.autograd.grad(ref, z2)
    assert torch.allclose(g_st, g_ref, atol=1e-6)
    # the codebook learns only through the loss; chosen entries get gradient, unchosen do not
    out.vq_loss.backward()
    g0 = q.codebooks[0].codebook.weight.grad
    assert g0[0].abs().sum() == 0 and g0[1].abs().sum() > 0 and g0[2].abs().sum() > 0


def test_usage_percent_and_ema_buffer():
    q = _mcq().train()
    z = torch.tensor([[[0.1, 7.0, 3.0, 3.0], [-4.0, 0.5, 0.0, -0.2]]])
    out = q(z)
    assert torch.allclose(out.usage, torch.tensor([200 / 3, 200 / 3]))  # 2 of 3 entries used in each book
    assert torch.allclose(q.codebooks[0].vocab_usage, torch.tensor([0.0, 0.5, 0.5]))  # first step: copy
    q(torch.tensor([[[1.0, 0.0, 0.0, -1.0], [1.0, 0.0, 0.0, -1.0]]]))  # all entry 0 / entry 0
    assert torch.allclose(q.codebooks[0].vocab_usage, torch.tensor([0.1, 0.45, 0.45]))  # decay 0.9
    q.eval()
    before = q.codebooks[0].vocab_usage.clone()
    q(z)
    assert torch.equal(before, q.codebooks[0].vocab_usage)  # eval does not touch statistics


def test_entropy_loss_is_finite_and_optional():
    cfg = QuantizerConfig(num_codebooks=2, codebook_size=16, latent_dim=8, entropy_weight=0.1)
    q = MultiCodebookQuantizer(cfg)
    out = q(torch.randn(2, 5, 8))
    assert out.entropy_loss.item() != 0 and torch.isfinite(out.entropy_loss)
    q0 = MultiCodebookQuantizer(QuantizerConfig(num_codebooks=2, codebook_size=16, latent_dim=8))
    assert q0(torch.randn(2, 5, 8)).entropy_loss.item() == 0


def test_residual_quantizer_reduces_error_with_depth():
    torch.manual_seed(0)
    cfg = QuantizerConfig(kind="rq", num_codebooks=4, codebook_size=32, latent_dim=8)
    q = ResidualQuantizer(cfg).eval()
    with torch.no_grad():
        for cb in q.codebooks:
            cb.codebook.weight.normal_(0, 0.3)
    z = torch.randn(1, 50, 8)
    u = F.normalize(z, dim=-1)
    codes = q.latent_to_codes(z)
    assert codes.shape == (1, 4, 50)
    errs = []
    for depth in range(1, 5):
        partial = torch.stack([q.codebooks[k].codebook.weight[codes[0, k]] for k in range(depth)]).sum(0)
        errs.append((partial - u[0]).square().sum(-1).mean().item())
    assert all(b <= a + 1e-6 for a, b in zip(errs, errs[1:]))
    assert torch.allclose(q(z).z_q, q.codes_to_latent(codes), atol=1e-5)


def test_single_codebook_is_mcq_with_one_book():
    q = build_quantizer(QuantizerConfig(kind="single", num_codebooks=1, codebook_size=64, latent_dim=16))
    assert isinstance(q, MultiCodebookQuantizer)
    codes = q.latent_to_codes(torch.randn(2, 3, 16))
    assert codes.shape == (2, 1, 3) and codes.max() < 64
    with pytest.raises(ValueError):
        QuantizerConfig(kind="single", num_codebooks=2)


def test_init_is_the_release_uniform_bound():
    q = MultiCodebookQuantizer(QuantizerConfig(num_codebooks=8, codebook_size=4096, latent_dim=64))
    w = q.raw_weights()
    bound = 8 ** -0.5 / 36
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
