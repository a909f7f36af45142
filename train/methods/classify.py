"""Supervised classification on a pretrained encoder: MAE/BEiT fine-tuning and MAE's linear probe.

Both are ordinary methods on the engine (DeepSpeed, checkpoints, exact resume, preemption), so
`python -m train.eval.finetune` / `linear_probe` are pretraining runs with labels:

- `finetune`: whole network trained; mean-pooled patch tokens + fc_norm (MAE's global_pool, the
  encoder's final norm moves after pooling) or the class token; timm's Mixup/CutMix with label
  smoothing (SoftTargetCrossEntropy), else LabelSmoothingCrossEntropy; timm's RandomErasing on the
  normalised batch; drop path = `model.drop_path`; layer-wise lr decay = `optim.layer_decay`
  (layer groups from `group_matcher`, as timm/BEiT).
- `linear_probe`: frozen encoder (eval mode, no gradients, bf16 autocast on GPU), class token (or
  mean) -> BatchNorm without affine -> Linear (MAE), trained with `optim.optimizer=lars` or `sgd`.
"""

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn

from data_pipeline.shards import num_classes_of
from train.compression import FULL, Setting
from train.config import Config, ConfigError
from train.methods.base import METHODS, Method, register
from train.models.heads import PROBE_BN_EPS, probe_head
from train.models.vit import ViTEncoder, pooled_features
from train.weights import ENCODER_PREFIX, check_same_architecture, load_encoder, resolve_source

log = logging.getLogger("train")
POOLS = ("avg", "token")


@dataclass
class FinetuneConfig:
    name: str = "finetune"
    default_views: ClassVar[str] = "finetune"  # data.views when the recipe does not set it
    init: str = ""  # pretrained encoder: run dir, checkpoint dir, step_N dir or export; "" = random init
    num_classes: int = 0  # 0: the count the data.train / data.val manifests list
    pool: str = "avg"  # avg: mean of patch tokens + fc_norm (MAE fine-tuning); token: class token after the norm
    head_init_std: float = 2e-5  # trunc-normal std of the head weights (MAE)
    label_smoothing: float = 0.1
    mixup: float = 0.8  # Mixup alpha (0: off)
    cutmix: float = 1.0  # CutMix alpha (0: off)
    mixup_prob: float = 1.0  # probability of mixing a batch at all
    mixup_switch_prob: float = 0.5  # probability of CutMix instead of Mixup when both are on
    random_erase: float = 0.25  # RandomErasing probability per image ("pixel" mode)

    def validate(self, cfg: Config) -> None:
        validate_classifier(self, cfg)
        if self.mixup < 0 or self.cutmix < 0 or not 0 <= self.label_smoothing < 1:
            raise ConfigError("method.mixup and method.cutmix must be >= 0 and method.label_smoothing in [0, 1)")
        if not (0 <= self.mixup_prob <= 1 and 0 <= self.mixup_switch_prob <= 1 and 0 <= self.random_erase <= 1):
            raise ConfigError("method.mixup_prob, method.mixup_switch_prob and method.random_erase must be in [0, 1]")
        if (self.mixup or self.cutmix) and cfg.data.batch_size % 2:
            raise ConfigError(f"data.batch_size={cfg.data.batch_size} must be even for Mixup/CutMix (pairs mix)")


@dataclass
class LinearProbeConfig:
    name: str = "linear_probe"
    init: str = ""  # pretrained encoder (as for finetune); "" = a random encoder (a baseline)
    num_classes: int = 0
    pool: str = "token"  # token: class token after the final norm (MAE); avg: mean of the normed patch tokens
    head_init_std: float = 0.01

    def validate(self, cfg: Config) -> None:
        validate_classifier(self, cfg)


def validate_classifier(m, cfg: Config) -> None:
    """Checks both methods share: pooling, class counts of the manifests, the init checkpoint's architecture."""
    if m.pool not in POOLS:
        raise ConfigError(f"method.pool={m.pool!r}: choose one of {POOLS}")
    if m.head_init_std <= 0:
        raise ConfigError(f"method.head_init_std={m.head_init_std} must be > 0")
    if cfg.data.train:  # else the embedded digits, written later
        if not num_classes_of(cfg.data.train, cfg.data.val, m.num_classes):
            raise ConfigError("method.num_classes: set it, or point data.train at a manifest .json listing classes")
    if m.init:
        check_same_architecture(resolve_source(m.init, "method.init"), cfg.model, "method.init")


def pretrained_encoder(cfg: Config) -> ViTEncoder:
    """The encoder of `method.init` as its method exports it (position embeddings resampled to model.img_size),
    or a fresh one."""
    if not cfg.method.init:
        log.warning("method.init is empty: %s starts from a randomly initialised encoder", cfg.method.name)
        return ViTEncoder(cfg.model)
    source = resolve_source(cfg.method.init, "method.init")
    check_same_architecture(source, cfg.model, "method.init")
    log.info("encoder from %s (method %s, step %s)", source.path, source.meta.get("method"), source.meta.get("step"))
    return load_encoder(source, METHODS, cfg.model)


def resolved_num_classes(cfg: Config) -> int:
    n = num_classes_of(cfg.data.train, cfg.data.val, cfg.method.num_classes)
    if not n:
        raise ConfigError("method.num_classes: set it, or point data.train at a manifest .json listing classes")
    return n


def check_labels_once(module: nn.Module, labels: torch.Tensor, num_classes: int) -> None:
    """A clear error for unlabelled shards or labels beyond the class count (one host sync, first step only)."""
    if getattr(module, "_labels_checked", False):
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0:
        raise ValueError("data.train: samples without a class label (no .cls in the shards)")
    if high >= num_classes:
        raise ValueError(f"data.train: label {high} but method.num_classes={num_classes} (mismatched class count)")
    module._labels_checked = True


@register("finetune")
class Finetune(Method):
    Config = FinetuneConfig
    export_prefixes = (ENCODER_PREFIX, "fc_norm.", "head.")

    def __init__(self, cfg: Config):
        super().__init__()
        m = self.cfg = cfg.method
        self.num_classes = resolved_num_classes(cfg)
        self.encoder = pretrained_encoder(cfg)
        dim = cfg.model.embed_dim
        if m.pool == "avg":  # MAE/BEiT: no norm before pooling, a fresh LayerNorm after it (timm's fc_norm)
            self.encoder.vit.norm = nn.Identity()
            self.fc_norm = nn.LayerNorm(dim, eps=1e-6)
        else:
            self.fc_norm = nn.Identity()
        self.head = nn.Linear(dim, self.num_classes)
        nn.init.trunc_normal_(self.head.weight, std=m.head_init_std)
        nn.init.zeros_(self.head.bias)
        self.mixup = None
        if m.mixup > 0 or m.cutmix > 0:
            self.mixup = Mixup(mixup_alpha=m.mixup, cutmix_alpha=m.cutmix, prob=m.mixup_prob,
                               switch_prob=m.mixup_switch_prob, label_smoothing=m.label_smoothing,
                               num_classes=self.num_classes)
            self.criterion = SoftTargetCrossEntropy()
        elif m.label_smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(m.label_smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()
        self.erase = RandomErasing(m.random_erase, mode="pixel", device="cpu") if m.random_erase > 0 else None

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc_norm(self.encoder(images, pool=self.cfg.pool)))

    def forward(self, batch: dict, step: int = 0):
        images, labels = batch["images"], batch["labels"]
        check_labels_once(self, labels, self.num_classes)
        targets = labels
        if self.training:
            images = images.clone()  # erasing and mixing work in place
            if self.erase is not None:
                self.erase.device = images.device
                images = self.erase(images)
            if self.mixup is not None:
                images, targets = self.mixup(images, labels)
        loss = self.criterion(self.logits(images).float(), targets)
        return loss, {"loss": loss.detach()}

    def group_matcher(self, coarse: bool = False) -> dict:
        """Layer groups for layer-wise lr decay: stem, then one per block; the rest (final norm, fc_norm, head)
        is left unmatched, so it falls in the last layer with scale 1, as MAE's `get_layer_id_for_vit`."""
        return {"stem": r"^encoder\.vit\.(?:cls_token|pos_embed|patch_embed)",
                "blocks": [(r"^encoder\.vit\.blocks\.(\d+)", None)]}

    def flops_per_image(self, compression: Setting = FULL) -> float:
        return 3 * self.encoder.forward_flops(self.encoder.num_patches)

    def tokens_per_image(self, compression: Setting = FULL) -> int:
        return self.encoder.num_patches

    @classmethod
    def timm_state(cls, state: dict, student: bool = False) -> dict[str, torch.Tensor]:
        """The encoder plus timm's fc_norm (average pooling) and head."""
        out = super().timm_state(state)
        out.update({k: v for k, v in state.items() if k.startswith(("fc_norm.", "head."))})
        return out


@register("linear_probe")
class LinearProbe(Method):
    Config = LinearProbeConfig
    export_prefixes = (ENCODER_PREFIX, "head.")

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg.method
        self.num_classes = resolved_num_classes(cfg)
        self.encoder = pretrained_encoder(cfg).requires_grad_(False).eval()
        self.head = probe_head(cfg.model.embed_dim, self.num_classes, self.cfg.head_init_std)

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()  # frozen: no drop path, ever
        return self

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = pooled_features(self.encoder, images, self.cfg.pool)
        return self.head(features.to(self.head[1].weight.dtype))

    def forward(self, batch: dict, step: int = 0):
        labels = batch["labels"]
        check_labels_once(self, labels, self.num_classes)
        logits = self.logits(batch["images"]).float()
        loss = F.cross_entropy(logits, labels)
        top1 = (logits.argmax(dim=1) == labels).float().mean() * 100
        return loss, {"loss": loss.detach(), "top1": top1.detach()}

    def flops_per_image(self, compression: Setting = FULL) -> float:
        return self.encoder.forward_flops(self.encoder.num_patches)  # forward only

    def tokens_per_image(self, compression: Setting = FULL) -> int:
        return self.encoder.num_patches

    @classmethod
    def timm_state(cls, state: dict, student: bool = False) -> dict[str, torch.Tensor]:
        """The encoder plus the head as timm's one Linear: the BatchNorm (no affine) folded in, exactly:
        W (x - m) / s + b = (W / s) x + (b - W m / s)."""
        out = super().timm_state(state)
        scale = (state["head.0.running_var"] + PROBE_BN_EPS).rsqrt()
        weight = state["head.1.weight"] * scale
        out["head.weight"] = weight
        out["head.bias"] = state["head.1.bias"] - weight @ state["head.0.running_mean"]
        return out
