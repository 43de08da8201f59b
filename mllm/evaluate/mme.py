"""MME: perception and cognition scores with the acc+ rule.

Rules (the official MME eval_tool `calculation.py`, as LLaVA runs it):
  answer -> label: lower-case; "yes"/"no" as is; otherwise "yes" if "yes" occurs in the first four
    characters, else "no" if "no" does, else "other" (always wrong);
  per subtask: acc = correct questions / questions; acc+ = images with BOTH questions right / images;
    score = 100 * acc + 100 * acc+ (max 200);
  perception = sum over existence, count, position, color, posters, celebrity, scene, landmark,
    artwork, OCR (max 2000); cognition = sum over commonsense_reasoning, numerical_calculation,
    text_translation, code_reasoning (max 800). Subtasks missing from a local copy are left out of the
    sums (and listed), so partial runs are visible as such. --limit N answers the first N questions and
    the other question of the last image (acc+ needs both).

Prompts: MME's question without its trailing "Please answer yes or no." plus the short-answer suffix, as in
LLaVA's llava_mme.jsonl (with --prompt-suffix "" the question is MME's own).

Files: images = the official MME_Benchmark_release_version/ folder. Per subtask folder either
  <task>/images/<name>.{jpg,png} + <task>/questions_answers_YN/<name>.txt, or
  <task>/<name>.{jpg,png} + <task>/<name>.txt; each .txt holds two lines "question<TAB>Yes|No".

LLaVA's answers (`--predictions`, recognised when no id is this runner's "<task>/<name>#<i>"): model_vqa_loader
writes lines {"question_id", "prompt", "text", ...} with llava_mme.jsonl's ids "<task>/[images/]<name>", which an
image's two questions share; as in LLaVA's convert_answer_to_mme.py, the prompt tells them apart.
"""
from __future__ import annotations

import re
from pathlib import Path

from mllm.evaluate.common import (DEFAULT_SUFFIX, Benchmark, Question, count_missing, fields_of, question_key,
                                  with_suffix)

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
              "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".JPG", ".PNG")


def mme_question(question: str, suffix: str) -> str:
    """The question as LLaVA's llava_mme.jsonl puts it: with the short-answer suffix, MME's own trailing
    "Please answer yes or no." is dropped (lmms-eval does the same); without one, the question is MME's."""
    return re.sub(r"\s*Please answer yes or no\.\s*$", "", question) if suffix else question


def parse_mme(text: str) -> str:
    """Official MME answer parser -> "yes" | "no" | "other"."""
    t = text.lower()
    if t in ("yes", "no"):
        return t
    head = t[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def subtask_score(items: list[tuple[str, str, str]]) -> dict:
    """items = [(image key, gold yes/no, prediction text)] of one subtask -> acc, acc+, score."""
    per_image: dict[str, list[bool]] = {}
    for image, gold, pred in items:
        per_image.setdefault(image, []).append(parse_mme(pred) == gold)
    for image, oks in per_image.items():
        if len(oks) != 2:
            raise ValueError(f"MME image {image} has {len(oks)} questions; every image has exactly two")
    n_q = sum(len(v) for v in per_image.values())
    acc = sum(sum(v) for v in per_image.values()) / n_q
    acc_plus = sum(all(v) for v in per_image.values()) / len(per_image)
    return {"acc": 100.0 * acc, "acc_plus": 100.0 * acc_plus, "score": 100.0 * acc + 100.0 * acc_plus,
            "num_images": len(per_image)}


def score_mme(preds: dict[str, str], gold: dict[str, tuple[str, str, str]]) -> dict:
    """Per-subtask scores and the two sums over the questions of `gold` ({qid: (subtask, image key, "yes"|"no")});
    a missing prediction is wrong (parsed as "other")."""
    missing = count_missing(preds, gold)
    by_task: dict[str, list[tuple[str, str, str]]] = {}
    for qid, (task, image, label) in gold.items():
        by_task.setdefault(task, []).append((image, label, preds.get(qid, "")))
    unknown = sorted(set(by_task) - set(PERCEPTION) - set(COGNITION))
    if unknown:
        raise ValueError(f"unknown MME subtasks {unknown}")
    tasks = {t: subtask_score(v) for t, v in by_task.items()}
    out = {"perception": sum(tasks[t]["score"] for t in PERCEPTION if t in tasks),
           "cognition": sum(tasks[t]["score"] for t in COGNITION if t in tasks)}
    out["total"] = out["perception"] + out["cognition"]
    out["num_questions"] = len(gold)
    out["num_missing"] = missing
    out["missing_subtasks"] = [t for t in PERCEPTION + COGNITION if t not in tasks]
    out["subtasks"] = {t: tasks[t] for t in PERCEPTION + COGNITION if t in tasks}
    return out


def _pairs(task_dir: Path) -> list[tuple[Path, Path]]:
    """(image, txt) pairs of one subtask folder, either layout."""
    if (task_dir / "questions_answers_YN").is_dir():
        img_dir, txt_dir = task_dir / "images", task_dir / "questions_answers_YN"
    else:
        img_dir = txt_dir = task_dir
    pairs = []
    for txt in sorted(txt_dir.glob("*.txt")):
        image = next((img_dir / (txt.stem + e) for e in IMAGE_EXTS if (img_dir / (txt.stem + e)).is_file()), None)
        if image is None:
            raise FileNotFoundError(f"MME: no image for {txt} in {img_dir}")
        pairs.append((image, txt))
    return pairs


def load_mme(root: str | Path, suffix: str) -> Benchmark:
    """MME from the official release folder."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"MME folder not found: {root}")
    qs, gold = [], {}
    for task in PERCEPTION + COGNITION:
        if not (root / task).is_dir():
            continue
        for image, txt in _pairs(root / task):
            lines = [ln for ln in txt.read_text().splitlines() if ln.strip()]
            if len(lines) != 2:  # acc+ scores an image's pair; a half pair would fail only after inference
                raise ValueError(f"{txt}: {len(lines)} question lines; every MME image has exactly two")
            for i, line in enumerate(lines):
                question, _, answer = line.rpartition("\t")
                label = answer.strip().lower()
                if not question or label not in ("yes", "no"):
                    raise ValueError(f"{txt}:{i + 1}: expected 'question<TAB>Yes|No', got {line!r}")
                qid = f"{task}/{image.name}#{i}"
                gold[qid] = (task, image.name, label)
                qs.append(Question(qid, image, with_suffix(mme_question(question, suffix), suffix), task))
    if not qs:
        raise ValueError(f"no MME subtask folders ({', '.join(PERCEPTION + COGNITION)}) under {root}")
    return Benchmark("mme", qs, score=lambda preds, qids: score_mme(preds, {q: gold[q] for q in qids}),
                     group=lambda q: q.qid.rpartition("#")[0])  # --limit keeps both questions of an image


def _llava_key(subtask: str, image: str, question: str) -> tuple[str, str, str]:
    """(subtask, image stem, question without either answer instruction): how LLaVA's answer and this runner's
    question meet (convert_answer_to_mme.py finds the ground truth by subtask, <stem>.txt and question)."""
    return subtask, Path(image).stem, mme_question(question_key(question), DEFAULT_SUFFIX)


def from_llava(rows: list[dict], answers: str | Path, questions: list[Question]) -> dict[str, str]:
    """LLaVA's MME answers `rows` (read from `answers`) -> {"<task>/<name>#<i>": answer} for `questions`; an
    answer that matches none of them is an error naming the file (never every question silently missing)."""
    index: dict[tuple[str, str, str], str] = {}
    for q in questions:
        key = _llava_key(q.category, q.image.name, q.prompt)
        if key in index:
            raise ValueError(f"MME {q.image}: its two questions read alike; LLaVA's answers cannot tell them apart")
        index[key] = q.qid
    preds, unmatched = {}, []
    with fields_of(answers, "this runner's predictions.jsonl or LLaVA's MME answers JSON lines {'question_id': "
                            "'<subtask>/<image>', 'prompt', 'text'}"):
        for r in rows:
            lid = str(r["question_id"])
            qid = index.get(_llava_key(lid.split("/")[0], lid, r["prompt"]))
            if qid is None:
                unmatched.append(lid)
            else:
                preds[qid] = r["text"]
    if unmatched:
        raise ValueError(f"{answers}: {len(unmatched)} of its {len(rows)} answers match no question of the MME "
                         f"folder by subtask, image and prompt (e.g. question_id {unmatched[0]!r}); ids are this "
                         "runner's '<subtask>/<image>#<i>' or LLaVA's llava_mme.jsonl '<subtask>/<image>'")
    return preds
