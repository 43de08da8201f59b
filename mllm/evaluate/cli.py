"""Command line of `python -m mllm.evaluate` (task list and files: mllm/evaluate/__init__.py).

Flags are the fields of `EvalConfig` (parsed by tyro; `python -m mllm.evaluate --help`). A flag that the
chosen task does not read is an error naming it (e.g. --annotations with --task pope, --seed with an
understanding task, the model flags with an import task or with --predictions).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal, get_args

from tyro.conf import OmitArgPrefixes, UseAppendAction

from mllm.engine import EngineConfig, EngineOptions, ImageGenConfig
from mllm.evaluate.common import (DEFAULT_SUFFIX, Benchmark, fields_of, markdown_table, read_json_or_jsonl,
                                  write_results)
from mllm.evaluate.generation import GenerationRun
from mllm.evaluate.runner import InferenceConfig
from runtime.cli import parse, refuse_changed, strip_launcher_args

Task = Literal["vqav2", "gqa", "textvqa", "pope", "mme", "fid", "geneval-export", "genai-export", "geneval-import",
               "genai-import", "tokenizer"]
UNDERSTANDING = ("vqav2", "gqa", "textvqa", "pope", "mme")
GENERATION = ("fid", "geneval-export", "genai-export")
IMPORTS = ("geneval-import", "genai-import")
TASKS = UNDERSTANDING + GENERATION + IMPORTS + ("tokenizer",)
assert TASKS == get_args(Task)

# Every file flag; the files each task needs; those it may take besides. `_applicable` adds the model,
# answering and drawing settings by kind of task; every other flag that was set is refused.
_FILES = ("questions", "images", "annotations", "submission_questions", "prompts", "results", "scores", "skills",
          "inception_weights")
_NEEDS: dict[str, tuple[str, ...]] = {
    "vqav2": ("questions", "images"), "gqa": ("annotations", "images"), "textvqa": ("annotations", "images"),
    "pope": ("questions", "images"), "mme": ("images",), "fid": ("prompts", "images", "inception_weights"),
    "geneval-export": ("prompts",), "genai-export": ("prompts",), "geneval-import": ("results",),
    "genai-import": ("scores", "skills"), "tokenizer": ()}
_OPTIONAL: dict[str, tuple[str, ...]] = {"vqav2": ("annotations", "submission_questions"), "gqa": ("questions",),
                                         "textvqa": ("questions",)}
_MODEL = ("model", "tokenizer", *(f"loading.{f.name}" for f in dataclasses.fields(EngineOptions)))
_ANSWERS = ("prompt_suffix", "inference.batch_size", "inference.max_new_tokens", "inference.limit",
            "inference.log_every")
_IMAGES = ("inference.batch_size", "inference.limit", "seed", "gen.cfg_scale", "gen.temperature", "gen.top_k",
           "gen.top_p", "gen.num_images", "gen.candidates")
_ALL = tuple(dict.fromkeys((*_MODEL, *_FILES, "predictions", "llava_questions", *_ANSWERS, *_IMAGES)))  # flag order


@dataclass
class EvalConfig:
    """One evaluation run: the task, its files, the model and the answering / drawing settings."""

    task: Task
    """What to evaluate (the files each task reads are listed above); `--task tokenizer` must come first: the
    remaining arguments go to unitok.evaluate."""
    out: str = "eval_out"
    """Output folder (results.json, results.md, predictions, images)."""
    model: str | None = None
    """MLLM export folder (or the released unitok_mllm folder with --official-mllm); understanding and
    generation tasks."""
    tokenizer: str | None = None
    """UniTok checkpoint folder or official unitok_tokenizer.pth (with --model)."""
    loading: Annotated[EngineOptions, OmitArgPrefixes] = field(default_factory=EngineOptions)
    """How the model is loaded (with --model)."""
    questions: Annotated[list[str], UseAppendAction] = field(default_factory=list)
    """Question file(s): VQAv2 questions JSON/JSONL, optional GQA/TextVQA LLaVA JSONL, POPE coco_pope_*.json
    (repeat for the POPE categories)."""
    images: str | None = None
    """Image folder (VQA tasks), MME release folder, or MJHQ reference images (fid)."""
    annotations: str | None = None
    """Official annotation file (VQAv2 annotations, GQA testdev_balanced_questions.json, TextVQA val JSON)."""
    submission_questions: str | None = None
    """VQAv2 test2015 questions (v2_OpenEnded_mscoco_test2015_questions.json or llava_vqav2_mscoco_test2015.jsonl):
    vqav2_submission.json then lists all of them, an empty answer where this run has none (EvalAI's test-dev
    phase expects the whole test2015 set)."""
    predictions: str | None = None
    """Score this predictions.jsonl instead of running the model (understanding tasks), over the benchmark's
    questions (the first --limit): a question it does not answer counts as wrong (`num_missing`). LLaVA's own
    answers files score too: MME's as they are, POPE's with --llava-questions."""
    llava_questions: str | None = None
    """LLaVA's llava_pope_test.jsonl, whose question ids LLaVA's POPE answers file (--predictions) carries: its
    answers are matched to the --questions files' questions by category, image and question (--task pope)."""
    prompts: str | None = None
    """Prompt set: MJHQ meta_data.json, GenEval evaluation_metadata.jsonl, GenAI prompts.txt/genai_image.json."""
    results: str | None = None
    """GenEval results.jsonl (geneval-import)."""
    scores: str | None = None
    """VQAScore file {id: score} (genai-import)."""
    skills: str | None = None
    """genai_skills.json (genai-import)."""
    inception_weights: str | None = None
    """Local Inception weights for FID/IS (fid)."""
    prompt_suffix: str = DEFAULT_SUFFIX
    """Instruction appended to every question unless already present ("" = none; a typed \\n is a newline)."""
    inference: Annotated[InferenceConfig, OmitArgPrefixes] = field(default_factory=InferenceConfig)
    """Batched answering; --batch-size and --limit also batch and cut the prompts of generation tasks."""
    seed: int = GenerationRun.seed
    """Base seed of generation tasks (see mllm.evaluate.generation)."""
    gen: Annotated[ImageGenConfig, OmitArgPrefixes] = field(default_factory=ImageGenConfig)
    """Sampling settings of generation tasks (fid draws one image per prompt, genai-export too)."""

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; choose from {', '.join(TASKS)}")
        self.prompt_suffix = self.prompt_suffix.replace("\\n", "\n")
        scoring = self.task in UNDERSTANDING and self.predictions is not None
        for name in _NEEDS[self.task]:
            if name == "images" and scoring and self.task != "mme":
                continue  # scoring saved predictions needs no images
            if not getattr(self, name):
                raise ValueError(f"--task {self.task} needs --{name.replace('_', '-')}")
        refuse_changed(self, [p for p in _ALL if p not in self._applicable()],
                       f"to --task {self.task}" + (" with --predictions (scoring saved answers)" if scoring else ""))
        if self.task == "vqav2" and len(self.questions) != 1:
            raise ValueError("--task vqav2 takes exactly one --questions file")
        if self.task in ("gqa", "textvqa") and len(self.questions) > 1:
            raise ValueError(f"--task {self.task} takes at most one --questions file")
        needs_model = self.task in GENERATION or (self.task in UNDERSTANDING and not scoring)
        if needs_model and (self.model is None) != (self.tokenizer is None):
            raise ValueError("give both --model and --tokenizer")
        if needs_model and self.model is None:
            raise ValueError(f"--task {self.task} needs --model and --tokenizer")

    def _applicable(self) -> set[str]:
        """The field paths this task reads."""
        if self.task == "tokenizer":
            return set(_ALL)  # main() forwards `--task tokenizer ...` before parsing; see there
        files = {*_NEEDS[self.task], *_OPTIONAL.get(self.task, ())}
        if self.task in UNDERSTANDING:
            if self.predictions is not None:  # scoring: no model; MME reads its questions from --images
                # --limit: the questions a --limit run answered are the ones scored
                llava = {"llava_questions"} if self.task == "pope" else set()  # MME's answers name their questions
                return (files - ({"images"} if self.task != "mme" else set())) | {"predictions", "inference.limit",
                                                                                  *llava}
            return files | {*_MODEL, *_ANSWERS}
        if self.task in GENERATION:
            one_image = self.task in ("fid", "genai-export")  # FID and GenAI-Bench: one image per prompt
            return files | {*_MODEL, *_IMAGES} - ({"gen.num_images"} if one_image else set())
        return files

    @property
    def engine(self) -> EngineConfig | None:
        """What to load; None without --model (import tasks, scoring saved predictions)."""
        if self.model is None or self.tokenizer is None:
            return None
        return EngineConfig(model=self.model, tokenizer=self.tokenizer, **dataclasses.asdict(self.loading))

    @property
    def generation(self) -> GenerationRun:
        """Batched image generation settings (--batch-size, --seed, --limit)."""
        return GenerationRun(batch_size=self.inference.batch_size, seed=self.seed, limit=self.inference.limit)


@dataclass
class GenEvalExportConfig(EvalConfig):
    """`EvalConfig` of --task geneval-export: GenEval scores 4 images per prompt, so that is the default."""

    gen: Annotated[ImageGenConfig, OmitArgPrefixes] = field(default_factory=lambda: ImageGenConfig(num_images=4))
    """Sampling settings (GenEval scores 4 images per prompt)."""


def load_benchmark(cfg: EvalConfig) -> Benchmark:
    """The understanding benchmark named by cfg.task from its local files."""
    from mllm.evaluate import gqa, mme, pope, vqa

    images = Path(cfg.images or ".")
    if cfg.task == "vqav2":
        return vqa.load_vqav2(cfg.questions[0], images, cfg.annotations, cfg.prompt_suffix, cfg.submission_questions)
    if cfg.task == "gqa":
        return gqa.load_gqa(cfg.annotations, images, cfg.questions[0] if cfg.questions else None, cfg.prompt_suffix)
    if cfg.task == "textvqa":
        return vqa.load_textvqa(cfg.annotations, images, cfg.questions[0] if cfg.questions else None,
                                cfg.prompt_suffix)
    if cfg.task == "pope":
        return pope.load_pope(cfg.questions, images, cfg.prompt_suffix)
    return mme.load_mme(images, cfg.prompt_suffix)


def read_predictions(cfg: EvalConfig, bench: Benchmark) -> tuple[dict[str, str], int]:
    """--predictions -> ({question id of `bench`: answer}, lines read): this runner's predictions.jsonl, LLaVA's
    answers under the benchmark's own ids (VQAv2, GQA), under llava_pope_test.jsonl's (with --llava-questions)
    or under llava_mme.jsonl's (recognised: none of its ids is this runner's). A file none of whose ids is the
    benchmark's is an error, not a run that scores every question as missing."""
    from mllm.evaluate import mme, pope

    rows = read_json_or_jsonl(cfg.predictions, records=True)
    if not rows:
        raise ValueError(f"{cfg.predictions}: no predictions")
    if cfg.llava_questions:
        return pope.from_llava(rows, cfg.predictions, cfg.llava_questions, bench.questions), len(rows)
    with fields_of(cfg.predictions, "this runner's predictions.jsonl or LLaVA's answers JSON lines "
                                    "({'question_id', 'answer' or 'text'})"):
        preds = {str(r["question_id"]): r.get("answer", r.get("text", "")) for r in rows}
    if bench.questions and not any(q.qid in preds for q in bench.questions):
        if cfg.task == "mme":
            return mme.from_llava(rows, cfg.predictions, bench.questions), len(rows)
        hint = (" (LLaVA's POPE answers carry the ids of its llava_pope_test.jsonl: give that file as "
                "--llava-questions)" if cfg.task == "pope" else "")
        raise ValueError(f"{cfg.predictions}: none of its {len(preds)} question ids (e.g. {next(iter(preds))!r}) is "
                         f"a question of --task {cfg.task} (such as {bench.questions[0].qid!r}){hint}")
    return preds, len(rows)


def _config_dict(cfg: EvalConfig) -> dict:
    """The resolved config as written into results.json."""
    return {**dataclasses.asdict(cfg), "engine": dataclasses.asdict(cfg.engine) if cfg.engine else None,
            "generation": dataclasses.asdict(cfg.generation)}


def run(cfg: EvalConfig) -> dict | None:
    """Run one task; rank 0 writes OUT/results.json + results.md and returns the metrics (None elsewhere)."""
    from runtime.distributed import is_main_process

    if cfg.task in IMPORTS:
        from mllm.evaluate.generation import genai_import, geneval_import

        metrics = geneval_import(cfg.results) if cfg.task == "geneval-import" else genai_import(cfg.scores, cfg.skills)
        write_results(cfg.out, cfg.task, metrics, _config_dict(cfg))
        return metrics
    if cfg.task in UNDERSTANDING and cfg.predictions:
        bench = load_benchmark(cfg)
        if bench.score is None and bench.submission is None:
            raise ValueError(f"{cfg.task}: scoring needs --annotations")
        preds, num_rows = read_predictions(cfg, bench)
        qids = [q.qid for q in bench.first(cfg.inference.limit)]
        extra = {f"{bench.name}_submission.json": bench.submission(preds)} if bench.submission else {}
        if bench.score is None:  # test-dev: the server scores the submission file
            metrics = {"num_questions": len(qids), "scored": 0}
        else:  # over the benchmark's questions, not the file's: answers a crashed run never wrote count as wrong
            metrics = bench.score(preds, qids)
            if metrics["num_missing"]:
                print(f"warning: {cfg.predictions} answers {metrics['num_questions'] - metrics['num_missing']} of "
                      f"the {metrics['num_questions']} questions; the {metrics['num_missing']} others count as wrong",
                      file=sys.stderr)
        write_results(cfg.out, cfg.task, metrics, _config_dict(cfg), extra_files=extra, num_predictions=num_rows)
        return metrics

    from mllm.engine import MLLMEngine
    from mllm.evaluate.runner import dist_info

    dist_info()  # join the process group first: it pins this rank's GPU, which the model then loads onto
    bench = load_benchmark(cfg) if cfg.task in UNDERSTANDING else None  # bad inputs fail before the model loads
    engine = MLLMEngine.load(cfg.engine)
    if bench is not None:
        from mllm.evaluate.runner import run_benchmark

        # keeps answers in OUT/partial as they come (a rerun continues them), predictions.jsonl before scoring
        result = run_benchmark(engine, bench, cfg.inference, cfg.out, {"engine": {k: v for k, v in _config_dict(cfg)["engine"].items() if k != "device"}})
        if result is None:
            return None
        rows, metrics = result
        extra = {}
        if bench.submission is not None:
            extra[f"{bench.name}_submission.json"] = bench.submission({r["question_id"]: r["answer"] for r in rows})
        metrics = metrics if metrics is not None else {"num_questions": len(rows), "scored": 0}
        write_results(cfg.out, cfg.task, metrics, _config_dict(cfg), extra_files=extra, num_predictions=len(rows))
        return metrics

    from mllm.evaluate import generation

    if cfg.task == "fid":
        metrics = generation.run_fid(engine, cfg.prompts, cfg.images, cfg.inception_weights, cfg.out, cfg.gen,
                                     cfg.generation)
    elif cfg.task == "geneval-export":
        metrics = generation.geneval_export(engine, cfg.prompts, cfg.out, cfg.gen, cfg.generation)
    else:
        metrics = generation.genai_export(engine, cfg.prompts, cfg.out, cfg.gen, cfg.generation)
    if metrics is not None and is_main_process():
        write_results(cfg.out, cfg.task, metrics, _config_dict(cfg))
    return metrics


def parse_args(argv: list[str] | None = None) -> EvalConfig:
    """Command line -> EvalConfig; exits with status 2 and a message on bad flags, on missing files for the
    task and on flags the task does not read."""
    from mllm.evaluate import __doc__ as doc

    pre = argparse.ArgumentParser(add_help=False)  # the task picks the defaults (as --preset does for training)
    pre.add_argument("--task")
    known, _ = pre.parse_known_args(argv)
    cls = GenEvalExportConfig if known.task == "geneval-export" else EvalConfig
    return parse(cls, argv, prog="python -m mllm.evaluate", description=doc.split("\n\nMulti-rank:")[0])


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    argv = strip_launcher_args(argv)  # the deepspeed launcher appends --local_rank=N
    if argv[:2] == ["--task", "tokenizer"] or argv[:1] == ["--task=tokenizer"]:
        from mllm.evaluate.tokenizer import tokenizer_main

        tokenizer_main(argv[2:] if argv[0] == "--task" else argv[1:])
        return 0
    cfg = parse_args(argv)
    if cfg.task == "tokenizer":
        print("error: put --task tokenizer first; the remaining arguments go to unitok.evaluate", file=sys.stderr)
        return 2
    import torch.distributed as dist

    from runtime.distributed import end_job

    caller_group = dist.is_initialized()  # an in-process caller's group is theirs to keep
    try:
        metrics = run(cfg)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        # tear down the group run_benchmark's dist_info created, on every rank, so that its threads stop here
        # and not in the interpreter's finalisation, where a rank once died after its work was gathered
        # ("terminate called without an active exception"; runtime.distributed._import_group_default_modules).
        # No barrier: after the gather, rank 0's scoring and writing need no collective, and may outlast the
        # group's timeout (generation FID).
        if not caller_group:
            end_job()
    if metrics is not None:
        print(markdown_table(cfg.task, metrics))
    return 0
