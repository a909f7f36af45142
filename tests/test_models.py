from functools import partial

import numpy as np
import pytest
import timm
import torch
from timm.models.vision_transformer import Block, PatchEmbed

from train.config import ModelConfig
from train.methods import METHODS, build_method
from train.methods.mae import mae_loss, patchify, unpatchify
from train.models.decoder import MAEDecoder
from train.models.masking import gather_tokens, masking_from_scores, random_masking, restore_tokens
from train.models.vit import ViTEncoder, sincos_pos_embed, timm_sincos_pos_embed
from train.recipe import load_config
from train.weights import load_encoder, load_mae_decoder, resolve_source

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


# -- MAE's position table and official decoders -------------------------------------------------------------

def mae_get_2d_sincos_pos_embed(embed_dim, grid_size, cls_token=False):
    """facebookresearch/mae util/pos_embed.py, verbatim in numpy (the reference)."""

    def from_grid(embed_dim, grid):
        emb_h = from_1d(embed_dim // 2, grid[0])  # (H*W, D/2)
        emb_w = from_1d(embed_dim // 2, grid[1])  # (H*W, D/2)
        return np.concatenate([emb_h, emb_w], axis=1)

    def from_1d(embed_dim, pos):
        omega = np.arange(embed_dim // 2, dtype=np.float64)
        omega /= embed_dim / 2.0
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.meshgrid(grid_w, grid_h)  # here w goes first
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_size, grid_size])
    pos_embed = from_grid(embed_dim, grid)
    if cls_token:
        pos_embed = np.concatenate([np.zeros([1, embed_dim]), pos_embed], axis=0)
    return pos_embed


def test_sincos_positions_are_maes_and_the_decoder_saves_them():

    for grid, dim in ((4, 32), (14, 512), (14, 768)):
        ref = torch.from_numpy(mae_get_2d_sincos_pos_embed(dim, grid, cls_token=True)).float().unsqueeze(0)
        assert torch.allclose(sincos_pos_embed((grid, grid), dim), ref, rtol=0, atol=1e-6), (grid, dim)
    ref = torch.from_numpy(mae_get_2d_sincos_pos_embed(32, 4, cls_token=True)).float().unsqueeze(0)
    encoder = ViTEncoder(ModelConfig(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2))
    assert torch.allclose(encoder.vit.pos_embed, ref, atol=1e-6) and not encoder.vit.pos_embed.requires_grad
    decoder = MAEDecoder((4, 4), 32, 32, 1, 2, out_dim=48)
    state = decoder.state_dict()
    assert torch.allclose(state["pos_embed"], ref, atol=1e-6)  # saved with the weights, as MAE's decoder_pos_embed
    assert "pos_embed" not in dict(decoder.named_parameters())  # a buffer: never trained
    # a checkpoint from before the table was saved was trained with timm's layout: that is what it gets back
    del state["pos_embed"]
    old = MAEDecoder((4, 4), 32, 32, 1, 2, out_dim=48)
    old.load_state_dict(state)
    assert torch.equal(old.pos_embed, timm_sincos_pos_embed((4, 4), 32)) and not torch.allclose(old.pos_embed, ref)


class OfficialMAE(torch.nn.Module):
    """facebookresearch/mae models_mae.py `MaskedAutoencoderViT` (parameter names, masking, forward), the
    reference for loading an official checkpoint."""

    def __init__(self, img_size, patch_size, embed_dim, depth, num_heads, decoder_dim, decoder_depth, decoder_heads):


        super().__init__()
        norm = partial(torch.nn.LayerNorm, eps=1e-6)
        self.patch_embed = PatchEmbed(img_size, patch_size, 3, embed_dim)
        n = self.patch_embed.num_patches
        self.cls_token = torch.nn.Parameter(torch.randn(1, 1, embed_dim) * 0.02)
        grid = int(n**0.5)
        self.pos_embed = torch.nn.Parameter(torch.from_numpy(
            mae_get_2d_sincos_pos_embed(embed_dim, grid, True)).float().unsqueeze(0), requires_grad=False)
        self.blocks = torch.nn.ModuleList([Block(embed_dim, num_heads, 4.0, qkv_bias=True, norm_layer=norm)
                                           for _ in range(depth)])
        self.norm = norm(embed_dim)
        self.decoder_embed = torch.nn.Linear(embed_dim, decoder_dim)
        self.mask_token = torch.nn.Parameter(torch.randn(1, 1, decoder_dim) * 0.02)
        self.decoder_pos_embed = torch.nn.Parameter(torch.from_numpy(
            mae_get_2d_sincos_pos_embed(decoder_dim, grid, True)).float().unsqueeze(0), requires_grad=False)
        self.decoder_blocks = torch.nn.ModuleList([Block(decoder_dim, decoder_heads, 4.0, qkv_bias=True,
                                                         norm_layer=norm) for _ in range(decoder_depth)])
        self.decoder_norm = norm(decoder_dim)
        self.decoder_pred = torch.nn.Linear(decoder_dim, patch_size**2 * 3)
        for p in self.parameters():  # random weights everywhere, norms included, so that every name matters
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.3 if p.ndim == 1 else 0.05)

    def forward(self, imgs, noise, mask_ratio=0.75):
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
        n, length, d = x.shape
        len_keep = int(length * (1 - mask_ratio))
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        x = torch.gather(x, dim=1, index=ids_shuffle[:, :len_keep].unsqueeze(-1).repeat(1, 1, d))
        cls_token = self.cls_token + self.pos_embed[:, :1, :]
        x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.decoder_embed(self.norm(x))
        mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]


def test_an_official_mae_checkpoint_reconstructs_as_the_official_model(tmp_path):
    """`mae_visualize_vit_*.pth` layout ({'model': encoder + decoder}): our encoder and decoder loaded from it
    give the official model's reconstructions on the same images and masking noise."""

    torch.manual_seed(0)
    official = OfficialMAE(32, 8, 64, 2, 1, 32, 2, 16).eval()
    path = tmp_path / "mae_visualize_vit_tiny.pth"
    torch.save({"model": official.state_dict()}, path)
    images, noise = torch.randn(3, 3, 32, 32), torch.rand(3, 16)
    with torch.no_grad():
        expected = official(images, noise)
        encoder, decoder = load_encoder(resolve_source(path), METHODS).eval(), load_mae_decoder(path).eval()
        ids_keep, ids_restore, _ = masking_from_scores(noise, 4)
        ours = decoder(encoder(images, ids_keep), ids_restore)
    assert torch.allclose(ours, expected, rtol=1e-5, atol=1e-5)
    assert (ours - expected).abs().max() < 1e-3 * expected.abs().max()
