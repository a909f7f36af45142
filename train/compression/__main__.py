"""python -m train.compression --config CONFIG [--checkpoint DIR] [--batches 8] [overrides]: the sweep."""

import argparse
import itertools
import logging
import math
import sys

import torch

from data_pipeline.augment import build_views
from data_pipeline.batch import to_device
from data_pipeline.shards import ensure_demo_shards
from data_pipeline.stream import StreamLoader, resolve_shards
from train.checkpoint import load_weights
from train.cli import config_of, config_parser, run_command
from train.compression import FULL, Setting
from train.compression.diagnostic import GradientDiagnostic, format_table, relative_cost, sweep
from train.config import ConfigError
from train.engine import use_bf16
from train.methods import build_method
from train.models.vit import patch_grid

log = logging.getLogger("train")


def parse_floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def main(argv=None) -> int:
    """python -m train.compression --config CONFIG [--checkpoint DIR] [--batches 8] [overrides]: the sweep."""
    parser = config_parser(
        "python -m train.compression",
        "Gradient error vs full tokens of token-dropout x patch-scaling settings on a checkpoint "
        "(or a fresh model), with cost and the cost-adjusted error, to choose a compression schedule.",
        "YAML file(s) as for train.pretrain")
    parser.add_argument("--checkpoint", help="a step_N checkpoint directory (or a checkpoints directory: its "
                        "newest complete one); default: the freshly initialised model")
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
    ensure_demo_shards(cfg.data, cfg.output_dir / "shards")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.run.seed)
    method = build_method(cfg)
    step = load_weights(method, args.checkpoint) if args.checkpoint else 0
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
    costs = [relative_cost(method, s, m.img_size, base) for s in settings]
    tokens = [method.tokens_per_image(compression=s) or s.num_kept(math.prod(patch_grid((m.img_size,) * 2,
                                                                                       s.patch_size or base)))
              for s in settings]
    train_batch = args.train_batch or cfg.train.global_batch_size or cfg.data.batch_size
    diagnostic = GradientDiagnostic(lambda: build_method(cfg), device, use_bf16(cfg), model=method, seed=cfg.run.seed)
    log.info("sweeping %d settings x %d batches of %d at step %d (%s); variance scaled to a training batch of %d",
             len(settings), len(batches), cfg.data.batch_size, step, args.checkpoint or "fresh model", train_batch)
    rows = sweep(diagnostic, batches, settings, step, costs, cfg.data.batch_size / train_batch)
    print(format_table(rows, base, tokens))


if __name__ == "__main__":
    sys.exit(main())
