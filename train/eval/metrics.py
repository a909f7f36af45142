"""Scores of frozen features and classifiers: DINO's weighted k-NN vote (streamed, bounded memory), the
in-memory linear probe the demo's end-of-run evaluation fits, and top-1/top-5 of a classifier module.

k-NN: every rank holds the (gathered) validation features, streams its share of the train set through
the encoder batch by batch and keeps only each validation sample's k nearest train neighbours; the
ranks' neighbour lists are then merged.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from train import distributed
from train.eval.features import eval_batches, extract_features
from train.models.heads import probe_head
from train.models.vit import pooled_features


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
        if distributed.world_size() == 1:
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
        feats = pooled_features(encoder, images, pool)
        if real:
            neighbours.add(feats, labels)
            seen += len(labels)
    neighbours.merge_ranks()
    if distributed.world_size() > 1:
        dist.all_reduce(seen)
    num_classes = num_classes or int(max(neighbours.labels.max(), val_y.max())) + 1
    check_labels(neighbours.labels[neighbours.sim > -torch.inf], num_classes, "--train")
    check_labels(val_y, num_classes, "--val")
    results = {f"k{k}": topk_accuracy(neighbours.scores(num_classes, k, temperature), val_y) for k in ks}
    return {"num_train": int(seen), "num_val": len(val_y), "num_classes": num_classes, **results}


def fit_linear_probe(train_features: torch.Tensor, train_labels: torch.Tensor, num_classes: int,
                     epochs: int = 100, batch_size: int = 256, lr: float = 0.1, seed: int = 0) -> nn.Module:
    """Train the probe head with SGD (momentum 0.9, cosine lr) on in-memory features."""
    gen = torch.Generator().manual_seed(seed)
    probe = probe_head(train_features.shape[1], num_classes, generator=gen)
    opt = torch.optim.SGD(probe.parameters(), lr=lr, momentum=0.9)
    steps_per_epoch = -(-train_features.shape[0] // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps_per_epoch)
    probe.train()
    with torch.enable_grad():
        _train(probe, opt, sched, train_features, train_labels, epochs, batch_size, gen)
    return probe.eval()


def _train(probe, opt, sched, train_features, train_labels, epochs, batch_size, gen):
    for _ in range(epochs):
        order = torch.randperm(train_features.shape[0], generator=gen)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            if len(idx) < 2:
                continue  # BatchNorm needs two samples
            loss = nn.functional.cross_entropy(probe(train_features[idx].float()), train_labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()


@torch.no_grad()
def probe_scores(probe: nn.Module, features: torch.Tensor) -> torch.Tensor:
    return probe(features.float())


def average_buffers(module: torch.nn.Module) -> None:
    """Average floating buffers (BatchNorm running statistics) over ranks, so every rank evaluates the same model."""
    if distributed.world_size() == 1:
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
    if distributed.world_size() > 1:
        dist.all_reduce(totals)
    if totals[4] > 0:  # raised on every rank alike, after the collective
        raise ValueError(f"{shards}: {int(totals[4])} samples without a label in [0, {module.num_classes}) "
                         "(unlabelled shards, or another class count than the model's head)")
    module.train(was_training)
    n, top1, top5, loss, _ = totals.tolist()
    return {"top1": 100 * top1 / max(n, 1), "top5": 100 * top5 / max(n, 1), "loss": loss / max(n, 1),
            "num_samples": int(n)}
