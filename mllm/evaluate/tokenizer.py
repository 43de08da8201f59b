"""Tokenizer metrics, re-exported from `unitok.evaluate` so MLLM evaluation has one import point.

    python -m mllm.evaluate --task tokenizer --tokenizer CKPT --images REF_DIR [--inception-weights FILE] ...
forwards every argument after `--task tokenizer` to `python -m unitok.evaluate` (rFID/IS, PSNR/SSIM,
codebook usage and perplexity, zero-shot accuracy; REFERENCE.md 5).
"""
from unitok.evaluate import (check_local_weights, codebook_stats, evaluate_reconstruction, fid_is, format_table,
                             list_images, load_val_image, psnr_ssim, zero_shot)
from unitok.evaluate import main as tokenizer_main
from unitok.evaluate import run as run_tokenizer_eval

__all__ = ["check_local_weights", "codebook_stats", "evaluate_reconstruction", "fid_is", "format_table",
           "list_images", "load_val_image", "psnr_ssim", "run_tokenizer_eval", "tokenizer_main", "zero_shot"]
