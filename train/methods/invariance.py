"""Small pieces the augmentation-invariance methods (MoCo v3, SimCLR, DINO) share."""

import logging

import torch

from train.compression import FULL, Setting
from train.config import Config, ConfigError
from train.distributed import rank, world_size
from train.models.vit import ViTEncoder, patch_grid

log = logging.getLogger("train")


def require_views(cfg: Config, method: str, recipes: tuple[str, ...]) -> None:
    """Reject a run whose `data.views` recipe does not make the views `method` trains on."""
    if cfg.data.views not in recipes:
        raise ConfigError(f"method {method} trains on the views of data.views={' or '.join(recipes)}, "
                          f"not data.views={cfg.data.views!r}")


def crop_major(views: torch.Tensor) -> torch.Tensor:
    """(B, V, 3, H, W) -> (V*B, 3, H, W): every image's first view, then every second view, ..."""
    return views.transpose(0, 1).flatten(0, 1)


def warn_if_accumulating(cfg: Config, method: str) -> None:
    """Contrastive negatives come from one micro-batch on every rank: accumulation is not a bigger batch."""
    per_step = cfg.data.batch_size * world_size()
    if cfg.train.global_batch_size > per_step and rank() == 0:
        log.warning("%s with gradient accumulation: the contrastive negatives come from each micro-batch of %d "
                    "images (data.batch_size x world size), not from train.global_batch_size=%d", method, per_step,
                    cfg.train.global_batch_size)


def encoded_tokens(encoder: ViTEncoder, image_size: int, compression: Setting = FULL, dropout: bool = True) -> int:
    """Patch tokens `encoder` processes for one `image_size` crop under `compression` (`train.compression.encode`)."""
    grid = patch_grid((image_size, image_size), compression.patch_size or encoder.patch_size)
    return compression.num_kept(grid[0] * grid[1]) if dropout else grid[0] * grid[1]
