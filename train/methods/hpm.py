"""HPM (Wang et al., CVPR 2023): MAE that learns where reconstruction is hard and masks there.

Besides MAE's pixel decoder, a second decoder branch (the loss predictor) predicts every patch's
reconstruction loss: it shares the pixel decoder's input (`decoder_embed`, `mask_token`, positions)
and has its own blocks, norm and Linear(decoder_dim, p*p*3), averaged to one value per patch.
It is trained with a relative objective: for each pair of masked patches of
an image, binary cross-entropy on sigmoid(p_i - p_j) against "patch i's real loss is larger than
patch j's" (the real losses are the detached per-patch MSEs of the same step). Masks come from
an EMA teacher (of the whole model, as timm's ModelEma there) run on the unmasked image: a share of the masked
patches, growing linearly over training (easy to hard), is the teacher's top predicted-hard
patches; the rest are random. Targets are raw pixels by default (`norm_pix_loss` off, as the released
scripts). As the official code (Haochen-Wang409/HPM, models_mae_learn_loss.py, engine_pretrain.py).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from train.compression import FULL, Setting, drop_visible
from train.config import Config, ConfigError
from train.methods.base import Method, register
from train.methods.mae import MAEConfig
from train.models.decoder import LayerNorm, MAEDecoder, decoder_blocks
from train.models.ema import EMA
from train.models.losses import per_patch_loss
from train.models.masking import masking_from_scores
from train.models.patches import patchify, unpatchify
from train.models.vit import ViTEncoder, init_mae_weights


@dataclass
class HPMConfig(MAEConfig):
    name: str = "hpm"
    norm_pix_loss: bool = False  # the released scripts' default (raw pixels); true: MAE's normalised targets
    # share of the masked patches taken from the teacher's top predicted-hard ones: linear from
    # [0] at the first step to [1] at the last (official: (epoch + 1) / epochs x 0.5); the rest random
    hard_share: tuple[float, float] = (0.0, 0.5)
    predictor_weight: float = 1.0  # total loss = reconstruction + weight x relative loss-prediction loss
    # EMA teacher, in epochs as the official engine_pretrain.py: momentum [0] + epoch / ema_ramp_epochs x
    # ([1] - [0]) for the first ema_ramp_epochs epochs (integer epochs), then [1]. The official values hold
    # per step at ema_steps_per_epoch steps per epoch (ImageNet-1K's 1,281,167 images at the scripts' batch
    # 256); a run with S steps per epoch steps at m ^ (ema_steps_per_epoch / S), which averages over the
    # same number of epochs at any global batch or data size. ema_steps_per_epoch 0: m per step as given.
    ema_momentum: tuple[float, float] = (0.999, 0.9999)
    ema_ramp_epochs: float = 100.0
    ema_steps_per_epoch: int = 5004

    def validate(self, cfg: Config) -> None:
        super().validate(cfg)
        for key in ("hard_share", "ema_momentum"):
            if not all(0.0 <= v <= 1.0 for v in getattr(self, key)):
                raise ConfigError(f"method.{key}={getattr(self, key)}: both values must be in [0, 1]")
        if self.ema_ramp_epochs < 0 or self.ema_steps_per_epoch < 0:
            raise ConfigError(f"method.ema_ramp_epochs={self.ema_ramp_epochs} and method.ema_steps_per_epoch="
                              f"{self.ema_steps_per_epoch} must be >= 0")
        if self.predictor_weight < 0:
            raise ConfigError(f"method.predictor_weight={self.predictor_weight} must be >= 0")
        num_patches = (cfg.model.img_size // cfg.model.patch_size) ** 2
        if num_patches - int(num_patches * (1 - self.mask_ratio)) < 2:
            raise ConfigError(f"method.mask_ratio={self.mask_ratio} masks fewer than 2 of {num_patches} patches: "
                              "the relative loss needs pairs of masked patches")


def hard_share_at(step: int, total_steps: int, start: float, end: float) -> float:
    """Share of masked patches chosen as predicted-hard at 0-based `step`: `end` at the last step."""
    return start + (end - start) * min(1.0, (step + 1) / total_steps)


def ema_momentum_at(step: int, steps_per_epoch: int, start: float, end: float, ramp_epochs: float,
                    reference_steps_per_epoch: int) -> float:
    """Teacher momentum for the update after 0-based optimizer step `step` (HPM's rule, see HPMConfig)."""
    epoch = step // steps_per_epoch
    momentum = start + (end - start) * epoch / ramp_epochs if epoch < ramp_epochs else end
    return momentum ** (reference_steps_per_epoch / steps_per_epoch) if reference_steps_per_epoch else momentum


def hard_patch_masking(difficulty: torch.Tensor, num_keep: int, share: float,
                       generator: torch.Generator | None = None):
    """Mask the int(share x masked) patches of highest `difficulty` (B, N), the other masked ones at random.

    Returns MAE's (ids_keep, ids_restore, mask) (mask 1 = removed) and `hard` (B, N), True where
    a patch was masked because it is among the top predicted-hard.
    """
    batch, num_tokens = difficulty.shape
    num_hard = int((num_tokens - num_keep) * share)
    scores = torch.rand(batch, num_tokens, device=difficulty.device, generator=generator)  # in [0, 1)
    hard = torch.zeros(batch, num_tokens, dtype=torch.bool, device=difficulty.device)
    if num_hard > 0:
        hard.scatter_(1, difficulty.topk(num_hard, dim=1).indices, True)
        scores = scores.masked_fill(hard, 2.0)  # above every random score: never among the kept lowest
    ids_keep, ids_restore, mask = masking_from_scores(scores, num_keep)
    return ids_keep, ids_restore, mask, hard


def _pairs(predicted: torch.Tensor, real: torch.Tensor, mask: torch.Tensor):
    """Pairwise (i, j) differences p_i - p_j, sign(t_i - t_j), and validity (both masked, t_i != t_j)."""
    diff = predicted.float().unsqueeze(2) - predicted.float().unsqueeze(1)
    order = torch.sign(real.float().unsqueeze(2) - real.float().unsqueeze(1))
    both = mask.unsqueeze(2) * mask.unsqueeze(1)
    valid = both * (order != 0)
    return diff, order, valid


def relative_loss(predicted: torch.Tensor, real: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """HPM's relative loss-prediction objective over the masked patches of each image.

    For every ordered pair (i, j) of masked patches with real losses t_i != t_j: binary
    cross-entropy of sigmoid(p_i - p_j) against [t_i > t_j]; ties ignored; averaged over the valid
    pairs of the batch. Depends on the real losses only through their order within each image.
    `real` must be detached (it is the target).
    """
    diff, order, valid = _pairs(predicted, real, mask)
    bce = F.binary_cross_entropy_with_logits(diff, (order > 0).float(), reduction="none")
    return (bce * valid).sum() / valid.sum().clamp(min=1)


@torch.no_grad()
def kendall_tau(predicted: torch.Tensor, real: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Kendall's tau between predicted and real per-patch losses over the masked pairs (pooled over the batch)."""
    diff, order, valid = _pairs(predicted, real, mask)
    return (torch.sign(diff) * order * valid).sum() / valid.sum().clamp(min=1)


def _rank01(values: torch.Tensor) -> torch.Tensor:
    """Per-row ranks scaled to [0, 1] (0 = lowest)."""
    return values.argsort(dim=1).argsort(dim=1).float() / max(1, values.shape[1] - 1)


class LossPredictor(nn.Module):
    """HPM's loss predictor on the pixel decoder's input tokens (B, 1 + N, D): its own decoder blocks, norm
    and Linear(D, p*p*3), averaged over the last dim -> one predicted loss per patch (B, N)."""

    def __init__(self, dim: int, depth: int, num_heads: int, out_dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.blocks = decoder_blocks(dim, depth, num_heads, mlp_ratio)
        self.norm = LayerNorm(dim)
        self.pred = nn.Linear(dim, out_dim)
        init_mae_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pred(self.norm(self.blocks(x))[:, 1:]).mean(dim=-1)


@register("hpm")
class HPM(Method):
    """Compression (train/compression.py): token dropout keeps `keep_ratio` of the visible patches the
    teacher-guided masking leaves (the dropped ones are reconstructed and ranked like the masked ones);
    the teacher still scores every patch. No patch scaling (the loss predictor works on the model's grid)."""

    Config = HPMConfig
    teachers = ("teacher",)
    supported_compression = ("token_dropout",)

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg.method
        m = cfg.method
        self.encoder = ViTEncoder(cfg.model)
        self.num_keep = int(self.encoder.num_patches * (1 - m.mask_ratio))
        self.decoder = MAEDecoder(self.encoder.grid_size, cfg.model.embed_dim, m.decoder_dim, m.decoder_depth,
                                  m.decoder_heads, out_dim=cfg.model.patch_size**2 * 3)
        self.loss_predictor = LossPredictor(m.decoder_dim, m.decoder_depth, m.decoder_heads,
                                            cfg.model.patch_size**2 * 3)
        # fp32 teacher outside the module tree (DeepSpeed must not cast, partition or optimize it)
        self.teacher = EMA(self._student())
        self.total_steps = cfg.train.steps  # the engine calls set_total_steps (needed for epoch-based runs)
        self.steps_per_epoch = None  # ... and gives the steps per epoch (the teacher's schedule is in epochs)
        self.share = m.hard_share[0]  # of the last forward, for visualize()
        pixels = cfg.model.patch_size**2  # data mean / std laid out as a patchified patch (channel fastest)
        self.patch_mean = torch.tensor(cfg.data.mean).repeat(pixels)
        self.patch_std = torch.tensor(cfg.data.std).repeat(pixels)

    def _student(self) -> nn.ModuleDict:
        """The parts the teacher averages (a fresh unregistered container over the registered modules)."""
        return nn.ModuleDict({"encoder": self.encoder, "decoder": self.decoder, "loss_predictor": self.loss_predictor})

    def set_total_steps(self, total_steps: int, steps_per_epoch: int | None = None) -> None:
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch

    def hard_share(self, step: int) -> float:
        if self.total_steps <= 0:
            raise RuntimeError("HPM needs the run length for its schedules: call set_total_steps() first")
        return hard_share_at(step, self.total_steps, *self.cfg.hard_share)

    @torch.no_grad()
    def teacher_difficulty(self, images: torch.Tensor) -> torch.Tensor:
        """The EMA teacher's predicted loss of every patch of the unmasked images (B, N), float32."""
        teacher = self.teacher.on(images.device)
        bf16 = self.encoder.vit.patch_embed.proj.weight.dtype == torch.bfloat16  # run it as the student runs
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16):
            latent = teacher["encoder"](images)
            in_order = torch.arange(self.encoder.num_patches, device=images.device).expand(images.shape[0], -1)
            return teacher["loss_predictor"](teacher["decoder"].tokens(latent, in_order)).float()

    def _run(self, images: torch.Tensor, share: float, compression: Setting = FULL):
        """Teacher-guided masking, encoder on the visible patches, both decoder branches."""
        difficulty = self.teacher_difficulty(images)
        ids_keep, ids_restore, mask, hard = hard_patch_masking(difficulty, self.num_keep, share)
        ids_keep, ids_restore, mask = drop_visible(ids_keep, ids_restore, mask, compression)
        pred, tokens = self.decoder(self.encoder(images, ids_keep), ids_restore, with_tokens=True)
        predicted_loss = self.loss_predictor(tokens)  # on the pixel decoder's input tokens, as the official code
        real_loss = per_patch_loss(pred, patchify(images, self.encoder.patch_size), self.cfg.norm_pix_loss)
        return real_loss, predicted_loss, difficulty, mask, hard, pred

    def forward(self, batch: dict, step: int = 0):
        self.share = self.hard_share(step)
        real_loss, predicted_loss, difficulty, mask, _, _ = self._run(batch["images"], self.share,
                                                                      batch.get("compression", FULL))
        recon = (real_loss * mask).sum() / mask.sum()  # mae_loss from the per-patch losses computed once
        target = real_loss.detach()  # the predictor learns the order of these; no gradient into them
        rank = relative_loss(predicted_loss, target, mask)
        loss = recon + self.cfg.predictor_weight * rank
        return loss, {
            "loss": loss.detach(), "recon_loss": recon.detach(), "predictor_loss": rank.detach(),
            "predictor_kendall": kendall_tau(predicted_loss, target, mask),
            "teacher_kendall": kendall_tau(difficulty, target, mask),
            "hard_share": torch.full((), self.share, device=loss.device),  # a fill, no host-device copy
        }

    def on_step_end(self, step: int) -> None:
        m = self.cfg
        if not self.steps_per_epoch:
            raise ConfigError("method.name=hpm: the teacher's schedule is in epochs; give data.train's sample count "
                              "(a manifest .json or data.num_samples)")
        momentum = ema_momentum_at(step - 1, self.steps_per_epoch, *m.ema_momentum, m.ema_ramp_epochs,
                                   m.ema_steps_per_epoch)
        self.teacher.update(self._student(), momentum)

    def _as_patches(self, rgb: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Colours in [0, 1] ((3,) or (B, N, 1) grey) as whole patches in normalised units, like `like`."""
        rgb = (rgb.repeat(self.encoder.patch_size**2) if rgb.ndim == 1 else rgb).to(like)
        return ((rgb - self.patch_mean.to(like)) / self.patch_std.to(like)).expand_as(like)

    @torch.no_grad()
    def visualize(self, batch: dict, n: int = 8) -> dict[str, torch.Tensor]:
        """Rows of: original | mask (red: chosen as predicted-hard, grey: random) | teacher's predicted
        difficulty | reconstruction with the visible patches pasted back | real per-patch loss
        (grey levels are per-image ranks, white = hardest)."""
        images = batch["images"][:n]
        real_loss, _, difficulty, mask, hard, pred = self._run(images, self.share)
        target = patchify(images, self.encoder.patch_size).float()
        pred = pred.float()
        if self.cfg.norm_pix_loss:  # undo the per-patch normalisation with the true patch statistics
            pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
        m, h = mask.unsqueeze(-1), hard.unsqueeze(-1).float()
        grey = self._as_patches(torch.tensor([0.5, 0.5, 0.5]), target)
        red = self._as_patches(torch.tensor([1.0, 0.0, 0.0]), target)
        chosen = target * (1 - m) + grey * (m - h) + red * h
        p = self.encoder.patch_size
        columns = [images.float(), unpatchify(chosen, p),
                   unpatchify(self._as_patches(_rank01(difficulty).unsqueeze(-1), target), p),
                   unpatchify(target * (1 - m) + pred * m, p),
                   unpatchify(self._as_patches(_rank01(real_loss).unsqueeze(-1), target), p)]
        return {"hard_patches": torch.cat(columns, dim=3)}

    def flops_per_image(self, compression: Setting = FULL) -> float:
        """Training FLOPs per image: student (forward x 3) on the kept tokens with both decoder branches,
        plus the teacher's forward of the encoder and loss predictor on all tokens."""
        student = self.encoder.forward_flops(self.tokens_per_image(compression)) + self.decoder.forward_flops() * 2
        teacher = self.encoder.forward_flops(self.encoder.num_patches) + self.decoder.forward_flops()
        return 3 * student + teacher

    def tokens_per_image(self, compression: Setting = FULL) -> int:
        return compression.num_kept(self.num_keep)
