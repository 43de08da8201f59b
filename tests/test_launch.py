"""runtime.launch: the job environment, the command lines and the /dev/shm leak check, on trivial jobs."""
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
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


# ---- SLURM hostfiles (launch/hostfile_from_slurm.sh -> runtime/slurm.py) ----------------------------
@pytest.mark.parametrize("spec,hosts", [
    ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
    ("gpu-a[1-2],gpu-b5", ["gpu-a1", "gpu-a2", "gpu-b5"]),
    ("rack[1-2]-n[08-09]", ["rack1-n08", "rack1-n09", "rack2-n08", "rack2-n09"]),
    ("login1", ["login1"]),
    ("a[9-11],b", ["a9", "a10", "a11", "b"]),
])
def test_slurm_node_lists_expand_like_scontrol(spec, hosts):
    from runtime.slurm import expand_nodelist

    assert expand_nodelist(spec) == hosts


@pytest.mark.parametrize("spec", ["node[01-03", "node]1[", "node[3-1]", "node[a-b]"])
def test_bad_slurm_node_lists_are_refused(spec):
    from runtime.slurm import expand_nodelist

    with pytest.raises(ValueError, match="host list"):
        expand_nodelist(spec)


def _hostfile_script(tmp_path, env_extra: dict[str, str], path_dirs: list[str]):
    env = {"PATH": os.pathsep.join(path_dirs), "TMPDIR": str(tmp_path), "SLURM_JOB_ID": "77", **env_extra}
    return subprocess.run(["bash", str(ROOT / "launch/hostfile_from_slurm.sh")], env=env, capture_output=True,
                          text=True, timeout=60)


def test_hostfile_from_slurm_without_and_with_scontrol(tmp_path):
    bins = tmp_path / "bin"
    bins.mkdir()
    for tool in ("bash", "dirname", "python3"):  # a PATH without scontrol
        (bins / tool).symlink_to(shutil.which(tool) if tool != "python3" else sys.executable)
    p = _hostfile_script(tmp_path, {"SLURM_JOB_NODELIST": "node[01-03,07]", "SLURM_GPUS_ON_NODE": "4"}, [str(bins)])
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == str(tmp_path / "hostfile.77")
    assert (tmp_path / "hostfile.77").read_text() == "".join(f"node0{i} slots=4\n" for i in (1, 2, 3, 7))
    p = _hostfile_script(tmp_path, {"SLURM_JOB_NODELIST": "gpu-a[1-2],gpu-b5", "SLURM_NTASKS_PER_NODE": "2"},
                         [str(bins)])
    assert (tmp_path / "hostfile.77").read_text() == "gpu-a1 slots=2\ngpu-a2 slots=2\ngpu-b5 slots=2\n"
    p = _hostfile_script(tmp_path, {"SLURM_JOB_NODELIST": "n[1-2]"}, [str(bins)])
    assert p.returncode != 0 and "SLURM_GPUS_ON_NODE" in p.stderr and "SLURM_NTASKS_PER_NODE" in p.stderr
    # 0 slots: DeepSpeed started no rank and exited 0 (the job ended COMPLETED with nothing trained)
    p = _hostfile_script(tmp_path, {"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_GPUS_ON_NODE": "0"}, [str(bins)])
    assert p.returncode != 0 and "SLURM_GPUS_ON_NODE=0: no processes to start per node" in p.stderr
    # when scontrol exists it is the authority
    (bins / "scontrol").write_text("#!/bin/sh\n[ \"$1 $2\" = 'show hostnames' ] && printf 'x1\\nx2\\n'\n")
    (bins / "scontrol").chmod(0o755)
    (bins / "sh").symlink_to(shutil.which("sh"))
    p = _hostfile_script(tmp_path, {"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_GPUS_ON_NODE": "8"}, [str(bins)])
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "hostfile.77").read_text() == "x1 slots=8\nx2 slots=8\n"


def _write_hostfile_many_times(path: str) -> None:
    from runtime.slurm import write_hostfile

    for _ in range(300):
        write_hostfile(Path(path), ["n1", "n2"], 8)


def test_nodes_writing_the_same_hostfile_at_once_all_succeed(tmp_path):
    """Every node of a job writes $TMPDIR/hostfile.$SLURM_JOB_ID; where TMPDIR is shared they do it at once
    (seen on a 2-node SLURM whose nodes share /tmp: one node's rename failed, and the job with it)."""
    import multiprocessing

    path = tmp_path / "hostfile.14"
    ctx = multiprocessing.get_context("fork")
    writers = [ctx.Process(target=_write_hostfile_many_times, args=(str(path),)) for _ in range(4)]
    for w in writers:
        w.start()
    for w in writers:
        w.join(60)
    assert [w.exitcode for w in writers] == [0, 0, 0, 0]
    assert path.read_text() == "n1 slots=8\nn2 slots=8\n" and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_sbatch_example_starts_one_launcher_per_node(tmp_path):
    """launch/slurm.sbatch under a stand-in srun that runs its command once per node, as srun does with
    SLURM_NODEID set: each node gets the same hostfile, its NODE_RANK, node 0 as master and its slots. sbatch
    runs a copy of the script from its spool folder, and the job may be submitted from any folder (the script
    once found launch/slurm_node.sh only from the checkout's root: exit 127, no requeue)."""
    bins, launch, spool, submit = (tmp_path / d for d in ("bin", "checkout/launch", "spool", "submit"))
    for d in (bins, launch, spool, submit):
        d.mkdir(parents=True)
    (bins / "srun").write_text('#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\n'
                               'for i in $(seq 0 $((SLURM_NNODES - 1))); do SLURM_NODEID=$i "$@"; done\n')
    for name in ("slurm_node.sh", "hostfile_from_slurm.sh"):
        (launch / name).symlink_to(ROOT / "launch" / name)
    shutil.copy(ROOT / "launch/slurm.sbatch", spool / "slurm_script")
    stub = launch / "stub.sh"  # stands for launch/mllm_stage1.sh: prints what deepspeed_env.sh would read
    stub.write_text('echo "node=$NODE_RANK nnodes=$NNODES ngpu=$NGPU master=$MASTER_ADDR:$MASTER_PORT '
                    'hosts=$(cut -d" " -f1 "$HOSTFILE" | paste -sd,) args=$* cwd=$PWD"\n')
    for f in (bins / "srun", stub):
        f.chmod(0o755)
    env = {"PATH": f"{bins}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "TMPDIR": str(tmp_path), "SLURM_JOB_ID": "4242", "SLURM_NNODES": "3", "SLURM_SUBMIT_DIR": str(submit),
           "SLURM_JOB_NODELIST": "gpu-a[1-2],gpu-b5", "SLURM_GPUS_ON_NODE": "4", "PYTHONPATH": str(ROOT)}
    p = subprocess.run(["bash", str(spool / "slurm_script"), str(stub), "--run-dir", "runs/x"], env=env,
                       cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    # the port: below the kernel's ephemeral range (32768-60999), where 20000 + id % 20000 often fell
    assert p.stdout.splitlines() == [f"node={i} nnodes=3 ngpu=4 master=gpu-a1:14242 hosts=gpu-a1,gpu-a2,gpu-b5 "
                                     f"args=--run-dir runs/x cwd={submit}" for i in range(3)]
    # the GPUs SLURM gives a job on a shared node without a device cgroup: DeepSpeed would use 0-3 instead
    for gpus, ok in (("0,1,2,3", True), ("4,5,6,7", False)):
        p = subprocess.run(["bash", str(spool / "slurm_script"), str(stub)], env={**env, "CUDA_VISIBLE_DEVICES": gpus},
                           cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert (p.returncode == 0) == ok and ("SLURM gave this job GPUs 4,5,6,7" in p.stderr) != ok, p.stderr
    p = subprocess.run(["bash", str(ROOT / "launch/slurm.sbatch"), str(stub)], env={"PATH": env["PATH"]},
                       capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "run this under sbatch" in p.stderr


@pytest.mark.parametrize("resume,requeued", [(["--resume", "auto"], True), ([], True),
                                             (["--resume", "runs/x/step-00000010"], False),
                                             (["--resume=runs/x/step-00000010"], False)])
def test_sbatch_requeues_only_what_continues_from_the_new_checkpoint(tmp_path, resume, requeued):
    """After the time-limit stop (SIGUSR1, exit 138) the job requeues itself with the same arguments: with
    --resume STEP_FOLDER it would start from that checkpoint again, every time, and never end."""
    bins = tmp_path / "bin"
    bins.mkdir()
    # srun stands for the trainers: SLURM's early warning reaches the batch script, they save and exit 138
    (bins / "srun").write_text("#!/usr/bin/env bash\nkill -USR1 $PPID\nsleep 0.5\nexit 138\n")
    (bins / "scontrol").write_text('#!/bin/sh\necho "$*" >> "$REQUEUE_LOG"\n')
    for f in ("srun", "scontrol"):
        (bins / f).chmod(0o755)
    log = tmp_path / "requeue.log"
    env = {"PATH": f"{bins}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "7", "SLURM_NNODES": "1",
           "SLURM_SUBMIT_DIR": str(ROOT), "REQUEUE_LOG": str(log)}
    p = subprocess.run(["bash", str(ROOT / "launch/slurm.sbatch"), "launch/mllm_stage1.sh", *resume], env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 138, p.stderr
    assert log.is_file() == requeued and (not requeued or log.read_text() == "requeue 7\n")
    assert ("not requeued: --resume runs/x/step-00000010 would start from that checkpoint again" in p.stderr) \
        != requeued


@pytest.mark.parametrize("env,expected", [
    # one node: DeepSpeed's own 127.0.0.1; a hostfile over pdsh: node 0's address, found by DeepSpeed over ssh
    # (a fixed 127.0.0.1 sent every other node to its own loopback)
    # without NGPU, DeepSpeed takes the hostfile's slots or this machine's GPUs (a default of 8 overrode them: 8
    # ranks on 4-GPU nodes, two per GPU)
    ({}, "--num_nodes -1"),
    ({"NGPU": "4"}, "--num_nodes -1 --num_gpus 4"),
    ({"HOSTFILE": "{hostfile}", "NNODES": "1"}, "--num_nodes 1"),
    ({"HOSTFILE": "{hostfile}", "MASTER_ADDR": "10.0.0.1", "NNODES": "1"}, "--master_addr 10.0.0.1 --num_nodes 1"),
    ({"HOSTFILE": "{hostfile}", "MASTER_ADDR": "10.0.0.1", "NODE_RANK": "1", "NNODES": "2", "NGPU": "4"},
     "--master_addr 10.0.0.1 --num_nodes 2 --num_gpus 4 --no_ssh --node_rank 1"),
    # the GPUs a shared machine gives this job (DeepSpeed drops CUDA_VISIBLE_DEVICES beside --num_gpus)
    ({"CUDA_VISIBLE_DEVICES": "4,5,6,7"}, "--include localhost:4,5,6,7"),
    ({"CUDA_VISIBLE_DEVICES": "4,5,6,7", "NGPU": "2"}, "--include localhost:4,5"),
])
def test_deepspeed_env_passes_the_layout(tmp_path, env, expected):
    bins = tmp_path / "bin"
    bins.mkdir()
    (bins / "deepspeed").write_text('#!/bin/sh\necho "$*"\n')
    (bins / "deepspeed").chmod(0o755)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=8\nnode-b slots=8\n")
    env = {k: v.format(hostfile=hostfile) for k, v in env.items()}
    default = env.get("HOSTFILE", str(tmp_path / "no_hostfile"))
    script = f'source "{ROOT}/launch/deepspeed_env.sh"; ds_launch 1234 -m x --flag'
    p = subprocess.run(["bash", "-c", script], env={"PATH": f"{bins}{os.pathsep}{os.environ['PATH']}",
                                                     "HOSTFILE": default, **env},
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"--hostfile {default} --master_port 1234 {expected} -m x --flag"


@pytest.mark.parametrize("launcher_args,hosts,expected,pdsh", [
    # options of the runner the scripts had no way to pass
    ("--bind_cores_to_rank --enable_each_rank_log 'my logs'", 2,
     ["--bind_cores_to_rank", "--enable_each_rank_log", "my logs", "-m", "x", r"/d/\{0..2\}.tar"], True),
    # mpirun/srun get a list from DeepSpeed: the arguments go as given, without pdsh's shell quoting or env file
    ("--launcher openmpi --launcher_args '-x NCCL_DEBUG=INFO'", 2,
     ["--launcher", "openmpi", "--launcher_args", "-x NCCL_DEBUG=INFO", "-m", "x", "/d/{0..2}.tar"], False),
    ("--launcher=SLURM", 2, ["--launcher=SLURM", "-m", "x", "/d/{0..2}.tar"], False),
    ("--bind_cores_to_rank", 1, ["--bind_cores_to_rank", "-m", "x", "/d/{0..2}.tar"], False),  # one node
    # hosts DeepSpeed drops leave one: it runs locally, where pdsh's quoting reached the ranks as backslashes
    ("--exclude node-b", 2, ["--exclude", "node-b", "-m", "x", "/d/{0..2}.tar"], False),
    ("--include node-a:0@node-b:0", 2, ["--include", "node-a:0@node-b:0", "-m", "x", r"/d/\{0..2\}.tar"], True),
    ("--exclude node-b:0", 2, ["--exclude", "node-b:0", "-m", "x", "/d/{0..2}.tar"], False),  # its one slot
])
def test_launcher_args_reach_the_deepspeed_runner(tmp_path, launcher_args, hosts, expected, pdsh):
    bins = tmp_path / "bin"
    bins.mkdir()
    (bins / "deepspeed").write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\necho "env file: ${DS_ENV_FILE:-}"\n')
    (bins / "deepspeed").chmod(0o755)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"node-{h} slots=1\n" for h in "ab"[:hosts]))
    p = subprocess.run(["bash", "-c", f'source "{ROOT}/launch/deepspeed_env.sh"; ds_launch 1234 -m x "/d/{{0..2}}.tar"'],
                       env={"PATH": f"{bins}{os.pathsep}{os.environ['PATH']}", "HOSTFILE": str(hostfile),
                            "MASTER_ADDR": "10.0.0.1", "LAUNCHER_ARGS": launcher_args, "TMPDIR": str(tmp_path)},
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    *argv, env_line = p.stdout.splitlines()
    assert argv == ["--hostfile", str(hostfile), "--master_port", "1234", "--master_addr", "10.0.0.1", "--num_nodes",
                    "-1", *expected]
    assert (env_line != "env file: ") == pdsh  # pdsh's own environment file


@pytest.mark.parametrize("launcher_args,env,error", [
    ("--exclude 'a", {}, "No closing quotation"),
    # the layout comes from the environment: given again, the host set (and the quoting) changed behind its back
    ("--num_nodes 1", {}, "--num_nodes is set from the environment here: use NNODES"),
    ("--hostfile=/h", {}, "--hostfile is set from the environment here: use HOSTFILE"),
    ("--force_multi", {}, "--force_multi is set from the environment here"),
    ("--exclude localhost:1", {"NGPU": "2"}, "--exclude beside NGPU or CUDA_VISIBLE_DEVICES, which DeepSpeed refuses"),
])
def test_launcher_args_that_would_change_the_layout_are_refused(tmp_path, launcher_args, env, error):
    p = subprocess.run(["bash", "-c", f'source "{ROOT}/launch/deepspeed_env.sh"; ds_launch 1234 -m x'],
                       env={"PATH": os.environ["PATH"], "HOSTFILE": str(tmp_path / "none"),
                            "LAUNCHER_ARGS": launcher_args, **env}, capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and p.stderr.startswith(f"deepspeed_env.sh: LAUNCHER_ARGS={launcher_args}: ")
    assert error in p.stderr


def test_deepspeed_env_refuses_a_launcher_per_node_without_master_addr(tmp_path):
    p = subprocess.run(["bash", "-c", f'source "{ROOT}/launch/deepspeed_env.sh"; ds_launch 1234 -m x'],
                       env={"PATH": os.environ["PATH"], "NODE_RANK": "1"}, capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "NODE_RANK=1 (a launcher per node) needs MASTER_ADDR" in p.stderr
    p = subprocess.run(["bash", "-c", f'source "{ROOT}/launch/deepspeed_env.sh"; ds_launch 1234 -m x'],
                       env={"PATH": os.environ["PATH"], "NGPU": "0"}, capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "NGPU=0; give the processes per node as a positive number" in p.stderr  # 0 ranks


def test_a_pdsh_launch_hands_the_nodes_the_arguments_and_environment_as_given(tmp_path):
    """pdsh runs one shell string on each node, and DeepSpeed quotes only arguments with a space: the README's
    '/data/{00000000..00140146}.tar' was brace-expanded there (140147 words, "Argument list too long"), a glob
    was expanded, $HOME replaced; and WANDB_MODE, OMP_NUM_THREADS, DS_ACCELERATOR, HF_* reached no rank. The real
    `deepspeed` runner and node launcher run here; pdsh and ssh are stand-ins that do what they do (one string
    through a login shell in $HOME with the remote machine's own environment)."""
    bins, home, raw = tmp_path / "bin", tmp_path / "home", tmp_path / "raw"
    for d in (bins, home, raw):
        d.mkdir()
    (raw / "a.tar").touch()
    (raw / "b.tar").touch()
    (bins / "ssh").write_text("#!/bin/sh\nexit 0\n")  # DeepSpeed's reachability check
    (bins / "pdsh").write_text('#!/usr/bin/env bash\nwhile [[ $1 == -S || $1 == -f || $1 == -w ]]; do '
                               '[[ $1 == -S ]] && shift || shift 2; done\ncmd="$*"\ncd "$HOME"\n'
                               'exec env -i HOME="$HOME" PATH=/usr/bin:/bin bash -c "${cmd//%n/0}"\n')
    for f in ("ssh", "pdsh"):
        (bins / f).chmod(0o755)
    (tmp_path / "probe_rank.py").write_text(
        "import json, os, sys\nprint('PROBE', json.dumps({'argv': sys.argv[1:], 'cwd': os.getcwd(), 'env': {k: "
        "os.environ.get(k) for k in ('DS_ACCELERATOR', 'WANDB_MODE', 'OMP_NUM_THREADS', 'HF_HOME')}}), flush=True)\n")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes\nnode-a slots=1\nnode-b slots=1\n")
    given = ["--data.shards", "/data/{00000000..00140146}.tar", "--input", f"{raw}/*.tar", "--run-dir",
             "runs/my $HOME run", "--x", "$HOME", "--quote", 'say "hi" `x`', "--empty", ""]
    env = {**ds_env(), "PATH": f"{bins}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "HOME": str(home), "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}", "HOSTFILE": str(hostfile),
           "MASTER_ADDR": "127.0.0.1", "NGPU": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "3",
           "HF_HOME": "/scratch/my hf \"$USER\"", "TMPDIR": str(tmp_path)}
    p = subprocess.run(["bash", "-c", f'source "{ROOT}/launch/deepspeed_env.sh"; ds_launch 1234 --module probe_rank '
                        '"$@"', "bash", *given], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    probe = [json.loads(line.split("PROBE ", 1)[1]) for line in p.stdout.splitlines() if "PROBE " in line]
    assert len(probe) == 1, p.stdout[-3000:] + p.stderr[-3000:]
    assert probe[0]["argv"][1:] == given and probe[0]["argv"][0].startswith("--local_rank")
    assert probe[0]["cwd"] == str(ROOT)
    assert probe[0]["env"] == {"DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "3",
                               "HF_HOME": "/scratch/my hf \"$USER\""}


def test_a_timed_out_job_leaves_no_process_behind(tmp_path):
    """subprocess.run's timeout killed only the launcher: its ranks ran on, taking the cores of later tests."""
    import psutil

    pid_file = tmp_path / "rank.pid"
    with pytest.raises(subprocess.TimeoutExpired):
        run_captured(["bash", "-c", f"sleep 60 & echo $! > {pid_file}; wait"], free_port(), timeout=2)
    rank = int(pid_file.read_text())
    deadline = time.time() + 10
    while psutil.pid_exists(rank) and psutil.Process(rank).status() != psutil.STATUS_ZOMBIE and time.time() < deadline:
        time.sleep(0.1)
    assert not psutil.pid_exists(rank) or psutil.Process(rank).status() == psutil.STATUS_ZOMBIE


_RANK = """import os, signal, sys, time
def stop(signum, frame):
    open(sys.argv[1] + ".stopped", "w").close()  # a trainer saves here (runtime.run.StopSignals)
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)
open(sys.argv[1], "w").write(str(os.getpid()))
time.sleep(60)
"""


def _gone(pid: int, timeout: float = 10) -> bool:
    import psutil

    deadline = time.time() + timeout
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE and time.time() < deadline:
        time.sleep(0.1)
    return not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 30) -> int:
    deadline = time.time() + timeout
    while not path.is_file() or not path.read_text():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.1)
    return int(path.read_text())


@pytest.mark.parametrize("how,echo", [("kill -9", False), ("kill -9", True), ("SIGTERM", False), ("SIGINT", True)])
def test_a_job_ends_with_the_process_that_started_it(tmp_path, how, echo):
    """The demo or the ablation grid killed (-9 or SIGTERM), or sent SIGINT alone (`kill -INT PID`; Ctrl-C reaches
    the jobs too), left the job's ranks training on in their folder: the deepspeed runner, which PR_SET_PDEATHSIG
    stopped, passes no signal on in local mode (here bash, which neither does). Every process of the job now gets
    SIGTERM (a trainer saves) from runtime.guard; after a SIGINT the caller returns once the job is gone."""
    (tmp_path / "rank.py").write_text(_RANK)
    pid_file = tmp_path / "rank.pid"
    job = ["bash", "-c", f"{shlex.quote(sys.executable)} {tmp_path / 'rank.py'} {pid_file} & wait"]
    (tmp_path / "parent.py").write_text(
        "import sys\nfrom runtime.launch import free_port, run_logged\n"
        f"run_logged({job!r}, free_port(), {str(tmp_path / 'job.log')!r}{', echo=print' if echo else ''})\n")
    parent = subprocess.Popen([sys.executable, str(tmp_path / "parent.py")], cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE, text=True)
    rank = _wait_for(pid_file, parent)
    parent.send_signal({"kill -9": signal.SIGKILL, "SIGTERM": signal.SIGTERM, "SIGINT": signal.SIGINT}[how])
    err = parent.communicate()[1]
    if how == "SIGINT":
        assert "KeyboardInterrupt" in err and _gone(rank, timeout=0)  # run_logged waited for the whole job
    assert _gone(rank)
    assert (tmp_path / "rank.pid.stopped").is_file()  # stopped by a SIGTERM, as a scheduler stops a job
    assert "runtime.guard: received SIGTERM: SIGTERM sent to the job's processes" in (tmp_path / "job.log").read_text()


def test_stop_jobs_stops_the_jobs_of_every_thread(tmp_path):
    """experiments.ablate interrupted on its main thread while its worker threads wait on jobs: `stop_jobs()`."""
    import threading

    from runtime.launch import JobsStopped, stop_jobs

    (tmp_path / "rank.py").write_text(_RANK)
    errors = {}

    def one(k: int) -> None:
        try:
            run_logged([sys.executable, str(tmp_path / "rank.py"), str(tmp_path / f"{k}.pid")], free_port(),
                       tmp_path / f"{k}.log", what=f"job {k}")
        except RuntimeError as e:
            errors[k] = str(e)

    threads = [threading.Thread(target=one, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    deadline = time.time() + 30
    while not all((tmp_path / f"{k}.pid").is_file() and (tmp_path / f"{k}.pid").read_text() for k in range(2)):
        assert time.time() < deadline
        time.sleep(0.1)
    stop_jobs()
    for t in threads:
        t.join(timeout=30)
        assert not t.is_alive()
    # the trainers' exit code on a stop, which the ablation grid records as no failure
    assert all(errors[k].startswith(f"job {k} failed with exit code 143") for k in range(2)), errors
    assert all((tmp_path / f"{k}.pid.stopped").is_file() for k in range(2))
    # and none starts after it (a run going on from its training to its evaluation)
    with pytest.raises(JobsStopped, match="job 2 was not started: the jobs were stopped"):
        run_logged([sys.executable, "-c", "pass"], free_port(), tmp_path / "2.log", what="job 2")


def test_what_a_job_leaves_behind_is_stopped_with_it(tmp_path):
    """A launcher that exits (or crashes) before its ranks: they no longer train on, orphaned, and the job is no
    success; a job killed by a signal reads as killed by it (the ablation grid's interrupted codes)."""
    (tmp_path / "rank.py").write_text(_RANK)
    pid_file = tmp_path / "rank.pid"
    leader = (f"import subprocess, sys, time; subprocess.Popen([sys.executable, {str(tmp_path / 'rank.py')!r}, "
              f"{str(pid_file)!r}])\n"
              f"while not open({str(pid_file)!r}, 'a+').tell(): time.sleep(0.05)")
    # the deepspeed runner exits 0 when its node launcher was killed: the stopped ranks' 143 is the job's code
    with pytest.raises(RuntimeError, match="leader failed with exit code 143"):
        run_logged([sys.executable, "-c", leader], free_port(), tmp_path / "job.log", what="leader")
    assert _gone(int(pid_file.read_text()), timeout=0) and (tmp_path / "rank.pid.stopped").is_file()
    assert "exited (0) and left processes behind" in (tmp_path / "job.log").read_text()
    assert "exited 0 but left processes running, which exited [143]" in (tmp_path / "job.log").read_text()
    for sig, code in (("TERM", -15), ("KILL", -9), ("SEGV", 139)):  # 128 + N: no core file of the guard itself
        with pytest.raises(RuntimeError, match=f"job failed with exit code {code}\\b"):
            run_logged(["bash", "-c", f"kill -{sig} $$"], free_port(), tmp_path / "killed.log", what="job")


@pytest.mark.slow
def test_the_deepspeed_runner_s_ranks_stop_with_the_harness(tmp_path):
    """The real launcher (`deepspeed`, 2 CPU ranks): its runner passes no signal on in local mode, so a harness
    killed with -9 left both ranks training (observed before runtime.guard). Now each rank gets SIGTERM."""
    (tmp_path / "rank.py").write_text(_RANK.replace("sys.argv[1]", "sys.argv[-1] + os.environ['LOCAL_RANK']"))
    pids = [tmp_path / f"rank.pid{r}" for r in range(2)]
    (tmp_path / "parent.py").write_text(
        "from runtime.launch import deepspeed_cmd, ds_env, free_port, run_logged\n"
        f"port = free_port()\nrun_logged(deepspeed_cmd({str(tmp_path / 'rank.py')!r}, [{str(tmp_path / 'rank.pid')!r}],"
        f" 2, port, module=False), port, {str(tmp_path / 'job.log')!r}, env=ds_env())\n")
    parent = subprocess.Popen([sys.executable, str(tmp_path / "parent.py")], cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    ranks = [_wait_for(p, parent, timeout=120) for p in pids]
    parent.kill()
    parent.wait()
    assert all(_gone(r, timeout=30) for r in ranks)
    assert all(Path(f"{p}.stopped").is_file() for p in pids)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_a_launch_script_stopped_with_kill_stops_its_ranks(tmp_path, sig):
    """`bash launch/X.sh ... &` then `kill [-INT|-USR1] PID` on one node: the pid was the deepspeed runner's, which
    died alone and left the ranks training. It is runtime.guard's now: both ranks get SIGTERM (a trainer saves and
    exits); a SIGINT goes to the runner, whose exit then stops the ranks it leaves."""
    (tmp_path / "rank.py").write_text(_RANK.replace("sys.argv[1]", "sys.argv[-1] + os.environ['LOCAL_RANK']"))
    pids = [tmp_path / f"rank.pid{r}" for r in range(2)]
    env = {**ds_env(), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "NGPU": "2",
           "HOSTFILE": str(tmp_path / "no_hostfile"),
           "LAUNCHER_ARGS": f"--enable_each_rank_log '{tmp_path / 'rank logs'}'"}  # the real runner reads it
    launch = subprocess.Popen(["bash", "-c", f'source "{ROOT}/launch/deepspeed_env.sh"; ds_launch {free_port()} '
                               f'{tmp_path / "rank.py"} {tmp_path / "rank.pid"}'], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ranks = [_wait_for(p, launch, timeout=120) for p in pids]
    launch.send_signal(sig)
    out = launch.communicate(timeout=90)[0]
    assert all(_gone(r, timeout=0) for r in ranks)  # the launch ended after its ranks
    assert all(Path(f"{p}.stopped").is_file() for p in pids), out[-3000:]
    assert ("left processes behind" if sig == signal.SIGINT else f"received {sig.name}") in out, out[-3000:]
    assert launch.returncode != 0
    assert len(list((tmp_path / "rank logs").glob("*.log"))) == 2, out[-3000:]


def test_the_guard_keeps_an_ignored_hangup_ignored(tmp_path):
    """`nohup bash launch/X.sh &`: closing the terminal must not stop the job (the guard would have caught the
    SIGHUP that nohup ignores); a SIGTERM still does, and the guard exits as its command did (143)."""
    (tmp_path / "rank.py").write_text(_RANK)
    pid_file = tmp_path / "rank.pid"
    guard = subprocess.Popen([sys.executable, str(ROOT / "runtime" / "guard.py"), sys.executable,
                              str(tmp_path / "rank.py"), str(pid_file)],
                             preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    rank = _wait_for(pid_file, guard)
    guard.send_signal(signal.SIGHUP)
    time.sleep(1)
    assert guard.poll() is None and not _gone(rank, timeout=0)
    guard.terminate()
    assert guard.wait(timeout=30) == 143 and _gone(rank, timeout=0)
    assert (tmp_path / "rank.pid.stopped").is_file()
