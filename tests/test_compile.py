"""`--compile` (runtime/compile.py): each repeated block compiled in place gives the eager losses and
gradients, and after the first steps nothing recompiles and nothing breaks the graphs, also when the
number of image positions changes from batch to batch (the depth head's batch)."""
import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from mllm import IMAGE_TOKEN_INDEX as IMG, UniMLLMForCausalLM
from mllm.data.collate import Sample, collate
from mllm_tiny import tiny_config
from runtime.compile import compile_blocks, graph_counts

KEYS = ("input_ids", "labels", "attention_mask", "position_ids", "image_codes", "image_lens", "image_starts",
        "image_gen")
GRIDS = [(2, 3), (1, 2), (2, 2), (3, 1)]  # a different number of generated positions in every batch


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _codes(seed, h, w):
    return torch.randint(0, 64, (4, h, w), generator=torch.Generator().manual_seed(seed))


def mllm_batch(i):
    """Two samples packed into one row of 32 positions (as the trainer packs to --max-len)."""
    h, w = GRIDS[i % len(GRIDS)]
    s = [Sample([1, 10 + i, 11, 3, IMG, 4, 2], [-100, -100, -100, 3, -100, 4, 2], [_codes(i, h, w)], [True]),
         Sample([1, IMG, 30, 31, 2], [-100, -100, 30, 31, 2], [_codes(i + 7, 1, 2)], [False])]
    b = collate(s, pack_to=32)
    return {k: b[k] for k in KEYS}


def _mllm_step(model, b):
    model.zero_grad(set_to_none=True)
    out = model(**b)
    out.loss.backward()
    return out.loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def _mllm_compiled(backend, llm=True):
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from mllm.modeling.depth_head import DepthLayer

    torch.manual_seed(0)
    eager = UniMLLMForCausalLM(tiny_config()).train()
    torch.manual_seed(0)
    compiled = UniMLLMForCausalLM(tiny_config()).train()
    static = (LlamaDecoderLayer,) if llm else ()
    assert compile_blocks(compiled, static=static, dynamic=(DepthLayer,), backend=backend) == 2 + 2 * llm
    return eager, compiled


def _check_equal(a, b, atol):
    (la, ga), (lb, gb) = a, b
    assert len(ga) == len(gb) and torch.allclose(la, lb, atol=atol), (la, lb)
    for x, y in zip(ga, gb):
        assert torch.allclose(x, y, atol=atol)


def test_mllm_blocks_compile_without_breaks_or_recompiles():
    eager, compiled = _mllm_compiled("aot_eager")
    for i in range(2):  # two batches with different image positions: the graphs of both
        _check_equal(_mllm_step(eager, mllm_batch(i)), _mllm_step(compiled, mllm_batch(i)), 1e-6)
    seen = graph_counts()
    assert seen["graph_breaks"] == 0 and seen["compiled_graphs"] > 0
    for i in range(2, 6):  # new image counts every step: no new graph
        _check_equal(_mllm_step(eager, mllm_batch(i)), _mllm_step(compiled, mllm_batch(i)), 1e-6)
    assert graph_counts() == seen


def test_tokenizer_blocks_compile_without_breaks_or_recompiles():
    from unitok import UniTok, preset
    from unitok.models.unitok import BLOCK_TYPES

    cfg = preset("debug")
    cfg.grad_checkpointing = True  # the trainer's setting: checkpoint() around compiled blocks
    models = []
    for compile_it in (False, True):
        torch.manual_seed(0)
        m = UniTok(cfg).train()
        if compile_it:
            assert compile_blocks(m, static=BLOCK_TYPES, backend="aot_eager") == 7
        models.append(m)
    text = torch.randint(0, cfg.text.vocab_size, (4, cfg.text.context_length), generator=torch.Generator().manual_seed(0))

    def step(m, seed):
        x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1
        m.zero_grad(set_to_none=True)
        out = m(x, text)
        loss = F.mse_loss(out["img_rec"], x) + out["vq_loss"] + out["clip_image_features"].sum() * 1e-3
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in m.parameters() if p.grad is not None]

    _check_equal(step(models[0], 0), step(models[1], 0), 1e-5)
    seen = graph_counts()
    assert seen["graph_breaks"] == 0 and seen["compiled_graphs"] > 0
    for seed in (1, 2):
        _check_equal(step(models[0], seed), step(models[1], seed), 1e-5)
    assert graph_counts() == seen


@pytest.mark.slow
def test_inductor_matches_eager():
    """inductor's C++ kernels on CPU, on the depth head's dynamic-batch graphs (the static LLM and tokenizer
    blocks go through the same compile_blocks; compiling them too would add about a minute of C++ builds
    on 2 cores): losses and gradients within 1e-4 of eager (reductions are reordered)."""
    eager, compiled = _mllm_compiled("inductor", llm=False)
    for i in range(3):
        _check_equal(_mllm_step(eager, mllm_batch(i)), _mllm_step(compiled, mllm_batch(i)), 1e-4)
    assert graph_counts()["graph_breaks"] == 0


def test_compile_is_refused_under_zero3():
    from runtime.compile import refuse_with_zero3

    with pytest.raises(ValueError, match="--compile does not work with ZeRO-3.*--ds-config zero2"):
        refuse_with_zero3("inductor", {"zero_optimization": {"stage": 3}})
    refuse_with_zero3("inductor", {"zero_optimization": {"stage": 2}})
    refuse_with_zero3(None, {"zero_optimization": {"stage": 3}})


def test_mllm_compile_under_flash_attn_does_not_recompile_per_packed_batch(monkeypatch):
    """Under flash-attn, packed rows pass every LLM layer the batch's sequence bounds, which change from batch to
    batch: compiled, the layers recompiled per batch and per layer until dynamo's cache was full. --compile now
    leaves them eager there (with a warning) and compiles the depth head. flash-attn's kernels: exact stand-ins."""
    from test_mllm_model import _flash_stand_in

    from mllm.train import compiled_blocks

    calls = _flash_stand_in(monkeypatch)
    with pytest.warns(UserWarning, match="--compile with flash-attn and packed rows: the LLM layers stay"):
        static, dynamic = compiled_blocks(True, "flash_attention_2")
    torch.manual_seed(0)
    eager = UniMLLMForCausalLM(tiny_config()).train()
    torch.manual_seed(0)
    compiled = UniMLLMForCausalLM(tiny_config()).train()
    for m in (eager, compiled):
        m.config._attn_implementation = "flash_attention_2"
    compile_blocks(compiled, static=static, dynamic=dynamic, backend="aot_eager")
    for i in range(2):
        _check_equal(_mllm_step(eager, mllm_batch(i)), _mllm_step(compiled, mllm_batch(i)), 1e-6)
    seen = graph_counts()
    assert seen["graph_breaks"] == 0 and seen["compiled_graphs"] > 0 and calls["varlen"] > 0
    for i in range(2, 6):  # other sample lengths, so other sequence bounds, every batch
        _check_equal(_mllm_step(eager, mllm_batch(i)), _mllm_step(compiled, mllm_batch(i)), 1e-6)
    assert graph_counts() == seen
    assert compiled_blocks(True, "sdpa")[0] and not compiled_blocks(False, "sdpa")[0]  # sdpa: the LLM compiles
