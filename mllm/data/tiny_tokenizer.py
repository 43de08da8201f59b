"""A tiny Llama-style sentencepiece tokenizer trained offline in milliseconds (tests and the demo).

`make_llama_tokenizer(dir)` writes a folder that loads with `transformers.LlamaTokenizer.from_pretrained`
and `AutoTokenizer.from_pretrained`. Its id layout matches Llama-2 where this project relies on it:
    0 <unk>, 1 <s> (bos), 2 </s> (eos), 3..258 the byte pieces <0x00>..<0xFF>, then BPE merges.
So boi = 3 = <0x00> and eoi = 4 = <0x01>, exactly as in the released model (REFERENCE 6.6).
pad: sentencepiece has no pad piece (pad_id=-1, as Llama); the saved folder sets
`pad_token = <unk>` so `tokenizer.pad_token_id == 0`, the release's "pad = unk = 0" convention.

The model is deterministic (fixed corpus, one thread). `extra_corpus` adds domain text (the demo's).
"""
from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

VOCAB_SIZE = 512
"""Pieces in the tiny model: 3 specials + 256 bytes + characters + merges (transformers model vocab >= this)."""

_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
           "helpful, detailed, and polite answers to the user's questions.")
_CORPUS = [
    _SYSTEM,
    "USER: What shape is in the image? ASSISTANT: A circle.",
    "USER: What color is the shape? ASSISTANT: The square is red.",
    "USER: What is the background color? ASSISTANT: The background is blue.",
    "a red circle on a blue background", "a green square on a white background",
    "a yellow triangle on a black background", "a purple circle on a gray background",
    "an orange square on a pink background", "a cyan triangle on a brown background",
    "Generate an image based on this description.", "<unconditional>",
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "Pack my box with five dozen liquor jugs! How vexingly quick daft zebras jump?",
    "Shapes have sides: a triangle has three, a square has four, and a circle has none.",
    "Colors mix: red and blue make purple; yellow and blue make green.",
    "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG (1, 2, 3) [a-z] {x: y} #@%&*+=/\\|~`^_<>;'\"",
]


def _train_model_bytes(vocab_size: int, extra_corpus: tuple[str, ...] = ()) -> bytes:
    import sentencepiece as spm

    buf = io.BytesIO()
    # Llama-2's normaliser settings (identity, keep whitespace, dummy prefix, split digits, byte
    # fallback), so the HF conversion and sentencepiece agree piece for piece.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS * 8 + list(extra_corpus)), model_writer=buf, model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
        num_threads=1, hard_vocab_limit=False, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, add_dummy_prefix=True,
        minloglevel=2)
    return buf.getvalue()


def make_llama_tokenizer(directory: str | os.PathLike, vocab_size: int = VOCAB_SIZE,
                         extra_corpus: tuple[str, ...] = ()) -> str:
    """Train the tiny BPE model and save a HF Llama tokenizer folder in `directory`; returns its path.

    The folder holds tokenizer.model (the sentencepiece file), tokenizer.json and tokenizer_config.json.
    """
    from transformers import LlamaTokenizer

    directory = Path(directory)
    raw = directory / "sentencepiece"
    raw.mkdir(parents=True, exist_ok=True)
    (raw / "tokenizer.model").write_bytes(_train_model_bytes(vocab_size, tuple(extra_corpus)))
    # transformers 5 ignores LlamaTokenizer(vocab_file=...); from_pretrained on a folder converts it.
    tok = LlamaTokenizer.from_pretrained(str(raw), add_bos_token=True)
    tok.pad_token = tok.unk_token
    tok.save_pretrained(str(directory))
    shutil.copy(raw / "tokenizer.model", directory / "tokenizer.model")
    shutil.rmtree(raw)
    ids = tok.convert_tokens_to_ids(["<unk>", "<s>", "</s>", "<0x00>", "<0x01>", "<0xFF>"])
    if ids != [0, 1, 2, 3, 4, 258]:  # byte pieces must sit right after the three specials (boi 3, eoi 4)
        raise RuntimeError(f"unexpected special/byte ids {ids}")
    return str(directory)


def load_llama_tokenizer(directory: str | os.PathLike):
    """Load a folder written by `make_llama_tokenizer` (bos added, pad = unk = 0)."""
    from transformers import LlamaTokenizer

    return LlamaTokenizer.from_pretrained(str(directory), add_bos_token=True)
