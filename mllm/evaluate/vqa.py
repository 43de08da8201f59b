"""VQAv2 and TextVQA: answer normalisation and the 10-annotator soft accuracy.

Rules (official VQA evaluation, GT-Vision-Lab/VQA `vqaEval.py`; the EvalAI challenge's copy, Cloud-CV's,
strips punctuation by other rules, so a server's score may differ from a local one slightly):
  normalise(answer):
    1. newlines and tabs -> spaces, strip;
    2. punctuation: for each of  ; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !  -- delete it when it is
       written next to a space or when the text contains a digit,digit group ("1,000"); otherwise
       replace it with a space ("t-shirt" -> "t shirt"); then delete every period not followed by a
       digit ("yes." -> "yes", "3.5" stays);
    3. lower-case, split on whitespace, map number words none/zero..ten -> 0..10, drop the articles
       a/an/the, expand missing-apostrophe contractions ("dont" -> "don't"), join with one space.
  VQAv2 accuracy of a prediction against the n (= 10) human answers:
    the prediction is always normalised; the human answers get the punctuation step only, and only
    when they are not unanimous (official behaviour; the released annotations are already clean);
    acc = mean over the n leave-one-out subsets of min(#answers in the subset equal to the prediction / 3, 1).
  Local scores apply these official rules to the raw prediction. The EvalAI submission file (test-dev)
  holds `evalai_normalize`d answers, as LLaVA's converter (used for the UniTok numbers) writes them;
  that processor also splits "'s" ("it's" -> "it 's"), so a server score can differ slightly from
  the local rule on possessives.
  TextVQA (LLaVA's `m4c_evaluator.TextVQAAccuracyEvaluator`): prediction AND every human answer go
    through `evalai_normalize` (lower-case, drop "," and "?", split "'s", then steps 1-3), then the
    same leave-one-out soft accuracy.
Quirks of the official code: the period regex's look-behind is a typo (`(?!<=\\d)`, which constrains
nothing, so the effective rule above is used), and `re.UNICODE` is passed as the substitution count: at most
32 periods are removed (reproduced: a degenerate "yes......" of 40 periods scores 0 there, and here).

Files (local copies; see mllm.evaluate for the runner):
  VQAv2   questions: official v2_OpenEnded_mscoco_<split>_questions.json ({"questions": [...], "data_subtype"})
          or a LLaVA JSONL ({"question_id", "image", "text"}); annotations: official
          v2_mscoco_<split>_annotations.json ({"annotations": [{"question_id", "answers": [{"answer"}],
          "answer_type", "question_type"}]}); images: the COCO folder (COCO_<split>_<image_id:012d>.jpg).
          Without annotations (test-dev) only the EvalAI submission file is written; with
          --submission-questions (the test2015 questions) it lists every test2015 question, as EvalAI expects.
  TextVQA annotations: TextVQA_0.5.1_val.json ({"data": [{"question_id", "question", "image_id",
          "answers"}]}); images: train_images/ (<image_id>.jpg); questions: optional LLaVA JSONL (e.g.
          llava_textvqa_val_v051_ocr.jsonl with OCR tokens in the text, the LLaVA-1.5 protocol).
"""
from __future__ import annotations

import dataclasses
import functools
import re
from collections import defaultdict
from pathlib import Path

from mllm.evaluate.common import Benchmark, Question, count_missing, fields_of, read_json_or_jsonl, with_suffix

# The official contraction table (VQA vqaEval.py), as data.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!")
_PERIOD = re.compile(r"\.(?!\d)")  # a period not followed by a digit
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")


def process_punctuation(text: str) -> str:
    """Official punctuation step (see the module docstring)."""
    out = text
    has_number_group = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in PUNCTUATION:
        # the test looks at the ORIGINAL text, as the official code does
        if (p + " " in text or " " + p in text) or has_number_group:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=32)  # the official code passes re.UNICODE (32) as the count


def process_digit_article(text: str) -> str:
    """Official word step: lower-case, number words -> digits, drop articles, fix contractions."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(text: str) -> str:
    """Full official normalisation of one answer (steps 1-3)."""
    return process_digit_article(process_punctuation(_clean(text)))


def evalai_normalize(text: str) -> str:
    """EvalAI/m4c answer processor (LLaVA): lower-case, drop "," and "?", split "'s", then normalise."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return normalize_answer(text)


def soft_accuracy(pred: str, answers: list[str]) -> float:
    """Mean over the leave-one-out subsets of the n human answers of min(#matches / 3, 1)."""
    if not answers:
        raise ValueError("soft accuracy needs at least one human answer")
    n_match = sum(a == pred for a in answers)
    total = 0.0
    for a in answers:
        others = n_match - (a == pred)  # matches among the other n - 1 answers
        total += min(1.0, others / 3.0)
    return total / len(answers)


def vqav2_accuracy(pred: str, answers: list[str]) -> float:
    """Official VQAv2 per-question accuracy (prediction normalised; answers only if not unanimous)."""
    pred = normalize_answer(pred)
    gts = list(answers)  # as released: the official code cleans only the prediction
    if len(set(gts)) > 1:
        gts = [process_punctuation(a) for a in gts]
    return soft_accuracy(pred, gts)


def textvqa_accuracy(pred: str, answers: list[str]) -> float:
    """TextVQA per-question accuracy (m4c evaluator: everything through evalai_normalize)."""
    return soft_accuracy(evalai_normalize(pred), [evalai_normalize(a) for a in answers])


# ---- benchmark scorers ------------------------------------------------------------------------
def score_vqav2(preds: dict[str, str], gold: dict[str, dict]) -> dict:
    """Overall and per-answer-type accuracy in percent over the questions of `gold` ({qid: {"answers",
    "answer_type"}}); a missing prediction scores 0."""
    missing = count_missing(preds, gold)
    per_type: dict[str, list[float]] = defaultdict(list)
    accs = []
    for qid, g in gold.items():
        acc = vqav2_accuracy(preds[qid], g["answers"]) if qid in preds else 0.0
        accs.append(acc)
        per_type[g.get("answer_type") or "all"].append(acc)
    out = {"accuracy": 100.0 * sum(accs) / max(len(accs), 1), "num_questions": len(accs), "num_missing": missing}
    out.update({f"accuracy_{t.replace('/', '_').replace(' ', '_')}": 100.0 * sum(v) / len(v)
                for t, v in sorted(per_type.items())})
    return out


def score_textvqa(preds: dict[str, str], gold: dict[str, list[str]]) -> dict:
    """Accuracy in percent over the questions of `gold` ({qid: human answers}); a missing prediction scores 0."""
    missing = count_missing(preds, gold)
    accs = [textvqa_accuracy(preds[qid], answers) if qid in preds else 0.0 for qid, answers in gold.items()]
    return {"accuracy": 100.0 * sum(accs) / max(len(accs), 1), "num_questions": len(accs), "num_missing": missing}


# ---- loaders ----------------------------------------------------------------------------------
def _answers(entry: dict) -> list[str]:
    answers = entry.get("answers")
    if not answers:
        raise ValueError(f"annotation for question {entry.get('question_id')} has no answers")
    return [a["answer"] if isinstance(a, dict) else str(a) for a in answers]


def _llava_questions(path: Path, images: Path, suffix: str) -> list[Question]:
    rows = read_json_or_jsonl(path, records=True)
    with fields_of(path, "LLaVA question JSON lines {'question_id', 'image', 'text'} (or the official questions "
                         "JSON with a 'questions' list)"):
        return [Question(str(r["question_id"]), images / r["image"],
                         with_suffix(r.get("text", r.get("question", "")), suffix), r.get("category", ""))
                for r in rows]


def load_vqav2(questions: str | Path, images: str | Path, annotations: str | Path | None,
               suffix: str, submission_questions: str | Path | None = None) -> Benchmark:
    """VQAv2 from local files (see the module docstring). `submission_questions`: the test2015 questions
    that the EvalAI file must list in full (test-dev is a subset of test2015; see `vqav2_submission`)."""
    questions, images = Path(questions), Path(images)
    data = read_json_or_jsonl(questions)
    if isinstance(data, dict) and "questions" in data:
        subtype = data.get("data_subtype", "val2014")
        subtype = {"test-dev2015": "test2015"}.get(subtype, subtype)  # test-dev's images are test2015's
        with fields_of(questions, "the official VQAv2 questions JSON ({'questions': [{'question_id', 'image_id', "
                                  "'question'}]})"):
            qs = [Question(str(q["question_id"]), images / f"COCO_{subtype}_{int(q['image_id']):012d}.jpg",
                           with_suffix(q["question"], suffix)) for q in data["questions"]]
    else:
        qs = _llava_questions(questions, images, suffix)
    submission = vqav2_submission
    if submission_questions is not None:
        every = vqav2_question_ids(submission_questions)
        known = set(every)
        outside = [q.qid for q in qs if q.qid not in known]
        if outside:  # before the model runs, not after
            raise ValueError(f"{len(outside)} of the {len(qs)} questions of {questions} are not in "
                             f"{submission_questions} (e.g. {outside[:3]}): give the test2015 questions of their split")
        submission = functools.partial(vqav2_submission, every=every)
    if annotations is None:
        return Benchmark("vqav2", qs, score=None, submission=submission)
    ann = read_json_or_jsonl(Path(annotations))
    if not isinstance(ann, dict) or "annotations" not in ann:
        raise ValueError(f"{annotations}: expected the official VQAv2 annotation JSON with an 'annotations' list")
    with fields_of(annotations, "the official VQAv2 annotation JSON ({'annotations': [{'question_id', 'answers'}]})"):
        gold = {str(a["question_id"]): {"answers": _answers(a), "answer_type": a.get("answer_type", "")}
                for a in ann["annotations"]}
    missing = [q.qid for q in qs if q.qid not in gold]
    if missing:
        raise ValueError(f"{len(missing)} questions have no annotation (e.g. {missing[:3]}): questions and "
                         "annotations are from different splits?")
    return Benchmark("vqav2", qs, score=lambda preds, qids: score_vqav2(preds, {q: gold[q] for q in qids}),
                     submission=submission)


def vqav2_question_ids(path: str | Path) -> list[str]:
    """Question ids, in file order, of an official questions JSON ({"questions": [...]}) or a LLaVA JSONL."""
    data = read_json_or_jsonl(path, records=not str(path).endswith(".json"))
    rows = data["questions"] if isinstance(data, dict) and "questions" in data else data
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "question_id" in r for r in rows):
        raise ValueError(f"{path}: expected VQAv2 questions (official JSON with a 'questions' list, or LLaVA JSONL)")
    return [str(r["question_id"]) for r in rows]


def vqav2_submission(preds: dict[str, str], every: list[str] | None = None) -> list[dict]:
    """EvalAI result file: [{"question_id": int, "answer": processed answer}] (as LLaVA submits). With `every`
    (the test2015 question ids) it lists each of them in that order, with an empty answer where `preds` has
    none, as LLaVA's convert_vqav2_for_submission.py does: EvalAI's test-dev phase takes the whole test2015 set."""
    answers = {q: evalai_normalize(a) for q, a in preds.items()}
    rows = answers.items() if every is None else ((q, answers.get(q, "")) for q in every)
    return [{"question_id": int(q) if q.isdigit() else q, "answer": a} for q, a in rows]


def textvqa_question(prompt: str) -> str:
    """The question of a LLaVA TextVQA prompt, lower-cased (LLaVA's eval_textvqa.py `prompt_processor`; a
    one-line prompt is the question)."""
    if prompt.startswith("OCR tokens: "):
        m = re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL)
        return (m[1] if m else prompt).lower()
    lines = prompt.split("\n")
    if "Reference OCR token: " in prompt and len(lines) == 3:
        return (lines[1] if prompt.startswith("Reference OCR token:") else lines[0]).lower()
    return lines[0].lower()


def load_textvqa(annotations: str | Path, images: str | Path, questions: str | Path | None,
                 suffix: str) -> Benchmark:
    """TextVQA val from the official annotation file (+ optional LLaVA question JSONL)."""
    images = Path(images)
    ann = read_json_or_jsonl(Path(annotations))
    if not isinstance(ann, dict) or "data" not in ann:
        raise ValueError(f"{annotations}: expected TextVQA_0.5.1_val.json with a 'data' list")
    with fields_of(annotations, "TextVQA_0.5.1_val.json ({'data': [{'question_id', 'image_id', 'question', "
                                "'answers'}]})"):
        gold = {str(d["question_id"]): _answers(d) for d in ann["data"]}
        by_image = {(str(d["image_id"]), d["question"].lower()): str(d["question_id"]) for d in ann["data"]}
    if questions is not None:
        qs = _llava_questions(Path(questions), images, suffix)
        # LLaVA's llava_textvqa_val_v051_ocr.jsonl holds the image id in `question_id` (several questions per
        # image): its eval_textvqa.py finds the annotation by (image id, question lower-cased)
        qs = [q if q.qid in gold else dataclasses.replace(q, qid=by_image.get((q.qid, textvqa_question(q.prompt)),
                                                                              q.qid)) for q in qs]
    else:
        qs = [Question(str(d["question_id"]), images / f"{d['image_id']}.jpg", with_suffix(d["question"], suffix))
              for d in ann["data"]]
    missing = [q.qid for q in qs if q.qid not in gold]
    if missing:
        raise ValueError(f"{len(missing)} questions have no annotation (e.g. {missing[:3]})")
    return Benchmark("textvqa", qs, score=lambda preds, qids: score_textvqa(preds, {q: gold[q] for q in qids}))

