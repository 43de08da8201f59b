"""The official `trainer.unitok` key/shape table (REFERENCE.md 3.3), written out independently of
the model code, parametrised by size so tests can build official-layout state dicts at any scale."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Dims:
    D: int = 1024          # ViT width
    stem: int = 160
    c0: int = 160          # stage-0 width
    c1: int = 320          # stage-1 width
    depths: tuple = (2, 4)
    enc_blocks: int = 31
    dec_blocks: int = 31
    up_depths: tuple = (4, 2)
    C: int = 64            # latent width
    K: int = 8
    V: int = 4096
    E: int = 768           # CLIP embed
    T: int = 768           # text width
    text_layers: int = 12
    text_vocab: int = 49408
    ctx: int = 77


def _ln(prefix, n):
    return {f"{prefix}.weight": (n,), f"{prefix}.bias": (n,)}


def _lin(prefix, o, i, bias=True):
    d = {f"{prefix}.weight": (o, i)}
    if bias:
        d[f"{prefix}.bias"] = (o,)
    return d


def _conv(prefix, o, i, k, groups=1):
    return {f"{prefix}.weight": (o, i // groups, k, k), f"{prefix}.bias": (o,)}


def _vit_block(prefix, D):
    d = {}
    d.update(_ln(f"{prefix}.norm1", D))
    d.update(_lin(f"{prefix}.attn.qkv", 3 * D, D))
    d.update(_lin(f"{prefix}.attn.proj", D, D))
    d.update(_ln(f"{prefix}.norm2", D))
    d.update(_ln(f"{prefix}.mlp.norm", D))
    d.update(_lin(f"{prefix}.mlp.w0", 2 * D, D))
    d.update(_lin(f"{prefix}.mlp.w1", 2 * D, D))
    d.update(_lin(f"{prefix}.mlp.w2", D, 2 * D))
    return d


def _attn_proj(prefix, i, o):
    big = max(i, o)
    d = {}
    d.update(_ln(f"{prefix}.norm1", i))
    d.update(_ln(f"{prefix}.norm3", i))
    d.update(_ln(f"{prefix}.norm2", o))
    d[f"{prefix}.attn.qkv.weight"] = (3 * big, i)
    for b in ("q_bias", "v_bias", "zero_k_bias"):
        d[f"{prefix}.attn.{b}"] = (big,)
    d.update(_lin(f"{prefix}.attn.proj", o, o))
    d.update(_lin(f"{prefix}.proj", o, i))
    d.update(_ln(f"{prefix}.mlp.norm", o))
    d.update(_lin(f"{prefix}.mlp.w0", 2 * o, o))
    d.update(_lin(f"{prefix}.mlp.w1", 2 * o, o))
    d.update(_lin(f"{prefix}.mlp.w2", o, 2 * o))
    return d


def official_shapes(m: Dims = Dims()) -> dict[str, tuple]:
    """key -> shape of the official `trainer.unitok` state dict."""
    s: dict[str, tuple] = {"logit_scale": ()}
    s.update(_ln("fc_norm", m.D))
    s.update(_lin("projection", m.E, m.D))
    # encoder
    s["encoder.pos_embed"] = (1, 1, m.D)
    bb = "encoder.patch_embed.backbone"
    s.update(_conv(f"{bb}.stem.conv1", m.stem, 3, 3))
    s.update(_ln(f"{bb}.stem.norm1", m.stem))
    s.update(_conv(f"{bb}.stem.conv2", m.stem, m.stem, 3))
    in_chs = m.stem
    for st, (width, depth) in enumerate(zip((m.c0, m.c1), m.depths)):
        for b in range(depth):
            cin = in_chs if b == 0 else width
            p = f"{bb}.stages.{st}.{b}"
            mid = 4 * width
            s.update(_ln(f"{p}.pre_norm", cin))
            s.update(_conv(f"{p}.conv1_1x1", mid, cin, 1))
            s.update(_conv(f"{p}.conv2_kxk", mid, mid, 3, groups=mid))
            s.update(_conv(f"{p}.conv3_1x1", width, mid, 1))
            if b == 0 and cin != width:
                s.update(_conv(f"{p}.shortcut.expand", width, cin, 1))
        in_chs = width
    s.update(_ln(f"{bb}.pool.norm", m.c1))
    s.update(_conv(f"{bb}.pool.proj", m.D, m.c1, 3))
    for i in range(m.enc_blocks):
        s.update(_vit_block(f"encoder.blocks.{i}", m.D))
    s.update(_ln("encoder.norm", m.D))
    # projections and quantizer
    s.update(_attn_proj("quant_proj", m.D, m.C))
    s.update(_attn_proj("post_quant_proj", m.C, m.D))
    for j in range(m.K):
        s[f"quantizer.codebooks.{j}.codebook.weight"] = (m.V, m.C // m.K)
        s[f"quantizer.codebooks.{j}.vocab_usage"] = (m.V,)
    # decoder
    for i in range(m.dec_blocks):
        s.update(_vit_block(f"decoder.blocks.{i}", m.D))
    s.update(_ln("decoder.norm", m.D))
    s.update(_conv("decoder.up_conv1.conv", m.c1, m.D, 3))
    for stage, (cin0, cout, depth) in (("up_conv2", (m.c1, m.c1, m.up_depths[0])),
                                       ("up_conv3", (m.c1, m.c0, m.up_depths[1]))):
        mid = 4 * cout
        for b in range(depth):
            cin = cin0 if b == 0 else cout
            p = f"decoder.{stage}.{b}"
            if b == 0:
                s.update(_conv(f"{p}.shortcut.conv", cout, cin, 3))
                s.update(_conv(f"{p}.up.conv", mid, mid, 3))
            s.update(_ln(f"{p}.pre_norm", cin))
            s.update(_conv(f"{p}.conv1_1x1", mid, cin, 1))
            s.update(_conv(f"{p}.conv2_kxk", mid, mid, 3, groups=mid))
            s.update(_conv(f"{p}.conv3_1x1", cout, mid, 1))
    s.update(_conv("decoder.up_conv4.conv1.conv", m.c0, m.c0, 3))
    s.update(_ln("decoder.up_conv4.norm1", m.c0))
    s.update(_conv("decoder.up_conv4.conv2", 3, m.c0, 3))
    # text tower (open_clip layout)
    t = "text_encoder"
    s[f"{t}.token_embedding.weight"] = (m.text_vocab, m.T)
    s[f"{t}.positional_embedding"] = (m.ctx, m.T)
    s[f"{t}.text_projection"] = (m.T, m.E)
    s.update(_ln(f"{t}.ln_final", m.T))
    for r in range(m.text_layers):
        p = f"{t}.transformer.resblocks.{r}"
        s.update(_ln(f"{p}.ln_1", m.T))
        s[f"{p}.attn.in_proj_weight"] = (3 * m.T, m.T)
        s[f"{p}.attn.in_proj_bias"] = (3 * m.T,)
        s.update(_lin(f"{p}.attn.out_proj", m.T, m.T))
        s.update(_ln(f"{p}.ln_2", m.T))
        s.update(_lin(f"{p}.mlp.c_fc", 4 * m.T, m.T))
        s.update(_lin(f"{p}.mlp.c_proj", m.T, 4 * m.T))
    return s
