"""Losses of targets several methods share: MAE's per-patch pixel error, feature regression to a teacher."""

import torch
import torch.nn.functional as F

from train.models.patches import normalize_patches


def per_patch_loss(pred: torch.Tensor, target: torch.Tensor, norm_pix_loss: bool) -> torch.Tensor:
    """Mean squared error of each patch (B, N), computed in float32."""
    target = target.float()
    if norm_pix_loss:
        target = normalize_patches(target)
    return (pred.float() - target).pow(2).mean(dim=-1)


def feature_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "cosine") -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, mean cosine similarity) of predicted vs teacher features (B, T, C), in float32.

    "cosine": 2 - 2 cos of the L2-normalised pair, averaged over tokens (D-iGPT, BYOL);
    "smooth_l1": smooth-L1 against the teacher features layer-normalised per token.
    """
    pred, target = pred.float(), target.float()
    cosine = F.cosine_similarity(pred, target, dim=-1).mean()
    if kind == "cosine":
        return 2 - 2 * cosine, cosine
    return F.smooth_l1_loss(pred, F.layer_norm(target, target.shape[-1:])), cosine
