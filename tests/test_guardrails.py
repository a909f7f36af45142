"""run.on_anomaly=rollback: a non-finite loss or a loss spike reloads the last good checkpoint and the run goes on
past the bad data; after run.max_rollbacks, or without a checkpoint, it stops with one line."""

import json
import subprocess

import pytest
import torch

from helpers import REPO, InfiniteGradient, command, poison, run_env, torchrun
from train.engine import train
from train.methods import build_method
from train.optim import lr_at


def rows(out_dir) -> list[dict]:
    """metrics.jsonl's rows in the order written."""
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.e2e
def test_a_non_finite_loss_rolls_back_and_the_run_goes_on_past_the_bad_batch(make_cfg, monkeypatch, caplog):
    calls = poison(monkeypatch, {4}, lambda loss: loss * float("nan"))  # the batch of step 5
    cfg = make_cfg("train.steps=8", "run.ckpt_every=2", "run.on_anomaly=rollback", "run.rollback_lr_scale=0.5",
                   "train.deepspeed=ds_configs/zero0.json",  # no overflow check: NaN gradients reach the weights
                   name="nan_rollback")
    with caplog.at_level("WARNING", logger="train"):
        result = train(cfg, build_method)
    assert result.steps == 8 and result.last_checkpoint == "step_00000008"
    assert calls == [0, 1, 2, 3, 4, 4, 5, 6, 7]  # the step counter went back to the checkpoint's step 4
    written = rows(cfg.output_dir)
    assert [r["step"] for r in written] == [1, 2, 3, 4, 5, 5, 6, 7, 8]
    anomaly = written[4]
    assert anomaly == {"step": 5, "anomaly/non_finite": 1.0, "anomaly/rollbacks": 1.0}
    trained = [r for r in written if "train/loss" in r]
    assert all(torch.isfinite(torch.tensor(r["train/loss"])) for r in trained)  # the weights were reloaded
    # the data stream went on past the bad batch: 9 batches of 8 read for 8 steps
    assert [r["data/samples_seen"] for r in trained] == [8 * n for n in (1, 2, 3, 4, 6, 7, 8, 9)]
    peak = cfg.optim.base_lr * cfg.data.batch_size / 256
    lrs = [r["train/lr"] for r in trained]
    assert lrs == pytest.approx([lr_at(s, peak, 8, cfg.optim.warmup_steps) * (1 if s < 4 else 0.5) for s in range(8)])
    warnings = [r.getMessage() for r in caplog.records if "Rolled back" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("anomaly at step 5 (non_finite): non-finite loss at step 5")
    assert "Rolled back to step_00000004 (step 4), rollback 1 of 3, lr x 0.5" in warnings[0]
    saved = torch.load(cfg.output_dir / "checkpoints" / "step_00000008" / "rank_00000.pt", weights_only=False)
    assert saved["guard"] == {"lr_scale": 0.5, "rollbacks": 1}  # a resume keeps counting


@pytest.mark.e2e
def test_two_ranks_roll_back_together_when_one_rank_sees_a_nan(tmp_path, digits_dir):
    """A NaN on rank 1's batch of step 5 only: the reduced loss is NaN on both ranks, so both roll back to step 4
    together (the reload is a collective: a rank that went on would hang the other), and the run ends in time."""
    cmd = command(tmp_path, digits_dir, "train.steps=8", "run.ckpt_every=2", "run.on_anomaly=rollback",
                  "train.deepspeed=ds_configs/zero0.json", launcher=torchrun(2),
                  module=(str(REPO / "tests" / "rollback_run.py"), "1", "4"))  # rank 1's call 4 (step 5) is NaN
    proc = subprocess.run(cmd, cwd=tmp_path, env=run_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    written = rows(tmp_path / "run")
    assert [r["step"] for r in written] == [1, 2, 3, 4, 5, 5, 6, 7, 8]
    assert written[4] == {"step": 5, "anomaly/non_finite": 1.0, "anomaly/rollbacks": 1.0}
    trained = [r for r in written if "train/loss" in r]
    assert all(torch.isfinite(torch.tensor(r["train/loss"])) for r in trained)
    assert [r["data/samples_seen"] for r in trained] == [8 * n for n in (1, 2, 3, 4, 6, 7, 8, 9)]  # per rank
    assert proc.stderr.count("Rolled back to step_00000004 (step 4), rollback 1 of 3") == 2  # on each rank


@pytest.mark.e2e
def test_a_lasting_loss_spike_stops_after_max_rollbacks_with_one_line(make_cfg, monkeypatch):
    calls = poison(monkeypatch, set(range(5, 100)), lambda loss: loss * 50)  # from the first call of step 6 on
    cfg = make_cfg("train.steps=10", "run.ckpt_every=2", "run.on_anomaly=rollback", "run.spike_factor=3",
                   "run.spike_window=3", "run.max_rollbacks=2", name="spikes")
    with pytest.raises(FloatingPointError) as err:
        train(cfg, build_method)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("loss spike at step 5: ")
    assert "run.on_anomaly=rollback: stopped after run.max_rollbacks=2 rollbacks" in message
    assert f"the last good checkpoint is step_00000004 in {cfg.output_dir / 'checkpoints'}" in message
    assert calls == [0, 1, 2, 3, 4, 5, 4, 4]  # step 6, then step 5 twice, each from the step-4 checkpoint
    anomalies = [(r["step"], r["anomaly/rollbacks"]) for r in rows(cfg.output_dir) if "anomaly/spike" in r]
    assert anomalies == [(6, 1.0), (5, 2.0), (5, 2.0)]
    first = {}  # each step's first logged loss
    for r in rows(cfg.output_dir):
        first.setdefault(r["step"], r.get("train/loss"))
    assert first[6] > 3 * sorted([first[3], first[4], first[5]])[1]  # the row shows the spike


@pytest.mark.e2e
def test_rollback_without_a_checkpoint_and_stop_mode_stop_with_one_line(make_cfg, monkeypatch):
    poison(monkeypatch, {0}, lambda loss: loss * float("nan"))
    cfg = make_cfg("train.steps=2", "run.on_anomaly=rollback", name="no_ckpt")
    with pytest.raises(FloatingPointError, match=r"^non-finite loss at step 1 .* run.on_anomaly=rollback: no good "
                                                 r"checkpoint to roll back to in .*checkpoints: none written yet$"):
        train(cfg, build_method)
    # stop (the default) raises the anomaly itself, also recorded in metrics.jsonl
    poison(monkeypatch, {2}, lambda loss: loss * float("nan"))
    cfg = make_cfg("train.steps=4", "run.ckpt_every=2", name="stop")
    with pytest.raises(FloatingPointError, match=r"^non-finite loss at step 3 .* last good checkpoint is "
                                                 r"step_00000002 .* check the data\.$"):
        train(cfg, build_method)
    assert rows(cfg.output_dir)[-1] == {"step": 3, "anomaly/non_finite": 1.0, "anomaly/rollbacks": 0.0}


@pytest.mark.e2e
def test_steps_skipped_in_a_row_roll_back_to_the_checkpoint_before_the_skipping(make_cfg, monkeypatch):
    calls = poison(monkeypatch, {4, 5, 6}, InfiniteGradient.apply)  # steps 5-7: finite losses DeepSpeed skips
    cfg = make_cfg("train.steps=8", "run.ckpt_every=2", "train.max_skipped_steps=2", "run.on_anomaly=rollback",
                   name="skips_rollback")
    result = train(cfg, build_method)
    assert result.steps == 8
    # the 3rd skip in a row (step 7) rolls back to step 4: step 6's checkpoint was written while skipping
    assert calls == [0, 1, 2, 3, 4, 5, 6, 4, 5, 6, 7]
    written = rows(cfg.output_dir)
    assert [r for r in written if "anomaly/rollbacks" in r] == [
        {"step": 7, "anomaly/skipped": 1.0, "anomaly/rollbacks": 1.0}]
    assert written[-1]["step"] == 8 and written[-1]["data/samples_seen"] == 11 * 8


@pytest.mark.e2e
def test_a_collapse_below_the_rank_floor_rolls_back(make_cfg):
    """run.collapse_rankme above any effective rank of 32-d embeddings: every monitored step is a collapse."""
    cfg = make_cfg("train.steps=4", "run.ckpt_every=1", "eval.every=2", "eval.monitor_samples=32",
                   "run.on_anomaly=rollback", "run.collapse_rankme=1000", "run.max_rollbacks=1", name="collapse")
    with pytest.raises(FloatingPointError, match=r"^representation collapse at step 2: monitor/rankme [\d.]+ < "
                                                 r"run.collapse_rankme 1000; the last good checkpoint is "
                                                 r"step_00000001 .* stopped after run.max_rollbacks=1 rollbacks$"):
        train(cfg, build_method)
    written = rows(cfg.output_dir)
    ranks = [r["monitor/rankme"] for r in written if "monitor/rankme" in r]
    assert len(ranks) == 2 and all(1 <= r <= 32 for r in ranks)
    assert [(r["step"], r["anomaly/rollbacks"]) for r in written if "anomaly/collapse" in r] == [(2, 1.0), (2, 1.0)]
