import json

import pytest
import torch
from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

from data_pipeline.augment import SingleView
from data_pipeline.batch import to_device
from data_pipeline.stream import StreamLoader, resolve_shards
from helpers import fully_partitioned_zero3, losses, plain_pytorch_losses, read_metrics, resume_run
from train import checkpoint
from train.config import ConfigError
from train.distributed import init_distributed
from train.engine import build_engine, deepspeed_config, train
from train.methods import build_method
from train.optim import lr_at, param_groups, set_lr


@pytest.mark.e2e
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_match_plain_pytorch_and_learn(make_cfg, tmp_path, stage):
    steps = 12
    ds = fully_partitioned_zero3(tmp_path) if stage == 3 else f"ds_configs/zero{stage}.json"
    cfg = make_cfg(f"train.steps={steps}", f"train.deepspeed={ds}", name=f"z{stage}")
    result = train(cfg, build_method)
    assert result.steps == steps and result.last_checkpoint == "step_00000012"
    ours = losses(cfg.output_dir)
    reference = plain_pytorch_losses(cfg, steps)
    assert ours == pytest.approx(reference, rel=1e-4, abs=1e-5)
    assert sum(ours[-3:]) < sum(ours[:3]) * 0.9  # it learns


@pytest.mark.e2e
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16_engines_accumulate_and_all_reduce_gradients_in_fp32(make_cfg, stage):
    """The shipped ZeRO configs under bf16: what DeepSpeed's engine and optimizer actually use (stage 1 with
    fp32 accumulation is DeepSpeed's BF16_Optimizer, which keeps fp32 gradient buffers)."""
    init_distributed()
    cfg = make_cfg("train.steps=1", "train.precision=bf16", f"train.deepspeed=ds_configs/zero{stage}.json")
    engine, *_ = build_engine(cfg, build_method, world_size=1)
    assert engine.get_data_types() == (torch.bfloat16, torch.float32)
    assert engine.communication_data_type == torch.float32  # what the gradient all-reduce casts to
    opt = engine.optimizer
    if stage == 1:
        assert isinstance(opt, BF16_Optimizer) and opt.grad_acc_dtype == torch.float32
        assert all(buf.dtype == torch.float32 for buf in opt.fp32_groups_gradients_flat)
    else:
        assert (opt.gradient_accumulation_dtype, opt.communication_data_type) == (torch.float32, torch.float32)


@pytest.mark.e2e
def test_bf16_zero1_resume_continues_the_same_curve(make_cfg):
    """ZeRO-1 in bf16 runs DeepSpeed's BF16_Optimizer (fp32 gradients): its checkpoints resume exactly."""
    common = ["train.steps=4", "run.ckpt_every=2", "train.precision=bf16"]
    straight = make_cfg(*common, "run.keep_last=3", name="straight")
    train(straight, build_method)
    full = losses(straight.output_dir)
    rows, _ = resume_run(make_cfg(*common, name="resumed"), straight.output_dir, 2)
    assert [rows[s]["train/loss"] for s in sorted(rows)] == pytest.approx(full[2:], rel=1e-6, abs=1e-7)


@pytest.mark.e2e
def test_resume_continues_the_same_curve(make_cfg, tmp_path):
    straight = make_cfg("train.steps=8", "run.ckpt_every=4", "run.keep_last=3", name="straight")
    train(straight, build_method)
    full = losses(straight.output_dir)
    assert len(full) == 8
    # a second run that only has the step-4 checkpoint resumes from it ("auto") and must retrace steps 5..8
    resumed = make_cfg("train.steps=8", "run.ckpt_every=4", name="resumed")
    rows, result = resume_run(resumed, straight.output_dir, 4)
    assert result.steps == 8
    assert sorted(rows) == [5, 6, 7, 8]
    assert [rows[s]["train/loss"] for s in range(5, 9)] == pytest.approx(full[4:], rel=1e-6, abs=1e-7)
    assert [rows[s]["train/lr"] for s in range(5, 9)] == pytest.approx(
        [read_metrics(straight.output_dir)[s]["train/lr"] for s in range(5, 9)])


@pytest.mark.e2e
def test_gradient_accumulation_is_a_bigger_batch(make_cfg):
    cfg = make_cfg("train.steps=2", "train.global_batch_size=16", name="accum")
    ds = deepspeed_config(cfg, world_size=1)
    assert (ds["train_batch_size"], ds["gradient_accumulation_steps"]) == (16, 2)
    result = train(cfg, build_method)
    rows = read_metrics(cfg.output_dir)
    assert result.steps == 2 and rows[2]["data/samples_seen"] == 2 * 16


def test_find_resume_tag_none_latest_and_half_written(tmp_path):
    ckpts = tmp_path / "checkpoints"
    assert checkpoint.find_resume_tag(ckpts) is None  # no directory at all
    for step in (100, 200):
        (ckpts / checkpoint.tag_for(step)).mkdir(parents=True)
        (ckpts / checkpoint.tag_for(step) / checkpoint.MARKER).write_text(json.dumps({"step": step}))
    (ckpts / "latest").write_text("step_00000200")
    assert checkpoint.find_resume_tag(ckpts) == "step_00000200"
    # a crash while writing step 300: its directory exists without the marker and latest may point at it
    (ckpts / "step_00000300").mkdir()
    (ckpts / "latest").write_text("step_00000300")
    assert checkpoint.find_resume_tag(ckpts) == "step_00000200"
    (ckpts / "latest").unlink()
    assert checkpoint.find_resume_tag(ckpts) == "step_00000200"
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        checkpoint.resolve_resume(str(ckpts / "step_00000300"), ckpts)


def test_pruning_and_overwriting_a_tag_remove_its_universal_form(tmp_path):
    """`save` prunes beyond run.keep_last with each tag's universal form (and staging folder) beside it, and drops
    the universal form of a tag it writes again: to_universal trusts its marker, so an elastic resume would load
    the old weights."""
    ckpts = tmp_path / "checkpoints"

    class Engine:  # DeepSpeed's save: the tag's folder
        def save_checkpoint(self, save_dir, tag, client_state, save_latest):
            (ckpts / tag).mkdir(parents=True, exist_ok=True)

    def universal(step):
        tag = checkpoint.tag_for(step)
        (ckpts / f"{tag}_universal").mkdir()
        (ckpts / f"{tag}_universal" / checkpoint.MARKER).write_text("{}")
        (ckpts / f".{tag}_universal.in").mkdir()
        (ckpts / f".{tag}_universal.failed").write_text("an earlier attempt")

    def save(step):
        return checkpoint.save(Engine(), ckpts, step, {}, {}, rank=0, keep_last=2)

    save(1), universal(1), save(2), universal(2)
    save(3)  # prunes step 1 and its universal form
    assert sorted(p.name for p in ckpts.iterdir()) == [".step_00000002_universal.failed", ".step_00000002_universal.in",
                                                       "latest", "step_00000002", "step_00000002_universal",
                                                       "step_00000003"]
    save(2)  # written again: the old universal form goes
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_00000002", "step_00000003"]


@pytest.mark.e2e
def test_resume_from_other_architecture_is_rejected(make_cfg):
    first = make_cfg("train.steps=1", name="arch")
    train(first, build_method)
    other = make_cfg("train.steps=2", "model.depth=3", name="arch")
    with pytest.raises(ConfigError, match=r"run.resume: .*step_00000001 was written by method mae with model"):
        train(other, build_method)


def test_resume_across_the_zero_3_file_layout_is_refused_and_zero_0_needs_no_conversion(make_cfg, tmp_path):
    """ZeRO-0, ZeRO-1/2 and ZeRO-3 write different files: a resume into another of them is one line before any
    model is built. A ZeRO-0 checkpoint of another world size loads as it is; a partitioned one needs its universal
    form."""
    from train.engine.setup import architecture, check_resume, needs_universal

    cfg = make_cfg("train.steps=4", "train.deepspeed=ds_configs/zero2.json")
    tag = tmp_path / "checkpoints" / "step_00000002"
    tag.mkdir(parents=True)
    (tag / checkpoint.MARKER).write_text(json.dumps({"step": 2, "model": architecture(cfg), "method": "mae"}))
    for name in ("zero_pp_rank_0_mp_rank_00_model_states.pt", "rank_00000.pt", "rank_00001.pt"):
        (tag / name).write_bytes(b"")
    with pytest.raises(ConfigError, match=r"step_00000002 was written with ZeRO-3 and this run uses ZeRO-1/2 "
                                          r"\(ds_configs/zero2.json\); their checkpoint files differ: resume with a "
                                          "ZeRO-3 config"):
        check_resume(cfg, tag.parent, tag.name, 2)
    assert needs_universal(tag, 1) and not needs_universal(tag, 2)
    (tag / "zero_pp_rank_0_mp_rank_00_model_states.pt").rename(tag / "mp_rank_00_model_states.pt")  # ZeRO-0
    assert not needs_universal(tag, 1)
    with pytest.raises(ConfigError, match="was written with ZeRO-0 and this run uses ZeRO-1/2"):
        check_resume(cfg, tag.parent, tag.name, 2)


@pytest.mark.e2e
def test_non_finite_loss_stops_with_a_clear_message(make_cfg, monkeypatch):
    from train.methods.mae import MAE

    original = MAE.forward

    def poisoned(self, batch, step=0):
        loss, report = original(self, batch, step)
        if step >= 2:
            loss = loss * float("nan")
            report = {"loss": loss.detach()}
        return loss, report

    monkeypatch.setattr(MAE, "forward", poisoned)
    cfg = make_cfg("train.steps=6", "run.ckpt_every=2", name="nan")
    with pytest.raises(FloatingPointError, match="non-finite loss at step 3 .* last good checkpoint is step_00000002"):
        train(cfg, build_method)
    assert checkpoint.find_resume_tag(cfg.output_dir / "checkpoints") == "step_00000002"


def clip_by_hand(grad: torch.Tensor, max_norm: float) -> torch.Tensor:
    """DINO's utils.clip_gradients for one parameter, written out."""
    norm = grad.pow(2).sum().sqrt()
    coef = max_norm / (norm + 1e-6)
    return grad * coef if coef < 1 else grad


@pytest.mark.e2e
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_per_parameter_clipping_is_dinos_under_every_zero_stage(make_cfg, tmp_path, stage):
    """optim.clip_per_param: each parameter's (rank-averaged) gradient clipped to norm clip_grad before the step.
    With SGD the update is the clipped gradient itself, so the weights after 3 steps show it exactly."""
    from train.models.ema import gathered

    steps, max_norm = 3, 0.05
    ds = fully_partitioned_zero3(tmp_path) if stage == 3 else f"ds_configs/zero{stage}.json"
    cfg = make_cfg(f"train.steps={steps}", "optim.optimizer=sgd", "optim.momentum=0", "optim.base_lr=10",
                   "optim.weight_decay=0", f"optim.clip_grad={max_norm}", "optim.clip_per_param=true",
                   "train.precision=fp32", f"train.deepspeed={ds}", name=f"clip{stage}")
    module = train(cfg, build_method).engine.module
    with gathered(list(module.parameters())):
        ours = {n: p.detach().clone() for n, p in module.named_parameters()}

    torch.manual_seed(cfg.run.seed)
    method = build_method(cfg)
    initial = {n: p.detach().clone() for n, p in method.named_parameters()}
    peak = cfg.optim.base_lr * cfg.data.batch_size / 256
    opt = torch.optim.SGD(param_groups(method, 0.0), lr=peak)
    torch.manual_seed(cfg.run.seed)
    loader = StreamLoader(resolve_shards(cfg.data.train).urls, SingleView(cfg.model.img_size, cfg.data.crop_scale,
                          cfg.data.hflip), cfg.data.batch_size, seed=cfg.run.seed,
                          shuffle_buffer=cfg.data.shuffle_buffer)
    norms = []
    for step, batch in zip(range(steps), loader):
        set_lr(opt, lr_at(step, peak, steps, cfg.optim.warmup_steps))
        loss, _ = method(to_device(batch, torch.device("cpu"), cfg.data.mean, cfg.data.std), step)
        opt.zero_grad()
        loss.backward()
        for p in method.parameters():
            if p.grad is not None:
                norms.append(float(p.grad.norm()))
                p.grad = clip_by_hand(p.grad, max_norm)
        opt.step()
    assert min(norms) < max_norm < max(norms)  # some gradients clipped, some not
    for name, p in method.named_parameters():
        moved, expected = ours[name] - initial[name], p.detach() - initial[name]
        assert torch.allclose(moved, expected, rtol=1e-4, atol=1e-7), name
    assert any((p.detach() - initial[n]).norm() > 0.1 * max_norm for n, p in method.named_parameters())


@pytest.mark.e2e
def test_epoch_mode_resume_with_other_data_workers_finishes_the_epoch_first(make_cfg, caplog):
    """The same world size with another data.workers is another stream layout: the engine hands the stream every
    old rank's state, and the new readers begin with the carried-over rest of the epoch."""
    first = make_cfg("train.steps=2", "data.resampled=false", name="workers")
    train(first, build_method)
    more = make_cfg("train.steps=3", "data.resampled=false", "data.workers=2", name="workers")
    with caplog.at_level("WARNING", logger="data_pipeline.stream"):
        assert train(more, build_method).steps == 3
    assert "data stream: 1 ranks x 2 readers over 8 shards now vs 1 x 1 in the checkpoint; the rest of the epoch " \
           "is split over the new readers (segment 1)" in caplog.text
    saved = torch.load(more.output_dir / "checkpoints" / "step_00000003" / "rank_00000.pt", weights_only=False)
    assert saved["data"]["readers"] == 2 and saved["data"]["carried"]["segment"] == 1
