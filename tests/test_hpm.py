"""HPM: the relative loss, hard-patch masking, the schedules, gradient flow, configs, ZeRO-3 and resume."""

import math
import re

import pytest
import torch
from scipy.stats import kendalltau

from helpers import (
    REPO,
    fully_partitioned_zero3,
    losses,
    plain_pytorch_losses,
    read_metrics,
    resume_run,
)
from train.config import ConfigError
from train.engine import train
from train.methods import build_method
from train.methods.hpm import ema_momentum_at, hard_patch_masking, hard_share_at, kendall_tau, relative_loss
from train.methods.mae import mae_loss, patchify
from train.recipe import load_config

TINY_HPM = ["method.name=hpm", "model.img_size=16", "model.patch_size=4", "model.embed_dim=32", "model.depth=2",
            "model.num_heads=2", "method.decoder_dim=32", "method.decoder_depth=1", "method.decoder_heads=2"]


def test_relative_loss_by_hand():
    # masked patches 0 and 2 (patch 1 is visible and ignored): real losses 1 < 3, predictions 0.5 and 2.5
    predicted = torch.tensor([[0.5, 9.0, 2.5]])
    real = torch.tensor([[1.0, -4.0, 3.0]])
    mask = torch.tensor([[1.0, 0.0, 1.0]])
    # both ordered pairs (0, 2) and (2, 0) cost -log sigmoid(2.5 - 0.5)
    assert relative_loss(predicted, real, mask).item() == pytest.approx(math.log1p(math.exp(-2.0)), rel=1e-6)
    # the same predictions in the wrong order cost -log sigmoid(-2)
    assert relative_loss(predicted.flip(1), real, mask).item() == pytest.approx(math.log1p(math.exp(2.0)), rel=1e-6)
    # a tie in the real losses is no pair at all: nothing to learn, loss 0
    assert relative_loss(predicted, torch.tensor([[2.0, 0.0, 2.0]]), mask).item() == 0.0


def test_relative_loss_depends_on_order_only():
    torch.manual_seed(0)
    real = torch.rand(4, 16)
    mask = (torch.rand(4, 16) < 0.75).float()
    predicted = torch.randn(4, 16)
    base = relative_loss(predicted, real, mask)
    # a constant per image added to the predictions changes no difference p_i - p_j
    assert relative_loss(predicted + torch.randn(4, 1) * 10, real, mask) == pytest.approx(base.item(), rel=1e-5)
    # the real losses enter only through their order: shifted, scaled, or any increasing map
    for same_order in (real + 3.0, real * 7.0, real.exp() * 0.01 - 5.0):
        assert relative_loss(predicted, same_order, mask) == pytest.approx(base.item(), rel=1e-6)
    # visible patches take no part
    visible = mask == 0
    assert relative_loss(predicted.masked_fill(visible, 100.0), real.masked_fill(visible, -1.0), mask) == \
        pytest.approx(base.item(), rel=1e-6)
    # the right order is rewarded and the reversed order penalised, the more so the more confident
    right, reversed_ = relative_loss(real * 5, real, mask), relative_loss(-real * 5, real, mask)
    assert right < math.log(2) < reversed_
    assert relative_loss(real * 50, real, mask) < right and relative_loss(-real * 50, real, mask) > reversed_


def test_relative_loss_trains_the_order_not_the_values():
    """Gradient descent on the predictions reaches the real order (Kendall's tau 1) at any scale."""
    torch.manual_seed(0)
    real = torch.rand(2, 16) * 1000 + 500  # values far from anything the predictor outputs
    mask = torch.ones(2, 16)
    predicted = torch.zeros(2, 16, requires_grad=True)
    opt = torch.optim.SGD([predicted], lr=20.0)
    for _ in range(200):
        opt.zero_grad()
        relative_loss(predicted, real, mask).backward()
        opt.step()
    assert kendall_tau(predicted, real, mask).item() == pytest.approx(1.0)
    assert predicted.abs().max() < 50  # it learned the order, not the loss values


def test_kendall_tau_matches_scipy():
    torch.manual_seed(0)
    predicted, real = torch.randn(1, 40), torch.randn(1, 40)
    real[0, :20] += predicted[0, :20]  # some agreement
    mask = torch.ones(1, 40)
    expected = kendalltau(predicted[0].numpy(), real[0].numpy()).statistic
    assert kendall_tau(predicted, real, mask).item() == pytest.approx(expected, rel=1e-5)
    assert kendall_tau(real, real, mask).item() == pytest.approx(1.0)
    assert kendall_tau(-real, real, mask).item() == pytest.approx(-1.0)


@pytest.mark.parametrize("share", [0.0, 0.3, 0.5, 1.0])
def test_mask_has_the_configured_size_and_hard_share(share):
    torch.manual_seed(0)
    batch, tokens, keep = 6, 196, 49
    difficulty = torch.randn(batch, tokens)
    ids_keep, ids_restore, mask, hard = hard_patch_masking(difficulty, keep, share)
    num_hard = int((tokens - keep) * share)
    assert mask.sum(1).tolist() == [tokens - keep] * batch  # exactly the configured number masked
    assert hard.sum(1).tolist() == [num_hard] * batch  # the configured share from the predicted-hard ones ...
    top = difficulty.argsort(dim=1, descending=True)[:, :num_hard]
    for b in range(batch):
        assert set(hard[b].nonzero().flatten().tolist()) == set(top[b].tolist())  # ... that are the top ones
        assert mask[b, top[b]].eq(1).all() and mask[b, ids_keep[b]].eq(0).all()
    assert torch.equal(ids_restore.argsort(dim=1)[:, :keep], ids_keep)


def test_the_rest_of_the_mask_is_random():
    """Outside the predicted-hard patches, every patch is equally likely to be masked, whatever its difficulty."""
    torch.manual_seed(0)
    difficulty = torch.arange(64.0).expand(4000, -1)  # same ranking in every image: patch 63 is the hardest
    _, _, mask, hard = hard_patch_masking(difficulty, 16, 0.25)  # 48 masked: 12 hard + 36 of the other 52
    assert hard[:, -12:].all() and not hard[:, :-12].any()
    rate = mask[:, :-12].mean(0)
    assert torch.allclose(rate, torch.full_like(rate, 36 / 52), atol=0.04)
    # with share 0 the mask ignores the difficulty: the easiest and hardest halves are masked alike
    _, _, mask, hard = hard_patch_masking(difficulty, 16, 0.0)
    assert not hard.any() and abs(mask[:, :32].mean() - mask[:, 32:].mean()) < 0.01


def test_schedules_follow_the_config():
    cfg = load_config(None, TINY_HPM + ["train.steps=100", "method.hard_share=[0.1,0.5]"])
    method = build_method(cfg)
    # share (official: (epoch + 1) / epochs x end): start + (end - start) (step + 1) / total
    assert method.hard_share(0) == pytest.approx(0.1 + 0.4 / 100)
    assert method.hard_share(49) == pytest.approx(0.3)
    assert method.hard_share(99) == pytest.approx(0.5)
    method.set_total_steps(200)  # the engine's run length (epoch-based runs) replaces train.steps
    assert method.hard_share(99) == pytest.approx(0.3) and method.hard_share(199) == pytest.approx(0.5)
    assert hard_share_at(5, 10, 0.0, 0.5) == pytest.approx(0.3)


def official_momentum(epoch: int) -> float:
    """engine_pretrain.py: the teacher's decay for every update of `epoch`."""
    return 0.999 + epoch / 100 * (0.9999 - 0.999) if epoch < 100 else 0.9999


@pytest.mark.parametrize("batch", [256, 4096, 128])
def test_teacher_momentum_keeps_the_official_horizon_in_epochs(batch):
    """At the scripts' 5004 steps per epoch the momenta are the official ones, step by step; at another batch
    the teacher after one epoch of updates weighs the student's past exactly as the official one does."""
    spe = 1281167 // batch
    for epoch in (0, 1, 37, 99, 100, 500):
        step = epoch * spe + spe // 2
        momentum = ema_momentum_at(step, spe, 0.999, 0.9999, 100, 5004)
        if batch == 256:
            assert momentum == pytest.approx(official_momentum(epoch), rel=1e-12)
        # the weight left on the teacher of the epoch's start after the epoch's updates
        assert momentum ** spe == pytest.approx(official_momentum(epoch) ** 5004, rel=1e-9)
    assert ema_momentum_at(10, 5, 0.5, 0.7, 0, 0) == 0.7  # no ramp; per step as given
    assert ema_momentum_at(4, 5, 0.5, 0.7, 4, 0) == 0.5 and ema_momentum_at(5, 5, 0.5, 0.7, 4, 0) == 0.55


def tiny_method(*overrides):
    cfg = load_config(None, TINY_HPM + ["train.steps=10", *overrides])
    torch.manual_seed(0)
    return build_method(cfg)


def test_forward_is_reconstruction_plus_weighted_relative_loss():
    method = tiny_method("method.predictor_weight=0.3", "method.hard_share=[0.5,0.5]")
    images = torch.randn(4, 3, 16, 16)
    torch.manual_seed(1)
    loss, report = method({"images": images}, step=3)
    torch.manual_seed(1)
    real, predicted, difficulty, mask, hard, pred = method._run(images, 0.5)
    recon = mae_loss(pred, patchify(images, 4), mask, norm_pix_loss=False)  # HPM's default: raw pixels
    rank = relative_loss(predicted, real.detach(), mask)
    assert report["recon_loss"] == pytest.approx(recon.item(), rel=1e-6)
    assert report["predictor_loss"] == pytest.approx(rank.item(), rel=1e-6)
    assert loss.item() == pytest.approx(recon.item() + 0.3 * rank.item(), rel=1e-6)
    assert mask.sum(1).tolist() == [12.0] * 4 and hard.sum(1).tolist() == [6] * 4
    assert report["hard_share"] == 0.5
    assert report["teacher_kendall"] == pytest.approx(kendall_tau(difficulty, real, mask).item())


def test_predictor_gradient_stays_out_of_the_reconstruction_target():
    method = tiny_method()
    images = torch.randn(4, 3, 16, 16)
    real, predicted, _, mask, _, _ = method._run(images, 0.5)
    relative_loss(predicted, real.detach(), mask).backward()
    # nothing of the pixel decoder's own blocks and output (which make the target losses) gets a gradient from
    # the predictor's loss ...
    for part in (method.decoder.blocks, method.decoder.norm, method.decoder.pred):
        assert all(p.grad is None for p in part.parameters())
    # ... while the predictor branch and, through it, the input it shares with the pixel decoder (decoder_embed,
    # mask_token) and the encoder learn from it (as the official code)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.loss_predictor.parameters())
    assert method.decoder.embed.weight.grad.abs().sum() > 0 and method.decoder.mask_token.grad.abs().sum() > 0
    assert method.encoder.vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    # and the teacher that made the mask is no part of the graph
    assert all(p.grad is None for p in method.teacher.module.parameters())


def test_hpm_configs_have_the_paper_defaults():
    for name in ("hpm_demo", "hpm_vit_b", "hpm_vit_l"):
        cfg = load_config(REPO / f"train/configs/{name}.yaml", world_size=8)
        m = cfg.method
        assert (m.name, m.mask_ratio, m.hard_share, m.predictor_weight) == ("hpm", 0.75, (0.0, 0.5), 1.0), name
    for name, dim in (("hpm_vit_b", 768), ("hpm_vit_l", 1024)):
        cfg = load_config(REPO / f"train/configs/{name}.yaml", world_size=8)
        assert cfg.model.embed_dim == dim and cfg.method.ema_momentum == (0.999, 0.9999)
        assert (cfg.method.ema_ramp_epochs, cfg.method.ema_steps_per_epoch) == (100, 5004)
        assert cfg.train.epochs == 800 and not cfg.method.norm_pix_loss  # the released scripts: raw pixels
        assert (cfg.method.decoder_dim, cfg.method.decoder_depth) == (512, 8)


@pytest.mark.parametrize("override, message", [
    ("method.hard_shares=[0,0.5]", "unknown config key 'method.hard_shares' (did you mean 'method.hard_share'?)"),
    ("method.hard_share=[0,1.5]", "method.hard_share=(0.0, 1.5): both values must be in [0, 1]"),
    ("method.ema_momentum=0.99", "method.ema_momentum: expected a list of 2 values"),
    ("method.predictor_weight=-1", "method.predictor_weight=-1.0 must be >= 0"),
    ("method.mask_ratio=0.05", "masks fewer than 2 of 16 patches"),
])
def test_bad_hpm_config_is_one_clear_line(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, TINY_HPM + ["train.steps=1", override])


@pytest.mark.e2e
def test_zero3_matches_plain_pytorch_and_logs_ranking_and_hard_patches(make_cfg, tmp_path):
    """Fully partitioned ZeRO-3: teacher-guided masks, EMA updates and visualize() gather correctly."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = 6
    cfg = make_cfg("method.name=hpm", f"train.steps={steps}", f"train.deepspeed={fully_partitioned_zero3(tmp_path)}",
                   "method.hard_share=[0.5,1.0]", "method.ema_momentum=[0.5,0.5]", "method.ema_steps_per_epoch=0",
                   name="z3")
    result = train(cfg, build_method)
    ours = losses(cfg.output_dir)
    assert ours == pytest.approx(plain_pytorch_losses(cfg, steps), rel=1e-4, abs=1e-5)
    rows = read_metrics(cfg.output_dir)
    assert rows[1]["train/hard_share"] == pytest.approx(0.5 + 0.5 / steps)
    assert rows[steps]["train/hard_share"] == pytest.approx(1.0)
    for key in ("train/recon_loss", "train/predictor_loss", "train/predictor_kendall", "train/teacher_kendall"):
        assert all(math.isfinite(rows[s][key]) for s in rows), key
    events = EventAccumulator(str(cfg.output_dir / "tb"), size_guidance={"images": 0}).Reload()
    shots = events.Images("images/hard_patches")
    assert [s.step for s in shots] == [steps] and (shots[0].width, shots[0].height) == (5 * 16 + 2, 8 * 17 + 1)
    assert "train/predictor_kendall" in events.Tags()["scalars"]
    teacher = result.engine.module.teacher.module
    assert all(p.dtype == torch.float32 for p in teacher.parameters())


@pytest.mark.e2e
def test_resume_retraces_the_same_curve(make_cfg):
    """The teacher (extra state), the schedule position and the masking noise all come back."""
    common = ["method.name=hpm", "train.steps=6", "run.ckpt_every=3", "method.hard_share=[0.5,1.0]",
              "method.ema_momentum=[0.5,0.5]", "method.ema_steps_per_epoch=0"]
    straight = make_cfg(*common, "run.keep_last=3", name="straight")
    train(straight, build_method)
    resumed = make_cfg(*common, name="resumed")
    rest, _ = resume_run(resumed, straight.output_dir, 3)
    full = read_metrics(straight.output_dir)
    assert sorted(rest) == [4, 5, 6]
    for key in ("train/loss", "train/teacher_kendall"):
        assert [rest[s][key] for s in rest] == pytest.approx([full[s][key] for s in rest], rel=1e-6), key
