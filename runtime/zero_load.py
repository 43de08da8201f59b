"""Load weights into a model whose parameters ZeRO-3 may have partitioned across ranks.

`load_into(model, state, zero3)` copies a state dict (read on rank 0 only under ZeRO-3) into the model,
module by module inside `deepspeed.zero.GatheredParameters(modifier_rank=0)`, so no rank ever holds
the whole model twice; tensors the state lacks are initialised by the model's own `_init_weights`
on the gathered module and returned, so a caller can refuse an unexpected gap.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch


def weight_files(folder: Path) -> list[Path]:
    """The weight files of an HF folder: safetensors (those its index names, else every *.safetensors), else
    PyTorch .bin files (bases such as lmsys/vicuna-7b-v1.5 ship only those), by the same rule."""
    for index, pattern in (("model.safetensors.index.json", "*.safetensors"),
                           ("pytorch_model.bin.index.json", "pytorch_model*.bin")):
        if (folder / index).is_file():
            return [folder / f for f in sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))]
        if files := sorted(folder.glob(pattern)):
            return files
    raise FileNotFoundError(f"no weights in {folder} (model*.safetensors or pytorch_model*.bin)")


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a folder's weight files (sharded or not; .bin files are read without unpickling code)."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in weight_files(folder):
        if not f.is_file():
            raise FileNotFoundError(f"{f}, named by the index of {folder}, is missing")
        state.update(load_file(str(f)) if f.suffix == ".safetensors" else
                     torch.load(f, map_location="cpu", weights_only=True, mmap=True))
    return state


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor] | None, zero3: bool) -> list[str]:
    """Copy `state` (read on rank 0 only under ZeRO-3) into the model; returns the keys not filled.

    Under ZeRO-3 each submodule's partitioned parameters are gathered with modifier_rank=0, filled on
    rank 0 and re-partitioned, one module at a time.
    """
    from runtime.distributed import get_rank, rank0_verdict

    if state is not None:  # rotary inv_freq: a buffer older transformers saved (Llama-2's files hold it), now
        state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}  # computed instead
    if not zero3:
        result = model.load_state_dict(state, strict=False)
        if result.unexpected_keys:
            raise ValueError(f"unexpected weights: {result.unexpected_keys[:8]}")
        return list(result.missing_keys)
    import deepspeed

    # Checked on rank 0 before the first gather, and told to every rank, so all of them stop with the error:
    # under ZeRO-3 nothing else compares the file with the model (copy_ broadcasts a wrong shape).
    problem = None
    if get_rank() == 0:
        shapes = {n: tuple(getattr(t, "ds_shape", t.shape)) for n, t in model.state_dict(keep_vars=True).items()}
        unexpected = sorted(set(state) - set(shapes))
        wrong = [f"{k} {tuple(state[k].shape)} in the file, {shapes[k]} in the model" for k in sorted(state)
                 if k in shapes and tuple(state[k].shape) != shapes[k]]
        if unexpected:
            problem = f"unexpected weights: {unexpected[:8]}"
        elif wrong:
            problem = f"{len(wrong)} weights have another shape: {'; '.join(wrong[:4])}"
    if problem := rank0_verdict(problem):
        raise ValueError(problem)
    missing: list[str] = []
    for mod_name, module in model.named_modules():
        params = dict(module.named_parameters(recurse=False))
        bufs = {n: b for n, b in module.named_buffers(recurse=False) if n not in module._non_persistent_buffers_set}
        if not params and not bufs:
            continue
        prefix = f"{mod_name}." if mod_name else ""
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0):
            if get_rank() == 0:
                fresh = [prefix + n for n in {**params, **bufs} if prefix + n not in state]
                if fresh:  # not in the checkpoint: the model's own init, on the gathered tensors
                    model._init_weights(module)
                    missing.extend(fresh)
                for n, t in {**params, **bufs}.items():
                    if prefix + n in state:
                        t.data.copy_(state[prefix + n].to(t.dtype))
        for n, b in bufs.items():  # buffers are not partitioned: broadcast rank 0's value
            torch.distributed.broadcast(b.data, src=0)
    return missing


def refresh_master_weights(engine) -> None:
    """After weights were copied into the parameters of an initialised engine (`load_into` past
    `deepspeed.initialize`): DeepSpeed's ZeRO and bf16 optimizers keep fp32 master copies made at initialize,
    and their next step writes those back over the parameters, undoing the load. Refresh them from the
    parameters. A plain torch optimizer (no ZeRO, fp32) has none."""
    refresh = getattr(engine.optimizer, "refresh_fp32_params", None)
    if refresh is not None:
        refresh()


def require_parameters(model: torch.nn.Module, missing: list[str], source: str | Path, log=None) -> None:
    """ValueError if `load_into` left any parameter of `model` unfilled from `source` (a key mismatch
    would otherwise silently restart those weights from scratch); missing buffers are only logged."""
    lost = sorted(set(missing) & {n for n, _ in model.named_parameters()})
    if lost:
        raise ValueError(f"{source} lacks {len(lost)} parameters of this model (first: {lost[:5]}); "
                         "it was written for another model configuration")
    if missing and log is not None:
        log.warning(f"{source}: {len(missing)} buffers not in the weights keep their init: {missing[:5]}")
