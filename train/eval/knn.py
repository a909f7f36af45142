"""Weighted k-NN classification on frozen features, as DINO evaluates (cosine similarity, k=20, T=0.07)."""

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                num_classes: int, k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Class scores (N_test, C): each test sample's k most similar train samples vote with exp(sim / T)."""
    train = F.normalize(train_features.float(), dim=1)
    k = min(k, train.shape[0])
    scores = []
    for start in range(0, test_features.shape[0], chunk):
        test = F.normalize(test_features[start:start + chunk].float(), dim=1)
        sim, idx = (test @ train.T).topk(k, dim=1)
        weights = (sim / temperature).exp()
        votes = torch.zeros(test.shape[0], num_classes, device=test.device)
        scores.append(votes.scatter_add_(1, train_labels[idx], weights))
    return torch.cat(scores)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    """Top-k accuracies in percent."""
    top = scores.topk(max(ks), dim=1).indices
    hits = top == labels.unsqueeze(1)
    return {f"top{k}": 100.0 * hits[:, :k].any(dim=1).float().mean().item() for k in ks if k <= scores.shape[1]}
