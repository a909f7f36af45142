"""D-iGPT: segments and block-causal masks, causality of the predictions, target alignment, the
feature loss, and training through the engine under ZeRO-1 and fully partitioned ZeRO-3."""

import pytest
import torch

from helpers import fully_partitioned_zero3, read_metrics
from train.config import ConfigError
from train.engine import train
from train.methods import build_method
from train.methods.digpt import causal_masks, digpt_targets, feature_loss, segment_patches


@pytest.fixture
def digpt_cfg(make_cfg, clip_teacher):
    def make(*overrides, name="digpt"):
        return make_cfg("method.name=digpt", f"method.teacher.path={clip_teacher}", "train.steps=1", *overrides,
                        name=name)
    return make


def test_segments_and_block_causal_masks():
    assert segment_patches(4, 2).tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    assert segment_patches(4, 4).flatten().tolist() == list(range(16))  # one patch per segment: raster iGPT
    encoder, decoder = causal_masks(num_input_segments=3, segment_len=2)
    segment = [None, 0, 0, 1, 1, 2, 2]  # encoder tokens: class token, then the input patches
    for i, row in enumerate(segment):
        for j, col in enumerate(segment):
            # the class token sees everything and is seen by nothing else; patches see their segment and earlier ones
            expected = row is None or (col is not None and col <= row)
            assert encoder[i, j] == expected, (i, j)
    queries = [0, 0, 1, 1, 2, 2, None]  # one query per input patch's context, the class query last
    assert decoder.shape == (7 + 7, 7 + 7)
    assert torch.equal(decoder[:7, :7], encoder) and not decoder[:7, 7:].any()  # encoder tokens never see queries
    for i, row in enumerate(queries):
        for j, col in enumerate(segment + queries):
            assert decoder[7 + i, j] == (row is None or (col is not None and col <= row)), (i, j)


def test_targets_are_the_next_and_the_visible_segments_teacher_features():
    # teacher features that name their patch: feature of patch n = (n, 10 n); class token = (-1, -1)
    patches = torch.stack([torch.arange(16.0), 10 * torch.arange(16.0)], dim=-1)[None]
    cls = torch.tensor([[-1.0, -1.0]])
    segments = segment_patches(4, 2)
    order = segments[torch.tensor([2, 0, 3, 1])].flatten()[None]  # segments 2, 0, 3, 1
    target_next, target_visible = digpt_targets(cls, patches, order, segment_len=4, num_input=12)
    assert target_next[0, :, 0].tolist() == [0, 1, 4, 5, 10, 11, 14, 15, 2, 3, 6, 7, -1]
    assert target_visible[0, :, 0].tolist() == [8, 9, 12, 13, 0, 1, 4, 5, 10, 11, 14, 15, -1]
    assert torch.equal(target_next[0, :12, 1], 10 * target_next[0, :12, 0])


def test_a_later_patch_never_changes_an_earlier_prediction(digpt_cfg):
    torch.manual_seed(0)
    method = build_method(digpt_cfg("method.order=raster")).eval()
    images = torch.randn(2, 3, 16, 16)
    order = method.patch_order(2, images.device)
    assert order[0].tolist() == segment_patches(4, 2).flatten().tolist()
    with torch.no_grad():
        base = method.predict(images, order)
        for segment in range(4):
            changed = images.clone()
            patch = int(method.segments[segment, 3])  # a patch of this segment
            row, col = divmod(patch, 4)
            changed[:, :, row * 4:row * 4 + 4, col * 4:col * 4 + 4] += torch.randn(3, 4, 4)
            for before, after in zip(base, method.predict(changed, order)):
                earlier = segment * 4  # queries of the segments before this one (context < segment)
                assert torch.equal(after[:, :earlier], before[:, :earlier])
                if segment < 3:  # the last segment is never input: it only provides targets
                    assert (after[:, earlier:] - before[:, earlier:]).abs().amax(-1).min() > 1e-6
                else:
                    assert torch.equal(after, before)


def test_random_segment_order_per_image(digpt_cfg):
    torch.manual_seed(0)
    method = build_method(digpt_cfg())
    order = method.patch_order(64, torch.device("cpu"))
    segments = {tuple(s) for s in method.segments.tolist()}
    firsts = set()
    for row in order.tolist():
        assert sorted(row) == list(range(16))
        assert {tuple(row[i:i + 4]) for i in range(0, 16, 4)} == segments  # whole segments, in some order
        firsts.add(tuple(row[:4]))
    assert len(firsts) == 4


def test_feature_loss_by_hand():
    pred = torch.tensor([[[1.0, 0.0], [3.0, 4.0]]])
    target = torch.tensor([[[0.0, 2.0], [6.0, 8.0]]])
    loss, cosine = feature_loss(pred, target, "cosine")
    assert cosine.item() == pytest.approx(0.5) and loss.item() == pytest.approx(2 - 2 * 0.5)
    # smooth L1 against the per-token layer-normalised target: (0, 2) -> (-1, 1), (6, 8) -> (-1, 1)
    loss, _ = feature_loss(pred, target, "smooth_l1")
    normalised = torch.tensor([-1.0, 1.0, -1.0, 1.0]) * (1 / (1 + 1e-5)) ** 0.5
    diffs = (pred.flatten() - normalised).abs()
    by_hand = torch.where(diffs < 1, 0.5 * diffs**2, diffs - 0.5).mean()
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)


def test_config_errors(digpt_cfg):
    with pytest.raises(ConfigError, match=r"method.segments=3 must be >= 2 and divide the 4x4 patch grid"):
        digpt_cfg("method.segments=3")
    with pytest.raises(ConfigError, match=r"method.order='spiral'"):
        digpt_cfg("method.order=spiral")
    with pytest.raises(ConfigError, match=r"unknown config key 'method.teacher.paht' \(did you mean"):
        digpt_cfg("method.teacher.paht=x")


@pytest.mark.e2e
def test_digpt_trains_the_same_under_zero1_and_partitioned_zero3(digpt_cfg, tmp_path):
    runs = {}
    for stage, ds in ((1, "ds_configs/zero1.json"), (3, fully_partitioned_zero3(tmp_path))):
        cfg = digpt_cfg("train.steps=10", f"train.deepspeed={ds}", name=f"digpt_z{stage}")
        result = train(cfg, build_method)
        runs[stage] = read_metrics(cfg.output_dir)
        assert not any(n.startswith("teacher") for n, _ in result.engine.module.named_parameters())
        if stage == 1:
            saved = torch.load(cfg.output_dir / "checkpoints" / "step_00000010" / "mp_rank_00_model_states.pt",
                               weights_only=False)["module"]
            assert any(k.startswith("next_decoder.") for k in saved) and not any("teacher" in k for k in saved)
    losses = {stage: [runs[stage][s]["train/loss"] for s in sorted(runs[stage])] for stage in runs}
    assert losses[3] == pytest.approx(losses[1], rel=1e-4, abs=1e-5)
    assert sum(losses[1][-3:]) < sum(losses[1][:3]) * 0.9  # it learns
    last = runs[1][10]
    assert last["train/loss"] == pytest.approx(last["train/loss_next"] + last["train/loss_visible"], rel=1e-5)
    assert last["train/loss_next"] == pytest.approx(2 - 2 * last["train/cos_next"], rel=1e-4)


@pytest.mark.e2e
def test_bf16_student_with_an_fp32_teacher(digpt_cfg):
    result = train(digpt_cfg("train.steps=2", "train.precision=bf16", name="digpt_bf16"), build_method)
    method = result.engine.module
    assert method.next_decoder.pred.weight.dtype == torch.bfloat16  # DeepSpeed cast the student ...
    assert all(p.dtype == torch.float32 for p in method.teacher.model.parameters())  # ... not the teacher
    assert torch.isfinite(torch.tensor(read_metrics(result.output_dir)[2]["train/loss"]))
