"""Pretraining entry point for `python -m train.pretrain`, `torchrun`, `deepspeed` and `srun`.

    python -m train.pretrain --config train/configs/mae_demo.yaml [--config more.yaml ...] [section.key=value ...]
"""

import json
import logging
import sys

import torch
from torch.utils.tensorboard import SummaryWriter

from data_pipeline.stream import DataError, unlabelled
from train.cli import config_of, config_parser, run_command
from train.config import ConfigError
from train.distributed import world_info_from_env
from train.engine import OutOfMemory, train
from train.eval.quick import evaluate_encoder
from train.methods import build_method
from train.models.vit import ViTEncoder
from train.report import report_quietly

log = logging.getLogger("train")


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
    encoder = module.eval_encoder()
    scores = {"pretrained": evaluate_encoder(encoder, cfg, device, cfg.eval.pool),
              "random init": evaluate_encoder(random_encoder, cfg, device, cfg.eval.pool)}
    if world_info_from_env().rank == 0:
        log.info("evaluation on %s (fit on %s, %s pool):", cfg.data.val, cfg.data.train, cfg.eval.pool)
        for metric in ("knn_top1", "linear_top1"):
            log.info("  %-12s pretrained %5.1f%%   random init %5.1f%%", metric,
                     scores["pretrained"][metric], scores["random init"][metric])
        (result.output_dir / "eval.json").write_text(json.dumps({"step": result.steps, "pool": cfg.eval.pool, **scores},
                                                                   indent=1))
        with SummaryWriter(str(result.output_dir / "tb")) as writer:
            for name, values in scores.items():
                for metric, value in values.items():
                    writer.add_scalar(f"eval/{metric}" + ("" if name == "pretrained" else "_random_init"),
                                      value, result.steps)
    return scores


def main(argv=None) -> int:
    args = config_parser("python -m train.pretrain", __doc__.split("\n")[0]).parse_intermixed_args(
        sys.argv[1:] if argv is None else argv)
    return run_command(lambda: pretrain(args), errors=(ConfigError, OutOfMemory))


def pretrain(args) -> int | None:
    cfg = config_of(args)
    try:
        result = train(cfg, build_method)
    except (DataError, FloatingPointError) as err:  # bad data, non-finite loss, steps skipped in a row
        if world_info_from_env().rank == 0:
            report_quietly(cfg.output_dir)  # the curves up to the failure
        print(f"error: {err}", file=sys.stderr)  # last: the one line a failed run ends with
        return 1
    if result.stopped_early:
        return
    if cfg.eval.at_end and cfg.data.val:
        end_of_run_eval(cfg, result)
    if world_info_from_env().rank == 0:
        out = result.output_dir
        report_quietly(out)
        log.info("TensorBoard: tensorboard --logdir %s", out / "tb")
        log.info("checkpoints: %s (latest %s); resolved config: %s", out / "checkpoints", result.last_checkpoint,
                 out / "config.yaml")


if __name__ == "__main__":
    sys.exit(main())
