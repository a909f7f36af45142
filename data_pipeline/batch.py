"""The batch contract: what a method's `forward(batch, step)` receives.

`images` (B, 3, H, W) for single-view methods; `views` (B, V, 3, H, W) for global views (V=2 for
MoCo-v3 / SimCLR / DINO) and `local_views` (B, L, 3, h, w) for DINO's local crops; `labels` (B,)
always (-1 when a shard has no `cls`); `compression` (a `train.compression.Setting`) only when a
compression schedule is active. Workers collate uint8 images; `to_device` makes them float and
normalises them on the device.
"""

import torch


def to_device(batch: dict, device: torch.device, mean, std) -> dict:
    """Move a batch to `device`; uint8 images (..., 3, H, W) become float, scaled to [0, 1] and normalised there."""
    mean = torch.tensor(mean, device=device).view(-1, 1, 1)
    std = torch.tensor(std, device=device).view(-1, 1, 1)
    out = {}
    for key, value in batch.items():
        value = value.to(device, non_blocking=True)
        if value.dtype == torch.uint8 and value.ndim >= 4:
            value = (value.float().div_(255) - mean) / std
        out[key] = value
    return out


def batch_shapes(data, img_size: int, batch: int) -> dict[str, tuple[int, ...]]:
    """The uint8 image tensors' shapes of a batch of `data.views` (`data`: the config's data section)."""
    square = (3, img_size, img_size)
    if data.views in ("single", "finetune", "mapet"):
        shapes = {"images": (batch, *square)}
        if data.views == "mapet":
            shapes["teacher_images"] = (batch, *square)
    else:
        shapes = {"views": (batch, 2, *square)}
    if data.views == "dino" and data.local_crops:
        shapes["local_views"] = (batch, data.local_crops, 3, data.local_size, data.local_size)
    return shapes


def synthetic_batch(data, img_size: int, device: torch.device, seed: int = 0) -> dict:
    """Random pixels in the shapes `data.views` gives, normalised on the device."""
    g = torch.Generator().manual_seed(seed)
    host = {"labels": torch.randint(0, 1000, (data.batch_size,), generator=g)}
    for key, shape in batch_shapes(data, img_size, data.batch_size).items():
        host[key] = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    return to_device(host, device, data.mean, data.std)
