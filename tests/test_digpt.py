"""D-iGPT: segments and block-causal masks, causality of the predictions, target alignment, the
feature loss, and training through the engine under ZeRO-1 and fully partitioned ZeRO-3."""

import json

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from helpers import fully_partitioned_zero3, read_metrics
from train.config import ConfigError
from train.engine import train
from train.eval.export import export
from train.methods import build_method
from train.methods.digpt import causal_masks, digpt_targets, segment_patches, tap_blocks
from train.models.decoder import FeaturePredictor
from train.models.losses import feature_loss


@pytest.fixture
def digpt_cfg(make_cfg, clip_teacher):
    def make(*overrides, name="digpt"):
        return make_cfg("method.name=digpt", f"method.teacher.path={clip_teacher}", "train.steps=1", *overrides,
                        name=name)
    return make


def test_segments_and_block_causal_masks():
    assert segment_patches(4, 2).tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    assert segment_patches(4, 4).flatten().tolist() == list(range(16))  # one patch per segment: raster iGPT
    encoder, queries_self, queries_cross = causal_masks(num_input_segments=3, segment_len=2)
    segment = [None, 0, 0, 1, 1, 2, 2]  # encoder tokens: class token, then the input patches
    for i, row in enumerate(segment):
        for j, col in enumerate(segment):
            # the class token sees everything and is seen by nothing else; patches see their segment and earlier ones
            expected = row is None or (col is not None and col <= row)
            assert encoder[i, j] == expected, (i, j)
    queries = [0, 0, 1, 1, 2, 2, None]  # one query per input patch's context, the class query last
    assert queries_self.shape == (7, 7) and queries_cross.shape == (7, 7)
    for i, row in enumerate(queries):
        for j, col in enumerate(queries):
            assert queries_self[i, j] == (row is None or (col is not None and col <= row)), (i, j)
        for j, col in enumerate(segment):
            assert queries_cross[i, j] == (row is None or (col is not None and col <= row)), (i, j)


def official_mask(num_segments: int, segment_len: int) -> torch.Tensor:
    """The official additive mask over [patches of the input segments, class token] (models_digpt.py
    mask_generate), except that no patch sees the class token (the project's one documented difference)."""
    mask = torch.tril(torch.ones(num_segments, num_segments))
    mask = mask.masked_fill(mask == 0, float("-inf")).masked_fill(mask == 1, 0)
    mask = mask.repeat_interleave(segment_len, dim=0).repeat_interleave(segment_len, dim=1)
    mask = F.pad(mask[None, None], (0, 1, 0, 1), mode="reflect")[0, 0]
    mask[:-1, -1] = float("-inf")
    return mask


def official_attention(x, kv, qkv_weights, proj, heads, mask):
    """vit.py Attention / CrossAttention: softmax(q k^T * scale + mask) v, then the output projection."""
    b, n, c = x.shape
    q, k, v = (F.linear(t, w, bias).reshape(b, t.shape[1], heads, c // heads).transpose(1, 2)
               for t, (w, bias) in zip((x, kv, kv), qkv_weights))
    attn = ((q @ k.transpose(-2, -1)) * (c // heads) ** -0.5 + mask).softmax(dim=-1)
    return F.linear((attn @ v).transpose(1, 2).reshape(b, n, c), proj.weight, proj.bias)


def official_decoder(decoder, features, target_ids, segment_len):
    """models_digpt.py forward_encoder (enc_norm, enc2dec) + forward_decoder (DecoderBlock x depth, norm, pred),
    written out from the official definition with `decoder`'s weights, in the official token layout
    (class token last in the latent)."""
    b = target_ids.shape[0]
    dim, depth = decoder.dim, decoder.depth
    norm = decoder.encoder_norm  # ONE LayerNorm for the four taps (ModuleList([LayerNorm] * 4))
    official = [torch.cat([f[:, 1:], f[:, :1]], dim=1) for f in features]  # [patches, cls]
    x = torch.cat([F.layer_norm(f, f.shape[-1:], norm.weight, norm.bias, 1e-5) for f in official], dim=-1)
    latent = F.linear(x, decoder.encoder_to_latents.weight, decoder.encoder_to_latents.bias)
    latent = latent.reshape(b, -1, dim, depth)
    pos = decoder.pos_embed
    q = torch.cat([decoder.query + pos[0, 1:][target_ids], (decoder.query + pos[:, :1]).expand(b, -1, -1)], dim=1)
    mask = official_mask(features[0].shape[1] // segment_len, segment_len)

    def ln(module, t):
        return F.layer_norm(t, t.shape[-1:], module.weight, module.bias, 1e-6)

    for count, blk in enumerate(decoder.blocks):
        kv = latent[:, :, :, count]
        w, bias = blk.attn.qkv.weight.chunk(3), blk.attn.qkv.bias.chunk(3)
        h = ln(blk.norm1, q)
        q = q + official_attention(h, h, list(zip(w, bias)), blk.attn.proj, blk.attn.num_heads, mask)
        kw, kb = blk.cross_attn.kv.weight.chunk(2), blk.cross_attn.kv.bias.chunk(2)
        cross = [(blk.cross_attn.q.weight, blk.cross_attn.q.bias), (kw[0], kb[0]), (kw[1], kb[1])]
        q = q + official_attention(ln(blk.norm_query, q), ln(blk.norm_latent, kv), cross, blk.cross_attn.proj,
                                   blk.cross_attn.num_heads, mask)
        mlp = blk.mlp
        q = q + F.linear(F.gelu(F.linear(ln(blk.norm2, q), mlp.fc1.weight, mlp.fc1.bias)), mlp.fc2.weight, mlp.fc2.bias)
    return F.linear(ln(decoder.norm, q), decoder.pred.weight, decoder.pred.bias)


def tiny_decoder(depth=2, num_taps=4):
    torch.manual_seed(0)
    decoder = FeaturePredictor((4, 4), encoder_dim=12, num_taps=num_taps, dim=16, depth=depth, num_heads=4,
                               out_dim=10).eval()
    with torch.no_grad():  # non-trivial norms, biases and tokens
        for name, p in decoder.named_parameters():
            if name.endswith("bias") or "norm" in name or name == "query":
                p.add_(0.3 * torch.randn_like(p))
    return decoder


def test_decoder_is_the_official_multi_level_cross_attention_decoder():
    decoder = tiny_decoder()
    # one LayerNorm for all taps, one Linear to depth x dim, each layer cross-attends to its own latent
    assert sum(isinstance(m, nn.LayerNorm) and m.normalized_shape == (12,) for m in decoder.modules()) == 1
    assert decoder.encoder_to_latents.in_features == 4 * 12 and decoder.encoder_to_latents.out_features == 2 * 16
    segment_len, num_input = 4, 12
    features = [torch.randn(2, 1 + num_input, 12) for _ in range(4)]
    target_ids = torch.stack([torch.randperm(16)[:num_input] for _ in range(2)])
    _, self_mask, cross_mask = causal_masks(3, segment_len)
    with torch.no_grad():
        ours = decoder(features, target_ids, self_mask, cross_mask)
        reference = official_decoder(decoder, features, target_ids, segment_len)
    assert ours.shape == (2, num_input + 1, 10)
    assert torch.allclose(ours, reference, atol=1e-5), (ours - reference).abs().max()
    # each layer reads its own slice of the projection: swapping the layers' latents changes the output
    with torch.no_grad():
        w = decoder.encoder_to_latents.weight.view(16, 2, -1)
        decoder.encoder_to_latents.weight.copy_(w.flip(1).reshape(32, -1))
        assert not torch.allclose(decoder(features, target_ids, self_mask, cross_mask), ours, atol=1e-4)


def test_a_later_segment_never_changes_an_earlier_prediction_through_the_cross_attention():
    decoder = tiny_decoder()
    segment_len = 4
    _, self_mask, cross_mask = causal_masks(3, segment_len)
    features = [torch.randn(2, 13, 12) for _ in range(4)]
    target_ids = torch.stack([torch.randperm(16)[:12] for _ in range(2)])
    with torch.no_grad():
        base = decoder(features, target_ids, self_mask, cross_mask)
        for segment in range(3):
            changed = [f.clone() for f in features]
            tokens = slice(1 + segment * segment_len, 1 + (segment + 1) * segment_len)  # latent: cls first
            changed[segment % 4][:, tokens] += torch.randn(2, segment_len, 12)  # one tap of this segment
            after = decoder(changed, target_ids, self_mask, cross_mask)
            earlier = segment * segment_len  # queries whose context ends before this segment
            assert torch.equal(after[:, :earlier], base[:, :earlier])
            assert (after[:, earlier:] - base[:, earlier:]).abs().amax(-1).min() > 1e-6  # the rest read it
        changed = [f.clone() for f in features]
        changed[0][:, 0] += torch.randn(2, 12)  # the class token's latent reaches the class query only
        after = decoder(changed, target_ids, self_mask, cross_mask)
        assert torch.equal(after[:, :-1], base[:, :-1]) and (after[:, -1] - base[:, -1]).abs().max() > 1e-6


def test_decoders_read_the_encoder_blocks_at_the_tap_depths_without_the_final_norm(digpt_cfg):
    assert tap_blocks(12) == [6, 8, 10, 12] and tap_blocks(24) == [12, 16, 20, 24] and tap_blocks(4) == [2, 3, 3, 4]
    assert tap_blocks(12, [3, 6]) == [3, 6]
    torch.manual_seed(0)
    method = build_method(digpt_cfg("model.depth=6", "method.order=raster")).eval()
    assert method.taps == [3, 4, 5, 6]
    assert not any(p.requires_grad for p in method.encoder.vit.norm.parameters())
    outputs, seen = [], {}
    for block in method.encoder.vit.blocks:
        block.register_forward_hook(lambda module, args, out: outputs.append(out))
    method.encoder.vit.norm.register_forward_hook(lambda *a: seen.setdefault("final norm", True))
    forward = method.next_decoder.forward

    def record(features, *args):
        seen["features"] = features
        return forward(features, *args)

    method.next_decoder.forward = record
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        method.predict(images, method.patch_order(2, images.device))
    assert len(outputs) == 6 and "final norm" not in seen
    assert len(seen["features"]) == 4
    for tensor, block in zip(seen["features"], [3, 4, 5, 6]):
        assert torch.equal(tensor, outputs[block - 1])
    with pytest.raises(ConfigError, match=r"method.taps=\[4, 2\] must be block numbers in ascending order"):
        digpt_cfg("method.taps=[4,2]")
    method = build_method(digpt_cfg("model.depth=6", "method.taps=[1,2]"))  # later blocks are not run
    outputs.clear()
    for block in method.encoder.vit.blocks:
        block.register_forward_hook(lambda module, args, out: outputs.append(out))
    with torch.no_grad():
        method.predict(images, method.patch_order(2, images.device))
    assert len(outputs) == 2 and method.next_decoder.encoder_to_latents.in_features == 2 * 32


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
            # the final norm is never used in pretraining: the export is timm's ViT with it at its unit init
            exported = export(cfg.output_dir, tmp_path / "export")
            config = json.loads((exported / "config.json").read_text())
            assert config["vitssl"]["final_norm"].startswith("untrained")
            model = timm.create_model(f"local-dir:{exported}", pretrained=True).eval()
            assert torch.equal(model.norm.weight, torch.ones(32)) and torch.equal(model.norm.bias, torch.zeros(32))
            images = torch.randn(2, 3, 16, 16)
            with torch.no_grad():
                encoder = result.engine.module.encoder.eval()
                assert torch.allclose(model.forward_features(images), encoder(images), atol=1e-5)
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
