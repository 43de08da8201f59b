"""GQA (test-dev balanced): exact-match accuracy after LLaVA's normalisation.

Rule: prediction -> strip -> remove trailing periods -> lower-case (LLaVA's `convert_gqa_for_eval`),
then the official GQA `eval.py` accuracy: correct iff it equals the gold answer string. Only accuracy
is computed; the official script's consistency/validity/plausibility/grounding need the scene-graph
and choices files and are not reproduced.

Files: annotations = the official testdev_balanced_questions.json ({qid: {"imageId", "question",
"answer", ...}}); images = GQA images/ (<imageId>.jpg); questions = optional LLaVA JSONL
(llava_gqa_testdev_balanced.jsonl: {"question_id", "image", "text"}); without it the questions come
from the annotation file.
"""
from __future__ import annotations

from pathlib import Path

from mllm.evaluate.common import Benchmark, Question, count_missing, fields_of, read_json_or_jsonl, with_suffix


def normalize_gqa(text: str) -> str:
    """LLaVA's GQA answer clean-up: strip, drop trailing periods, lower-case."""
    return text.strip().rstrip(".").lower()


def score_gqa(preds: dict[str, str], gold: dict[str, str]) -> dict:
    """Accuracy in percent over the questions of `gold` ({qid: answer string}); a missing prediction is wrong."""
    missing = count_missing(preds, gold)
    correct = sum(qid in preds and normalize_gqa(preds[qid]) == ans.strip().lower() for qid, ans in gold.items())
    return {"accuracy": 100.0 * correct / max(len(gold), 1), "num_questions": len(gold), "num_missing": missing}


def load_gqa(annotations: str | Path, images: str | Path, questions: str | Path | None, suffix: str) -> Benchmark:
    """GQA from the official question/answer JSON (+ optional LLaVA question JSONL)."""
    images = Path(images)
    ann = read_json_or_jsonl(Path(annotations))
    if not isinstance(ann, dict) or not all(isinstance(v, dict) and "answer" in v for v in list(ann.values())[:5]):
        raise ValueError(f"{annotations}: expected testdev_balanced_questions.json ({{qid: {{..., 'answer'}}}})")
    with fields_of(annotations, "testdev_balanced_questions.json ({qid: {'imageId', 'question', 'answer'}})"):
        gold = {str(k): str(v["answer"]) for k, v in ann.items()}
        if questions is None:
            qs = [Question(str(k), images / f"{v['imageId']}.jpg", with_suffix(v["question"], suffix))
                  for k, v in ann.items()]
    if questions is not None:
        rows = read_json_or_jsonl(Path(questions), records=True)
        with fields_of(questions, "LLaVA question JSON lines {'question_id', 'image', 'text'}"):
            qs = [Question(str(r["question_id"]), images / r["image"],
                           with_suffix(r.get("text", r.get("question", "")), suffix)) for r in rows]
    missing = [q.qid for q in qs if q.qid not in gold]
    if missing:
        raise ValueError(f"{len(missing)} questions have no answer in {annotations} (e.g. {missing[:3]})")
    return Benchmark("gqa", qs, score=lambda preds, qids: score_gqa(preds, {q: gold[q] for q in qids}))
