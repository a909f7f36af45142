"""Progressive sequence compression for any method, and the gradient error it causes.

Two knobs shorten the encoder's token sequence (Lin et al., "Accelerating Augmentation Invariance
Pretraining", NeurIPS 2024):
- token dropout: keep a random `keep_ratio` of the patch tokens before the blocks (timm's
  PatchDropout semantics); methods that mask already (MAE) keep that share of their visible tokens;
- patch scaling: cut the image into larger patches (`patch_scale` x the model's patch size) with the
  patch projection and position embeddings resampled from the one stored set (FlexiViT; see
  `ViTEncoder.embed`), so the same weights serve every size and export unchanged.

Both follow a schedule that is a pure function of training progress (`schedule_value`): strong
early, relaxed to full tokens by a fraction of training. Each step the engine puts that step's
`Setting` into the batch as `batch["compression"]`; a method that supports compression (class
attribute `supported_compression`) applies it, e.g. with `encode`.

This package is the pure part (schedules, `Setting`, `encode`; methods import it).
`diagnostic.GradientDiagnostic` measures, on the same batch, weights and RNG, how far the gradient under a
setting is from the full-token gradient (cosine similarity, relative norm error); the engine runs it
every `compression.diagnose_every` steps. `python -m train.compression` (`__main__.py`) sweeps settings on
a checkpoint and prints a table with the paper's cost-adjusted error to choose a schedule.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch

from train.config import CompressionConfig, Config, ConfigError, ScheduleConfig
from train.models.masking import masking_from_scores, random_masking
from train.models.vit import patch_grid

KINDS = ("constant", "step", "linear", "cosine", "piecewise")
KNOBS = {"keep_ratio": "token_dropout", "patch_scale": "patch_scaling"}


def schedule_value(schedule: ScheduleConfig, progress: float) -> float:
    """The scheduled value at `progress` (fraction of training done, clipped to [0, 1]).

    constant: `start` throughout. step / linear / cosine go from `start` at 0 to `end` at `until`
    and stay at `end` after it: step in `stages` equal constant stages with evenly spaced values
    (stages=1: `start`, then `end`), linear in a straight line, cosine along a half cosine.
    piecewise: `values[i]` over the i-th of len(values) equal stretches of training (what
    `python -m train.compression --fit` writes).
    """
    s = schedule
    if s.kind == "constant":
        return s.start
    progress = min(max(progress, 0.0), 1.0)
    if s.kind == "piecewise":
        return s.values[min(int(progress * len(s.values)), len(s.values) - 1)]
    if progress >= s.until:
        return s.end
    t = progress / s.until
    if s.kind == "step":
        return s.start + (s.end - s.start) * math.floor(t * s.stages) / s.stages
    if s.kind == "linear":
        return s.start + (s.end - s.start) * t
    if s.kind == "cosine":
        return s.end + (s.start - s.end) * 0.5 * (1.0 + math.cos(math.pi * t))
    raise ValueError(f"unknown schedule kind {s.kind!r}; choose one of {KINDS}")


def step_seed(run_seed: int, rank: int, step: int, micro_step: int = 0) -> int:
    """The token-dropout seed of one micro-batch: a pure function of where it is in the run (exact resume)."""
    return int(np.random.SeedSequence([run_seed, rank, step, micro_step]).generate_state(1)[0])


@dataclass(frozen=True)
class Setting:
    """One step's compression: the encoder's patch size (None: the model's own) and the share of
    patch tokens kept. `seed` drives the token-dropout draw, so it never touches the global RNG."""

    patch_size: int | None = None
    keep_ratio: float = 1.0
    seed: int = 0

    @property
    def is_full(self) -> bool:
        return self.patch_size is None and self.keep_ratio >= 1.0

    def num_kept(self, num_tokens: int) -> int:
        """Tokens kept of `num_tokens`: floor(keep_ratio x num_tokens), at least 1 (timm's PatchDropout rule)."""
        if self.keep_ratio >= 1.0:
            return num_tokens
        return max(1, int(num_tokens * self.keep_ratio + 1e-6))

    def keep_ids(self, batch_size: int, num_tokens: int, device: torch.device, stream: int = 0):
        """Indices (B, K) of a uniformly random subset of each sample's tokens, or None when all are kept.

        `stream` tells apart the calls of one forward (views, crops) so each draws its own subset.
        """
        keep = self.num_kept(num_tokens)
        if keep == num_tokens:
            return None
        generator = torch.Generator(device=device)
        generator.manual_seed(int(np.random.SeedSequence([self.seed, stream]).generate_state(1)[0]))
        return random_masking(batch_size, num_tokens, keep, device, generator=generator)[0]


FULL = Setting()


def encode(encoder, images: torch.Tensor, compression: Setting = FULL, dropout: bool = True, stream: int = 0,
           **kwargs) -> torch.Tensor:
    """`encoder(images, ...)` under `compression`: its patch size and (with `dropout`) a random kept subset.

    The helper for methods without masks of their own (MoCo-v3, SimCLR, DINO). Following the paper,
    token dropout is meant for the branch that receives gradients (`dropout=False` for momentum
    teachers) while patch scaling applies to every branch.
    """
    ids_keep = None
    if dropout:
        grid = patch_grid(images.shape[-2:], compression.patch_size or encoder.patch_size)
        ids_keep = compression.keep_ids(images.shape[0], grid[0] * grid[1], images.device, stream)
    return encoder(images, ids_keep=ids_keep, patch_size=compression.patch_size, **kwargs)


def drop_visible(ids_keep: torch.Tensor, ids_restore: torch.Tensor, mask: torch.Tensor, compression: Setting = FULL):
    """Token dropout for methods that choose their own visible patches (HPM, MLO-MAE): keep a random
    `keep_ratio` of each image's visible patches `ids_keep` (B, K); the dropped ones join the masked
    (reconstructed) patches. Returns (ids_keep, ids_restore, mask) as `random_masking` (unchanged when
    nothing is dropped)."""
    keep = compression.keep_ids(ids_keep.shape[0], ids_keep.shape[1], ids_keep.device)
    if keep is None:
        return ids_keep, ids_restore, mask
    kept = ids_keep.gather(1, keep)
    scores = torch.ones_like(mask, dtype=torch.float32).scatter_(1, kept, 0.0)  # the kept ones sort first
    return masking_from_scores(scores, kept.shape[1])


def schedule_active(schedule: ScheduleConfig) -> bool:
    if schedule.kind == "piecewise":
        return any(v != 1.0 for v in schedule.values)
    return schedule.start != 1.0 or (schedule.kind != "constant" and schedule.end != 1.0)


class CompressionSchedule:
    """The compression of every step of a run: `at(step)` is a pure function of step / total_steps."""

    def __init__(self, cfg: CompressionConfig, base_patch_size: int, total_steps: int):
        self.cfg, self.base_patch_size, self.total_steps = cfg, base_patch_size, max(1, total_steps)

    @property
    def active(self) -> bool:
        return any(schedule_active(getattr(self.cfg, knob)) for knob in KNOBS)

    def setting_at(self, progress: float, seed: int = 0) -> Setting:
        patch = round(self.base_patch_size * schedule_value(self.cfg.patch_scale, progress))
        return Setting(None if patch == self.base_patch_size else patch,
                       schedule_value(self.cfg.keep_ratio, progress), seed)

    def at(self, step: int, seed: int = 0) -> Setting:
        return self.setting_at(step / self.total_steps, seed)

    def describe(self, setting: Setting) -> dict[str, float]:
        """TensorBoard scalars of a setting."""
        return {"compression/patch_size": float(setting.patch_size or self.base_patch_size),
                "compression/keep_ratio": float(setting.keep_ratio)}


def run_flops(flops_per_image, cfg: CompressionConfig, base_patch_size: int, total_steps: int,
              global_batch: int) -> float:
    """Training FLOPs of a `total_steps` run on the compression schedule `cfg` (the FLOPs model of the method)."""
    schedule = CompressionSchedule(cfg, base_patch_size, total_steps)
    if not schedule.active:
        return total_steps * global_batch * flops_per_image()
    return global_batch * sum(flops_per_image(compression=schedule.at(step)) for step in range(total_steps))


def steps_for_budget(flops_per_image, cfg: CompressionConfig, base_patch_size: int, global_batch: int,
                     budget: float) -> int:
    """The number of steps whose run on the schedule `cfg` (a function of step / steps) costs `budget` FLOPs
    most closely: a first guess from the schedule's mean cost per step, then the exact totals around it."""
    progress = [(i + 0.5) / 1000 for i in range(1000)]
    schedule = CompressionSchedule(cfg, base_patch_size, 1)
    mean = sum(flops_per_image(compression=schedule.setting_at(p)) for p in progress) / len(progress)
    guess = max(1, round(budget / (global_batch * mean)))
    candidates = range(max(1, guess - 2), guess + 3)
    return min(candidates, key=lambda t: abs(run_flops(flops_per_image, cfg, base_patch_size, t, global_batch)
                                             - budget))


def validate_schedules(cfg: Config) -> list[str]:
    """One-line errors for impossible compression settings, before any model is built; returns the scheduled
    knobs (`keep_ratio`, `patch_scale`), which the method must support (checked by `train.recipe`)."""
    c = cfg.compression
    max_scale = cfg.model.img_size / cfg.model.patch_size
    for knob in KNOBS:
        s, key = getattr(c, knob), f"compression.{knob}"
        if s.kind not in KINDS:
            raise ConfigError(f"{key}.kind={s.kind!r}: choose one of {KINDS}")
        if not 0.0 < s.until <= 1.0:
            raise ConfigError(f"{key}.until={s.until} must be in (0, 1] (a fraction of training)")
        if s.stages < 1:
            raise ConfigError(f"{key}.stages={s.stages} must be >= 1")
        if (s.kind == "piecewise") != bool(s.values):
            raise ConfigError(f"{key}.values={s.values}: a list of values for kind piecewise, and only for it")
        values = [("start", s.start), ("end", s.end)] + [(f"values[{i}]", v) for i, v in enumerate(s.values)]
        for end, value in values:
            if knob == "keep_ratio" and not 0.0 < value <= 1.0:
                raise ConfigError(f"{key}.{end}={value} must be in (0, 1] (the share of patch tokens kept)")
            if knob == "patch_scale" and not 1.0 <= value <= max_scale:
                raise ConfigError(f"{key}.{end}={value} must be in [1, {max_scale:g}] (patch size / "
                                  f"model.patch_size, at most the whole image)")
    if c.diagnose_every < 0:
        raise ConfigError(f"compression.diagnose_every={c.diagnose_every} must be >= 0")
    active = [knob for knob in KNOBS if schedule_active(getattr(c, knob))]
    if c.diagnose_every and not active:
        raise ConfigError("compression.diagnose_every is set but no compression is scheduled; set "
                          "compression.keep_ratio / compression.patch_scale, or sweep settings with "
                          "`python -m train.compression`")
    return active


def check_supported(cfg: Config, supported: tuple[str, ...]) -> None:
    """Error when a scheduled knob is not among the method's `supported_compression`."""
    for knob in validate_schedules(cfg):
        if KNOBS[knob] not in supported:
            raise ConfigError(f"compression.{knob}: method {cfg.method.name!r} does not support {KNOBS[knob]} "
                              f"(it supports: {', '.join(supported) or 'no compression'})")
