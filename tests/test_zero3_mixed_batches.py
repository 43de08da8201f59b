"""ZeRO-3 with different batch contents per rank (2 gloo ranks through the deepspeed launcher)."""
import json
import math
from pathlib import Path

import pytest

from runtime.launch import deepspeed_script

pytestmark = pytest.mark.slow  # multi-process launches (deselect with -m 'not slow')


def test_text_only_rank_next_to_image_rank_does_not_hang(tmp_path):
    out = tmp_path / "log.json"
    deepspeed_script(Path(__file__).parent / "zero3_mixed_batches.py", [str(out)], timeout=400)
    logs = [json.loads(out.with_name(f"{out.name}.rank{r}").read_text()) for r in (0, 1)]
    assert len(logs[0]) == len(logs[1]) == 7
    for a, b in zip(*logs):
        assert all(math.isfinite(x["loss"]) and x["loss"] > 0 for x in (a, b))
    # the schedule really put a text-only batch next to an image batch, in both directions
    assert logs[0][0]["kind"] == "text" and logs[0][0]["images"] == 0 and logs[1][0]["images"] == 2
    assert logs[1][1]["kind"] == "text" and logs[1][1]["images"] == 0 and logs[0][1]["images"] == 2
    assert logs[0][0]["image_loss"] == 0 and logs[1][0]["image_loss"] > 0
