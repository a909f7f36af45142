"""MoCo v3 (Chen, Xie & He, 2021): the query encoder (ViT + projector + predictor) learns to find the momentum
encoder's key of the other view of its image among the keys of the whole global batch (symmetric InfoNCE)."""

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from train.compression import FULL, Setting, encode
from train.config import Config, ConfigError
from train.distributed import all_gather_with_grad
from train.distributed import rank as process_rank
from train.methods.base import Method, register
from train.methods.invariance import crop_major, encoded_tokens, require_views
from train.models.ema import EMA, autocast_like, cosine_momentum
from train.models.heads import linear_flops, projection_mlp, sync_batchnorm
from train.models.vit import ViTEncoder


@dataclass
class MoCoV3Config:
    name: str = "moco_v3"
    default_views: ClassVar[str] = "moco_v3"  # data.views when the recipe does not set it
    proj_dim: int = 256  # output of projector and predictor (official --moco-dim)
    mlp_dim: int = 4096  # hidden width of both MLPs (--moco-mlp-dim)
    temperature: float = 0.2  # InfoNCE temperature (--moco-t; 0.2 for ViTs)
    momentum: float = 0.99  # momentum encoder EMA at step 0 (--moco-m) ...
    momentum_cosine: bool = True  # ... rising to 1 on a half cosine over training (--moco-m-cos)
    frozen_patch_embed: bool = True  # fixed random patch projection, MoCo v3's ViT stabiliser (--stop-grad-conv1)

    def validate(self, cfg: Config) -> None:
        require_views(cfg, self.name, ("moco_v3", "simclr"))
        if self.temperature <= 0:
            raise ConfigError(f"method.temperature={self.temperature} must be > 0")
        if not 0.0 <= self.momentum <= 1.0:
            raise ConfigError(f"method.momentum={self.momentum} must be in [0, 1]")
        if min(self.proj_dim, self.mlp_dim) < 1:
            raise ConfigError(f"method.proj_dim={self.proj_dim} and method.mlp_dim={self.mlp_dim} must be >= 1")


def moco_v3_loss(q: torch.Tensor, k: torch.Tensor, temperature: float, rank: int = 0) -> torch.Tensor:
    """InfoNCE of this rank's queries q (B, D) against the keys k (W*B, D) of every rank (rank order); query
    i's positive is key rank*B + i, all other keys are negatives. Scaled by 2T as MoCo v3; fp32."""
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(k.float(), dim=1)
    logits = q @ k.T / temperature
    labels = torch.arange(q.shape[0], device=q.device) + rank * q.shape[0]
    return F.cross_entropy(logits, labels) * (2 * temperature)


@register("moco_v3")
class MoCoV3(Method):
    """Compression (train/compression.py): token dropout on the query encoder's views, patch scaling on both
    encoders (the momentum encoder always sees every token of its grid), as the compression paper does."""

    Config = MoCoV3Config
    supported_compression = ("token_dropout", "patch_scaling")
    teachers = ("teacher",)
    # the loss couples the images of a batch: no gradient accumulation unless accepted (train/config.py)
    batch_coupled = "contrastive negatives and BatchNorm statistics"

    def __init__(self, cfg: Config):
        super().__init__()
        m = self.cfg = cfg.method
        self.encoder = ViTEncoder(cfg.model)
        if m.frozen_patch_embed:
            self.encoder.vit.patch_embed.requires_grad_(False)
        self.projector = sync_batchnorm(projection_mlp(3, cfg.model.embed_dim, m.mlp_dim, m.proj_dim))
        self.predictor = sync_batchnorm(projection_mlp(2, m.proj_dim, m.mlp_dim, m.proj_dim))
        # the momentum encoder: an fp32 EMA of encoder + projector outside DeepSpeed, in train mode like the
        # official one (its BatchNorms normalise with the batch statistics)
        self.teacher = EMA(self.online())
        self.teacher.module.train()
        self.total_steps = max(1, cfg.train.steps)

    def online(self) -> nn.ModuleDict:
        """The part the momentum encoder tracks (encoder + projector), grouped on the fly, never registered."""
        return nn.ModuleDict({"encoder": self.encoder, "projector": self.projector})

    def set_total_steps(self, total_steps: int, steps_per_epoch: int | None = None) -> None:
        self.total_steps = total_steps

    def momentum_at(self, step: int) -> float:
        if self.cfg.momentum_cosine:
            return cosine_momentum(step, self.total_steps, self.cfg.momentum)
        return self.cfg.momentum

    def forward(self, batch: dict, step: int = 0):
        x, compression = crop_major(batch["views"]), batch.get("compression", FULL)
        queries = encode(self.encoder, x, compression, pool="token")
        q1, q2 = (self.predictor(self.projector(f)) for f in queries.chunk(2))
        with torch.no_grad():
            teacher = self.teacher.on(x.device)
            with autocast_like(self.encoder, x.device):
                keys = encode(teacher["encoder"], x, compression, dropout=False, pool="token")
                k1, k2 = (teacher["projector"](f) for f in keys.chunk(2))
        t, rank = self.cfg.temperature, process_rank()
        loss = (moco_v3_loss(q1, all_gather_with_grad(k2.float()), t, rank)
                + moco_v3_loss(q2, all_gather_with_grad(k1.float()), t, rank))
        return loss, {"loss": loss.detach(), "momentum": loss.new_full((), self.momentum_at(step))}

    def on_step_end(self, step: int) -> None:
        """Momentum update after `step` optimizer steps, i.e. before the forward of step index `step`."""
        self.teacher.update(self.online(), self.momentum_at(step))

    def flops_per_image(self, compression: Setting = FULL) -> float:
        """Two views: query path forward + backward (x3), momentum path forward only."""
        size = self.encoder.cfg.img_size
        query = self.encoder.forward_flops(encoded_tokens(self.encoder, size, compression))
        key = self.encoder.forward_flops(encoded_tokens(self.encoder, size, compression, dropout=False))
        proj, pred = linear_flops(self.projector), linear_flops(self.predictor)
        return 2 * (3 * (query + proj + pred) + key + proj)

    def tokens_per_image(self, compression: Setting = FULL) -> int:
        """Patch tokens through the query encoder (two views)."""
        return 2 * encoded_tokens(self.encoder, self.encoder.cfg.img_size, compression)
