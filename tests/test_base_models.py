"""Llama-family bases for a new MLLM: a Llama-3.1-style folder (GQA, llama3 rope scaling, byte-level BPE
tokenizer with reserved special tokens) and a Mistral-style folder (sliding window, sentencepiece tokenizer),
each tiny and saved with save_pretrained; plus the image-marker choice per tokenizer."""
import json
import shutil

import pytest
import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, PreTrainedTokenizerFast)

import mllm  # noqa: F401  (registers the model type)
from mllm import UniMLLMForCausalLM
from mllm.data import templates as T
from mllm.data.collate import collate
from mllm.data.tiny_tokenizer import VOCAB_SIZE, make_llama_tokenizer
from mllm.generate import default_stop_ids
from mllm.modeling.base import config_from_base

SENTENCES = ["a red circle on a blue background", "a green square on a white background",
             "Generate an image based on this description.", "<unconditional>", "The quick brown fox."] * 4
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
KEYS = ("input_ids", "labels", "attention_mask", "position_ids", "image_codes", "image_lens", "image_starts",
        "image_gen")


def byte_level_tokenizer(folder, reserved: int):
    """A Llama-3-like fast tokenizer: byte-level BPE on a few sentences + its special tokens, saved in `folder`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(SENTENCES, trainers.BpeTrainer(vocab_size=320, show_progress=False,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>"]
                         + [f"<|reserved_special_token_{i}|>" for i in range(reserved)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
    tok.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory):
    """Llama-3.1 layout: GQA (4 heads, 2 kv heads), rope_theta 500000 with llama3 scaling, 128k context, and
    config.json in the hub's legacy form (rope_theta + rope_scaling, several eos ids)."""
    d = tmp_path_factory.mktemp("llama3")
    tok = byte_level_tokenizer(d, reserved=4)
    torch.manual_seed(0)
    cfg = LlamaConfig(**TINY, num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=131072,
                      rope_parameters={"rope_theta": 500000.0, **LLAMA3_ROPE}, rms_norm_eps=1e-5,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(d)
    conf = json.loads((d / "config.json").read_text())
    conf.pop("rope_parameters")
    conf.update(rope_theta=500000.0, rope_scaling=LLAMA3_ROPE, eos_token_id=[tok.eos_token_id, 7])
    (d / "config.json").write_text(json.dumps(conf))
    return d


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory):
    """Mistral layout: one kv head, a 32-token sliding window equal to its context, sentencepiece tokenizer."""
    d = tmp_path_factory.mktemp("mistral")
    make_llama_tokenizer(d)
    torch.manual_seed(1)
    cfg = MistralConfig(**TINY, num_key_value_heads=1, vocab_size=VOCAB_SIZE, sliding_window=32,
                        max_position_embeddings=32, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    MistralForCausalLM(cfg).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def unitok():
    from unitok import UniTok, preset

    torch.manual_seed(2)
    return UniTok(preset("debug")).eval()


def check_text_parity_and_training(base_dir, unitok, **mllm_fields) -> UniMLLMForCausalLM:
    """from_llama: text logits = the base's (atol 1e-5); a T2I + caption batch trains (finite loss, every
    trainable parameter gets a gradient)."""
    m = UniMLLMForCausalLM.from_llama(base_dir, tokenizer=unitok, attn_implementation="sdpa", **mllm_fields).eval()
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    ids = torch.randint(5, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        assert torch.allclose(m(input_ids=ids, attention_mask=mask).logits,
                              base(input_ids=ids, attention_mask=mask).logits, atol=1e-5)
    tok = AutoTokenizer.from_pretrained(base_dir)
    c = m.config
    codes = torch.randint(0, c.codebook_size, (c.num_codebooks, 2, 2), generator=torch.Generator().manual_seed(1))
    samples = [T.t2i_sample(tok, "a red circle", codes, c.boi_token_id, c.eoi_token_id),
               T.caption_sample(tok, "a blue square", codes, c.boi_token_id, c.eoi_token_id)]
    b = collate(samples, pad_id=0)
    assert c.boi_token_id in b["labels"][0].tolist() and c.eoi_token_id in b["labels"][0].tolist()
    m.train()
    out = m(**{k: b[k] for k in KEYS})
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.num_image_tokens == 4 * c.num_codebooks
    assert [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None] == []
    return m


def test_llama3_style_base(llama3_dir, unitok):
    m = check_text_parity_and_training(llama3_dir, unitok)
    c = m.config
    assert c.rope_parameters == {"rope_theta": 500000.0, **LLAMA3_ROPE} and m.ar_head.layers[0].self_attn.theta == 5e5
    assert (c.num_key_value_heads, c.depth_num_heads, c.depth_num_key_value_heads) == (2, 4, 2)  # base's layout
    assert m.ar_head.layers[0].self_attn.k_proj.weight.shape == (2 * 16, 64)
    tok = AutoTokenizer.from_pretrained(llama3_dir)
    assert (c.boi_token_id, c.eoi_token_id) == tuple(tok.convert_tokens_to_ids(
        ["<|reserved_special_token_0|>", "<|reserved_special_token_1|>"]))
    assert default_stop_ids(m) == {tok.eos_token_id, 7}
    # explicit fields win; another depth width or head count is plain multi-head
    assert config_from_base(llama3_dir, depth_num_key_value_heads=4).depth_num_key_value_heads == 4
    assert config_from_base(llama3_dir, depth_num_heads=2).depth_num_key_value_heads == 2
    assert config_from_base(llama3_dir, depth_hidden_size=32, depth_num_heads=4).depth_num_key_value_heads == 4


def test_mistral_style_base(mistral_dir, unitok, recwarn):
    m = check_text_parity_and_training(mistral_dir, unitok)  # 12 tokens: inside the window, so exact
    assert not [w for w in recwarn if "sliding-window" in str(w.message)]  # context = window: nothing dropped
    c = m.config
    assert (c.depth_num_heads, c.depth_num_key_value_heads) == (4, 1) and (c.boi_token_id, c.eoi_token_id) == (3, 4)
    assert m.ar_head.layers[0].self_attn.theta == 1e6 and not hasattr(c, "sliding_window")
    with pytest.warns(UserWarning, match=r"sliding-window attention \(window 32\) is not used.*training rows: 64"):
        config_from_base(mistral_dir, max_len=64)


def test_stage1_build_follows_the_base(tmp_path, llama3_dir, unitok):
    """mllm.train's stage-1 model build (without ZeRO-3, in process): the base's weights, its head layout,
    the tokenizer's image markers, and a pad id for a tokenizer without unk."""
    import logging
    from types import SimpleNamespace

    from mllm.train import GROUPS, build_model

    unitok.save_pretrained(tmp_path / "unitok")
    cfg = SimpleNamespace(init_from=None, llama_dir=str(llama3_dir), tokenizer=str(tmp_path / "unitok"),
                          tokenizer_attn_mode="full", max_len=64, mllm={"depth_num_layers": 1}, trainable=GROUPS,
                          gradient_checkpointing=False, attention="auto")
    model, tok = build_model(cfg, {"zero_optimization": {"stage": 2}, "bf16": {"enabled": False}},
                             logging.getLogger(__name__))
    c = model.config
    assert (c.boi_token_id, c.eoi_token_id) == T.image_marker_ids(tok) and c.depth_num_key_value_heads == 2
    assert c.depth_num_layers == 1 and c.rope_parameters["rope_type"] == "llama3"
    assert tok.pad_token_id == c.pad_token_id == tok.eos_token_id  # Llama-3 has no unk: pad with eos (masked)
    ours = model.state_dict()
    base = LlamaForCausalLM.from_pretrained(llama3_dir).state_dict()
    assert all(torch.equal(v, ours[k]) for k, v in base.items())
    assert c.tokenizer_fingerprint == unitok.fingerprint()  # saved with the model: stage 2 checks its codes too
    with pytest.raises(ValueError, match=r"code shards were extracted by tokenizer 0{16} \(their manifest.json\) "
                                         r"but --tokenizer .*unitok \(--tokenizer-attn-mode full\) is tokenizer"):
        build_model(cfg, {"zero_optimization": {"stage": 2}, "bf16": {"enabled": False}},
                    logging.getLogger(__name__), codes_tokenizer="0" * 16)
    # a folder that lost a shard: the weights it lacks were initialised at random, with an info line
    from safetensors.torch import load_file, save_file

    shutil.copytree(llama3_dir, tmp_path / "cut")
    (weights,) = (tmp_path / "cut").glob("*.safetensors")
    save_file({k: v for k, v in load_file(weights).items() if ".layers.1." not in k}, weights,
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"cut lacks 9 weights of the model, e.g. \['model.layers.1."):
        build_model(SimpleNamespace(**{**vars(cfg), "llama_dir": str(tmp_path / "cut")}),
                    {"zero_optimization": {"stage": 2}, "bf16": {"enabled": False}}, logging.getLogger(__name__))
    # a base with PyTorch .bin shards only (lmsys/vicuna-7b-v1.5): refused once the model was built ("no
    # safetensors weights"), although the README takes any Llama-architecture folder
    bins = tmp_path / "bins"
    shutil.copytree(llama3_dir, bins, ignore=shutil.ignore_patterns("*.safetensors"))
    names = sorted(base)  # the layout older transformers wrote (transformers 5 writes safetensors only)
    shards = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for file, keys in shards.items():
        torch.save({k: base[k] for k in keys}, bins / file)
    (bins / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {k: f for f, ks in shards.items()
                                                                                 for k in ks}}))
    model, _ = build_model(SimpleNamespace(**{**vars(cfg), "llama_dir": str(bins)}),
                           {"zero_optimization": {"stage": 2}, "bf16": {"enabled": False}}, logging.getLogger(__name__))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in base.items())
    # ZeRO-2 in bf16 (the GPU default): bf16 parameters, the rotary frequencies fp32 and exact (cast with the
    # model, a run trained on angles 0.6 rad off at position 512 and was served exact ones by the engine)
    model, _ = build_model(cfg, {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}},
                           logging.getLogger(__name__))
    rope, ref = model.model.rotary_emb, LlamaForCausalLM.from_pretrained(llama3_dir).model.rotary_emb
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert rope.inv_freq.dtype == torch.float32 and torch.equal(rope.inv_freq, ref.inv_freq)


def test_image_marker_ids_per_tokenizer(tmp_path, llama3_dir):
    sp = AutoTokenizer.from_pretrained(make_llama_tokenizer(tmp_path / "sp"))
    assert T.image_marker_ids(sp) == (3, 4)  # Llama-2 / Mistral byte pieces: the release's ids
    l3 = AutoTokenizer.from_pretrained(llama3_dir)
    boi, eoi = T.image_marker_ids(l3)
    assert l3.convert_ids_to_tokens([boi, eoi]) == ["<|reserved_special_token_0|>", "<|reserved_special_token_1|>"]
    assert l3.decode([5, boi, 6, eoi], skip_special_tokens=True) == l3.decode([5, 6])  # hidden from answers
    neither = byte_level_tokenizer(tmp_path / "plain_bpe", reserved=0)
    with pytest.raises(ValueError, match=r"plain_bpe.*<0x00> / <0x01>.*reserved_special_token"):
        T.image_marker_ids(neither)


def test_conversation_turns_end_with_the_tokenizers_eos(tmp_path, llama3_dir):
    """vicuna_v1's "</s>" is Llama-2's eos; a Llama-3 tokenizer ends supervised turns with its own eos id."""
    conv = [{"from": "human", "value": "The quick brown fox?"}, {"from": "gpt", "value": "Generate an image."}]
    for tok in (AutoTokenizer.from_pretrained(llama3_dir),
                AutoTokenizer.from_pretrained(make_llama_tokenizer(tmp_path / "sp"))):
        sample = T.conversation_sample(tok, conv)
        supervised = [t for t in sample.labels if t != T.IGNORE_INDEX]
        assert supervised[-1] == tok.eos_token_id and sample.input_ids.count(tok.eos_token_id) == 1
        assert "</s>" not in tok.decode(sample.input_ids, skip_special_tokens=True)
        # a chat prompt's earlier turns end the same way as training's
        prompt = T.chat_prompt(tok, [conv[0]["value"], conv[1]["value"], "And then?"])
        assert prompt.input_ids.count(tok.eos_token_id) == 1


def test_other_architectures_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"model_type 'gpt2' is not a supported Llama-architecture base"):
        config_from_base(tmp_path)
    with pytest.raises(FileNotFoundError, match="no Llama config.json"):
        config_from_base(tmp_path / "nowhere")
