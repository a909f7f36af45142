"""Compression (train/compression.py) in HPM and MLO-MAE, the masked-image methods that choose their own
visible patches: token dropout keeps a share of them, FLOP/token accounting, the gradient diagnostic, and an
exact resume of a compressed run (patch scaling is rejected)."""

import pytest
import torch

from helpers import read_metrics, seed_checkpoint
from train.compression import FULL, Setting, drop_visible
from train.compression.diagnostic import GradientDiagnostic
from train.config import ConfigError
from train.engine import train
from train.methods import build_method
from train.models.masking import random_masking

HALF = Setting(keep_ratio=0.5, seed=3)
DROPOUT = ["compression.keep_ratio.kind=linear", "compression.keep_ratio.start=0.5"]


def test_drop_visible_keeps_a_random_share_of_the_visible_patches():
    torch.manual_seed(0)
    ids_keep, ids_restore, mask = random_masking(5, 16, 6, torch.device("cpu"))
    assert drop_visible(ids_keep, ids_restore, mask, FULL) == (ids_keep, ids_restore, mask)
    kept, restore, dropped = drop_visible(ids_keep, ids_restore, mask, HALF)
    assert kept.shape == (5, 3) and dropped.sum(1).tolist() == [13.0] * 5
    for row in range(5):
        assert set(kept[row].tolist()) <= set(ids_keep[row].tolist())  # a subset of the method's own
        assert (dropped[row, kept[row]] == 0).all()
    # MAE's convention: the kept tokens first in the shuffled order, ids_restore its inverse
    shuffle = restore.argsort(dim=1)
    assert torch.equal(shuffle[:, :3], kept) and torch.equal(shuffle.argsort(dim=1), restore)
    again, _, _ = drop_visible(ids_keep, ids_restore, mask, HALF)
    assert torch.equal(again, kept)  # a pure function of the setting's seed


def block_input_tokens(encoder, seen: list) -> None:
    encoder.vit.blocks[0].register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[1]))


@pytest.mark.parametrize("name", ["hpm", "mlo_mae"])
def test_token_dropout_runs_the_encoder_on_a_share_of_the_methods_visible_patches(make_cfg, name):
    cfg = make_cfg(f"method.name={name}", "train.steps=4")
    with pytest.raises(ConfigError, match=rf"method '{name}' does not support patch_scaling"):
        make_cfg(f"method.name={name}", "train.steps=4", "compression.patch_scale.start=2")
    torch.manual_seed(0)
    method = build_method(cfg)
    if hasattr(method, "set_total_steps"):
        method.set_total_steps(4)
    images = torch.randn(4, 3, 16, 16)
    seen = []
    block_input_tokens(method.encoder, seen)
    torch.manual_seed(1)
    plain, _ = method({"images": images})
    torch.manual_seed(1)
    same, _ = method({"images": images, "compression": FULL})
    torch.manual_seed(1)
    dropped, _ = method({"images": images, "compression": HALF})
    # 16 patches, 4 visible (mask ratio 0.75); half of those through the encoder
    assert seen == [1 + 4, 1 + 4, 1 + 2] and torch.equal(plain, same) and torch.isfinite(dropped)
    assert (method.tokens_per_image(), method.tokens_per_image(compression=HALF)) == (4, 2)
    assert method.flops_per_image(compression=HALF) < method.flops_per_image()
    # the gradient diagnostic: both passes share the method's own masks (global RNG), so the identity is exact
    diagnostic = GradientDiagnostic(lambda: build_method(cfg), torch.device("cpu"), seed=cfg.run.seed)
    identity = diagnostic(method, {"images": images}, 0, Setting(keep_ratio=1.0, seed=3))
    assert identity["compression/grad_cosine"] == pytest.approx(1.0, abs=1e-12)
    assert diagnostic(method, {"images": images}, 0, HALF)["compression/grad_cosine"] < 0.999


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["hpm", "mlo_mae"])
def test_compressed_resume_retraces_the_uninterrupted_run(make_cfg, name):
    common = [f"method.name={name}", *DROPOUT, "train.steps=4", "run.ckpt_every=2"]
    straight = make_cfg(*common, "run.keep_last=3", name="straight")
    train(straight, build_method)
    resumed = make_cfg(*common, name="resumed")
    seed_checkpoint(resumed, straight.output_dir, 2)
    train(resumed, build_method)
    full, rest = read_metrics(straight.output_dir), read_metrics(resumed.output_dir)
    assert [full[s]["compression/keep_ratio"] for s in (1, 2, 3, 4)] == [0.5, 0.625, 0.75, 0.875]
    assert sorted(rest) == [3, 4]
    assert [rest[s]["train/loss"] for s in rest] == pytest.approx([full[s]["train/loss"] for s in rest], rel=1e-5)
