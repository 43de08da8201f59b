"""Text-to-image evaluation: MJHQ-style FID, and export/import hooks for GenEval and GenAI-Bench.

Sampling defaults are the release's (cfg 7.0, temperature 1.0, no top-k/top-p; REFERENCE.md 6.9).
Seeds: each batch uses a generator seeded with seed + the global index of its first prompt, so a
run is reproducible for a given batch size and number of ranks. Every rank writes its own images
(disjoint file names); rank 0 alone writes reference crops, metrics and reports.

FID (`--task fid`, paper Table 5: MJHQ-30K at 256 px):
    --prompts meta_data.json   MJHQ's {image_id: {"prompt", "category"}} (or JSONL {"id", "prompt"})
    --images REF_DIR           the reference images, found by file stem (<image_id>.jpg anywhere below,
                               e.g. mjhq30k_imgs/<category>/<image_id>.jpg)
    --inception-weights FILE   local pt_inception-2015-12-05 weights for torch-fidelity
  One image per prompt -> OUT/generated/<id>.png; references centre-cropped and resized (bicubic) to
  the generation size -> OUT/reference/<id>.png (both folders are emptied first); FID (2048-d pool
  features) and IS from `unitok.evaluate.fid_is` (torch-fidelity, inception-v3-compat).
GenEval (`geneval-export` / `geneval-import`), the layout `evaluation/evaluate_images.py` reads:
    OUT/<00000>/metadata.jsonl  (the prompt's metadata line, one JSON object)
    OUT/<00000>/samples/<0000>.png  (--num-images per prompt, default 4 as GenEval's protocol)
  (the <5-digit> folders of an earlier export into OUT are removed first)
  then: python evaluation/evaluate_images.py OUT --outfile results.jsonl --model-path DETECTOR_DIR
  and:  --task geneval-import --results results.jsonl  -> per-tag accuracy, the overall score (mean of
  the tag accuracies, as summary_scores.py), % correct images and % correct prompts.
GenAI-Bench (`genai-export` / `genai-import`):
    --prompts prompts.txt (one prompt per line; id = 1-based line number 00001.., as the Liquid/UniTok
              scripts pair images with lines; blank lines are skipped but keep their number) or
              genai_image.json ({id: {"prompt", ...}}; ids = its keys)
    export writes OUT/<id>.jpg (one image per prompt, JPEG as the release) and OUT/prompts.json;
    score them with VQAScore (t2v_metrics, clip-flant5-xxl) and save {id: score} as JSON (or JSONL
    {"id", "score"}); then --task genai-import --scores FILE --skills genai_skills.json gives the mean
    score per skill tag ({tag: [prompt numbers]}) and "all" over the union of tagged prompts, the
    grouping t2v_metrics' genai_image_eval.py reports (the README's Count/Differ/Compare/Negate/
    Universal/Overall columns are counting/differentiation/comparison/negation/universal/all).
"""
from __future__ import annotations

import dataclasses
import json
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from mllm.evaluate.common import fields_of, read_json_or_jsonl
from runtime.distributed import barrier, check_shared_outputs, clear_outputs


@dataclass
class GenerationRun:
    """How images are generated for a prompt set."""

    batch_size: int = 4
    """Prompts per generate call (each prompt also runs a null-prompt row under CFG)."""
    seed: int = 0
    """Base seed (see the module docstring)."""
    limit: int | None = None
    """Only the first N prompts."""

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")


def _generate_sharded(engine, prompts: list[tuple[str, str]], gen_cfg, run: GenerationRun, rank: int, world: int,
                      write) -> int:
    """Generate for this rank's share of (id, prompt); `write(id, j, uint8 image)` stores each image."""
    items = list(enumerate(prompts))[rank::world]
    count = 0
    for i in range(0, len(items), run.batch_size):
        batch = items[i:i + run.batch_size]
        generator = torch.Generator(device=engine.device).manual_seed(run.seed + batch[0][0])
        images = engine.generate([p for _, (_, p) in batch], gen_cfg, generator)  # grouped by prompt
        for k, (_, (pid, _)) in enumerate(batch):
            for j in range(gen_cfg.num_images):
                write(pid, j, images[k * gen_cfg.num_images + j])
                count += 1
    return count


# ---- FID --------------------------------------------------------------------------------------
def load_mjhq_prompts(path: str | Path) -> list[tuple[str, str, str]]:
    """[(id, prompt, category)] from MJHQ meta_data.json (or JSONL {"id", "prompt"[, "category"]})."""
    data = read_json_or_jsonl(path)
    if isinstance(data, dict) and "prompt" in data and "id" in data:
        data = [data]  # a one-line JSONL
    with fields_of(path, "MJHQ's meta_data.json ({id: {'prompt', 'category'}}) or JSON lines {'id', 'prompt'}"):
        if isinstance(data, dict):
            rows = [(str(k), v["prompt"], v.get("category", "")) for k, v in data.items()]
        else:
            rows = [(str(r["id"]), r["prompt"], r.get("category", "")) for r in data]
    if not rows:
        raise ValueError(f"no prompts in {path}")
    return rows


def reference_index(folder: str | Path) -> dict[str, Path]:
    """{file stem: path} of the images below `folder`."""
    from unitok.evaluate import list_images

    index: dict[str, Path] = {}
    for p in list_images(Path(folder)):
        if p.stem in index:
            raise ValueError(f"two reference images named {p.stem}: {index[p.stem]} and {p}")
        index[p.stem] = p
    return index


def center_crop_resize(img: Image.Image, size: int) -> Image.Image:
    """Centre square crop, then bicubic resize to size x size."""
    w, h = img.size
    s = min(w, h)
    img = img.convert("RGB").crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return img.resize((size, size), Image.BICUBIC)


def run_fid(engine, prompts_file: str | Path, ref_dir: str | Path, weights: str | Path, out_dir: str | Path,
            gen_cfg, run: GenerationRun) -> dict | None:
    """Generate one image per prompt, write references, compute FID/IS on rank 0 (None elsewhere)."""
    from mllm.evaluate.runner import dist_info
    from unitok.evaluate import check_local_weights, fid_is

    check_local_weights(weights)  # fail before generating anything
    rank, world = dist_info()
    rows = load_mjhq_prompts(prompts_file)[:run.limit] if run.limit else load_mjhq_prompts(prompts_file)
    if len(rows) < 2:
        raise ValueError("FID needs at least 2 prompts")
    out = Path(out_dir)
    gen_dir, ref_out = out / "generated", out / "reference"
    if any(Path(ref_dir).resolve().is_relative_to(d.resolve()) for d in (gen_dir, ref_out)):
        raise ValueError(f"--images {ref_dir} is inside {gen_dir} or {ref_out}, which this run empties")
    refs = reference_index(ref_dir)
    missing = [pid for pid, _, _ in rows if pid not in refs]
    if missing:
        raise FileNotFoundError(f"{len(missing)} prompts have no reference image under {ref_dir} (e.g. {missing[:3]})")
    clear_outputs([gen_dir, ref_out])  # FID reads every PNG there
    gen_dir.mkdir(parents=True, exist_ok=True)
    one = dataclasses.replace(gen_cfg, num_images=1)  # FID: one image per prompt
    _generate_sharded(engine, [(pid, p) for pid, p, _ in rows], one, run, rank, world,
                      lambda pid, j, arr: Image.fromarray(arr).save(gen_dir / f"{pid}.png"))
    barrier()
    check_shared_outputs(lambda: sum((gen_dir / f"{pid}.png").is_file() for pid, _, _ in rows), len(rows), gen_dir,
                         "--out")
    if rank != 0:
        return None
    ref_out.mkdir(parents=True, exist_ok=True)
    for pid, _, _ in rows:
        with Image.open(refs[pid]) as im:
            center_crop_resize(im, engine.image_size).save(ref_out / f"{pid}.png")
    m = fid_is(gen_dir, ref_out, Path(weights))
    return {"fid": m["rfid"], "is": m["is"], "num_images": len(rows), "image_size": engine.image_size}


# ---- GenEval ----------------------------------------------------------------------------------
def geneval_export(engine, metadata_file: str | Path, out_dir: str | Path, gen_cfg, run: GenerationRun) -> dict | None:
    """Write GenEval's folder layout for every prompt of evaluation_metadata.jsonl."""
    from mllm.evaluate.runner import dist_info

    rank, world = dist_info()
    meta = read_json_or_jsonl(metadata_file, records=True)
    if not isinstance(meta, list) or not all("prompt" in m for m in meta):
        raise ValueError(f"{metadata_file}: expected GenEval's evaluation_metadata.jsonl (one JSON object per line)")
    meta = meta[:run.limit] if run.limit else meta
    out = Path(out_dir)
    ids = [f"{i:05d}" for i in range(len(meta))]
    # GenEval's script scores every <5-digit>/samples/*.png under OUT, and the results file that "next" names
    # would otherwise hold the earlier images' scores until it is rerun; other files in OUT are left alone
    stale = [d for d in out.iterdir() if d.is_dir() and re.fullmatch(r"\d{5}", d.name)] if out.is_dir() else []
    clear_outputs([*stale, out / "results.jsonl"])
    for i in range(rank, len(meta), world):  # each rank writes its own prompts' folders
        d = out / ids[i] / "samples"
        d.mkdir(parents=True, exist_ok=True)
        (out / ids[i] / "metadata.jsonl").write_text(json.dumps(meta[i]) + "\n")

    def write(pid: str, j: int, arr) -> None:
        Image.fromarray(arr).save(out / pid / "samples" / f"{j:04d}.png")

    n = _generate_sharded(engine, [(pid, m["prompt"]) for pid, m in zip(ids, meta)], gen_cfg, run, rank, world, write)
    total = gather_count(n)  # after every rank's last image: the collective waits for them all
    check_shared_outputs(lambda: sum(1 for _ in out.glob("[0-9][0-9][0-9][0-9][0-9]/samples/*.png")), total, out,
                         "--out")  # GenEval reads OUT whole (its stale folders were removed above)
    if rank != 0:
        return None
    return {"num_prompts": len(meta), "num_images": total, "images_per_prompt": gen_cfg.num_images,
            "next": f"python evaluation/evaluate_images.py {out} --outfile {out}/results.jsonl "
                    "--model-path DETECTOR_DIR"}


def gather_count(n: int) -> int:
    """Sum of `n` over ranks."""
    from runtime.distributed import all_reduce_sum

    return int(all_reduce_sum(torch.tensor([n], dtype=torch.long)).item())


def geneval_import(results_file: str | Path) -> dict:
    """GenEval results.jsonl -> per-tag accuracy, overall (mean over tags), image/prompt accuracy (percent)."""
    rows = read_json_or_jsonl(results_file, records=True)
    if not isinstance(rows, list) or not rows or not all("tag" in r and "correct" in r for r in rows):
        raise ValueError(f"{results_file}: expected GenEval's results.jsonl (lines with 'tag', 'correct', 'metadata')")
    by_tag: dict[str, list[bool]] = {}
    by_prompt: dict[str, list[bool]] = {}
    for r in rows:  # tag order of first appearance, as summary_scores.py (groupby sort=False)
        by_tag.setdefault(r["tag"], []).append(bool(r["correct"]))
        key = r["metadata"] if isinstance(r.get("metadata"), str) else json.dumps(r.get("metadata", r.get("prompt")))
        by_prompt.setdefault(key, []).append(bool(r["correct"]))
    tags = {t: 100.0 * sum(v) / len(v) for t, v in by_tag.items()}
    return {"overall": statistics.fmean(tags.values()), "tags": tags,
            "correct_images": 100.0 * sum(r["correct"] for r in rows) / len(rows),
            "correct_prompts": 100.0 * sum(any(v) for v in by_prompt.values()) / len(by_prompt),
            "num_images": len(rows), "num_prompts": len(by_prompt)}


# ---- GenAI-Bench ------------------------------------------------------------------------------
def load_genai_prompts(path: str | Path) -> list[tuple[str, str]]:
    """[(id, prompt)] from prompts.txt (ids 00001..) or genai_image.json ({id: {"prompt"}})."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    if path.suffix == ".txt":
        lines = [ln.strip() for ln in path.read_text().splitlines()]
        rows = [(f"{i + 1:05d}", ln) for i, ln in enumerate(lines) if ln]
    else:
        data = read_json_or_jsonl(path)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected genai_image.json ({{id: {{'prompt': ...}}}}) or a .txt file")
        rows = [(str(k), v["prompt"] if isinstance(v, dict) else str(v)) for k, v in data.items()]
    if not rows:
        raise ValueError(f"no prompts in {path}")
    return rows


def genai_export(engine, prompts_file: str | Path, out_dir: str | Path, gen_cfg, run: GenerationRun) -> dict | None:
    """One JPEG per prompt as OUT/<id>.jpg plus OUT/prompts.json."""
    from mllm.evaluate.runner import dist_info

    if gen_cfg.num_images != 1:
        raise ValueError("GenAI-Bench scores one image per prompt: use --num-images 1")
    rank, world = dist_info()
    every = load_genai_prompts(prompts_file)
    rows = every[:run.limit] if run.limit else every
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # an earlier run's images: VQAScore reads OUT whole, and they would pass the count below
    clear_outputs([out / f"{pid}.jpg" for pid, _ in every])
    n = _generate_sharded(engine, rows, gen_cfg, run, rank, world,
                          lambda pid, j, arr: Image.fromarray(arr).save(out / f"{pid}.jpg", quality=95))
    total = gather_count(n)
    check_shared_outputs(lambda: sum((out / f"{pid}.jpg").is_file() for pid, _ in rows), total, out, "--out")
    if rank != 0:
        return None
    (out / "prompts.json").write_text(json.dumps(dict(rows), indent=1))
    return {"num_prompts": len(rows), "num_images": total}


def genai_import(scores_file: str | Path, skills_file: str | Path) -> dict:
    """VQAScores {id: score} + genai_skills.json {tag: [prompt numbers]} -> mean score per tag and "all"."""
    data = read_json_or_jsonl(scores_file)
    if isinstance(data, dict) and set(data) == {"id", "score"}:
        data = [data]  # a one-line JSONL
    if isinstance(data, list):
        with fields_of(scores_file, "{id: score} JSON or JSON lines {'id', 'score'}"):
            data = {str(r["id"]): r["score"] for r in data}
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{scores_file}: expected {{id: score}} JSON or JSONL lines {{'id', 'score'}}")
    scores = {str(k).zfill(5) if str(k).isdigit() else str(k): float(v) for k, v in data.items()}
    skills = read_json_or_jsonl(skills_file)
    if not isinstance(skills, dict):
        raise ValueError(f"{skills_file}: expected genai_skills.json ({{tag: [prompt numbers]}})")
    tags, union = {}, set()
    for tag, idxs in skills.items():
        ids = [f"{int(i):05d}" for i in idxs]
        have = [scores[i] for i in ids if i in scores]
        if have:
            tags[tag] = statistics.fmean(have)
            union.update(i for i in ids if i in scores)
    if not union:
        raise ValueError("no scored prompt appears in the skills file (ids must match, e.g. 00001)")
    return {"all": statistics.fmean(scores[i] for i in union), "tags": tags, "num_scored": len(scores),
            "num_tagged": len(union)}
