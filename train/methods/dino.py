"""DINO (Caron et al., 2021): self-distillation without labels. The student sees 2 global and N local crops
and matches, on every crop, the centred and sharpened output distribution its EMA teacher gives for the
*other* global crops."""

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from train.compression import FULL, Setting, encode
from train.config import Config, ConfigError
from train.methods.base import Method, register
from train.methods.invariance import crop_major, encoded_tokens, require_views
from train.models.ema import EMA, autocast_like, cosine_momentum
from train.models.heads import DINOHead, linear_flops
from train.models.vit import ViTEncoder
from train.weights import ENCODER_PREFIX


@dataclass
class DINOConfig:
    name: str = "dino"
    default_views: ClassVar[str] = "dino"  # data.views when the recipe does not set it
    out_dim: int = 65536  # prototypes (K) of the head's output
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    head_layers: int = 3
    norm_last_layer: bool = True  # fix the norm of the last layer's weights (more stable; False can be better)
    momentum_teacher: float = 0.996  # teacher EMA at step 0, rising to 1 on a half cosine
    student_temp: float = 0.1
    warmup_teacher_temp: float = 0.04  # teacher temperature at step 0 ...
    teacher_temp: float = 0.04  # ... rising linearly to this ...
    warmup_teacher_temp_epochs: float = 0.0  # ... over these epochs (the paper's ViT-B: 0.04 -> 0.07 over 50)
    center_momentum: float = 0.9
    freeze_last_layer: float = 1.0  # epochs during which the head's last layer gets no gradient

    def validate(self, cfg: Config) -> None:
        require_views(cfg, self.name, ("dino",))
        for key in ("student_temp", "warmup_teacher_temp", "teacher_temp"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"method.{key}={getattr(self, key)} must be > 0")
        for key in ("momentum_teacher", "center_momentum"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"method.{key}={getattr(self, key)} must be in [0, 1]")
        if self.head_layers < 1 or min(self.out_dim, self.hidden_dim, self.bottleneck_dim) < 1:
            raise ConfigError("method.head_layers, out_dim, hidden_dim and bottleneck_dim must be >= 1")
        if self.warmup_teacher_temp_epochs < 0 or self.freeze_last_layer < 0:
            raise ConfigError("method.warmup_teacher_temp_epochs and method.freeze_last_layer must be >= 0")
        if cfg.data.local_crops and cfg.data.local_size % cfg.model.patch_size:
            raise ConfigError(f"data.local_size={cfg.data.local_size} is not divisible by "
                              f"model.patch_size={cfg.model.patch_size}")
        unknown_epoch = cfg.data.train and not cfg.data.train.endswith(".json") and cfg.data.num_samples <= 0
        if unknown_epoch and (self.warmup_teacher_temp_epochs or self.freeze_last_layer):
            raise ConfigError("method.warmup_teacher_temp_epochs and method.freeze_last_layer count epochs: point "
                              "data.train at a manifest .json or set data.num_samples")


def dino_loss(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, student_temp: float,
              teacher_temp: float) -> torch.Tensor:
    """Mean over (teacher view t, student view s != t) pairs and images of the cross-entropy between the
    teacher's centred, sharpened distribution softmax((teacher[t] - center) / teacher_temp) and the
    student's softmax(student[s] / student_temp). student (V, B, K) with views 0 and 1 the two global crops,
    teacher (2, B, K) for those, center (1, K). Computed in fp32."""
    log_p_student = F.log_softmax(student.float() / student_temp, dim=-1)
    p_teacher = F.softmax((teacher.float() - center) / teacher_temp, dim=-1).detach()
    ce = -torch.einsum("tbk,sbk->tsb", p_teacher, log_p_student).mean(dim=-1)  # (2, V)
    same_view = torch.eye(*ce.shape, dtype=torch.bool, device=ce.device)
    return ce[~same_view].mean()


@torch.no_grad()
def updated_center(center: torch.Tensor, teacher: torch.Tensor, momentum: float) -> torch.Tensor:
    """center * momentum + (1 - momentum) * the mean teacher output over the global batch (all-reduced)."""
    outputs = teacher.float().flatten(0, -2)
    batch_sum = outputs.sum(dim=0, keepdim=True)
    count = outputs.shape[0]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(batch_sum)
        count *= dist.get_world_size()
    return center * momentum + batch_sum / count * (1 - momentum)


@register("dino")
class DINO(Method):
    """Compression (train/compression.py): token dropout on the student's crops, patch scaling on every crop
    of student and teacher (the teacher always sees every token of its grid)."""

    Config = DINOConfig
    supported_compression = ("token_dropout", "patch_scaling")
    teachers = ("teacher",)
    export_prefixes = (ENCODER_PREFIX, "_extra_state")  # the teacher lives in the extra state
    # the centre is the teacher outputs' batch mean: no gradient accumulation unless accepted (train/config.py)
    batch_coupled = "centre (the teacher outputs' batch mean)"
    freezable = ("head.last_layer.",)  # own optimizer groups, left out of the optimizer step while `frozen`

    def __init__(self, cfg: Config):
        super().__init__()
        m = self.cfg = cfg.method
        self.encoder = ViTEncoder(cfg.model)
        self.head = DINOHead(cfg.model.embed_dim, m.out_dim, m.hidden_dim, m.bottleneck_dim, m.head_layers,
                             m.norm_last_layer)
        self.teacher = EMA(self.online())  # fp32, eval mode (no drop path), outside DeepSpeed
        self.center = torch.zeros(1, m.out_dim)  # fp32, outside DeepSpeed; saved by get_extra_state
        self.local_crops, self.local_size = cfg.data.local_crops, cfg.data.local_size
        # set_total_steps (called by the engine) turns the epoch-based knobs into steps
        self.total_steps, self.freeze_steps, self.teacher_temp_warmup_steps = max(1, cfg.train.steps), 0, 0

    def online(self) -> nn.ModuleDict:
        """The part the teacher tracks (encoder + head), grouped on the fly, never registered."""
        return nn.ModuleDict({"encoder": self.encoder, "head": self.head})

    def set_total_steps(self, total_steps: int, steps_per_epoch: int | None = None) -> None:
        m = self.cfg
        if steps_per_epoch is None and (m.warmup_teacher_temp_epochs or m.freeze_last_layer):
            raise ConfigError("method.warmup_teacher_temp_epochs and method.freeze_last_layer count epochs: point "
                              "data.train at a manifest .json or set data.num_samples")
        self.total_steps = total_steps
        self.freeze_steps = round(m.freeze_last_layer * (steps_per_epoch or 0))
        self.teacher_temp_warmup_steps = round(m.warmup_teacher_temp_epochs * (steps_per_epoch or 0))

    def frozen(self, step: int) -> tuple[str, ...]:
        """The `freezable` parameters the optimizer leaves alone at `step`: the head's last layer during the first
        `freeze_last_layer` epochs, as the official `cancel_gradients_last_layer` (no update, no weight decay,
        no Adam state until it trains)."""
        return self.freezable if step < self.freeze_steps else ()

    def teacher_temp_at(self, step: int) -> float:
        m, warmup = self.cfg, self.teacher_temp_warmup_steps
        if step >= warmup:
            return m.teacher_temp
        return m.warmup_teacher_temp + (m.teacher_temp - m.warmup_teacher_temp) * step / warmup

    def momentum_at(self, step: int) -> float:
        """The teacher momentum applied after step index `step`."""
        return cosine_momentum(step, self.total_steps, self.cfg.momentum_teacher)

    def forward(self, batch: dict, step: int = 0):
        views, compression = batch["views"], batch.get("compression", FULL)
        b, device = views.shape[0], views.device
        global_crops = crop_major(views)
        crops = [global_crops] + ([crop_major(batch["local_views"])] if "local_views" in batch else [])
        # one pass per resolution; each draws its own token-dropout subsets
        features = torch.cat([encode(self.encoder, crop, compression, stream=i, pool="token")
                              for i, crop in enumerate(crops)])
        student = self.head(features, freeze_last_layer=bool(self.frozen(step))).unflatten(0, (-1, b))
        with torch.no_grad():
            teacher = self.teacher.on(device)
            with autocast_like(self.encoder, device):
                features = encode(teacher["encoder"], global_crops, compression, dropout=False, pool="token")
                teacher_out = teacher["head"](features).unflatten(0, (2, b))
        self.center = self.center.to(device)
        temp = self.teacher_temp_at(step)
        loss = dino_loss(student, teacher_out, self.center, self.cfg.student_temp, temp)
        with torch.no_grad():  # collapse monitors: teacher entropy -> 0 (one prototype) or -> log K (uniform)
            log_p = F.log_softmax((teacher_out.float() - self.center) / temp, dim=-1)
            entropy = -(log_p.exp() * log_p).sum(dim=-1).mean()
        self.center = updated_center(self.center, teacher_out, self.cfg.center_momentum)
        report = {"loss": loss.detach(), "teacher_entropy": entropy, "kl": loss.detach() - entropy,
                  "teacher_temp": loss.new_full((), temp), "momentum": loss.new_full((), self.momentum_at(step))}
        return loss, report

    def on_step_end(self, step: int) -> None:
        self.teacher.update(self.online(), self.momentum_at(step - 1))

    def eval_encoder(self) -> ViTEncoder:
        """The teacher's encoder: DINO evaluates and releases the teacher, which outperforms the student."""
        return self.teacher.on(self.encoder.vit.cls_token.device)["encoder"]

    @classmethod
    def timm_state(cls, state: dict, student: bool = False) -> dict[str, torch.Tensor]:
        """The teacher's encoder (what DINO evaluates and releases), or the student's."""
        if student:
            return super().timm_state(state)
        teacher = state["_extra_state"]["teacher"]
        return {k.removeprefix(ENCODER_PREFIX): v.float() for k, v in teacher.items() if k.startswith(ENCODER_PREFIX)}

    def get_extra_state(self) -> dict:
        return {**self.teacher_state(), "center": self.center.detach().cpu()}

    def set_extra_state(self, state: dict) -> None:
        self.load_teacher_state(state)
        self.center = state["center"].float()

    def flops_per_image(self, compression: Setting = FULL) -> float:
        """Student forward + backward (x3) on every crop, teacher forward on the two global crops."""
        enc, head, size = self.encoder, linear_flops(self.head), self.encoder.cfg.img_size
        global_crop = enc.forward_flops(encoded_tokens(enc, size, compression)) + head
        local_crop = enc.forward_flops(encoded_tokens(enc, self.local_size, compression)) + head
        teacher_crop = enc.forward_flops(encoded_tokens(enc, size, compression, dropout=False)) + head
        return 3 * (2 * global_crop + self.local_crops * local_crop) + 2 * teacher_crop

    def tokens_per_image(self, compression: Setting = FULL) -> int:
        """Patch tokens through the student (2 global + N local crops)."""
        enc = self.encoder
        return (2 * encoded_tokens(enc, enc.cfg.img_size, compression)
                + self.local_crops * encoded_tokens(enc, self.local_size, compression))
