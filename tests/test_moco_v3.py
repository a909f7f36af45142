"""MoCo v3 as a method: heads, frozen patch projection, momentum schedule, ZeRO-3 against ZeRO-1.

The loss by hand and the global-batch gather with two ranks are in test_simclr.py."""

import pytest
import torch

from helpers import fully_partitioned_zero3, read_metrics
from train.config import ConfigError
from train.engine import train
from train.methods import build_method
from train.models.ema import cosine_momentum, gathered


def test_structure_matches_the_official_vit_recipe(make_cfg):
    method = build_method(make_cfg("method.name=moco_v3", "train.steps=1"))
    assert not any(p.requires_grad for p in method.encoder.vit.patch_embed.parameters())  # --stop-grad-conv1
    assert sum(isinstance(m, torch.nn.Linear) for m in method.projector) == 3  # 3-layer projector ...
    assert sum(isinstance(m, torch.nn.Linear) for m in method.predictor) == 2  # ... 2-layer predictor
    last_bn = method.predictor[-1]
    assert isinstance(last_bn, torch.nn.BatchNorm1d) and not last_bn.affine
    # the momentum encoder: encoder + projector (no predictor), outside the module tree, BatchNorm in train mode
    assert set(method.teacher.module.keys()) == {"encoder", "projector"}
    assert not any(n.startswith("teacher") for n, _ in method.named_parameters())
    assert method.teacher.module["projector"].training
    trainable = build_method(make_cfg("method.name=moco_v3", "train.steps=1", "method.frozen_patch_embed=false"))
    assert all(p.requires_grad for p in trainable.encoder.vit.patch_embed.parameters())


def test_config_errors(make_cfg):
    with pytest.raises(ConfigError, match="method moco_v3 trains on the views of data.views=moco_v3 or simclr, "
                                          "not data.views='dino'"):
        make_cfg("method.name=moco_v3", "train.steps=1", "data.views=dino")
    with pytest.raises(ConfigError, match="method.temperature=-0.1 must be > 0"):
        make_cfg("method.name=moco_v3", "train.steps=1", "method.temperature=-0.1")
    with pytest.raises(ConfigError, match="unknown config key 'method.moco_t'"):
        make_cfg("method.name=moco_v3", "train.steps=1", "method.moco_t=0.2")


@pytest.mark.e2e
def test_zero3_matches_zero1(make_cfg, tmp_path):
    """Fully partitioned ZeRO-3 retraces ZeRO-1: the encoder, both MLPs and the momentum update gather right."""
    run = ["method.name=moco_v3", "train.steps=4"]
    zero1 = make_cfg(*run, name="zero1")
    train(zero1, build_method)
    zero3 = make_cfg(*run, f"train.deepspeed={fully_partitioned_zero3(tmp_path)}", name="zero3")
    method = train(zero3, build_method).engine.module
    ref, rows = read_metrics(zero1.output_dir), read_metrics(zero3.output_dir)
    assert [rows[s]["train/loss"] for s in rows] == pytest.approx([ref[s]["train/loss"] for s in rows], rel=1e-4)
    assert [rows[s]["train/momentum"] for s in rows] == pytest.approx([cosine_momentum(s - 1, 4, 0.99) for s in rows])
    # the random patch projection stayed as initialised, in the student and in the momentum encoder
    torch.manual_seed(zero3.run.seed)  # the engine's initial weights
    initial = build_method(zero3).encoder
    student = method.encoder.vit.patch_embed.proj.weight
    with gathered([student]):
        assert torch.equal(student, initial.vit.patch_embed.proj.weight)
    teacher = method.teacher.module["encoder"].vit
    assert torch.allclose(teacher.patch_embed.proj.weight, initial.vit.patch_embed.proj.weight, atol=1e-6)
    assert not torch.equal(teacher.blocks[0].mlp.fc1.weight, initial.vit.blocks[0].mlp.fc1.weight)  # it moved


@pytest.mark.parametrize("name", ["moco_v3_demo", "moco_v3_vit_b", "moco_v3_vit_l", "dino_demo", "dino_vit_b",
                                  "dino_vit_l", "simclr_demo", "simclr_vit_b"])
def test_shipped_configs_validate(name):
    from helpers import REPO
    from train.recipe import load_config

    cfg = load_config(REPO / "train" / "configs" / f"{name}.yaml", world_size=8)
    assert cfg.method.name == name.split("_vit")[0].removesuffix("_demo")


def test_teacher_runs_at_the_students_precision():
    from train.models.ema import EMA, autocast_like

    teacher, x = EMA(torch.nn.Linear(4, 3)), torch.randn(2, 4)
    with autocast_like(torch.nn.Linear(4, 3).to(torch.bfloat16), x.device):
        assert teacher.module(x).dtype == torch.bfloat16  # DeepSpeed bf16 student: bf16 compute ...
    assert teacher.module.weight.dtype == torch.float32  # ... on fp32 EMA weights
    with autocast_like(torch.nn.Linear(4, 3), x.device):
        assert teacher.module(x).dtype == torch.float32


def test_accumulation_warns_that_negatives_stay_per_micro_batch(make_cfg, caplog):
    caplog.set_level("WARNING", logger="train")
    build_method(make_cfg("method.name=moco_v3", "train.steps=1", "train.global_batch_size=16"))
    assert "negatives come from each micro-batch of 8 images" in caplog.text
