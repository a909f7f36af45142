"""python -m train.compression --config CONFIG [--checkpoint DIR | --fit] [--batches 8] [overrides]: the sweep,
or (--fit) a short uncompressed run swept at the start of each stretch and the schedule it gives."""

import argparse
import copy
import itertools
import logging
import math
import sys
from pathlib import Path

import torch
import yaml

from data_pipeline.augment import build_views
from data_pipeline.batch import to_device
from data_pipeline.shards import ensure_demo_shards
from data_pipeline.stream import StreamLoader, resolve_shards
from train.checkpoint import load_weights, tag_for
from train.cli import config_of, config_parser, run_command
from train.compression import FULL, Setting
from train.compression.diagnostic import (
    GradientDiagnostic,
    best_setting,
    format_table,
    measured_cost,
    relative_cost,
    sweep,
)
from train.config import CompressionConfig, Config, ConfigError
from train.engine import train, use_bf16
from train.methods import build_method
from train.models.vit import patch_grid

log = logging.getLogger("train")


def parse_floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def main(argv=None) -> int:
    """python -m train.compression --config CONFIG [--checkpoint DIR | --fit] [--batches 8] [overrides]."""
    parser = config_parser(
        "python -m train.compression",
        "Gradient error vs full tokens of token-dropout x patch-scaling settings on a checkpoint "
        "(or a fresh model), with cost and the cost-adjusted error, to choose a compression schedule; "
        "--fit trains a short uncompressed run, sweeps along it and writes the schedule.",
        "YAML file(s) as for train.pretrain")
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
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    return run_command(lambda: run_sweep(args))


def run_sweep(args) -> None:
    cfg = config_of(args)
    if args.batches < 1 or any(not 0 < r <= 1 for r in args.keep_ratios) or any(s < 1 for s in args.patch_scales):
        raise ConfigError("--batches must be >= 1, --keep-ratios in (0, 1], --patch-scales >= 1")
    if args.stages < 1:
        raise ConfigError(f"--stages={args.stages} must be >= 1")
    ensure_demo_shards(cfg.data, cfg.output_dir / "shards")
    if args.fit:
        fit(cfg, args)
        return
    rows, _, tokens, _ = sweep_checkpoint(cfg, args.checkpoint, args)
    print(format_table(rows, cfg.model.patch_size, tokens))


def sweep_checkpoint(cfg: Config, checkpoint: str | None, args) -> tuple[list[dict], list[Setting], list[int], int]:
    """The sweep of `args`' grid on `checkpoint` (None: the fresh model): (rows, settings, tokens, step)."""
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
    tokens = [method.tokens_per_image(compression=s) or s.num_kept(math.prod(patch_grid((m.img_size,) * 2,
                                                                                       s.patch_size or base)))
              for s in settings]
    train_batch = args.train_batch or cfg.train.global_batch_size or cfg.data.batch_size
    diagnostic = GradientDiagnostic(lambda: build_method(cfg), device, use_bf16(cfg), model=method, seed=cfg.run.seed)
    log.info("sweeping %d settings x %d batches of %d at step %d (%s); variance scaled to a training batch of %d; "
             "cost from %s", len(settings), len(batches), cfg.data.batch_size, step, checkpoint or "fresh model",
             train_batch, "measured time" if args.cost == "time" else "the FLOPs model")
    rows = sweep(diagnostic, batches, settings, step, costs, cfg.data.batch_size / train_batch)
    return rows, settings, tokens, step


def fit(cfg: Config, args) -> dict:
    """Train a short uncompressed run (the config's train.steps), sweep at the start of each of `args.stages`
    equal stretches (0, 25, 50, 75 % with 4), and write the piecewise schedule of the lowest cost-adjusted
    error per stretch to `args.write` (a compression YAML to stack on the run config)."""
    steps, stages = cfg.train.steps, args.stages
    if steps <= 0 or steps % stages:
        raise ConfigError(f"--fit needs train.steps (the short run's length) as a multiple of --stages={stages}, "
                          f"got train.steps={steps}")
    run = copy.deepcopy(cfg)
    run.compression = CompressionConfig()
    run.run.output_dir, run.run.ckpt_every, run.run.keep_last = str(cfg.output_dir / "fit_run"), steps // stages, stages
    run.eval.at_end = False
    ckpts = train(run, build_method).output_dir / "checkpoints"
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


if __name__ == "__main__":
    sys.exit(main())
