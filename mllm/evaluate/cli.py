"""Command line of `python -m mllm.evaluate` (task list and files: mllm/evaluate/__init__.py)."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mllm.engine import EngineConfig, ImageGenConfig, add_engine_args, add_generation_args, engine_config
from mllm.evaluate.common import DEFAULT_SUFFIX, Benchmark, markdown_table, read_json_or_jsonl, write_results
from mllm.evaluate.generation import GenerationRun
from mllm.evaluate.runner import InferenceConfig

UNDERSTANDING = ("vqav2", "gqa", "textvqa", "pope", "mme")
GENERATION = ("fid", "geneval-export", "genai-export")
IMPORTS = ("geneval-import", "genai-import")
TASKS = UNDERSTANDING + GENERATION + IMPORTS + ("tokenizer",)
DEFAULT_NUM_IMAGES = {"geneval-export": 4}  # GenEval scores 4 samples per prompt; the others 1


@dataclass
class EvalConfig:
    """One evaluation run, resolved from the command line."""

    task: str
    """One of TASKS."""
    out: str = "eval_out"
    """Output folder (results.json, results.md, predictions, images)."""
    engine: EngineConfig | None = None
    """Model to load; None for import tasks and for scoring saved predictions."""
    questions: list[str] = field(default_factory=list)
    """Question file(s): VQAv2 questions JSON/JSONL, optional GQA/TextVQA LLaVA JSONL, POPE coco_pope_*.json."""
    images: str | None = None
    """Image folder (VQA tasks), MME release folder, or MJHQ reference images (fid)."""
    annotations: str | None = None
    """Official annotation file (VQAv2 annotations, GQA testdev_balanced_questions.json, TextVQA val JSON)."""
    predictions: str | None = None
    """Score this predictions.jsonl instead of running the model."""
    prompts: str | None = None
    """Prompt set: MJHQ meta_data.json, GenEval evaluation_metadata.jsonl, GenAI prompts.txt/genai_image.json."""
    results: str | None = None
    """GenEval results.jsonl (geneval-import)."""
    scores: str | None = None
    """VQAScore file {id: score} (genai-import)."""
    skills: str | None = None
    """genai_skills.json (genai-import)."""
    inception_weights: str | None = None
    """Local Inception weights for FID/IS."""
    prompt_suffix: str = DEFAULT_SUFFIX
    """Instruction appended to every question unless already present ("" = none)."""
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    """Batched answering settings."""
    generation: GenerationRun = field(default_factory=GenerationRun)
    """Batched image generation settings."""
    gen: ImageGenConfig = field(default_factory=ImageGenConfig)
    """Sampling settings for generation tasks."""

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; choose from {', '.join(TASKS)}")
        need: dict[str, tuple[str, ...]] = {
            "vqav2": ("questions", "images"), "gqa": ("annotations", "images"), "textvqa": ("annotations", "images"),
            "pope": ("questions", "images"), "mme": ("images",), "fid": ("prompts", "images", "inception_weights"),
            "geneval-export": ("prompts",), "genai-export": ("prompts",), "geneval-import": ("results",),
            "genai-import": ("scores", "skills"), "tokenizer": ()}
        for name in need[self.task]:
            if name == "images" and self.predictions and self.task in UNDERSTANDING and self.task != "mme":
                continue  # scoring saved predictions needs no images
            if not getattr(self, name):
                raise ValueError(f"--task {self.task} needs --{name.replace('_', '-')}")
        if self.task == "vqav2" and len(self.questions) != 1:
            raise ValueError("--task vqav2 takes exactly one --questions file")
        needs_model = self.task in GENERATION or (self.task in UNDERSTANDING and not self.predictions)
        if needs_model and self.engine is None:
            raise ValueError(f"--task {self.task} needs --model and --tokenizer")


def load_benchmark(cfg: EvalConfig) -> Benchmark:
    """The understanding benchmark named by cfg.task from its local files."""
    from mllm.evaluate import gqa, mme, pope, vqa

    images = Path(cfg.images or ".")
    if cfg.task == "vqav2":
        return vqa.load_vqav2(cfg.questions[0], images, cfg.annotations, cfg.prompt_suffix)
    if cfg.task == "gqa":
        return gqa.load_gqa(cfg.annotations, images, cfg.questions[0] if cfg.questions else None, cfg.prompt_suffix)
    if cfg.task == "textvqa":
        return vqa.load_textvqa(cfg.annotations, images, cfg.questions[0] if cfg.questions else None,
                                cfg.prompt_suffix)
    if cfg.task == "pope":
        return pope.load_pope(cfg.questions, images, cfg.prompt_suffix)
    return mme.load_mme(images, cfg.prompt_suffix)


def _config_dict(cfg: EvalConfig) -> dict:
    """The resolved config as written into results.json."""
    return dataclasses.asdict(cfg)


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
        if bench.score is None:
            raise ValueError(f"{cfg.task}: scoring needs --annotations")
        rows = read_json_or_jsonl(cfg.predictions, records=True)
        preds = {str(r["question_id"]): r.get("answer", r.get("text", "")) for r in rows}
        metrics = bench.score(preds)
        write_results(cfg.out, cfg.task, metrics, _config_dict(cfg))
        return metrics

    from mllm.engine import MLLMEngine
    from mllm.evaluate.runner import dist_info

    dist_info()  # join the process group first: it pins this rank's GPU, which the model then loads onto
    engine = MLLMEngine.load(cfg.engine)
    if cfg.task in UNDERSTANDING:
        from mllm.evaluate.runner import run_benchmark

        bench = load_benchmark(cfg)
        result = run_benchmark(engine, bench, cfg.inference)
        if result is None:
            return None
        rows, metrics = result
        extra = {}
        if bench.submission is not None:
            extra[f"{bench.name}_submission.json"] = bench.submission({r["question_id"]: r["answer"] for r in rows})
        metrics = metrics if metrics is not None else {"num_questions": len(rows), "scored": 0}
        write_results(cfg.out, cfg.task, metrics, _config_dict(cfg), rows, extra)
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
    """Command line -> EvalConfig; exits with a usage message on bad flags or missing files for the task."""
    from mllm.evaluate import __doc__ as doc

    p = argparse.ArgumentParser(prog="python -m mllm.evaluate", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--out", default="eval_out", help="output folder")
    add_engine_args(p, required=False)
    add_generation_args(p)
    p.set_defaults(num_images=None)
    p.add_argument("--questions", action="append", default=[], help="question file (repeat for POPE categories)")
    p.add_argument("--images", help="image folder / MME folder / MJHQ reference images")
    p.add_argument("--annotations", help="official annotation file")
    p.add_argument("--predictions", help="score this predictions.jsonl instead of running the model")
    p.add_argument("--prompts", help="prompt set for generation tasks")
    p.add_argument("--results", help="GenEval results.jsonl (geneval-import)")
    p.add_argument("--scores", help="VQAScore JSON {id: score} (genai-import)")
    p.add_argument("--skills", help="genai_skills.json (genai-import)")
    p.add_argument("--inception-weights", help="local Inception weights for FID")
    p.add_argument("--prompt-suffix", default=DEFAULT_SUFFIX, help="appended to every question ('' = none)")
    p.add_argument("--batch-size", type=int, default=8, help="questions (or prompts) per batch")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--limit", type=int, default=None, help="only the first N questions/prompts")
    p.add_argument("--seed", type=int, default=0, help="generation seed")
    a = p.parse_args(argv)
    try:
        has_model = a.model is not None or a.tokenizer is not None
        if has_model and not (a.model and a.tokenizer):
            raise ValueError("give both --model and --tokenizer")
        num_images = a.num_images or DEFAULT_NUM_IMAGES.get(a.task, 1)
        return EvalConfig(
            task=a.task, out=a.out, engine=engine_config(a) if has_model else None, questions=a.questions,
            images=a.images, annotations=a.annotations, predictions=a.predictions, prompts=a.prompts,
            results=a.results, scores=a.scores, skills=a.skills, inception_weights=a.inception_weights,
            prompt_suffix=a.prompt_suffix.replace("\\n", "\n"),
            inference=InferenceConfig(batch_size=a.batch_size, max_new_tokens=a.max_new_tokens, limit=a.limit),
            generation=GenerationRun(batch_size=a.batch_size, num_images=num_images, seed=a.seed, limit=a.limit),
            gen=ImageGenConfig(cfg_scale=a.cfg_scale, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                               num_images=num_images))
    except ValueError as e:
        p.error(str(e))


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["--task", "tokenizer"] or argv[:1] == ["--task=tokenizer"]:
        from mllm.evaluate.tokenizer import tokenizer_main

        tokenizer_main(argv[2:] if argv[0] == "--task" else argv[1:])
        return 0
    cfg = parse_args(argv)
    if cfg.task == "tokenizer":
        print("error: put --task tokenizer first; the remaining arguments go to unitok.evaluate", file=sys.stderr)
        return 2
    try:
        metrics = run(cfg)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if metrics is not None:
        print(markdown_table(cfg.task, metrics))
    return 0
