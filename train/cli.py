"""What every command line shares: `--config` files + dotted overrides, rank-0 logging, one-line errors (exit 2)."""

import argparse
import logging
import sys
from collections.abc import Callable

from train.config import Config, ConfigError
from train.distributed import world_info_from_env
from train.engine import train
from train.eval.metrics import evaluate_classifier
from train.methods import build_method
from train.monitor import write_results
from train.recipe import load_config
from train.report import report_quietly

log = logging.getLogger("train")


USER_ERRORS = (ConfigError, FileNotFoundError, ValueError)  # what the evaluation commands report as one line


def config_parser(prog: str, description: str, config_help: str = "YAML file of settings over the defaults "
                  "(train/configs/*.yaml); repeat to stack files, later ones win",
                  commands: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    """An argument parser with `--config` (repeatable), the deepspeed launcher's `--local_rank` and overrides
    (after a `command` positional, one of `commands`, when given)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    if commands:
        parser.add_argument("command", choices=commands)
    parser.add_argument("--config", action="append", help=config_help)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher; LOCAL_RANK is read from the environment")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.base_lr=1e-3 model.depth=4")
    return parser


def config_of(args: argparse.Namespace, extra: list[str] = ()) -> Config:
    """The validated config of parsed `--config` files and overrides (`extra` first), for this world size."""
    return load_config(args.config, [*extra, *args.overrides], world_info_from_env().world_size)


def setup_logging() -> None:
    """INFO on rank 0, warnings elsewhere."""
    rank = world_info_from_env().rank
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def run_command(body: Callable[[], int | None], errors: tuple[type[Exception], ...] = (ConfigError,)) -> int:
    """Run a command's body with rank-0 INFO logging; a user mistake (`errors`) is one line on stderr, exit code 2."""
    setup_logging()
    try:
        return body() or 0
    except errors as err:
        print(f"{'config error' if isinstance(err, ConfigError) else 'error'}: {err}", file=sys.stderr)
        return 2


def classification_parser(prog: str) -> argparse.ArgumentParser:
    """`train.eval.finetune` / `train.eval.linear_probe`: a recipe and overrides (method.init=...)."""
    return config_parser(prog, "Train a classifier on a pretrained encoder on the engine, evaluating on data.val.",
                         "YAML recipe (train/configs/finetune_*.yaml, linprobe_*.yaml)")


def run_classification(args, method: str) -> None:
    """A run of the classification method `method` (finetune, linear_probe) evaluated on data.val after every
    checkpoint; the last numbers go to <output_dir>/eval/<method>_<tag>.json."""
    cfg = config_of(args, [] if args.config else [f"method.name={method}"])
    if cfg.method.name != method:
        raise ConfigError(f"method.name={cfg.method.name}: train.eval.{method} runs method.name={method}")
    if cfg.data.train and not cfg.data.val:  # (no data.train: the engine writes the digits, train and val)
        raise ConfigError("data.val: give labelled validation shards to evaluate on")
    last = {}

    def evaluate(module, step):
        last.update(evaluate_classifier(module, cfg.data.val, cfg.model.img_size, cfg.data.mean, cfg.data.std,
                                        cfg.data.batch_size, cfg.data.workers), step=step)
        log.info("step %d: %s on %s: top-1 %.2f%%  top-5 %.2f%%  loss %.4f", step, method, cfg.data.val,
                 last["top1"], last["top5"], last["loss"])
        return {f"eval/{k}": last[k] for k in ("top1", "top5", "loss")}

    result = train(cfg, build_method, evaluate=evaluate)
    if result.stopped_early or not last:
        return
    summary = {**last, "method": method, "init": cfg.method.init, "train": cfg.data.train, "val": cfg.data.val,
               "checkpoint": str(result.output_dir / "checkpoints" / (result.last_checkpoint or ""))}
    write_results(result.output_dir, f"{method}_{result.last_checkpoint}", summary, {}, result.steps)
    if world_info_from_env().rank == 0:
        report_quietly(result.output_dir)
