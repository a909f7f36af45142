"""The anomaly detector's verdicts on hand-made logged rows."""

import math

from train.guard import AnomalyDetector, GuardConfig


def test_spikes_nan_and_collapse():
    d = AnomalyDetector(GuardConfig(spike_factor=3.0, spike_window=4, min_rankme=2.0, min_teacher_entropy=0.1))
    for loss in (1.0, 1.2, 0.9, 1.1):
        assert d.check({"train/loss": loss}) is None
    assert d.check({"train/loss": 2.9}) is None  # below 3 x median 1.1
    assert d.check({"train/loss": 4.0}) == "loss spike: 4 > 3 x running median 1.15"
    assert d.check({"train/loss": math.nan}) == "non-finite loss (nan)"
    assert d.check({"monitor/rankme": 1.5}).startswith("collapse: effective rank 1.5 < run.min_rankme=2")
    assert d.check({"train/teacher_entropy": 0.05}).startswith("collapse: teacher entropy 0.05")
    d.reset()
    assert d.check({"train/loss": 40.0}) is None  # no baseline yet


def test_off_by_default():
    d = AnomalyDetector(GuardConfig())
    for loss in (1.0,) * 30 + (1e6,):
        assert d.check({"train/loss": loss, "monitor/rankme": 1.0, "train/teacher_entropy": 0.0}) is None
    assert d.check({"train/loss": math.inf}) == "non-finite loss (inf)"
