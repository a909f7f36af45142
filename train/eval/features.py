"""Frozen-encoder features over a shard set (every sample once, eval transform)."""

import torch
from torch.utils.data import DataLoader

from data_pipeline.augment import EvalView
from data_pipeline.stream import EvalStream, resolve_shards, to_device


@torch.no_grad()
def extract_features(encoder, shards: str, img_size: int, mean, std, device: torch.device,
                     batch_size: int = 256, workers: int = 0, pool: str = "token", key: str = "data.val"):
    """(features (N, D) float32 on CPU, labels (N,)) of `encoder` over every sample of `shards`."""
    stream = EvalStream(resolve_shards(shards, key).urls, EvalView(img_size), batch_size)
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    for batch in DataLoader(stream, batch_size=None, num_workers=workers):
        batch = to_device(batch, device, mean, std)
        feats.append(encoder(batch["images"], pool=pool).float().cpu())
        labels.append(batch["labels"].cpu())
    encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels)
