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

from mllm.evaluate.common import Benchmark, Question, read_json_or_jsonl, with_suffix


def normalize_gqa(text: str) -> str:
    """LLaVA's GQA answer clean-up: strip, drop trailing periods, lower-case."""
    return text.strip().rstrip(".").lower()


def score_gqa(preds: dict[str, str], gold: dict[str, str]) -> dict:
    """Accuracy in percent; `gold[qid]` = the answer string."""
    correct = 0
    for qid, pred in preds.items():
        if qid not in gold:
            raise KeyError(f"prediction for unknown question id {qid}")
        correct += normalize_gqa(pred) == gold[qid].strip().lower()
    return {"accuracy": 100.0 * correct / max(len(preds), 1), "num_questions": len(preds)}


def load_gqa(annotations: str | Path, images: str | Path, questions: str | Path | None, suffix: str) -> Benchmark:
    """GQA from the official question/answer JSON (+ optional LLaVA question JSONL)."""
    images = Path(images)
    ann = read_json_or_jsonl(Path(annotations))
    if not isinstance(ann, dict) or not all(isinstance(v, dict) and "answer" in v for v in list(ann.values())[:5]):
        raise ValueError(f"{annotations}: expected testdev_balanced_questions.json ({{qid: {{..., 'answer'}}}})")
    gold = {str(k): str(v["answer"]) for k, v in ann.items()}
    if questions is not None:
        rows = read_json_or_jsonl(Path(questions), records=True)
        qs = [Question(str(r["question_id"]), images / r["image"], with_suffix(r.get("text", r.get("question", "")),
                                                                                suffix)) for r in rows]
    else:
        qs = [Question(str(k), images / f"{v['imageId']}.jpg", with_suffix(v["question"], suffix))
              for k, v in ann.items()]
    missing = [q.qid for q in qs if q.qid not in gold]
    if missing:
        raise ValueError(f"{len(missing)} questions have no answer in {annotations} (e.g. {missing[:3]})")
    return Benchmark("gqa", qs, score=lambda preds: score_gqa(preds, gold))
