"""MLLM evaluation: understanding benchmarks, text-to-image metrics, tokenizer metrics.

    python -m mllm.evaluate --task TASK --out OUT [--model EXPORT --tokenizer TOKENIZER] [files] [options]

Understanding (greedy answers, scored with each benchmark's own rules; see each module's docstring):
  vqav2    --questions Q.json|Q.jsonl --images COCO_DIR [--annotations v2_mscoco_val2014_annotations.json]
           (no annotations, e.g. test-dev: only OUT/vqav2_submission.json for EvalAI, which lists every
           test2015 question with --submission-questions llava_vqav2_mscoco_test2015.jsonl) mllm.evaluate.vqa
  gqa      --annotations testdev_balanced_questions.json --images GQA_IMAGES [--questions llava_gqa.jsonl]
                                                                                          mllm.evaluate.gqa
  textvqa  --annotations TextVQA_0.5.1_val.json --images train_images [--questions llava_textvqa.jsonl]
                                                                                          mllm.evaluate.vqa
  pope     --questions coco_pope_adversarial.json --questions coco_pope_popular.json ... --images val2014
                                                                                          mllm.evaluate.pope
  mme      --images MME_Benchmark_release_version                                        mllm.evaluate.mme
  options: --batch-size 8 --max-new-tokens 128 --limit N --prompt-suffix TEXT
           --predictions OUT/predictions.jsonl (re-score saved answers without the model; scores cover
           the benchmark's questions, or the first --limit: an unanswered one counts as wrong, num_missing;
           LLaVA's own answers files score too: MME's as they are, POPE's with
           --llava-questions llava_pope_test.jsonl, the file whose question ids they carry)

Generation (release sampling defaults: --cfg-scale 7 --temperature 1 --top-k 0 --top-p 1; see
mllm.evaluate.generation for the layouts):
  fid             --prompts meta_data.json --images MJHQ_IMAGES --inception-weights FILE
  geneval-export  --prompts evaluation_metadata.jsonl [--num-images 4]   (then GenEval's detector)
  geneval-import  --results results.jsonl
  genai-export    --prompts prompts.txt|genai_image.json                   (then VQAScore)
  genai-import    --scores vqascores.json --skills genai_skills.json

Tokenizer: --task tokenizer ARGS...   (forwarded to unitok.evaluate; its metrics are re-exported here)

A flag that the chosen task does not read is an error (`python -m mllm.evaluate --help` lists them all).

Multi-rank: launch with torchrun/deepspeed; questions and prompts are sharded by RANK/WORLD_SIZE,
answers are gathered to rank 0, and only rank 0 writes results (generated images are written by the
rank that made them). Results: OUT/results.json (metrics, resolved config, git SHA) and
OUT/results.md (markdown table); understanding tasks add OUT/predictions.jsonl.
"""
from mllm.evaluate.common import Benchmark, Question, markdown_table, write_results
from mllm.evaluate.generation import (GenerationRun, genai_export, genai_import, geneval_export, geneval_import,
                                      run_fid)
from mllm.evaluate.gqa import load_gqa, normalize_gqa, score_gqa
from mllm.evaluate.mme import load_mme, parse_mme, score_mme, subtask_score
from mllm.evaluate.pope import binary_metrics, load_pope, parse_yes_no, score_pope
from mllm.evaluate.runner import InferenceConfig, answer_questions, run_benchmark
from mllm.evaluate.tokenizer import (check_local_weights, codebook_stats, evaluate_reconstruction, fid_is,
                                     psnr_ssim, run_tokenizer_eval, zero_shot)
from mllm.evaluate.vqa import (evalai_normalize, load_textvqa, load_vqav2, normalize_answer, score_textvqa,
                               score_vqav2, soft_accuracy, textvqa_accuracy, vqav2_accuracy)

__all__ = [
    "Benchmark", "GenerationRun", "InferenceConfig", "Question", "answer_questions", "binary_metrics",
    "check_local_weights", "codebook_stats", "evalai_normalize", "evaluate_reconstruction", "fid_is",
    "genai_export", "genai_import", "geneval_export", "geneval_import", "load_gqa", "load_mme", "load_pope",
    "load_textvqa", "load_vqav2", "markdown_table", "normalize_answer", "normalize_gqa", "parse_mme",
    "parse_yes_no", "psnr_ssim", "run_benchmark", "run_fid", "run_tokenizer_eval", "score_gqa", "score_mme",
    "score_pope", "score_textvqa", "score_vqav2", "soft_accuracy", "subtask_score", "textvqa_accuracy",
    "vqav2_accuracy", "write_results", "zero_shot",
]
