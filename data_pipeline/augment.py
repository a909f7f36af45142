"""Decoding and per-method views on the CPU. Views are uint8 tensors; normalisation happens on device."""

import contextlib
import io
import random

import numpy as np
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


def _blur(size: int, p: float):
    """Gaussian blur with sigma in [0.1, 2] and a kernel of ~10% of the crop (SimCLR / BYOL / DINO)."""
    kernel = max(3, int(0.1 * size) // 2 * 2 + 1)
    return v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=p)


def _crop_flip_jitter(size: int, scale, jitter=(0.4, 0.4, 0.2, 0.1), jitter_p: float = 0.8):
    return [
        v2.RandomResizedCrop(size, scale=tuple(scale), interpolation=v2.InterpolationMode.BICUBIC),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(*jitter)], p=jitter_p),
        v2.RandomGrayscale(p=0.2),
    ]


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


@contextlib.contextmanager
def seeded_global_rngs(seed: int):
    """Seed Python's and NumPy's global RNGs for the duration, then restore them."""
    state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])


class FinetuneView:
    """MAE/BEiT fine-tuning: random-resized crop (bicubic), flip and timm's RandAugment ("rand-m9-mstd0.5-inc1").

    Random erasing and Mixup/CutMix act on the normalised batch on the device (the finetune method).
    """

    def __init__(self, img_size: int, crop_scale=(0.08, 1.0), hflip: float = 0.5,
                 rand_augment: str = "rand-m9-mstd0.5-inc1", mean=(0.485, 0.456, 0.406)):
        from timm.data.auto_augment import rand_augment_transform

        self.crop = v2.Compose([
            v2.RandomResizedCrop(img_size, scale=tuple(crop_scale), interpolation=v2.InterpolationMode.BICUBIC),
            v2.RandomHorizontalFlip(hflip),
        ])
        hparams = {"translate_const": int(img_size * 0.45), "img_mean": tuple(min(255, round(255 * m)) for m in mean),
                   "interpolation": Image.BICUBIC}
        self.rand_augment = rand_augment_transform(rand_augment, hparams) if rand_augment else None
        self.to_tensor = v2.PILToTensor()

    def __call__(self, img: Image.Image) -> dict[str, torch.Tensor]:
        img = self.crop(img)
        if self.rand_augment is not None:
            # RandAugment draws from Python's and NumPy's global RNGs: seed them from torch's (seeded
            # per sample by the stream), so a resumed stream reproduces the same images
            with seeded_global_rngs(int(torch.randint(2**31, ()))):
                img = self.rand_augment(img)
        return {"images": self.to_tensor(img)}


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


class TwoViews:
    """Two augmented views stacked as `views` (B, 2, 3, H, W).

    `asymmetric=True` is the BYOL recipe MoCo-v3 uses (blur 1.0 / 0.1, solarize only on the second);
    `False` is SimCLR's symmetric recipe (colour jitter strength 1.0, blur 0.5 on both).
    """

    def __init__(self, img_size: int, crop_scale=(0.08, 1.0), asymmetric: bool = True):
        if asymmetric:
            first = _crop_flip_jitter(img_size, crop_scale) + [_blur(img_size, 1.0)]
            second = _crop_flip_jitter(img_size, crop_scale) + [_blur(img_size, 0.1), v2.RandomSolarize(128, p=0.2)]
        else:
            first = _crop_flip_jitter(img_size, crop_scale, (0.8, 0.8, 0.8, 0.2)) + [_blur(img_size, 0.5)]
            second = first
        self.first = v2.Compose(first + [v2.PILToTensor()])
        self.second = v2.Compose(second + [v2.PILToTensor()])

    def __call__(self, img: Image.Image) -> dict[str, torch.Tensor]:
        return {"views": torch.stack([self.first(img), self.second(img)])}


class MultiCrop:
    """DINO's multi-crop: two global views (as MoCo-v3's pair) in `views` (B, 2, 3, H, W) and
    `num_local` small crops in `local_views` (B, L, 3, h, w)."""

    def __init__(self, img_size: int, crop_scale=(0.4, 1.0), num_local: int = 8, local_size: int = 96,
                 local_crop_scale=(0.05, 0.4)):
        self.global_views = TwoViews(img_size, crop_scale, asymmetric=True)
        self.local = v2.Compose(_crop_flip_jitter(local_size, local_crop_scale) + [_blur(local_size, 0.5),
                                                                                   v2.PILToTensor()])
        self.num_local = num_local

    def __call__(self, img: Image.Image) -> dict[str, torch.Tensor]:
        out = self.global_views(img)
        if self.num_local:
            out["local_views"] = torch.stack([self.local(img) for _ in range(self.num_local)])
        return out


def build_views(data, img_size: int):
    """The training views named by `data.views` ("single", "moco_v3", "simclr", "dino" or "finetune")."""
    if data.views == "single":
        return SingleView(img_size, data.crop_scale, data.hflip)
    if data.views in ("moco_v3", "simclr"):
        return TwoViews(img_size, data.crop_scale, asymmetric=data.views == "moco_v3")
    if data.views == "finetune":
        return FinetuneView(img_size, data.crop_scale, data.hflip, data.rand_augment, data.mean)
    if data.views == "dino":
        return MultiCrop(img_size, data.crop_scale, data.local_crops, data.local_size, data.local_crop_scale)
    raise ValueError(f"data.views={data.views!r}: choose single, moco_v3, simclr, dino or finetune")
