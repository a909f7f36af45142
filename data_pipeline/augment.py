"""Decoding and per-method views on the CPU. Views are uint8 tensors; normalisation happens on device."""

import io

import torch
from PIL import Image
from torchvision.transforms import v2

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp")


def decode_image(sample: dict) -> Image.Image:
    """The sample's image as RGB; a clear error naming the sample when it is missing or unreadable."""
    for key in IMAGE_KEYS:
        data = sample.get(key)
        if data is not None:
            break
    else:
        raise ValueError(f"sample {sample.get('__key__')} in {sample.get('__url__')} has no image "
                         f"(keys: {sorted(k for k in sample if not k.startswith('__'))})")
    if not data:
        raise ValueError(f"sample {sample.get('__key__')} in {sample.get('__url__')}: empty {key} file")
    try:
        return Image.open(io.BytesIO(data)).convert("RGB")
    except Exception as err:
        raise ValueError(f"sample {sample.get('__key__')} in {sample.get('__url__')}: cannot decode "
                         f"{key} ({err})") from None


class SingleView:
    """One random-resized-crop + flip view, as MAE and the other masked-image methods use."""

    def __init__(self, img_size: int, crop_scale=(0.2, 1.0), hflip: float = 0.5):
        self.transform = v2.Compose([
            v2.RandomResizedCrop(img_size, scale=tuple(crop_scale), interpolation=v2.InterpolationMode.BICUBIC),
            v2.RandomHorizontalFlip(hflip),
            v2.PILToTensor(),
        ])

    def __call__(self, img: Image.Image) -> dict[str, torch.Tensor]:
        return {"images": self.transform(img)}


class EvalView:
    """Resize + centre crop (crop_pct 0.875, as timm and MAE evaluate)."""

    def __init__(self, img_size: int, crop_pct: float = 0.875):
        self.transform = v2.Compose([
            v2.Resize(int(round(img_size / crop_pct)), interpolation=v2.InterpolationMode.BICUBIC),
            v2.CenterCrop(img_size),
            v2.PILToTensor(),
        ])

    def __call__(self, img: Image.Image) -> dict[str, torch.Tensor]:
        return {"images": self.transform(img)}
