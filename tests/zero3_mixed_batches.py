"""Run by test_zero3_mixed_batches.py under the deepspeed launcher: ZeRO-3 training steps where the
ranks' batches hold different kinds of content (text only, understanding images, text-to-image, a mix),
swapping between steps. Every rank must run the same collectives whatever its batch holds; a rank
that runs a module a different number of times makes the gathers mismatch and the job hang (the
process-group timeout below turns a hang into an error). Each rank writes its losses and the number
of parameter elements that received a gradient."""
import json
import sys
from pathlib import Path

import deepspeed
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from mllm_tiny import tiny_config  # noqa: E402

from mllm import UniMLLMForCausalLM  # noqa: E402
from mllm.data.collate import Sample, collate  # noqa: E402
from mllm.modeling.configuration import IMAGE_TOKEN_INDEX  # noqa: E402
from runtime.distributed import end_job, init_distributed  # noqa: E402
from runtime.zero_load import load_into  # noqa: E402

out = Path(sys.argv[-1])
init_distributed(0, timeout_min=1)
rank = torch.distributed.get_rank()
cfg = tiny_config()
torch.manual_seed(0)
ref = UniMLLMForCausalLM(cfg)
ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
      "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
from transformers import initialization as hf_init  # noqa: E402

with hf_init.no_init_weights(), deepspeed.zero.Init(config_dict_or_path=ds):
    model = UniMLLMForCausalLM(cfg)
load_into(model, ref.state_dict() if rank == 0 else None, zero3=True)
model.model.multi_embedder.quantizer.requires_grad_(False)
params = [p for p in model.parameters() if p.requires_grad]
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(params, lr=1e-3), config=ds)
rng = np.random.default_rng(rank)


def codes(h=2, w=2):
    return rng.integers(0, cfg.codebook_size, (cfg.num_codebooks, h, w))


def text():  # a text-only document: every position supervised
    ids = [1] + rng.integers(10, 200, 9).tolist() + [2]
    return Sample(ids, ids)


def understanding():  # image in the prompt, answer supervised
    ids = [1, 20, IMAGE_TOKEN_INDEX, 21, 22, 23, 2]
    return Sample(ids, [-100, -100, -100, -100, 22, 23, 2], [codes()], [False])


def t2i():  # caption, boi, image supervised by the depth head, eoi
    ids = [1, 30, 31, 5, IMAGE_TOKEN_INDEX, 6, 2]
    return Sample(ids, [-100, -100, -100, -100, -100, 6, 2], [codes(2, 3)], [True])


KINDS = {"text": [text, text], "understanding": [understanding], "t2i": [t2i], "mix": [text, understanding, t2i]}
# (rank 0, rank 1) per step: a text-only rank against image ranks, then swapped, then other pairings
SCHEDULE = [("text", "mix"), ("mix", "text"), ("text", "text"), ("t2i", "text"), ("text", "understanding"),
            ("understanding", "t2i"), ("mix", "mix")]
log = []
for step, kinds in enumerate(SCHEDULE):
    batch = collate([make() for make in KINDS[kinds[rank]]], pad_id=0, pack_to=48)
    keys = ("input_ids", "labels", "attention_mask", "position_ids", "image_codes", "image_lens", "image_starts",
            "image_gen")
    loss_out = engine(**{k: batch[k] for k in keys})
    engine.backward(loss_out.loss)
    engine.step()
    log.append({"kind": kinds[rank], "loss": float(loss_out.loss), "text_loss": float(loss_out.text_loss),
                "image_loss": float(loss_out.image_loss), "images": int(batch["image_codes"].shape[0])
                if batch["image_codes"] is not None else 0})
out.with_name(f"{out.name}.rank{rank}").write_text(json.dumps(log))
# the engine and the partitioned model hold the process group: free them before the job ends, so that its
# threads stop there and not in the interpreter's finalisation (runtime.distributed.end_job)
engine.destroy()
del engine, _, model, params, loss_out
end_job()
