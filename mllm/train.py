"""Stage two: train the unified MLLM with DeepSpeed (ZeRO-3 by default).

    deepspeed --num_gpus 8 -m mllm.train --stage pretrain --llama-dir Llama-2-7b-hf \
        --tokenizer unitok_tokenizer.pth --run-dir runs/mllm_stage1            (launch/mllm_stage1.sh)
    deepspeed --num_gpus 8 -m mllm.train --stage finetune --init-from runs/mllm_stage1/export \
        --run-dir runs/mllm_stage2                                                (launch/mllm_stage2.sh)

One switch selects the stage preset (REFERENCE.md 8.1): its recipe, learning rate, and the
checkpoint to start from. `--trainable` picks the trained modules (default: everything but the
frozen codebook; `mm_projector` alone is the projector-only warmup).
Under ZeRO-3 the model is built inside `deepspeed.zero.Init` and the starting weights are copied in
module by module with `GatheredParameters(modifier_rank=0)`, so no rank ever holds the whole model
twice. Checkpoints follow runtime/checkpoint.py, with the data-loader state. Resuming on another
number of ranks reloads the consolidated fp32 weights (DeepSpeed's zero_to_fp32) and restarts the
optimizer moments and the data stream (logged).

MFU = achieved FLOP/s / (peak FLOP/s x ranks), with FLOPs per step = 6 * N * T + 12 * L * d * S * T
(N parameters the tokens pass through, T non-pad tokens, L layers, d width, S sequence length): the
usual dense-transformer estimate (forward 2N + backward 4N per token, plus attention scores).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from mllm.data.loader import PACK_LOOKAHEAD
from runtime.cli import strip_launcher_args
from runtime.loop import RunConfig, Task, run
from runtime.optim import OptimConfig

ROOT = Path(__file__).resolve().parents[1]
STAGES = {
    "pretrain": {"recipe": "data_recipes/stage1_pretrain.yaml", "lr": 5e-5},
    "finetune": {"recipe": "data_recipes/stage2_finetune.yaml", "lr": 2e-5},
}
GROUPS = ("llm", "attn_projection", "mm_projector", "depth_head")


def _mllm_optim() -> OptimConfig:
    return OptimConfig(lr=None, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8, warmup_frac=0.03, end_ratio=0.0,
                       grad_clip=1.0)


@dataclass
class MllmTrainConfig(RunConfig):
    """A stage-two training run (the shared run flags are runtime/loop.py's RunConfig)."""

    stage: Literal["pretrain", "finetune"] = "pretrain"
    """Stage preset: its recipe and learning rate (pretrain: stage-1 recipe, lr 5e-5; finetune: stage-2
    recipe, lr 2e-5). The starting point is given by --llama-dir + --tokenizer or by --init-from;
    finetune requires --init-from (the pretrain export)."""
    run_dir: str = "runs/mllm"
    """Output folder: config.json, log, metrics.jsonl, data_stats.json, checkpoints, export."""
    grad_accum: int = 4
    """Micro batches per optimizer step."""
    ds_config: str = "zero3"
    """DeepSpeed config: a name in ds_configs/ (zero3, zero2, zero3_offload) or a path."""
    keep_last: int = 2
    """Checkpoints kept."""
    llama_dir: str | None = None
    """Local HF Llama-architecture folder (Llama-2/3, Mistral: weights + tokenizer); stage pretrain. The depth
    head follows its head layout, the image markers its tokenizer (mllm/modeling/base.py)."""
    tokenizer: str | None = None
    """UniTok checkpoint (our folder or the official .pth) for the codebook and projection; pretrain."""
    tokenizer_attn_mode: Literal["full", "causal"] = "full"
    """Projection attention of an official tokenizer .pth (its keys do not record it)."""
    init_from: str | None = None
    """An exported MLLM folder to start from (stage finetune, or a continued pretrain)."""
    recipe: str | None = None
    """Data recipe YAML; default: the stage's."""
    data_root: str | None = None
    """Override the recipe's data root."""
    optim: OptimConfig = field(default_factory=_mllm_optim)
    """AdamW over the trainable groups; --optim.lr defaults to the stage's rate."""
    trainable: tuple[str, ...] = GROUPS
    """Trained module groups among llm, attn_projection, mm_projector, depth_head (codebook always frozen)."""
    micro_batch: int = 4
    """Rows per rank per micro step."""
    max_len: int = 2048
    """Positions per row (images count h*w each)."""
    pack: bool = True
    """Pack several samples per row (no attention across samples) instead of padding."""
    pack_lookahead: int = PACK_LOOKAHEAD
    """Samples that fit no row of a full batch held for later batches while more are drawn to fill the rows
    (1: the first such sample closes the batch, as before; 8 cut padding from 11 to 3 % at --max-len 2048 and
    --micro-batch 4 on a realistic mix: benchmarks/README.md)."""
    attention: Literal["auto", "flash", "flex", "sdpa", "eager"] = "auto"
    """LLM attention kernel: auto = flash (flash-attn) for bf16 on a GPU where it is installed, else sdpa. In packed
    rows flash (varlen) and flex (PyTorch flex_attention with a block mask, compiled at the first step) skip the
    pairs of positions of different samples; sdpa computes every pair of a row under a mask."""
    num_workers: int = 2
    """Data worker processes per rank."""
    gradient_checkpointing: bool | None = None
    """Activation checkpointing of the Llama layers; default: on with a GPU."""
    peak_tflops: float = 0.0
    """Per-device peak bf16 TFLOP/s for MFU (0 = from the device name: A100, H100, H200, GH200, B200,
    L40S, L4; MFU is not shown on CPU or unknown devices)."""
    mllm: dict[str, int] = field(default_factory=dict)
    """Extra UniMLLMConfig fields for a new model, e.g. `--mllm depth_num_layers 3`."""

    reshards_on_resume = True
    new_stream_hint = (", or go on from this checkpoint's weights with new flags: export it (python -m mllm.export "
                       "--checkpoint CKPT --out DIR) and start a new run from it with --init-from DIR (the "
                       "optimizer, the schedule and the data stream restart)")

    @staticmethod
    def stream_flags(config):
        flags = {f"--{k.replace('_', '-')}": config.get(k) for k in ("seed", "micro_batch", "max_len", "pack",
                                                                    "pack_lookahead", "num_workers")}
        if flags["--pack"] is False:  # without packing the look-ahead changes nothing
            flags["--pack-lookahead"] = None
        return flags

    def __post_init__(self):
        super().__post_init__()
        self.trainable = tuple(self.trainable)
        bad = set(self.trainable) - set(GROUPS)
        if bad or not self.trainable:
            raise ValueError(f"trainable groups must be a non-empty subset of {GROUPS}, got {self.trainable}")
        for name in ("micro_batch", "max_len", "pack_lookahead"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive")
        if self.attention != "auto":  # before any launch work; build_model checks again with the resolved precision
            from mllm.modeling.modeling import attn_implementation

            attn_implementation(self.attention, torch.float32 if self.precision == "fp32" else torch.bfloat16)

    def resolved(self) -> "MllmTrainConfig":
        """Fill stage defaults and check the starting point (before any engine starts)."""
        st = STAGES[self.stage]
        lr = st["lr"] if self.optim.lr is None else self.optim.lr
        out = dataclasses.replace(self, recipe=self.recipe or str(ROOT / st["recipe"]),
                                  optim=dataclasses.replace(self.optim, lr=lr))
        if out.init_from is not None:  # the export carries the model: these would be silently ignored
            given = [flag for flag, v in (("--llama-dir", out.llama_dir), ("--tokenizer", out.tokenizer),
                                          ("--mllm", out.mllm or None),
                                          ("--tokenizer-attn-mode", "causal" if out.tokenizer_attn_mode == "causal"
                                           else None)) if v is not None]
            if given:
                raise ValueError(f"{', '.join(given)} cannot be combined with --init-from: the export folder "
                                 "already holds the model, its tokenizer and its codebook")
        if out.init_from is None:
            if out.stage == "finetune":
                raise ValueError("--stage finetune needs --init-from (the pretrain export folder)")
            if out.llama_dir is None or out.tokenizer is None:
                raise ValueError("--stage pretrain needs --llama-dir and --tokenizer (or --init-from)")
        from runtime.weights import fetch_hint

        if out.llama_dir is not None and not (Path(out.llama_dir) / "config.json").is_file():
            raise FileNotFoundError(f"no config.json in --llama-dir {out.llama_dir}; for Llama-2-7B, "
                                    f"{fetch_hint('llama-2-7b')}")
        if out.init_from is not None and not (Path(out.init_from) / "config.json").is_file():
            raise FileNotFoundError(f"no config.json in --init-from {out.init_from} (expected an export folder)")
        from runtime.zero_load import weight_files

        weight_files(Path(out.init_from or out.llama_dir))  # a folder without weights: now, not once the model is built
        if out.tokenizer is not None and not Path(out.tokenizer).exists():
            raise FileNotFoundError(f"tokenizer checkpoint not found: {out.tokenizer}; for the released one, "
                                    f"{fetch_hint('unitok-tokenizer')}")
        if not Path(out.recipe).is_file():
            raise FileNotFoundError(f"recipe not found: {out.recipe}")
        return out


def parse_config(argv: list[str] | None = None) -> MllmTrainConfig:
    import tyro

    return tyro.cli(MllmTrainConfig, args=strip_launcher_args(argv)).resolved()


# ---- model construction ---------------------------------------------------------------------------
def text_tokenizer(cfg: MllmTrainConfig):
    """The base's (or --init-from's) text tokenizer, with a pad token."""
    from mllm.modeling.base import load_text_tokenizer

    text_tok = load_text_tokenizer(cfg.init_from or cfg.llama_dir, "--init-from" if cfg.init_from else "--llama-dir")
    if text_tok.pad_token_id is None:  # pad = unk = 0 as released; Llama-3 has no unk: its eos (masked anyway)
        text_tok.pad_token = text_tok.unk_token or text_tok.eos_token
    return text_tok


def build_model(cfg: MllmTrainConfig, ds: dict, log, codes_tokenizer: str | None = None, text_tok=None):
    """The MLLM (partitioned under ZeRO-3) and the text tokenizer (`text_tok`, else loaded). `codes_tokenizer`:
    the fingerprint of the tokenizer that extracted the code shards (preflight), refused when it is not the
    model's."""
    import deepspeed

    import mllm  # noqa: F401  (registers the model type)
    from mllm import UniMLLMConfig, UniMLLMForCausalLM
    from mllm.modeling.modeling import attn_implementation
    from runtime.distributed import get_rank
    from runtime.zero_load import load_into, read_weights

    zero3 = ds["zero_optimization"].get("stage", 0) == 3
    src = Path(cfg.init_from or cfg.llama_dir)
    text_tok = text_tokenizer(cfg) if text_tok is None else text_tok
    tok_model = None
    if cfg.init_from:
        config = UniMLLMConfig.from_pretrained(src)
        where = f"--init-from {src}"
    else:
        from mllm.modeling.base import config_from_base
        from unitok import load_tokenizer

        tok_model = load_tokenizer(cfg.tokenizer, attn_mode=cfg.tokenizer_attn_mode)
        config = config_from_base(src, tok_model, text_tok, max_len=cfg.max_len, **cfg.mllm)
        config.tokenizer_fingerprint = tok_model.fingerprint()  # recorded in the export, checked by the next stage
        where = f"--tokenizer {cfg.tokenizer} (--tokenizer-attn-mode {cfg.tokenizer_attn_mode})"
    own = getattr(config, "tokenizer_fingerprint", None)
    if codes_tokenizer is not None and own is not None and codes_tokenizer != own:
        raise ValueError(f"the recipe's code shards were extracted by tokenizer {codes_tokenizer} (their "
                         f"manifest.json) but {where} is tokenizer {own}: the MLLM reads codes through its own "
                         "tokenizer's codebook; extract them with that tokenizer, or train with the one that made "
                         "them (an official .pth: unitok.extract --attn-mode and --tokenizer-attn-mode must agree)")
    if config.pad_token_id is None:
        config.pad_token_id = text_tok.pad_token_id
    dtype = torch.bfloat16 if ds.get("bf16", {}).get("enabled") else torch.float32
    config._attn_implementation = attn_implementation(cfg.attention, dtype)
    if zero3:
        # Partition at construction; skip random init (weights are loaded or initialised per module
        # in load_into, where each module's parameters are gathered).
        from transformers import initialization as hf_init

        # No `dtype=`: the config's bf16 section decides. DeepSpeed 0.19's zero.Init reads an explicit dtype
        # as `dtype or fp16 if accelerator.is_fp16_supported() else bf16 ...`, which on a CPU without oneDNN
        # fp16 (AVX2 hosts) makes every parameter bf16 even when fp32 is asked for: bf16 math on reference
        # kernels, 5-6x slower steps.
        with hf_init.no_init_weights(), deepspeed.zero.Init(config_dict_or_path=ds):
            model = UniMLLMForCausalLM(config)
    else:
        model = UniMLLMForCausalLM(config)
    state = None
    if get_rank() == 0 or not zero3:
        state = read_weights(src)
        if config.tie_word_embeddings:  # tied bases (Llama-3.2 1B/3B) save no lm_head: fill it, not re-init it
            state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
        if tok_model is not None:  # frozen codebooks + causal projection from the tokenizer
            state.update({f"model.multi_embedder.quantizer.{k}": v
                          for k, v in tok_model.quantizer.state_dict().items()})
            state.update({f"model.multi_embedder.attn_projection.{k}": v
                          for k, v in tok_model.post_quant_proj.state_dict().items()})
    missing = load_into(model, state, zero3)
    # what a Llama folder cannot hold: the depth head and the image embedder (its codebook and projection come
    # from --tokenizer); an export holds everything. Anything else fresh is an incomplete download or another
    # architecture (a bare LlamaModel without the `model.` prefix), which would train from random weights.
    allowed = () if cfg.init_from else ("ar_head.", "model.multi_embedder.")
    lost = [k for k in missing if not k.startswith(allowed)] if get_rank() == 0 else []
    if lost:
        raise ValueError(f"{src} lacks {len(lost)} weights of the model, e.g. {lost[:6]}: an incomplete download "
                         f"(every shard of its model.safetensors.index.json present?) or another architecture")
    if get_rank() == 0:
        from runtime.checkpoint import CheckpointManager

        fresh = sorted({k.split(".")[0] + "." + k.split(".")[1] for k in missing})
        resume = getattr(cfg, "resume", None)
        resuming = resume not in (None, "", "none") and CheckpointManager(cfg.run_dir).resolve(resume) is not None
        log.info(f"initialised from {src}; {len(missing)} tensors start fresh ({', '.join(fresh)})"
                 + ("; the checkpoint resumed below replaces every weight" if resuming else ""))
    if not zero3:
        rope = dict(model.model.rotary_emb.named_buffers(recurse=False))
        model.to(dtype)
        # the rotary frequencies stay fp32, as ZeRO-3's construction and every inference load keep them: in bf16
        # a ZeRO-0/2 run trained on rounded angles (0.6 rad off at position 512) and was served exact ones
        for name, buf in rope.items():
            setattr(model.model.rotary_emb, name, buf)
    got = {p.dtype for p in model.parameters()}
    if got != {dtype}:
        raise RuntimeError(f"the model holds parameters of {sorted(map(str, got))}, not the {dtype} that "
                           f"the precision setting asks for")
    set_trainable(model, cfg.trainable)
    use_ckpt = cfg.gradient_checkpointing if cfg.gradient_checkpointing is not None else torch.cuda.is_available()
    if use_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, text_tok


def set_trainable(model, groups: tuple[str, ...]) -> None:
    """Freeze everything, then unfreeze the chosen groups; the codebook stays frozen."""
    model.requires_grad_(False)
    emb = model.model.multi_embedder
    if "llm" in groups:
        model.model.embed_tokens.requires_grad_(True)
        model.model.layers.requires_grad_(True)
        model.model.norm.requires_grad_(True)
        model.lm_head.requires_grad_(True)
    if "attn_projection" in groups:
        emb.attn_projection.requires_grad_(True)
    if "mm_projector" in groups:
        emb.mm_projector.requires_grad_(True)
    if "depth_head" in groups:
        model.ar_head.requires_grad_(True)
    emb.quantizer.requires_grad_(False)


def compiled_blocks(pack: bool, attn_implementation: str | None) -> tuple[tuple[type, ...], tuple[type, ...]]:
    """--compile's (static, dynamic) block types: packed rows are all max_len long, so the LLM layers are static;
    the depth head's batch (image positions) varies. Under flash-attn, packed rows pass each layer the batch's
    sequence bounds (a tensor of samples + 1 entries and an int), which change with every batch: compiled, the
    layers recompiled per batch and layer until dynamo's cache was full, so there they stay eager (flash-attn
    is a fused kernel already) with a warning."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from mllm.modeling.depth_head import DepthLayer
    from runtime.distributed import warn_once

    llm = (LlamaDecoderLayer,)
    if not pack:
        return (), (DepthLayer, *llm)
    if attn_implementation and "flash" in attn_implementation:
        warn_once("--compile with flash-attn and packed rows: the LLM layers stay uncompiled (flash-attn's "
                  "sequence bounds change with every packed batch, a recompile each); the depth head is compiled")
        return (), (DepthLayer,)
    return llm, (DepthLayer,)


def log_partition(model, info, log) -> list[int]:
    """Log how many parameter elements each rank holds (ZeRO-3 partitions; other stages replicate)."""
    local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters())
    counts = [local]
    if info.world_size > 1:
        from runtime.distributed import collective_device

        t = torch.tensor([local], dtype=torch.long, device=collective_device())  # NCCL has no CPU tensors
        gathered = [torch.zeros_like(t) for _ in range(info.world_size)]
        torch.distributed.all_gather(gathered, t)
        counts = [int(x) for x in gathered]
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    log.info(f"parameter elements per rank: {counts} of {total}")
    return counts


def model_state_bytes(engine) -> dict[str, int]:
    """Bytes this rank holds for parameters, fp32 master weights and optimizer moments."""
    params = sum((p.ds_tensor if hasattr(p, "ds_tensor") else p).numel() * p.element_size()
                 for p in engine.module.parameters())
    opt = engine.optimizer
    masters = getattr(opt, "fp32_partitioned_groups_flat", None) or getattr(opt, "single_partition_of_fp32_groups", [])
    master = sum(t.numel() * t.element_size() for t in masters)
    inner = getattr(opt, "optimizer", opt)
    moments = sum(v.numel() * v.element_size() for st in inner.state.values() for v in st.values()
                  if torch.is_tensor(v) and v.dim() > 0)
    return {"params": params, "master": master, "moments": moments, "total": params + master + moments}


# ---- the loop -------------------------------------------------------------------------------------
MODEL_KEYS = ("input_ids", "labels", "attention_mask", "position_ids", "image_codes", "image_lens",
              "image_starts", "image_gen")


def flops_per_step(model, tokens: int, seq_len: int) -> float:
    """6 N T + 12 L d S T (see the module docstring)."""
    c = model.config
    n = getattr(model, "_num_params_total", None)
    if n is None:
        n = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        model._num_params_total = n
    return 6.0 * n * tokens + 12.0 * c.num_hidden_layers * c.hidden_size * seq_len * tokens


# Dense bf16 tensor-core peak per device, TFLOP/s, from NVIDIA's data sheets (the "with sparsity" figures
# halved). Matched in order against torch.cuda.get_device_name(), so specific names come first.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0),
    ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0),
)


def peak_flops(cfg: MllmTrainConfig, device_name: str | None = None) -> float | None:
    """Peak FLOP/s of one device for MFU: --peak-tflops, else the table above; None (MFU unknown) on CPU
    or on a device the table does not know (one warning naming it)."""
    if cfg.peak_tflops > 0:
        return cfg.peak_tflops * 1e12
    if device_name is None:
        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in device_name:
            return tflops * 1e12
    from runtime.distributed import warn_once

    warn_once(f"MFU unknown: no peak FLOP/s for {device_name!r}; pass --peak-tflops")
    return None


class MllmTask(Task):
    """The ZeRO-3 MLLM engine and the mixture loader, driven by runtime/loop.py."""

    project = "unitok-mllm"
    weighted = {"text_loss": "text_tokens", "image_loss": "image_tokens"}

    def __init__(self, cfg: MllmTrainConfig, engine, loader, info):
        self.cfg, self.engine, self.loader, self.info = cfg, engine, loader, info
        self.engines = {"mllm": engine}
        self.model = engine.module
        self.peak = peak_flops(cfg)
        self.seq = 0

    def forward(self, batch, step):
        inputs = {k: (batch[k].to(self.info.device) if batch[k] is not None else None) for k in MODEL_KEYS}
        out = self.engine(**inputs)
        self.seq = batch["input_ids"].shape[1]
        return {"loss": out.loss, "text_loss": out.text_loss, "image_loss": out.image_loss,
                "text_tokens": out.num_text_tokens, "image_tokens": out.num_image_tokens}

    def backward(self, out, batch, step):
        self.engine.backward(out["loss"])
        self.engine.step()
        return {}

    def count(self, batch):
        return int(batch["num_samples"]), round(batch["input_ids"].numel() * (1 - float(batch["pad_ratio"])))

    def batch_hash(self, batch):
        return hashlib.sha1(batch["input_ids"].numpy().tobytes()).hexdigest()[:8]

    def after_step(self, step, record, batch, out):
        if step == 1 or step == self.cfg.total_steps:
            from runtime.log import get_logger

            mem = model_state_bytes(self.engine)
            get_logger().warning(f"rank {self.info.rank}: model-state MiB {mem['total'] / 2**20:.2f} (params "
                                 f"{mem['params'] / 2**20:.2f}, fp32 master {mem['master'] / 2**20:.2f}, "
                                 f"moments {mem['moments'] / 2**20:.2f})")

    def data_stats(self) -> dict[str, Any]:
        """Every rank's data counters, summed (a collective: all ranks call it at the same steps)."""
        from mllm.data.loader import merge_stats

        own = self.loader.stats()
        if self.info.world_size == 1:
            return merge_stats([own])
        gathered: list[Any] = [None] * self.info.world_size
        torch.distributed.all_gather_object(gathered, own)
        return merge_stats(gathered)

    def on_log(self, step, record, tokens_per_s):
        from mllm.data.loader import format_stats

        suffix = ""
        if self.peak is not None and tokens_per_s > 0:
            mfu = flops_per_step(self.model, int(tokens_per_s), self.seq) / (self.peak * self.info.world_size)
            suffix += f" | mfu {100 * mfu:.1f}%"
            record["mfu"] = mfu  # (it was only in the console line)
        stats = self.data_stats()
        suffix += f" | pad {100 * stats['pad_ratio']:.1f}%\ndata (all ranks): {format_stats(stats)}"
        record["data"] = stats
        skipped = {f"skipped/{name}/{r}": n for name, src in stats["sources"].items()
                   for r, n in src["skipped"].items() if n}
        extra = {"pad_ratio": stats["pad_ratio"], **skipped}
        return suffix, extra | ({"mfu": record["mfu"]} if "mfu" in record else {})

    def save_extra(self, tmp):
        from runtime.distributed import is_main_process

        if is_main_process():
            self.model.config.to_json_file(str(tmp / "mllm_config.json"))

    def load_checkpoint(self, ckpt, rank_state, step, log):
        """The same number of ranks resumes exactly; another one reloads the consolidated fp32 weights
        (optimizer moments and the data stream restart, logged)."""
        if int(rank_state.get("world_size", self.info.world_size)) == self.info.world_size:
            return super().load_checkpoint(ckpt, rank_state, step, log)
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        from runtime.zero_load import load_into, refresh_master_weights, require_parameters

        log.warning(f"{ckpt} was written by {rank_state['world_size']} ranks, this run has "
                    f"{self.info.world_size}: loading the consolidated fp32 weights; the optimizer moments restart, "
                    "and the data stream restarts from its beginning (the batches of step 1 are seen again)")
        zero3 = getattr(self.engine, "zero_optimization_stage", lambda: 0)() == 3
        # under ZeRO-3 load_into reads the state on rank 0 only: the other ranks do not build the whole model
        fp32 = (get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="mllm")
                if self.info.rank == 0 or not zero3 else None)
        require_parameters(self.model, load_into(self.model, fp32, zero3), ckpt, log)
        refresh_master_weights(self.engine)
        self.engine.lr_scheduler.last_epoch = step - 1
        self.engine.lr_scheduler.step()
        return False

    def finish(self, run_dir, ckpts, trained, log):
        from mllm.data.loader import format_stats
        from runtime.distributed import barrier, is_main_process

        final = self.data_stats()
        log.info(f"data at the end (all ranks): {format_stats(final)}")
        if is_main_process():
            (run_dir / "data_stats.json").write_text(json.dumps(final, indent=1))
        if self.cfg.export:
            from mllm.export import export_from_checkpoint

            barrier()
            if is_main_process():
                export_from_checkpoint(ckpts.latest(), run_dir / "export",
                                       tokenizer_dir=Path(self.cfg.init_from or self.cfg.llama_dir))
                log.info(f"exported {run_dir / 'export'}")


def build(cfg: MllmTrainConfig, info, log) -> MllmTask:
    """Preflight the data, then the model, its DeepSpeed engine and the mixture loader."""
    import deepspeed

    from mllm.data.loader import MixtureLoader, check_budgets
    from mllm.data.preflight import preflight, probe
    from mllm.data.recipe import load_recipe
    from runtime.compile import compile_blocks, refuse_with_zero3
    from runtime.distributed import barrier, is_main_process
    from runtime.ds_config import load_ds_config

    # Data problems fail here, before the model is built: rank 0 checks first (and writes the
    # instruction image index), the others after it, reading that index; then rank 0 templates a few
    # records of each source with the text tokenizer.
    recipe = load_recipe(cfg.recipe, root=cfg.data_root)
    expect_size = _start_image_size(cfg)
    check_budgets(recipe, info.world_size, cfg.num_workers)  # (the loader is made after the model)
    report = None
    for turn in (0, 1):
        if is_main_process() == (turn == 0):
            report = preflight(recipe, expect_image_size=expect_size)
        barrier()
    text_tok = text_tokenizer(cfg)
    if is_main_process():
        report.probed = probe(recipe, text_tok, cfg.max_len)
    barrier()
    log.info(report.summary())
    o = cfg.optim
    ds = load_ds_config(cfg.ds_config, micro_batch=cfg.micro_batch, grad_accum=cfg.grad_accum,
                        world_size=info.world_size, grad_clip=o.grad_clip, precision=cfg.precision)
    log.info("precision: " + ("bf16 weights, fp32 master copies" if ds["bf16"]["enabled"] else "fp32"))
    refuse_with_zero3(cfg.compile, ds)
    model, text_tok = build_model(cfg, ds, log, codes_tokenizer=report.tokenizer_fingerprint, text_tok=text_tok)
    model.config.image_size = report.image_size or expect_size or model.config.image_size
    params = [p for p in model.parameters() if p.requires_grad]
    n_train = sum(getattr(p, "ds_numel", p.numel()) for p in params)
    log.info(f"stage {cfg.stage}: training {n_train / 1e6:.2f}M parameters ({', '.join(cfg.trainable)}), "
             f"ZeRO-{ds['zero_optimization'].get('stage', 0)}, world {info.world_size}, "
             f"global batch {ds['train_batch_size']} rows of {cfg.max_len}")
    log_partition(model, info, log)
    log.info(f"attention: {model.config._attn_implementation}")
    if cfg.compile:
        static, dynamic = compiled_blocks(cfg.pack, model.config._attn_implementation)
        n = compile_blocks(model, static=static, dynamic=dynamic, backend=cfg.compile)
        log.info(f"compile: {n} blocks ({cfg.compile})")
    if "offload_optimizer" in ds["zero_optimization"]:  # DeepSpeed's CPU Adam builds the optimizer itself
        if o.fused:
            raise ValueError("--optim.fused does not apply with ZeRO optimizer offload: DeepSpeed builds its own "
                             "CPU Adam there (already one vectorised pass)")
        ds["optimizer"] = {"type": "AdamW", "params": {"lr": o.lr, "betas": list(o.betas), "eps": o.eps,
                                                      "weight_decay": o.weight_decay}}
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=ds,
                                               lr_scheduler=lambda opt: o.schedule(opt, cfg.total_steps))
    else:
        opt = o.adamw(params)
        log.info("optimizer: " + o.summary())
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds,
                                               lr_scheduler=o.schedule(opt, cfg.total_steps))
    loader = MixtureLoader(recipe, text_tok, rank=info.rank, world_size=info.world_size, seed=cfg.seed,
                           micro_batch_size=cfg.micro_batch, max_len=cfg.max_len, pack=cfg.pack,
                           pad_id=text_tok.pad_token_id, num_workers=cfg.num_workers,
                           boi_id=model.config.boi_token_id, eoi_id=model.config.eoi_token_id,
                           codebooks=(model.config.num_codebooks, model.config.codebook_size),
                           pack_lookahead=cfg.pack_lookahead)
    return MllmTask(cfg, engine, loader, info)


def train(cfg: MllmTrainConfig) -> dict[str, Any]:
    """Run or resume; returns the last step's record."""
    return run(cfg, build)


def _start_image_size(cfg: MllmTrainConfig) -> int | None:
    """Image size the starting model was trained at, when recorded (an export of this project)."""
    if cfg.init_from is None:
        return None
    conf = json.loads((Path(cfg.init_from) / "config.json").read_text())
    return conf.get("image_size")


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    train(parse_config(argv))


if __name__ == "__main__":
    main()
