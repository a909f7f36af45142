"""Elastic resume: a checkpoint of N ranks continues with M ranks (weights, Adam state, step, data streams)."""

import subprocess
import sys

import pytest
import torch
import yaml

from helpers import REPO, TINY_DIR, command, dotted, run_env
from train.distributed import free_port


def torchrun(tmp_path, digits_dir, ranks: int, *args, module=("-m", "train.pretrain")):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
                str(free_port())]
    cmd = command(tmp_path, digits_dir, *args, launcher=launcher)
    cmd[len(launcher):len(launcher) + 2] = module
    proc = subprocess.run(cmd, cwd=tmp_path, env=run_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return proc.stderr


def loaded(tmp_path, digits_dir, ranks: int, name: str, *args) -> tuple[dict, str]:
    """What a `ranks`-rank run resuming tmp_path/run's latest checkpoint loaded (tests/elastic_dump.py)."""
    out = tmp_path / f"{name}.pt"
    log = torchrun(tmp_path, digits_dir, ranks, *args, module=(str(REPO / "tests" / "elastic_dump.py"), str(out)))
    return torch.load(out, weights_only=False), log


@pytest.mark.e2e
@pytest.mark.parametrize("stage", [1, 3])
@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_elastic_resume_loads_the_same_weights_and_adam_state(tmp_path, digits_dir, stage, before, after):
    """The check that is exact: an M-rank engine resumed from an N-rank checkpoint holds the weights, Adam moments
    and step that an N-rank engine resuming it the ordinary way holds (bit for bit), at the same global batch.
    (Losses after the resume cannot be compared with an uninterrupted run: the data stream moves to fresh
    segments on a new layout, by design.)"""
    check_elastic(tmp_path, digits_dir, stage, before, after)


@pytest.mark.e2e
def test_elastic_resume_keeps_the_ema_teacher(tmp_path, digits_dir):
    """HPM's EMA teacher (module extra state, outside the optimizer) survives a 2 -> 1 rank resume under ZeRO-2."""
    got = check_elastic(tmp_path, digits_dir, 2, 2, 1, "method.name=hpm", *dotted(yaml.safe_load(
        (TINY_DIR / "hpm.yaml").read_text())))
    assert got["extra"]  # the teacher is there (and equal to the ordinary resume's)


def check_elastic(tmp_path, digits_dir, stage: int, before: int, after: int, *extra: str) -> dict:
    """Train 2 steps on `before` ranks; resume on `before` (ordinary) and `after` (elastic); compare what loaded."""
    common = ["train.global_batch_size=16", "data.batch_size=8", f"train.deepspeed=ds_configs/zero{stage}.json",
              "optim.warmup_steps=1", *extra]
    torchrun(tmp_path, digits_dir, before, *common, "train.steps=2")
    ref, _ = loaded(tmp_path, digits_dir, before, "same", *common, "train.steps=3")
    got, log = loaded(tmp_path, digits_dir, after, "elastic", *common, "train.steps=3")
    assert f"was written by {before} ranks, this run has {after}" in log
    assert got["step"] == ref["step"] == 2 and got["adam_step"] == ref["adam_step"] == [2.0]
    for key in ("weights", "exp_avg", "exp_avg_sq"):
        assert ref[key].keys() == got[key].keys()
        for name in ref[key]:
            assert torch.equal(ref[key][name], got[key][name]), (key, name)
    assert any(v.abs().sum() > 0 for v in got["exp_avg"].values())
    assert ref["extra"].keys() == got["extra"].keys()  # module extra state (EMA teachers) from the model file
    for name in ref["extra"]:
        assert str(ref["extra"][name]) == str(got["extra"][name]), name
    return got
    old = max(p[0] for p in ref["data"]["positions"].values())
    assert all(p[0] == old + 1 for p in got["data"]["positions"].values())  # fresh segments for every reader

