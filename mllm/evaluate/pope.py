"""POPE: yes/no object-hallucination probing; accuracy, precision, recall, F1 and yes-ratio per category.

Rules (LLaVA's `eval_pope.py`):
  answer -> yes/no: keep the text before the first "."; delete commas; split on single spaces;
    "no" if any word is exactly "No", "no" or "not", else "yes" (so "NO" and "Nope" count as yes,
    exactly as LLaVA parses them);
  positive class = "yes"; precision = TP/(TP+FP), recall = TP/(TP+FN), F1 = 2PR/(P+R),
  accuracy = (TP+TN)/N, yes-ratio = #yes predictions / N.
Metrics are reported per category (adversarial, popular, random) and averaged over categories (the
number LLaVA-style papers quote is the mean F1). Deviation: where a denominator is 0 (no "yes"
predictions or no positive labels) the metric is 0 instead of LLaVA's ZeroDivisionError.

Files: questions = one or more of the official coco_pope_<category>.json files (JSON lines with
"question_id", "image", "text", "label"); the category comes from the file name (or a "category"
field). images = COCO val2014. Question ids repeat across categories, so ids are "<category>/<id>".

LLaVA's answers (`--predictions` with `--llava-questions llava_pope_test.jsonl`): model_vqa_loader writes lines
{"question_id", "prompt", "text", ...} whose ids are those of llava_pope_test.jsonl, one file for the three
categories ({"question_id", "image", "text" + short-answer suffix, "category"}, numbered adversarial 1..,
random 10000001.., popular 20000001..). LLaVA's eval_pope.py pairs a category's answers with the lines of
coco_pope_<category>.json by position; here each LLaVA question is matched to a loaded question by category,
image and question text, so a file cut short or merged out of order scores each answer against its own label.
"""
from __future__ import annotations

import re
from pathlib import Path

from mllm.evaluate.common import (Benchmark, Question, count_missing, fields_of, question_key, read_json_or_jsonl,
                                  with_suffix)

MISSING = "missing"
"""The parsed answer of a question without a prediction (neither yes nor no)."""


def parse_yes_no(text: str) -> str:
    """LLaVA's POPE answer parser -> "yes" | "no"."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def binary_metrics(preds: list[str], labels: list[str]) -> dict:
    """preds in {"yes", "no", MISSING}, labels in {"yes", "no"} -> accuracy, precision, recall, f1, yes_ratio
    (fractions) and counts. A missing answer is wrong: in N, and a false negative when the label is yes."""
    if len(preds) != len(labels):
        raise ValueError("preds and labels differ in length")
    tp = sum(p == "yes" and y == "yes" for p, y in zip(preds, labels))
    fp = sum(p == "yes" and y == "no" for p, y in zip(preds, labels))
    tn = sum(p == "no" and y == "no" for p, y in zip(preds, labels))
    fn = sum(p != "yes" and y == "yes" for p, y in zip(preds, labels))
    n = len(preds)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / n if n else 0.0, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": (tp + fp) / n if n else 0.0, "tp": tp, "fp": fp, "tn": tn, "fn": fn, "n": n}


def score_pope(preds: dict[str, str], gold: dict[str, tuple[str, str]]) -> dict:
    """Per-category metrics and their mean over the questions of `gold` ({qid: (category, label)}); a missing
    prediction is wrong."""
    missing = count_missing(preds, gold)
    by_cat: dict[str, tuple[list[str], list[str]]] = {}
    for qid, (cat, label) in gold.items():
        p, y = by_cat.setdefault(cat, ([], []))
        p.append(parse_yes_no(preds[qid]) if qid in preds else MISSING)
        y.append(label)
    cats = {c: binary_metrics(p, y) for c, (p, y) in sorted(by_cat.items())}
    keys = ("accuracy", "precision", "recall", "f1", "yes_ratio")
    mean = {k: 100.0 * sum(m[k] for m in cats.values()) / max(len(cats), 1) for k in keys}
    return {**mean, "num_questions": len(gold), "num_missing": missing,
            "categories": {c: {**{k: 100.0 * m[k] for k in keys}, **{k: m[k] for k in ("tp", "fp", "tn", "fn", "n")}}
                           for c, m in cats.items()}}


def load_pope(question_files: list[str | Path], images: str | Path, suffix: str) -> Benchmark:
    """POPE from coco_pope_<category>.json files."""
    if not question_files:
        raise ValueError("POPE needs --questions coco_pope_<category>.json [...]")
    images = Path(images)
    qs, gold = [], {}
    for f in map(Path, question_files):
        m = re.match(r"coco_pope_(\w+)\.json$", f.name)
        with fields_of(f, "POPE's coco_pope_<category>.json lines {'question_id', 'image', 'text', 'label'} "
                          "(LLaVA's llava_pope_test.jsonl has no labels)"):
            for r in read_json_or_jsonl(f, records=True):
                cat = r.get("category") or (m.group(1) if m else f.stem)
                label = str(r["label"]).strip().lower()
                if label not in ("yes", "no"):
                    raise ValueError(f"{f}: label must be yes or no, got {r['label']!r}")
                qid = f"{cat}/{r['question_id']}"
                if qid in gold:
                    raise ValueError(f"duplicate POPE question {qid}")
                gold[qid] = (cat, label)
                qs.append(Question(qid, images / r["image"], with_suffix(r["text"], suffix), cat))
    return Benchmark("pope", qs, score=lambda preds, qids: score_pope(preds, {q: gold[q] for q in qids}))


def from_llava(rows: list[dict], answers: str | Path, llava_questions: str | Path,
               questions: list[Question]) -> dict[str, str]:
    """LLaVA's answers `rows` (read from `answers`; ids of `llava_questions`) -> {"<category>/<id>": answer} for
    `questions`. An id not in `llava_questions`, or one whose question no loaded coco_pope file holds, is an
    error naming both files (never every question silently scored as missing)."""
    pending: dict[tuple[str, str, str], list[str]] = {}  # a question loaded twice: LLaVA's copies match in order
    for q in questions:
        pending.setdefault((q.category, q.image.name, question_key(q.prompt)), []).append(q.qid)
    ids: dict[str, str | None] = {}  # LLaVA's id -> this runner's (None: in no loaded file)
    category: dict[str, str] = {}
    with fields_of(llava_questions, "LLaVA's llava_pope_test.jsonl lines {'question_id', 'image', 'text', "
                                    "'category'}"):
        for r in read_json_or_jsonl(llava_questions, records=True):
            lid = str(r["question_id"])
            if lid in ids:
                raise ValueError(f"{llava_questions}: question_id {lid} occurs twice")
            same = pending.get((r["category"], Path(r["image"]).name, question_key(r["text"])))
            ids[lid], category[lid] = (same.pop(0) if same else None), r["category"]
    preds, unknown, outside = {}, [], []
    with fields_of(answers, "LLaVA's answers JSON lines {'question_id', 'text'}"):
        for r in rows:
            lid = str(r["question_id"])
            if lid not in ids:
                unknown.append(lid)
            elif ids[lid] is None:
                outside.append(lid)
            else:
                preds[ids[lid]] = r["text"]
    if unknown:
        raise ValueError(f"{answers}: {len(unknown)} of its {len(rows)} question ids (e.g. {unknown[0]}) are not in "
                         f"--llava-questions {llava_questions}: the answers are to another question file")
    if outside:
        cat = category[outside[0]]
        raise ValueError(f"{answers}: {len(outside)} of its {len(rows)} answers are to questions of "
                         f"--llava-questions {llava_questions} that no --questions file holds (e.g. question_id "
                         f"{outside[0]}, category {cat!r}: give coco_pope_{cat}.json)")
    return preds
