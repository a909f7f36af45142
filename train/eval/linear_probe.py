"""Linear probe of a frozen encoder: BatchNorm without affine, then a linear layer (MAE's recipe).

    python -m train.eval.linear_probe --config train/configs/linprobe_vit_b.yaml method.init=RUN_OR_EXPORT \\
        data.train=.../train.json data.val=.../val.json

runs method `linear_probe` on the engine (MAE: augmented images through the frozen encoder, LARS,
top-1/top-5 on data.val after every checkpoint; see train/eval/finetune.py). `fit_linear_probe`
below is the quick in-memory variant on precomputed features that the demo's end-of-run
evaluation uses for small sets.
"""

import sys

import torch
from torch import nn

from train.methods.classify import probe_head


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


def main(argv=None) -> int:
    from train.eval.finetune import main as run

    return run(sys.argv[1:] if argv is None else argv, method="linear_probe")


if __name__ == "__main__":
    sys.exit(main())
