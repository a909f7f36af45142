"""DINO: loss and centre by hand, schedules, the head's frozen last layer, multi-crop sizes, ZeRO-3 and resume."""

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import fully_partitioned_zero3, read_metrics, resume_run, seed_checkpoint
from train.config import ConfigError, ModelConfig
from train.engine import train
from train.methods import build_method
from train.methods.dino import dino_loss, updated_center
from train.models.ema import cosine_momentum
from train.models.heads import DINOHead
from train.models.vit import ViTEncoder
from train.optim import weight_decay_at


def test_dino_loss_by_hand():
    ln = math.log
    # teacher (2 global views, 1 image, K=2): centred logits [0, 0] and [0, -ln 3]; sharpened by T=0.5 they
    # give p0 = (.5, .5) and p1 = (.9, .1) since exp(-2 ln 3) = 1/9
    center = torch.tensor([[0.0, ln(3)]])
    teacher = torch.tensor([[[0.0, ln(3)]], [[0.0, 0.0]]])
    # student (3 views): with student_temp 2 the logits [0, 2 ln 3] give log-probs of (.25, .75)
    student = torch.tensor([[[0.0, 0.0]], [[0.0, 2 * ln(3)]], [[2 * ln(3), 0.0]]])
    s0, s1, s2 = (ln(0.5), ln(0.5)), (ln(0.25), ln(0.75)), (ln(0.75), ln(0.25))
    p0, p1 = (0.5, 0.5), (0.9, 0.1)

    def ce(p, log_q):
        return -(p[0] * log_q[0] + p[1] * log_q[1])

    # pairs (teacher view, student view) with different views: (0, 1), (0, 2), (1, 0), (1, 2)
    expected = (ce(p0, s1) + ce(p0, s2) + ce(p1, s0) + ce(p1, s2)) / 4
    got = dino_loss(student, teacher, center, student_temp=2.0, teacher_temp=0.5)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # no gradient flows into the teacher
    teacher.requires_grad_(True)
    student.requires_grad_(True)
    dino_loss(student, teacher, center, 2.0, 0.5).backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0


def test_center_is_an_ema_of_the_batch_mean():
    teacher = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]]])  # (2 views, 2 images, K=2)
    center = torch.tensor([[10.0, 20.0]])
    expected = torch.tensor([[0.9 * 10 + 0.1 * 4, 0.9 * 20 + 0.1 * 5]])  # batch means 4 and 5
    assert torch.allclose(updated_center(center, teacher, 0.9), expected)


def test_schedules_are_functions_of_the_step(make_cfg):
    assert cosine_momentum(0, 100, 0.996) == pytest.approx(0.996)
    assert cosine_momentum(50, 100, 0.996) == pytest.approx(0.998)
    assert cosine_momentum(100, 100, 0.996) == pytest.approx(1.0)
    assert weight_decay_at(0, 10, 0.04, 0.4) == pytest.approx(0.04)
    assert weight_decay_at(5, 10, 0.04, 0.4) == pytest.approx(0.22)
    method = build_method(make_cfg("method.name=dino", "train.steps=100", "method.warmup_teacher_temp=0.04",
                                   "method.teacher_temp=0.07", "method.warmup_teacher_temp_epochs=2",
                                   "method.freeze_last_layer=1.5"))
    method.set_total_steps(100, steps_per_epoch=10)
    assert [method.teacher_temp_at(s) for s in (0, 10, 20, 99)] == pytest.approx([0.04, 0.055, 0.07, 0.07])
    assert method.freeze_steps == 15
    assert method.momentum_at(50) == pytest.approx(0.998)
    with pytest.raises(ConfigError, match="count epochs"):
        method.set_total_steps(100, steps_per_epoch=None)


def test_head_is_weight_normalised_and_its_last_layer_can_be_frozen():
    torch.manual_seed(0)
    head = DINOHead(8, 5, hidden_dim=16, bottleneck_dim=4, num_layers=3, norm_last_layer=True)
    x = torch.randn(6, 8)
    v = head.last_layer.weight_v
    expected = F.normalize(head.mlp(x), dim=-1) @ F.normalize(v, dim=1).T  # g = 1
    assert torch.allclose(head(x), expected, atol=1e-6)
    assert not head.last_layer.weight_g.requires_grad  # norm_last_layer: the norm stays fixed
    head(x, freeze_last_layer=True).sum().backward()
    assert v.grad is None and head.mlp[0].weight.grad.abs().sum() > 0
    head(x).sum().backward()
    assert v.grad.abs().sum() > 0
    assert DINOHead(8, 5, 16, 4, norm_last_layer=False).last_layer.weight_g.requires_grad


def test_encoder_takes_smaller_crops_with_resampled_positions():
    torch.manual_seed(0)
    enc = ViTEncoder(ModelConfig(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, pos_embed="learned"))
    assert enc(torch.randn(3, 3, 8, 8)).shape == (3, 1 + 4, 32)
    # with a zero patch projection the embedding is the position embedding alone: the 4x4 grid resampled
    # bicubically to 2x2 (timm's resample_abs_pos_embed, antialiased when shrinking)
    with torch.no_grad():
        enc.vit.patch_embed.proj.weight.zero_()
        enc.vit.patch_embed.proj.bias.zero_()
    grid = enc.vit.pos_embed[:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(2, 2), mode="bicubic", antialias=True).permute(0, 2, 3, 1)
    assert torch.allclose(enc.embed(torch.randn(1, 3, 8, 8)), expected.reshape(1, 4, 32), atol=1e-6)
    assert torch.equal(enc.embed(torch.randn(1, 3, 16, 16)), enc.vit.pos_embed[:, 1:].expand(1, -1, -1))


def test_config_errors(make_cfg):
    with pytest.raises(ConfigError, match="method dino trains on the views of data.views=dino"):
        make_cfg("method.name=dino", "train.steps=1", "data.views=moco_v3")
    with pytest.raises(ConfigError, match="data.local_size=10 is not divisible by model.patch_size=4"):
        make_cfg("method.name=dino", "train.steps=1", "data.local_size=10")
    with pytest.raises(ConfigError, match="method.teacher_temp=0.0 must be > 0"):
        make_cfg("method.name=dino", "train.steps=1", "method.teacher_temp=0")


# 1442 digits / 8 = 180 steps per epoch: freeze the last layer for 2 steps, warm the teacher temperature up over 4
DINO_RUN = ["method.name=dino", "method.freeze_last_layer=0.012", "method.warmup_teacher_temp_epochs=0.023",
            "method.teacher_temp=0.07", "optim.weight_decay=0.04", "optim.weight_decay_end=0.4", "train.steps=6",
            "run.ckpt_every=3", "run.keep_last=3"]


@pytest.mark.e2e
def test_zero3_matches_zero1_and_resume_is_exact(make_cfg, tmp_path):
    """Under fully partitioned ZeRO-3 DINO retraces ZeRO-1's losses (gathers in the encoder, head and EMA
    update), and a run resumed at step 3 retraces the rest (teacher, centre and schedules restored)."""
    zero1 = make_cfg(*DINO_RUN, name="zero1")
    train(zero1, build_method)
    zero3 = make_cfg(*DINO_RUN, f"train.deepspeed={fully_partitioned_zero3(tmp_path)}", name="zero3")
    engine = train(zero3, build_method).engine
    method = engine.module
    # the optimizer's decayed groups got the scheduled weight decay (the others none); the head's last layer
    # (decayed) has a group of its own
    last = weight_decay_at(5, 6, 0.04, 0.4)
    assert sorted(g["weight_decay"] for g in engine.optimizer.param_groups) == pytest.approx([0.0, last, last])
    ref, rows = read_metrics(zero1.output_dir), read_metrics(zero3.output_dir)
    assert [rows[s]["train/loss"] for s in rows] == pytest.approx([ref[s]["train/loss"] for s in rows], rel=1e-4)
    assert [rows[s]["train/teacher_temp"] for s in range(1, 7)] == pytest.approx(
        [0.04, 0.04 + 0.03 / 4, 0.04 + 0.03 / 2, 0.04 + 0.03 * 3 / 4, 0.07, 0.07])
    assert [rows[s]["train/weight_decay"] for s in rows] == pytest.approx(
        [weight_decay_at(s - 1, 6, 0.04, 0.4) for s in rows])
    assert method.center.abs().sum() > 0 and method.freeze_steps == 2

    resumed = make_cfg(*DINO_RUN, f"train.deepspeed={fully_partitioned_zero3(tmp_path)}", name="resumed")
    rest, result = resume_run(resumed, zero3.output_dir, 3)
    again = result.engine.module
    assert sorted(rest) == [4, 5, 6]
    for key in ("train/loss", "train/teacher_entropy", "train/weight_decay"):
        assert [rest[s][key] for s in rest] == pytest.approx([rows[s][key] for s in rest], rel=1e-5), key
    assert torch.allclose(again.center, method.center, rtol=1e-5, atol=1e-7)
    teacher, teacher_again = method.teacher.module.state_dict(), again.teacher.module.state_dict()
    assert all(torch.allclose(teacher[k], teacher_again[k], rtol=1e-5, atol=1e-6) for k in teacher)


@pytest.mark.e2e
def test_export_and_checkpoint_eval_take_the_teacher_unless_asked_for_the_student(make_cfg, tmp_path):
    from safetensors.torch import load_file

    from train.eval.export import export
    from train.methods import METHODS
    from train.weights import load_encoder, resolve_source

    cfg = make_cfg("method.name=dino", "train.steps=2", "method.momentum_teacher=0.5", name="dino_export")
    module = train(cfg, build_method).engine.module
    teacher = {k: v.float() for k, v in module.eval_encoder().vit.state_dict().items()}
    student = {k: v.float() for k, v in module.encoder.vit.state_dict().items()}
    assert not torch.allclose(teacher["blocks.0.attn.qkv.weight"], student["blocks.0.attn.qkv.weight"])
    for kind, expected in (("teacher", teacher), ("student", student)):
        exported = load_file(export(cfg.output_dir, tmp_path / kind, student=kind == "student") / "model.safetensors")
        assert exported.keys() == expected.keys()
        assert all(torch.allclose(exported[k], expected[k]) for k in expected), kind
    loaded = load_encoder(resolve_source(cfg.output_dir), METHODS).vit.state_dict()
    assert all(torch.allclose(loaded[k], teacher[k]) for k in teacher)


def last_layer_adam_state(engine) -> dict:
    """This rank's AdamW state of the optimizer group holding the head's last layer, under any ZeRO stage."""
    zero = engine.optimizer
    basic = getattr(zero, "optimizer", zero)
    index = next(i for i, g in enumerate(basic.param_groups) if g.get("freezable") == "head.last_layer.")
    if hasattr(zero, "fp32_partitioned_groups_flat"):  # ZeRO-3: the flat sub-groups of that group
        (flat,) = [f for i, f in enumerate(zero.fp32_partitioned_groups_flat) if zero.sub_group_to_group_id[i] == index]
    elif hasattr(zero, "single_partition_of_fp32_groups"):  # ZeRO-1/2
        flat = zero.single_partition_of_fp32_groups[index]
    else:
        (flat,) = basic.param_groups[index]["params"]
    return basic.state.get(flat, {})


@pytest.mark.e2e
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_last_layer_is_frozen_bit_for_bit_then_trains_with_fresh_adam_state(make_cfg, tmp_path, monkeypatch, stage):
    """As the official `cancel_gradients_last_layer` (grad None, so AdamW skips it): during the freeze the last
    layer's weights stay bit-identical (no step, no weight decay) and it has no Adam state; its first step after
    the freeze starts from fresh moments (step 1) while the rest of the model is at step 3. A run resumed from
    the end of the freeze (a checkpoint without that state) retraces the uninterrupted one."""
    from train.methods.dino import DINO
    from train.models.ema import gathered

    seen = []
    original = DINO.on_step_end

    def record(self, step):
        v = self.head.last_layer.weight_v
        with gathered([v]):
            seen.append(v.detach().clone())
        original(self, step)

    monkeypatch.setattr(DINO, "on_step_end", record)
    ds = fully_partitioned_zero3(tmp_path) if stage == 3 else f"ds_configs/zero{stage}.json"
    run = [*DINO_RUN[:-3], "train.steps=3", "run.ckpt_every=2", "run.keep_last=3", "method.norm_last_layer=false",
           f"train.deepspeed={ds}"]
    cfg = make_cfg(*run, name="straight")
    torch.manual_seed(cfg.run.seed)
    initial = build_method(cfg).head.last_layer.weight_v.detach().clone()
    engine = train(cfg, build_method).engine
    assert engine.module.freeze_steps == 2
    assert torch.equal(seen[0], initial) and torch.equal(seen[1], initial)  # frozen: bit-identical
    assert not torch.equal(seen[2], initial)  # then it trains
    state = last_layer_adam_state(engine)
    beta1, beta2 = cfg.optim.betas
    assert float(state["step"]) == 1.0  # fresh Adam state: one step, and moments of a single gradient g:
    m, v = state["exp_avg"], state["exp_avg_sq"]  # m = (1 - b1) g, v = (1 - b2) g^2
    nonzero = v > 0
    assert nonzero.sum() > 0
    assert torch.allclose(m[nonzero] ** 2 / v[nonzero], torch.tensor((1 - beta1) ** 2 / (1 - beta2)), rtol=1e-4)
    if stage == 2:  # ZeRO-2 saves and loads the optimizer state as ZeRO-1 does
        return
    after_freeze = seen[2]
    resumed = make_cfg(*run, name="resumed")
    seed_checkpoint(resumed, cfg.output_dir, 2)
    seen.clear()
    train(resumed, build_method)
    assert len(seen) == 1 and torch.allclose(seen[0], after_freeze, rtol=1e-5, atol=1e-7)
