"""`MixtureLoader`: recipe sources -> mixed, templated, packed `collate()` batches; resumable mid-epoch.

Streams. The loader runs one mixture stream per split, split = rank * W + worker (W = max(1,
num_workers)); each split reads its own shards (sources.py). A stream draws samples one by one:
    draw n picks a source from hash_uniform(seed, split, n) with probability
        weight mode:  weight_i / sum(active weights)           (finite mode: exhausted sources drop out)
        budget mode:  remaining_i / sum(remaining)             (exact per-epoch counts, without replacement)
    and takes that source's next templated sample.
Batches. pack=True: each sample goes to the first of the batch's (at most micro_batch_size) rows of
max_len positions where it fits. A sample that fits no row of a full batch is held, and the stream keeps
drawing to fill the space left, until every row is full or `pack_lookahead` (K, PACK_LOOKAHEAD = 8) samples are held;
the next batch first places the held samples (first fit, in draw order), then draws. The earliest held sample
always opens the next batch, so a sample waits at most K batches. K=1 is the plain rule: the first sample that
fits no row closes the batch. Against it, K=8 cut padding from 24 to 4 % (max_len 2048, micro batch 1) and 11 to
3 % (micro batch 4) on a mix of text chunks, captions and instructions (benchmarks/README.md). The rows are
handed to `collate(..., pack_to=max_len)` in row order, which reproduces them.
pack=False: micro_batch_size samples, right-padded to the longest.

Resume. After each batch the stream records a snapshot: the stream's position (draw counter, budget
counts, each source's Position) BEFORE the earliest held sample was drawn, the number of draws made since
(`replay`) and which of those are held (`pending`, relative draw indices; the others are in batches).
Draws are deterministic (the source pick is hash_uniform(seed, split, draw counter), each source's stream is
positioned), so a stream rebuilt from a snapshot redraws the `replay` samples, holds the pending ones again and
drops the rest, and yields exactly the batches that would have followed. That costs at most K held samples
in memory and, on resume, redrawing the samples of the last few batches (at most K batches' worth); no
sample is saved. The snapshot's counters are those of the samples handed out (held ones count once they are
in a batch), so `stats()` matches the batches. In finite mode the held samples end the epoch in last batches
of their own. With worker processes every batch carries its worker's snapshot;
a restored loader rotates the worker -> stream mapping so the round-robin order continues.
`state_dict()` is JSON-able; save one per rank. A Position indexes a source's file list, so the state
also records each source's file count and a hash of its file names: a glob that matches other files
on resume is refused instead of silently replaying seen data and skipping unseen data. A version-1 state
(before the look-ahead: nothing held, the sample a batch closed on is redrawn) resumes at its exact data
position, packed with the look-ahead from there.

Infinite mode (default) cycles every source over epochs (reshuffled per epoch); in budget mode one
"mixture epoch" is sum(budgets) / num_splits samples per split. Finite mode stops after one pass
(weight mode: when every source is exhausted; budget mode: after one mixture epoch).
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from mllm.data import templates as T
from mllm.data.collate import Sample, collate
from mllm.data.recipe import Recipe, load_recipe
from mllm.data.sources import MAX_EXAMPLES, Position, Source, build_source, hash_uniform, structured_stats
from runtime.run import worker_stop_signals

log = logging.getLogger(__name__)

STATE_VERSION = 2  # 2: snapshots replay the draws of held samples (`replay`, `pending`)
PACK_LOOKAHEAD = 8
"""Samples a packed stream may hold for later batches while it fills the rows (see the module docstring)."""
_MIX_TAG = 0x6D6978  # "mix": separates mixing draws from per-record draws


def _add_counts(into: dict[str, int], counts: dict[str, int], sign: int = 1) -> None:
    """into[k] += sign * counts[k] for every key of `counts` (a source's counters: records, skipped/*, ...)."""
    for k, v in counts.items():
        into[k] = into.get(k, 0) + sign * v


@dataclass
class _Held:
    """A drawn sample that is not in a batch yet, with what a snapshot taken before its draw needs."""

    seq: int
    """Draw number in this stream object (samples drawn before it)."""
    sample: Sample
    state: dict[str, Any]
    """The stream's position before the draw (`_MixtureStream.position()`)."""
    counts: list[dict[str, int]]
    """Per source: what the draw added to its counters."""


class _MixtureStream:
    """One split's stream of (batch, snapshot)."""

    def __init__(self, loader: "MixtureLoader", split: int, state: dict[str, Any] | None,
                 index_cache: dict | None = None):
        self.L, self.split = loader, split
        r = loader.recipe
        self.sources: list[Source] = [
            build_source(r, cfg, loader.tokenizer, seed=loader.seed, max_len=loader.max_len, boi_id=loader.boi_id,
                         eoi_id=loader.eoi_id, index_cache=index_cache, codebooks=loader.codebooks)
            for cfg in r.sources]
        self.budget_mode = r.mode == "budget"
        self.weights = [float(c.weight or 0.0) for c in r.sources]
        self.local_budgets = [self._local_budget(c.budget) for c in r.sources] if self.budget_mode else []
        self.draws, self.mix_epoch = 0, 0
        self.remaining = list(self.local_budgets)
        self.positions = [Position() for _ in self.sources]
        self.exhausted = [False] * len(self.sources)
        if state is not None:
            self._restore(state)
        # Budget mode cycles sources inside a mixture epoch; weight mode cycles only when infinite.
        src_infinite = self.budget_mode or loader.infinite
        self.iters = [s.stream(p, split, loader.num_splits, infinite=src_infinite)
                      for s, p in zip(self.sources, self.positions)]
        self.taken = 0  # samples drawn by this object
        self.pending: list[_Held] = []  # drawn, not in a batch yet; in draw order
        self.end_counts: list[dict[str, int]] = [{} for _ in self.sources]  # of the draw that found the end
        if state is not None:
            self._replay(state)

    def _local_budget(self, budget: int) -> int:
        n = self.L.num_splits
        return budget // n + (1 if self.split < budget % n else 0)

    def _restore(self, st: dict[str, Any]) -> None:
        self.draws, self.mix_epoch = int(st["draws"]), int(st["mix_epoch"])
        self.remaining = [int(x) for x in st["remaining"]]
        for i, s in enumerate(self.sources):
            ss = st["sources"][s.name]
            self.positions[i] = Position.from_list(ss["position"])
            self.exhausted[i] = bool(ss["exhausted"])

    def _replay(self, st: dict[str, Any]) -> None:
        """Redraw the snapshot's `replay` samples: the `pending` ones are held again, the others are in
        batches already. Then set the counters: the saved ones (samples handed out) plus the held draws'."""
        held = {int(i) for i in st["pending"]}
        for rel in range(int(st["replay"])):
            h = self._take()
            if h is None:
                raise ValueError("the loader state replays draws that the data no longer yields: the source "
                                 "files changed since it was saved")
            if rel in held:
                self.pending.append(h)
        for i, s in enumerate(self.sources):
            ss = st["sources"][s.name]
            s.counters = dict(ss["counters"])
            for h in self.pending:
                _add_counts(s.counters, h.counts[i])
            s.examples = {r: list(v) for r, v in ss.get("examples", {}).items()}

    def position(self) -> dict[str, Any]:
        """Where the next draw happens: draw counter, budget counts, each source's Position."""
        return {"draws": self.draws, "mix_epoch": self.mix_epoch, "remaining": list(self.remaining),
                "sources": {s.name: {"position": self.positions[i].to_list(), "exhausted": self.exhausted[i]}
                            for i, s in enumerate(self.sources)}}

    def snapshot(self) -> dict[str, Any]:
        """JSON-able state: the position before the earliest held draw, the draws since (`replay`), which of them
        are held (`pending`, relative), and the counters of the samples handed out (held draws' taken off)."""
        first = self.pending[0] if self.pending else None
        st = first.state if first else self.position()
        base = first.seq if first else self.taken
        out = {**st, "replay": self.taken - base, "pending": [h.seq - base for h in self.pending], "sources": {}}
        for i, s in enumerate(self.sources):
            counters = dict(s.counters)
            for counts in [h.counts[i] for h in self.pending] + ([self.end_counts[i]] if self.pending else []):
                _add_counts(counters, counts, -1)
            out["sources"][s.name] = {**st["sources"][s.name], "counters": {k: v for k, v in counters.items() if v},
                                      "examples": {r: list(v) for r, v in s.examples.items()}}
        return out

    def _take(self) -> _Held | None:
        """The next sample with the position before it and the counts it added; None at the end (finite mode)."""
        state = self.position()
        before = [dict(s.counters) for s in self.sources]
        sample = self._draw()
        counts = [{k: v - b.get(k, 0) for k, v in s.counters.items() if v != b.get(k, 0)}
                  for s, b in zip(self.sources, before)]
        if sample is None:
            # the last draw of a finite stream still counted the records it skipped: a snapshot taken while
            # samples are held predates it, and a restored stream reads those records again
            for end, c in zip(self.end_counts, counts):  # (a later call finds the end again and adds nothing)
                _add_counts(end, c)
            return None
        self.taken += 1
        return _Held(self.taken - 1, sample, state, counts)

    def _draw(self) -> Sample | None:
        while True:
            if self.budget_mode:
                active = [i for i, r in enumerate(self.remaining) if r > 0]
                if not active:
                    if not self.L.infinite or not any(self.local_budgets):
                        return None
                    self.mix_epoch += 1
                    self.remaining = list(self.local_budgets)
                    continue
                w = [float(self.remaining[i]) for i in active]
            else:
                active = [i for i, e in enumerate(self.exhausted) if not e]
                if not active:
                    return None
                w = [self.weights[i] for i in active]
            u = hash_uniform(self.L.seed, _MIX_TAG, self.split, self.draws) * sum(w)
            self.draws += 1
            i, acc = active[-1], 0.0
            for j, wj in zip(active, w):
                acc += wj
                if u < acc:
                    i = j
                    break
            item = next(self.iters[i], None)
            if item is None:  # only in finite weight mode
                self.exhausted[i] = True
                continue
            sample, self.positions[i] = item
            if self.budget_mode:
                self.remaining[i] -= 1
            return sample

    def _place(self, s: Sample, rows: list[list[Sample]], used: list[int]) -> bool:
        """First fit over the batch's rows, opening one while there are fewer than micro_batch_size; False if
        the sample fits none. Handing collate the samples row by row then reproduces exactly these rows: the
        sample that opened row r+1 fit none of rows 0..r when it was placed, and rows only fill up afterwards."""
        n = s.expanded_length()
        r = next((i for i, u in enumerate(used) if u + n <= self.L.max_len), None)
        if r is None:
            if len(rows) == self.L.micro_batch_size:
                return False
            rows.append([])
            used.append(0)
            r = len(rows) - 1
        rows[r].append(s)
        used[r] += n
        return True

    def batches(self) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, Any]]]:
        L = self.L
        while True:
            rows: list[list[Sample]] = []
            used: list[int] = []
            held, self.pending = self.pending, []
            for h in held:  # the earliest always fits (the batch is empty), so none waits more than K batches
                if not self._place(h.sample, rows, used):
                    self.pending.append(h)
            while True:
                if len(rows) == L.micro_batch_size and (
                        not L.pack or min(used) == L.max_len or len(self.pending) >= L.pack_lookahead):
                    break
                h = self._take()
                if h is None:
                    break
                if not L.pack:
                    rows.append([h.sample])
                elif not self._place(h.sample, rows, used):
                    self.pending.append(h)  # the next batch starts with it; the snapshot predates its draw
            if not rows:  # (then nothing is held either: the earliest held sample would have opened a row)
                return
            samples = [s for row in rows for s in row]
            batch = collate(samples, pad_id=L.pad_id, pack_to=L.max_len if L.pack else None)
            assert batch["input_ids"].shape[0] == len(rows)  # collate kept the planned rows
            yield batch, self.snapshot()


class _WorkerDataset(torch.utils.data.IterableDataset):
    """DataLoader worker side: worker w runs the stream of logical worker (w + rotation) % W."""

    def __init__(self, loader: "MixtureLoader", rotation: int, states: dict[int, dict]):
        super().__init__()
        self.loader, self.rotation, self.states = loader, rotation, states

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        W = self.loader.num_workers
        logical = (info.id + self.rotation) % W
        stream = _MixtureStream(self.loader, self.loader.rank * W + logical, self.states.get(logical), {})
        for batch, snap in stream.batches():
            yield logical, batch, snap


def check_budgets(recipe, world_size: int, num_workers: int) -> None:
    """ValueError for a source whose budget is smaller than the readers (world_size x num_workers): some streams
    would never draw from it. mllm.train calls this before it builds the model, as MixtureLoader does."""
    splits = world_size * max(1, num_workers)
    small = [c.name for c in recipe.sources if c.budget is not None and c.budget < splits]
    if small:
        raise ValueError(f"sources {small} have a budget smaller than world_size * num_workers = {splits}; some "
                         "streams would never draw from them")


class MixtureLoader:
    """Mix, template and pack a recipe's sources into `collate()` batches (see the module docstring).

    Iterating yields batch dicts (`collate` output). Each new `iter()` continues from the current
    state (after the last batch handed out), so `state_dict()` can be saved at any step. `boi_id` /
    `eoi_id` are the model config's image markers (default: the release's 3/4); `codebooks` its (sub-codes per
    position, codes per sub-codebook): codes outside them are skipped as corrupt. `pack_lookahead`: with
    pack=True, how many samples that fit no row of a full batch the stream holds for later batches while it
    draws more to fill the rows (1 = close the batch at the first one); see the module docstring.
    """

    def __init__(self, recipe: Recipe | str | os.PathLike, tokenizer, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, micro_batch_size: int = 1, max_len: int = 2048, pack: bool = True, pad_id: int = 0,
                 num_workers: int = 0, infinite: bool = True, boi_id: int = T.BOI_TOKEN_ID,
                 eoi_id: int = T.EOI_TOKEN_ID, codebooks: tuple[int, int] | None = None,
                 pack_lookahead: int = PACK_LOOKAHEAD):
        if not isinstance(recipe, Recipe):
            recipe = load_recipe(Path(recipe))
        else:
            recipe.check_paths()
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
        if micro_batch_size < 1 or max_len < 1 or pack_lookahead < 1 or num_workers < 0:
            raise ValueError("micro_batch_size, max_len and pack_lookahead must be >= 1 and num_workers >= 0")
        T.special_ids(tokenizer)  # fail now if bos/eos are missing
        self.recipe, self.tokenizer = recipe, tokenizer
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.micro_batch_size, self.max_len, self.pack, self.pad_id = micro_batch_size, max_len, pack, pad_id
        self.num_workers, self.infinite, self.boi_id, self.eoi_id = num_workers, infinite, boi_id, eoi_id
        self.codebooks, self.pack_lookahead = codebooks, pack_lookahead
        self.num_splits = world_size * max(1, num_workers)
        check_budgets(recipe, world_size, num_workers)
        self._snapshots: dict[int, dict[str, Any]] = {}  # logical worker -> stream snapshot
        self._consumed = 0
        self._positions_total = 0
        self._positions_pad = 0
        self._text_only = 0  # batches without any image (they exercise the no-image model path)
        self._index_cache: dict = {}
        self._files = self._source_files()  # expanded once: a glob over many files is slow to repeat

    # ---- iteration --------------------------------------------------------------------------------
    def _record(self, logical: int, snap: dict[str, Any], batch: dict[str, torch.Tensor]) -> None:
        self._snapshots[logical] = snap
        self._consumed += 1
        total = batch["input_ids"].numel()
        self._positions_total += total
        self._positions_pad += int(round(float(batch["pad_ratio"]) * total))
        codes = batch.get("image_codes")
        if codes is None or codes.shape[0] == 0:
            self._text_only += 1

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.num_workers == 0:
            stream = _MixtureStream(self, self.rank, self._snapshots.get(0), self._index_cache)
            for batch, snap in stream.batches():
                self._record(0, snap, batch)
                yield batch
            return
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the tokenizer is used before forking
        ds = _WorkerDataset(self, self._consumed % self.num_workers, dict(self._snapshots))
        dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=self.num_workers,
                                         worker_init_fn=worker_stop_signals)
        for logical, batch, snap in dl:
            self._record(int(logical), snap, batch)
            yield batch

    # ---- state --------------------------------------------------------------------------------------
    def _source_files(self) -> dict[str, dict[str, Any]]:
        """Per source: {num_files, files_hash} of the file list its Positions index."""
        out = {}
        for cfg in self.recipe.sources:
            files = [str(f) for f in self.recipe.files(cfg)]
            # names relative to the files' common folder: moving the whole data tree keeps resume valid
            base = os.path.commonpath([os.path.dirname(f) for f in files]) if files else ""
            names = "\n".join(os.path.relpath(f, base) for f in files)  # in shard-index order
            out[cfg.name] = {"num_files": len(files),
                             "files_hash": hashlib.sha256(names.encode("utf-8", "surrogateescape")).hexdigest()[:16]}
        return out

    def _check_source_files(self, saved: dict[str, Any] | None) -> None:
        """ValueError if a source's file list differs from the one the state was saved with."""
        if saved is None:  # a state from before file lists were recorded
            log.warning("the loader state does not record the sources' file lists (an older checkpoint): "
                        "resuming assumes every source still matches the same files in the same order")
            return
        for name, now in self._files.items():
            then = saved.get(name)
            if then is None or then == now:
                continue  # (a source unknown then is refused by the source-name check)
            n0, n1 = then.get("num_files"), now["num_files"]
            change = (f"{n0} files then, {n1} now ({n1 - n0:+d})" if isinstance(n0, int) and n0 != n1 else
                      f"the same number of files ({n1}) but other names or another order")
            raise ValueError(
                f"source {name!r} matches other files than when the loader state was saved: {change}. Positions "
                "index the file list, so resuming would replay seen data and skip unseen data. Restore the "
                "file list (e.g. pin the glob to the original files), or start this stage afresh from an "
                "export of the checkpoint (--init-from), which restarts the data stream")

    def _identity(self) -> dict[str, Any]:
        return {"recipe": self.recipe.name, "sources": [s.name for s in self.recipe.sources],
                "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "num_workers": self.num_workers, "micro_batch_size": self.micro_batch_size,
                "max_len": self.max_len, "pack": self.pack,
                "pack_lookahead": self.pack_lookahead if self.pack else None,  # no packing: it changes nothing
                "infinite": self.infinite}

    def state_dict(self) -> dict[str, Any]:
        """JSON-able position of this rank's stream (after the last batch handed out)."""
        return {"version": STATE_VERSION, **self._identity(),
                "source_files": {k: dict(v) for k, v in self._files.items()}, "consumed_batches": self._consumed,
                "positions_total": self._positions_total, "positions_pad": self._positions_pad,
                "text_only_batches": self._text_only,
                "workers": {str(k): v for k, v in self._snapshots.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict()` output; ValueError if it came from a different setup."""
        if state.get("version") == 1:
            state = _from_version_1(state, self._identity()["pack_lookahead"])
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported loader state version {state.get('version')!r} (this code reads versions 1 "
                             f"and {STATE_VERSION}): resume with the code that saved it, or start this stage afresh "
                             "from an export of the checkpoint (--init-from), which restarts the data stream")
        for k, v in self._identity().items():
            if state.get(k) != v:
                raise ValueError(f"loader state was saved with {k}={state.get(k)!r}, this loader has {v!r}; "
                                 "the stream cannot continue exactly")
        self._check_source_files(state.get("source_files"))
        self._consumed = int(state["consumed_batches"])
        self._positions_total = int(state["positions_total"])
        self._positions_pad = int(state["positions_pad"])
        self._text_only = int(state.get("text_only_batches", 0))
        self._snapshots = {int(k): v for k, v in state["workers"].items()}

    # ---- logging -------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Per-source counters (samples seen, skipped by reason with the first sample ids, kind counts)
        summed over workers, batches handed out, text-only batches, and pad positions."""
        sources: dict[str, dict[str, Any]] = {}
        for s in self.recipe.sources:
            agg = structured_stats({}, {})
            for snap in self._snapshots.values():
                src = snap["sources"][s.name]
                _add_source_stats(agg, structured_stats(src["counters"], src.get("examples", {})))
            sources[s.name] = agg
        return {"sources": sources, "batches": self._consumed, "text_only_batches": self._text_only,
                "positions_total": self._positions_total, "positions_pad": self._positions_pad,
                "pad_ratio": _ratio(self._positions_pad, self._positions_total)}


def _from_version_1(state: dict[str, Any], pack_lookahead: int | None) -> dict[str, Any]:
    """A version-1 state in version-2 form. Its snapshots hold no sample (the one a batch closed on is redrawn),
    so they resume at their exact data position with nothing to replay; the batches from there are packed with
    this loader's look-ahead (version 1 packed as pack_lookahead=1 does)."""
    log.warning("loader state of version 1 (before the packing look-ahead): the data continues at its exact "
                "position" + ("" if pack_lookahead is None else
                              f"; batches are packed with pack_lookahead={pack_lookahead} from here"))
    return {**state, "version": 2, "pack_lookahead": pack_lookahead,
            "workers": {k: {**v, "replay": 0, "pending": []} for k, v in state["workers"].items()}}


def _ratio(part: int, total: int) -> float:
    return part / total if total else 0.0


def _add_source_stats(into: dict[str, Any], more: dict[str, Any]) -> None:
    """Sum one source's structured stats (`structured_stats` form) into `into`: counts add, the skip
    examples keep the first MAX_EXAMPLES distinct ids per reason."""
    for k, v in more.items():
        if k == "skipped":
            for r, n in v.items():
                into["skipped"][r] = into["skipped"].get(r, 0) + n
        elif k == "examples":
            for r, ids in v.items():
                have = into["examples"].setdefault(r, [])
                have.extend(i for i in ids if i not in have and len(have) < MAX_EXAMPLES)
        else:
            into[k] = into.get(k, 0) + v


def merge_stats(per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum `MixtureLoader.stats()` of several ranks (counts add, sample ids keep the first few);
    `batches_per_rank` / `text_only_batches_per_rank` keep the per-rank figures."""
    out: dict[str, Any] = {"sources": {}, "batches": 0, "text_only_batches": 0, "positions_total": 0,
                           "positions_pad": 0, "batches_per_rank": [], "text_only_batches_per_rank": []}
    for st in per_rank:
        for k in ("batches", "text_only_batches", "positions_total", "positions_pad"):
            out[k] += st[k]
        out["batches_per_rank"].append(st["batches"])
        out["text_only_batches_per_rank"].append(st["text_only_batches"])
        for name, src in st["sources"].items():
            _add_source_stats(out["sources"].setdefault(name, structured_stats({}, {})), src)
    out["pad_ratio"] = _ratio(out["positions_pad"], out["positions_total"])
    return out


def format_stats(stats: dict[str, Any]) -> str:
    """One log line: `batches=.. text-only=.. pad=..% | name: samples=.. skipped[reason=.. (first ids)]`."""
    parts = [f"batches={stats['batches']} text-only={stats.get('text_only_batches', 0)} "
             f"pad={100 * stats['pad_ratio']:.1f}%"]
    for name, s in stats["sources"].items():
        skipped = " ".join(f"{k}={v}" + (f" (e.g. {'; '.join(s['examples'][k])})" if s.get("examples", {}).get(k)
                                         else "")
                           for k, v in s["skipped"].items() if v)
        parts.append(f"{name}: samples={s.get('samples', 0)}" + (f" skipped[{skipped}]" if skipped else ""))
    return " | ".join(parts)
