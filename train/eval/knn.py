"""Weighted k-NN classification on frozen features, as DINO evaluates (cosine similarity, k=20, T=0.07).

    python -m train.eval.knn SOURCE [--train SHARDS] [--val SHARDS] [--k 10 20 100 200] [--pool token]
    torchrun --nproc_per_node 8 -m train.eval.knn SOURCE ...

SOURCE is a run, checkpoint or export (see train/weights.py; the encoder is the one the method
exports: DINO's teacher, or with `--student` its student); train/val default to the shards the
run was trained on. Memory stays bounded on ImageNet-size sets: every rank holds the (gathered)
validation features, streams its share of the train set through the encoder batch by batch and
keeps only each validation sample's k nearest train neighbours; the ranks' neighbour lists are
then merged. Results go to <run>/eval/knn_<tag>_<pool>.json and TensorBoard (<run>/tb, eval/knn_*).
"""

import argparse
import logging
import sys
from pathlib import Path

from data_pipeline.shards import available_cpus, num_classes_of
from data_pipeline.stream import unlabelled
from train.cli import USER_ERRORS, run_command
from train.distributed import device_for, init_distributed
from train.eval.metrics import knn_evaluate
from train.methods import METHODS
from train.monitor import write_results
from train.weights import load_encoder, resolve_source

log = logging.getLogger("train")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m train.eval.knn", description=__doc__.split("\n")[0])
    parser.add_argument("source", help="run dir, checkpoint dir, step_N dir or export (train.eval.export)")
    parser.add_argument("--train", help="labelled train shards (manifest .json or pattern); default: the run's")
    parser.add_argument("--val", help="labelled validation shards; default: the run's data.val")
    parser.add_argument("--k", type=int, nargs="+", default=[20], help="neighbour counts (DINO: 10 20 100 200)")
    parser.add_argument("--temperature", type=float, default=0.07)
    parser.add_argument("--pool", choices=("token", "avg"), default="token", help="class token or mean of patches")
    parser.add_argument("--batch-size", type=int, default=256, help="per rank")
    parser.add_argument("--workers", type=int, default=min(4, available_cpus()),
                        help="DataLoader workers per rank (default: 4, or fewer on a smaller machine)")
    parser.add_argument("--out", help="results directory (default: the run dir, or the export dir)")
    parser.add_argument("--student", action="store_true", help="the trained encoder of a method that evaluates "
                        "another one (DINO: the student instead of the teacher)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return run_command(lambda: run_knn(args), USER_ERRORS)


def run_knn(args) -> None:
    info = init_distributed()
    source = resolve_source(args.source, "source")
    train, val = args.train or source.data_value("train"), args.val or source.data_value("val")
    if not train or not val:
        raise ValueError(f"--train/--val: give labelled shards; {source.path} records no data.train/data.val")
    for spec, key in ((train, "--train"), (val, "--val")):  # a missing shard or label fails before the model loads
        missing = unlabelled(spec, key)
        if missing:
            raise ValueError(f"{missing}; k-NN needs labelled shards")
    device = device_for(info)
    encoder = load_encoder(source, METHODS, student=args.student).to(device)
    mean, std = source.data_value("mean", (0.485, 0.456, 0.406)), source.data_value("std", (0.229, 0.224, 0.225))
    result = knn_evaluate(encoder, train, val, encoder.cfg.img_size, mean, std, device, args.k, args.temperature,
                          args.pool, args.batch_size, args.workers, num_classes_of(train, val))
    result.update(source=str(source.path), step=source.meta.get("step"), method=source.meta.get("method"),
                  train=train, val=val, pool=args.pool, temperature=args.temperature)
    scalars = {f"eval/knn_{t}_k{k}": result[f"k{k}"][t] for k in args.k for t in ("top1", "top5")
               if t in result[f"k{k}"]}
    write_results(Path(args.out) if args.out else source.run_dir, f"knn_{source.tag}_{args.pool}", result, scalars,
                  result["step"] or 0)
    if info.is_main:
        for k in args.k:
            log.info("k-NN k=%d T=%.3g (%s pool): top-1 %.2f%%  top-5 %.2f%%", k, args.temperature, args.pool,
                     result[f"k{k}"]["top1"], result[f"k{k}"].get("top5", float("nan")))


if __name__ == "__main__":
    sys.exit(main())
