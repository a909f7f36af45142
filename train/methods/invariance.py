"""Small pieces the augmentation-invariance methods (MoCo v3, SimCLR, DINO) share."""

import torch

from train.compression import FULL, Setting
from train.config import Config, ConfigError
from train.models.vit import ViTEncoder, patch_grid


def require_views(cfg: Config, method: str, recipes: tuple[str, ...]) -> None:
    """Reject a run whose `data.views` recipe does not make the views `method` trains on."""
    if cfg.data.views not in recipes:
        raise ConfigError(f"method {method} trains on the views of data.views={' or '.join(recipes)}, "
                          f"not data.views={cfg.data.views!r}")


def crop_major(views: torch.Tensor) -> torch.Tensor:
    """(B, V, 3, H, W) -> (V*B, 3, H, W): every image's first view, then every second view, ..."""
    return views.transpose(0, 1).flatten(0, 1)




def encoded_tokens(encoder: ViTEncoder, image_size: int, compression: Setting = FULL, dropout: bool = True) -> int:
    """Patch tokens `encoder` processes for one `image_size` crop under `compression` (`train.compression.encode`)."""
    grid = patch_grid((image_size, image_size), compression.patch_size or encoder.patch_size)
    return compression.num_kept(grid[0] * grid[1]) if dropout else grid[0] * grid[1]
