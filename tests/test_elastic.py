"""Elastic resume: a checkpoint of N ranks continues with M ranks (weights, Adam state, step, data streams)."""

import subprocess

import pytest
import torch

from helpers import REPO, command, run_env, torchrun
from train.checkpoint import rank_states, tag_for


def launch(tmp_path, digits_dir, ranks: int, *args, module=("-m", "train.pretrain")):
    cmd = command(tmp_path, digits_dir, *args, launcher=torchrun(ranks), module=module)
    proc = subprocess.run(cmd, cwd=tmp_path, env=run_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return proc.stderr


def loaded(tmp_path, digits_dir, ranks: int, name: str, *args) -> tuple[dict, str]:
    """What a `ranks`-rank run resuming tmp_path/run's latest checkpoint loaded (tests/elastic_dump.py)."""
    out = tmp_path / f"{name}.pt"
    log = launch(tmp_path, digits_dir, ranks, *args, module=(str(REPO / "tests" / "elastic_dump.py"), str(out)))
    return torch.load(out, weights_only=False), log


@pytest.mark.e2e
@pytest.mark.parametrize("stage, before, after, resampled", [(1, 2, 1, True), (1, 1, 2, False), (3, 2, 1, False),
                                                            (3, 1, 2, True)])
def test_elastic_resume_loads_the_same_weights_and_adam_state(tmp_path, digits_dir, stage, before, after, resampled):
    """An M-rank engine resumed from an N-rank checkpoint holds the weights, Adam moments, step and param group
    hyperparameters that an N-rank engine resuming it the ordinary way holds (bit for bit; the ordinary resume
    continues the uninterrupted run, tests/test_engine.py), at the same global batch; two optimizer steps on one
    fixed global batch then give both the same losses and weights, to fp32 reduction-order tolerance. (A fixed
    batch because the run's own data stream moves to fresh segments on a new layout, by design: only the same
    rows, cut into the same micro-batches with the same masking noise, make the two layouts' losses comparable.)
    In epoch mode (`resampled` false) the elastic readers first read the carried-over rest of the old epochs
    (counted sample by sample in tests/test_stream.py)."""
    got = check_elastic(tmp_path, digits_dir, stage, before, after, f"data.resampled={str(resampled).lower()}")
    assert ("carried" in got["data"]) == (not resampled)


@pytest.mark.e2e
def test_elastic_resume_onto_four_ranks_keeps_frozen_parameters(tmp_path, digits_dir):
    """2 -> 4 ranks (ZeRO-3, epoch mode, micro-batch 8 -> 4 at global batch 16) with MoCo v3: its frozen random
    patch projection comes from the checkpoint, not from this run's init (the elastic run has another run.seed, so
    a re-initialised projection would differ). No fixed-batch steps: MoCo v3's loss depends on the rank count
    (negatives and BatchNorm statistics per rank)."""
    got = check_elastic(tmp_path, digits_dir, 3, 2, 4, "method.name=moco_v3", "data.resampled=false",
                        elastic=("run.seed=7", "data.batch_size=4"), fixed=False)
    assert any(name.startswith("encoder.vit.patch_embed") for name in got["frozen"])
    assert "carried" in got["data"]


@pytest.mark.e2e
def test_elastic_resume_keeps_the_ema_teacher(tmp_path, digits_dir):
    """HPM's EMA teacher (module extra state, outside the optimizer) survives a 2 -> 1 rank resume under ZeRO-2."""
    got = check_elastic(tmp_path, digits_dir, 2, 2, 1, "method.name=hpm")
    assert got["extra"]  # the teacher is there (and equal to the ordinary resume's)


def check_elastic(tmp_path, digits_dir, stage: int, before: int, after: int, *extra: str, elastic=(),
                  fixed: bool = True) -> dict:
    """Train 2 steps on `before` ranks; resume on `before` (ordinary) and `after` (elastic, with the overrides
    `elastic` too); compare what loaded, the data positions, and (`fixed`) 2 more steps on a fixed global batch
    (tests/elastic_dump.py; not for methods whose loss depends on the rank count, such as MoCo v3's negatives)."""
    common = ["train.global_batch_size=16", "data.batch_size=8", f"train.deepspeed=ds_configs/zero{stage}.json",
              "optim.warmup_steps=1", *extra]
    launch(tmp_path, digits_dir, before, *common, "train.steps=2")
    # train.steps=4: both fixed steps (2 and 3) have a nonzero lr
    ref, _ = loaded(tmp_path, digits_dir, before, "same", *common, "train.steps=4")
    got, log = loaded(tmp_path, digits_dir, after, "elastic", *common, "train.steps=4", *elastic)
    assert f"was written by {before} ranks, this run has {after}; loaded its DeepSpeed universal checkpoint" in log
    assert got["step"] == ref["step"] == 2 and got["adam_step"] == ref["adam_step"] == [2.0]
    for key in ("weights", "exp_avg", "exp_avg_sq"):
        assert ref[key].keys() == got[key].keys()
        for name in ref[key]:
            assert torch.equal(ref[key][name], got[key][name]), (key, name)
    assert any(v.abs().sum() > 0 for v in got["exp_avg"].values())
    assert got["groups"] == ref["groups"]  # weight decay, lr_scale, betas per group (ZeRO-3 universal: repaired)
    assert ref["frozen"].keys() == got["frozen"].keys()
    for name in ref["frozen"]:
        assert torch.equal(ref["frozen"][name], got["frozen"][name]), name
    assert ref["extra"].keys() == got["extra"].keys()  # module extra state (EMA teachers) from the model file
    for name in ref["extra"]:
        assert str(ref["extra"][name]) == str(got["extra"][name]), name
    # data: the ordinary resume continues rank 0's readers where they were; every elastic reader starts a fresh
    # segment after the highest of any old rank's readers
    old = [s["data"] for s in rank_states(tmp_path / "run" / "checkpoints" / tag_for(2))]
    assert ref["data"]["positions"] == old[0]["positions"]
    newest = max(p[0] for state in old for p in state["positions"].values())
    assert got["data"]["positions"] and all(p[0] == newest + 1 for p in got["data"]["positions"].values())
    if not fixed:
        return got
    # the fixed global batch: the same micro-batches, on `after` ranks x accumulation instead of `before` x its own
    assert (ref["accum"], got["accum"]) == (2 // before, 2 // after)
    assert got["fixed_adam_step"] == ref["fixed_adam_step"] == [4.0]  # one Adam step per optimizer step
    torch.testing.assert_close(got["fixed_losses"], ref["fixed_losses"], rtol=1e-5, atol=1e-6)
    assert ref["fixed_weights"].keys() == got["fixed_weights"].keys()
    assert any(not torch.equal(w, ref["weights"][n]) for n, w in ref["fixed_weights"].items())  # the steps moved
    for name in ref["fixed_weights"]:
        torch.testing.assert_close(got["fixed_weights"][name], ref["fixed_weights"][name], rtol=1e-5, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")
    print(f"elastic {before}->{after} ZeRO-{stage}: losses {ref['fixed_losses']}, max loss difference "
          f"{max(abs(a - b) for a, b in zip(ref['fixed_losses'], got['fixed_losses'])):.3g}, max weight difference "
          f"{max((got['fixed_weights'][n] - w).abs().max().item() for n, w in ref['fixed_weights'].items()):.3g}")
    return got

