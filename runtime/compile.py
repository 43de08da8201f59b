"""`--compile`: torch.compile each repeated block of a model in place (regional compilation).

Compiling the blocks rather than the whole model (as torchtitan does per TransformerBlock) keeps
everything data-dependent outside the graphs: the tokenizer's quantizer and losses, the MLLM's image
scatter and loss selection, and activation checkpointing around each block. Blocks of one class share
their code, so each distinct input shape is one graph, compiled once. ZeRO-3 is refused
(`refuse_with_zero3`): its parameter hooks sit on every submodule inside a block.

Shapes: `static` blocks (every call has one of a few fixed shapes: the tokenizer at a fixed image
size, the LLM's packed rows of max_len) compile with dynamic=False, one graph per shape; `dynamic`
blocks (the depth head, whose batch is the number of image positions in the micro batch and whose
length grows during cached generation) are marked dynamic up front, so a new count is not a recompile.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def refuse_with_zero3(backend: str | None, ds: dict) -> None:
    """ValueError for --compile under ZeRO-3. DeepSpeed gathers partitioned parameters in hooks on every
    submodule, which it keeps out of graphs (`torch.compiler.disable`), so each compiled block splits
    into one graph per linear and norm (measured: 98 graph breaks and a first step of 2 minutes on the
    2-layer test model, for no gain). ZeRO-2 keeps whole parameters and compiles cleanly."""
    if backend and ds.get("zero_optimization", {}).get("stage", 0) == 3:
        raise ValueError("--compile does not work with ZeRO-3 (DeepSpeed's per-submodule parameter hooks split "
                         "every compiled block into one graph per layer): use --ds-config zero2 with --compile, "
                         "or leave --compile off")


def compile_blocks(model: nn.Module, static: tuple[type, ...] = (), dynamic: tuple[type, ...] = (),
                   backend: str = "inductor") -> int:
    """Compile every submodule of a `static` or `dynamic` type in place -> how many were compiled."""
    n = 0
    for m in model.modules():
        if isinstance(m, dynamic + static):
            # the forward only: the block's own module hooks stay outside the compiled region
            m.forward = torch.compile(m.forward, backend=backend, dynamic=isinstance(m, dynamic))
            n += 1
    if n == 0:
        raise ValueError(f"--compile: no {[t.__name__ for t in static + dynamic]} block in {type(model).__name__}")
    # one graph per distinct block shape; the default limit (8) would drop a model with many stage widths
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return n


def graph_counts() -> dict[str, int]:
    """Graphs compiled and graph breaks so far in this process (torch._dynamo's counters): after the
    first steps both stay constant, or something recompiles every step."""
    from torch._dynamo.utils import counters

    return {"compiled_graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values()))}
