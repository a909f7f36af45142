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

`GradientDiagnostic` measures, on the same batch, weights and RNG, how far the gradient under a
setting is from the full-token gradient (cosine similarity, relative norm error); the engine runs it
every `compression.diagnose_every` steps. `python -m train.compression` sweeps settings on a
checkpoint and prints a table with the paper's cost-adjusted error to choose a schedule.
"""

import argparse
import itertools
import logging
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from train.config import CompressionConfig, Config, ConfigError, ScheduleConfig, load_config
from train.models.masking import masking_from_scores, random_masking
from train.models.vit import patch_grid

log = logging.getLogger("train")

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


def validate_compression(cfg: Config) -> None:
    """One-line errors for impossible compression settings, before any model is built."""
    from train.methods import METHODS

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
    # declared by the method class itself: a subclass that changes forward() must opt in again
    supported = vars(METHODS[cfg.method.name]).get("supported_compression", ())
    for knob in active:
        if KNOBS[knob] not in supported:
            raise ConfigError(f"compression.{knob}: method {cfg.method.name!r} does not support {KNOBS[knob]} "
                              f"(it supports: {', '.join(supported) or 'no compression'})")


# ----------------------------------------------------------------------------------------------------------------
# gradient-error diagnostic


def gradient_error(gradient: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(cosine similarity, relative norm error |g - ref| / |ref|) of two flat gradients, in float64."""
    g, ref = gradient.double(), reference.double()
    cosine = float(g @ ref / (g.norm() * ref.norm()).clamp_min(1e-300))
    return cosine, float((g - ref).norm() / ref.norm().clamp_min(1e-300))


class GradientDiagnostic:
    """The gradient under a compression setting against the full-token gradient: same batch, weights and RNG.

    It runs on a plain fp32 copy of the method (built once from the config, weights copied from the
    live module, gathered under ZeRO-3) so DeepSpeed's partitioned gradients and optimizer state are
    never touched, under bf16 autocast when training is bf16. Each pass starts from the same global
    RNG state and restores it afterwards, so training continues exactly as without the diagnostic.
    With several ranks, every rank must call it: gradients are averaged over ranks (the gradient of
    the global batch) before they are compared.
    """

    def __init__(self, cfg: Config, device: torch.device, bf16: bool = False, model: torch.nn.Module | None = None):
        self.cfg, self.device, self.bf16 = cfg, device, bf16
        self.model = model  # the plain copy (built on first `load` when not given)

    def load(self, module: torch.nn.Module) -> torch.nn.Module:
        """The copy, holding `module`'s current weights and extra state (EMA teachers)."""
        from train.methods import build_method
        from train.models.ema import gathered

        if self.model is None:
            with self._fork_rng():  # building the copy must not move the training RNG
                self.model = build_method(self.cfg).to(self.device).float().train()
        with gathered(list(module.parameters())):
            self.model.load_state_dict(module.state_dict())
        return self.model

    def _fork_rng(self):
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        return torch.random.fork_rng(devices=devices)

    def gradient(self, batch: dict, step: int, setting: Setting, rng_seed: int | None = None):
        """(flat fp32 gradient averaged over ranks, loss) of the copy on `batch` under `setting`."""
        model = self.model
        model.zero_grad(set_to_none=True)
        with self._fork_rng():
            if rng_seed is not None:
                torch.manual_seed(rng_seed)
            with torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16):
                loss, _ = model({**batch, "compression": setting}, step)
            loss.backward()
        params = [p for p in model.parameters() if p.requires_grad]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).float().flatten() for p in params])
        model.zero_grad(set_to_none=True)
        loss = loss.detach().float()
        if dist.is_initialized() and dist.get_world_size() > 1:
            both = torch.cat([flat, loss.view(1)])
            dist.all_reduce(both)
            both /= dist.get_world_size()
            flat, loss = both[:-1], both[-1]
        return flat, float(loss)

    def __call__(self, module: torch.nn.Module, batch: dict, step: int, setting: Setting) -> dict[str, float]:
        """TensorBoard scalars: grad_cosine, grad_rel_error and both losses, for `setting` on `batch`."""
        batch = {k: v for k, v in batch.items() if k != "compression"}
        self.load(module)
        full, loss_full = self.gradient(batch, step, FULL)
        self.load(module)  # again: a forward may update state (DINO's centre), both passes start from the same
        compressed, loss_compressed = self.gradient(batch, step, setting)
        cosine, rel_error = gradient_error(compressed, full)
        return {"compression/grad_cosine": cosine, "compression/grad_rel_error": rel_error,
                "compression/loss_full": loss_full, "compression/loss_compressed": loss_compressed}


# ----------------------------------------------------------------------------------------------------------------
# the sweep: gradient error and cost of a grid of settings, to choose a schedule


def relative_cost(method: torch.nn.Module, setting: Setting, img_size: int, patch_size: int) -> float:
    """Training cost of a step under `setting` relative to full tokens: the method's FLOPs model if it has
    one (`flops_per_image(compression=...)`), else the share of encoder tokens."""
    if hasattr(method, "flops_per_image"):
        return method.flops_per_image(compression=setting) / method.flops_per_image()
    grid = patch_grid((img_size, img_size), setting.patch_size or patch_size)
    return setting.num_kept(grid[0] * grid[1]) / (img_size // patch_size) ** 2


def sweep(diagnostic: GradientDiagnostic, batches: list[dict], settings: list[Setting], step: int, costs: list[float],
          variance_scale: float = 1.0) -> list[dict]:
    """Gradient error of each setting against full tokens on the same `batches` (same weights, same RNG per batch).

    Per setting: mean cosine and relative error (per batch, against that batch's full-token gradient)
    and the paper's decomposition relative to |G|^2, G the mean full-token gradient:
    bias^2 = |E[g_s - g_full]|^2 (unbiased estimate), variance = E|g_s - E g_s|^2 scaled by
    `variance_scale` (sweep batch / training batch: variance falls as 1 / batch), and the
    cost-adjusted error CA = bias^2 + cost x variance (a budget buys 1 / cost times more compressed
    samples, which divides only the variance). The setting with the lowest CA is the best use of compute.
    """
    k = len(batches)
    rows = []
    for setting, cost in zip(settings, costs, strict=True):
        sums = {"full": 0.0, "s": 0.0, "d": 0.0}
        squares = {"s": 0.0, "d": 0.0}
        cosines, errors = [], []
        for b, batch in enumerate(batches):
            seed = step_seed(diagnostic.cfg.run.seed, 0, step, b)
            full, _ = diagnostic.gradient(batch, step, FULL, rng_seed=seed)
            compressed = full if setting.is_full else diagnostic.gradient(
                batch, step, replace(setting, seed=seed), rng_seed=seed)[0]
            cosine, error = gradient_error(compressed, full)
            cosines.append(cosine)
            errors.append(error)
            for key, g in (("full", full), ("s", compressed), ("d", compressed - full)):
                sums[key] = sums[key] + g
                if key in squares:
                    squares[key] += float(g.double().square().sum())
        g2 = float((sums["full"] / k).double().square().sum())
        mean_s2 = float((sums["s"] / k).double().square().sum())
        mean_d2 = float((sums["d"] / k).double().square().sum()) if not setting.is_full else 0.0
        if k > 1:
            variance = max(squares["s"] - k * mean_s2, 0.0) / (k - 1)
            bias2 = max(mean_d2 - max(squares["d"] - k * mean_d2, 0.0) / (k - 1) / k, 0.0)
        else:
            variance, bias2 = float("nan"), mean_d2
        variance *= variance_scale
        rows.append({"patch_size": setting.patch_size, "keep_ratio": setting.keep_ratio, "cost": cost,
                     "cosine": sum(cosines) / k, "rel_error": sum(errors) / k, "bias2": bias2 / g2,
                     "variance": variance / g2, "ca_error": (bias2 + cost * variance) / g2})
    return rows


def format_table(rows: list[dict], patch_size: int, tokens: list[int]) -> str:
    """The sweep as a fixed-width table, the lowest cost-adjusted error marked with *."""
    best = best_setting(rows)
    lines = [f"{'patch':>5} {'keep':>5} {'tokens':>6} {'cost':>6} {'cosine':>7} {'rel_err':>7} {'bias2':>9} "
             f"{'cost*var':>9} {'CA_error':>9}"]
    for i, (r, t) in enumerate(zip(rows, tokens, strict=True)):
        lines.append(f"{r['patch_size'] or patch_size:>5} {r['keep_ratio']:>5.2f} {t:>6} {r['cost']:>6.3f} "
                     f"{r['cosine']:>7.4f} {r['rel_error']:>7.4f} {r['bias2']:>9.3e} {r['cost'] * r['variance']:>9.3e} "
                     f"{r['ca_error']:>9.3e}{' *' if i == best else ''}")
    return "\n".join(lines)


def parse_floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def measured_cost(method: torch.nn.Module, batch: dict, settings: list[Setting], repeats: int = 3) -> list[float]:
    """Time of a forward + backward under each setting relative to full tokens (median of `repeats`)."""
    import time

    def seconds(setting: Setting) -> float:
        times = []
        for _ in range(repeats + 1):  # the first one warms up
            start = time.perf_counter()
            loss, _ = method({**batch, "compression": setting}, 0)
            loss.backward()
            method.zero_grad(set_to_none=True)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return sorted(times[1:])[len(times[1:]) // 2]

    with torch.random.fork_rng():
        full = seconds(FULL)
        return [seconds(s) / full for s in settings]


def sweep_checkpoint(cfg: Config, checkpoint: str | None, args) -> tuple[list[dict], list[Setting], list[int], int]:
    """The sweep of `args`' grid on `checkpoint` (None: the fresh model): (rows, settings, tokens, step)."""
    from data_pipeline.augment import build_views
    from data_pipeline.stream import StreamLoader, resolve_shards, to_device
    from train.checkpoint import load_weights
    from train.engine import use_bf16
    from train.methods import build_method

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.run.seed)
    method = build_method(cfg)
    step = load_weights(method, checkpoint) if checkpoint else 0
    method.to(device).float().train()
    views = build_views(cfg.data, cfg.model.img_size)
    loader = StreamLoader(resolve_shards(cfg.data.train).urls, views, cfg.data.batch_size, seed=cfg.run.seed,
                          shuffle_buffer=cfg.data.shuffle_buffer, workers=cfg.data.workers)
    batches = [to_device(b, device, cfg.data.mean, cfg.data.std) for b, _ in zip(loader, range(args.batches))]
    base = cfg.model.patch_size
    settings = [FULL]
    for scale, keep in itertools.product(args.patch_scales, args.keep_ratios):
        patch = round(base * scale)
        setting = Setting(None if patch == base else patch, keep)
        if setting not in settings:
            settings.append(setting)
    m = cfg.model
    if args.cost == "time":
        costs = measured_cost(method, batches[0], settings)
    else:
        costs = [relative_cost(method, s, m.img_size, base) for s in settings]
    tokens = [method.tokens_per_image(compression=s) if hasattr(method, "tokens_per_image")
              else s.num_kept(math.prod(patch_grid((m.img_size,) * 2, s.patch_size or base))) for s in settings]
    train_batch = args.train_batch or cfg.train.global_batch_size or cfg.data.batch_size
    diagnostic = GradientDiagnostic(cfg, device, use_bf16(cfg), model=method)
    log.info("sweeping %d settings x %d batches of %d at step %d (%s); variance scaled to a training batch of %d; "
             "cost from %s", len(settings), len(batches), cfg.data.batch_size, step, checkpoint or "fresh model",
             train_batch, "measured time" if args.cost == "time" else "the FLOPs model")
    rows = sweep(diagnostic, batches, settings, step, costs, cfg.data.batch_size / train_batch)
    return rows, settings, tokens, step


def best_setting(rows: list[dict]) -> int:
    """Index of the row with the lowest cost-adjusted error (what chooses a schedule; not the cosine)."""
    return min(range(len(rows)), key=lambda i: rows[i]["ca_error"] if math.isfinite(rows[i]["ca_error"]) else 1e300)


def fit(cfg: Config, args) -> dict:
    """Train a short uncompressed run (the config's train.steps), sweep at the start of each of `args.stages`
    equal stretches (0, 25, 50, 75 % with 4), and write the piecewise schedule of the lowest cost-adjusted
    error per stretch to `args.write` (a compression YAML to stack on the run config)."""
    import copy

    import yaml

    from train.checkpoint import tag_for
    from train.engine import train

    steps, stages = cfg.train.steps, args.stages
    if steps <= 0 or steps % stages:
        raise ConfigError(f"--fit needs train.steps (the short run's length) as a multiple of --stages={stages}, "
                          f"got train.steps={steps}")
    run = copy.deepcopy(cfg)
    run.compression = CompressionConfig()
    run.run.output_dir, run.run.ckpt_every, run.run.keep_last = str(cfg.output_dir / "fit_run"), steps // stages, stages
    run.eval.at_end = False
    ckpts = train(run).output_dir / "checkpoints"
    base, picks = cfg.model.patch_size, []
    for stage in range(stages):
        at = stage * steps // stages
        rows, settings, tokens, _ = sweep_checkpoint(cfg, str(ckpts / tag_for(at)) if at else None, args)
        print(f"stage {stage} ({100 * stage // stages}% of training, step {at}):")
        print(format_table(rows, base, tokens))
        picks.append(settings[best_setting(rows)])
    schedule = {"keep_ratio": {"kind": "piecewise", "values": [s.keep_ratio for s in picks]},
                "patch_scale": {"kind": "piecewise", "values": [(s.patch_size or base) / base for s in picks]},
                "diagnose_every": 0}
    path = Path(args.write or cfg.output_dir / "compression" / f"{cfg.method.name}.yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    cost = "measured step time" if args.cost == "time" else "the FLOPs model"
    path.write_text(f"# Fitted by `python -m train.compression --fit` on {steps} uncompressed steps of "
                    f"{cfg.method.name}:\n# per stretch of training, the setting of lowest cost-adjusted error\n"
                    f"# (bias^2 + cost x variance, cost from {cost}). Stack it on the run config with --config.\n"
                    + yaml.safe_dump({"compression": schedule}, sort_keys=False))
    print(f"wrote {path}: keep_ratio {schedule['keep_ratio']['values']}, patch_scale "
          f"{schedule['patch_scale']['values']}")
    return schedule


def main(argv=None) -> int:
    """python -m train.compression --config CONFIG [--checkpoint DIR | --fit] [--batches 8] [overrides]."""
    parser = argparse.ArgumentParser(
        prog="python -m train.compression",
        description="Gradient error vs full tokens of token-dropout x patch-scaling settings on a checkpoint "
                    "(or a fresh model), with cost and the cost-adjusted error, to choose a compression schedule; "
                    "--fit trains a short uncompressed run, sweeps along it and writes the schedule.")
    parser.add_argument("--config", action="append", help="YAML file(s) as for train.pretrain")
    parser.add_argument("--checkpoint", help="a step_N checkpoint directory (or a checkpoints directory: its "
                        "newest complete one); default: the freshly initialised model")
    parser.add_argument("--fit", action="store_true", help="train train.steps uncompressed steps, sweep at the start "
                        "of each of --stages equal stretches and write the lowest-cost-adjusted-error schedule")
    parser.add_argument("--stages", type=int, default=4, help="--fit: stretches of training (4: 0/25/50/75 %%)")
    parser.add_argument("--write", default="", help="--fit: the schedule YAML to write (default: "
                        "<run.output_dir>/compression/<method>.yaml)")
    parser.add_argument("--cost", choices=["flops", "time"], default="flops", help="cost of a setting relative to "
                        "full tokens: the method's FLOPs model, or the measured forward + backward time")
    parser.add_argument("--batches", type=int, default=8, help="batches of data.batch_size to average over (>= 2)")
    parser.add_argument("--patch-scales", type=parse_floats, default=[1.0, 1.5, 2.0])
    parser.add_argument("--keep-ratios", type=parse_floats, default=[1.0, 0.75, 0.5, 0.25])
    parser.add_argument("--train-batch", type=int, default=0, help="global batch of the training run the variance "
                        "is scaled to (default: train.global_batch_size, else data.batch_size)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.batch_size=256")
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    from train.distributed import world_info_from_env
    from train.engine import prepare_data

    try:
        cfg = load_config(args.config, args.overrides)
        if args.batches < 1 or any(not 0 < r <= 1 for r in args.keep_ratios) or any(s < 1 for s in args.patch_scales):
            raise ConfigError("--batches must be >= 1, --keep-ratios in (0, 1], --patch-scales >= 1")
        if args.stages < 1:
            raise ConfigError(f"--stages={args.stages} must be >= 1")
        cfg = prepare_data(cfg, world_info_from_env())
        if args.fit:
            fit(cfg, args)
            return 0
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    rows, _, tokens, _ = sweep_checkpoint(cfg, args.checkpoint, args)
    print(format_table(rows, cfg.model.patch_size, tokens))
    return 0


if __name__ == "__main__":
    sys.exit(main())
