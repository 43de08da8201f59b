"""UniTok, stage one: the unified visual tokenizer (codes for generation, features for understanding)."""
from unitok.config import UniTokConfig, preset
from unitok.loading import load_tokenizer
from unitok.models.unitok import UniTok

__all__ = ["UniTok", "UniTokConfig", "load_tokenizer", "preset"]
