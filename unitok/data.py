"""Image-text data for stage one: a resumable webdataset pipeline.

Shards use the DataComp layout: one tar member per field, `{key}.jpg|png|jpeg|webp|gif|bmp|tif|tiff`
+ `{key}.txt` (other members, e.g. `.json`, are ignored). Images are decoded by
`unitok.image_io.load_image`, as extraction and chat decode them (first frame, alpha on white); in
training a large JPEG is decoded at 1/2 or 1/4 scale, every random crop still resized down (`draft_side`).
Per rank and epoch (REFERENCE.md 4.8):
    shard list -> deterministic shuffle (seed, epoch) -> split by node -> split by worker
    -> tar to samples -> sample shuffle (buffer 5000, initial 1000, seeded) -> keep samples with
    image and text -> decode PIL RGB (image_io) -> transform -> batch -> tokenize captions (open_clip)
A batch is {"images": (B, 3, S, S) float in [-1, 1], "texts": (B, context_length) int64}.

Design choices (the release differs; see REFERENCE.md 4.9 and 9):
- Bad data is skipped and COUNTED, never fatal: tar read errors (handler on `WebDataset`),
  undecodable images (handler on the `decode_sample` map, and around the transform), samples without an image
  or a caption. Both handlers also call `wds.warn_and_continue` for the first few errors of each
  worker; after that they only count, because `warn_and_continue` sleeps 0.5 s per call. Decode
  and transform warnings name the shard (`__url__`) and the sample key.
- Counts reach the main process WITH the batches: every item a worker emits carries the counts
  accumulated since its previous item, and a worker's last item is a batch-less marker with the
  remainder. This needs no shared memory or locks, works with any start method, and keeps the
  counts in step with the batches actually consumed (a prefetched batch is not counted yet).
- Exact resume: a worker also tags each item with its position (logical worker, batches emitted,
  pass, samples read after the shuffle). The loader keeps the tags of what it has yielded; a
  restarted loader makes each worker skip exactly the samples it had consumed (before decoding,
  so skipping is cheap) and rotates worker ids so that the DataLoader's round-robin continues
  with the worker that was next. Randomness never depends on process state: shard order,
  sample shuffle and each sample's crop are seeded from (seed, epoch, ...) and the sample's key.
  (Tar-level read errors before the resume point are met again and counted twice; the other
  counts are exact.) The state is per rank: save one per rank.
- `num_batches_per_epoch > 0` gives every rank exactly that many batches per epoch (needed by
  DDP/DeepSpeed, where ranks must step together): a worker that runs out of shards starts a new
  seeded pass over them. 0 means one natural pass over the shards (evaluation, tools).
- Split by node uses `wds.split_by_node` (rank from RANK/WORLD_SIZE or torch.distributed) unless
  `rank` and `world_size` are passed explicitly (tests simulate ranks that way).
"""
from __future__ import annotations

import functools
import hashlib
import math
import os
import random
from dataclasses import dataclass
from functools import partial
from itertools import islice
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from runtime.run import worker_stop_signals

IMAGE_KEYS = ("jpg", "png", "jpeg", "webp", "gif", "bmp", "tif", "tiff")
SKIP_KINDS = ("read_errors", "decode_errors", "missing_image", "missing_text")
_WARN_FIRST = 5  # errors per worker and kind that also go through wds.warn_and_continue


@dataclass
class DataConfig:
    """The image-text pipeline (one rank's view)."""

    shards: str = ""
    """Shard paths: a brace pattern (`/data/{00000000..00140146}.tar`) or a glob (`/data/coyo/*.tar`,
    sorted), several joined by `::`."""
    img_size: int = 256
    """Side of the square training crops."""
    local_batch_size: int = 64
    """Images per batch on one rank."""
    num_workers: int = 8
    """DataLoader worker processes (0 = load in the main process)."""
    context_length: int = 77
    """Caption tokens (open_clip tokenizer; longer captions are truncated, EOT kept)."""
    tokenizer: str = "ViT-B-32"
    """open_clip model name whose tokenizer is used (the BPE vocabulary ships with open_clip; a name whose
    tokenizer open_clip downloads from the Hub, e.g. a SigLIP model, is refused)."""
    seed: int = 0
    """Base seed of the shard shuffle, the sample shuffle and the random crops (unitok.train: its --seed)."""
    train: bool = True
    """True: shuffles + RandomResizedCrop. False: fixed order + Resize/CenterCrop (validation)."""
    crop_scale: tuple[float, float] = (0.9, 1.0)
    """Area range of RandomResizedCrop ((0.64, 1.0) is the release's `--use_aug`)."""
    shuffle_buffer: int = 5000
    """Sample shuffle buffer per worker (0 disables)."""
    shuffle_initial: int = 1000
    """Samples buffered before the shuffle starts yielding."""
    num_batches_per_epoch: int = 0
    """Batches per rank and epoch; 0 = one pass over the shards (see the module docstring)."""
    pin_memory: bool = True
    """Pin batches in page-locked memory (only when CUDA is available)."""

    def __post_init__(self):
        self.crop_scale = tuple(self.crop_scale)
        for name in ("img_size", "local_batch_size", "context_length"):
            if getattr(self, name) <= 0:
                raise ValueError(f"data.{name} must be positive, got {getattr(self, name)}")
        for name in ("num_workers", "shuffle_buffer", "shuffle_initial", "num_batches_per_epoch"):
            if getattr(self, name) < 0:
                raise ValueError(f"data.{name} must be >= 0, got {getattr(self, name)}")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"data.crop_scale must satisfy 0 < lo <= hi <= 1, got {self.crop_scale}")
        check_tokenizer_name(self.tokenizer)  # here, not after the model is built and the loader starts


# ---- transforms ----------------------------------------------------------------------------
def _random_resized_crop_params(width: int, height: int, scale: tuple[float, float],
                                rng: random.Random) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop.get_params (ratio 3/4..4/3), driven by `rng` -> (top, left, h, w)."""
    area = width * height
    log_ratio = (math.log(3 / 4), math.log(4 / 3))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    ratio = width / height  # fallback: central crop at the nearest allowed aspect
    if ratio < 3 / 4:
        w, h = width, int(round(width / (3 / 4)))
    elif ratio > 4 / 3:
        h, w = height, int(round(height * (4 / 3)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def train_transform(img, size: int, scale: tuple[float, float], rng: random.Random) -> torch.Tensor:
    """PIL RGB -> RandomResizedCrop(size, scale, bicubic) -> (3, size, size) in [-1, 1]."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    top, left, h, w = _random_resized_crop_params(img.width, img.height, scale, rng)
    img = TF.resized_crop(img, top, left, h, w, [size, size], InterpolationMode.BICUBIC)
    return TF.to_tensor(img) * 2 - 1


def val_transform(img, size: int) -> torch.Tensor:
    """PIL RGB -> Resize(size, bicubic) -> CenterCrop(size) -> (3, size, size) in [-1, 1]; beyond 4:1 the long
    side is centre-cropped to 4:1 first (`crop_to_aspect`), so a 200000x2 image is not resized to 3.2e6 x 32."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    from unitok.image_io import crop_to_aspect

    img = TF.center_crop(TF.resize(crop_to_aspect(img), size, InterpolationMode.BICUBIC), [size, size])
    return TF.to_tensor(img) * 2 - 1


_TOKENIZERS: dict[tuple[str, int], Any] = {}


def check_tokenizer_name(name: str) -> None:
    """Refuse a --data.tokenizer whose open_clip tokenizer is not the bundled BPE one. open_clip builds a Hugging
    Face tokenizer (downloaded at run time; offline it retries for most of a minute, then fails) for models whose
    text config names `hf_tokenizer_name`, for SigLIP names and for `hf-hub:` names, and silently falls back to
    the BPE for a name it does not know (a typo); only its built-in names without a Hub tokenizer are taken."""
    import open_clip

    hint = "take a built-in open_clip model name with the bundled BPE tokenizer, e.g. ViT-B-32 (the default)"
    if name not in open_clip.list_models():  # hf-hub:/local-dir: names are never in the built-in list
        raise ValueError(f"--data.tokenizer {name!r} is not a built-in open_clip model name; {hint}")
    hub = open_clip.get_model_config(name).get("text_cfg", {}).get("hf_tokenizer_name")
    if hub or "siglip" in name.lower():  # the two cases in which open_clip.get_tokenizer goes to the Hub
        raise ValueError(f"--data.tokenizer {name!r}: open_clip's tokenizer for it is a Hugging Face one "
                         f"({hub or 'SigLIP'}) that it downloads at run time; {hint}")


def get_tokenizer(name: str = "ViT-B-32", context_length: int = 77):
    """open_clip's tokenizer for `name` at `context_length` (cached per process; works offline: names whose
    tokenizer open_clip would download are refused, see `check_tokenizer_name`)."""
    key = (name, context_length)
    if key not in _TOKENIZERS:
        import open_clip

        check_tokenizer_name(name)
        _TOKENIZERS[key] = open_clip.get_tokenizer(name, context_length=context_length)
    return _TOKENIZERS[key]


# ---- skip counters ---------------------------------------------------------------------------
class SkipStats:
    """Counts of usable samples and of skipped ones by reason (see SKIP_KINDS).

    "samples" counts every usable sample read, including those of a dropped partial batch.
    """

    def __init__(self, counts: dict[str, int] | None = None):
        self.counts = {"samples": 0, **{k: 0 for k in SKIP_KINDS}}
        if counts:
            self.add(counts)

    def add(self, counts: dict[str, int]) -> None:
        """Add another set of counts (e.g. a worker's delta)."""
        for k, v in counts.items():
            self.counts[k] = self.counts.get(k, 0) + int(v)

    @property
    def skipped(self) -> int:
        """Total samples dropped for any reason."""
        return sum(self.counts[k] for k in SKIP_KINDS)

    def as_dict(self) -> dict[str, int]:
        """A copy of the counts (for logging and checkpoints)."""
        return dict(self.counts)

    def __repr__(self) -> str:
        return "SkipStats(" + ", ".join(f"{k}={v}" for k, v in self.counts.items()) + ")"

    def skipped_line(self) -> str:
        """'3 (decode_errors 2, missing_text 1)': the total skipped and its reasons."""
        why = ", ".join(f"{k} {self.counts[k]}" for k in SKIP_KINDS if self.counts[k])
        return f"{self.skipped}" + (f" ({why})" if why else "")

    def __str__(self) -> str:
        """What the logs print: '120 usable samples; skipped 3 (decode_errors 2, missing_text 1)'."""
        return f"{self.counts['samples']} usable samples; skipped {self.skipped_line()}"


def _counting_handler(stats: SkipStats, kind: str):
    """A webdataset handler: count the error, warn for the first few, continue."""
    import webdataset as wds

    def handler(exn: Exception) -> bool:
        stats.counts[kind] += 1
        if stats.counts[kind] <= _WARN_FIRST:
            return wds.warn_and_continue(exn)
        return True

    return handler


class SampleDecodeError(ValueError):
    """A sample whose image or caption cannot be decoded; the message names the shard and the key."""


def _sample_id(sample: dict) -> str:
    return f"{sample.get('__url__', '?')}: sample {sample.get('__key__', '?')}"


def draft_side(cfg: DataConfig) -> int:
    """The short side a training image may be decoded down to (`load_image(min_side=)`): twice what keeps its
    smallest random crop (area crop_scale[0], aspect 3:4) at img_size, so every crop is still resized down."""
    return math.ceil(2 * cfg.img_size / math.sqrt(0.75 * cfg.crop_scale[0]))


def decode_sample(sample: dict, min_side: int | None = None) -> dict:
    """Raw webdataset sample -> image member as PIL RGB (`unitok.image_io.load_image`; `min_side`: a large JPEG
    decodes reduced, keeping its short side at least that), `txt` as str."""
    from unitok.image_io import load_image

    ext = next(k for k in IMAGE_KEYS if k in sample)
    try:
        img = load_image(sample[ext], min_side=min_side)
        txt = sample["txt"].decode("utf-8") if isinstance(sample["txt"], bytes) else str(sample["txt"])
    except Exception as exn:  # PIL raises many types for damaged files
        raise SampleDecodeError(f"{_sample_id(sample)}: cannot decode: {type(exn).__name__}: {exn}") from exn
    return {**sample, ext: img, "txt": txt}


# ---- per-worker stream -------------------------------------------------------------------
def expand_shards(spec: str | list[str]) -> list[str]:
    """Brace pattern(s) and local globs joined by `::`, or a list -> list of shard paths.

    A glob (`raw/coyo/*.tar`, `raw/**/*.tar`) expands in sorted order, the same on every rank; it is
    the way to read img2dataset output, whose numbering has gaps where a shard failed and whose
    `_stats.json` / `.parquet` side files sit next to the tars. A glob that matches nothing raises."""
    import webdataset as wds

    from runtime.paths import expand_glob, is_glob

    if isinstance(spec, (list, tuple)):
        return list(spec)
    out: list[str] = []
    for url in wds.shardlists.expand_urls(spec):
        if "://" in url or url.startswith("pipe:") or not is_glob(url):
            out.append(url)
            continue
        hits = expand_glob(url)
        if not hits:
            raise FileNotFoundError(f"data.shards pattern {url} matches no file")
        out.extend(hits)
    return out


def _split_by_node(src: Iterator, rank: int, world_size: int) -> Iterator:
    # the same islice as wds.split_by_node, with an explicit rank (for simulated ranks)
    return islice(src, rank, None, world_size)


def _split_by_logical_worker(src: Iterator, worker: int, num_workers: int) -> Iterator:
    return islice(src, worker, None, num_workers)


def _fresh_position() -> dict[str, Any]:
    return {"batches": 0, "rep": 0, "pos": 0, "done": False}


class _EpochStream(IterableDataset):
    """One epoch of one rank. Each (logical) worker yields tagged items; see the module docstring."""

    def __init__(self, cfg: DataConfig, shards: list[str], epoch: int, rank: int, world_size: int,
                 explicit_rank: bool, positions: dict[int, dict], worker_offset: int):
        self.cfg, self.shards, self.epoch = cfg, shards, epoch
        self.rank, self.world_size, self.explicit_rank = rank, world_size, explicit_rank
        self.positions, self.worker_offset = positions, worker_offset

    def __iter__(self):
        info = get_worker_info()
        W = max(1, self.cfg.num_workers)
        worker = ((info.id if info else 0) + self.worker_offset) % W  # rotated: see resume notes
        return self._worker_items(worker, W)

    def _quota(self, worker: int, W: int) -> int | None:
        n = self.cfg.num_batches_per_epoch
        return None if n == 0 else n // W + (1 if worker < n % W else 0)

    def _pass_samples(self, worker: int, W: int, rep: int, skip: int, stats: SkipStats) -> Iterator[dict]:
        """Shuffled, decoded samples of one pass over this worker's shards, each tagged `__pos__`."""
        import webdataset as wds

        cfg = self.cfg
        shards = list(self.shards)
        if cfg.train:
            random.Random(f"shards/{cfg.seed}/{self.epoch}/{rep}").shuffle(shards)
        node = (partial(_split_by_node, rank=self.rank, world_size=self.world_size)
                if self.explicit_rank else wds.split_by_node)
        ds = wds.WebDataset(shards, shardshuffle=False, nodesplitter=node,
                            workersplitter=partial(_split_by_logical_worker, worker=worker, num_workers=W),
                            handler=_counting_handler(stats, "read_errors"), empty_check=False,
                            seed=0)  # unused (no shard shuffle here); avoids drawing from `random`
        if cfg.train and cfg.shuffle_buffer > 0:
            ds = ds.shuffle(cfg.shuffle_buffer, initial=cfg.shuffle_initial,
                            seed=f"samples/{cfg.seed}/{self.epoch}/{rep}/{self.rank}/{worker}")

        def positions(src):
            # number samples after the shuffle; on resume skip those already consumed, undecoded
            for pos, sample in enumerate(src):
                if pos >= skip:
                    sample["__pos__"] = pos
                    yield sample

        def complete(sample: dict) -> bool:
            has_image, has_text = any(k in sample for k in IMAGE_KEYS), "txt" in sample
            stats.counts["missing_image"] += not has_image  # one reason per sample: the image first
            stats.counts["missing_text"] += has_image and not has_text
            return has_image and has_text

        decode = functools.partial(decode_sample, min_side=draft_side(cfg) if cfg.train else None)
        ds = ds.compose(positions).select(complete).map(decode, handler=_counting_handler(stats, "decode_errors"))
        return iter(ds)

    def _transform(self, sample: dict, rep: int) -> torch.Tensor:
        cfg = self.cfg
        img = next(sample[k] for k in IMAGE_KEYS if k in sample)
        if not cfg.train:
            return val_transform(img, cfg.img_size)
        shard = os.path.basename(str(sample.get("__url__")))  # not the full path: shards may move
        rng = random.Random(f"crop/{cfg.seed}/{self.epoch}/{rep}/{shard}/{sample['__key__']}")
        return train_transform(img, cfg.img_size, cfg.crop_scale, rng)

    def _worker_items(self, worker: int, W: int) -> Iterator[dict]:
        cfg = self.cfg
        state = dict(self.positions.get(worker, _fresh_position()))
        if state["done"]:
            return
        quota = self._quota(worker, W)
        stats = SkipStats()
        reported = stats.as_dict()
        tokenizer = get_tokenizer(cfg.tokenizer, cfg.context_length)

        def tagged(item: dict, done: bool = False) -> dict:
            nonlocal reported
            now = stats.as_dict()
            delta = {k: now[k] - reported[k] for k in now}
            reported = now
            item["meta"] = {"worker": worker, **state, "done": done, "stats": delta}
            return item

        images: list[torch.Tensor] = []
        texts: list[str] = []
        rep, skip = state["rep"], state["pos"]
        while quota is None or state["batches"] < quota:
            usable = 0
            handler = _counting_handler(stats, "decode_errors")
            for sample in self._pass_samples(worker, W, rep, skip, stats):
                try:
                    img = self._transform(sample, rep)  # (3, S, S)
                except Exception as exn:  # a member PIL opened but cannot process: skip, count
                    handler(SampleDecodeError(f"{_sample_id(sample)}: cannot transform: {type(exn).__name__}: {exn}"))
                    continue
                usable += 1
                stats.counts["samples"] += 1
                images.append(img)
                texts.append(str(sample["txt"]))
                if len(images) == cfg.local_batch_size:
                    state.update(batches=state["batches"] + 1, rep=rep, pos=sample["__pos__"] + 1)
                    yield tagged({"images": torch.stack(images), "texts": tokenizer(texts)})
                    images, texts = [], []
                    if quota is not None and state["batches"] >= quota:
                        break
            else:  # the pass is exhausted
                if quota is None:
                    break
                if usable == 0 and skip == 0:
                    raise RuntimeError(f"rank {self.rank} worker {worker}: a full pass over its shards gave "
                                       f"no usable sample ({stats}); check the shards")
                rep, skip = rep + 1, 0
                continue
        # the partial batch is dropped (no partial batches); its samples were counted as usable
        yield tagged({}, done=True)


# ---- the loader ----------------------------------------------------------------------------
class ImageTextLoader:
    """Resumable, counted image-text batches for one rank.

    `for batch in loader` yields the rest of the current epoch, then moves to the next epoch.
    `state_dict()` / `load_state_dict()` capture the exact position (save it per rank); `stats`
    holds the sample counts (usable and skipped, by reason) of everything consumed so far.
    """

    def __init__(self, cfg: DataConfig, rank: int | None = None, world_size: int | None = None):
        import webdataset as wds

        if (rank is None) != (world_size is None):
            raise ValueError("pass both rank and world_size, or neither")
        self.explicit_rank = rank is not None
        if rank is None:  # the source wds.split_by_node reads: RANK/WORLD_SIZE, else torch.distributed
            rank, world_size = wds.utils.pytorch_worker_info()[:2]
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.shards = expand_shards(cfg.shards)
        if not self.shards:
            raise ValueError("data.shards is empty")
        missing = [s for s in self.shards if "://" not in s and not s.startswith("pipe:") and not os.path.exists(s)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} shard(s) not found, e.g. {missing[0]}")
        need = world_size * max(1, cfg.num_workers)
        if len(self.shards) < need:
            raise ValueError(f"{len(self.shards)} shards cannot feed {world_size} rank(s) x "
                             f"{max(1, cfg.num_workers)} worker(s); need at least {need}")
        self.epoch, self.batches = 0, 0
        self._positions: dict[int, dict] = {}
        self._last_worker = -1
        self.stats = SkipStats()

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        cfg = self.cfg
        W = max(1, cfg.num_workers)
        stream = _EpochStream(cfg, self.shards, self.epoch, self.rank, self.world_size, self.explicit_rank,
                              {w: dict(p) for w, p in self._positions.items()},
                              worker_offset=(self._last_worker + 1) % W)
        loader = DataLoader(stream, batch_size=None, num_workers=cfg.num_workers,
                            pin_memory=cfg.pin_memory and torch.cuda.is_available(),
                            persistent_workers=False, worker_init_fn=worker_stop_signals)
        fresh, before = not self._positions, self.stats.as_dict()
        for item in loader:
            meta = item.pop("meta")
            w = int(meta["worker"])
            self._positions[w] = {k: meta[k] for k in ("batches", "rep", "pos", "done")}
            self._last_worker = w
            self.stats.add(meta["stats"])
            if item:
                self.batches += 1
                yield item
        if fresh and self.batches == 0:  # every later epoch would be as empty: the run would wait forever
            now = self.stats.as_dict()
            raise RuntimeError(f"rank {self.rank}: a whole epoch over its share of the {len(self.shards)} shards gave "
                               f"no batch of {cfg.local_batch_size} usable samples: "
                               f"{ {k: now[k] - before.get(k, 0) for k in now} } (a sample needs an image and a "
                               "caption: `txt`); check the shards, or lower data.local-batch-size / data.num-workers")
        self.epoch, self.batches = self.epoch + 1, 0
        self._positions, self._last_worker = {}, -1

    def state_dict(self) -> dict[str, Any]:
        """The exact position of this rank's stream (JSON-able)."""
        return {
            "epoch": self.epoch,
            "batches": self.batches,
            "last_worker": self._last_worker,
            "workers": {str(w): dict(p) for w, p in self._positions.items()},
            "stats": self.stats.as_dict(),
            "fingerprint": self._fingerprint(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict()` of a loader with the same config, shards, rank and world size."""
        saved, now = state.get("fingerprint") or {}, self._fingerprint()
        differ = {k: (saved[k], now[k]) for k in now if k in saved and saved[k] != now[k]}  # (older states lack keys)
        if not saved or differ:
            what = ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in differ.items()) or "none recorded"
            raise ValueError(f"the data loader's state was saved with other data settings ({what}); an exact resume "
                             "needs the same seed, shard list, batch size, worker count and rank layout")
        self.epoch, self.batches = int(state["epoch"]), int(state["batches"])
        self._last_worker = int(state["last_worker"])
        self._positions = {int(w): dict(p) for w, p in state["workers"].items()}
        self.stats = SkipStats(state.get("stats"))

    def _fingerprint(self) -> dict[str, Any]:
        c = self.cfg
        # the shard list by name (not path: a dataset may move), whole: the saved positions index its order
        names = hashlib.sha1("\n".join(os.path.basename(s) for s in self.shards).encode()).hexdigest()[:16]
        return {"seed": c.seed, "num_shards": len(self.shards), "first_shard": os.path.basename(self.shards[0]),
                "shard_names": names,
                "local_batch_size": c.local_batch_size, "num_workers": max(1, c.num_workers),
                "rank": self.rank, "world_size": self.world_size, "train": c.train,
                "num_batches_per_epoch": c.num_batches_per_epoch}
