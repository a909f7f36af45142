"""Speed options leave the numbers alone (regional torch.compile, activation checkpointing); benchmark baseline."""

import pytest

from helpers import fully_partitioned_zero3, losses, plain_pytorch_losses
from train.config import ConfigError
from train.engine import train
from train.methods import build_method


@pytest.mark.e2e
def test_compiled_blocks_give_the_eager_losses(make_cfg):
    cfg = make_cfg("train.steps=3", "train.compile=aot_eager", name="compiled")
    module = train(cfg, build_method).engine.module
    assert all(block._compiled_call_impl is not None for block in module.encoder.vit.blocks)
    assert all(block._compiled_call_impl is not None for block in module.decoder.blocks)
    assert losses(cfg.output_dir) == pytest.approx(plain_pytorch_losses(cfg, 3), rel=1e-4, abs=1e-5)


def test_compile_settings_are_checked_up_front(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match="train.compile='inductr': not a torch.compile backend"):
        make_cfg("train.steps=1", "train.compile=inductr")
    with pytest.raises(ConfigError, match="with ZeRO stage 3"):
        make_cfg("train.steps=1", "train.compile=inductor", f"train.deepspeed={fully_partitioned_zero3(tmp_path)}")


@pytest.mark.e2e
def test_activation_checkpointing_under_partitioned_zero3_gives_the_same_losses(make_cfg, tmp_path):
    cfg = make_cfg("train.steps=3", "model.grad_checkpointing=true",
                   f"train.deepspeed={fully_partitioned_zero3(tmp_path)}", name="ckpt_z3")
    train(cfg, build_method)
    cfg.model.grad_checkpointing = False  # the reference: plain PyTorch storing every activation
    assert losses(cfg.output_dir) == pytest.approx(plain_pytorch_losses(cfg, 3), rel=1e-4, abs=1e-5)


def test_benchmark_plain_step_is_the_engine_step():
    """The benchmark's plain-PyTorch baseline does the same step as the engine: same loss after the same steps."""
    from benchmarks.step_throughput import measure, overrides_for

    plain, zero1 = (measure(overrides_for("tiny", "mae", backend, 8, "", False), backend == "plain", 2, 1)
                    for backend in ("plain", "zero1"))
    assert zero1["loss"] == pytest.approx(plain["loss"], rel=1e-4)
    assert plain["tokens_per_s"] == pytest.approx(plain["img_per_s"] * 16)  # tiny: 32/4 = 8x8 patches, 25% kept


def test_benchmark_target_checks():
    from benchmarks.step_throughput import table, target_checks

    cells = [{"model": "vit_l16", "method": "mae", "backend": "plain", "batch_size": 256, "img_per_s": 2700.0,
              "tokens_per_s": 2700.0 * 49, "mfu": 0.4},
             {"model": "vit_l16", "method": "mae", "backend": "zero2", "batch_size": 256, "img_per_s": 2600.0,
              "tokens_per_s": 2600.0 * 49, "mfu": 0.39},
             {"model": "vit_l16", "method": "full", "backend": "zero1", "batch_size": 128, "error": "OOM"}]
    assert target_checks(cells) == ["PASS engine overhead vit_l16 mae zero2: +3.7% (target <= 5%)",
                                    "PASS MAE ViT-L engine 2600 img/s = 1.32x the reference 1973 (target >= 1.3x)"]
    assert "0.963" in table(cells) and "OOM" in table(cells)


def test_benchmark_zero3_and_dino_targets():
    from benchmarks.step_throughput import target_checks

    cells = [{"model": "vit_l16", "method": "full", "backend": "plain", "img_per_s": 1000.0},
             {"model": "vit_l16", "method": "full", "backend": "zero3", "img_per_s": 880.0},
             {"model": "vit_l16", "method": "dino", "backend": "zero1", "img_per_s": 310.0}]
    assert target_checks(cells) == ["FAIL ZeRO-3 full-token vit_l16 0.880x plain (target >= 0.9x)",
                                    "PASS DINO ViT-L/16 (2x224 + 8x96) 310 img/s per GPU (target >= 300)"]


def test_scaling_estimate_communication_volume():
    from benchmarks.scaling_estimate import comm_gb, estimate

    assert comm_gb(1e9, 2, 2) == (2.0, 0.0, 1.0)  # reduce-scatter + all-gather of 2 GB of bf16, half each
    assert comm_gb(1e9, 3, 4) == pytest.approx((4.5, 1.5, 0.0))  # 3 collectives x 2 GB x 3/4
    # 8 GPUs, 1e8 params, 100 ms compute: the exposed all-gather adds 0.175 GB / 350 GB/s + 2 buckets x 7 x 3 us
    e = estimate(img_per_s=100.0, batch=10, params=1e8, stage=2, gpus=8)
    assert e["step_ms"] == pytest.approx(100 + 0.5 + 0.042, rel=1e-6)
