"""Shared pieces of the MLLM evaluation: question records, benchmark bundles, file reading, results.

Results (rank 0 only): OUT/results.json {"task", "metrics", "config", "git_sha", "num_predictions"} and
OUT/results.md (a markdown table of the scalar metrics); understanding tasks also write
OUT/predictions.jsonl ({"question_id", "category", "prompt", "answer"} per question).
"""
from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from runtime.run import write_text_atomic

DEFAULT_SUFFIX = "\nAnswer the question using a single word or phrase."
"""LLaVA-1.5's short-answer instruction (its VQAv2/GQA/TextVQA/POPE/MME question files carry it)."""


@dataclass
class Question:
    """One benchmark question as put to the model."""

    qid: str
    """Unique id within the benchmark (string; category-prefixed where ids repeat across files)."""
    image: Path
    """Image file."""
    prompt: str
    """Text of the user turn (instruction suffix included); "<image>\\n" is prepended by the template."""
    category: str = ""
    """Split/subtask (POPE category, MME subtask, ...)."""


@dataclass
class Benchmark:
    """Questions plus how to score predictions for them."""

    name: str
    questions: list[Question]
    score: Callable[[dict[str, str], list[str]], dict] | None
    """(predictions {qid: answer}, ids of the questions scored) -> metrics, over those questions: one without a
    prediction counts as wrong (and as `num_missing`); None when no annotations are available (test splits)."""
    submission: Callable[[dict[str, str]], Any] | None = None
    """predictions -> the official server's result file content (written as OUT/<name>_submission.json)."""
    group: Callable[[Question], str] | None = None
    """Key of the questions scored together (MME: an image's pair); --limit keeps whole groups."""

    def first(self, limit: int | None) -> list[Question]:
        """The questions a run with --limit answers and is scored on: the first `limit`, plus the rest of the
        last one's group (its questions are consecutive), so that no group is cut in half."""
        if not limit or limit >= len(self.questions):
            return self.questions
        n = limit
        if self.group is not None:
            last = self.group(self.questions[n - 1])
            while n < len(self.questions) and self.group(self.questions[n]) == last:
                n += 1
        return self.questions[:n]


def count_missing(preds: dict[str, str], gold: dict) -> int:
    """Questions of `gold` (those scored) without a prediction; a prediction for another question is an error."""
    unknown = next((q for q in preds if q not in gold), None)
    if unknown is not None:
        raise KeyError(f"prediction for question id {unknown}, which is not among the {len(gold)} questions scored "
                       "(another benchmark's file, or one answered without --limit scored with it?)")
    return sum(q not in preds for q in gold)


def read_json_or_jsonl(path: str | Path, records: bool = False) -> Any:
    """A .json document, or a list of JSON lines (also accepted under a .json name, as POPE's files).

    `records=True`: the caller wants a list of records, so a single-line JSONL file (which also parses
    as one JSON object) comes back as a one-element list.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is neither JSON nor JSON lines: {e}") from None
    if records and isinstance(data, dict):
        data = [data]
    if records and not (isinstance(data, list) and all(isinstance(r, dict) for r in data)):
        raise ValueError(f"{path}: expected JSON lines of objects")
    return data


@contextmanager
def fields_of(path: str | Path, expected: str):
    """A record of `path` without a field the parser reads (a KeyError, or a TypeError of a wrong shape) ->
    ValueError naming the file, the field and the format expected (bare 'label' otherwise: cli prints it)."""
    try:
        yield
    except KeyError as e:
        raise ValueError(f"{path}: a record has no {e.args[0]!r} field; expected {expected}") from None
    except TypeError as e:
        raise ValueError(f"{path}: unexpected record shape ({e}); expected {expected}") from None


def with_suffix(question: str, suffix: str) -> str:
    """Append the answer-format instruction unless the question already carries it."""
    question = question.strip()
    if not suffix or suffix.strip() in question:
        return question
    return question + suffix


def question_key(text: str) -> str:
    """A question as matched across files: without LLaVA's short-answer instruction, whitespace collapsed (the text
    of a LLaVA question file is the benchmark's question plus that instruction; this runner's prompt, the same)."""
    return " ".join(text.replace(DEFAULT_SUFFIX.strip(), "").split())


def flatten_metrics(metrics: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested metrics -> [(dotted name, scalar)]."""
    rows = []
    for k, v in metrics.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            rows += flatten_metrics(v, name + ".")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            rows.append((name, v))
    return rows


def markdown_table(task: str, metrics: dict) -> str:
    """| metric | value | table of every scalar."""
    lines = [f"### {task}", "", "| metric | value |", "|---|---|"]
    for k, v in flatten_metrics(metrics):
        lines.append(f"| {k} | {v:.4f} |" if isinstance(v, float) and math.isfinite(v) else f"| {k} | {v} |")
    return "\n".join(lines) + "\n"


def git_sha() -> str:
    """The checkout's commit, or "unknown"."""
    try:
        from runtime.checkpoint import git_sha as sha

        return sha()
    except Exception:  # noqa: BLE001 - informational only
        return "unknown"


def write_predictions(out_dir: str | Path, rows: list[dict]) -> Path:
    """Write OUT/predictions.jsonl; call on rank 0 only, before scoring, so a scoring error keeps the answers."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "predictions.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    return out / "predictions.jsonl"


def write_results(out_dir: str | Path, task: str, metrics: dict, config: dict,
                  predictions: list[dict] | None = None, extra_files: dict[str, Any] | None = None,
                  num_predictions: int | None = None) -> Path:
    """Write results.json + results.md (+ predictions.jsonl, + extra JSON files); call on rank 0 only.

    `num_predictions` is recorded when the predictions were written (or read) elsewhere.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if predictions is not None:
        write_predictions(out, predictions)
        num_predictions = len(predictions)
    for name, content in (extra_files or {}).items():
        write_text_atomic(out / name, json.dumps(content, indent=1))
    doc = {"task": task, "metrics": metrics, "config": config, "git_sha": git_sha(),
           "num_predictions": num_predictions}
    write_text_atomic(out / "results.md", markdown_table(task, metrics))
    write_text_atomic(out / "results.json", json.dumps(doc, indent=2, default=str))
    return out / "results.json"
