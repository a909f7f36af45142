"""MoCo v3 as a method: heads, frozen patch projection, momentum schedule, ZeRO-3 against ZeRO-1.

The loss by hand and the global-batch gather with two ranks are in test_simclr.py."""

import pytest
import torch

from helpers import fully_partitioned_zero3, read_metrics
from train.config import ConfigError
from train.engine import train
from train.methods import build_method
from train.models.ema import cosine_momentum, gathered
from train.models.heads import FP32BatchNorm1d


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


# the GPUs each recipe's global batch is sized for (their batches are never accumulated)
RECIPE_GPUS = {"moco_v3_vit_b": 64, "moco_v3_vit_l": 64, "simclr_vit_b": 64, "dino_vit_b": 16, "dino_vit_l": 32}


@pytest.mark.parametrize("name", ["moco_v3_demo", "moco_v3_vit_b", "moco_v3_vit_l", "dino_demo", "dino_vit_b",
                                  "dino_vit_l", "simclr_demo", "simclr_vit_b"])
def test_shipped_configs_validate(name):
    from helpers import REPO
    from train.recipe import load_config

    cfg = load_config(REPO / "train" / "configs" / f"{name}.yaml", world_size=RECIPE_GPUS.get(name, 1))
    assert cfg.method.name == name.split("_vit")[0].removesuffix("_demo")
    # MoCo v3's optimizer (and SimCLR's ViT recipe, which follows it): weight decay on every parameter
    assert cfg.optim.decay_all == (name in ("moco_v3_vit_b", "moco_v3_vit_l", "simclr_vit_b"))


def test_teacher_runs_at_the_students_precision():
    from train.models.ema import EMA, autocast_like

    teacher, x = EMA(torch.nn.Linear(4, 3)), torch.randn(2, 4)
    with autocast_like(torch.nn.Linear(4, 3).to(torch.bfloat16), x.device):
        assert teacher.module(x).dtype == torch.bfloat16  # DeepSpeed bf16 student: bf16 compute ...
    assert teacher.module.weight.dtype == torch.float32  # ... on fp32 EMA weights
    with autocast_like(torch.nn.Linear(4, 3), x.device):
        assert teacher.module(x).dtype == torch.float32


@pytest.mark.parametrize("name", ["moco_v3", "simclr", "dino"])
def test_accumulation_is_a_config_error_unless_micro_batch_statistics_are_accepted(make_cfg, name):
    with pytest.raises(ConfigError, match=rf"train.global_batch_size=16 > data.batch_size x world size = 8 x 1 "
                                          rf"means gradient accumulation, but {name}'s .* would come from each "
                                          r"micro-batch of 8: .* train.accept_micro_batch_statistics=true$"):
        make_cfg(f"method.name={name}", "train.steps=1", "train.global_batch_size=16")
    make_cfg(f"method.name={name}", "train.steps=1", "train.global_batch_size=16",
             "train.accept_micro_batch_statistics=true")
    make_cfg(f"method.name={name}", "train.steps=1", "train.global_batch_size=16", world_size=2)  # no accumulation
    make_cfg("train.steps=1", "train.global_batch_size=16")  # MAE: per-image loss, accumulation is a bigger batch


def test_weight_decay_on_every_parameter_as_official(make_cfg):
    """optim.decay_all: MoCo v3's AdamW(model.parameters(), weight_decay=0.1), norms, biases and cls token too."""
    from train.distributed import init_distributed
    from train.engine import build_engine
    from train.optim import param_groups

    cfg = make_cfg("method.name=moco_v3", "train.steps=1", "optim.weight_decay=0.1", "optim.decay_all=true")
    method = build_method(cfg)
    trainable = {id(p) for p in method.parameters() if p.requires_grad}
    (group,) = param_groups(method, 0.1, decay_all=True)
    assert group["weight_decay"] == 0.1 and {id(p) for p in group["params"]} == trainable
    assert id(method.encoder.vit.cls_token) in trainable and id(method.encoder.vit.norm.weight) in trainable
    # the default exempts them (MAE's and DINO's groups)
    default = {g["weight_decay"]: {id(p) for p in g["params"]} for g in param_groups(method, 0.1)}
    assert id(method.encoder.vit.cls_token) in default[0.0] and id(method.encoder.vit.norm.weight) in default[0.0]
    assert default[0.0] | default[0.1] == trainable
    # the engine builds the optimizer from the option
    init_distributed()  # as train() does before building the engine
    _, optimizer, _, _ = build_engine(cfg, build_method, world_size=1)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1]
    with pytest.raises(ConfigError, match="optim.decay_all=true with optim.layer_decay < 1"):
        make_cfg("train.steps=1", "optim.decay_all=true", "optim.layer_decay=0.75")


def test_projection_batchnorm_runs_in_fp32_beside_bf16_weights():
    """As nn.BatchNorm1d in fp32 (outputs, running statistics); with DeepSpeed's bf16 weights and fp32 buffers it
    normalises in fp32 and returns bf16 (a plain BatchNorm raises a dtype error there)."""
    torch.manual_seed(0)
    x = torch.randn(16, 8)
    ours, ref = FP32BatchNorm1d(8), torch.nn.BatchNorm1d(8)
    ref.load_state_dict(ours.state_dict())
    for _ in range(2):
        assert torch.allclose(ours(x), ref(x), atol=1e-6)
    assert torch.allclose(ours.running_mean, ref.running_mean) and ours.num_batches_tracked == 2
    ours.eval(), ref.eval()
    assert torch.allclose(ours(x), ref(x), atol=1e-6)
    ours.train()
    for p in ours.parameters():
        p.data = p.data.bfloat16()  # what DeepSpeed's bf16 does: parameters only
    out = ours(x.bfloat16())
    assert out.dtype == torch.bfloat16 and ours.running_mean.dtype == torch.float32
    with pytest.raises(RuntimeError):
        plain = torch.nn.BatchNorm1d(8)
        for p in plain.parameters():
            p.data = p.data.bfloat16()
        plain(x.bfloat16())
