"""Tokenizer evaluation: reconstruction (rFID, IS, PSNR, SSIM), codebook usage, zero-shot accuracy, linear probe.

    python -m unitok.evaluate --tokenizer CKPT --images REF_DIR [--inception-weights FILE]
        [--zeroshot-dir IMAGEFOLDER [--classnames imagenet|folders]] [--probe-dir IMAGEFOLDER]
        [--size 256] [--out OUT_DIR]
    (--inception-weights goes with --images, --classnames with --zeroshot-dir; python -m unitok.evaluate --help)

- Reconstruction: each image of REF_DIR is read as training reads it (`load_image`, `val_transform`: Resize +
  CenterCrop(size)), encoded and decoded; the reconstructions are written as PNGs under OUT_DIR/recon and
  compared with the centre crops (written under OUT_DIR/reference; both folders are emptied first) by PSNR
  and SSIM (scikit-image) and, with --inception-weights, by rFID and IS from torch-fidelity's
  `inception-v3-compat` extractor (REFERENCE.md 5.1). The weights file must be local; it is checked before
  anything else runs: with `torch.load(weights_only=True)`, because torch-fidelity itself unpickles it without
  that guard, and against the extractor's tensor names and shapes (`check_local_weights`).
- Codebook: per-codebook usage (% of entries hit) and perplexity exp(H(code histogram)).
- Zero-shot: open_clip's zero-shot classifier (class names x templates, averaged and renormalised
  text embeddings) against `encode_image` (the quantized path); top-1 and top-5.
- Linear probe: a multinomial logistic regression on the frozen, L2-normalised `encode_image`
  features (the zero-shot path's), fitted on one half of each class and scored on the other
  (`probe_split`); top-1. A second read of understanding that does not go through the text tower.

Every input (the folders, the probe's classes, --classnames imagenet's folder names, a --templates file, the
Inception weights) is checked before the tokenizer loads, so that a bad one does not fail after the pass and
lose its results. An earlier run's metrics.json is removed with recon/ and reference/, and this run's is
written atomically at the end; it records the tokenizer's attention mode and code-path fingerprint.

Multi-rank: images are split across ranks; counts (and the probe's features) are all-reduced; only
rank 0 writes JSON.
"""
from __future__ import annotations

import json
import math
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from runtime.cli import parse, refuse_changed
from runtime.distributed import all_reduce_sum
from runtime.run import write_json_atomic

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


@dataclass
class TokenizerEvalConfig:
    """One tokenizer evaluation: reconstruction on --images, zero-shot on --zeroshot-dir, a probe on --probe-dir."""

    tokenizer: str
    """Checkpoint folder or official unitok_tokenizer.pth."""
    attn_mode: Literal["full", "causal"] | None = None
    """Projection attention of an official .pth (default full). A checkpoint folder records its own: given with
    a folder it must match it (a folder cannot be evaluated in the other mode)."""
    images: str | None = None
    """Folder of reference images for the reconstruction metrics (PSNR, SSIM, codebook usage)."""
    inception_weights: str | None = None
    """Local weights-inception-2015-12-05-6726825d.pth for rFID/IS (with --images)."""
    zeroshot_dir: str | None = None
    """ImageFolder for zero-shot classification."""
    classnames: Literal["imagenet", "folders"] = "folders"
    """Zero-shot class names: ImageNet's (1000 class folders) or the folder names (with --zeroshot-dir)."""
    templates: str = "imagenet"
    """Zero-shot prompt templates: `imagenet` (OpenAI's 80 ImageNet prompts) or a text file with one template
    per line, `{}` marking the class name (a dataset's own phrasings, as CLIP evaluations use per dataset)."""
    probe_dir: str | None = None
    """ImageFolder for a linear probe on the frozen image features (may be the zero-shot folder); every class
    needs >= 2 images: even positions (sorted) train the probe, odd ones test it."""
    size: int = 256
    """Image side (Resize + CenterCrop); a multiple of 16 (the tokenizer's patch)."""
    batch_size: int = 16
    """Images per forward."""
    out: str = "eval_out"
    """Output folder (metrics.json, recon/, reference/)."""
    local_rank: int | None = None
    """Passed by the deepspeed launcher; the rank is read from the environment (LOCAL_RANK)."""

    def __post_init__(self):
        if not self.images and not self.zeroshot_dir and not self.probe_dir:
            raise ValueError("give --images, --zeroshot-dir and/or --probe-dir")
        if not self.images:
            refuse_changed(self, ["inception_weights"], "without --images (rFID/IS compare reconstructions)")
        if not self.zeroshot_dir:
            refuse_changed(self, ["classnames", "templates"], "without --zeroshot-dir")
        elif self.templates != "imagenet":
            read_templates(self.templates)  # a bad file fails here, before the model loads
        if self.size <= 0 or self.batch_size < 1:
            raise ValueError("--size and --batch-size must be positive")
        from unitok.config import DOWNSAMPLE

        if self.size % DOWNSAMPLE:  # else encode refuses it, after the tokenizer loaded and --out was cleared
            raise ValueError(f"--size {self.size} must be a multiple of {DOWNSAMPLE} (the tokenizer's patch size)")
        if self.images:
            check_out_apart_from_images(Path(self.out), Path(self.images))


def check_out_apart_from_images(out: Path, images: Path) -> None:
    """Refuse an --out whose recon/ or reference/ is, lies inside or contains --images: the run empties those
    folders first (deleting the inputs) and lists --images recursively (taking an earlier run's PNGs as inputs)."""
    src = images.resolve()
    for sub in ("recon", "reference"):
        dst = (out / sub).resolve()
        if dst.is_relative_to(src) or src.is_relative_to(dst):
            raise ValueError(f"--out {out}: its {sub}/ folder overlaps --images {images} (the run empties {sub}/ "
                             f"and reads --images recursively); choose an --out outside --images")


def list_images(folder: Path) -> list[Path]:
    """Sorted image files under `folder` (recursive)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise ValueError(f"no images in {folder}")
    return files


def load_val_image(path: Path, size: int) -> torch.Tensor:
    """`load_image` (alpha on white, 16-bit scaled, as training reads it) + `val_transform` (Resize short side,
    bicubic, + CenterCrop) -> (3, size, size) in [-1, 1]."""
    from unitok.data import val_transform
    from unitok.image_io import load_image

    return val_transform(load_image(path), size)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) uint8."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()


def psnr_ssim(ref: np.ndarray, rec: np.ndarray) -> tuple[float, float]:
    """PSNR (dB) and SSIM of two uint8 images."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    psnr = peak_signal_noise_ratio(ref, rec, data_range=255)
    ssim = structural_similarity(ref, rec, channel_axis=2, data_range=255)
    return float(min(psnr, 100.0)), float(ssim)


def codebook_stats(counts: torch.Tensor) -> dict[str, list[float]]:
    """counts (K, V) -> usage percent and perplexity per codebook."""
    p = counts / counts.sum(1, keepdim=True).clamp_min(1)
    ent = -(p * torch.log(p.clamp_min(1e-12))).sum(1)
    return {"usage_pct": ((counts > 0).float().mean(1) * 100).tolist(), "perplexity": ent.exp().tolist()}


def _inception_layout() -> dict[str, torch.Size]:
    """Names and shapes of the state dict torch-fidelity's FeatureExtractorInceptionV3 loads (strictly), from the
    class itself built on the meta device: no weights are read and nothing is downloaded (its constructor loads
    the URL when given no path, so it is handed an empty in-memory state dict whose load is skipped)."""
    import io

    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Layout(FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):  # the constructor's load; only the layout is wanted here
            return None

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    with torch.device("meta"):
        net = Layout("inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=empty)
    return {k: v.shape for k, v in net.state_dict().items()}


def check_local_weights(path: str | Path) -> Path:
    """Refuse a missing file, one that holds anything but tensors, and one that is not torch-fidelity's
    inception-v3-compat state dict (names and shapes), so that a wrong --inception-weights fails before any
    image is reconstructed or generated rather than in torch-fidelity at the end."""
    path = Path(path).expanduser()
    if not path.is_file():
        from runtime.weights import fetch_hint

        raise FileNotFoundError(f"--inception-weights: Inception weights not found: {path}; {fetch_hint('inception')}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means we will not hand it to an unsafe loader
        raise ValueError(f"--inception-weights {path} is not a plain tensor state dict (refusing to unpickle it): "
                         f"{e}") from e
    if not isinstance(state, dict):
        raise ValueError(f"--inception-weights {path} holds a {type(state).__name__}, not a state dict")
    want = _inception_layout()
    # torch fills a missing num_batches_tracked of a BatchNorm saved without version metadata (older files)
    lenient = getattr(state, "_metadata", None) is None
    missing = [k for k in want if k not in state and not (lenient and k.endswith(".num_batches_tracked"))]
    unexpected = [k for k in state if k not in want]
    reshaped = [f"{k} {tuple(state[k].shape)} (expected {tuple(want[k])})" for k in want
                if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != want[k]]
    if missing or unexpected or reshaped:
        from runtime.weights import fetch_hint

        found = [f"{len(v)} {what} (e.g. {', '.join(v[:3])})" for what, v in
                 (("missing", missing), ("unexpected", unexpected), ("with another shape", reshaped)) if v]
        raise ValueError(f"--inception-weights {path} is not torch-fidelity's inception-v3-compat state dict "
                         f"({len(want)} tensors): {'; '.join(found)}. It must be "
                         f"weights-inception-2015-12-05-6726825d.pth; {fetch_hint('inception')}")
    return path


def fid_is(recon_dir: Path, ref_dir: Path, weights: Path, batch_size: int = 64) -> dict[str, float]:
    """rFID and IS with torch-fidelity's inception-v3-compat extractor on local weights."""
    import torch_fidelity

    n = sum(1 for _ in recon_dir.glob("*.png"))
    m = torch_fidelity.calculate_metrics(
        input1=str(recon_dir), input2=str(ref_dir), fid=True, isc=True, feature_extractor="inception-v3-compat",
        feature_layer_fid="2048", feature_layer_isc="logits_unbiased",
        feature_extractor_weights_path=str(check_local_weights(weights)), batch_size=batch_size,
        isc_splits=max(1, min(10, n // 2)),  # 10 splits as in the release; fewer on tiny folders
        samples_shuffle=True, rng_seed=0, save_cpu_ram=True, cuda=torch.cuda.is_available(), verbose=False)
    return {"rfid": float(m["frechet_inception_distance"]), "is": float(m["inception_score_mean"])}


@torch.no_grad()
def evaluate_reconstruction(model, images: list[Path], size: int, out_dir: Path, batch_size: int = 16,
                            rank: int = 0, world: int = 1) -> dict:
    """Reconstruct this rank's share of `images`; write PNGs; return summed metrics and code counts."""
    device = model.device
    K, V = model.num_codebooks, model.codebook_size
    counts = torch.zeros(K, V, dtype=torch.float64)
    mine = list(enumerate(images))[rank::world]  # (global index, path): the index names the PNGs
    psnr_sum = ssim_sum = 0.0
    (out_dir / "recon").mkdir(parents=True, exist_ok=True)
    (out_dir / "reference").mkdir(parents=True, exist_ok=True)
    for i in range(0, len(mine), batch_size):
        idx, paths = zip(*mine[i:i + batch_size])
        x = torch.stack([load_val_image(p, size) for p in paths]).to(device)
        codes = model.encode(x)
        rec = model.decode(codes)
        counts += torch.stack([torch.bincount(codes[:, k].flatten().cpu(), minlength=V) for k in range(K)]).double()
        for j, a, b in zip(idx, x, rec):
            ref8, rec8 = to_uint8(a), to_uint8(b)
            ps, ss = psnr_ssim(ref8, rec8)
            psnr_sum += ps
            ssim_sum += ss
            name = f"{j:06d}.png"
            Image.fromarray(ref8).save(out_dir / "reference" / name)
            Image.fromarray(rec8).save(out_dir / "recon" / name)
    return {"n": len(mine), "psnr_sum": psnr_sum, "ssim_sum": ssim_sum, "counts": counts}


@torch.no_grad()
def image_features(model, paths: list[Path], size: int, batch_size: int = 32, rank: int = 0,
                   world: int = 1) -> torch.Tensor:
    """L2-normalised `encode_image` features (N, E) float32 on CPU; this rank fills rows rank::world, the
    others stay zero, so a sum over ranks (all-reduce) gives every rank all N rows."""
    feats = torch.zeros(len(paths), model.cfg.embed_dim)
    idx = list(range(len(paths)))[rank::world]
    for i in range(0, len(idx), batch_size):
        rows = idx[i:i + batch_size]
        x = torch.stack([load_val_image(paths[j], size) for j in rows]).to(model.device)
        feats[rows] = model.encode_image(x, normalize=True).float().cpu()
    return feats


def read_templates(spec: str) -> list[str]:
    """`imagenet` -> OpenAI's ImageNet prompts; else the non-empty lines of the file SPEC, each with exactly one
    replacement field, an automatic one (`{}`), that `str.format(classname)` fills (open_clip formats them so)."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    if spec == "imagenet":
        return list(OPENAI_IMAGENET_TEMPLATES)
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"--templates {spec}: no such file (use 'imagenet' or a file of templates)")
    lines = [(i, x.strip()) for i, x in enumerate(path.read_text().splitlines(), 1) if x.strip()]
    bad = next(((i, x) for i, x in lines if not _one_class_field(x)), None)
    if not lines or bad:
        raise ValueError(f"--templates {spec}: every line needs exactly one '{{}}' for the class name"
                         + (f"; bad: line {bad[0]} {bad[1]!r}" if bad else "; the file is empty"))
    return [x for _, x in lines]


def _one_class_field(template: str) -> bool:
    """True if `template` has exactly one replacement field, an automatic one, and `template.format(name)` works
    (a named field, a second or numbered field, or a stray brace would fail only inside open_clip)."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
        template.format("x")
    except (ValueError, IndexError, KeyError, AttributeError):
        return False
    return fields == [""]


def image_folder(folder: Path, flag: str):
    """torchvision's ImageFolder of `folder`, with an error naming `flag` if it is missing or has no class folders
    of images."""
    from torchvision.datasets import ImageFolder

    if not folder.is_dir():
        raise FileNotFoundError(f"{flag} {folder}: no such folder")
    try:
        return ImageFolder(str(folder))
    except (FileNotFoundError, RuntimeError) as e:  # no class folder, or a class folder without images
        raise ValueError(f"{flag} {folder} is not an ImageFolder (one sub-folder of images per class): {e}") from e


_WNID = re.compile(r"n[0-9]{8}")


def zero_shot_classnames(classes: list[str], classnames: str) -> list[str]:
    """The text name of each ImageFolder class (`classes`, ImageFolder's sorted folder names), in that order.

    `folders`: the folder name, `_` read as a space. `imagenet`: open_clip's IMAGENET_CLASSNAMES, which are in
    sorted-wnid order, so 1000 wnid folders (n01440764 ...) take them in order; 1000 folders named by class
    index (0 ... 999, any zero padding) take IMAGENET_CLASSNAMES[int(name)] (ImageFolder sorts them as strings:
    "10" before "2"). Other folder names are refused: their class order is unknown.
    """
    if classnames != "imagenet":
        return [c.replace("_", " ") for c in classes]
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    n = len(IMAGENET_CLASSNAMES)
    if len(classes) != n:
        raise ValueError(f"--classnames imagenet needs {n} class folders, found {len(classes)}")
    if all(_WNID.fullmatch(c) for c in classes):
        return list(IMAGENET_CLASSNAMES)
    if all(re.fullmatch(r"[0-9]+", c) for c in classes):
        if sorted(int(c) for c in classes) == list(range(n)):
            return [IMAGENET_CLASSNAMES[int(c)] for c in classes]
        raise ValueError(f"--classnames imagenet: class folders named by index must be 0 ... {n - 1}, each once; "
                         f"found {classes[0]!r} ... {classes[-1]!r}")
    odd = next(c for c in classes if not _WNID.fullmatch(c))
    raise ValueError(f"--classnames imagenet needs the class folders named by wnid (n01440764 ...) or by class "
                     f"index (0 ... {n - 1}), found e.g. {odd!r}; use --classnames folders for other names")


@torch.no_grad()
def zero_shot(model, folder: Path, classnames: str, size: int, batch_size: int = 32, rank: int = 0,
              world: int = 1, features: torch.Tensor | None = None, templates: str = "imagenet") -> dict[str, float]:
    """Top-1/top-5 zero-shot accuracy on an ImageFolder (summed counts for this rank); `features`: the
    folder's `image_features` when the probe has them already (at least this rank's rows filled)."""
    import open_clip
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    ds = image_folder(folder, "--zeroshot-dir")
    names = zero_shot_classnames(ds.classes, classnames)
    tok = open_clip.get_tokenizer("ViT-B-32", context_length=model.cfg.text.context_length)
    weights = build_zero_shot_classifier(model, tok, names, read_templates(templates), 10, model.device)
    if features is None:
        features = image_features(model, [Path(p) for p, _ in ds.samples], size, batch_size, rank, world)
    top1 = top5 = n = 0
    idx = list(range(len(ds)))[rank::world]
    for i in range(0, len(idx), batch_size):
        rows = idx[i:i + batch_size]
        y = torch.tensor([ds.targets[j] for j in rows], device=model.device)
        logits = 100.0 * features[rows].to(model.device) @ weights
        k = min(5, logits.shape[1])
        pred = logits.topk(k, dim=1).indices
        top1 += int((pred[:, 0] == y).sum())
        top5 += int((pred == y[:, None]).any(1).sum())
        n += len(rows)
    return {"top1_correct": top1, "top5_correct": top5, "n": n, "num_classes": len(names)}


# The probe: fixed settings, so every cell of an ablation is read the same way.
PROBE_MAX_ITERS = 100
"""L-BFGS iterations at most (full batch; it stops earlier once the gradient vanishes)."""
PROBE_L2 = 1e-3
"""Weight of the L2 penalty sum(W**2) next to the mean cross-entropy (the bias is not penalised)."""


def probe_split(targets: list[int]) -> tuple[list[int], list[int]]:
    """Train and test indices: within each class, in the given (ImageFolder: sorted path) order, images
    alternate train, test, train, ... so both halves span the class; an odd count gives train one more."""
    seen: dict[int, int] = {}
    train, test = [], []
    for i, t in enumerate(targets):
        (train if seen.get(t, 0) % 2 == 0 else test).append(i)
        seen[t] = seen.get(t, 0) + 1
    return train, test


def linear_probe_top1(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
                      num_classes: int, max_iters: int = PROBE_MAX_ITERS, l2: float = PROBE_L2) -> float:
    """Fit a multinomial logistic regression on (N, E) features and return the test top-1 in percent.

    Full-batch L-BFGS in torch (sklearn is neither installed nor a dependency). Features are standardised
    with the train half's per-dimension mean and std first, so one penalty suits any embedding width and
    scale (L2-normalised features have entries ~ 1/sqrt(E)).
    """
    mu, sd = x_train.mean(0), x_train.std(0, unbiased=False).clamp_min(1e-6)
    xtr, xte = (x_train - mu) / sd, (x_test - mu) / sd
    lin = torch.nn.Linear(x_train.shape[1], num_classes).to(x_train.device, x_train.dtype)
    torch.nn.init.zeros_(lin.weight)  # deterministic start: the convex problem has one optimum anyway
    torch.nn.init.zeros_(lin.bias)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=max_iters, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(xtr), y_train) + l2 * lin.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return float(100.0 * (lin(xte).argmax(1) == y_test).float().mean())


def folder_features(model, folder: Path, size: int, batch_size: int = 32, rank: int = 0,
                    world: int = 1) -> torch.Tensor:
    """`image_features` (N, E) of an ImageFolder in its sample order, all rows on every rank."""
    from torchvision.datasets import ImageFolder

    paths = [Path(p) for p, _ in ImageFolder(str(folder)).samples]
    return all_reduce_sum(image_features(model, paths, size, batch_size, rank, world))


def linear_probe(model, folder: Path, size: int, batch_size: int = 32, rank: int = 0, world: int = 1,
                 features: torch.Tensor | None = None) -> dict:
    """Linear-probe top-1 on an ImageFolder split by `probe_split`; every rank fits the same probe.
    `features`: the folder's `folder_features` if the caller has them already."""
    ds = image_folder(folder, "--probe-dir")
    check_probe_classes(ds, folder)
    if features is None:
        features = folder_features(model, folder, size, batch_size, rank, world)
    feats = features.to(model.device)  # the fit is full batch: on the GPU where there is one (ImageNet: 25k x 1000)
    y = torch.tensor(ds.targets, device=model.device)
    train, test = probe_split(ds.targets)
    top1 = linear_probe_top1(feats[train], y[train], feats[test], y[test], len(ds.classes))
    return {"probe_top1": top1, "probe_classes": len(ds.classes), "probe_train_images": len(train),
            "probe_test_images": len(test)}


def check_probe_classes(ds, folder: Path) -> None:
    """Refuse a probe ImageFolder with a class of fewer than 2 images (`probe_split` needs one to train, one to
    test)."""
    per_class = np.bincount(ds.targets, minlength=len(ds.classes))
    if per_class.min() < 2:
        raise ValueError(f"--probe-dir {folder}: class {ds.classes[int(per_class.argmin())]!r} has "
                         f"{per_class.min()} image(s); the probe needs >= 2 per class (one to train, one to test)")


def run(args: TokenizerEvalConfig) -> dict:
    """Evaluate and return the metrics dict (rank 0 also writes OUT_DIR/metrics.json)."""
    from runtime.distributed import (barrier, check_shared_outputs, clear_outputs, get_rank, get_world_size,
                                     is_main_process, launcher_env)
    from unitok.loading import load_tokenizer

    # every input is checked before the tokenizer loads: a bad one found after the reconstruction pass would lose
    # its results (no metrics.json)
    if args.images and args.inception_weights:
        check_local_weights(args.inception_weights)
    images = list_images(Path(args.images)) if args.images else None
    if args.zeroshot_dir:
        zero_shot_classnames(image_folder(Path(args.zeroshot_dir), "--zeroshot-dir").classes, args.classnames)
    if args.probe_dir:
        check_probe_classes(image_folder(Path(args.probe_dir), "--probe-dir"), Path(args.probe_dir))
    if launcher_env()[1] > 1:
        from runtime.distributed import init_distributed

        init_distributed()
    rank, world = get_rank(), get_world_size()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_tokenizer(args.tokenizer, device=device, attn_mode=args.attn_mode or "full")
    if args.attn_mode and args.attn_mode != model.cfg.projection.attn_mode:  # a folder: load_tokenizer keeps its own
        raise ValueError(f"--attn-mode {args.attn_mode}: the checkpoint folder {args.tokenizer} has "
                         f"{model.cfg.projection.attn_mode} projection attention (recorded in its config.json); "
                         f"drop --attn-mode, or convert the official .pth again with the mode it needs")
    out = Path(args.out)
    metrics: dict = {"tokenizer": str(args.tokenizer), "attn_mode": model.cfg.projection.attn_mode,
                     "tokenizer_fingerprint": model.fingerprint(), "size": args.size}
    # rFID/IS would score an earlier run's PNGs too, and a run that fails must not leave an earlier metrics.json
    # beside its own PNGs
    clear_outputs([out / "metrics.json", *([out / "recon", out / "reference"] if args.images else [])])
    if args.images:
        r = evaluate_reconstruction(model, images, args.size, out, args.batch_size, rank, world)
        sums = all_reduce_sum(torch.tensor([r["n"], r["psnr_sum"], r["ssim_sum"]], dtype=torch.float64))
        counts = all_reduce_sum(r["counts"])
        metrics.update(num_images=int(sums[0]), psnr=float(sums[1] / sums[0]), ssim=float(sums[2] / sums[0]))
        stats = codebook_stats(counts)
        metrics.update(codebook_usage_pct=stats["usage_pct"], codebook_perplexity=stats["perplexity"],
                       mean_usage_pct=float(np.mean(stats["usage_pct"])),
                       mean_perplexity=float(np.mean(stats["perplexity"])))
        barrier()
        if args.inception_weights:
            for d in (out / "recon", out / "reference"):  # both emptied above
                check_shared_outputs(lambda: sum(1 for _ in d.glob("*.png")), metrics["num_images"], d, "--out")
            if is_main_process():
                metrics.update(fid_is(out / "recon", out / "reference", Path(args.inception_weights)))
    shared = None  # one encoding pass feeds both reads when the probe uses the zero-shot folder
    if args.zeroshot_dir and args.probe_dir and Path(args.zeroshot_dir).resolve() == Path(args.probe_dir).resolve():
        shared = folder_features(model, Path(args.probe_dir), args.size, args.batch_size, rank, world)
    if args.zeroshot_dir:
        z = zero_shot(model, Path(args.zeroshot_dir), args.classnames, args.size, args.batch_size, rank, world,
                      shared, args.templates)
        c = all_reduce_sum(torch.tensor([z["top1_correct"], z["top5_correct"], z["n"]], dtype=torch.float64))
        metrics.update(zeroshot_top1=float(100 * c[0] / c[2]), zeroshot_top5=float(100 * c[1] / c[2]),
                       zeroshot_images=int(c[2]), zeroshot_classes=z["num_classes"])
    if args.probe_dir:
        metrics.update(linear_probe(model, Path(args.probe_dir), args.size, args.batch_size, rank, world, shared))
    if is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "metrics.json", metrics)  # a failure mid-write leaves no half-written metrics.json
        print(format_table(metrics))
    return metrics


def format_table(metrics: dict) -> str:
    """Markdown table of the scalar metrics."""
    rows = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    lines = ["| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) and math.isfinite(v) else f"| {k} | {v} |"
              for k, v in rows]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> TokenizerEvalConfig:
    """Command line -> TokenizerEvalConfig; exits with status 2 and a message on bad flags."""
    return parse(TokenizerEvalConfig, argv, prog="python -m unitok.evaluate", description=__doc__)


def main(argv: list[str] | None = None) -> None:
    """CLI entry point (also `python -m mllm.evaluate --task tokenizer ...`)."""
    run(parse_args(argv))


if __name__ == "__main__":
    main()
