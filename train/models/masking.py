"""Index helpers for token subsets: MAE's argsort-of-noise masking, gather and restore."""

import torch


def random_masking(batch: int, num_tokens: int, num_keep: int, device: torch.device,
                   generator: torch.Generator | None = None):
    """Per-sample uniform random subset, as MAE's `random_masking`.

    Returns `ids_keep` (B, num_keep), `ids_restore` (B, N: position of each token in the shuffled
    order) and `mask` (B, N: 0 kept, 1 removed).
    """
    noise = torch.rand(batch, num_tokens, device=device, generator=generator)
    return masking_from_scores(noise, num_keep)


def masking_from_scores(scores: torch.Tensor, num_keep: int):
    """Keep the `num_keep` lowest-scoring tokens of each row; same outputs as `random_masking`."""
    ids_shuffle = torch.argsort(scores, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :num_keep]
    mask = torch.ones_like(scores)
    mask[:, :num_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return ids_keep, ids_restore, mask


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x (B, N, D), ids (B, K) -> (B, K, D)."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def restore_tokens(kept: torch.Tensor, ids_restore: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Put kept tokens (B, K, D) back in place among N slots filled with `fill` (1, 1, D), MAE-style."""
    batch, num_tokens = ids_restore.shape
    fillers = fill.to(kept.dtype).expand(batch, num_tokens - kept.shape[1], -1)
    return gather_tokens(torch.cat([kept, fillers], dim=1), ids_restore)
