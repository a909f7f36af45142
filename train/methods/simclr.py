"""SimCLR (Chen et al., 2020): each view's projection must pick out the other view of its image among all
2N - 1 other views of the global batch (NT-Xent), negatives gathered from every rank with gradients."""

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from train.compression import FULL, Setting, encode
from train.config import Config, ConfigError
from train.distributed import all_gather_with_grad
from train.distributed import rank as process_rank
from train.methods.base import Method, register
from train.methods.invariance import crop_major, encoded_tokens, require_views
from train.models.heads import linear_flops, projection_mlp, sync_batchnorm
from train.models.vit import ViTEncoder


@dataclass
class SimCLRConfig:
    name: str = "simclr"
    default_views: ClassVar[str] = "simclr"  # data.views when the recipe does not set it
    proj_layers: int = 2  # projection MLP depth (SimCLR v1: 2, v2: 3)
    proj_hidden_dim: int = 2048
    proj_dim: int = 128
    temperature: float = 0.1
    dropout_views: str = "both"  # views under token dropout: "both", or "first" (the compression paper's asymmetric
    #                              setting: the second view keeps every token)

    def validate(self, cfg: Config) -> None:
        require_views(cfg, self.name, ("simclr", "moco_v3"))
        if self.dropout_views not in ("both", "first"):
            raise ConfigError(f"method.dropout_views={self.dropout_views!r}: choose 'both' or 'first'")
        if self.temperature <= 0:
            raise ConfigError(f"method.temperature={self.temperature} must be > 0")
        if self.proj_layers < 1 or min(self.proj_hidden_dim, self.proj_dim) < 1:
            raise ConfigError(f"method.proj_layers={self.proj_layers}, proj_hidden_dim={self.proj_hidden_dim} and "
                              f"proj_dim={self.proj_dim} must be >= 1")


def nt_xent_loss(z: torch.Tensor, z_all: torch.Tensor, temperature: float, rank: int = 0) -> torch.Tensor:
    """NT-Xent of this rank's embeddings z (2B, D: first views, then second views) against those of every
    rank z_all (W*2B, D, rank order). Anchor i's positive is the other view of its image, the other 2N - 2
    views of the global batch are its negatives, itself is left out. Mean over this rank's anchors; fp32."""
    n = z.shape[0]
    z = F.normalize(z.float(), dim=1)
    z_all = F.normalize(z_all.float(), dim=1)
    logits = z @ z_all.T / temperature
    anchors = torch.arange(n, device=z.device)
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[anchors, rank * n + anchors] = True
    positives = rank * n + (anchors + n // 2) % n
    return F.cross_entropy(logits.masked_fill(self_mask, float("-inf")), positives)


@register("simclr")
class SimCLR(Method):
    """Compression (train/compression.py): token dropout on both views or on the first only
    (`dropout_views`), patch scaling on both."""

    Config = SimCLRConfig
    supported_compression = ("token_dropout", "patch_scaling")
    # the loss couples the images of a batch: no gradient accumulation unless accepted (train/config.py)
    batch_coupled = "contrastive negatives and BatchNorm statistics"

    def __init__(self, cfg: Config):
        super().__init__()
        m = self.cfg = cfg.method
        self.encoder = ViTEncoder(cfg.model)
        self.projector = sync_batchnorm(projection_mlp(m.proj_layers, cfg.model.embed_dim, m.proj_hidden_dim,
                                                       m.proj_dim))

    def forward(self, batch: dict, step: int = 0):
        views, compression = crop_major(batch["views"]), batch.get("compression", FULL)
        if self.cfg.dropout_views == "both":
            features = encode(self.encoder, views, compression, pool="token")
        else:  # the second view keeps its whole grid, so it runs as its own pass
            first, second = views.chunk(2)
            features = torch.cat([encode(self.encoder, first, compression, pool="token"),
                                  encode(self.encoder, second, compression, dropout=False, pool="token")])
        # both views' features together, as SimCLR normalises them in one (global) BatchNorm
        z = self.projector(features).float()
        loss = nt_xent_loss(z, all_gather_with_grad(z), self.cfg.temperature, process_rank())
        return loss, {"loss": loss.detach()}

    def view_tokens(self, compression: Setting = FULL) -> list[int]:
        """Patch tokens the encoder sees for each of the two views."""
        size, both = self.encoder.cfg.img_size, self.cfg.dropout_views == "both"
        return [encoded_tokens(self.encoder, size, compression),
                encoded_tokens(self.encoder, size, compression, dropout=both)]

    def flops_per_image(self, compression: Setting = FULL) -> float:
        """Two views, forward + backward (x3)."""
        return sum(3 * (self.encoder.forward_flops(t) + linear_flops(self.projector))
                   for t in self.view_tokens(compression))

    def tokens_per_image(self, compression: Setting = FULL) -> int:
        return sum(self.view_tokens(compression))
