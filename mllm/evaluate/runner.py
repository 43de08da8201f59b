"""Understanding benchmarks: questions -> batched greedy answers -> gathered predictions -> scores.

Inference per question follows REFERENCE.md 6.10: the image is padded to a square with
(122, 116, 104), resized, encoded by the UniTok tokenizer; the prompt is vicuna_v1 with
"<image>\\n" + question (+ the short-answer instruction); decoding is greedy with the KV-cached
`mllm.generate.answer`, left-padded batches of --batch-size (the release runs batch 1; batching with
left padding and per-row position ids gives the same greedy answers), `skip_special_tokens`.
Multi-rank: under torchrun/deepspeed (RANK/WORLD_SIZE set) rank r answers questions r, r+W, ... of those
not yet answered; the rows are gathered to rank 0 (`all_gather_object`), which alone writes the predictions,
then scores and writes the results.

Nothing is lost to a crash: with an output folder, each rank appends its answers to OUT/partial/rankNNNNN.jsonl
batch by batch, and a rerun with the same model and settings answers only the questions missing there
(OUT/partial/run.json holds those settings; a rerun with others is refused). OUT/partial goes once
OUT/predictions.jsonl is written.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
        if self.batch_size < 1 or self.max_new_tokens < 1 or self.log_every < 1:
            raise ValueError("batch_size, max_new_tokens and log_every must be >= 1")
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
                     world: int = 1, done: set[int] = frozenset(), journal: Path | None = None) -> list[dict]:
    """This rank's share of the `questions` whose index is not in `done` -> rows {"index", "question_id",
    "category", "prompt", "answer"}; with `journal`, each batch's rows are appended to it as they come."""
    from mllm.generate import SamplingConfig

    mine = [(i, q) for i, q in enumerate(questions) if i not in done][rank::world]
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
        new = [{"index": idx, "question_id": q.qid, "category": q.category, "prompt": q.prompt, "answer": a}
               for (idx, q), a in zip(batch, answers)]
        if journal is not None:
            with open(journal, "a") as f:
                f.write("".join(json.dumps(r) + "\n" for r in new))
        rows += new
        if rank == 0 and (b + 1) % cfg.log_every == 0:
            print(f"[eval] rank 0: {len(rows)}/{len(mine)} questions, {time.time() - start:.0f}s", file=sys.stderr,
                  flush=True)
    return rows


def read_partial(folder: Path, questions: list[Question], settings: dict[str, Any]) -> dict[int, dict]:
    """Rows of an interrupted run from folder/rank*.jsonl ({index: row}); a line cut short by a kill, or one
    that answers another question at its index, is ignored (answered again). ValueError when folder/run.json
    holds other settings; a new folder gets this run's."""
    from runtime.run import write_json_atomic

    meta = folder / "run.json"
    if meta.is_file():
        was = json.loads(meta.read_text())
        if was != settings:
            diff = [f"{k}: {was.get(k)!r} -> {settings.get(k)!r}" for k in sorted(set(was) | set(settings))
                    if was.get(k) != settings.get(k)]
            raise ValueError(f"{folder} holds the answers of an interrupted run with other settings ({'; '.join(diff)}):"
                             f" rerun with those to continue it, or remove {folder} (or choose another --out) to start "
                             "over")
    else:
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(meta, settings)
    rows: dict[int, dict] = {}
    for f in sorted(folder.glob("rank*.jsonl")):
        for line in f.read_text().splitlines():
            try:
                r = json.loads(line)
                q = questions[r["index"]]
            except (ValueError, KeyError, TypeError, IndexError):
                continue
            if r.get("question_id") == q.qid and r.get("prompt") == q.prompt and isinstance(r.get("answer"), str):
                rows[r["index"]] = r
    return rows


def _journal(folder: Path, rank: int) -> Path:
    """This rank's answer file, ending with a newline (a kill may have cut its last line short)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"rank{rank:05d}.jsonl"
    if path.is_file() and path.stat().st_size:
        with open(path, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
    return path


def run_benchmark(engine, bench: Benchmark, cfg: InferenceConfig, out: str | Path | None = None,
                  settings: dict[str, Any] | None = None) -> tuple[list[dict], dict | None] | None:
    """Answer (sharded), gather and score. Returns (rows in question order, metrics or None) on rank 0,
    None on other ranks. With `out`, answers are kept in OUT/partial as they come and a rerun continues them
    (`settings`, e.g. the model, must then be the same: the module docstring), and rank 0 writes
    OUT/predictions.jsonl before scoring, so that a scoring error does not lose them either."""
    import torch.distributed as dist

    rank, world = dist_info()
    questions = bench.first(cfg.limit)
    if not questions:
        raise ValueError(f"{bench.name}: no questions")
    # every rank checks every file, so a broken local copy fails on all ranks instead of hanging the gather
    missing = [q.image for q in questions if not q.image.is_file()]
    if missing:
        raise FileNotFoundError(f"{bench.name}: {len(missing)} image(s) not found, e.g. {missing[0]}")
    earlier: dict[int, dict] = {}
    journal = None
    if out is not None:
        folder = Path(out) / "partial"
        settings = {"benchmark": bench.name, "max_new_tokens": cfg.max_new_tokens, **(settings or {})}
        verdict: list[Any] = [None]
        if rank == 0:
            try:
                earlier = read_partial(folder, questions, settings)
                verdict = [sorted(earlier)]
            except ValueError as e:
                verdict = [str(e)]
        if world > 1:  # rank 0 alone reads the files, so every rank splits the same remaining questions
            dist.broadcast_object_list(verdict, src=0)
        if isinstance(verdict[0], str):
            raise ValueError(verdict[0])
        done = set(verdict[0])
        if rank == 0 and done:
            print(f"[eval] {len(done)} of {len(questions)} questions answered by an earlier run ({folder}); answering "
                  f"the other {len(questions) - len(done)}", file=sys.stderr, flush=True)
        journal = _journal(folder, rank)
    else:
        done = set()
    rows = gather_rows(answer_questions(engine, questions, cfg, rank, world, done, journal))
    if rows is None:
        return None
    rows = sorted([*earlier.values(), *rows], key=lambda r: r["index"])
    for r in rows:
        r.pop("index")
    if out is not None:
        write_predictions(out, rows)
        shutil.rmtree(Path(out) / "partial", ignore_errors=True)
    if bench.score is None:
        return rows, None
    return rows, bench.score({r["question_id"]: r["answer"] for r in rows}, [q.qid for q in questions])
