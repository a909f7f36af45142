import json

import pytest

from helpers import REPO
from train.pretrain import main


@pytest.mark.e2e
def test_demo_writes_shards_checkpoints_logs_and_evaluation(tmp_path, caplog):
    caplog.set_level("INFO", logger="train")
    out = tmp_path / "demo"
    rc = main(["--config", str(REPO / "train/configs/mae_demo.yaml"), f"run.output_dir={out}", "train.steps=3",
               "optim.warmup_steps=1", "data.workers=0", "eval.probe_epochs=3"])
    assert rc == 0
    manifest = json.loads((out / "shards" / "train.json").read_text())
    assert manifest["num_samples"] > 1400  # the embedded digits were written as shards
    assert (out / "checkpoints" / "latest").read_text() == "step_00000003"
    assert list((out / "tb").glob("events.out.tfevents.*"))
    scores = json.loads((out / "eval.json").read_text())
    for name in ("pretrained", "random init"):
        assert 10.0 <= scores[name]["knn_top1"] <= 100.0 and 10.0 <= scores[name]["linear_top1"] <= 100.0
    text = caplog.text
    assert "knn_top1" in text and "random init" in text and "tensorboard --logdir" in text
