"""Understanding benchmarks: questions -> batched greedy answers -> gathered predictions -> scores.

Inference per question follows REFERENCE.md 6.10: the image is padded to a square with
(122, 116, 104), resized, encoded by the UniTok tokenizer; the prompt is vicuna_v1 with
"<image>\\n" + question (+ the short-answer instruction); decoding is greedy with the KV-cached
`mllm.generate.answer`, left-padded batches of --batch-size (the release runs batch 1; batching with
left padding and per-row position ids gives the same greedy answers), `skip_special_tokens`.
Multi-rank: under torchrun/deepspeed (RANK/WORLD_SIZE set) rank r answers questions r, r+W, ...;
the rows are gathered to rank 0 (`all_gather_object`), which alone writes the predictions, then scores
and writes the results.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from mllm.evaluate.common import Benchmark, Question, write_predictions


@dataclass
class InferenceConfig:
    """How questions are answered."""

    batch_size: int = 8
    """Questions per batched generate call."""
    max_new_tokens: int = 128
    """Answer length cap (the release uses 128)."""
    limit: int | None = None
    """Answer (and score) only the first N questions (smoke runs; MME rounds up to whole images)."""
    log_every: int = 10
    """Progress line every N batches (rank 0, stderr)."""

    def __post_init__(self):
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("batch_size and max_new_tokens must be >= 1")
        if self.limit is not None and self.limit < 1:
            raise ValueError("limit must be >= 1")


def dist_info() -> tuple[int, int]:
    """(rank, world); initialises the process group when a launcher started several ranks."""
    from runtime.distributed import get_rank, get_world_size, init_distributed, launcher_env, rank_layout

    if launcher_env()[1] > 1:
        init_distributed()
        layout = rank_layout()
        if get_rank() == 0:
            print(f"ranks: {layout}", file=sys.stderr, flush=True)
    return get_rank(), get_world_size()


def gather_rows(rows: list[dict]) -> list[dict] | None:
    """All ranks' rows on rank 0 (None elsewhere); a no-op alone."""
    import torch.distributed as dist

    from runtime.distributed import get_world_size, is_main_process

    if get_world_size() == 1:
        return rows
    parts: list = [None] * get_world_size()
    dist.all_gather_object(parts, rows)
    return [r for p in parts for r in p] if is_main_process() else None


def answer_questions(engine, questions: list[Question], cfg: InferenceConfig, rank: int = 0,
                     world: int = 1) -> list[dict]:
    """This rank's share of `questions` -> rows {"index", "question_id", "category", "prompt", "answer"}."""
    from mllm.generate import SamplingConfig

    mine = list(enumerate(questions))[rank::world]
    rows: list[dict] = []
    start = time.time()
    for b, i in enumerate(range(0, len(mine), cfg.batch_size)):
        batch = mine[i:i + cfg.batch_size]
        images = []
        for _, q in batch:
            try:
                images.append(engine.open_image(q.image))
            except ValueError as e:  # a broken local copy is a setup error, not a question to skip
                raise FileNotFoundError(f"question {q.qid}: {e}") from None
        codes = engine.encode_images(images)
        prompts = [engine.chat_sample([q.prompt], [c]) for (_, q), c in zip(batch, codes)]
        answers = engine.answer(prompts, cfg.max_new_tokens, SamplingConfig(temperature=0))
        rows += [{"index": idx, "question_id": q.qid, "category": q.category, "prompt": q.prompt, "answer": a}
                 for (idx, q), a in zip(batch, answers)]
        if rank == 0 and (b + 1) % cfg.log_every == 0:
            print(f"[eval] rank 0: {len(rows)}/{len(mine)} questions, {time.time() - start:.0f}s", file=sys.stderr,
                  flush=True)
    return rows


def run_benchmark(engine, bench: Benchmark, cfg: InferenceConfig,
                  out: str | Path | None = None) -> tuple[list[dict], dict | None] | None:
    """Answer (sharded), gather and score. Returns (rows in question order, metrics or None) on rank 0,
    None on other ranks. With `out`, rank 0 writes OUT/predictions.jsonl before scoring, so that a scoring
    error does not lose the answers of a long run."""
    rank, world = dist_info()
    questions = bench.first(cfg.limit)
    if not questions:
        raise ValueError(f"{bench.name}: no questions")
    # every rank checks every file, so a broken local copy fails on all ranks instead of hanging the gather
    missing = [q.image for q in questions if not q.image.is_file()]
    if missing:
        raise FileNotFoundError(f"{bench.name}: {len(missing)} image(s) not found, e.g. {missing[0]}")
    rows = gather_rows(answer_questions(engine, questions, cfg, rank, world))
    if rows is None:
        return None
    rows.sort(key=lambda r: r.pop("index"))
    if out is not None:
        write_predictions(out, rows)
    if bench.score is None:
        return rows, None
    return rows, bench.score({r["question_id"]: r["answer"] for r in rows}, [q.qid for q in questions])
