"""slurm/pretrain.sh under a faked Slurm (tests/fake_slurm: srun, scontrol) and the rendezvous derivation."""

import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import REPO, read_metrics, tiny_overrides
from train.distributed import cuda_index, free_port, rendezvous_env

FAKE_BIN = REPO / "tests" / "fake_slurm"


def slurm_env(tmp_path, **extra) -> dict:
    """A batch job's environment: job 4242 on two one-GPU nodes, the fake srun/scontrol first on PATH."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PATH=f"{FAKE_BIN}:{env['PATH']}", PYTHON=sys.executable,
               PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", MASTER_PORT=str(free_port()),
               SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node[1-2]", SLURM_NNODES="2", SLURM_NTASKS="2",
               SLURM_NTASKS_PER_NODE="1", SLURM_CPUS_PER_TASK="1", FAKE_SLURM_HOSTS="localhost 127.0.0.1",
               FAKE_SLURM_LOG=str(tmp_path / "scontrol.log"))
    env.update(extra)
    return env


def script(digits_dir, *overrides) -> list[str]:
    return ["bash", str(REPO / "slurm" / "pretrain.sh"), str(REPO / "train" / "configs" / "mae_demo.yaml"),
            *tiny_overrides(), f"data.train={digits_dir / 'train.json'}", f"data.val={digits_dir / 'val.json'}",
            *overrides]


def test_rendezvous_from_the_slurm_environment(monkeypatch):
    monkeypatch.setenv("PATH", f"{FAKE_BIN}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_HOSTS", "gpu-a17 gpu-a18")
    task = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "123456",
            "SLURM_JOB_NODELIST": "gpu-a[17-18]"}
    assert rendezvous_env(task) == {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "MASTER_ADDR": "gpu-a17",
                                    "MASTER_PORT": str(20000 + 123456 % 20000)}
    # what the launcher (or slurm/pretrain.sh) already set wins
    assert rendezvous_env({**task, "RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "MASTER_ADDR": "10.0.0.1",
                           "MASTER_PORT": "29400"}) == {}
    single = rendezvous_env({})
    assert single["WORLD_SIZE"] == "1" and single["MASTER_ADDR"] == "127.0.0.1" and int(single["MASTER_PORT"]) > 0
    with pytest.raises(RuntimeError, match="export MASTER_ADDR"):
        monkeypatch.setenv("PATH", "/nonexistent")
        rendezvous_env(task)


def test_gpu_choice_per_process():
    assert [cuda_index(r, 8) for r in range(8)] == list(range(8))  # every task sees the node's GPUs
    assert cuda_index(5, 1) == 0  # the launcher bound one GPU to the task
    with pytest.raises(RuntimeError, match="--ntasks-per-node equal to --gpus-per-node"):
        cuda_index(5, 4)


@pytest.mark.e2e
def test_script_rejects_a_bad_job_before_starting(tmp_path, digits_dir):
    outside = {k: v for k, v in slurm_env(tmp_path).items() if k != "SLURM_JOB_ID"}
    run = subprocess.run(script(digits_dir), env=outside, cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 2 and "submit with sbatch" in run.stderr
    wrong = subprocess.run(script(digits_dir), env=slurm_env(tmp_path, SLURM_GPUS_ON_NODE="8"), cwd=tmp_path,
                           capture_output=True, text=True)
    assert wrong.returncode == 2 and "8 GPUs but 1 tasks per node" in wrong.stderr
    assert not (tmp_path / "scontrol.log").exists()


@pytest.mark.e2e
def test_time_limit_checkpoints_requeues_and_the_requeued_job_resumes(tmp_path, digits_dir):
    """Job 4242 on 2 nodes: started by the deepspeed launcher (hostfile, one launcher per node), USR1 to the
    batch script as Slurm sends it before the time limit; then the requeued job (same id) runs under srun."""
    run_dir = tmp_path / "runs" / "mae_demo-4242"
    first = subprocess.Popen(script(digits_dir, "train.steps=500", "data.workers=1"), cwd=tmp_path,
                             env=slurm_env(tmp_path, LAUNCHER="deepspeed"), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 400
    while not ((run_dir / "metrics.jsonl").exists() and len(read_metrics(run_dir)) >= 2):
        assert first.poll() is None and time.time() < deadline, first.stdout.read() if first.poll() else "timeout"
        time.sleep(0.5)
    first.send_signal(signal.SIGUSR1)
    log = first.communicate(timeout=300)[0]
    assert first.returncode == 0, log[-3000:]
    assert (run_dir / "hostfile").read_text() == "localhost slots=1\n127.0.0.1 slots=1\n"
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    stopped_at = max(read_metrics(run_dir))
    assert "stopped by signal at step" in log and stopped_at < 500
    assert "Traceback" not in log  # no rank or DataLoader worker died of the signal
    ckpt = run_dir / "checkpoints" / f"step_{stopped_at:08d}"
    assert (run_dir / "checkpoints" / "latest").read_text() == ckpt.name
    assert (ckpt / "rank_00000.pt").exists() and (ckpt / "rank_00001.pt").exists()

    again = subprocess.run(script(digits_dir, f"train.steps={stopped_at + 2}", "data.workers=1"), cwd=tmp_path,
                           env=slurm_env(tmp_path, SLURM_RESTART_COUNT="1"), capture_output=True, text=True,
                           timeout=400)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {ckpt.relative_to(tmp_path)}" in again.stderr
    rows = read_metrics(run_dir)
    assert max(rows) == stopped_at + 2
    assert rows[stopped_at + 2]["data/samples_seen"] == (stopped_at + 2) * 8  # per rank, counted across the restart
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"  # a finished job does not requeue
