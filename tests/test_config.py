import re

import pytest

from train.config import ConfigError, save_config
from train.recipe import load_config

TINY_MODEL = ["model.img_size=32", "model.patch_size=4", "model.embed_dim=32", "model.num_heads=2", "train.steps=1"]


def test_defaults_and_overrides():
    cfg = load_config(None, TINY_MODEL + ["optim.base_lr=1e-3", "model.depth=4", "data.crop_scale=[0.3,1]"])
    assert cfg.optim.base_lr == pytest.approx(1e-3)  # "1e-3" is a string to YAML; accepted as a float
    assert cfg.model.depth == 4
    assert cfg.data.crop_scale == (0.3, 1.0)
    assert cfg.method.name == "mae" and cfg.method.mask_ratio == 0.75


def test_yaml_file_and_roundtrip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  depth: 3\nmethod:\n  name: mae\n  mask_ratio: 0.6\n")
    cfg = load_config(path, TINY_MODEL)
    assert cfg.model.depth == 3 and cfg.method.mask_ratio == 0.6
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


@pytest.mark.parametrize("overrides, message", [
    (["optim.base_lrr=1"], "unknown config key 'optim.base_lrr' (did you mean 'optim.base_lr'?)"),
    (["modle.depth=2"], "unknown config key 'modle' (did you mean 'model'?)"),
    (["method.mask_ration=0.5"], "unknown config key 'method.mask_ration' (did you mean 'method.mask_ratio'?)"),
    (["model.depth=two"], "model.depth: expected int, got 'two'"),
    (["model.depth=2.5"], "model.depth: expected int"),
    (["data.resampled=3"], "data.resampled: expected bool"),
    (["data.crop_scale=[0.2]"], "data.crop_scale: expected a list of 2 values"),
    (["model.img_size=30"], "model.img_size=30 is not divisible by model.patch_size=4"),
    (["model.num_heads=3"], "model.embed_dim=32 is not divisible by model.num_heads=3"),
    (["train.epochs=2"], "set exactly one of train.epochs"),
    (["method.name=nope"], "method.name: unknown method 'nope'"),
    (["method.mask_ratio=1.0"], "method.mask_ratio=1.0 must be in (0, 1)"),
    (["train.precision=fp16"], "train.precision='fp16'"),
    (["train.deepspeed=ds_configs/zero9.json"], "DeepSpeed config not found"),
    (["data.crop_scale=[0.9,0.5]"], "data.crop_scale"),
    (["run.resume=/no/such/ckpt"], "run.resume: checkpoint not found"),
    (["optim.base_lr"], "expected key=value"),
    (["run.on_anomaly=retry"], "run.on_anomaly='retry': choose one of ('stop', 'rollback')"),
    (["run.spike_factor=0.5"], "run.spike_factor=0.5 must be 0 (off) or > 1"),
    (["run.max_rollbacks=0"], "run.max_rollbacks=0 must be >= 1"),
    (["run.rollback_lr_scale=0"], "run.rollback_lr_scale=0.0 must be in (0, 1]"),
    (["run.collapse_rankme=2"], "run.collapse_rankme=2.0 must be >= 0 and needs the online monitor (eval.every > 0)"),
])
def test_rejected_with_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, TINY_MODEL + overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_global_batch_must_divide_by_world_size():
    load_config(None, TINY_MODEL + ["data.batch_size=8", "train.global_batch_size=64"], world_size=4)
    with pytest.raises(ConfigError, match="not a multiple of data.batch_size x world size = 8 x 3"):
        load_config(None, TINY_MODEL + ["data.batch_size=8", "train.global_batch_size=64"], world_size=3)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_accelerate_settings_must_agree_with_the_run(make_cfg):
    """accelerate's DeepSpeed / precision variables: agreeing or default values pass, a differing one is one line."""
    from train.config import check_accelerate_env

    cfg = make_cfg("train.steps=2", "train.deepspeed=ds_configs/zero2.json", "optim.clip_grad=1.0",
                   "train.global_batch_size=16")
    zero = {"stage": 2}
    agree = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2",
             "ACCELERATE_MIXED_PRECISION": "bf16", "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "none",
             "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "2", "ACCELERATE_GRADIENT_CLIPPING": "1.0"}
    check_accelerate_env(cfg, zero, 1, agree)
    check_accelerate_env(cfg, zero, 1, {**agree, "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "1"})  # its default
    check_accelerate_env(cfg, {"stage": 1}, 1, {"ACCELERATE_MIXED_PRECISION": "no"})  # not selecting DeepSpeed
    cases = {
        "ACCELERATE_DEEPSPEED_ZERO_STAGE": ("3", "zero_stage=3 but the run has stage 2 (train.deepspeed="),
        "ACCELERATE_MIXED_PRECISION": ("fp16", "mixed_precision=fp16 but the run has no fp16 support"),
        "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": ("cpu", "offload_optimizer_device=cpu but the run has none"),
        "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": ("4", "gradient_accumulation_steps=4 but the run has 2"),
        "ACCELERATE_GRADIENT_CLIPPING": ("3.0", "gradient_clipping=3.0 but the run has optim.clip_grad=1"),
        "ACCELERATE_DEEPSPEED_CONFIG_FILE": ("ds_configs/zero3.json", "deepspeed_config_file=ds_configs/zero3.json"),
    }
    for var, (value, message) in cases.items():
        with pytest.raises(ConfigError, match=re.escape(message)) as err:
            check_accelerate_env(cfg, zero, 1, {**agree, var: value})
        assert "\n" not in str(err.value) and "the run's settings decide" in str(err.value)
