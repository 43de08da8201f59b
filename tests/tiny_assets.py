"""Test-side alias of mllm.data.tiny_tokenizer (the tiny offline sentencepiece tokenizer)."""
from mllm.data.tiny_tokenizer import VOCAB_SIZE, load_llama_tokenizer, make_llama_tokenizer  # noqa: F401
