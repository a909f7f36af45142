"""Online monitoring: RankMe and feature std by hand, and the monitor on the digits subset."""

import math
import subprocess

import pytest
import torch

from helpers import REPO
from train.eval.online import OnlineMonitor, feature_std, rankme
from train.models.vit import ViTEncoder
from train.recipe import load_config


def test_rankme_by_hand():
    # features with singular values 3, 2, 1: p = (1/2, 1/3, 1/6), effective rank exp(H(p))
    u, _ = torch.linalg.qr(torch.randn(50, 3, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(8, 3, dtype=torch.float64))
    x = u @ torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)) @ v.T
    p = torch.tensor([1 / 2, 1 / 3, 1 / 6])
    assert rankme(x, eps=0.0) == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-6)
    collapsed = torch.randn(100, 1) * torch.randn(1, 16)  # rank 1
    assert rankme(collapsed) == pytest.approx(1.0, abs=1e-3)
    assert 14 < rankme(torch.randn(4000, 16)) <= 16  # isotropic: close to the dimension


def test_feature_std_by_hand():
    assert feature_std(torch.ones(10, 4) * torch.tensor([1.0, 2.0, 3.0, 4.0])) == pytest.approx(0.0, abs=1e-12)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # normalised rows; per-dim std (unbiased) = sqrt(0.5)
    assert feature_std(x) == pytest.approx(math.sqrt(0.5))


def test_monitor_on_the_digits_subset(digits_dir, make_cfg):
    cfg = make_cfg("train.steps=1")
    torch.manual_seed(0)
    encoder = ViTEncoder(cfg.model)
    monitor = OnlineMonitor(str(digits_dir / "val.json"), 100, cfg.model.img_size, cfg.data.mean, cfg.data.std,
                            torch.device("cpu"), batch_size=32)
    assert len(monitor.labels) == 128  # whole batches, the same count on every rank
    scores = monitor(encoder)
    assert set(scores) == {"monitor/knn_top1", "monitor/rankme", "monitor/feature_std", "perf/monitor_fraction"}
    assert 0 < scores.pop("perf/monitor_fraction") <= 1
    assert 10 < scores["monitor/knn_top1"] <= 100  # a random ViT's features already beat chance on digits
    assert 1 < scores["monitor/rankme"] <= cfg.model.embed_dim
    again = monitor(encoder)
    again.pop("perf/monitor_fraction")
    assert again == scores  # the same subset, the same features: deterministic


@pytest.mark.e2e
def test_training_run_logs_the_monitor(make_cfg):
    """eval.every: monitor/* scalars at those steps and at the end, the run's losses untouched."""
    from helpers import losses, read_metrics
    from train.engine import train
    from train.methods import build_method

    plain = make_cfg("train.steps=5", name="plain")
    train(plain, build_method)
    cfg = make_cfg("train.steps=5", "eval.every=2", "eval.monitor_samples=64", name="monitored")
    train(cfg, build_method)
    rows = read_metrics(cfg.output_dir)
    assert [s for s, r in sorted(rows.items()) if "monitor/knn_top1" in r] == [2, 4, 5]
    assert all(0 < rows[s]["perf/monitor_fraction"] < 1 for s in (2, 4, 5))
    assert losses(cfg.output_dir) == losses(plain.output_dir)  # monitoring draws from no training RNG


def test_the_demo_can_monitor_without_naming_its_data():
    """The demo digits bring their val split (written at start), so eval.every needs no data.val there."""
    cfg = load_config(REPO / "train/configs/mae_demo.yaml", ["eval.every=100"])
    assert cfg.eval.every == 100 and not cfg.data.train


@pytest.mark.e2e
def test_zero3_two_ranks_monitor_with_uneven_shares(tmp_path, digits_dir):
    """Under ZeRO-3 every forward is a collective (the parameters are gathered), so every rank must embed as many
    batches as the others even when its share of data.val is smaller (here 300 vs 20 samples), or it would wait
    for the others forever."""
    from data_pipeline.shards import digits_samples, write_shards
    from helpers import command, fully_partitioned_zero3, read_metrics, run_env, torchrun

    samples, classes = digits_samples("val")
    write_shards(samples[:300], tmp_path / "val", "big", classes, max_count=300)
    write_shards(samples[300:320], tmp_path / "val", "small", classes, max_count=20)
    val = f"{tmp_path / 'val' / 'big-000000.tar'}::{tmp_path / 'val' / 'small-000000.tar'}"
    cmd = command(tmp_path, digits_dir, "train.steps=2", "eval.every=1", "eval.monitor_samples=1000", f"data.val={val}",
                  f"train.deepspeed={fully_partitioned_zero3(tmp_path)}", launcher=torchrun(2))
    proc = subprocess.run(cmd, cwd=tmp_path, env=run_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(tmp_path / "run")
    assert [s for s, r in sorted(rows.items()) if "monitor/knn_top1" in r] == [1, 2]
    assert 10 < rows[2]["monitor/knn_top1"] <= 100
