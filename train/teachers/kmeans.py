"""k-means in torch (CPU or GPU): random or k-means++ init, best of several restarts, chunked
nearest-centroid assignment, empty clusters re-seeded with the worst-fit points. Squared Euclidean
distance, as faiss.Kmeans. The points may be stored in half precision (MaPeT keeps its CLIP
features in float16); every distance and centroid is computed in float32, `chunk` rows at a time."""

import logging

import torch

log = logging.getLogger(__name__)


def nearest(x: torch.Tensor, centroids: torch.Tensor, chunk: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (N,), squared distances (N,)) of each row of `x` to its nearest centroid, `chunk` rows at a time."""
    centroids = centroids.to(x.device, torch.float32)
    c_sq = centroids.pow(2).sum(1)
    ids, dists = [], []
    for part in x.split(chunk):
        part = part.float()
        d = part.pow(2).sum(1, keepdim=True) - 2 * part @ centroids.T + c_sq
        best, idx = d.min(dim=1)
        ids.append(idx)
        dists.append(best.clamp_(min=0))
    return torch.cat(ids), torch.cat(dists)


def assign(x: torch.Tensor, centroids: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
    """Nearest-centroid ids of features `x` (..., C) -> (...)."""
    ids, _ = nearest(x.reshape(-1, x.shape[-1]), centroids, chunk)
    return ids.view(x.shape[:-1])


def _kmeans_plus_plus(x: torch.Tensor, k: int, gen: torch.Generator, chunk: int) -> torch.Tensor:
    """Arthur & Vassilvitskii's seeding: each next centroid drawn with probability ~ squared distance."""
    centroids = torch.empty(k, x.shape[1], device=x.device)
    centroids[0] = x[torch.randint(len(x), (1,), generator=gen, device=x.device)].float()
    _, d2 = nearest(x, centroids[:1], chunk)
    for i in range(1, k):
        if d2.sum() <= 0:  # fewer distinct points than k: the rest is re-seeded as empty clusters later
            centroids[i:] = centroids[0]
            break
        centroids[i] = x[torch.multinomial(d2, 1, generator=gen)].float()
        d2 = torch.minimum(d2, nearest(x, centroids[i:i + 1], chunk)[1])
    return centroids


def kmeans(x: torch.Tensor, k: int, iters: int = 20, init: str = "random", seed: int = 0, restarts: int = 1,
           chunk: int = 16384) -> tuple[torch.Tensor, float]:
    """Lloyd's k-means of the rows of `x` (N, C) on x's device: (centroids (k, C) float32, mean squared error).

    `init`: "random" (k distinct samples, as faiss) or "kmeans++" (k sequential passes over the data).
    `restarts` runs (seeds seed, seed + 1, ...) are made and the one with the lowest error is kept
    (faiss `nredo`; MaPeT: 5). A cluster that ends an iteration empty is re-seeded with the point
    farthest from its centroid (then the next farthest, ...), so all k codes stay in use.
    Deterministic given the seed (on the same device).
    """
    if init not in ("kmeans++", "random"):
        raise ValueError(f"k-means init {init!r}: choose 'kmeans++' or 'random'")
    if len(x) < k:
        raise ValueError(f"k-means needs at least k={k} points, got {len(x)}")
    if restarts < 1:
        raise ValueError(f"k-means restarts={restarts} must be >= 1")
    best = None
    for run in range(restarts):
        centroids, mse = _lloyd(x, k, iters, init, seed + run, chunk)
        log.info("k-means run %d of %d (seed %d): mse %.4g", run + 1, restarts, seed + run, mse)
        if best is None or mse < best[1]:
            best = centroids, mse
    return best


def _lloyd(x: torch.Tensor, k: int, iters: int, init: str, seed: int, chunk: int) -> tuple[torch.Tensor, float]:
    gen = torch.Generator(device=x.device).manual_seed(seed)
    if init == "random":
        centroids = x[torch.randperm(len(x), generator=gen, device=x.device)[:k]].float()
    else:
        centroids = _kmeans_plus_plus(x, k, gen, chunk)
    for it in range(iters):
        ids, d2 = nearest(x, centroids, chunk)
        counts = torch.bincount(ids, minlength=k)
        sums = torch.zeros_like(centroids)
        for part, part_ids in zip(x.split(chunk), ids.split(chunk)):
            sums.index_add_(0, part_ids, part.float())
        centroids = sums / counts.clamp(min=1).unsqueeze(1).float()
        empty = (counts == 0).nonzero().squeeze(1)
        if len(empty):
            centroids[empty] = x[d2.topk(len(empty)).indices].float()
        log.debug("k-means iteration %d: mse %.4g, %d empty clusters re-seeded", it, d2.mean().item(), len(empty))
    _, d2 = nearest(x, centroids, chunk)
    return centroids, d2.mean().item()
