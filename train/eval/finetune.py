"""Fine-tune a pretrained encoder (MAE/BEiT recipe) on the engine, evaluating top-1/top-5 on data.val.

    python -m train.eval.finetune --config train/configs/finetune_vit_b.yaml method.init=RUN_OR_EXPORT \\
        data.train=.../train.json data.val=.../val.json
    torchrun --nproc_per_node 8 -m train.eval.finetune --config ...      # or deepspeed / sbatch, as pretraining

A run of method `finetune` (see train/methods/classify.py): DeepSpeed, checkpoints, resume and
preemption as in pretraining. data.val is evaluated after every checkpoint (eval/top1, eval/top5,
eval/loss in TensorBoard) and the final numbers go to <output_dir>/eval/<method>_step_N.json.
`python -m train.eval.linear_probe` is the same runner for method `linear_probe`.
"""

import argparse
import logging
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from train.config import ConfigError, load_config
from train.distributed import world_info_from_env
from train.eval.features import eval_batches, world

log = logging.getLogger("train")


def average_buffers(module: torch.nn.Module) -> None:
    """Average floating buffers (BatchNorm running statistics) over ranks, so every rank evaluates the same model."""
    if world()[1] == 1:
        return
    for buf in module.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf)
            buf /= dist.get_world_size()


@torch.no_grad()
def evaluate_classifier(module, shards: str, img_size: int, mean, std, batch_size: int = 256,
                        workers: int = 0) -> dict[str, float]:
    """Top-1/top-5 (%) and cross-entropy of `module.logits` on every sample of `shards`, over all ranks.

    Every rank calls it (lockstep batches: safe for ZeRO-3 partitioned modules).
    """
    device = next(module.parameters()).device
    was_training = module.training
    module.eval()
    average_buffers(module)
    totals = torch.zeros(5, dtype=torch.float64, device=device)  # samples, top-1, top-5, loss sum, bad labels
    for images, labels, real in eval_batches(shards, img_size, mean, std, device, batch_size, workers):
        logits = module.logits(images).float()
        if not real:
            continue
        valid = (labels >= 0) & (labels < logits.shape[1])
        logits, labels = logits[valid], labels[valid]
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels.unsqueeze(1)
        counts = (valid.sum(), hits[:, :1].sum(), hits.sum(), F.cross_entropy(logits, labels, reduction="sum"),
                  (~valid).sum())
        totals += torch.stack([c.double() for c in counts])
    if world()[1] > 1:
        dist.all_reduce(totals)
    if totals[4] > 0:  # raised on every rank alike, after the collective
        raise ValueError(f"{shards}: {int(totals[4])} samples without a label in [0, {module.num_classes}) "
                         "(unlabelled shards, or another class count than the model's head)")
    module.train(was_training)
    n, top1, top5, loss, _ = totals.tolist()
    return {"top1": 100 * top1 / max(n, 1), "top5": 100 * top5 / max(n, 1), "loss": loss / max(n, 1),
            "num_samples": int(n)}


def parse_args(argv, prog: str):
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="YAML recipe (train/configs/finetune_*.yaml, linprobe_*.yaml)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. method.init=runs/mae optim.base_lr=1e-3")
    return parser.parse_args(argv)


def main(argv=None, method: str = "finetune") -> int:
    from train.eval.commands import run_command

    args = parse_args(sys.argv[1:] if argv is None else argv, f"python -m train.eval.{method}")
    return run_command(lambda: run_classification(args, method))


def run_classification(args, method: str) -> None:
    from train.engine import train
    from train.eval.commands import write_results

    overrides = list(args.overrides) if args.config else [f"method.name={method}", *args.overrides]
    cfg = load_config(args.config, overrides, world_info_from_env().world_size)
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

    result = train(cfg, evaluate=evaluate)
    if result.stopped_early or not last:
        return
    summary = {**last, "method": method, "init": cfg.method.init, "train": cfg.data.train, "val": cfg.data.val,
               "checkpoint": str(result.output_dir / "checkpoints" / (result.last_checkpoint or ""))}
    write_results(result.output_dir, f"{method}_{result.last_checkpoint}", summary, {}, result.steps)


if __name__ == "__main__":
    sys.exit(main())
