"""Generation on ZeRO-3-partitioned weights (2 gloo ranks through the deepspeed launcher)."""
import json
import subprocess
import sys
from pathlib import Path

from launch_utils import ROOT, ds_env, free_port


def test_generation_on_partitioned_weights_equals_full_model(tmp_path):
    launcher = Path(sys.executable).parent / "deepspeed"
    out = tmp_path / "result.json"
    cmd = [str(launcher), "--num_gpus", "2", "--master_port", str(free_port()),
           str(Path(__file__).parent / "zero3_generate.py"), str(out)]
    p = subprocess.run(cmd, cwd=ROOT, env=ds_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for r in (0, 1):
        res = json.loads(out.with_name(f"{out.name}.rank{r}").read_text())
        assert res["partitioned"] and res["codes_equal"]
        assert res["answer"] == res["ref_answer"]
    assert json.loads(out.with_name(f"{out.name}.rank0").read_text())["answer"] == [[]]  # stopped at once
    assert len(json.loads(out.with_name(f"{out.name}.rank1").read_text())["answer"][0]) == 6
