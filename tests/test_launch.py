"""runtime.launch: the job environment, the command lines and the /dev/shm leak check, on trivial jobs."""
import shlex
import sys
from pathlib import Path

import pytest

from runtime.launch import (ROOT, deepspeed_cmd, ds_env, free_port, job_env, leaked_shm, run_captured, run_logged,
                            torchrun_cmd)


def _fake_leak(port: int) -> Path:
    """What DeepSpeed's CPU all-reduce leaves behind for the job on `port` (uid_addr_port_rank)."""
    f = Path("/dev/shm") / f"deepspeed_allreduce_buffer_0_127.0.0.1_{port}_1"
    f.write_bytes(b"x")
    return f


def test_environments_drop_rank_variables(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("MASTER_PORT", "1234")
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    monkeypatch.setenv("WANDB_MODE", "online")
    env = ds_env()
    assert "RANK" not in env and "MASTER_PORT" not in env
    assert env["DS_ACCELERATOR"] == "cpu" and env["OMP_NUM_THREADS"] == "1" and env["WANDB_MODE"] == "disabled"
    assert env["PYTHONPATH"] == str(ROOT)
    job = job_env(cpu=False)  # the demo's and the ablation's: the caller's settings win, the checkout goes first
    assert "RANK" not in job and job["WANDB_MODE"] == "online"
    assert job["PYTHONPATH"].split(":") == [str(ROOT), "/elsewhere"]


def test_command_lines():
    ds = deepspeed_cmd("unitok.train", ["--x", "1"], 2, 29999, launcher_args=["--hostfile", "h"])
    assert ds[0].endswith("deepspeed")
    assert ds[1:] == ["--num_gpus", "2", "--master_port", "29999", "--hostfile", "h", "--module", "unitok.train",
                      "--x", "1"]
    assert deepspeed_cmd("s.py", [], 1, 5, module=False)[-1] == "s.py"
    assert torchrun_cmd("m", ["--a"], 2, 7)[1:] == ["-m", "torch.distributed.run", "--nproc_per_node", "2",
                                                     "--master_addr", "127.0.0.1", "--master_port", "7", "-m", "m",
                                                     "--a"]


def test_a_leaked_workspace_is_removed_and_fails_the_launch(tmp_path):
    port = free_port()
    leak = _fake_leak(port)
    with pytest.raises(RuntimeError, match=f"left \\['{leak.name}'\\] in /dev/shm"):
        run_captured([sys.executable, "-c", "pass"], port)
    assert not leak.exists() and not leaked_shm(port)
    # a failed job that also leaked: the failure is the message, the leak is named and removed too
    leak = _fake_leak(port)
    with pytest.raises(RuntimeError, match="(?s)job failed with exit code 3; it also left .*boom"):
        run_logged([sys.executable, "-c", "print('boom'); raise SystemExit(3)"], port, tmp_path / "a.log", what="job")
    assert not leak.exists()
    assert run_captured([sys.executable, "-c", "print('ok')"], port).stdout == "ok\n"  # clean jobs pass


def test_run_logged_appends_the_command_and_echoes_the_output(tmp_path):
    port, seen = free_port(), []
    cmd = [sys.executable, "-c", "import os; print('port', os.environ['MASTER_PORT'])"]
    run_logged(cmd, port, tmp_path / "logs" / "job.log", echo=seen.append)
    run_logged(cmd, port, tmp_path / "logs" / "job.log")
    lines = (tmp_path / "logs" / "job.log").read_text().splitlines()
    assert lines[0] == lines[2] == f"$ {shlex.join(cmd)}"
    assert lines[1] == lines[3] == f"port {port}" and seen == [f"port {port}\n"]
