"""Progressive compression: schedules, token dropout, patch scaling, MAE under compression, the gradient-error
diagnostic, the engine hook (ZeRO-3 partitioned) and the sweep command."""

import json
import math
import subprocess

import pytest
import torch
import torch.nn.functional as F
import yaml
from timm.layers import resample_abs_pos_embed, resample_patch_embed

from data_pipeline.augment import SingleView
from data_pipeline.batch import to_device
from data_pipeline.stream import StreamLoader, resolve_shards
from helpers import REPO, command, fully_partitioned_zero3, read_metrics, resume_run, run_env, torchrun
from train.checkpoint import load_weights
from train.compression import FULL, CompressionSchedule, Setting, encode, schedule_value, step_seed
from train.compression.__main__ import main
from train.compression.diagnostic import GradientDiagnostic, gradient_error
from train.config import CompressionConfig, ConfigError, ModelConfig, ScheduleConfig
from train.engine import train
from train.methods import build_method
from train.methods.mae import mae_loss, patchify
from train.models.vit import ViTEncoder, patch_grid
from train.optim import lr_at, param_groups, set_lr
from train.recipe import load_config

TINY_MODEL = ModelConfig(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, pos_embed="learned")
SCHEDULED = ["compression.keep_ratio.kind=linear", "compression.keep_ratio.start=0.5",
             "compression.patch_scale.kind=step", "compression.patch_scale.start=2",
             "compression.patch_scale.until=0.5"]


def tiny_mae(*overrides):
    return load_config(None, ["model.img_size=16", "model.patch_size=4", "model.embed_dim=32", "model.depth=2",
                              "model.num_heads=2", "method.decoder_dim=32", "method.decoder_depth=1",
                              "method.decoder_heads=2", "train.steps=8", *overrides])


# ---------------------------------------------------------------------------------------------------- schedules

@pytest.mark.parametrize("kind, expected", [
    # progress:     0     0.4    0.6     0.8  1.0      (start 0.25, end 1.0, until 0.8, 3 stages)
    ("constant", [0.25, 0.25, 0.25, 0.25, 0.25]),
    ("step", [0.25, 0.5, 0.75, 1.0, 1.0]),  # t = p / 0.8 -> stage floor(3t): 0, 1, 2, then end
    ("linear", [0.25, 0.625, 0.8125, 1.0, 1.0]),
    ("cosine", [0.25, 0.625, 1.0 - 0.75 * 0.5 * (1 - math.sqrt(0.5)), 1.0, 1.0]),
])
def test_schedule_values_at_start_middle_and_end(kind, expected):
    schedule = ScheduleConfig(kind=kind, start=0.25, end=1.0, until=0.8, stages=3)
    assert [schedule_value(schedule, p) for p in (0.0, 0.4, 0.6, 0.8, 1.0)] == pytest.approx(expected, abs=1e-12)
    assert schedule_value(schedule, -0.5) == expected[0] and schedule_value(schedule, 7.0) == expected[-1]


def test_schedule_gives_patch_sizes_and_keep_ratios_by_step():
    cfg = CompressionConfig(keep_ratio=ScheduleConfig("cosine", 0.5, 1.0, until=0.5),
                            patch_scale=ScheduleConfig("step", 2.0, 1.0, until=0.5, stages=2))
    schedule = CompressionSchedule(cfg, base_patch_size=16, total_steps=100)
    assert schedule.active and not CompressionSchedule(CompressionConfig(), 16, 100).active
    got = [(s.patch_size, s.keep_ratio) for s in map(schedule.at, (0, 25, 50, 99))]
    assert got == [(32, 0.5), (24, pytest.approx(0.75)), (None, 1.0), (None, 1.0)]
    assert schedule.at(50).is_full and schedule.at(7, seed=3).seed == 3
    assert step_seed(0, 1, 5) == step_seed(0, 1, 5) != step_seed(0, 1, 6) != step_seed(0, 0, 5)


@pytest.mark.parametrize("overrides, message", [
    (["compression.keep_ratio.kind=exp"], "compression.keep_ratio.kind='exp': choose one of"),
    (["compression.keep_ratio.start=0"], "compression.keep_ratio.start=0.0 must be in (0, 1]"),
    (["compression.keep_ratio.end=1.5"], "compression.keep_ratio.end=1.5 must be in (0, 1]"),
    (["compression.patch_scale.start=0.5"], "compression.patch_scale.start=0.5 must be in [1, 4]"),
    (["compression.patch_scale.start=8"], "compression.patch_scale.start=8.0 must be in [1, 4]"),
    (["compression.patch_scale.until=0"], "compression.patch_scale.until=0.0 must be in (0, 1]"),
    (["compression.keep_ratio.stages=0"], "compression.keep_ratio.stages=0 must be >= 1"),
    (["compression.diagnose_every=5"], "compression.diagnose_every is set but no compression is scheduled"),
    (["compression.keep_ratio.strat=0.5"], "unknown config key 'compression.keep_ratio.strat' (did you mean"),
])
def test_bad_compression_config_is_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        tiny_mae(*overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_method_without_compression_support_is_rejected(monkeypatch):
    from train.methods import METHODS
    from train.methods.mae import MAE

    class DropoutOnly(MAE):
        supported_compression = ("token_dropout",)

    class Inherits(MAE):  # a subclass with its own forward does not inherit MAE's declaration
        pass

    monkeypatch.setitem(METHODS, "mae", DropoutOnly)
    tiny_mae("compression.keep_ratio.start=0.5")  # token dropout: supported
    with pytest.raises(ConfigError, match=r"compression.patch_scale: method 'mae' does not support patch_scaling"):
        tiny_mae("compression.patch_scale.start=2")
    monkeypatch.setitem(METHODS, "mae", Inherits)
    with pytest.raises(ConfigError, match=r"does not support token_dropout \(it supports: no compression\)"):
        tiny_mae("compression.keep_ratio.start=0.5")


def test_config_files_stack_in_order(tmp_path):
    (tmp_path / "a.yaml").write_text("model: {depth: 3}\ncompression: {keep_ratio: {kind: cosine, start: 0.5}}\n")
    (tmp_path / "b.yaml").write_text("compression: {keep_ratio: {start: 0.25, until: 0.7}}\n")
    cfg = load_config([tmp_path / "a.yaml", tmp_path / "b.yaml"], ["model.img_size=16", "model.patch_size=4",
                                                                    "model.embed_dim=32", "model.num_heads=2",
                                                                    "train.steps=1"])
    assert cfg.model.depth == 3 and cfg.compression.keep_ratio == ScheduleConfig("cosine", 0.25, 1.0, 0.7, 1)


def test_shipped_compression_configs_load_and_relax_to_full_tokens():
    files = sorted((REPO / "train" / "configs" / "compression").glob("*.yaml"))
    assert {f.stem for f in files} >= {"moco_v3", "dino", "simclr", "mae"}
    for f in files:
        cfg = load_config([REPO / "train/configs/mae_demo.yaml", f], ["train.steps=100"])
        schedule = CompressionSchedule(cfg.compression, cfg.model.patch_size, 100)
        assert schedule.active and not schedule.at(0).is_full and schedule.at(99).is_full, f.name


# ------------------------------------------------------------------------------------------------ token dropout

@pytest.mark.parametrize("keep, expected", [(0.25, 4), (0.5, 8), (0.7, 11), (0.05, 1), (1.0, 16)])
def test_token_dropout_keeps_exactly_the_scheduled_count(keep, expected):
    setting = Setting(keep_ratio=keep, seed=11)
    rng = torch.get_rng_state()
    ids = setting.keep_ids(5, 16, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), rng)  # its own generator: the global RNG never moves
    if expected == 16:
        assert ids is None
        return
    assert ids.shape == (5, expected) and int(ids.max()) < 16
    assert all(len(set(row.tolist())) == expected for row in ids)
    assert torch.equal(ids, setting.keep_ids(5, 16, torch.device("cpu")))  # a pure function of the seed
    if expected > 1:
        assert not torch.equal(ids, setting.keep_ids(5, 16, torch.device("cpu"), stream=1))


def test_encode_runs_the_encoder_on_the_kept_tokens():
    torch.manual_seed(0)
    enc = ViTEncoder(TINY_MODEL).eval()
    images = torch.randn(3, 3, 16, 16)
    setting = Setting(keep_ratio=0.5, seed=4)
    out = encode(enc, images, setting)
    assert out.shape == (3, 1 + 8, 32)
    assert torch.allclose(out, enc(images, ids_keep=setting.keep_ids(3, 16, images.device)))
    assert torch.equal(encode(enc, images, setting, dropout=False), enc(images))  # the teacher branch
    # with patch scaling the subset is drawn on the coarser grid: 8-pixel patches -> 2x2 grid -> 2 kept
    assert encode(enc, images, Setting(8, 0.5, seed=4)).shape == (3, 1 + 2, 32)


# ------------------------------------------------------------------------------------------------ patch scaling

def test_patch_scaling_at_the_model_patch_size_is_timms_forward():
    torch.manual_seed(0)
    enc = ViTEncoder(TINY_MODEL).eval()
    images = torch.randn(2, 3, 16, 16)
    timm_out = enc.vit.forward_features(images)
    assert torch.allclose(enc(images), timm_out, atol=1e-6)
    assert torch.allclose(enc(images, patch_size=4), timm_out, atol=1e-6)


@pytest.mark.parametrize("patch, grid", [(8, 2), (6, 3)])  # 6 does not divide 16: the image is resized to 18
def test_patch_scaling_follows_timms_resampling(patch, grid):
    torch.manual_seed(0)
    enc = ViTEncoder(TINY_MODEL).eval()
    images = torch.randn(2, 3, 16, 16)
    assert patch_grid((16, 16), patch) == (grid, grid)
    resized = F.interpolate(images, size=(grid * patch,) * 2, mode="bilinear", antialias=True)
    proj = enc.vit.patch_embed.proj
    tokens = F.conv2d(resized, resample_patch_embed(proj.weight, [patch, patch]), proj.bias, stride=patch)
    pos = resample_abs_pos_embed(enc.vit.pos_embed, [grid, grid], [4, 4], num_prefix_tokens=1)
    expected = tokens.flatten(2).transpose(1, 2) + pos[:, 1:]
    assert torch.allclose(enc.embed(images, patch), expected, atol=1e-5)
    assert enc(images, patch_size=patch).shape == (2, 1 + grid * grid, 32)


def test_resampled_projection_of_a_patch_upsampled_image_is_the_original_embedding():
    """FlexiViT's PI-resize: a 2x-larger patch that is the upsampled base patch embeds to the same token."""
    torch.manual_seed(0)
    enc = ViTEncoder(TINY_MODEL).eval()
    images = torch.randn(2, 3, 16, 16)
    patches = images.unfold(2, 4, 4).unfold(3, 4, 4).permute(0, 2, 3, 1, 4, 5).reshape(-1, 3, 4, 4)
    upsampled = F.interpolate(patches, size=(8, 8), mode="bicubic", antialias=True)
    big = upsampled.reshape(2, 4, 4, 3, 8, 8).permute(0, 3, 1, 4, 2, 5).reshape(2, 3, 32, 32)
    proj = enc.vit.patch_embed.proj
    base = F.conv2d(images, proj.weight, proj.bias, stride=4)
    scaled = enc.patch_interpolator(big, proj.weight, proj.bias, (8, 8), is_linear=False)
    assert torch.allclose(scaled, base, atol=1e-4)


def test_one_set_of_weights_trains_at_every_patch_size():
    torch.manual_seed(0)
    enc = ViTEncoder(TINY_MODEL)
    shapes = {k: v.shape for k, v in enc.state_dict().items()}
    out = enc(torch.randn(2, 3, 16, 16), patch_size=8, pool="token")
    # a random projection: the plain sum (or the sum of squares) of a LayerNorm output is constant in its input
    (out * torch.randn_like(out)).sum().backward()
    assert enc.vit.patch_embed.proj.weight.grad.abs().sum() > 0 and enc.vit.pos_embed.grad.abs().sum() > 0
    assert {k: v.shape for k, v in enc.state_dict().items()} == shapes  # the timm export is unchanged
    assert not any("interpolator" in k for k in shapes)


# ---------------------------------------------------------------------------------------------- MAE compressed

def test_mae_identity_setting_is_the_uncompressed_loss():
    torch.manual_seed(0)
    mae = build_method(tiny_mae())
    images = torch.randn(3, 3, 16, 16)
    torch.manual_seed(1)
    plain, _ = mae({"images": images})
    torch.manual_seed(1)
    same, _ = mae({"images": images, "compression": FULL})
    assert torch.equal(plain, same)


def test_mae_token_dropout_composes_with_its_own_mask():
    torch.manual_seed(0)
    mae = build_method(tiny_mae())
    images = torch.randn(3, 3, 16, 16)
    torch.manual_seed(1)
    _, _, full_mask = mae.reconstruct(images)
    torch.manual_seed(1)
    pred, target, mask = mae.reconstruct(images, Setting(keep_ratio=0.5))
    # 16 patches, MAE keeps 4; dropout keeps half of those: 2 visible, the 14 others reconstructed
    assert mask.sum(1).tolist() == [14.0] * 3 and mae.tokens_per_image(Setting(keep_ratio=0.5)) == 2
    assert ((1 - mask) <= (1 - full_mask)).all()  # the visible patches are a subset of MAE's own
    torch.manual_seed(1)
    loss, _ = mae({"images": images, "compression": Setting(keep_ratio=0.5)})
    assert torch.equal(loss, mae_loss(pred, target, mask, True))  # the loss covers every non-visible patch


def test_mae_patch_scaling_runs_on_the_coarser_grid():
    torch.manual_seed(0)
    mae = build_method(tiny_mae())
    images = torch.randn(3, 3, 16, 16)
    pred, target, mask = mae.reconstruct(images, Setting(patch_size=8))
    assert pred.shape == target.shape == (3, 4, 48) and mask.shape == (3, 4)  # 2x2 grid of base-size predictions
    assert torch.allclose(target, patchify(F.interpolate(images, size=(8, 8), mode="bilinear", antialias=True), 4))
    assert mae.flops_per_image(Setting(patch_size=8)) < 0.5 * mae.flops_per_image()


# -------------------------------------------------------------------------------------- D-iGPT compressed

def test_digpt_token_dropout_keeps_a_share_of_every_segment_and_stays_causal(make_cfg, clip_teacher):
    cfg = make_cfg("method.name=digpt", f"method.teacher.path={clip_teacher}", "train.steps=1")
    with pytest.raises(ConfigError, match=r"method 'digpt' does not support patch_scaling"):
        make_cfg("method.name=digpt", f"method.teacher.path={clip_teacher}", "train.steps=1",
                 "compression.patch_scale.start=2")
    torch.manual_seed(0)
    method = build_method(cfg).eval()
    half = Setting(keep_ratio=0.5, seed=3)
    # 4x4 grid, 2x2 segments of 4 patches: half keeps 2 of each segment; 3 input segments -> 6 encoder tokens
    order = method.patch_order(16, torch.device("cpu"), half)
    segments = [set(s) for s in method.segments.tolist()]
    assert order.shape == (16, 8) and method.tokens_per_image(half) == 6 and method.tokens_per_image() == 12
    for row in order.tolist():
        parts = [set(row[i:i + 2]) for i in range(0, 8, 2)]
        owners = [next(j for j, seg in enumerate(segments) if part <= seg) for part in parts]
        assert all(len(part) == 2 for part in parts) and sorted(owners) == [0, 1, 2, 3]
    assert len({tuple(row) for row in order.tolist()}) > 8  # random subsets (and segment orders) per image
    assert method.flops_per_image(half) < 0.6 * method.flops_per_image()
    # the masks follow the shorter segments: changing a patch of input segment j leaves earlier queries alone
    images = torch.randn(16, 3, 16, 16)
    with torch.no_grad():
        base = method.predict(images, order)
        changed = images.clone()
        for b in range(16):
            row, col = divmod(int(order[b, 4]), 4)  # first kept patch of the third input segment
            changed[b, :, row * 4:row * 4 + 4, col * 4:col * 4 + 4] += 1.0
        after = method.predict(changed, order)
    for before, now in zip(base, after):
        assert before.shape == (16, 7, before.shape[-1])  # 6 queries + the class query
        assert torch.equal(now[:, :4], before[:, :4]) and (now[:, 4:] - before[:, 4:]).abs().amax() > 1e-6
    # full tokens through the setting path is the uncompressed forward; the engine's batch key is honoured
    torch.manual_seed(1)
    plain, _ = method({"images": images})
    torch.manual_seed(1)
    same, _ = method({"images": images, "compression": FULL})
    torch.manual_seed(1)
    dropped, _ = method({"images": images, "compression": half})
    assert torch.equal(plain, same) and torch.isfinite(dropped) and dropped != plain
    # the diagnostic: both passes share the segment order (global RNG), so the identity is exact
    diagnostic = GradientDiagnostic(lambda: build_method(cfg), torch.device("cpu"), seed=cfg.run.seed)
    identity = diagnostic(method, {"images": images}, 0, Setting(keep_ratio=1.0, seed=3))
    assert identity["compression/grad_cosine"] == pytest.approx(1.0, abs=1e-12)
    assert diagnostic(method, {"images": images}, 0, half)["compression/grad_cosine"] < 0.999


# --------------------------------------------------------------------------------------- MaPeT compressed

def test_mapet_token_dropout_runs_on_a_random_subset_with_the_visible_share_kept(mapet_cfg):  # noqa: F811
    cfg = mapet_cfg()
    with pytest.raises(ConfigError, match=r"method 'mapet' does not support patch_scaling"):
        mapet_cfg("compression.patch_scale.start=2")
    torch.manual_seed(0)
    method = build_method(cfg).eval()
    half = Setting(keep_ratio=0.5, seed=4)
    # 16 patches, 4 visible: half keeps 8 patches, 2 of them visible, 6 predicted (two streams: 8 + 2 x 6 tokens)
    order = method.patch_order(16, torch.device("cpu"), half)
    assert order.shape == (16, 8) and all(len(set(row)) == 8 for row in order.tolist())
    assert method.visible_of(8) == 2 and method.tokens_per_image(half) == 20 and method.tokens_per_image() == 40
    assert len({tuple(row) for row in order.tolist()}) == 16
    images = torch.randn(16, 3, 16, 16)
    with torch.no_grad():
        base = method.predict(images, order)
        assert base.shape[:2] == (16, 6)
        for r in (2, 5):  # perturb the patch at rank r: predictions of ranks <= r untouched, later ones change
            changed = images.clone()
            for b in range(16):
                row, col = divmod(int(order[b, r]), 4)
                changed[b, :, row * 4:row * 4 + 4, col * 4:col * 4 + 4] += 1.0
            out = method.predict(changed, order)
            assert torch.equal(out[:, :r - 1], base[:, :r - 1])
            assert (out[:, r - 1:] - base[:, r - 1:]).abs().amax() > 1e-6
    torch.manual_seed(1)
    plain, _ = method({"images": images})
    torch.manual_seed(1)
    same, _ = method({"images": images, "compression": FULL})
    assert torch.equal(plain, same)
    diagnostic = GradientDiagnostic(lambda: build_method(cfg), torch.device("cpu"), seed=cfg.run.seed)
    identity = diagnostic(method, {"images": images}, 0, Setting(keep_ratio=1.0, seed=4))
    assert identity["compression/grad_cosine"] == pytest.approx(1.0, abs=1e-12)
    assert diagnostic(method, {"images": images}, 0, half)["compression/grad_cosine"] < 0.999


# ------------------------------------------------------------------------------------------------- diagnostic

def test_gradient_error_by_hand():
    cosine, rel = gradient_error(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]))
    assert cosine == pytest.approx(1 / math.sqrt(2)) and rel == pytest.approx(1 / math.sqrt(2))


def test_diagnostic_is_exact_for_the_identity_and_below_one_for_compression():
    cfg = tiny_mae()
    torch.manual_seed(0)
    mae = build_method(cfg)
    batch = {"images": torch.randn(8, 3, 16, 16)}
    diagnostic = GradientDiagnostic(lambda: build_method(cfg), torch.device("cpu"), seed=cfg.run.seed)
    torch.manual_seed(5)
    rng = torch.get_rng_state()
    identity = diagnostic(mae, batch, 0, Setting(keep_ratio=1.0, seed=9))
    assert identity["compression/grad_cosine"] == pytest.approx(1.0, abs=1e-12)
    assert identity["compression/grad_rel_error"] == 0.0
    for setting in (Setting(keep_ratio=0.5, seed=9), Setting(patch_size=8), Setting(8, 0.5)):
        values = diagnostic(mae, batch, 0, setting)
        assert values["compression/grad_cosine"] < 0.999 and values["compression/grad_rel_error"] > 1e-3
    assert torch.equal(torch.get_rng_state(), rng)  # training's RNG did not move ...
    assert all(p.grad is None for p in mae.parameters())  # ... nor did its gradients
    # the full pass is the training forward with the same weights and RNG state
    assert identity["compression/loss_full"] == pytest.approx(mae(batch, 0)[0].item(), rel=1e-6)


# ------------------------------------------------------------------------------------------------------ engine

def plain_compressed_losses(cfg, steps: int) -> list[float]:
    """The engine's compressed step re-done in plain PyTorch: same init, batches, noise, schedule and seeds."""
    torch.manual_seed(cfg.run.seed)
    method = build_method(cfg)
    peak = cfg.optim.base_lr * cfg.data.batch_size / 256
    opt = torch.optim.AdamW(param_groups(method, cfg.optim.weight_decay), lr=peak, betas=cfg.optim.betas)
    torch.manual_seed(cfg.run.seed)
    loader = StreamLoader(resolve_shards(cfg.data.train).urls, SingleView(cfg.model.img_size, cfg.data.crop_scale,
                          cfg.data.hflip), cfg.data.batch_size, seed=cfg.run.seed,
                          shuffle_buffer=cfg.data.shuffle_buffer)
    schedule = CompressionSchedule(cfg.compression, cfg.model.patch_size, steps)
    out = []
    for step, batch in zip(range(steps), loader):
        set_lr(opt, lr_at(step, peak, steps, cfg.optim.warmup_steps))
        batch = to_device(batch, torch.device("cpu"), cfg.data.mean, cfg.data.std)
        batch["compression"] = schedule.at(step, step_seed(cfg.run.seed, 0, step))
        loss, _ = method(batch, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        out.append(loss.item())
    return out


@pytest.mark.e2e
def test_engine_compresses_by_schedule_and_diagnoses_under_partitioned_zero3(make_cfg, tmp_path):
    steps = 4
    common = [*SCHEDULED, f"train.steps={steps}", "compression.diagnose_every=2"]
    zero3 = make_cfg(*common, f"train.deepspeed={fully_partitioned_zero3(tmp_path)}", name="z3")
    train(zero3, build_method)
    rows = read_metrics(zero3.output_dir)
    # the logged setting of step s is the one its batch was trained with, at progress (s - 1) / steps
    assert [rows[s]["compression/patch_size"] for s in (1, 2, 3, 4)] == [8, 8, 4, 4]
    assert [rows[s]["compression/keep_ratio"] for s in (1, 2, 3, 4)] == pytest.approx([0.5, 0.625, 0.75, 0.875])
    # the diagnostic ran at steps 2 and 4 (all parameters gathered), and left training exactly as without it
    assert sorted(s for s in rows if "compression/grad_cosine" in rows[s]) == [2, 4]
    assert all(-1 < rows[s]["compression/grad_cosine"] < 1 and rows[s]["compression/grad_rel_error"] > 0
               for s in (2, 4))
    reference = plain_compressed_losses(zero3, steps)
    assert [rows[s]["train/loss"] for s in range(1, steps + 1)] == pytest.approx(reference, rel=1e-4, abs=1e-5)
    # ZeRO-1 (unpartitioned weights) measures the same gradient errors
    zero1 = make_cfg(*common, name="z1")
    zero1_weights = train(zero1, build_method).engine.module.state_dict()
    for s in (2, 4):
        assert read_metrics(zero1.output_dir)[s]["compression/grad_cosine"] == pytest.approx(
            rows[s]["compression/grad_cosine"], rel=1e-4)
    # the partitioned checkpoint loads into a plain module (what the sweep measures)
    torch.manual_seed(1)
    plain = build_method(zero3)
    assert load_weights(plain, zero3.output_dir / "checkpoints") == steps
    for name, value in plain.state_dict().items():
        assert torch.allclose(value, zero1_weights[name], atol=1e-5), name


@pytest.mark.e2e
def test_compressed_resume_retraces_the_uninterrupted_run(make_cfg):
    common = [*SCHEDULED, "train.steps=6", "run.ckpt_every=3"]
    straight = make_cfg(*common, "run.keep_last=3", name="straight")
    train(straight, build_method)
    resumed = make_cfg(*common, name="resumed")
    rest, _ = resume_run(resumed, straight.output_dir, 3)
    full = read_metrics(straight.output_dir)
    assert sorted(rest) == [4, 5, 6]
    for key in ("train/loss", "compression/patch_size", "compression/keep_ratio"):
        assert [rest[s][key] for s in rest] == pytest.approx([full[s][key] for s in rest], rel=1e-6), key


# -------------------------------------------------------------------------------------------------------- sweep

@pytest.mark.e2e
def test_sweep_command_prints_the_table_for_a_checkpoint(make_cfg, capsys):
    cfg = make_cfg("train.steps=2", name="sweep")
    train(cfg, build_method)
    args = ["--checkpoint", str(cfg.output_dir / "checkpoints"), "--batches", "3", "--patch-scales", "1,2",
            "--keep-ratios", "1,0.5", "train.steps=2", f"run.output_dir={cfg.output_dir}",
            f"data.train={cfg.data.train}", "data.workers=0", "model.img_size=16", "model.patch_size=4",
            "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "method.decoder_dim=32",
            "method.decoder_depth=1", "method.decoder_heads=2"]
    assert main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    table = {(int(r.split()[0]), float(r.split()[1])): r.split() for r in lines[-4:]}
    assert lines[-5].split() == ["patch", "keep", "tokens", "cost", "cosine", "rel_err", "bias2", "cost*var",
                                 "CA_error"]
    full = table[(4, 1.0)]
    assert full[2:6] == ["4", "1.000", "1.0000", "0.0000"] and float(full[6]) == 0.0
    for key in ((4, 0.5), (8, 1.0)):
        assert float(table[key][3]) < 1.0 and float(table[key][4]) < 1.0 and float(table[key][5]) > 0.0
    assert sum(r[-1] == "*" for r in table.values()) == 1  # the lowest cost-adjusted error is marked
    assert main([*args, "--keep-ratios", "1,0"]) == 2  # a bad grid is a one-line error


def test_piecewise_schedule_holds_each_value_for_its_stretch():
    schedule = ScheduleConfig(kind="piecewise", values=[0.25, 0.5, 1.0])
    assert [schedule_value(schedule, p) for p in (0.0, 0.33, 0.34, 0.7, 1.0)] == [0.25, 0.25, 0.5, 1.0, 1.0]
    with pytest.raises(ConfigError, match=r"compression.keep_ratio.values=\[\]: a list of values for kind piecewise"):
        tiny_mae("compression.keep_ratio.kind=piecewise")
    with pytest.raises(ConfigError, match=r"compression.keep_ratio.values\[1\]=0.0 must be in \(0, 1\]"):
        tiny_mae("compression.keep_ratio.kind=piecewise", "compression.keep_ratio.values=[0.5,0]")


@pytest.mark.e2e
def test_fit_writes_the_lowest_cost_adjusted_error_setting_of_each_stage(make_cfg, capsys):
    cfg = make_cfg("train.steps=4", name="fit")
    out = cfg.output_dir / "mae_fitted.yaml"
    args = ["--fit", "--stages", "4", "--batches", "2", "--patch-scales", "1,2", "--keep-ratios", "1,0.5",
            "--write", str(out), "train.steps=4", f"run.output_dir={cfg.output_dir}", f"data.train={cfg.data.train}",
            "data.workers=0", "data.batch_size=8", "model.img_size=16", "model.patch_size=4", "model.embed_dim=32",
            "model.depth=2", "model.num_heads=2", "method.decoder_dim=32", "method.decoder_depth=1",
            "method.decoder_heads=2", "optim.warmup_steps=1"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    # the starred row (lowest CA_error) of each stage's table is that stage's setting
    starred = [line.split() for line in printed.splitlines() if line.endswith(" *")]
    assert len(starred) == 4 and "stage 3 (75% of training, step 3)" in printed
    written = yaml.safe_load(out.read_text())["compression"]
    assert written["keep_ratio"]["values"] == [float(row[1]) for row in starred]
    assert written["patch_scale"]["values"] == [int(row[0]) / 4 for row in starred]
    assert len(list((cfg.output_dir / "fit_run" / "checkpoints").glob("step_*"))) == 4  # the short run's quarters
    # it stacks on a run config as any shipped schedule
    stacked = load_config([REPO / "train/configs/mae_demo.yaml", out], ["train.steps=8"])
    schedule = CompressionSchedule(stacked.compression, stacked.model.patch_size, 8)
    assert [schedule.at(s).keep_ratio for s in (0, 2, 4, 6)] == written["keep_ratio"]["values"]


def test_measured_cost_is_relative_to_full_tokens():
    from train.compression.diagnostic import measured_cost

    torch.manual_seed(0)
    mae = build_method(tiny_mae())
    costs = measured_cost(mae, {"images": torch.randn(8, 3, 16, 16)}, [FULL, Setting(keep_ratio=0.25)])
    assert 0.1 < costs[0] < 10 and costs[1] > 0
    assert all(p.grad is None for p in mae.parameters())


# --------------------------------------------------------------------------------------------------- benchmarks

def test_expected_wall_clock_of_a_schedule():
    from benchmarks.compression import expected_time, flops_speedup, stage_settings

    cfg = CompressionConfig(patch_scale=ScheduleConfig("step", 2.0, 1.0, until=0.5))
    schedule = CompressionSchedule(cfg, base_patch_size=4, total_steps=100)
    stages = stage_settings(schedule, 4)
    assert [s.patch_size for s in stages] == [8, 8, None, None]
    # half the run at 1 s/step, half at 3 s/step
    assert expected_time([1.0, 1.0, 3.0, 3.0], 100) == pytest.approx(200.0)
    torch.manual_seed(0)
    mae = build_method(tiny_mae())
    expected = 2 * mae.flops_per_image() / (mae.flops_per_image() + mae.flops_per_image(Setting(patch_size=8)))
    assert flops_speedup(mae, schedule, 100) == pytest.approx(expected)


def test_speedup_to_equal_accuracy_by_hand():
    from benchmarks.compression import speedup_to_accuracy

    # the target 60 is crossed between budgets 0.5 (55) and 1 (70): at 0.5 + 0.5 x 5 / 15
    assert speedup_to_accuracy([0.25, 0.5, 1.0], [40.0, 55.0, 70.0], 60.0) == (pytest.approx(2 / 3), "interpolated")
    assert speedup_to_accuracy([0.25, 0.5, 1.0], [61.0, 65.0, 70.0], 60.0) == (0.25, "at most")
    assert speedup_to_accuracy([0.25, 0.5, 1.0], [40.0, 50.0, 59.0], 60.0) == (None, "not reached")


@pytest.mark.e2e
def test_compute_budget_picks_the_steps_whose_flops_equal_it(make_cfg):
    from train.compression import run_flops, steps_for_budget

    torch.manual_seed(0)
    cfg = make_cfg(*SCHEDULED, "train.steps=8")
    mae = build_method(cfg)
    full = run_flops(mae.flops_per_image, CompressionConfig(), 4, 8, 8)
    assert full == 8 * 8 * mae.flops_per_image()
    assert steps_for_budget(mae.flops_per_image, CompressionConfig(), 4, 8, 0.5 * full) == 4
    steps = steps_for_budget(mae.flops_per_image, cfg.compression, 4, 8, full)
    spent = [run_flops(mae.flops_per_image, cfg.compression, 4, t, 8) for t in (steps - 1, steps, steps + 1)]
    assert steps > 8 and abs(spent[1] - full) == min(abs(f - full) for f in spent)  # the closest to the budget
    # the engine runs that many steps, on the schedule stretched over them
    with pytest.raises(ConfigError, match="set at most one"):
        make_cfg("train.steps=8", "train.budget=0.5", "train.budget_flops=1e9")
    budgeted = make_cfg(*SCHEDULED, "train.steps=8", "train.budget=1.0", "run.ckpt_every=100", name="budget")
    assert train(budgeted, build_method).steps == steps
    rows = read_metrics(budgeted.output_dir)
    assert sorted(rows) == list(range(1, steps + 1)) and rows[steps]["compression/patch_size"] == 4
    assert rows[1]["compression/keep_ratio"] == 0.5


@pytest.mark.e2e
def test_benchmark_speed_and_learning_check_run(make_cfg, capsys, monkeypatch):
    from benchmarks.compression import main as bench

    # the k-NN / probe evaluation has its own tests; here a stand-in keeps the short runs cheap. Call order:
    # budget 0.5 full, compressed, budget 1 full, compressed
    scores = iter([{"knn_top1": 50.0, "linear_top1": 40.0}, {"knn_top1": 55.0, "linear_top1": 30.0},
                   {"knn_top1": 60.0, "linear_top1": 50.0}, {"knn_top1": 70.0, "linear_top1": 45.0}])
    monkeypatch.setattr("benchmarks.compression.evaluate_encoder", lambda *args, **kwargs: next(scores))

    cfg = make_cfg(*SCHEDULED, "train.steps=4", name="bench")
    overrides = ["model.img_size=16", "model.patch_size=4", "model.embed_dim=32", "model.depth=2",
                 "model.num_heads=2", "method.decoder_dim=32", "method.decoder_depth=1", "method.decoder_heads=2",
                 "data.batch_size=8", "data.workers=0", "data.shuffle_buffer=64", "train.steps=4",
                 "run.log_every=1", "eval.probe_epochs=2", f"data.train={cfg.data.train}",
                 f"data.val={cfg.data.val}", f"run.output_dir={cfg.output_dir}", *SCHEDULED]
    assert bench(["speed", "--steps", "1", "--warmup", "0", "--points", "2", *overrides]) == 0
    speed = json.loads((cfg.output_dir / "compression_speed.json").read_text())
    assert [s["patch_size"] for s in speed["stages"]] == [4, 8, 4] and speed["speedup"] > 0
    assert bench(["learn", "--budgets", "0.5,1", "--seeds", "0", *overrides]) == 0
    check = json.loads((cfg.output_dir / "learning_check.json").read_text())
    steps = {(r["run"], r["budget"]): r["steps"] for r in check["runs"]}
    assert steps[("full", 0.5)] == 2 and steps[("full", 1.0)] == 4  # equal compute: more compressed steps
    assert steps[("compressed", 0.5)] > 2 and steps[("compressed", 1.0)] > 4
    full_run, compressed_run = (cfg.output_dir / sub / "budget1_seed0" for sub in ("full", "compressed"))
    assert not any("compression/keep_ratio" in r for r in read_metrics(full_run).values())
    assert read_metrics(compressed_run)[1]["compression/keep_ratio"] == 0.5
    knn = check["speedup_to_equal_accuracy"]["knn_top1"]
    assert knn["per_seed"][0]["budget"] == pytest.approx(2 / 3) and knn["mean_std"][0] == pytest.approx(1.5)
    out = capsys.readouterr().out
    assert "speedup to the uncompressed knn_top1 at budget 1: 1.50x" in out
    assert "speedup to the uncompressed linear_top1 at budget 1: none (reached by 0/1 seeds)" in out


@pytest.mark.e2e
def test_two_ranks_zero3_compressed_with_diagnostic(tmp_path, digits_dir):
    """Both ranks take part in the diagnostic (parameters gathered from two partitions, gradients averaged)."""
    proc = subprocess.run(command(tmp_path, digits_dir, *SCHEDULED, "train.steps=2", "compression.diagnose_every=1",
                                  f"train.deepspeed={fully_partitioned_zero3(tmp_path)}", launcher=torchrun(2)),
                          cwd=tmp_path, env=run_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(tmp_path / "run")
    assert sorted(rows) == [1, 2] and [rows[s]["compression/patch_size"] for s in (1, 2)] == [8, 4]
    assert all(-1 < rows[s]["compression/grad_cosine"] < 1 for s in (1, 2))
