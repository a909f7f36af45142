"""Pretraining entry point for `python -m train.pretrain`, `torchrun`, `deepspeed` and `srun`.

    python -m train.pretrain --config train/configs/mae_demo.yaml [--config more.yaml ...] [section.key=value ...]
"""

import argparse
import json
import logging
import sys

import torch
from torch.utils.tensorboard import SummaryWriter

from data_pipeline.stream import DataError, unlabelled
from train.config import ConfigError, load_config
from train.distributed import world_info_from_env
from train.engine import train
from train.eval.quick import evaluate_encoder
from train.models.vit import ViTEncoder

log = logging.getLogger("train")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m train.pretrain", description=__doc__.split("\n")[0])
    parser.add_argument("--config", action="append", help="YAML file of settings over the defaults "
                        "(train/configs/*.yaml); repeat to stack files, later ones win")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher; LOCAL_RANK is read from the environment")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.base_lr=1e-3 model.depth=4")
    return parser.parse_intermixed_args(argv)


def end_of_run_eval(cfg, result) -> dict:
    """k-NN / linear probe of the trained encoder next to a randomly initialised one (skipped without labels)."""
    missing = unlabelled(cfg.data.train, "data.train") or unlabelled(cfg.data.val, "data.val")
    if missing:
        if world_info_from_env().rank == 0:
            log.info("end-of-run evaluation skipped: %s", missing)
        return {}
    module = result.engine.module
    device = next(module.parameters()).device
    torch.manual_seed(cfg.run.seed)
    random_encoder = ViTEncoder(cfg.model).to(device)
    encoder = module.eval_encoder() if hasattr(module, "eval_encoder") else module.encoder
    scores = {"pretrained": evaluate_encoder(encoder, cfg, device),
              "random init": evaluate_encoder(random_encoder, cfg, device)}
    if world_info_from_env().rank == 0:
        log.info("evaluation on %s (fit on %s):", cfg.data.val, cfg.data.train)
        for metric in ("knn_top1", "linear_top1"):
            log.info("  %-12s pretrained %5.1f%%   random init %5.1f%%", metric,
                     scores["pretrained"][metric], scores["random init"][metric])
        (result.output_dir / "eval.json").write_text(json.dumps({"step": result.steps, **scores}, indent=1))
        with SummaryWriter(str(result.output_dir / "tb")) as writer:
            for name, values in scores.items():
                for metric, value in values.items():
                    writer.add_scalar(f"eval/{metric}" + ("" if name == "pretrained" else "_random_init"),
                                      value, result.steps)
    return scores


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    rank = world_info_from_env().rank
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        cfg = load_config(args.config, args.overrides, world_info_from_env().world_size)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    try:
        result = train(cfg)
    except ConfigError as err:  # found once checkpoints or data are opened (e.g. resume into another model)
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except (DataError, FloatingPointError) as err:  # bad data, non-finite loss, steps skipped in a row
        print(f"error: {err}", file=sys.stderr)
        return 1
    if result.stopped_early:
        return 0
    if cfg.eval.at_end and cfg.data.val:
        end_of_run_eval(cfg, result)
    if rank == 0:
        out = result.output_dir
        log.info("TensorBoard: tensorboard --logdir %s", out / "tb")
        log.info("checkpoints: %s (latest %s); resolved config: %s", out / "checkpoints", result.last_checkpoint,
                 out / "config.yaml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
