"""MAE (He et al., 2022): reconstruct the pixels of randomly masked patches from the visible ones."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from train.compression import FULL, Setting
from train.config import Config, ConfigError
from train.methods.base import Method, register
from train.models.decoder import MAEDecoder
from train.models.losses import per_patch_loss
from train.models.masking import random_masking
from train.models.patches import patchify, unpatchify
from train.models.vit import ViTEncoder, patch_grid


@dataclass
class MAEConfig:
    name: str = "mae"
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16

    def validate(self, cfg: Config) -> None:
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"method.mask_ratio={self.mask_ratio} must be in (0, 1): the loss is over the masked "
                              "patches")
        patches = (cfg.model.img_size // cfg.model.patch_size) ** 2
        if patches - int(patches * (1 - self.mask_ratio)) < 1:
            raise ConfigError(f"method.mask_ratio={self.mask_ratio} masks none of the {patches} patches; the loss is "
                              "over the masked patches")
        if self.decoder_dim % self.decoder_heads:
            raise ConfigError(f"method.decoder_dim={self.decoder_dim} is not divisible by "
                              f"method.decoder_heads={self.decoder_heads}")
        if self.decoder_dim % 4:
            raise ConfigError(f"method.decoder_dim={self.decoder_dim} must be divisible by 4 (sincos positions)")


def mae_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix_loss: bool) -> torch.Tensor:
    """MSE per patch, averaged over the removed patches only (mask 1 = removed)."""
    return (per_patch_loss(pred, target, norm_pix_loss) * mask).sum() / mask.sum()


@register("mae")
class MAE(Method):
    """Compression (train/compression.py): token dropout keeps `keep_ratio` of MAE's visible patches
    (the dropped ones are reconstructed like the masked ones); patch scaling runs the whole of MAE on
    the coarser grid, predicting each large patch at the model's patch size (the target is the image
    resized to grid x model.patch_size), so the decoder's weights serve every size too."""

    Config = MAEConfig
    supported_compression = ("token_dropout", "patch_scaling")

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg.method
        self.encoder = ViTEncoder(cfg.model)
        m = cfg.method
        self.num_keep = int(self.encoder.num_patches * (1 - m.mask_ratio))
        self.decoder = MAEDecoder(self.encoder.grid_size, cfg.model.embed_dim, m.decoder_dim, m.decoder_depth,
                                  m.decoder_heads, out_dim=cfg.model.patch_size**2 * 3)

    def grid_and_keep(self, image_size, compression: Setting = FULL) -> tuple[tuple[int, int], int]:
        """The patch grid and the number of patches the encoder sees under `compression`."""
        grid = patch_grid(image_size, compression.patch_size or self.encoder.patch_size)
        return grid, compression.num_kept(int(grid[0] * grid[1] * (1 - self.cfg.mask_ratio)))

    def reconstruct(self, images: torch.Tensor, compression: Setting = FULL):
        """Random masking, encoder on the visible patches, decoder on all: (pred, target, mask)."""
        grid, num_keep = self.grid_and_keep(images.shape[-2:], compression)
        ids_keep, ids_restore, mask = random_masking(images.shape[0], grid[0] * grid[1], num_keep, images.device)
        latent = self.encoder(images, ids_keep, patch_size=compression.patch_size)
        pred = self.decoder(latent, ids_restore, grid)
        p = self.encoder.patch_size
        if (grid[0] * p, grid[1] * p) != tuple(images.shape[-2:]):
            images = F.interpolate(images, size=(grid[0] * p, grid[1] * p), mode="bilinear", antialias=True)
        return pred, patchify(images, p), mask

    def forward(self, batch: dict, step: int = 0):
        pred, target, mask = self.reconstruct(batch["images"], batch.get("compression", FULL))
        loss = mae_loss(pred, target, mask, self.cfg.norm_pix_loss)
        return loss, {"loss": loss.detach()}

    @torch.no_grad()
    def visualize(self, batch: dict, n: int = 8) -> dict[str, torch.Tensor]:
        """Rows of (original, masked input, reconstruction with visible patches pasted back), normalised units."""
        images = batch["images"][:n]
        pred, target, mask = self.reconstruct(images)
        pred = pred.float()
        if self.cfg.norm_pix_loss:  # undo the per-patch normalisation with the true patch statistics
            pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
        m = mask.unsqueeze(-1)
        p = self.encoder.patch_size
        masked = unpatchify(target * (1 - m), p)
        pasted = unpatchify(target * (1 - m) + pred * m, p)
        return {"reconstruction": torch.cat([images.float(), masked, pasted], dim=3)}

    def flops_per_image(self, compression: Setting = FULL) -> float:
        """Training FLOPs per image (forward x 3): encoder on the kept tokens, decoder on all."""
        grid, num_keep = self.grid_and_keep((self.encoder.cfg.img_size,) * 2, compression)
        return 3 * (self.encoder.forward_flops(num_keep) + self.decoder.forward_flops(grid[0] * grid[1]))

    def tokens_per_image(self, compression: Setting = FULL) -> int:
        return self.grid_and_keep((self.encoder.cfg.img_size,) * 2, compression)[1]
