"""Linear probe on frozen features: BatchNorm without affine, then a linear layer (MAE's recipe)."""

import torch
from torch import nn


def fit_linear_probe(train_features: torch.Tensor, train_labels: torch.Tensor, num_classes: int,
                     epochs: int = 100, batch_size: int = 256, lr: float = 0.1, seed: int = 0) -> nn.Module:
    """Train BN(affine=False) + Linear with SGD (momentum 0.9, cosine lr) on in-memory features."""
    gen = torch.Generator().manual_seed(seed)
    probe = nn.Sequential(nn.BatchNorm1d(train_features.shape[1], affine=False),
                          nn.Linear(train_features.shape[1], num_classes))
    nn.init.trunc_normal_(probe[1].weight, std=0.01, generator=gen)
    nn.init.zeros_(probe[1].bias)
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
