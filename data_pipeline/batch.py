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


def synthetic_batch(data, img_size: int, device: torch.device, seed: int = 0) -> dict:
    """Random pixels in the shape `data.views` gives (`data`: the config's data section), normalised on the device."""
    g = torch.Generator().manual_seed(seed)
    b = data.batch_size

    def pixels(*shape):
        return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)

    host = {"labels": torch.randint(0, 1000, (b,), generator=g)}
    if data.views in ("single", "finetune", "mapet"):
        host["images"] = pixels(b, 3, img_size, img_size)
        if data.views == "mapet":
            host["teacher_images"] = pixels(b, 3, img_size, img_size)
    else:
        host["views"] = pixels(b, 2, 3, img_size, img_size)
    if data.views == "dino" and data.local_crops:
        host["local_views"] = pixels(b, data.local_crops, 3, data.local_size, data.local_size)
    return to_device(host, device, data.mean, data.std)
