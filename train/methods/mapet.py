"""MaPeT (Baraldi et al., 2023): masked and permuted pretraining with k-CLIP visual tokens.

Every image gets a random order of its patches. The first `num_visible` patches of the order are
seen by everything and never predicted; the rest are predicted autoregressively in that order:
the k-CLIP code (the frozen teacher's patch feature quantised by a k-means codebook) of each.
Two streams share the encoder's weights, as in the official code (aimagelab/MaPeT):

- content stream: the class token, the patches (in the order), and one mask token (a learned token
  plus the position embedding) per predicted position. A patch sees the visible patches, the
  patches up to itself in the order, and the mask tokens of the positions after it, so it always
  sees every position of the image (the "auxiliary position information").
- query stream: one token per predicted position (the same mask token + its position). It sees the
  visible patches, the patches before it in the order and the mask tokens from its own position on,
  never its own content; its output predicts the code.

Keys and values come from the content stream only. Both streams run as one sequence through the
encoder's timm blocks; ordering the patches by the permutation makes the attention mask the same
for every image, so it is built once (`two_stream_mask`).

Compression (train/compression.py): token dropout runs MaPeT on a random `keep_ratio` share of the
patches (a random subset of each image's order, so still a uniformly random permutation), with the
visible share kept: `num_visible x kept / N` of them (at least 1, at most kept - 1) stay visible and
the rest are predicted. Patch scaling is not supported: the k-CLIP codes are per patch of the model grid.
"""

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from train.compression import FULL, Setting
from train.config import Config, ConfigError
from train.methods.base import Method, register
from train.models.vit import ViTEncoder, init_mae_weights
from train.teachers.clip import FrozenTeacher, TeacherConfig
from train.teachers.tokenizer import KCLIPTokenizer, load_codebook


@dataclass
class MaPeTConfig:
    name: str = "mapet"
    default_views: ClassVar[str] = "mapet"  # data.views when the recipe does not set it (the official view)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    codebook: str = ""  # k-CLIP centroids, written by `python -m train.teachers.codebook --config <this config>`
    num_codes: int = 8192  # codebook size (the paper: 8192)
    num_visible: int = 49  # patches at the start of each order, never predicted (official least_number 50 incl. cls)

    def validate(self, cfg: Config) -> None:
        self.teacher.validate()
        num_patches = (cfg.model.img_size // cfg.model.patch_size) ** 2
        if not 1 <= self.num_visible < num_patches:
            raise ConfigError(f"method.num_visible={self.num_visible} must be in [1, {num_patches}) "
                              f"({num_patches} patches per image)")
        if self.num_codes < 2:
            raise ConfigError(f"method.num_codes={self.num_codes} must be >= 2")


def two_stream_mask(num_patches: int, num_visible: int) -> torch.Tensor:
    """Boolean attention mask (True: may attend) of the sequence [class token, N patches in permutation
    order, P mask tokens, P query tokens] with P = N - num_visible; row = query, column = key.

    In permutation ranks (class token -1, patches 0..N-1, mask and query tokens V..N-1):
    content rank a sees content b if b < V or b <= a, and mask tokens p > a; a mask token sees the
    visible content and every mask token; query q sees content b if b < V or b < q, and mask tokens
    p >= q. No token sees the query stream.
    """
    n, v = num_patches, num_visible
    p = n - v
    content = torch.arange(-1, n)  # ranks of the class token and the ordered patches
    predicted = torch.arange(v, n)  # ranks of the mask tokens and of the query tokens
    visible = content < v
    c, m = slice(0, 1 + n), slice(1 + n, 1 + n + p)
    q = slice(1 + n + p, 1 + n + 2 * p)
    mask = torch.zeros(1 + n + 2 * p, 1 + n + 2 * p, dtype=torch.bool)
    mask[c, c] = visible[None, :] | (content[None, :] <= content[:, None])
    mask[c, m] = predicted[None, :] > content[:, None]
    mask[m, c] = visible[None, :]
    mask[m, m] = True
    mask[q, c] = visible[None, :] | (content[None, :] < predicted[:, None])
    mask[q, m] = predicted[None, :] >= predicted[:, None]
    return mask


def mapet_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the predicted positions' logits (B, P, K) against their code ids (B, P), in float32."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


@register("mapet")
class MaPeT(Method):
    Config = MaPeTConfig
    supported_compression = ("token_dropout",)

    def __init__(self, cfg: Config):
        super().__init__()
        m = cfg.method
        self.encoder = ViTEncoder(cfg.model)
        self.num_visible = m.num_visible
        self.num_predicted = self.encoder.num_patches - m.num_visible
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.model.embed_dim))
        nn.init.normal_(self.mask_token, std=0.02)
        self.head = nn.Linear(cfg.model.embed_dim, m.num_codes)
        init_mae_weights(self.head)
        self.register_buffer("attn_mask", two_stream_mask(self.encoder.num_patches, m.num_visible), persistent=False)
        # frozen teacher + codebook: plain attributes, so DeepSpeed never casts, partitions, optimizes or saves them
        teacher = FrozenTeacher(m.teacher, self.encoder.grid_size, cfg.data.mean, cfg.data.std)
        self.tokenizer = KCLIPTokenizer(teacher, load_codebook(m.codebook, m.num_codes, m.teacher, teacher.out_dim))

    def visible_of(self, num_tokens: int) -> int:
        """Visible patches of an order of `num_tokens` patches: `num_visible` scaled, in [1, num_tokens - 1]."""
        if num_tokens == self.encoder.num_patches:
            return self.num_visible
        return min(max(1, round(self.num_visible * num_tokens / self.encoder.num_patches)), num_tokens - 1)

    def patch_order(self, batch: int, device: torch.device, compression: Setting = FULL) -> torch.Tensor:
        """(B, K) a random order of each image's patches; under token dropout a random subset of it."""
        order = torch.argsort(torch.rand(batch, self.encoder.num_patches, device=device), dim=1)
        keep = compression.keep_ids(batch, self.encoder.num_patches, device)
        if keep is None:
            return order
        return order.gather(1, keep.sort(dim=1).values)  # ranks kept in order: still a random permutation

    def predict(self, images: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """Code logits (B, P, K) of the patches `order[:, visible_of(len):]`, in that order."""
        batch, num_tokens = order.shape
        visible = self.visible_of(num_tokens)
        num_predicted = num_tokens - visible
        mask = self.attn_mask if num_tokens == self.encoder.num_patches else \
            two_stream_mask(num_tokens, visible).to(order.device)
        predicted = order[:, visible:]
        x = self.encoder(images, ids_keep=order, attn_mask=mask,
                         extra_tokens=self.mask_token.expand(batch, 2 * num_predicted, -1),
                         extra_ids=torch.cat([predicted, predicted], dim=1))
        return self.head(x[:, x.shape[1] - num_predicted:])

    def forward(self, batch: dict, step: int = 0):
        images = batch["images"]
        codes = self.tokenizer(batch.get("teacher_images", images))  # the un-jittered crop of data.views=mapet
        order = self.patch_order(images.shape[0], images.device, batch.get("compression", FULL))
        logits = self.predict(images, order)
        targets = codes.gather(1, order[:, self.visible_of(order.shape[1]):])
        loss = mapet_loss(logits, targets)
        accuracy = (logits.argmax(-1) == targets).float().mean()
        return loss, {"loss": loss.detach(), "token_acc": accuracy.detach()}

    def no_weight_decay(self) -> set[str]:
        return {"mask_token"}

    def tokens_per_image(self, compression: Setting = FULL) -> int:
        kept = compression.num_kept(self.encoder.num_patches)
        return kept + 2 * (kept - self.visible_of(kept))

    def flops_per_image(self, compression: Setting = FULL) -> float:
        """Training FLOPs per image: encoder (both streams) and head x 3, teacher forward and code assignment."""
        dim, codes = self.head.in_features, self.head.out_features
        kept = compression.num_kept(self.encoder.num_patches)
        num_predicted = kept - self.visible_of(kept)
        student = self.encoder.forward_flops(self.tokens_per_image(compression)) + 2 * num_predicted * dim * codes
        teacher = self.tokenizer.teacher
        assignment = 2 * self.encoder.num_patches * teacher.out_dim * codes
        return 3 * student + teacher.forward_flops() + assignment
