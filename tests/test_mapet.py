"""MaPeT: two-stream attention masks, no leak of a predicted patch's content, the k-CLIP loss, the
codebook command, and training through the engine under ZeRO-1 and fully partitioned ZeRO-3."""

import json
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

from data_pipeline.augment import CentreSquareJitterView
from helpers import fully_partitioned_zero3, read_metrics
from train.config import ConfigError
from train.engine import train
from train.eval.export import export
from train.methods import build_method
from train.methods.mapet import mapet_loss, two_stream_mask
from train.models.ema import gathered
from train.models.vit import ViTEncoder
from train.teachers.kmeans import assign


def brute_force_mask(order: list[int], num_visible: int) -> torch.Tensor:
    """The two-stream rule written out token by token for one permutation `order` of the patches."""
    rank = {patch: r for r, patch in enumerate(order)}
    predicted = order[num_visible:]
    tokens = [("cls", None)] + [("content", p) for p in order] + [("mask", p) for p in predicted] + \
             [("query", p) for p in predicted]

    def visible(patch):
        return patch is None or rank[patch] < num_visible

    def sees(row, col):
        (row_kind, r), (col_kind, c) = row, col
        if col_kind == "query":
            return False  # keys and values come from the content stream only
        if row_kind in ("cls", "content"):
            if col_kind == "mask":  # the position of every patch whose content it does not see yet
                return r is None or rank[c] > rank[r]
            return visible(c) or (r is not None and rank[c] <= rank[r])  # itself and earlier patches
        if row_kind == "mask":
            return col_kind == "mask" or visible(c)
        if col_kind == "mask":  # query: the positions from its own on
            return rank[c] >= rank[r]
        return visible(c) or rank[c] < rank[r]  # query: earlier content, never its own

    return torch.tensor([[sees(row, col) for col in tokens] for row in tokens])


def test_two_stream_mask_matches_the_brute_force_definition():
    order, num_visible = [3, 0, 5, 1, 4, 2], 2
    mask = two_stream_mask(6, num_visible)
    assert mask.shape == (1 + 6 + 4 + 4, 1 + 6 + 4 + 4)
    assert torch.equal(mask, brute_force_mask(order, num_visible))
    # every content and query token sees each position of the image exactly once: as content or as a mask token
    content, masks = mask[:, 1:7], mask[:, 7:11]
    seen_as_content = content[:, num_visible:]  # the predicted patches' content columns, in the same order
    rows = list(range(1, 7)) + list(range(11, 15))
    assert torch.equal(seen_as_content[rows] ^ masks[rows], torch.ones(len(rows), 4, dtype=torch.bool))
    assert mask[1:7, 1:7].diagonal().all()  # a content token sees itself
    assert not mask[11:15, 7 - 4:7].diagonal().any()  # a query token never sees its own content


def test_encoder_extra_tokens_carry_their_positions():
    from train.config import ModelConfig

    torch.manual_seed(0)
    encoder = ViTEncoder(ModelConfig(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2)).eval()
    images = torch.randn(2, 3, 16, 16)
    ids = torch.tensor([[5, 2], [0, 15]])
    token = torch.randn(1, 1, 32)
    # attending only to themselves, extra tokens are position-embedded tokens through the blocks
    mask = torch.eye(1 + 16 + 2, dtype=torch.bool)
    out = encoder(images, attn_mask=mask, extra_tokens=token.expand(2, 2, -1), extra_ids=ids)
    assert out.shape == (2, 1 + 16 + 2, 32)
    x = token + encoder.vit.pos_embed[0, 1:][ids]
    expected = encoder.vit.norm(encoder.vit.blocks[0](x, attn_mask=torch.eye(2, dtype=torch.bool)))
    assert torch.allclose(out[:, 17:], expected, atol=1e-5)
    # activation checkpointing under a mask gives the same values and gradients
    encoder.train()
    grads = []
    for checkpointing in (False, True):
        encoder.vit.set_grad_checkpointing(checkpointing)
        encoder.zero_grad()
        encoder(images, attn_mask=mask, extra_tokens=token.expand(2, 2, -1), extra_ids=ids).square().sum().backward()
        grads.append(encoder.vit.blocks[0].attn.qkv.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_a_prediction_never_sees_its_own_or_later_content(mapet_cfg):
    torch.manual_seed(0)
    method = build_method(mapet_cfg()).eval()
    visible = method.num_visible
    images = torch.randn(2, 3, 16, 16)
    order = torch.stack([torch.randperm(16), torch.randperm(16)])
    with torch.no_grad():
        base = method.predict(images, order)
        for r in (visible, visible + 5, 15):  # perturb the patch at rank r of each image
            changed = images.clone()
            for b in range(2):
                row, col = divmod(int(order[b, r]), 4)
                changed[b, :, row * 4:row * 4 + 4, col * 4:col * 4 + 4] += torch.randn(3, 4, 4)
            out = method.predict(changed, order)
            q = r - visible  # predictions of ranks <= r are untouched, the later ones see the new content
            assert torch.equal(out[:, :q + 1], base[:, :q + 1])
            if r < 15:
                assert (out[:, q + 1:] - base[:, q + 1:]).abs().amax(-1).min() > 1e-6
        changed = images.clone()
        row, col = divmod(int(order[0, 0]), 4)  # a visible patch is seen by every prediction
        changed[0, :, row * 4:row * 4 + 4, col * 4:col * 4 + 4] += 1.0
        assert (method.predict(changed, order)[0] - base[0]).abs().amax(-1).min() > 1e-6


def test_loss_is_cross_entropy_over_codes_of_the_predicted_positions(mapet_cfg):
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 3.0]]])
    targets = torch.tensor([[0, 1]])
    e = math.e
    by_hand = (-math.log(e**2 / (e**2 + 2)) - math.log(e / (1 + e + e**3))) / 2
    assert mapet_loss(logits, targets).item() == pytest.approx(by_hand, rel=1e-6)

    torch.manual_seed(0)
    method = build_method(mapet_cfg())
    images = torch.randn(3, 3, 16, 16)
    codes = torch.randint(0, 16, (3, 16))
    method.tokenizer = lambda x: codes  # fixed targets (the real tokenizer is tested below)
    torch.manual_seed(7)
    loss, report = method({"images": images})
    torch.manual_seed(7)
    order = torch.argsort(torch.rand(3, 16), dim=1)
    logits = method.predict(images, order)
    targets = codes.gather(1, order[:, method.num_visible:])
    assert logits.shape == (3, 12, 16)
    assert loss.item() == pytest.approx(F.cross_entropy(logits.flatten(0, 1), targets.flatten()).item(), rel=1e-6)
    assert report["token_acc"].item() == pytest.approx((logits.argmax(-1) == targets).float().mean().item())
    # the codes of the visible patches play no part; the codes of predicted ones do
    for rank, moves in ((0, False), (method.num_visible - 1, False), (method.num_visible, True), (15, True)):
        other = codes.clone()
        other[0, order[0, rank]] = (codes[0, order[0, rank]] + 1) % 16
        method.tokenizer = lambda x, other=other: other
        torch.manual_seed(7)
        assert (method({"images": images})[0].item() != loss.item()) == moves


def test_codebook_command_and_tokenizer(mapet_cfg, codebook):
    saved = torch.load(codebook, weights_only=True)
    assert saved["centroids"].shape == (16, 24) and saved["grid"] == [4, 4]
    assert 3600 <= saved["num_patches"] <= 4000  # a uniform random subset of about --max-patches
    assert saved["codes_used"] == 16 and saved["teacher"]["num_heads"] == 2
    method = build_method(mapet_cfg())
    images = torch.randn(2, 3, 16, 16)
    codes = method.tokenizer(images)
    _, features = method.tokenizer.teacher(images)
    distances = torch.cdist(features, saved["centroids"][None].expand(2, -1, -1))
    assert codes.shape == (2, 16) and torch.equal(codes, distances.argmin(-1))
    assert torch.equal(codes, assign(features, saved["centroids"]))


def test_missing_or_mismatched_codebook_is_a_clear_error(mapet_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"method.codebook: k-CLIP codebook not found: .*nope.pt; fit it with"):
        build_method(mapet_cfg(f"method.codebook={tmp_path / 'nope.pt'}"))
    with pytest.raises(ConfigError, match=r"has 16 codes, method.num_codes is 32"):
        build_method(mapet_cfg("method.num_codes=32"))
    with pytest.raises(ConfigError, match=r"was fit on the features of teacher .*'project': True.*'project': False"):
        build_method(mapet_cfg("method.teacher.project=false"))
    with pytest.raises(ConfigError, match=r"method.num_visible=16 must be in \[1, 16\)"):
        mapet_cfg("method.num_visible=16")


@pytest.mark.e2e
def test_mapet_trains_the_same_under_zero1_and_partitioned_zero3(mapet_cfg, tmp_path):
    runs = {}
    for stage, ds in ((1, "ds_configs/zero1.json"), (3, fully_partitioned_zero3(tmp_path))):
        cfg = mapet_cfg("train.steps=10", f"train.deepspeed={ds}", name=f"mapet_z{stage}")
        result = train(cfg, build_method)
        runs[stage] = read_metrics(cfg.output_dir)
        method = result.engine.module
        assert not any(n.startswith("tokenizer") for n, _ in method.named_parameters())  # not DeepSpeed's
        if stage == 1:
            saved = torch.load(cfg.output_dir / "checkpoints" / "step_00000010" / "mp_rank_00_model_states.pt",
                               weights_only=False)["module"]
            assert any(k.startswith("encoder.") for k in saved)
            assert not any("teacher" in k or "tokenizer" in k or "centroid" in k for k in saved)
    losses = {stage: [runs[stage][s]["train/loss"] for s in sorted(runs[stage])] for stage in runs}
    assert losses[3] == pytest.approx(losses[1], rel=1e-4, abs=1e-5)
    assert sum(losses[1][-3:]) < sum(losses[1][:3]) * 0.9  # it learns
    assert all(0.0 <= runs[1][s]["train/token_acc"] <= 1.0 for s in runs[1])


@pytest.mark.e2e
def test_bf16_student_with_an_fp32_teacher(mapet_cfg):
    result = train(mapet_cfg("train.steps=2", "train.precision=bf16", name="mapet_bf16"), build_method)
    method = result.engine.module
    assert method.encoder.vit.pos_embed.dtype == torch.bfloat16  # DeepSpeed cast the student ...
    assert all(p.dtype == torch.float32 for p in method.tokenizer.teacher.model.parameters())  # ... not the teacher
    assert torch.isfinite(torch.tensor(read_metrics(result.output_dir)[2]["train/loss"]))


def test_pretraining_view_is_a_centre_square_crop_with_jitter_and_no_flip():
    torch.manual_seed(0)
    pixels = torch.randint(0, 256, (3, 30, 50), dtype=torch.uint8)  # a landscape image: the centre 30x30 is kept
    img = Image.fromarray(pixels.permute(1, 2, 0).numpy())
    out = CentreSquareJitterView(30)(img)
    assert torch.equal(out["teacher_images"], pixels[:, :, 10:40])  # the un-jittered crop, never flipped
    assert out["images"].shape == (3, 30, 30) and not torch.equal(out["images"], out["teacher_images"])
    assert torch.equal(CentreSquareJitterView(30, jitter_strength=0.0)(img)["images"], pixels[:, :, 10:40])
    portrait = Image.fromarray(pixels.permute(2, 1, 0).contiguous().numpy())  # 50 high, 30 wide
    assert torch.equal(CentreSquareJitterView(30)(portrait)["teacher_images"], pixels.permute(0, 2, 1)[:, 10:40])


@pytest.mark.e2e
def test_layer_scale_recipe_trains_on_the_un_jittered_tokens_and_exports_to_timm(mapet_cfg, tmp_path):
    cfg = mapet_cfg("model.init_values=0.1", "train.steps=2", name="mapet_ls")
    method = build_method(cfg)
    assert torch.equal(method.encoder.vit.blocks[0].ls1.gamma, torch.full((32,), 0.1))
    seen = []
    tokenizer = method.tokenizer
    method.tokenizer = lambda images: seen.append(images) or tokenizer(images)
    batch = {"images": torch.randn(2, 3, 16, 16), "teacher_images": torch.randn(2, 3, 16, 16)}
    method(batch)
    assert seen[0] is batch["teacher_images"]  # the targets come from the crop without colour jitter
    assert cfg.data.views == "mapet"  # MaPeT's default view
    encoder = train(cfg, build_method).engine.module.encoder
    out = export(cfg.output_dir, tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["model_args"]["init_values"] == 0.1
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert {"blocks.0.ls1.gamma", "blocks.1.ls2.gamma"} <= set(model.state_dict())
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad(), gathered(list(encoder.parameters())):
        assert not torch.allclose(encoder.vit.blocks[0].ls1.gamma, torch.full((32,), 0.1))  # trained
        assert torch.allclose(model.forward_features(images), encoder.eval()(images), atol=1e-5)
