import json

import pytest

from helpers import fully_partitioned_zero3, losses, plain_pytorch_losses, read_metrics, resume_run
from train import checkpoint
from train.config import ConfigError
from train.engine import deepspeed_config, train
from train.methods import build_method


@pytest.mark.e2e
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_match_plain_pytorch_and_learn(make_cfg, tmp_path, stage):
    steps = 12
    ds = fully_partitioned_zero3(tmp_path) if stage == 3 else f"ds_configs/zero{stage}.json"
    cfg = make_cfg(f"train.steps={steps}", f"train.deepspeed={ds}", name=f"z{stage}")
    result = train(cfg, build_method)
    assert result.steps == steps and result.last_checkpoint == "step_00000012"
    ours = losses(cfg.output_dir)
    reference = plain_pytorch_losses(cfg, steps)
    assert ours == pytest.approx(reference, rel=1e-4, abs=1e-5)
    assert sum(ours[-3:]) < sum(ours[:3]) * 0.9  # it learns


@pytest.mark.e2e
def test_resume_continues_the_same_curve(make_cfg, tmp_path):
    straight = make_cfg("train.steps=8", "run.ckpt_every=4", "run.keep_last=3", name="straight")
    train(straight, build_method)
    full = losses(straight.output_dir)
    assert len(full) == 8
    # a second run that only has the step-4 checkpoint resumes from it ("auto") and must retrace steps 5..8
    resumed = make_cfg("train.steps=8", "run.ckpt_every=4", name="resumed")
    rows, result = resume_run(resumed, straight.output_dir, 4)
    assert result.steps == 8
    assert sorted(rows) == [5, 6, 7, 8]
    assert [rows[s]["train/loss"] for s in range(5, 9)] == pytest.approx(full[4:], rel=1e-6, abs=1e-7)
    assert [rows[s]["train/lr"] for s in range(5, 9)] == pytest.approx(
        [read_metrics(straight.output_dir)[s]["train/lr"] for s in range(5, 9)])


@pytest.mark.e2e
def test_gradient_accumulation_is_a_bigger_batch(make_cfg):
    cfg = make_cfg("train.steps=2", "train.global_batch_size=16", name="accum")
    ds = deepspeed_config(cfg, world_size=1)
    assert (ds["train_batch_size"], ds["gradient_accumulation_steps"]) == (16, 2)
    result = train(cfg, build_method)
    rows = read_metrics(cfg.output_dir)
    assert result.steps == 2 and rows[2]["data/samples_seen"] == 2 * 16


def test_find_resume_tag_none_latest_and_half_written(tmp_path):
    ckpts = tmp_path / "checkpoints"
    assert checkpoint.find_resume_tag(ckpts) is None  # no directory at all
    for step in (100, 200):
        (ckpts / checkpoint.tag_for(step)).mkdir(parents=True)
        (ckpts / checkpoint.tag_for(step) / checkpoint.MARKER).write_text(json.dumps({"step": step}))
    (ckpts / "latest").write_text("step_00000200")
    assert checkpoint.find_resume_tag(ckpts) == "step_00000200"
    # a crash while writing step 300: its directory exists without the marker and latest may point at it
    (ckpts / "step_00000300").mkdir()
    (ckpts / "latest").write_text("step_00000300")
    assert checkpoint.find_resume_tag(ckpts) == "step_00000200"
    (ckpts / "latest").unlink()
    assert checkpoint.find_resume_tag(ckpts) == "step_00000200"
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        checkpoint.resolve_resume(str(ckpts / "step_00000300"), ckpts)


@pytest.mark.e2e
def test_resume_from_other_architecture_is_rejected(make_cfg):
    first = make_cfg("train.steps=1", name="arch")
    train(first, build_method)
    other = make_cfg("train.steps=2", "model.depth=3", name="arch")
    with pytest.raises(ConfigError, match=r"run.resume: .*step_00000001 was written by method mae with model"):
        train(other, build_method)


@pytest.mark.e2e
def test_non_finite_loss_stops_with_a_clear_message(make_cfg, monkeypatch):
    from train.methods.mae import MAE

    original = MAE.forward

    def poisoned(self, batch, step=0):
        loss, report = original(self, batch, step)
        if step >= 2:
            loss = loss * float("nan")
            report = {"loss": loss.detach()}
        return loss, report

    monkeypatch.setattr(MAE, "forward", poisoned)
    cfg = make_cfg("train.steps=6", "run.ckpt_every=2", name="nan")
    with pytest.raises(FloatingPointError, match="non-finite loss at step 3 .* last good checkpoint is step_00000002"):
        train(cfg, build_method)
    assert checkpoint.find_resume_tag(cfg.output_dir / "checkpoints") == "step_00000002"
