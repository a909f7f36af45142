"""EMA teachers held outside DeepSpeed: fp32 under bf16, correct under ZeRO-3, saved with checkpoints."""

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from helpers import read_metrics, resume_run
from train.engine import train
from train.methods import METHODS, Method, build_method
from train.models.ema import EMA
from train.models.vit import ViTEncoder


@dataclass
class ToyConfig:
    name: str = "ema_toy"
    momentum: float = 0.9


class EMAToy(Method):
    """A BYOL-like toy: the student predicts the EMA teacher's features of the same images."""

    Config = ToyConfig
    teachers = ("teacher",)  # saved with checkpoints by Method

    def __init__(self, cfg):
        super().__init__()
        self.momentum = cfg.method.momentum
        self.encoder = ViTEncoder(cfg.model)
        self.predictor = nn.Linear(cfg.model.embed_dim, cfg.model.embed_dim)
        self.teacher = EMA(self.encoder)

    def forward(self, batch, step=0):
        images = batch["images"]
        with torch.no_grad():
            target = self.teacher.on(images.device)(images, pool="token")
        loss = (self.predictor(self.encoder(images, pool="token")).float() - target).pow(2).mean()
        return loss, {"loss": loss.detach()}

    def on_step_end(self, step):
        self.teacher.update(self.encoder, self.momentum)


@pytest.fixture
def toy_method(monkeypatch):
    monkeypatch.setitem(METHODS, "ema_toy", EMAToy)


def test_update_is_the_ema_formula():
    student = nn.Linear(3, 2)
    ema = EMA(student)
    before = ema.module.weight.clone()
    with torch.no_grad():
        student.weight.add_(1.0)
    ema.update(student, 0.75)
    assert torch.allclose(ema.module.weight, 0.75 * before + 0.25 * student.weight)
    assert not any(p.requires_grad for p in ema.module.parameters())
    assert "teacher" not in dict(nn.Module().named_modules())  # held outside any module tree


@pytest.mark.e2e
@pytest.mark.parametrize("stage, precision", [(1, "bf16"), (3, "fp32")])
def test_teacher_stays_fp32_and_tracks_the_student(make_cfg, toy_method, stage, precision):
    cfg = make_cfg("method.name=ema_toy", "method.momentum=0.5", "train.steps=3", f"train.precision={precision}",
                   f"train.deepspeed=ds_configs/zero{stage}.json", name=f"ema{stage}")
    method = train(cfg, build_method).engine.module
    teacher = method.teacher.module
    assert all(p.dtype == torch.float32 for p in teacher.parameters())
    assert not any(n.startswith("teacher") for n, _ in method.named_parameters())  # not DeepSpeed's
    # one more update by hand: teacher' = 0.5 teacher + 0.5 student (gathered under ZeRO-3)
    before = {n: p.clone() for n, p in teacher.named_parameters()}
    method.teacher.update(method.encoder, 0.5)
    from train.models.ema import gathered

    params = dict(method.encoder.named_parameters())
    with gathered(list(params.values())):
        for name, p in teacher.named_parameters():
            expected = 0.5 * before[name] + 0.5 * params[name].detach().float()
            assert torch.allclose(p, expected, atol=1e-6), name
    assert any(not torch.equal(before[n], p) for n, p in teacher.named_parameters() if p.numel() > 1)


@pytest.mark.e2e
@pytest.mark.parametrize("stage", [1, 3])
def test_teacher_is_checkpointed_and_resume_is_exact(make_cfg, toy_method, stage):
    common = ["method.name=ema_toy", "train.steps=6", "run.ckpt_every=3",
              f"train.deepspeed=ds_configs/zero{stage}.json"]
    straight = make_cfg(*common, "run.keep_last=3", name="straight")
    train(straight, build_method)
    resumed = make_cfg(*common, name="resumed")
    rest, _ = resume_run(resumed, straight.output_dir, 3)
    full = read_metrics(straight.output_dir)
    assert sorted(rest) == [4, 5, 6]
    assert [rest[s]["train/loss"] for s in rest] == pytest.approx([full[s]["train/loss"] for s in rest], rel=1e-6)
