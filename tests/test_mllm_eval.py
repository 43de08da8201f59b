"""mllm.evaluate: each scorer on hand-made cases that follow the benchmarks' documented rules, and the
runners end-to-end on tiny fake benchmark folders with a tiny random model (answers are garbage; the
plumbing, files and the scores' consistency with the written predictions are what is checked)."""
import json
import re
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from mllm.evaluate import (binary_metrics, evalai_normalize, genai_import, geneval_import, load_vqav2,
                           normalize_answer, normalize_gqa, parse_mme, parse_yes_no, score_gqa, score_mme, score_pope,
                           score_textvqa, score_vqav2, soft_accuracy, subtask_score, textvqa_accuracy, vqav2_accuracy)
from mllm.evaluate.cli import main as eval_main
from runtime.launch import NodeLaunch


# ---- VQA normalisation and soft accuracy ---------------------------------------------------------
@pytest.mark.parametrize("raw,norm", [
    ("Yes.", "yes"),                  # period not followed by a digit is removed
    ("3.5", "3.5"),                   # decimal point kept
    ("5.", "5"),
    ("1,000", "1000"),                # digit,digit group -> punctuation deleted, not spaced
    ("t-shirt", "t shirt"),           # punctuation inside a word -> space
    ("left - right", "left right"),   # punctuation next to a space -> deleted
    ("red, white", "red white"),
    ("(Two)", "2"),                   # number words -> digits
    ("none", "0"),
    ("ten dogs", "10 dogs"),
    ("eleven", "eleven"),             # only none/zero..ten are mapped
    ("A Dog!", "dog"),                # lower-case, article dropped
    ("The two cats", "2 cats"),
    ("an apple", "apple"),
    ("dont know", "don't know"),      # missing-apostrophe contractions restored
    ("isnt", "isn't"),
    ("It's a cat", "it's cat"),       # the apostrophe is not in the punctuation list
    ("  red\tcar\n", "red car"),
    ("e.g. this", "eg this"),
])
def test_vqa_official_normalisation(raw, norm):
    assert normalize_answer(raw) == norm


def test_evalai_processor_extras():
    # EvalAI/m4c: "," and "?" dropped before the punctuation rule, "'s" split off
    assert evalai_normalize("Coca-Cola?") == "coca cola"
    assert evalai_normalize("It's John's") == "it 's john 's"
    assert evalai_normalize("Two, please") == "2 please"


def test_soft_accuracy_ten_annotators_leave_one_out():
    # k matching annotators: k of the 10 subsets see k-1 matches, 10-k see k; acc = mean min(m/3, 1)
    other = ["x"] * 10
    assert soft_accuracy("2", other) == 0.0
    assert soft_accuracy("2", ["2"] + other[:9]) == pytest.approx((1 * 0 + 9 * (1 / 3)) / 10)      # 0.3
    assert soft_accuracy("2", ["2"] * 2 + other[:8]) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)  # 0.6
    assert soft_accuracy("2", ["2"] * 3 + ["3"] * 7) == pytest.approx((3 * (2 / 3) + 7 * 1) / 10)     # 0.9
    assert soft_accuracy("2", ["2"] * 4 + other[:6]) == 1.0
    with pytest.raises(ValueError):
        soft_accuracy("2", [])


def test_vqav2_rule_prediction_always_normalised_answers_only_when_disagreeing():
    assert vqav2_accuracy("Two.", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    assert vqav2_accuracy("two", ["2"] * 10) == 1.0
    # disagreeing annotators: their answers get the punctuation step too
    assert vqav2_accuracy("t-shirt", ["t-shirt"] * 5 + ["shirt"] * 5) == 1.0
    # unanimous annotators are compared verbatim (official behaviour): the normalised prediction
    # "t shirt" does not equal "t-shirt"
    assert vqav2_accuracy("t-shirt", ["t-shirt"] * 10) == 0.0
    assert vqav2_accuracy("A cat", ["cat"] * 10) == 1.0
    # the human answers are not stripped (only the prediction is), and at most 32 periods go: both as the
    # official vqaEval.py (re.UNICODE passed as the count), and as LLaVA's EvalAI processor for TextVQA
    assert vqav2_accuracy("yes", ["yes "] * 10) == 0.0 and vqav2_accuracy("yes", ["yes "] * 3 + ["no"] * 7) == 0.0
    assert vqav2_accuracy("yes" + "." * 32, ["yes"] * 10) == 1.0
    assert vqav2_accuracy("yes" + "." * 40, ["yes"] * 10) == 0.0 == textvqa_accuracy("yes" + "." * 40, ["yes"] * 10)


def test_score_vqav2_overall_and_per_answer_type():
    gold = {"1": {"answers": ["yes"] * 10, "answer_type": "yes/no"},
            "2": {"answers": ["2"] * 3 + ["3"] * 7, "answer_type": "number"},
            "3": {"answers": ["red"] * 10, "answer_type": "other"}}
    m = score_vqav2({"1": "Yes", "2": "two", "3": "blue"}, gold)
    assert m["accuracy"] == pytest.approx(100 * (1 + 0.9 + 0) / 3)
    assert m["accuracy_yes_no"] == 100.0 and m["accuracy_number"] == pytest.approx(90.0)
    assert m["accuracy_other"] == 0.0 and m["num_questions"] == 3
    with pytest.raises(KeyError):
        score_vqav2({"9": "x"}, gold)


def test_textvqa_normalises_everything():
    answers = ["coca cola"] * 4 + ["coke"] * 6
    assert textvqa_accuracy("Coca-Cola", answers) == 1.0
    assert textvqa_accuracy("COKE!", answers) == 1.0
    assert textvqa_accuracy("pepsi", answers) == 0.0
    assert textvqa_accuracy("Stop", ["STOP."] * 2 + ["sign"] * 8) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)
    assert score_textvqa({"a": "Coke", "b": "x"}, {"a": answers, "b": ["y"] * 10})["accuracy"] == 50.0


def test_textvqa_reads_llavas_question_file(tmp_path):
    """llava_textvqa_val_v051_ocr.jsonl holds the image id in `question_id` (two questions of one image share it):
    each row is matched to its annotation by (image id, question), as LLaVA's eval_textvqa.py does."""
    from mllm.evaluate.vqa import load_textvqa

    ann = {"data": [{"question_id": 34602, "image_id": "003a8ae2ef43b901", "question": "what is the brand?",
                     "answers": ["nokia"] * 10},
                    {"question_id": 34603, "image_id": "003a8ae2ef43b901", "question": "What color is it?",
                     "answers": ["black"] * 10}]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    rows = [{"question_id": "003a8ae2ef43b901", "image": "003a8ae2ef43b901.jpg",
             "text": f"{q}\nReference OCR token: nokia, 5\nAnswer the question using a single word or phrase."}
            for q in ("what is the brand?", "What color is it?")]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    bench = load_textvqa(tmp_path / "ann.json", tmp_path, tmp_path / "q.jsonl", "")
    assert [q.qid for q in bench.questions] == ["34602", "34603"]
    assert bench.questions[1].prompt.startswith("What color is it?\nReference OCR token")
    assert bench.score({"34602": "Nokia", "34603": "white"}, ["34602", "34603"])["accuracy"] == 50.0


def test_gqa_exact_match_after_llava_cleanup():
    assert normalize_gqa(" Yes. ") == "yes"
    m = score_gqa({"1": "Yes.", "2": "The dog", "3": " left "}, {"1": "yes", "2": "dog", "3": "left"})
    assert m["accuracy"] == pytest.approx(200 / 3) and m["num_questions"] == 3


# ---- POPE --------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,label", [
    ("Yes", "yes"), ("Yes, there is a dog in the image.", "yes"), ("No", "no"), ("no.", "no"),
    ("No, there is no dog.", "no"), ("There is not a dog.", "no"), ("Yes. No doubt.", "yes"),  # first sentence only
    ("NO", "yes"), ("Nope", "yes"),  # LLaVA's parser is case- and word-exact
])
def test_pope_answer_parsing(text, label):
    assert parse_yes_no(text) == label


def test_pope_metrics_by_hand():
    labels = ["yes", "yes", "yes", "no", "no", "no", "no"]
    preds = ["yes", "yes", "no", "yes", "no", "no", "no"]  # TP 2, FN 1, FP 1, TN 3
    m = binary_metrics(preds, labels)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (2, 1, 1, 3)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3) and m["accuracy"] == pytest.approx(5 / 7)
    assert m["yes_ratio"] == pytest.approx(3 / 7)
    assert binary_metrics(["no", "no"], ["yes", "no"])["precision"] == 0.0  # 0 instead of a division error
    gold = {"a/1": ("a", "yes"), "a/2": ("a", "no"), "b/1": ("b", "yes"), "b/2": ("b", "no")}
    s = score_pope({"a/1": "Yes", "a/2": "No", "b/1": "No", "b/2": "No"}, gold)
    assert s["categories"]["a"]["accuracy"] == 100.0 and s["categories"]["b"]["accuracy"] == 50.0
    assert s["accuracy"] == 75.0 and s["f1"] == pytest.approx((100.0 + 0.0) / 2)


# ---- MME ---------------------------------------------------------------------------------------
def test_mme_parsing_and_acc_plus():
    assert [parse_mme(t) for t in ("Yes", "no", "Yes, it is.", "No, it is not.", "I think so", "nothing")] == \
        ["yes", "no", "yes", "no", "other", "no"]
    # image 1: both right; image 2: one right -> acc 3/4, acc+ 1/2 -> 75 + 50
    s = subtask_score([("1.jpg", "yes", "Yes"), ("1.jpg", "no", "No"), ("2.jpg", "yes", "Yes"),
                       ("2.jpg", "no", "Maybe")])
    assert (s["acc"], s["acc_plus"], s["score"], s["num_images"]) == (75.0, 50.0, 125.0, 2)
    gold = {"e1": ("existence", "a.jpg", "yes"), "e2": ("existence", "a.jpg", "no"),
            "c1": ("count", "b.jpg", "yes"), "c2": ("count", "b.jpg", "no"),
            "r1": ("code_reasoning", "c.png", "yes"), "r2": ("code_reasoning", "c.png", "no")}
    m = score_mme({"e1": "yes", "e2": "no", "c1": "no", "c2": "no", "r1": "yes", "r2": "yes"}, gold)
    assert m["subtasks"]["existence"]["score"] == 200.0 and m["subtasks"]["count"]["score"] == 50.0
    assert m["perception"] == 250.0 and m["cognition"] == 50.0 and m["total"] == 300.0
    assert "celebrity" in m["missing_subtasks"] and "existence" not in m["missing_subtasks"]
    with pytest.raises(ValueError, match="exactly two"):
        subtask_score([("1.jpg", "yes", "yes")])


# ---- partial predictions -----------------------------------------------------------------------
def test_scores_cover_the_questions_not_the_predictions():
    """A question without a prediction counts as wrong (and in num_missing), in every scorer."""
    assert score_gqa({"1": "yes"}, {"1": "yes", "2": "no", "3": "no", "4": "no"}) == \
        {"accuracy": 25.0, "num_questions": 4, "num_missing": 3}
    m = score_vqav2({"1": "yes"}, {"1": {"answers": ["yes"] * 10, "answer_type": "yes/no"},
                                   "2": {"answers": ["2"] * 10, "answer_type": "number"}})
    assert (m["accuracy"], m["accuracy_number"], m["num_missing"]) == (50.0, 0.0, 1)
    assert score_textvqa({}, {"a": ["x"] * 10})["accuracy"] == 0.0
    # POPE: missing on a "yes" question is a false negative, on a "no" question just wrong
    s = score_pope({"a/1": "Yes", "a/2": "No"}, {"a/1": ("a", "yes"), "a/2": ("a", "no"), "a/3": ("a", "yes"),
                                                "a/4": ("a", "no")})
    c = s["categories"]["a"]
    assert (c["tp"], c["tn"], c["fp"], c["fn"], c["n"]) == (1, 1, 0, 1, 4) and s["num_missing"] == 2
    assert s["accuracy"] == 50.0 and s["recall"] == 50.0 and s["precision"] == 100.0
    # MME: a missing answer breaks its image's acc+
    gold = {"e1": ("existence", "a.jpg", "yes"), "e2": ("existence", "a.jpg", "no")}
    m = score_mme({"e1": "Yes"}, gold)
    assert m["subtasks"]["existence"]["score"] == 50.0 and m["num_missing"] == 1


def test_rescoring_a_partial_or_empty_predictions_file(tmp_path, capsys):
    ann = {str(i): {"imageId": f"n{i}", "question": f"q{i}?", "answer": "yes"} for i in range(100)}
    (tmp_path / "ann.json").write_text(json.dumps(ann))

    def score(name, rows, *flags):
        (tmp_path / name).write_text("".join(json.dumps({"question_id": str(i), "answer": "yes"}) + "\n"
                                             for i in rows))
        code = eval_main(["--task", "gqa", "--annotations", str(tmp_path / "ann.json"), "--predictions",
                          str(tmp_path / name), "--out", str(tmp_path / name[:-6]), *flags])
        return code, (json.loads((tmp_path / name[:-6] / "results.json").read_text()) if code == 0 else None)

    code, res = score("crashed.jsonl", range(10))  # a run that died after 10 of 100 answers
    assert code == 0 and res["metrics"] == {"accuracy": 10.0, "num_questions": 100, "num_missing": 90}
    assert res["num_predictions"] == 10 and "answers 10 of the 100 questions" in capsys.readouterr().err
    _, res = score("full.jsonl", range(100))
    assert res["metrics"] == {"accuracy": 100.0, "num_questions": 100, "num_missing": 0}
    _, res = score("limited.jsonl", range(10), "--limit", "10")  # the file of a --limit 10 run
    assert res["metrics"] == {"accuracy": 100.0, "num_questions": 10, "num_missing": 0}
    assert score("empty.jsonl", [])[0] == 1
    assert f"{tmp_path / 'empty.jsonl'}: no predictions" in capsys.readouterr().err


class _YesEngine:
    """Answers "Yes" to everything, without a model."""

    def open_image(self, path):
        return Image.open(path)

    def encode_images(self, images):
        return [None] * len(images)

    def chat_sample(self, prompts, codes):
        return prompts[0]

    def answer(self, prompts, max_new_tokens, sampling):
        return ["Yes"] * len(prompts)


def _mme_folder(root: Path, num_images: int) -> Path:
    (root / "color").mkdir(parents=True)
    for i in range(num_images):
        Image.new("RGB", (8, 8)).save(root / "color" / f"{i}.jpg")
        (root / "color" / f"{i}.txt").write_text("Is it red?\tYes\nIs it blue?\tNo\n")
    return root


def test_mme_limit_keeps_whole_images_and_pairs_are_checked(tmp_path):
    from mllm.evaluate import InferenceConfig, load_mme, run_benchmark

    bench = load_mme(_mme_folder(tmp_path / "MME", 3), "")
    assert [q.qid for q in bench.first(3)] == ["color/0.jpg#0", "color/0.jpg#1", "color/1.jpg#0", "color/1.jpg#1"]
    rows, m = run_benchmark(_YesEngine(), bench, InferenceConfig(limit=5))  # the third image's pair, not half
    assert len(rows) == 6 and m["num_questions"] == 6 and m["subtasks"]["color"]["acc"] == 50.0
    (tmp_path / "MME" / "color" / "1.txt").write_text("Is it red?\tYes\nIs it blue?\tNo\nIs it green?\tNo\n")
    with pytest.raises(ValueError, match=r"color/1\.txt: 3 question lines; every MME image has exactly two"):
        load_mme(tmp_path / "MME", "")


def test_predictions_are_written_before_scoring(tmp_path):
    """A scoring error after inference keeps the answers."""
    from mllm.evaluate import InferenceConfig, load_mme, run_benchmark

    bench = load_mme(_mme_folder(tmp_path / "MME", 1), "")
    bench.score = mock.Mock(side_effect=RuntimeError("scorer bug"))
    with pytest.raises(RuntimeError, match="scorer bug"):
        run_benchmark(_YesEngine(), bench, InferenceConfig(), tmp_path / "out")
    rows = [json.loads(x) for x in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [(r["question_id"], r["answer"]) for r in rows] == [("color/0.jpg#0", "Yes"), ("color/0.jpg#1", "Yes")]


class _CrashingEngine(_YesEngine):
    """Answers "Yes", and raises at its `crash_at`-th answer call (a CUDA OOM, a killed rank)."""

    def __init__(self, crash_at=None):
        self.calls, self.crash_at, self.asked = 0, crash_at, []

    def answer(self, prompts, max_new_tokens, sampling):
        self.calls += 1
        if self.calls == self.crash_at:
            raise RuntimeError("CUDA out of memory")
        self.asked += prompts
        return super().answer(prompts, max_new_tokens, sampling)


def test_a_crashed_run_keeps_its_answers_and_a_rerun_answers_only_the_rest(tmp_path):
    """Answers were held in memory until the final gather: one late error (an OOM, a corrupt image, a killed
    rank) lost every answer of a run of hours, and OUT was not even created."""
    from mllm.evaluate import InferenceConfig, load_mme, run_benchmark

    bench = load_mme(_mme_folder(tmp_path / "MME", 5), "")  # 10 questions, 4 batches of 3
    out, cfg = tmp_path / "out", InferenceConfig(batch_size=3)
    with pytest.raises(RuntimeError, match="out of memory"):
        run_benchmark(_CrashingEngine(crash_at=3), bench, cfg, out, {"model": "m1"})
    journal = out / "partial" / "rank00000.jsonl"
    assert len(journal.read_text().splitlines()) == 6
    with open(journal, "a") as f:
        f.write('{"index": 6, "question_id": "col')  # a line a kill cut short
    with pytest.raises(ValueError, match=r"partial holds the answers of an interrupted run with other settings "
                                         r"\(model: 'm1' -> 'm2'\): rerun with those .* or remove"):
        run_benchmark(_CrashingEngine(), bench, cfg, out, {"model": "m2"})
    engine = _CrashingEngine()
    rows, metrics = run_benchmark(engine, bench, cfg, out, {"model": "m1"})
    assert engine.asked == [q.prompt for q in bench.questions[6:]]  # only the 4 the crash left
    assert [r["question_id"] for r in rows] == [q.qid for q in bench.questions] and metrics["num_missing"] == 0
    assert [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()] == rows
    assert not (out / "partial").exists()  # done: the next run into OUT starts over
    engine = _CrashingEngine()
    run_benchmark(engine, bench, cfg, out, {"model": "m2"})
    assert len(engine.asked) == 10


def test_mme_prompts_follow_llavas_question_file(tmp_path):
    """MME's own "Please answer yes or no." was kept before the short-answer suffix; LLaVA's llava_mme.jsonl
    (and lmms-eval) drop it."""
    from mllm.evaluate import load_mme
    from mllm.evaluate.common import DEFAULT_SUFFIX

    (tmp_path / "OCR").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "OCR" / "0.jpg")
    (tmp_path / "OCR" / "0.txt").write_text("Is the word in the logo \"high\"? Please answer yes or no.\tYes\n"
                                            "Is the word in the logo \"low\"?  Please answer yes or no.\tNo\n")
    assert [q.prompt for q in load_mme(tmp_path, DEFAULT_SUFFIX).questions] == [
        'Is the word in the logo "high"?\nAnswer the question using a single word or phrase.',
        'Is the word in the logo "low"?\nAnswer the question using a single word or phrase.']
    assert load_mme(tmp_path, "").questions[0].prompt == 'Is the word in the logo "high"? Please answer yes or no.'


def test_input_files_without_a_field_are_named(tmp_path):
    """A wrong file (LLaVA's label-less llava_pope_test.jsonl, the annotations given as --questions, an EvalAI
    predictions file) failed with a bare "error: 'label'"."""
    from mllm.evaluate import load_gqa, load_pope
    from mllm.evaluate.runner import InferenceConfig

    f = tmp_path / "llava_pope_test.jsonl"
    f.write_text(json.dumps({"question_id": 1, "image": "a.jpg", "text": "Is there a dog?", "category": "random"}))
    with pytest.raises(ValueError, match=r"llava_pope_test.jsonl: a record has no 'label' field; expected POPE's "
                                         r"coco_pope_<category>.json .*has no labels"):
        load_pope([f], tmp_path, "")
    ann = tmp_path / "annotations.json"
    ann.write_text(json.dumps({"annotations": [{"question_id": 1, "answers": ["yes"]}]}))
    with pytest.raises(ValueError, match=r"annotations.json: .*expected VQAv2 questions|annotations.json: a record "
                                         r"has no 'question_id' field"):
        load_vqav2(ann, tmp_path, None, "")
    gqa = tmp_path / "testdev_balanced_questions.json"
    gqa.write_text(json.dumps({"1": {"imageId": "n1", "question": "?", "answer": "yes"}}))
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"questionId": "1", "image": "n1.jpg", "text": "?"}))
    with pytest.raises(ValueError, match=r"q.jsonl: a record has no 'question_id' field; expected LLaVA question"):
        load_gqa(gqa, tmp_path, q, "")
    with pytest.raises(ValueError, match="log_every must be >= 1"):
        InferenceConfig(log_every=0)  # it crashed rank 0 after the first batch (the others waited in the gather)


# ---- LLaVA's own answers files -------------------------------------------------------------------
_LLAVA_SUFFIX = "\nAnswer the question using a single word or phrase."
# (category, LLaVA's id offset in llava_pope_test.jsonl, [(image, object, label)]); LLaVA's file lists
# adversarial 1.., random 10000001.., popular 20000001..; each coco_pope_<category>.json numbers from 1
_POPE_SETS = [("adversarial", 0, [("310196", "snowboard", "yes"), ("310196", "person", "yes"),
                                  ("310196", "car", "no"), ("210789", "truck", "yes")]),
              ("random", 10000000, [("310196", "person", "yes"), ("310196", "broccoli", "no"),
                                    ("210789", "cell phone", "no")]),
              ("popular", 20000000, [("310196", "person", "yes"), ("310196", "dining table", "no"),
                                     ("210789", "car", "yes"), ("210789", "chair", "no")])]
_ANSWERS = ["Yes", "No", "Yes, there is a car.", "No.", "No, there is not", "Yes", "Yes", "no", "NO", "Yes"]


def _llava_pope(root: Path):
    """coco/coco_pope_<category>.json, LLaVA's llava_pope_test.jsonl, its answers file (model_vqa_loader lines)
    and this runner's predictions.jsonl with the same answers."""
    (root / "coco").mkdir(parents=True)
    llava, answers, ours, k = [], [], [], 0
    for cat, offset, items in _POPE_SETS:
        coco = [{"question_id": i + 1, "image": f"COCO_val2014_000000{img}.jpg",
                 "text": f"Is there a{'n' * (obj[0] in 'aeiou')} {obj} in the image?", "label": lab}
                for i, (img, obj, lab) in enumerate(items)]
        (root / "coco" / f"coco_pope_{cat}.json").write_text("".join(json.dumps(r) + "\n" for r in coco))
        for r in coco:
            lid = offset + r["question_id"]
            llava.append({"question_id": lid, "image": r["image"], "text": r["text"] + _LLAVA_SUFFIX, "category": cat})
            answers.append({"question_id": lid, "prompt": r["text"] + _LLAVA_SUFFIX, "text": _ANSWERS[k % 10],
                            "answer_id": f"a{k}", "model_id": "llava-v1.5-7b", "metadata": {}})
            ours.append({"question_id": f"{cat}/{r['question_id']}", "category": cat,
                         "prompt": r["text"] + _LLAVA_SUFFIX, "answer": _ANSWERS[k % 10]})
            k += 1
    write = lambda name, rows: (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))  # noqa: E731
    write("llava_pope_test.jsonl", llava)
    write("llava-v1.5-7b.jsonl", answers)
    write("predictions.jsonl", ours)
    return answers


def _rescore(task, root, files, predictions, *flags):
    out = root / f"out_{Path(predictions).stem}"
    code = eval_main(["--task", task, *files, "--predictions", str(predictions), "--out", str(out), *flags])
    return code, (json.loads((out / "results.json").read_text())["metrics"] if code == 0 else None)


def test_llava_pope_answers_score_like_the_runners_predictions(tmp_path, capsys):
    """LLaVA's answers carry the ids of llava_pope_test.jsonl (one numbering over the categories), not the
    coco_pope files' ids: every question counted as missing (an error naming no cause, in fact)."""
    answers = _llava_pope(tmp_path)
    questions = [w for cat, _, _ in _POPE_SETS
                 for w in ("--questions", str(tmp_path / "coco" / f"coco_pope_{cat}.json"))]
    llava = ["--llava-questions", str(tmp_path / "llava_pope_test.jsonl")]
    code, ours = _rescore("pope", tmp_path, questions, tmp_path / "predictions.jsonl")
    assert code == 0 and ours["num_missing"] == 0 and ours["num_questions"] == 11
    adv, pop = ours["categories"]["adversarial"], ours["categories"]["popular"]
    assert (adv["tp"], adv["fp"], adv["fn"]) == (1, 1, 2) and pop["fp"] == 2  # "NO" is a yes to LLaVA's parser
    code, theirs = _rescore("pope", tmp_path, questions, tmp_path / "llava-v1.5-7b.jsonl", *llava)
    assert code == 0 and theirs == ours
    # merged out of order (chunks concatenated in another order): each answer still meets its own label
    shuffled = tmp_path / "shuffled.jsonl"
    shuffled.write_text("".join(json.dumps(r) + "\n" for r in answers[::-1]))
    assert _rescore("pope", tmp_path, questions, shuffled, *llava)[1] == ours
    # a file cut short: the rest counts as wrong, and the warning names the count
    short = tmp_path / "short.jsonl"
    short.write_text("".join(json.dumps(r) + "\n" for r in answers[:8]))
    code, m = _rescore("pope", tmp_path, questions, short, *llava)
    assert code == 0 and m["num_missing"] == 3 and "answers 8 of the 11 questions" in capsys.readouterr().err


def test_llava_pope_answers_that_cannot_be_matched_are_errors(tmp_path, capsys):
    _llava_pope(tmp_path)
    cat_file = lambda c: str(tmp_path / "coco" / f"coco_pope_{c}.json")  # noqa: E731
    questions = [w for cat, _, _ in _POPE_SETS for w in ("--questions", cat_file(cat))]
    answers = tmp_path / "llava-v1.5-7b.jsonl"
    llava = ["--llava-questions", str(tmp_path / "llava_pope_test.jsonl")]
    # without --llava-questions no id matches: the error names the file and the flag
    assert _rescore("pope", tmp_path, questions, answers)[0] == 1
    err = " ".join(capsys.readouterr().err.split())
    assert f"{answers}: none of its 11 question ids (e.g. '1') is a question of --task pope" in err
    assert "give that file as --llava-questions" in err
    # answers to another question file
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"question_id": 30000001, "prompt": "?", "text": "Yes"}) + "\n")
    assert _rescore("pope", tmp_path, questions, other, *llava)[0] == 1
    assert f"{other}: 1 of its 1 question ids (e.g. 30000001) are not in --llava-questions" in capsys.readouterr().err
    # answers to a category whose coco_pope file was not given
    assert _rescore("pope", tmp_path, ["--questions", cat_file("random")], answers, *llava)[0] == 1
    err = capsys.readouterr().err
    assert "8 of its 11 answers are to questions of --llava-questions" in err
    assert "category 'adversarial': give coco_pope_adversarial.json" in err
    # this runner's predictions.jsonl given with LLaVA's question file
    assert _rescore("pope", tmp_path, questions, tmp_path / "predictions.jsonl", *llava)[0] == 1
    assert "(e.g. adversarial/1) are not in --llava-questions" in capsys.readouterr().err


def _llava_mme(root: Path):
    """MME_Benchmark_release_version/ (a flat and an images/ + questions_answers_YN/ subtask), LLaVA's answers to
    its llava_mme.jsonl (an image's two questions share the id) and this runner's predictions.jsonl."""
    mme = root / "MME_Benchmark_release_version"
    (mme / "color").mkdir(parents=True)
    (mme / "artwork" / "images").mkdir(parents=True)
    (mme / "artwork" / "questions_answers_YN").mkdir()
    items = {("color", "000000008277.jpg"): [("Is there a red coat in the image?", "Yes"),
                                              ("Is there a yellow coat in the image?", "No")],
             ("color", "000000012120.jpg"): [("Is there a white plate in the image?", "Yes"),
                                              ("Is there a green plate in the image?", "No")],
             ("artwork", "10002.jpg"): [("Is this artwork created by maris, jacob?", "Yes"),
                                        ("Is this artwork created by bueckelaer, joachim?", "No")]}
    answers, ours, said = [], [], iter(["Yes", "No", "Yes", "Yes", "No", "No"])
    for (task, name), qa in items.items():
        flat = task == "color"
        img_dir, txt_dir = (mme / task,) * 2 if flat else (mme / task / "images", mme / task / "questions_answers_YN")
        Image.new("RGB", (8, 8)).save(img_dir / name)
        # MME's own instruction, once with the double space some of its files have
        (txt_dir / f"{Path(name).stem}.txt").write_text(
            "".join(f"{q}{'  ' if i else ' '}Please answer yes or no.\t{a}\n" for i, (q, a) in enumerate(qa)))
        lid = f"{task}/{name}" if flat else f"{task}/images/{name}"
        for i, (q, _) in enumerate(qa):
            a = next(said)
            answers.append({"question_id": lid, "prompt": q + _LLAVA_SUFFIX, "text": a, "answer_id": "x",
                            "model_id": "llava-v1.5-13b", "metadata": {}})
            ours.append({"question_id": f"{task}/{name}#{i}", "category": task, "prompt": q + _LLAVA_SUFFIX,
                         "answer": a})
    write = lambda name, rows: (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))  # noqa: E731
    write("llava-v1.5-13b.jsonl", answers[::-1])  # the shared ids: only the prompt tells an image's pair apart
    write("predictions.jsonl", ours)
    return mme


def test_llava_mme_answers_score_like_the_runners_predictions(tmp_path, capsys):
    mme = ["--images", str(_llava_mme(tmp_path))]
    code, ours = _rescore("mme", tmp_path, mme, tmp_path / "predictions.jsonl")
    assert code == 0 and ours["num_missing"] == 0 and ours["subtasks"]["color"]["acc"] == 75.0
    assert ours["subtasks"]["artwork"]["acc_plus"] == 0.0  # answered Yes to both: the pairing matters
    code, theirs = _rescore("mme", tmp_path, mme, tmp_path / "llava-v1.5-13b.jsonl")
    assert code == 0 and theirs == ours
    # an answer to a question the folder does not hold: an error naming the file, not a silent miss
    stray = tmp_path / "stray.jsonl"
    stray.write_text(json.dumps({"question_id": "OCR/0001.jpg", "prompt": "Is it?" + _LLAVA_SUFFIX, "text": "Yes"}))
    assert _rescore("mme", tmp_path, mme, stray)[0] == 1
    assert f"{stray}: 1 of its 1 answers match no question of the MME folder" in capsys.readouterr().err
    # LLaVA's flag for POPE is refused with MME (its answers name their questions)
    with pytest.raises(SystemExit):
        eval_main(["--task", "mme", *mme, "--predictions", str(stray), "--llava-questions", "q.jsonl"])
    assert "--llava-questions does not apply to --task mme" in " ".join(capsys.readouterr().err.split())


def test_bad_benchmark_files_fail_before_the_model_loads(tmp_path, capsys):
    with mock.patch("mllm.engine.MLLMEngine.load", side_effect=AssertionError("the model was loaded")):
        assert eval_main(["--task", "gqa", *_M, "--annotations", str(tmp_path / "typo.json"), "--images",
                          str(tmp_path)]) == 1
    assert "file not found: " in capsys.readouterr().err


# ---- generation imports ------------------------------------------------------------------------
def test_geneval_import_summary(tmp_path):
    rows = [{"tag": "single_object", "correct": True, "metadata": "m1"},
            {"tag": "single_object", "correct": True, "metadata": "m1"},
            {"tag": "counting", "correct": False, "metadata": "m2"},
            {"tag": "counting", "correct": True, "metadata": "m3"},
            {"tag": "counting", "correct": False, "metadata": "m3"},
            {"tag": "counting", "correct": False, "metadata": "m3"}]
    f = tmp_path / "results.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows))
    m = geneval_import(f)
    assert m["tags"] == {"single_object": 100.0, "counting": 25.0}
    assert m["overall"] == 62.5  # mean over tags, not over images
    assert m["correct_images"] == pytest.approx(50.0) and m["correct_prompts"] == pytest.approx(200 / 3)


def test_genai_import_per_skill(tmp_path):
    (tmp_path / "s.json").write_text(json.dumps({"00001": 0.9, "00002": 0.5, "3": 0.1, "00004": 0.7}))
    (tmp_path / "k.json").write_text(json.dumps({"counting": [1, 2], "negation": [3], "scene": [2, 4]}))
    m = genai_import(tmp_path / "s.json", tmp_path / "k.json")
    assert m["tags"]["counting"] == pytest.approx(0.7) and m["tags"]["negation"] == pytest.approx(0.1)
    assert m["tags"]["scene"] == pytest.approx(0.6) and m["all"] == pytest.approx((0.9 + 0.5 + 0.1 + 0.7) / 4)


# ---- end to end with the tiny model -----------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny export + fake POPE and MME folders."""
    from test_chat import make_tiny_export

    d = tmp_path_factory.mktemp("eval")
    export, tok = make_tiny_export(d)
    rng = np.random.default_rng(0)
    imgs = d / "coco"
    imgs.mkdir()
    for name, shape in (("COCO_val2014_000000000001.jpg", (40, 56, 3)), ("COCO_val2014_000000000002.jpg", (32, 32, 3))):
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(imgs / name)
    pope = []
    for cat in ("adversarial", "random"):
        f = d / f"coco_pope_{cat}.json"
        lines = [{"question_id": i + 1, "image": f"COCO_val2014_00000000000{i % 2 + 1}.jpg",
                  "text": f"Is there a {obj} in the image?", "label": lab}
                 for i, (obj, lab) in enumerate([("dog", "yes"), ("cat", "no"), ("car", "yes")])]
        f.write_text("\n".join(json.dumps(x) for x in lines) + "\n")  # JSON lines under .json, as released
        pope.append(f)
    mme = d / "MME"
    (mme / "existence").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(mme / "existence" / "0001.png")
    (mme / "existence" / "0001.txt").write_text("Is there a dog? Please answer yes or no.\tYes\n"
                                                "Is there a cat? Please answer yes or no.\tNo\n")
    (mme / "artwork" / "images").mkdir(parents=True)
    (mme / "artwork" / "questions_answers_YN").mkdir()
    Image.fromarray(rng.integers(0, 255, (48, 32, 3), dtype=np.uint8)).save(mme / "artwork" / "images" / "10.jpg")
    (mme / "artwork" / "questions_answers_YN" / "10.txt").write_text(
        "Is this by Monet?\tNo\nIs this a painting?\tYes\n")
    return {"dir": d, "export": export, "tok": tok, "images": imgs, "pope": pope, "mme": mme}


def _model_args(t):
    return ["--model", str(t["export"]), "--tokenizer", str(t["tok"]), "--image-size", "32", "--device", "cpu"]


def _pope_args(t, out, batch):
    return ["--task", "pope", *_model_args(t), "--questions", str(t["pope"][0]), "--questions", str(t["pope"][1]),
            "--images", str(t["images"]), "--out", str(out), "--batch-size", str(batch), "--max-new-tokens", "6"]


def test_pope_runner_end_to_end(tiny, tmp_path):
    """Questions -> batched answers -> predictions.jsonl, results.json/.md whose metrics match the rows."""
    assert eval_main(_pope_args(tiny, tmp_path / "b3", 3)) == 0
    rows = [json.loads(x) for x in (tmp_path / "b3" / "predictions.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in rows] == [f"{c}/{i}" for c in ("adversarial", "random") for i in (1, 2, 3)]
    assert all(r["prompt"].endswith("\nAnswer the question using a single word or phrase.") for r in rows)
    res = json.loads((tmp_path / "b3" / "results.json").read_text())
    gold = {f"{c}/{i}": (c, lab) for c in ("adversarial", "random") for i, lab in zip((1, 2, 3), ("yes", "no", "yes"))}
    expect = score_pope({r["question_id"]: r["answer"] for r in rows}, gold)
    assert res["task"] == "pope" and res["metrics"] == json.loads(json.dumps(expect))
    assert res["metrics"]["categories"]["random"]["n"] == 3 and res["config"]["inference"]["batch_size"] == 3
    md = (tmp_path / "b3" / "results.md").read_text()
    assert "| f1 |" in md and "| categories.adversarial.accuracy |" in md
    # left-padded batches give the same greedy answers as one question at a time
    assert eval_main(_pope_args(tiny, tmp_path / "b1", 1)) == 0
    rows1 = [json.loads(x) for x in (tmp_path / "b1" / "predictions.jsonl").read_text().splitlines()]
    assert [r["answer"] for r in rows1] == [r["answer"] for r in rows]
    # re-scoring the saved predictions needs no model and reproduces the metrics
    assert eval_main(["--task", "pope", "--questions", str(tiny["pope"][0]), "--questions", str(tiny["pope"][1]),
                      "--predictions", str(tmp_path / "b3" / "predictions.jsonl"), "--out", str(tmp_path / "re")]) == 0
    assert json.loads((tmp_path / "re" / "results.json").read_text())["metrics"] == res["metrics"]


def test_mme_runner_both_folder_layouts(tiny, tmp_path):
    assert eval_main(["--task", "mme", *_model_args(tiny), "--images", str(tiny["mme"]), "--out", str(tmp_path),
                      "--max-new-tokens", "4"]) == 0
    res = json.loads((tmp_path / "results.json").read_text())["metrics"]
    assert res["num_questions"] == 4 and set(res["subtasks"]) == {"existence", "artwork"}
    assert all(s["num_images"] == 1 and s["score"] in (0.0, 50.0, 150.0, 200.0) for s in res["subtasks"].values())
    assert res["perception"] == res["subtasks"]["existence"]["score"] + res["subtasks"]["artwork"]["score"]


def test_vqav2_rescoring_and_testdev_submission(tiny, tmp_path):
    qs = {"data_subtype": "val2014", "questions": [{"image_id": 1, "question": "How many?", "question_id": 10},
                                                   {"image_id": 2, "question": "What color?", "question_id": 20}]}
    ann = {"annotations": [{"question_id": 10, "answer_type": "number", "answers": [{"answer": "2"}] * 10},
                           {"question_id": 20, "answer_type": "other",
                            "answers": [{"answer": "red"}] * 2 + [{"answer": "blue"}] * 8}]}
    (tmp_path / "q.json").write_text(json.dumps(qs))
    (tmp_path / "a.json").write_text(json.dumps(ann))
    (tmp_path / "p.jsonl").write_text('{"question_id": "10", "answer": "Two"}\n'
                                      '{"question_id": "20", "answer": "Red."}\n')
    assert eval_main(["--task", "vqav2", "--questions", str(tmp_path / "q.json"), "--annotations",
                      str(tmp_path / "a.json"), "--predictions", str(tmp_path / "p.jsonl"), "--out",
                      str(tmp_path / "s")]) == 0
    m = json.loads((tmp_path / "s" / "results.json").read_text())["metrics"]
    assert m["accuracy_number"] == 100.0 and m["accuracy_other"] == pytest.approx(60.0)  # 2 of 10 said red
    # test-dev: no annotations -> the model runs and the EvalAI submission is written
    assert eval_main(["--task", "vqav2", *_model_args(tiny), "--questions", str(tmp_path / "q.json"), "--images",
                      str(tiny["images"]), "--out", str(tmp_path / "t"), "--max-new-tokens", "4"]) == 0
    sub = json.loads((tmp_path / "t" / "vqav2_submission.json").read_text())
    assert [s["question_id"] for s in sub] == [10, 20] and all(isinstance(s["answer"], str) for s in sub)
    # EvalAI's test-dev phase takes every test2015 question: the others get "", in test2015's order (LLaVA's
    # converter); saved predictions without annotations make the submission too
    test2015 = tmp_path / "llava_vqav2_mscoco_test2015.jsonl"
    test2015.write_text("".join(json.dumps({"question_id": q, "image": f"{q}.jpg", "text": "?"}) + "\n"
                                for q in (5, 20, 10, 30)))
    assert eval_main(["--task", "vqav2", "--questions", str(tmp_path / "q.json"), "--predictions",
                      str(tmp_path / "p.jsonl"), "--submission-questions", str(test2015), "--out",
                      str(tmp_path / "u")]) == 0
    assert json.loads((tmp_path / "u" / "vqav2_submission.json").read_text()) == [
        {"question_id": 5, "answer": ""}, {"question_id": 20, "answer": "red"}, {"question_id": 10, "answer": "2"},
        {"question_id": 30, "answer": ""}]
    assert json.loads((tmp_path / "u" / "results.json").read_text())["metrics"]["scored"] == 0
    official = tmp_path / "v2_OpenEnded_mscoco_test2015_questions.json"  # the official file: ids 10 only
    official.write_text(json.dumps({"data_subtype": "test2015", "questions": [{"image_id": 1, "question": "?",
                                                                                 "question_id": 10}]}))
    with pytest.raises(ValueError, match=r"1 of the 2 questions of .*q.json are not in .*test2015_questions.json"):
        load_vqav2(tmp_path / "q.json", tmp_path, None, "", official)  # val questions against test2015: refused
    testdev = {**qs, "data_subtype": "test-dev2015"}  # the official test-dev file; its images are test2015's
    (tmp_path / "td.json").write_text(json.dumps(testdev))
    image = load_vqav2(tmp_path / "td.json", tmp_path, None, "").questions[0].image
    assert image.name == "COCO_test2015_000000000001.jpg"


def test_bad_invocations_fail_clearly(tiny, tmp_path, capsys):
    with pytest.raises(SystemExit):
        eval_main(["--task", "gqa", "--images", "x"])  # no --annotations
    assert "--task gqa needs --annotations" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        eval_main(["--task", "pope", "--questions", str(tiny["pope"][0]), "--images", "x"])  # no model
    assert "needs --model and --tokenizer" in capsys.readouterr().err
    assert eval_main(["--task", "geneval-import", "--results", str(tmp_path / "nope.jsonl")]) == 1
    assert "file not found" in capsys.readouterr().err


_M = ["--model", "m", "--tokenizer", "t"]
_POPE = ["--task", "pope", *_M, "--questions", "q.json", "--images", "coco"]
_FID = ["--task", "fid", *_M, "--prompts", "meta.json", "--images", "mjhq", "--inception-weights", "w.pth"]


@pytest.mark.parametrize("argv,message", [
    ([*_POPE, "--annotations", "a.json"], "--annotations does not apply to --task pope"),
    ([*_POPE, "--seed", "1", "--cfg-scale", "2"], "--seed, --cfg-scale do not apply to --task pope"),
    ([*_POPE, "--candidates", "4"], "--candidates does not apply to --task pope"),
    ([*_POPE, "--predictions", "p.jsonl"], "--model, --tokenizer, --images do not apply to --task pope with "
                                           "--predictions"),
    ([*_POPE, "--llava-questions", "llava_pope_test.jsonl"], "--llava-questions does not apply to --task pope"),
    (["--task", "mme", "--images", "MME", "--predictions", "p.jsonl", "--batch-size", "2"],
     "--batch-size does not apply to --task mme with --predictions"),
    ([*_FID, "--num-images", "2"], "--num-images does not apply to --task fid"),
    ([*_FID, "--max-new-tokens", "9", "--prompt-suffix", ""], "--prompt-suffix, --max-new-tokens do not apply"),
    (["--task", "genai-export", *_M, "--prompts", "p.txt", "--num-images", "4"],
     "--num-images does not apply to --task genai-export"),
    (["--task", "geneval-import", "--results", "r.jsonl", *_M, "--device", "cpu"],
     "--model, --tokenizer, --device do not apply to --task geneval-import"),
    (["--task", "gqa", *_M, "--annotations", "a.json", "--images", "i", "--questions", "a", "--questions", "b"],
     "--task gqa takes at most one --questions file"),
    (["--task", "fid", "--model", "m", "--prompts", "p", "--images", "i", "--inception-weights", "w"],
     "give both --model and --tokenizer"),
])
def test_flags_the_task_does_not_read_are_errors(argv, message, capsys):
    from mllm.evaluate.cli import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2 and message in " ".join(capsys.readouterr().err.replace("│", "").split())


def test_task_defaults_and_shared_batch_flags():
    """--batch-size/--limit batch both kinds of task; GenEval defaults to 4 images per prompt, yet takes 1."""
    from mllm.evaluate.cli import parse_args

    cfg = parse_args([*_FID, "--batch-size", "3", "--limit", "5", "--seed", "7"])
    assert (cfg.generation.batch_size, cfg.generation.limit, cfg.generation.seed) == (3, 5, 7)
    assert cfg.engine.model == "m" and cfg.engine.device is None
    ge = ["--task", "geneval-export", *_M, "--prompts", "meta.jsonl"]
    assert parse_args(ge).gen.num_images == 4 and parse_args([*ge, "--num-images", "1"]).gen.num_images == 1
    assert parse_args(["--task", "genai-export", *_M, "--prompts", "p.txt"]).gen.num_images == 1
    assert parse_args([*_FID, "--candidates", "4"]).gen.candidates == 4  # ranked samples go with every image task
    pope = parse_args([*_POPE, "--prompt-suffix", "\\nShort answer."])
    assert pope.prompt_suffix == "\nShort answer." and pope.inference.batch_size == 8
    assert parse_args(["--task", "pope", "--questions", "q", "--predictions", "p"]).engine is None


def _random_inception(path: Path) -> Path:
    """torch-fidelity's InceptionV3 with random weights (no download), saved as a plain state dict."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    with mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None), \
            mock.patch("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", lambda *a, **k: {}):
        torch.manual_seed(0)
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"])
        for m in net.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.save(net.state_dict(), path)
    return path


def test_generation_tasks(tiny, tmp_path):
    """FID on an MJHQ-style folder, GenEval and GenAI-Bench export layouts, with the tiny model."""
    rng = np.random.default_rng(1)
    meta = {f"img{i}": {"prompt": f"a {c} circle", "category": "people" if i % 2 else "animals"}
            for i, c in enumerate(("red", "blue", "green"))}
    (tmp_path / "meta_data.json").write_text(json.dumps(meta))
    for i, k in enumerate(meta):
        sub = tmp_path / "mjhq" / meta[k]["category"]
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(sub / f"{k}.jpg")
    weights = _random_inception(tmp_path / "inception.pth")
    assert eval_main(["--task", "fid", *_model_args(tiny), "--prompts", str(tmp_path / "meta_data.json"), "--images",
                      str(tmp_path / "mjhq"), "--inception-weights", str(weights), "--out", str(tmp_path / "fid"),
                      "--batch-size", "2", "--cfg-scale", "2.0"]) == 0
    m = json.loads((tmp_path / "fid" / "results.json").read_text())["metrics"]
    assert m["num_images"] == 3 and m["fid"] >= 0 and m["is"] > 0
    for k in meta:
        assert Image.open(tmp_path / "fid" / "generated" / f"{k}.png").size == (32, 32)
        assert Image.open(tmp_path / "fid" / "reference" / f"{k}.png").size == (32, 32)

    lines = [{"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"},
             {"tag": "counting", "include": [{"class": "cat", "count": 2}], "prompt": "a photo of two cats"}]
    (tmp_path / "evaluation_metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert eval_main(["--task", "geneval-export", *_model_args(tiny), "--prompts",
                      str(tmp_path / "evaluation_metadata.jsonl"), "--out", str(tmp_path / "ge"), "--num-images",
                      "2"]) == 0
    for i, meta_line in enumerate(lines):
        folder = tmp_path / "ge" / f"{i:05d}"
        assert json.loads((folder / "metadata.jsonl").read_text()) == meta_line  # GenEval reads it with json.load
        assert sorted(p.name for p in (folder / "samples").iterdir()) == ["0000.png", "0001.png"]

    (tmp_path / "prompts.txt").write_text("a dog\n\na cat on a mat\n")
    assert eval_main(["--task", "genai-export", *_model_args(tiny), "--prompts", str(tmp_path / "prompts.txt"),
                      "--out", str(tmp_path / "ga")]) == 0
    # ids are 1-based line numbers (a blank line is skipped but keeps its number), as the release's scripts pair them
    assert sorted(p.name for p in (tmp_path / "ga").glob("*.jpg")) == ["00001.jpg", "00003.jpg"]
    assert json.loads((tmp_path / "ga" / "prompts.json").read_text()) == {"00001": "a dog", "00003": "a cat on a mat"}


def test_a_rerun_into_the_same_out_scores_only_its_own_images(tmp_path):
    """FID reads every PNG of OUT/generated and OUT/reference, GenEval's script every OUT/<5-digit> folder: a
    smaller second run into the same --out leaves only its own images there."""
    from mllm.engine import ImageGenConfig
    from mllm.evaluate import GenerationRun, geneval_export, run_fid

    class Engine:
        device, image_size = "cpu", 16

        def generate(self, prompts, gen, generator):
            return np.zeros((len(prompts) * gen.num_images, 16, 16, 3), np.uint8)

    meta = {f"id{i}": {"prompt": f"p{i}", "category": "c"} for i in range(6)}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    (tmp_path / "ref").mkdir()
    for k in meta:
        Image.new("RGB", (20, 24)).save(tmp_path / "ref" / f"{k}.jpg")
    read = {}

    def fid_is(gen, ref, weights):
        read.update(gen=sorted(p.stem for p in gen.glob("*.png")), ref=sorted(p.stem for p in ref.glob("*.png")))
        return {"rfid": 0.0, "is": 1.0}

    with mock.patch("unitok.evaluate.check_local_weights"), mock.patch("unitok.evaluate.fid_is", fid_is):
        for limit in (None, 2):
            m = run_fid(Engine(), tmp_path / "meta.json", tmp_path / "ref", "w", tmp_path / "fid", ImageGenConfig(),
                        GenerationRun(limit=limit))
        assert m["num_images"] == 2 and read == {"gen": ["id0", "id1"], "ref": ["id0", "id1"]}
        with pytest.raises(ValueError, match="which this run empties"):  # references kept there are not deleted
            run_fid(Engine(), tmp_path / "meta.json", tmp_path / "fid" / "reference", "w", tmp_path / "fid",
                    ImageGenConfig(), GenerationRun())

    (tmp_path / "gm.jsonl").write_text("\n".join(json.dumps({"prompt": f"p{i}", "tag": "t"}) for i in range(4)))
    (tmp_path / "ge").mkdir()
    (tmp_path / "ge" / "notes.txt").write_text("mine")  # not the tool's: kept
    geneval_export(Engine(), tmp_path / "gm.jsonl", tmp_path / "ge", ImageGenConfig(num_images=3), GenerationRun())
    (tmp_path / "ge" / "results.jsonl").write_text('{"tag": "t", "correct": true}\n')  # the first export's scores
    geneval_export(Engine(), tmp_path / "gm.jsonl", tmp_path / "ge", ImageGenConfig(num_images=1),
                   GenerationRun(limit=2))
    assert sorted(str(p.relative_to(tmp_path / "ge")) for p in (tmp_path / "ge").rglob("*") if p.is_file()) == \
        ["00000/metadata.jsonl", "00000/samples/0000.png", "00001/metadata.jsonl", "00001/samples/0000.png",
         "notes.txt"]
    # GenAI-Bench: OUT/<id>.jpg per prompt; the earlier run's other prompts go
    from mllm.evaluate import genai_export

    (tmp_path / "genai.txt").write_text("\n".join(f"prompt {i}" for i in range(5)))
    for limit in (None, 2):
        genai_export(Engine(), tmp_path / "genai.txt", tmp_path / "ga", ImageGenConfig(num_images=1),
                     GenerationRun(limit=limit))
    assert sorted(p.name for p in (tmp_path / "ga").iterdir()) == ["00001.jpg", "00002.jpg", "prompts.json"]


@pytest.mark.slow
def test_two_nodes_shard_and_only_rank0_writes(tiny, tmp_path):
    """launch/evaluate.sh on two simulated nodes of one rank each (DeepSpeed's no-ssh mode): each rank answers
    half, rank 0 gathers and writes; the same answers as one process."""
    single = tmp_path / "one"
    assert eval_main(_pope_args(tiny, single, 2)) == 0
    out = tmp_path / "two"
    nodes = NodeLaunch("evaluate.sh", _pope_args(tiny, out, 2), tmp_path / "nodes").wait()
    assert [code for code, _ in nodes] == [0, 0], nodes[0][1][-3000:] + nodes[1][1][-3000:]
    assert sorted(x.name for x in out.iterdir()) == ["predictions.jsonl", "results.json", "results.md"]
    a = (single / "predictions.jsonl").read_text().splitlines()
    b = (out / "predictions.jsonl").read_text().splitlines()
    assert a == b  # merged back into question order
    # rank 0 (node 0) alone reports; it saw one rank per node
    assert nodes[0][1].count("### pope") == 1 and "### pope" not in nodes[1][1]
    assert re.search(r"ranks: node 0 \(host [^)]+\): ranks \[0\] local \[0\]; node 1 \(host [^)]+\): ranks \[1\] "
                     r"local \[0\]", nodes[0][1]), nodes[0][1][-2000:]


def test_tokenizer_metrics_are_reexported_and_forwarded(tiny, tmp_path):
    import mllm.evaluate as ev
    import unitok.evaluate as ue

    assert ev.fid_is is ue.fid_is and ev.psnr_ssim is ue.psnr_ssim and ev.codebook_stats is ue.codebook_stats
    assert eval_main(["--task", "tokenizer", "--tokenizer", str(tiny["tok"]), "--images", str(tiny["images"]),
                      "--size", "32", "--out", str(tmp_path)]) == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["num_images"] == 2 and 0 < m["psnr"] < 100 and len(m["codebook_usage_pct"]) == 4


def test_json_and_json_lines_reading(tmp_path):
    from mllm.evaluate.common import read_json_or_jsonl, with_suffix

    one = tmp_path / "coco_pope_random.json"
    one.write_text('{"question_id": 1, "image": "a.jpg", "text": "Is there a dog?", "label": "yes"}\n')
    assert read_json_or_jsonl(one, records=True) == [{"question_id": 1, "image": "a.jpg", "text": "Is there a dog?",
                                                       "label": "yes"}]  # a one-line JSONL is still a record list
    two = tmp_path / "two.json"
    two.write_text('{"a": 1}\n{"a": 2}\n')
    assert read_json_or_jsonl(two) == [{"a": 1}, {"a": 2}]
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="neither JSON nor JSON lines"):
        read_json_or_jsonl(tmp_path / "bad.json")
    suffix = "\nAnswer the question using a single word or phrase."
    assert with_suffix("Is it red?", suffix) == "Is it red?" + suffix
    assert with_suffix("Is it red?" + suffix, suffix) == "Is it red?" + suffix  # LLaVA files already carry it
    assert with_suffix(" Is it red? ", "") == "Is it red?"
