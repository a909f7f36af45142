import pytest
import timm
import torch

from train.config import ModelConfig
from train.methods import build_method
from train.methods.mae import mae_loss, patchify, unpatchify
from train.models.masking import gather_tokens, random_masking, restore_tokens
from train.models.vit import ViTEncoder
from train.recipe import load_config

TINY = ModelConfig(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)


def test_patchify_layout_and_inverse():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    patches = patchify(images, 4)
    assert patches.shape == (2, 4, 48)
    # patch 1 is the top-right 4x4 block; its first value is pixel (0, 4) of channel 0, then channel 1
    assert patches[0, 1, 0] == images[0, 0, 0, 4] and patches[0, 1, 1] == images[0, 1, 0, 4]
    assert torch.equal(unpatchify(patches, 4), images)


def test_mae_loss_by_hand():
    pred = torch.tensor([[[0.0, 0, 0, 0], [1, 2, 3, 4]]])
    target = torch.tensor([[[9.0, 9, 9, 9], [1, 1, 1, 1]]])
    mask = torch.tensor([[0.0, 1.0]])  # only the second patch was removed
    assert mae_loss(pred, target, mask, norm_pix_loss=False).item() == pytest.approx((0 + 1 + 4 + 9) / 4)
    # normalised target of [1, 2, 3, 5]: sum of squares = (n - 1) with the unbiased variance -> 3 / 4
    target = torch.tensor([[[9.0, 9, 9, 9], [1, 2, 3, 5]]])
    assert mae_loss(torch.zeros_like(pred), target, mask, norm_pix_loss=True).item() == pytest.approx(0.75, rel=1e-5)


def test_random_masking_indices():
    torch.manual_seed(0)
    ids_keep, ids_restore, mask = random_masking(5, 16, 4, torch.device("cpu"))
    assert ids_keep.shape == (5, 4) and mask.sum(1).tolist() == [12.0] * 5
    for b in range(5):
        assert mask[b, ids_keep[b]].sum() == 0  # kept tokens are the unmasked ones
        assert len(set(ids_keep[b].tolist())) == 4
    x = torch.randn(5, 16, 3)
    kept = gather_tokens(x, ids_keep)
    restored = restore_tokens(kept, ids_restore, torch.full((1, 1, 3), 7.0))
    keep = mask == 0
    assert torch.equal(restored[keep], x[keep]) and (restored[~keep] == 7).all()


def test_encoder_ignores_masked_patches():
    torch.manual_seed(0)
    enc = ViTEncoder(TINY).eval()
    images = torch.randn(2, 3, 16, 16)
    ids_keep, _, mask = random_masking(2, 16, 4, images.device)
    out = enc(images, ids_keep)
    assert out.shape == (2, 5, 32)
    # change only the masked patches: the encoder output must not move
    noise = patchify(torch.randn_like(images), 4) * mask.unsqueeze(-1)
    changed = images + unpatchify(noise, 4)
    assert torch.allclose(enc(changed, ids_keep), out, atol=1e-6)
    # keeping all patches in order is the plain full forward
    all_ids = torch.arange(16).expand(2, -1)
    assert torch.allclose(enc(images, all_ids), enc(images), atol=1e-6)


def test_mae_forward_matches_its_parts():
    cfg = load_config(None, ["model.img_size=16", "model.patch_size=4", "model.embed_dim=32", "model.depth=2",
                             "model.num_heads=2", "method.decoder_dim=32", "method.decoder_depth=1",
                             "method.decoder_heads=2", "train.steps=1"])
    torch.manual_seed(0)
    mae = build_method(cfg)
    assert mae.num_keep == 4
    images = torch.randn(3, 3, 16, 16)
    torch.manual_seed(1)
    loss, report = mae({"images": images})
    torch.manual_seed(1)
    pred, target, mask = mae.reconstruct(images)
    assert pred.shape == (3, 16, 48) and mask.sum() == 3 * 12
    assert torch.allclose(loss, mae_loss(pred, target, mask, True)) and report["loss"] == loss.detach()
    panel = mae.visualize({"images": images})["reconstruction"]
    assert panel.shape == (3, 3, 16, 48)


def test_export_loads_into_timm_and_gives_same_features():
    torch.manual_seed(0)
    enc = ViTEncoder(TINY).eval()
    name, kwargs = enc.timm_spec()
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs).eval()
    missing, unexpected = model.load_state_dict(enc.vit.state_dict(), strict=True)
    assert not missing and not unexpected
    images = torch.randn(2, 3, 16, 16)
    assert torch.allclose(model(images), enc(images, pool="token"), atol=1e-5)
    assert torch.allclose(model.forward_features(images), enc(images), atol=1e-5)


@pytest.mark.parametrize("name, dims", [
    ("vit_base_patch16_224", dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)),
    ("vit_large_patch16_224", dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16)),
    ("vit_huge_patch14_224", dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16)),
])
def test_full_size_encoders_match_timm_shapes(name, dims):
    with torch.device("meta"):
        enc = ViTEncoder(ModelConfig(img_size=224, **dims))
        reference = timm.create_model(name, pretrained=False, num_classes=0)
    assert enc.timm_spec() == (name, {})
    ours = {k: v.shape for k, v in enc.vit.state_dict().items()}
    assert ours == {k: v.shape for k, v in reference.state_dict().items()}
