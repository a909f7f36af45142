"""The entry point as users run it: subprocesses, signals, two gloo ranks, the launcher environments."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO, command, read_metrics, run_env, torchrun
from train.distributed import world_info_from_env


def test_world_info_from_launcher_variables():
    assert world_info_from_env({}) == world_info_from_env({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"})
    torchrun = world_info_from_env({"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8"})
    assert (torchrun.rank, torchrun.local_rank, torchrun.world_size) == (5, 1, 8)
    slurm = world_info_from_env({"SLURM_PROCID": "7", "SLURM_LOCALID": "3", "SLURM_NTASKS": "16"})
    assert (slurm.rank, slurm.local_rank, slurm.world_size) == (7, 3, 16)
    # the launcher's own variables win over Slurm's (srun around torchrun)
    both = world_info_from_env({"RANK": "1", "SLURM_PROCID": "0", "WORLD_SIZE": "2", "SLURM_NTASKS": "1"})
    assert (both.rank, both.world_size) == (1, 2)


@pytest.mark.e2e
def test_sigterm_checkpoints_and_resume_finishes(tmp_path, digits_dir):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, *command(tmp_path, digits_dir, "train.steps=400")], cwd=tmp_path,
                            env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not ((out / "metrics.jsonl").exists() and len(read_metrics(out)) >= 3):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() else "timeout"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log
    stopped_at = max(read_metrics(out))
    assert stopped_at < 400 and "stopped by signal at step" in log
    assert (out / "checkpoints" / "latest").read_text() == f"step_{stopped_at:08d}"
    # the requeued job: same command, resumes automatically and runs to the end
    done = subprocess.run([sys.executable, *command(tmp_path, digits_dir, "train.steps=" + str(stopped_at + 3))],
                          cwd=tmp_path, env=run_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"resumed from {out / 'checkpoints' / f'step_{stopped_at:08d}'}" in done.stderr
    assert max(read_metrics(out)) == stopped_at + 3


TWO_RANKS = ("train.steps=4", "run.ckpt_every=2", "train.deepspeed=ds_configs/zero2.json", "data.workers=1")


@pytest.fixture(scope="module")
def torchrun_run(tmp_path_factory, digits_dir) -> Path:
    """A 4-step ZeRO-2 run of two gloo ranks under torchrun (its run directory)."""
    tmp_path = tmp_path_factory.mktemp("torchrun")
    proc = subprocess.run(command(tmp_path, digits_dir, *TWO_RANKS, launcher=torchrun(2)),
                          cwd=tmp_path, env=run_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp_path / "run"


@pytest.mark.e2e
def test_two_gloo_ranks_under_torchrun(torchrun_run):
    out = torchrun_run
    rows = read_metrics(out)
    assert sorted(rows) == [1, 2, 3, 4]
    assert rows[4]["data/samples_seen"] == 4 * 8  # per rank; both ranks stepped together
    ckpt = out / "checkpoints" / "step_00000004"
    assert (ckpt / "rank_00000.pt").exists() and (ckpt / "rank_00001.pt").exists()
    assert len(list(ckpt.glob("*optim_states.pt"))) == 2  # ZeRO-2 partitioned the optimizer over the ranks


@pytest.mark.e2e
def test_accelerate_launch_runs_the_torchrun_job(tmp_path, digits_dir, torchrun_run):
    """`accelerate launch` with the shipped DeepSpeed accelerate config: the same loss curve as torchrun's."""
    from train.distributed import free_port

    launcher = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
                str(REPO / "slurm" / "accelerate_zero2.yaml"), "--num_processes", "2", "--main_process_port",
                str(free_port())]
    proc = subprocess.run([*launcher, *command(tmp_path, digits_dir, *TWO_RANKS)], cwd=tmp_path, env=run_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours, theirs = read_metrics(tmp_path / "run"), read_metrics(torchrun_run)
    assert [ours[s]["train/loss"] for s in range(1, 5)] == [theirs[s]["train/loss"] for s in range(1, 5)]
