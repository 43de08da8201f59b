"""Run by test_zero3_generation.py under the deepspeed launcher: generation on ZeRO-3-partitioned
weights must equal generation with the full model, on every rank, with ranks finishing at different times."""
import json
import sys
from pathlib import Path

import deepspeed
import torch

sys.path.insert(0, str(Path(__file__).parent))
from mllm_tiny import tiny_config  # noqa: E402

from mllm import UniMLLMForCausalLM  # noqa: E402
from mllm.data.collate import Sample  # noqa: E402
from mllm.generate import SamplingConfig, answer, generate_images  # noqa: E402
from runtime.zero_load import load_into  # noqa: E402
from runtime.distributed import end_job, init_distributed  # noqa: E402

out = Path(sys.argv[-1])
info = init_distributed(0)
cfg = tiny_config()
torch.manual_seed(0)
ref = UniMLLMForCausalLM(cfg).eval()  # identical on every rank (same seed)
ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
from transformers import initialization as hf_init  # noqa: E402

with hf_init.no_init_weights(), deepspeed.zero.Init(config_dict_or_path=ds):
    model = UniMLLMForCausalLM(cfg)
load_into(model, ref.state_dict() if info.rank == 0 else None, zero3=True)
engine, *_ = deepspeed.initialize(model=model, config=ds)
model.eval()
partitioned = all(p.ds_tensor.numel() < p.ds_numel for p in model.parameters() if p.ds_numel > 1)
greedy = SamplingConfig(temperature=0)
prompt = [[1, 50 + info.rank, 51, 3]]
codes = generate_images(model, prompt, (2, 2), null_ids=[1, 9, 3], cfg_scale=2.0, sampling=greedy)
ref_codes = generate_images(ref, prompt, (2, 2), null_ids=[1, 9, 3], cfg_scale=2.0, sampling=greedy)
q = [Sample([1, 40 + info.rank, 41], [-100] * 3)]
first = answer(ref, q, max_new_tokens=1, stop_ids=set())[0][0]
stop = {first} if info.rank == 0 else set()  # rank 0 stops at once, rank 1 runs 6 tokens: ranks must stay synced
ans = answer(model, q, max_new_tokens=6, stop_ids=stop, synced=True)
ref_ans = answer(ref, q, max_new_tokens=6, stop_ids=stop)
out.with_name(f"{out.name}.rank{info.rank}").write_text(json.dumps({
    "partitioned": partitioned, "codes_equal": bool(torch.equal(codes, ref_codes)), "answer": ans,
    "ref_answer": ref_ans}))
# the engine and the partitioned model hold the process group: free them before the job ends, so that its
# threads stop there and not in the interpreter's finalisation (runtime.distributed.end_job)
engine.destroy()
del engine, _, model
end_job()
