"""Weighted k-NN classification on frozen features, as DINO evaluates (cosine similarity, k=20, T=0.07).

    python -m train.eval.knn SOURCE [--train SHARDS] [--val SHARDS] [--k 10 20 100 200] [--pool token]
    torchrun --nproc_per_node 8 -m train.eval.knn SOURCE ...

SOURCE is a run, checkpoint or export (see train/eval/load.py); train/val default to the shards the
run was trained on. Memory stays bounded on ImageNet-size sets: every rank holds the (gathered)
validation features, streams its share of the train set through the encoder batch by batch and
keeps only each validation sample's k nearest train neighbours; the ranks' neighbour lists are
then merged. Results go to <run>/eval/knn_<tag>_<pool>.json and TensorBoard (<run>/tb, eval/knn_*).
"""

import argparse
import logging
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from data_pipeline.shards import available_cpus
from train.eval.features import encode, eval_batches, extract_features, world

log = logging.getLogger("train")


class NearestNeighbours:
    """The k most cosine-similar keys of every query, kept up to date as batches of keys stream past."""

    def __init__(self, queries: torch.Tensor, k: int, chunk: int = 4096):
        self.queries = F.normalize(queries.float(), dim=1)
        self.k, self.chunk = k, chunk
        self.sim = torch.full((len(queries), k), -torch.inf, device=queries.device)
        self.labels = torch.full((len(queries), k), -1, dtype=torch.long, device=queries.device)

    @torch.no_grad()
    def add(self, keys: torch.Tensor, labels: torch.Tensor) -> None:
        keys = F.normalize(keys.float(), dim=1)
        for start in range(0, len(self.queries), self.chunk):
            rows = slice(start, start + self.chunk)
            sim = torch.cat([self.sim[rows], self.queries[rows] @ keys.T], dim=1)
            cand = torch.cat([self.labels[rows], labels.to(sim.device).expand(sim.shape[0], -1)], dim=1)
            self._keep(rows, sim, cand)

    def _keep(self, rows, sim, cand):
        top, idx = sim.topk(self.k, dim=1)  # sorted: the first k' columns are the k' nearest
        self.sim[rows], self.labels[rows] = top, cand.gather(1, idx)

    def merge_ranks(self) -> None:
        """Combine every rank's neighbour lists (same queries on every rank) into the global ones."""
        if world()[1] == 1:
            return
        sims = [torch.empty_like(self.sim) for _ in range(dist.get_world_size())]
        labels = [torch.empty_like(self.labels) for _ in range(dist.get_world_size())]
        dist.all_gather(sims, self.sim)
        dist.all_gather(labels, self.labels)
        self._keep(slice(None), torch.cat(sims, dim=1), torch.cat(labels, dim=1))

    def scores(self, num_classes: int, k: int, temperature: float) -> torch.Tensor:
        """(N, C) class votes of the k nearest neighbours, each weighted by exp(similarity / T) (DINO)."""
        sim, labels = self.sim[:, :k], self.labels[:, :k]
        weights = torch.where(labels >= 0, (sim / temperature).exp(), 0.0)  # fewer keys than k: empty slots
        votes = torch.zeros(len(sim), num_classes, device=sim.device)
        return votes.scatter_add_(1, labels.clamp(min=0), weights)


@torch.no_grad()
def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                num_classes: int, k: int = 20, temperature: float = 0.07, chunk: int = 4096) -> torch.Tensor:
    """Class scores (N_test, C) of in-memory features: the k most similar train samples vote with exp(sim / T)."""
    neighbours = NearestNeighbours(test_features, k)
    for start in range(0, len(train_features), chunk):
        neighbours.add(train_features[start:start + chunk], train_labels[start:start + chunk])
    return neighbours.scores(num_classes, k, temperature)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    """Top-k accuracies in percent."""
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
    hits = top == labels.to(top.device).unsqueeze(1)
    return {f"top{k}": 100.0 * hits[:, :k].any(dim=1).float().mean().item() for k in ks if k <= scores.shape[1]}


def check_labels(labels: torch.Tensor, num_classes: int, key: str) -> None:
    """One-line errors for unlabelled shards and labels beyond the class count."""
    if len(labels) and labels.min() < 0:
        raise ValueError(f"{key}: samples without a class label (no .cls in the shards); k-NN and probes need labels")
    if len(labels) and labels.max() >= num_classes:
        raise ValueError(f"{key}: label {int(labels.max())} but only {num_classes} classes (mismatched class count)")


@torch.no_grad()
def knn_evaluate(encoder, train: str, val: str, img_size: int, mean, std, device: torch.device,
                 ks=(20,), temperature: float = 0.07, pool: str = "token", batch_size: int = 256,
                 workers: int = 0, num_classes: int | None = None) -> dict:
    """k-NN top-1/top-5 on `val` with neighbours from `train`, over all ranks; every rank gets the result."""
    val_f, val_y = extract_features(encoder, val, img_size, mean, std, device, batch_size, workers, pool, "--val")
    neighbours = NearestNeighbours(val_f.to(device), max(ks))
    encoder.eval()
    seen = torch.zeros((), dtype=torch.long, device=device)
    for images, labels, real in eval_batches(train, img_size, mean, std, device, batch_size, workers, "--train"):
        feats = encode(encoder, images, pool)
        if real:
            neighbours.add(feats, labels)
            seen += len(labels)
    neighbours.merge_ranks()
    if world()[1] > 1:
        dist.all_reduce(seen)
    num_classes = num_classes or int(max(neighbours.labels.max(), val_y.max())) + 1
    check_labels(neighbours.labels[neighbours.sim > -torch.inf], num_classes, "--train")
    check_labels(val_y, num_classes, "--val")
    results = {f"k{k}": topk_accuracy(neighbours.scores(num_classes, k, temperature), val_y) for k in ks}
    return {"num_train": int(seen), "num_val": len(val_y), "num_classes": num_classes, **results}


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
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from train.eval.commands import run_command

    args = parse_args(sys.argv[1:] if argv is None else argv)
    return run_command(lambda: run_knn(args))


def run_knn(args) -> None:
    from data_pipeline.stream import unlabelled
    from train.distributed import device_for, init_distributed
    from train.eval.commands import num_classes_of, write_results
    from train.eval.load import load_encoder, resolve_source

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
    encoder = load_encoder(source).to(device)
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
