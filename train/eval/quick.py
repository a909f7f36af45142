"""End-of-run evaluation for small labelled sets (the demo): k-NN and linear probe on in-memory features."""

import torch

from train.eval.features import extract_features
from train.eval.metrics import fit_linear_probe, knn_predict, probe_scores, topk_accuracy


def evaluate_encoder(encoder, cfg, device: torch.device, pool: str = "token") -> dict[str, float]:
    """k-NN (DINO's weighted vote) and linear-probe top-1 of `encoder` on data.val, fit on data.train."""
    args = (cfg.model.img_size, cfg.data.mean, cfg.data.std, device)
    train_f, train_y = extract_features(encoder, cfg.data.train, *args, pool=pool, key="data.train")
    val_f, val_y = extract_features(encoder, cfg.data.val, *args, pool=pool, key="data.val")
    num_classes = int(max(train_y.max(), val_y.max())) + 1
    knn = topk_accuracy(knn_predict(train_f, train_y, val_f, num_classes, cfg.eval.knn_k,
                                    cfg.eval.knn_temperature), val_y)
    probe = fit_linear_probe(train_f, train_y, num_classes, epochs=cfg.eval.probe_epochs, seed=cfg.run.seed)
    linear = topk_accuracy(probe_scores(probe, val_f), val_y)
    return {"knn_top1": knn["top1"], "linear_top1": linear["top1"]}
