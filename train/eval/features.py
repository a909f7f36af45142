"""Frozen-encoder features over a shard set: every sample once across ranks (eval transform).

Every rank reads its own share of the shards (`EvalStream`). Ranks step through their batches in
lockstep (one tiny all-reduce per batch): a rank that ran out feeds zero batches until all have,
so a ZeRO-3 partitioned module, whose forward is collective, never hangs on uneven shares.
"""

from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from data_pipeline.augment import EvalView
from data_pipeline.batch import to_device
from data_pipeline.stream import EvalStream, die_with_parent, resolve_shards
from train import distributed
from train.models.vit import pooled_features


def eval_batches(shards: str, img_size: int, mean, std, device: torch.device, batch_size: int = 256,
                 workers: int = 0, key: str = "data.val") -> Iterator[tuple[torch.Tensor, torch.Tensor, bool]]:
    """(normalised images, labels, real) over this rank's share of `shards`; padding batches have real=False."""
    rank, world_size = distributed.rank(), distributed.world_size()
    stream = EvalStream(resolve_shards(shards, key).urls, EvalView(img_size), batch_size, rank, world_size)
    # its own generator: starting workers must not draw from (and shift) the global RNG of a training run
    batches = iter(DataLoader(stream, batch_size=None, num_workers=workers, generator=torch.Generator(),
                              worker_init_fn=die_with_parent))
    while True:
        batch = next(batches, None)
        if world_size > 1:
            more = torch.tensor([batch is not None], dtype=torch.int32, device=device)
            dist.all_reduce(more, op=dist.ReduceOp.MAX)
            if not more.item():
                return
        elif batch is None:
            return
        if batch is None:
            yield (torch.zeros(batch_size, 3, img_size, img_size, device=device),
                   torch.full((batch_size,), -1, device=device), False)
        else:
            batch = to_device(batch, device, mean, std)
            yield batch["images"], batch["labels"], True


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows of `x` (row counts may differ), in rank order, on every rank."""
    world_size = distributed.world_size()
    if world_size == 1:
        return x
    count = torch.tensor([x.shape[0]], device=x.device)
    counts = [torch.zeros_like(count) for _ in range(world_size)]
    dist.all_gather(counts, count)
    longest = int(max(c.item() for c in counts))
    padded = torch.zeros(longest, *x.shape[1:], dtype=x.dtype, device=x.device)
    padded[:x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:int(c.item())] for part, c in zip(parts, counts)])


@torch.no_grad()
def extract_features(encoder, shards: str, img_size: int, mean, std, device: torch.device,
                     batch_size: int = 256, workers: int = 0, pool: str = "token", key: str = "data.val"):
    """(features (N, D) float32, labels (N,)) of `encoder` over every sample of `shards`, gathered on every rank."""
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    for images, batch_labels, real in eval_batches(shards, img_size, mean, std, device, batch_size, workers, key):
        out = pooled_features(encoder, images, pool)
        if real:
            feats.append(out)
            labels.append(batch_labels)
    encoder.train(was_training)
    dim = encoder.embed_dim
    feats = torch.cat(feats) if feats else torch.zeros(0, dim, device=device)
    labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=device)
    return all_gather_rows(feats).cpu(), all_gather_rows(labels).cpu()
