"""runtime.distributed on two real gloo ranks (plain processes on loopback)."""
import subprocess
import sys

import pytest
import torch

from runtime.distributed import GROUP_OUTLIVED
from runtime.launch import ROOT, ds_env, free_port

# One rank: join the group, do what an evaluation rank does (gather, import torch._dynamo as transformers
# does), end the job, then name the threads still alive.
RANK_SCRIPT = """
import gc, os, sys
import torch.distributed as dist
from runtime.distributed import end_job, init_distributed, job_barrier
{start}
import torch._dynamo  # imports torch.distributed.nn.functional, whose defaults are group.WORLD
held = dist.group.WORLD if {hold} else None  # a reference end_job cannot drop: the group and its threads live
parts = [None, None]
dist.all_gather_object(parts, dist.get_rank())
assert parts == [0, 1], parts
if dist.get_backend() == "gloo" and "{start}" == "init_distributed()":  # ZeRO-3's two collectives
    import torch
    dist.all_gather_into_tensor(torch.zeros(2), torch.ones(1))
    dist.reduce_scatter_tensor(torch.zeros(1), torch.ones(2))
end_job()
gc.collect()
print("threads:", sorted(open(f"/proc/self/task/{{t}}/comm").read().strip() for t in os.listdir("/proc/self/task")))
del held  # the held group is freed here, while the interpreter is whole, not in its finalisation
gc.collect()
"""


@pytest.mark.slow  # multi-process
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads thread names from /proc")
@pytest.mark.parametrize("start,hold", [("init_distributed()", False), ("job_barrier(2, 1)", False),
                                        ("init_distributed()", True)])
def test_end_job_stops_the_groups_threads(start, hold):
    """After end_job no gloo thread is left to be torn down in the interpreter's finalisation (where a rank
    once died: 'terminate called without an active exception'). Fails when deepspeed.comm.torch or
    torch.distributed.nn.functional is first imported after the group exists. Also: ZeRO-3's collectives
    print no deprecation warning after init_distributed. A group something still holds keeps its threads,
    and end_job says so (the warning every test launch fails on: runtime.launch)."""
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = ds_env() | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": str(rank), "WORLD_SIZE": "2",
                          "LOCAL_RANK": str(rank)}
        script = RANK_SCRIPT.format(start=start, hold=hold)
        procs.append(subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=240)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
        threads = [line for line in out.splitlines() if line.startswith("threads:")]
        assert threads and ("gloo" in threads[0]) == hold, out[-3000:]
        assert (GROUP_OUTLIVED in out) == hold, out[-3000:]
        # torch 2.14 deprecates both and DeepSpeed's ZeRO-3 calls them: init_distributed hides that warning
        # ("`torch.distributed.all_gather_into_tensor` is deprecated"; other packages' notices may show)
        assert start != "init_distributed()" or "` is deprecated" not in out, out[-3000:]


@pytest.mark.parametrize("local_size,omp", [("2", None), ("1", None), ("2", "2")])
def test_cpu_ranks_share_the_cores(monkeypatch, local_size, omp):
    """Several local ranks launched without OMP_NUM_THREADS (the deepspeed launcher's default) each get
    cores // ranks threads instead of one per core each; one rank, or an explicit OMP_NUM_THREADS, is kept."""
    import torch

    from runtime.distributed import local_cores, share_cpu_cores

    before = torch.get_num_threads()
    try:
        cores = local_cores()
        torch.set_num_threads(cores)
        monkeypatch.setenv("LOCAL_SIZE", local_size)
        if omp is None:
            monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        else:
            monkeypatch.setenv("OMP_NUM_THREADS", omp)
        expected = max(1, cores // 2) if (local_size, omp) == ("2", None) else cores
        assert share_cpu_cores() == expected == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("env,expected", [
    ({}, (0, 1, 0)),
    # the batch script or an salloc shell of an 8-task allocation: a lone process, not rank 0 of 8
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_LOCALID": "0"}, (0, 1, 0)),
    # a task of an srun step: the step's tasks, not the allocation's
    ({"SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "4",
      "SLURM_LOCALID": "1"}, (3, 4, 1)),
    # mpirun inside an allocation: its own variables win
    ({"SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_NTASKS": "8", "OMPI_COMM_WORLD_RANK": "13",
      "OMPI_COMM_WORLD_SIZE": "64", "OMPI_COMM_WORLD_LOCAL_RANK": "5"}, (13, 64, 5)),
    # the deepspeed launcher / torchrun inside an srun step: theirs
    ({"SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "RANK": "9", "WORLD_SIZE": "16",
      "LOCAL_RANK": "1"}, (9, 16, 1)),
])
def test_launcher_env_reads_slurm_only_inside_a_step(monkeypatch, env, expected):
    from runtime.distributed import launcher_env

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
              "OMPI_COMM_WORLD_LOCAL_RANK", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "SLURM_STEP_ID",
              "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert launcher_env() == expected
    from unitok.extract import dist_env

    assert dist_env() == expected  # extraction read RANK/WORLD_SIZE only: under srun every task did all shards


def test_ranks_started_without_a_launcher_address_meet_at_node_0():
    """`srun python -m mllm.train` over nodes, or `deepspeed --launcher openmpi` (which passes no address on):
    every rank met at 127.0.0.1:29500, so each node past the first waited on its own loopback for 30 min."""
    from runtime.distributed import rendezvous

    step = {"SLURM_STEP_ID": "0", "SLURM_JOB_ID": "123456", "SLURM_STEP_NODELIST": "gpu-b[07-08],gpu-c1",
            "SLURM_JOB_NODELIST": "gpu-a1,gpu-b[07-08],gpu-c1"}
    assert rendezvous(step, 24) == ("gpu-b07", str(10000 + 123456 % 20000))
    assert rendezvous({"OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_SIZE": "8"}, 8) == ("127.0.0.1", "29500")
    with pytest.raises(RuntimeError, match=r"mpirun started 16 ranks on several nodes and set no MASTER_ADDR: .*"
                                           r"-x MASTER_ADDR=HOST"):
        rendezvous({"OMPI_COMM_WORLD_SIZE": "16", "OMPI_COMM_WORLD_LOCAL_SIZE": "8"}, 16)
    addr, port = rendezvous(step, 1)  # alone: a private group on loopback, whatever the job
    assert addr == "127.0.0.1" and port != "29500"


def test_collectives_of_host_built_tensors_go_where_nccl_can_take_them(monkeypatch):
    """NCCL (the group on GPUs) has no CPU tensors: mllm.train's log_partition (every multi-GPU MLLM run, at
    start-up) and the generation export's image count built theirs on the CPU ("No backend type associated with
    device type cpu"). They now ask collective_device, which names the current GPU under NCCL."""
    from types import SimpleNamespace

    import runtime.distributed as rd
    from mllm.evaluate.generation import gather_count
    from mllm.train import log_partition

    monkeypatch.setattr(rd.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(rd.dist, "get_backend", lambda *a: "nccl")
    monkeypatch.setattr(rd.torch.cuda, "current_device", lambda: 1)
    assert rd.collective_device() == torch.device("cuda", 1)
    monkeypatch.setattr(rd.dist, "get_backend", lambda *a: "gloo")
    assert rd.collective_device() == torch.device("cpu")

    class Asked(Exception):
        pass

    def asked():
        raise Asked

    monkeypatch.setattr(rd, "collective_device", asked)
    monkeypatch.setattr(rd, "get_world_size", lambda: 2)
    for call in (lambda: log_partition(torch.nn.Linear(2, 2), SimpleNamespace(world_size=2), None),
                 lambda: gather_count(3), lambda: rd.all_reduce_sum(torch.zeros(2))):
        with pytest.raises(Asked):
            call()


SHARED_SCRIPT = """
import sys
from pathlib import Path
import torch.distributed as dist
from runtime.distributed import check_shared_outputs, end_job, init_distributed
init_distributed()
rank, base, shared = dist.get_rank(), Path(sys.argv[1]), sys.argv[2] == "shared"
folder = base / ("out" if shared else f"node{rank}/out")  # without a shared filesystem: each node's own disk
folder.mkdir(parents=True, exist_ok=True)
for j in range(rank, 6, 2):  # this rank's share of 6 images
    (folder / f"{j:06d}.png").write_bytes(b"png")
dist.barrier()
try:
    check_shared_outputs(lambda: sum(1 for _ in folder.glob("*.png")), 6, folder, "--out", wait_s=3)
    print("checked")
except RuntimeError as e:
    print("refused:", e)
end_job()
"""


@pytest.mark.slow  # multi-process
@pytest.mark.parametrize("shared", [True, False])
def test_outputs_rank0_reads_whole_must_be_on_a_shared_folder(tmp_path, shared):
    """rFID, FID and the GenEval / GenAI exports: each rank writes its images, then rank 0 reads the folder whole.
    With --out on each node's own disk rank 0 scored its node's images alone, without a word; now every rank stops
    with the same error (none hangs in a later collective)."""
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-c", SHARED_SCRIPT, str(tmp_path), "shared" if shared else "local"],
                              cwd=ROOT, env=ds_env() | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                                                        "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    for out in outs:
        if shared:
            assert "checked" in out, out
        else:
            assert f"refused: {tmp_path}/node0/out holds 3 of the 6 files the ranks wrote" in out, out
            assert "--out must be a folder every node shares" in out
