"""A tiny UniMLLM config that matches the debug tokenizer preset (K=4, V=64, d=4, width 32, 2 heads)."""
from mllm import UniMLLMConfig


def tiny_config(**overrides) -> UniMLLMConfig:
    """Two Llama layers of width 64 and a 2-layer depth head."""
    kw = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, num_codebooks=4, codebook_size=64, code_dim=4,
              embed_width=32, embed_num_heads=2, depth_num_layers=2, pad_token_id=0, bos_token_id=1,
              eos_token_id=2, attn_implementation="sdpa")
    kw.update(overrides)
    return UniMLLMConfig(**kw)
