"""Generation on ZeRO-3-partitioned weights (2 gloo ranks through the deepspeed launcher)."""
import json
from pathlib import Path

import pytest

from runtime.launch import deepspeed_script

pytestmark = pytest.mark.slow  # multi-process launches (deselect with -m 'not slow')


def test_generation_on_partitioned_weights_equals_full_model(tmp_path):
    out = tmp_path / "result.json"
    deepspeed_script(Path(__file__).parent / "zero3_generate.py", [str(out)], timeout=300)
    for r in (0, 1):
        res = json.loads(out.with_name(f"{out.name}.rank{r}").read_text())
        assert res["partitioned"] and res["codes_equal"]
        assert res["answer"] == res["ref_answer"]
    assert json.loads(out.with_name(f"{out.name}.rank0").read_text())["answer"] == [[]]  # stopped at once
    assert len(json.loads(out.with_name(f"{out.name}.rank1").read_text())["answer"][0]) == 6
