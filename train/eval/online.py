"""Online representation monitoring during pretraining: a k-NN top-1 and label-free collapse indicators.

Every `eval.every` steps the method's evaluation encoder embeds a fixed labelled subset of `data.val`
(its first `eval.monitor_samples` samples, rounded up to whole batches, decoded once and held on the host,
each rank its share):
- `monitor/knn_top1`: DINO's weighted k-NN, the subset's even samples voting for the odd ones;
- `monitor/rankme`: the effective rank of the embeddings (RankMe, Garrido et al. 2023): exp of the
  entropy of the normalised singular values; it falls towards 1 under dimensional collapse;
- `monitor/feature_std`: the mean per-dimension std of the L2-normalised embeddings (SimSiam's
  indicator): 0 for a constant embedding, about 1/sqrt(D) for a spread-out one.
"""

import time

import torch
import torch.nn.functional as F

from train.eval.features import all_gather_rows, eval_batches
from train.eval.metrics import knn_predict, topk_accuracy
from train.models.vit import pooled_features


def rankme(features: torch.Tensor, eps: float = 1e-7) -> float:
    """Effective rank exp(-sum p log p), p = singular values / their sum (+ eps), of (N, D) features."""
    sigma = torch.linalg.svdvals(features.double())
    p = sigma / sigma.sum() + eps
    return float(torch.exp(-(p * p.log()).sum()))


def feature_std(features: torch.Tensor) -> float:
    """Mean over dimensions of the std of the L2-normalised features."""
    return float(F.normalize(features.double(), dim=1).std(dim=0).mean())


class OnlineMonitor:
    """The fixed subset, decoded once; `monitor(encoder)` -> {name: value}, collective over ranks."""

    def __init__(self, shards: str, samples: int, img_size: int, mean, std, device: torch.device,
                 batch_size: int = 128, k: int = 20, temperature: float = 0.07, world_size: int = 1):
        batch_size = max(1, min(batch_size, samples // world_size))
        rounds = -(-samples // (batch_size * world_size))  # the same number of batches on every rank
        self.images, self.labels, self.device = [], [], device
        self.padding = torch.zeros(batch_size, 3, img_size, img_size)
        self.k, self.temperature = k, temperature
        for index, (images, labels, real) in enumerate(eval_batches(shards, img_size, mean, std, device,
                                                                    batch_size, key="data.val")):
            # a padding batch (this rank's share ran out) is kept as None: every rank must embed as many batches,
            # as each forward is a collective under ZeRO-3 (the parameters are gathered)
            self.images.append(images.to("cpu", torch.float16) if real else None)
            if real:
                self.labels.append(labels.cpu())
            if index + 1 == rounds:
                break
        self.labels = all_gather_rows(torch.cat(self.labels).to(device)).cpu() if self.labels else torch.zeros(0)
        self.seconds, self.started = 0.0, time.perf_counter()
        if len(self.labels) < 4 or (self.labels < 0).any():
            raise ValueError(f"eval.every needs labelled samples in data.val={shards} (found {len(self.labels)}, "
                             "labels -1 mean shards without cls)")

    @torch.no_grad()
    def __call__(self, encoder) -> dict[str, float]:
        """The scores of `encoder`, and `perf/monitor_fraction`: the share of the time since set-up spent here."""
        t0 = time.perf_counter()
        was_training = encoder.training
        encoder.eval()
        feats = []
        for images in self.images:
            out = pooled_features(encoder, (self.padding if images is None else images).to(self.device, torch.float32),
                                  "token")
            if images is not None:
                feats.append(out)
        encoder.train(was_training)
        feats = all_gather_rows(torch.cat(feats) if feats else torch.zeros(0, encoder.embed_dim, device=self.device))
        feats, labels = feats.cpu(), self.labels
        bank, queries = slice(0, None, 2), slice(1, None, 2)
        num_classes = int(labels.max()) + 1
        votes = knn_predict(feats[bank], labels[bank], feats[queries], num_classes, min(self.k, len(feats[bank])),
                            self.temperature)
        scores = {"monitor/knn_top1": topk_accuracy(votes, labels[queries])["top1"],
                  "monitor/rankme": rankme(feats), "monitor/feature_std": feature_std(feats)}
        now = time.perf_counter()
        self.seconds += now - t0
        return {**scores, "perf/monitor_fraction": self.seconds / (now - self.started)}
