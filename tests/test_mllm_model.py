"""The unified MLLM on a tiny config: parity, causality, depth head, losses, checkpoints, generation."""
import sys

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError

from unitok.models.projection import KVCache
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import mllm  # noqa: F401  (registers the model type)
from mllm import IMAGE_TOKEN_INDEX as IMG, UniMLLMConfig, UniMLLMForCausalLM
from mllm.data.collate import Sample, collate
from mllm.generate import (SamplingConfig, answer, cfg_mix, generate_images, reference_answer,
                           reference_generate_images, sample_logits)
from mllm_tiny import tiny_config


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = UniMLLMForCausalLM(tiny_config()).eval()
    with torch.no_grad():  # make the frozen codebooks non-trivial
        for cb in m.model.multi_embedder.quantizer.codebooks:
            cb.codebook.weight.normal_()
    return m


def _codes(seed, h=2, w=3):
    return torch.randint(0, 64, (4, h, w), generator=torch.Generator().manual_seed(seed))


def test_text_only_logits_equal_plain_llama(model):
    cfg = model.config.to_dict()
    llama = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if k in LlamaConfig.__dataclass_fields__}))
    result = llama.load_state_dict(model.state_dict(), strict=False)
    assert result.missing_keys == []
    llama.eval()
    ids = torch.randint(5, 300, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    assert torch.allclose(model(input_ids=ids, attention_mask=mask).logits,
                          llama(input_ids=ids, attention_mask=mask).logits, atol=1e-5)


def test_embedder_is_causal(model):
    emb = model.model.multi_embedder
    codes = torch.randint(0, 64, (2, 4, 6))
    base = emb(codes)
    later = codes.clone()
    later[:, :, 4:] = (later[:, :, 4:] + 7) % 64
    changed = emb(later)
    assert torch.allclose(changed[:, :4], base[:, :4], atol=1e-6)
    assert not torch.allclose(changed[:, 4:], base[:, 4:])
    cache = KVCache()
    inc = torch.cat([emb(codes[:, :, t:t + 1], kv_cache=cache) for t in range(6)], 1)
    assert torch.allclose(inc, base, atol=1e-5)


def test_depth_head_teacher_forced_equals_step_by_step(model):
    head = model.ar_head
    h = torch.randn(3, 64)
    codes = torch.randint(0, 64, (3, 4))
    tf = head(h, codes)  # (3, K, V)
    cache = head.new_cache()
    x = head.start_input(h)
    for i in range(4):
        step = head.step(x, i, cache)
        assert torch.allclose(step, tf[:, i], atol=1e-5)
        if i < 3:
            x = head.embed_code(i, codes[:, i])


def _depth_runs(head, h, codes):
    """Teacher-forced logits and the step-by-step (cached) logits of a depth head, plus its caches."""
    tf = head(h, codes)
    cache, x, steps = head.new_cache(), head.start_input(h), []
    for i in range(codes.shape[1]):
        steps.append(head.step(x, i, cache))
        if i < codes.shape[1] - 1:
            x = head.embed_code(i, codes[:, i])
    return tf, torch.stack(steps, 1), cache


def test_gqa_depth_head_equals_mha_with_repeated_kv_weights():
    """Grouped-query depth head (2 kv heads for 4 query heads) = a multi-head one whose k/v weights are the
    GQA weights repeated per group (query head h reads kv head h // 2), teacher-forced and cached."""
    from mllm.modeling.depth_head import DepthHead

    torch.manual_seed(0)
    gqa = DepthHead(tiny_config(depth_num_key_value_heads=2)).eval()
    mha = DepthHead(tiny_config()).eval()
    assert mha.layers[0].self_attn.num_kv_heads == 4  # None = depth_num_heads, the released layout
    old = {k: v for k, v in tiny_config().to_dict().items() if k != "depth_num_key_value_heads"}
    assert UniMLLMConfig.from_dict(old).depth_num_key_value_heads == 4  # config.json files written before GQA
    state = gqa.state_dict()
    for k in [k for k in state if k.endswith(("k_proj.weight", "v_proj.weight"))]:
        assert state[k].shape == (2 * 16, 64)
        state[k] = state[k].view(2, 16, 64).repeat_interleave(2, dim=0).reshape(64, 64)
    mha.load_state_dict(state)
    h, codes = torch.randn(3, 64), torch.randint(0, 64, (3, 4))
    tf_g, st_g, cache = _depth_runs(gqa, h, codes)
    tf_m, st_m, _ = _depth_runs(mha, h, codes)
    assert cache[0].k.shape == (3, 2, 4, 16)  # the cache holds the kv heads only
    assert torch.allclose(tf_g, tf_m, atol=1e-5) and torch.allclose(st_g, st_m, atol=1e-5)
    assert torch.allclose(st_g, tf_g, atol=1e-5)
    with pytest.raises(StrictDataclassClassValidationError, match="divisible by depth_num_key_value_heads"):
        tiny_config(depth_num_key_value_heads=3)  # transformers' strict validation wraps the ValueError


def _attention_before_gqa(self, x, start, cache):
    """DepthAttention.forward as it was before grouped-query attention (multi-head only), verbatim."""
    from mllm.modeling.depth_head import rope

    B, S, D = x.shape
    pos = torch.arange(start, start + S, device=x.device)
    q, k, v = (p(x).view(B, S, self.num_heads, self.head_dim).transpose(1, 2)
               for p in (self.q_proj, self.k_proj, self.v_proj))
    q, k = rope(q, pos, self.theta), rope(k, pos, self.theta)
    if cache is not None:
        k, v = cache.extend(k, v)
    if S == 1:
        a = F.scaled_dot_product_attention(q, k, v)
    elif k.shape[2] == S:
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        mask = torch.ones(S, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - S)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return self.o_proj(a.transpose(1, 2).reshape(B, S, D))


def test_mha_depth_head_is_bit_identical_to_the_code_before_gqa(model, monkeypatch):
    """kv heads == heads (the released layout) computes exactly what the multi-head-only code did."""
    from mllm.modeling.depth_head import DepthAttention

    h, codes = torch.randn(3, 64), torch.randint(0, 64, (3, 4))
    attn, x = model.ar_head.layers[0].self_attn, torch.randn(3, 5, 64)

    def runs(forward):  # the head (teacher-forced, cached steps), then one attention over every branch:
        cache = KVCache()  # causal prefix, a masked chunk after a cache, one cached step
        chunks = [forward(attn, x[:, a:b], a, cache) for a, b in ((0, 2), (2, 4), (4, 5))]
        return [*_depth_runs(model.ar_head, h, codes)[:2], *chunks]

    now = runs(DepthAttention.forward)
    monkeypatch.setattr(DepthAttention, "forward", _attention_before_gqa)
    before = runs(_attention_before_gqa)
    assert all(torch.equal(a, b) for a, b in zip(now, before))


def test_collate_expands_images_and_masks_labels():
    s = Sample([1, 10, IMG, 11, 12], [-100, -100, -100, 11, 12], [_codes(0)], [True])
    b = collate([s, Sample([1, 20, 21], [-100, 20, 21])], pad_id=0)
    assert b["input_ids"].shape == (2, 10)
    assert b["labels"][0].tolist() == [-100] * 8 + [11, 12]
    assert b["image_starts"].tolist() == [[0, 2]] and b["image_lens"].tolist() == [6]
    assert torch.equal(b["image_codes"][0], _codes(0).reshape(4, 6))
    assert b["attention_mask"][1].tolist() == [1, 1, 1] + [0] * 7
    left = collate([s, Sample([1, 20, 21], [-100, 20, 21])], pad_id=0, padding_side="left")
    assert left["attention_mask"][1].tolist() == [0] * 7 + [1, 1, 1]
    assert left["position_ids"][1, 7:].tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="placeholders"):
        Sample([1, IMG], [-100, -100], [])


def test_losses_match_hand_computation(model):
    samples = [Sample([1, 10, 11, 3, IMG, 4, 2], [-100, -100, -100, 3, -100, 4, 2], [_codes(1)], [True]),
               Sample([1, IMG, 30, 31, 2], [-100, -100, 30, 31, 2], [_codes(2, 1, 2)], [False])]
    b = collate(samples)
    batch = {k: b[k] for k in ("input_ids", "labels", "attention_mask", "position_ids", "image_codes",
                               "image_lens", "image_starts", "image_gen")}
    out = model(**batch)
    embeds = model.build_inputs_embeds(b["input_ids"], b["image_codes"], b["image_lens"], b["image_starts"])
    full = model(inputs_embeds=embeds, attention_mask=b["attention_mask"], position_ids=b["position_ids"])
    logits, hidden = full.logits[:, :-1], full.hidden_states_last
    tgt = b["labels"][:, 1:]
    sel = tgt != -100
    text = F.cross_entropy(logits[sel], tgt[sel])
    assert int(sel.sum()) == 6 and torch.allclose(out.text_loss, text, atol=1e-5)
    # image: generated image 0 starts at column 4 of row 0 -> hidden states 3..8 predict its 6 positions
    h = hidden[0, 3:9]
    targets = _codes(1).reshape(4, 6).T
    img_logits = model.ar_head(h, targets)
    ce = F.cross_entropy(img_logits.reshape(-1, 64), targets.reshape(-1))
    image = ce + 5e-5 * img_logits.max(-1).values.pow(2).mean()
    assert torch.allclose(out.image_loss, image, atol=1e-5)
    n_img, n_txt = 6 * 4, 6
    assert torch.allclose(out.loss, (image * n_img + text * n_txt) / (n_img + n_txt), atol=1e-5)


def test_every_trainable_parameter_gets_a_gradient_without_images(model):
    model.train()
    b = collate([Sample([1, 20, 21, 22], [-100, 20, 21, 22])])
    out = model(**{k: b[k] for k in ("input_ids", "labels", "attention_mask", "position_ids", "image_codes",
                                     "image_lens", "image_starts", "image_gen")})
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    assert not any(p.requires_grad for p in model.model.multi_embedder.quantizer.parameters())


def test_save_and_from_pretrained_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert isinstance(loaded, UniMLLMForCausalLM)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(5, 300, (1, 8))
    assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)


def test_load_tokenizer_weights():
    from unitok import UniTok, preset

    torch.manual_seed(0)
    tok = UniTok(preset("debug"))
    m = UniMLLMForCausalLM(tiny_config())
    m.load_tokenizer_weights(tok)
    emb = m.model.multi_embedder
    assert torch.equal(emb.quantizer.codebooks[2].codebook.weight, tok.quantizer.codebooks[2].codebook.weight)
    assert torch.equal(emb.attn_projection.attn.qkv.weight, tok.post_quant_proj.attn.qkv.weight)
    codes = tok.encode(torch.rand(1, 3, 32, 32) * 2 - 1).flatten(2)
    # causal embedder = the tokenizer's projection run causally: the last position sees every code,
    # so it agrees with the tokenizer's full attention there, and only there
    full = tok.tokens_from_codes(codes)
    causal = emb.attn_projection(emb.quantizer(codes))
    assert torch.allclose(full[:, -1], causal[:, -1], atol=1e-5)
    assert not torch.allclose(full[:, 0], causal[:, 0], atol=1e-5)
    with pytest.raises(ValueError, match="heads"):
        UniMLLMForCausalLM(tiny_config(embed_num_heads=4)).load_tokenizer_weights(tok)


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_cached_image_generation_equals_full_recompute(model, cfg_scale):
    prompts = [[1, 50, 51, 3], [1, 60, 3]]
    null = [1, 99, 3]
    greedy = SamplingConfig(temperature=0)
    fast = generate_images(model, prompts, (2, 3), null_ids=null, cfg_scale=cfg_scale, sampling=greedy)
    slow = reference_generate_images(model, prompts, (2, 3), null_ids=null, cfg_scale=cfg_scale, sampling=greedy)
    assert fast.shape == (2, 4, 2, 3)
    assert torch.equal(fast, slow)


def test_cached_answer_equals_full_recompute(model):
    prompts = [Sample([1, IMG, 40, 41], [-100] * 4, [_codes(3)]), Sample([1, 42], [-100, -100])]
    fast = answer(model, prompts, max_new_tokens=6, stop_ids={2})
    slow = reference_answer(model, prompts, max_new_tokens=6, stop_ids={2})
    assert fast == slow and all(len(r) > 0 for r in fast)


def test_cfg_and_sampling_rules():
    lc, lu = torch.randn(3, 10), torch.randn(3, 10)
    assert torch.allclose(cfg_mix(lc, lu, 1.0), lc, atol=1e-6)
    assert torch.allclose(cfg_mix(lc, lu, 2.0), 2 * lc - lu, atol=1e-6)
    logits = torch.tensor([[0.0, 1.0, 5.0, 2.0]])
    assert sample_logits(logits, SamplingConfig(temperature=0)).item() == 2
    g = torch.Generator().manual_seed(0)
    assert all(sample_logits(logits, SamplingConfig(top_k=1), g).item() == 2 for _ in range(5))
    picks = {sample_logits(logits, SamplingConfig(top_k=2), g).item() for _ in range(200)}
    assert picks == {2, 3}
    picks = {sample_logits(torch.tensor([[0.0, 0.0, 10.0, 9.0]]), SamplingConfig(top_p=0.5), g).item()
             for _ in range(100)}
    assert picks == {2}


def test_seeded_sampling_is_reproducible_and_cfg1_is_conditional(model):
    prompts = [[1, 50, 3]]
    s = SamplingConfig(temperature=1.0, top_k=20)
    a = generate_images(model, prompts, (1, 2), sampling=s, generator=torch.Generator().manual_seed(5))
    b = generate_images(model, prompts, (1, 2), sampling=s, generator=torch.Generator().manual_seed(5))
    c = generate_images(model, prompts, (1, 2), null_ids=[1, 9, 3], cfg_scale=1.0, sampling=s,
                        generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and torch.equal(a, c)


def test_attention_implementation_selection(monkeypatch):
    """flash_attention_2 when flash-attn imports and a GPU is present; otherwise SDPA, with one warning."""
    import types
    import warnings

    from mllm.modeling.modeling import default_attn_implementation

    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_attn_implementation() == "flash_attention_2"
    assert default_attn_implementation(torch.bfloat16) == default_attn_implementation(torch.float16) \
        == "flash_attention_2"
    assert default_attn_implementation(torch.float32) == "sdpa"  # flash-attn has no fp32 kernels (silently)
    assert default_attn_implementation(torch.bfloat16, "cpu") == "sdpa"  # nor CPU ones (--device cpu on a GPU host)
    assert default_attn_implementation(torch.bfloat16, torch.device("cuda", 1)) == "flash_attention_2"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(default_attn_implementation, "_warned", False, raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert default_attn_implementation() == "sdpa"
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setitem(sys.modules, "flash_attn", None)  # not installed: the import fails
        assert default_attn_implementation() == "sdpa"
    assert [str(w.message) for w in caught] == ["flash-attn is not available: using PyTorch SDPA attention"]


def test_the_attention_flag_names_what_cannot_run(monkeypatch):
    """mllm.train --attention: flash or flex where they cannot train is an error at start-up, not a fallback."""
    import types

    from mllm.modeling.modeling import attn_implementation
    from mllm.train import MllmTrainConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert attn_implementation("sdpa", torch.float32) == "sdpa" and attn_implementation("eager", torch.float32) == "eager"
    with pytest.raises(ValueError, match="--attention flex trains on a GPU only"):
        MllmTrainConfig(attention="flex")
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # not installed
    with pytest.raises(ValueError, match="--attention flash: flash-attn is not installed"):
        attn_implementation("flash", torch.bfloat16)
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    with pytest.raises(ValueError, match="--attention flash needs a GPU and bf16"):
        attn_implementation("flash", torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # a GPU machine training on its CPU
    with pytest.raises(ValueError, match="--attention flex trains on a GPU only"):
        attn_implementation("flex", torch.bfloat16)
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    assert attn_implementation("auto", torch.bfloat16) == "sdpa"  # flash-attn has no CPU kernels
    monkeypatch.delenv("DS_ACCELERATOR")
    with pytest.raises(ValueError, match="--attention flash needs a GPU and bf16"):
        attn_implementation("flash", torch.float32)
    assert attn_implementation("flash", torch.bfloat16) == "flash_attention_2"
    assert attn_implementation("flex", torch.float32) == "flex_attention"


def _flash_stand_in(monkeypatch) -> dict:
    """flash-attn's two kernels as exact PyTorch equivalents (no flash-attn or GPU here), so transformers' own
    flash_attention_2 dispatch runs on CPU; returns the kernels' call counts."""
    import transformers.modeling_flash_attention_utils as fau

    calls = {"whole_row": 0, "varlen": 0}

    def attend(q, k, v, causal, scale):  # (B, S, H, D), k/v with fewer heads (GQA)
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=causal, scale=scale, enable_gqa=True).transpose(1, 2)

    def flash_fn(q, k, v, causal=True, softmax_scale=None, **_):
        calls["whole_row"] += 1
        return attend(q, k, v, causal, softmax_scale)

    def flash_varlen_fn(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=True, softmax_scale=None, **_):
        calls["varlen"] += 1
        cu = cu_seqlens_q.tolist()
        return torch.cat([attend(q[None, a:b], k[None, a:b], v[None, a:b], causal, softmax_scale)[0]
                          for a, b in zip(cu[:-1], cu[1:])])

    def process(**kw):
        return {"causal": kw["is_causal"], "softmax_scale": kw.get("softmax_scale")}

    monkeypatch.setattr(fau, "lazy_import_flash_attention",
                        lambda *a, **k: ((flash_fn, flash_varlen_fn, None, None, None), (process, process)))
    return calls


# sdpa, eager and flex_attention run on CPU; flash_attention_2 (what a GPU with flash-attn gets) through exact
# stand-in kernels
@pytest.mark.parametrize("attn", ["sdpa", "eager", "flash_attention_2", "flex_attention"])
def test_packed_rows_do_not_attend_across_samples(model, attn, monkeypatch, request):
    """Packed rows (position ids restarting per sample, no mask: several rows, as --micro-batch > 1 packs)
    give each sample exactly the logits it has alone. Under flash_attention_2 transformers read restarting
    position ids only in a batch of one row: with more, every sample attended to the ones before it in its row."""
    calls = _flash_stand_in(monkeypatch) if attn == "flash_attention_2" else None
    monkeypatch.setattr(model.config, "_attn_implementation", attn)
    samples = [Sample([1, 10, IMG, 11], [-100, 10, -100, 11], [_codes(4)], [True]),
               Sample([1, 20, 21, 22, 23], [-100, 20, 21, 22, 23]),
               Sample([1, IMG, 30], [-100, -100, 30], [_codes(5, 1, 1)], [False]),
               Sample([1, 40, 41, 42, 43, 44, 45], [-100, 40, 41, 42, 43, 44, 45])]
    packed = collate(samples, pack_to=9)  # rows: [7 positions + pad], [5 + 3 + pad], [7 + pad]
    assert packed["input_ids"].shape == (3, 9) and packed["attention_mask"] is None
    emb = model.build_inputs_embeds(packed["input_ids"], packed["image_codes"], packed["image_lens"],
                                    packed["image_starts"])
    if attn == "flex_attention":  # no backward on CPU (mllm.train refuses it there)
        torch.set_grad_enabled(False)
        request.addfinalizer(lambda: torch.set_grad_enabled(True))
    logits = model(inputs_embeds=emb, position_ids=packed["position_ids"]).logits
    if calls is not None:
        assert calls == {"whole_row": 0, "varlen": model.config.num_hidden_layers}
    where = [(0, 0), (1, 0), (1, 5), (2, 0)]  # (row, start) of each sample
    for s, (row, start) in zip(samples, where):
        alone = collate([s])
        e = model.build_inputs_embeds(alone["input_ids"], alone["image_codes"], alone["image_lens"],
                                      alone["image_starts"])
        ref = model(inputs_embeds=e, attention_mask=alone["attention_mask"],
                    position_ids=alone["position_ids"]).logits[0]
        n = ref.shape[0]
        assert torch.allclose(logits[row, start:start + n], ref, atol=1e-5)
    if attn == "flex_attention":
        return
    # packed training loss equals the token-weighted combination computed on the padded batch
    keys = ("input_ids", "labels", "attention_mask", "position_ids", "image_codes", "image_lens",
            "image_starts", "image_gen")
    padded = collate(samples)
    lp = model(**{k: packed[k] for k in keys}).loss
    monkeypatch.setattr(model.config, "_attn_implementation", "sdpa")  # padded: flash would unpad (no stand-in)
    lq = model(**{k: padded[k] for k in keys}).loss
    assert torch.allclose(lp, lq, atol=1e-5)


def test_from_local_llama_folder(tmp_path):
    from unitok import UniTok, preset

    torch.manual_seed(0)
    cfg = tiny_config().to_dict()
    llama = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if k in LlamaConfig.__dataclass_fields__}))
    llama.save_pretrained(tmp_path / "llama")
    tok = UniTok(preset("debug"))
    m = UniMLLMForCausalLM.from_llama(tmp_path / "llama", tokenizer=tok, depth_num_layers=1).eval()
    assert m.config.num_codebooks == 4 and m.config.embed_width == 32 and m.config.depth_num_layers == 1
    assert torch.equal(m.model.layers[1].mlp.up_proj.weight, llama.model.layers[1].mlp.up_proj.weight)
    assert torch.equal(m.model.multi_embedder.quantizer.codebooks[0].codebook.weight,
                       tok.quantizer.codebooks[0].codebook.weight)
    ids = torch.randint(5, 300, (1, 6))
    assert torch.allclose(m(input_ids=ids).logits, llama.eval()(input_ids=ids).logits, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        UniMLLMForCausalLM.from_llama(tmp_path / "nowhere")
    llama.model.save_pretrained(tmp_path / "bare")  # a LlamaModel: no lm_head, which transformers made up
    with pytest.raises(ValueError, match=r"bare lacks \['lm_head.weight'\]"):
        UniMLLMForCausalLM.from_llama(tmp_path / "bare", tokenizer=tok, depth_num_layers=1)


def test_load_into_reports_gaps_and_resume_refuses_missing_parameters():
    from runtime.zero_load import load_into, require_parameters

    torch.manual_seed(0)
    model = UniMLLMForCausalLM(tiny_config())
    state = model.state_dict()
    assert load_into(model, state, zero3=False) == []
    require_parameters(model, [], "ckpt")
    partial = {k: v for k, v in state.items() if not k.startswith("ar_head.")}
    missing = load_into(model, partial, zero3=False)
    assert missing and all(k.startswith("ar_head.") for k in missing)
    with pytest.raises(ValueError, match=r"ckpt lacks \d+ parameters of this model \(first: \['ar_head\."):
        require_parameters(model, missing, "ckpt")
    buffers = [k for k in state if k.endswith("vocab_usage")]
    require_parameters(model, buffers, "ckpt")  # buffers only: allowed (logged)
    # Llama-2's files also hold each layer's rotary inv_freq (a buffer transformers now computes): ignored.
    # Under ZeRO-3 (checked before the first gather) a key the model lacks or a shape it does not have is
    # refused, as load_state_dict refuses them otherwise; copy_ broadcast a wrong shape.
    old = {**state, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)}
    assert load_into(model, old, zero3=False) == []  # (the same filter precedes the ZeRO-3 path)
    for zero3 in (False, True):
        with pytest.raises(ValueError, match=r"unexpected weights: \['lm_head.bias'\]"):
            load_into(model, {**state, "lm_head.bias": torch.zeros(3)}, zero3=zero3)
    wide = {**state, "model.norm.weight": torch.ones(state["model.norm.weight"].shape[0] + 1)}
    with pytest.raises(ValueError, match=r"1 weights have another shape: model.norm.weight \(\d+,\) in the file"):
        load_into(model, wide, zero3=True)
