"""Official `unitok_mllm` layout (REFERENCE.md 7), checked at Llama-2-7B shapes on the meta device."""
import json

import pytest
import torch
from safetensors.torch import save_file

from mllm import UniMLLMForCausalLM
from mllm.modeling.official import check_keys, config_from_official, expected_keys, load_official_mllm
from mllm_tiny import tiny_config

LLAMA2_7B = {"model_type": "mini_gemini", "architectures": ["MiniGeminiLlamaForCausalLM"], "vocab_size": 32000,
             "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 32, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
             "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "pretraining_tp": 1, "use_cache": True,
             "tokenizer_model_max_length": 2048, "tokenizer_padding_side": "right", "mm_use_im_start_end": False,
             "mm_use_im_patch_token": False}


def official_table(layers=32, H=4096, I=11008, V=32000, K=8, cb=4096, d=8, E=1024, depth=3):
    """The key/shape table of REFERENCE.md 7, written out independently of the model code."""
    t = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,), "lm_head.weight": (V, H)}

    def llama_layer(p):
        for n in "qkvo":
            t[f"{p}.self_attn.{n}_proj.weight"] = (H, H)
        t[f"{p}.mlp.gate_proj.weight"] = t[f"{p}.mlp.up_proj.weight"] = (I, H)
        t[f"{p}.mlp.down_proj.weight"] = (H, I)
        t[f"{p}.input_layernorm.weight"] = t[f"{p}.post_attention_layernorm.weight"] = (H,)

    for i in range(layers):
        llama_layer(f"model.layers.{i}")
    e = "model.multi_embedder"
    for j in range(K):
        t[f"{e}.quantizer.codebooks.{j}.codebook.weight"] = (cb, d)
        t[f"{e}.quantizer.codebooks.{j}.vocab_usage"] = (cb,)
    a = f"{e}.attn_projection"
    C = K * d
    for n in ("norm1", "norm3"):
        t[f"{a}.{n}.weight"] = t[f"{a}.{n}.bias"] = (C,)
    t[f"{a}.proj.weight"], t[f"{a}.proj.bias"] = (E, C), (E,)
    t[f"{a}.attn.qkv.weight"] = (3 * E, C)
    for n in ("q_bias", "v_bias", "zero_k_bias"):
        t[f"{a}.attn.{n}"] = (E,)
    t[f"{a}.attn.proj.weight"], t[f"{a}.attn.proj.bias"] = (E, E), (E,)
    for n in ("norm2", "mlp.norm"):
        t[f"{a}.{n}.weight"] = t[f"{a}.{n}.bias"] = (E,)
    t[f"{a}.mlp.w0.weight"] = t[f"{a}.mlp.w1.weight"] = (2 * E, E)
    t[f"{a}.mlp.w0.bias"] = t[f"{a}.mlp.w1.bias"] = (2 * E,)
    t[f"{a}.mlp.w2.weight"], t[f"{a}.mlp.w2.bias"] = (E, 2 * E), (E,)
    t[f"{e}.mm_projector.0.weight"] = t[f"{e}.mm_projector.0.bias"] = (E,)
    t[f"{e}.mm_projector.1.weight"], t[f"{e}.mm_projector.1.bias"] = (H, E), (H,)
    t[f"{e}.mm_projector.3.weight"], t[f"{e}.mm_projector.3.bias"] = (H, H), (H,)
    for i in range(depth):
        llama_layer(f"ar_head.layers.{i}")
    t["ar_head.norm.weight"] = (H,)
    t["ar_head.linear_head.weight"], t["ar_head.linear_head.bias"] = (cb, H), (cb,)
    for j in range(K - 1):
        t[f"ar_head.codebooks.{j}.weight"] = (cb, H)
    return t


def test_llama2_7b_official_keys_map_completely_on_meta():
    config = config_from_official(LLAMA2_7B)
    with torch.device("meta"):
        model = UniMLLMForCausalLM(config)
    ours = expected_keys(model)
    theirs = official_table()
    check_keys(ours, theirs)  # raises on any unknown, missing or mis-shaped key
    assert set(ours) == set(theirs)
    n = sum(p.numel() for p in model.parameters())
    assert 7.4e9 < n < 7.6e9  # ~6.74B Llama + ~0.77B embedder/depth head (REFERENCE.md 6.1)


def test_check_keys_names_the_problem():
    with pytest.raises(ValueError, match="unknown .*extra"):
        check_keys({"a": (1,)}, {"a": (1,), "extra": (2,)})
    with pytest.raises(ValueError, match="missing .*'a'"):
        check_keys({"a": (1,)}, {})
    with pytest.raises(ValueError, match="shape mismatch .*'a'"):
        check_keys({"a": (1,)}, {"a": (2,)})
    with pytest.raises(ValueError, match="vision tower"):
        config_from_official({**LLAMA2_7B, "mm_vision_tower": "clip"})


def test_official_folder_loads_and_matches(tmp_path):
    torch.manual_seed(0)
    model = UniMLLMForCausalLM(tiny_config()).eval()
    cfg = {k: v for k, v in LLAMA2_7B.items()}
    c = model.config
    cfg.update(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
               num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
               num_key_value_heads=c.num_key_value_heads, rms_norm_eps=c.rms_norm_eps)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    # the release shards its weights with an index file
    keys = sorted(state)
    half = len(keys) // 2
    save_file({k: state[k] for k in keys[:half]}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({k: state[k] for k in keys[half:]}, str(tmp_path / "model-00002-of-00002.safetensors"))
    weight_map = {k: ("model-00001-of-00002.safetensors" if i < half else "model-00002-of-00002.safetensors")
                  for i, k in enumerate(keys)}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    # tiny shapes differ from the release defaults: patch the embedder/depth shapes through the config
    import mllm.modeling.official as off
    orig = off.config_from_official
    off_cfg = lambda d: type(c)(**{**orig(d).to_dict(), **{k: getattr(c, k) for k in (  # noqa: E731
        "num_codebooks", "codebook_size", "code_dim", "embed_width", "embed_num_heads", "depth_num_layers",
        "depth_hidden_size", "depth_num_heads", "depth_intermediate_size")}})
    off.config_from_official = off_cfg
    out, llama = tmp_path / "imported", tmp_path / "Llama-2-7b-hf"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (llama / "model-00001-of-00002.safetensors").write_bytes(b"weights")
    try:
        loaded = load_official_mllm(tmp_path)
        # the import command into an existing model folder (or the release itself) replaced its files and left a
        # hybrid; into a new folder it writes the release's bf16 (it wrote fp32: twice the size)
        for bad, message in ((llama, "not an earlier export"), (tmp_path, "would delete")):
            with pytest.raises((FileExistsError, ValueError), match=message):
                off.main([str(tmp_path), str(bad)])
        assert sorted(p.name for p in llama.iterdir()) == ["config.json", "model-00001-of-00002.safetensors"]
        for _ in range(2):  # an earlier import is replaced
            off.main([str(tmp_path), str(out)])
    finally:
        off.config_from_official = orig
    ids = torch.randint(5, 300, (1, 7))
    assert torch.allclose(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-6)
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(out)
    assert next(again.parameters()).dtype == torch.bfloat16 and not out.with_name("imported.tmp").exists()
    assert torch.allclose(again(input_ids=ids).logits.float(), model(input_ids=ids).logits, atol=0.1)


def test_export_replaces_only_an_earlier_export(tmp_path):
    """mllm.export took any folder with a config.json for an earlier export and deleted it: the Llama base or
    the released folder given as --out was gone."""
    from mllm.export import check_out_dir, replace_dir

    base = tmp_path / "Llama-2-7b-hf"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(FileExistsError, match=r"Llama-2-7b-hf exists and it is not an earlier export"):
        check_out_dir(base, [])
    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text(json.dumps({"model_type": "unitok_mllm"}))
    for name in ("model-00001-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.model"):
        (export / name).touch()
    check_out_dir(export, [])  # an earlier export: replaced
    (export / "pytorch_model.bin").touch()
    with pytest.raises(FileExistsError, match=r"it also holds \['pytorch_model.bin'\]"):
        check_out_dir(export, [])
    with pytest.raises(ValueError, match="would delete"):
        check_out_dir(tmp_path, [tmp_path / "run" / "step-00000010"])
    check_out_dir(tmp_path / "new", [])
    new = tmp_path / "export.tmp"
    new.mkdir()
    (new / "config.json").write_text("{}")
    replace_dir(new, export)
    assert [p.name for p in export.iterdir()] == ["config.json"] and not new.exists()
    assert not export.with_name("export.old").exists()
