"""Decoding and per-method views. Views are uint8 tensors; normalisation happens on the device.

A views object is called on a decoded RGB PIL image in a DataLoader worker and returns the sample's
batch entries. `DeviceSingleView` is the exception: it needs the encoded bytes (`from_sample`), packs
them with its own `collate`, and decodes + crops on the training device in `to_device`
(torchvision's nvjpeg decoder on CUDA), so the CPU workers only read bytes and draw crop parameters.
"""

import contextlib
import io
import logging
import random

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import RandomResizedCrop, v2
from torchvision.transforms.v2.functional import pil_to_tensor

from data_pipeline.batch import to_device

log = logging.getLogger(__name__)
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp")
# the official recipes' (global) crop scales, used when data.crop_scale is not set
RECIPE_CROP_SCALE = {"single": (0.2, 1.0), "moco_v3": (0.08, 1.0), "simclr": (0.08, 1.0), "dino": (0.4, 1.0),
                     "finetune": (0.08, 1.0)}
BICUBIC, BILINEAR = v2.InterpolationMode.BICUBIC, v2.InterpolationMode.BILINEAR


def _where(sample: dict) -> str:
    return f"sample {sample.get('__key__')} in {sample.get('__url__')}"


def image_bytes(sample: dict) -> tuple[str, bytes]:
    """(extension, encoded bytes) of the sample's image; a clear error naming the sample when missing or empty."""
    for key in IMAGE_KEYS:
        data = sample.get(key)
        if data is not None:
            break
    else:
        raise ValueError(f"{_where(sample)} has no image (keys: {sorted(k for k in sample if not k.startswith('__'))})")
    if not data:
        raise ValueError(f"{_where(sample)}: empty {key} file")
    return key, data


def open_image(sample: dict) -> Image.Image:
    """The sample's image opened lazily (header parsed, pixels not decoded yet)."""
    key, data = image_bytes(sample)
    try:
        return Image.open(io.BytesIO(data))
    except Exception as err:
        raise ValueError(f"{_where(sample)}: cannot decode {key} ({err})") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB pixels of any PIL image: transparency is composited over white, CMYK/grayscale/palette converted."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def decode_image(sample: dict) -> Image.Image:
    """The sample's image as RGB; a clear error naming the sample when it is missing or unreadable."""
    img = open_image(sample)
    try:
        return to_rgb(img)
    except Exception as err:
        raise ValueError(f"{_where(sample)}: cannot decode {image_bytes(sample)[0]} ({err})") from None


def blur_kernel(size: int) -> int:
    """Odd Gaussian kernel for sigma up to 2: 10% of the crop (SimCLR/BYOL: 23 at 224), at least 13 (= 3 sigma,
    what the PIL blur with radius sigma in MoCo-v3 and DINO covers), and smaller than the crop."""
    return max(3, min(max(13, int(0.1 * size) // 2 * 2 + 1), (size - 1) // 2 * 2 + 1))


def _blur(size: int, p: float):
    """Gaussian blur with sigma in [0.1, 2] applied with probability p (SimCLR / BYOL / MoCo-v3 / DINO)."""
    return v2.RandomApply([v2.GaussianBlur(blur_kernel(size), sigma=(0.1, 2.0))], p=p)


def _crop_flip_jitter(size: int, scale, jitter, interpolation=BICUBIC):
    return [
        v2.RandomResizedCrop(size, scale=tuple(scale), interpolation=interpolation),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(*jitter)], p=0.8),
        v2.RandomGrayscale(p=0.2),
    ]


class SingleView:
    """One random-resized-crop + flip view, as MAE and the other masked-image methods use (bicubic, as MAE)."""

    def __init__(self, img_size: int, crop_scale=(0.2, 1.0), hflip: float = 0.5):
        self.img_size, self.crop_scale, self.hflip = img_size, tuple(crop_scale), hflip

    def params(self, img: Image.Image) -> tuple[int, int, int, int, bool]:
        """(top, left, height, width, flip) drawn from the torch RNG; needs only the image size."""
        top, left, height, width = RandomResizedCrop.get_params(img, list(self.crop_scale), [3 / 4, 4 / 3])
        return top, left, height, width, bool(torch.rand(1).item() < self.hflip)

    def __call__(self, img: Image.Image) -> dict[str, torch.Tensor]:
        top, left, height, width, flip = self.params(img)
        out = img.crop((left, top, left + width, top + height)).resize((self.img_size,) * 2, Image.BICUBIC)
        if flip:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        return {"images": pil_to_tensor(out)}


JPEG, RAW = 0, 1  # how DeviceSingleView ships a sample: JPEG bytes, or RGB pixels decoded in the worker


def _clean_jpeg(img: Image.Image, data: bytes) -> bool:
    """A baseline-decodable RGB/grayscale JPEG that ends with its EOI marker (truncated files do not)."""
    return img.format == "JPEG" and img.mode in ("RGB", "L") and data.rstrip(b"\0").endswith(b"\xff\xd9")


class DeviceSingleView(SingleView):
    """SingleView with the pixel work on the training device.

    Workers read the bytes, parse the header and draw the crop and flip from the same per-sample seed
    as SingleView; `to_device` decodes the batch (nvjpeg on CUDA), crops, resizes (bicubic with
    antialiasing, as PIL), flips and normalises. JPEGs that are not plain RGB/grayscale or look
    truncated (and PNGs etc.) are decoded in the worker and shipped as pixels; a JPEG the device
    decoder rejects is decoded on the CPU, and an undecodable one is replaced by another sample of
    the batch and counted as skipped.
    """

    def from_sample(self, sample: dict) -> dict[str, torch.Tensor]:
        img = open_image(sample)
        top, left, height, width, flip = self.params(img)
        _, data = image_bytes(sample)
        if _clean_jpeg(img, data):
            kind, payload = JPEG, data
        else:
            kind, payload = RAW, decode_image(sample).tobytes()
        return {"_encoded": torch.frombuffer(bytearray(payload), dtype=torch.uint8),
                "_params": torch.tensor([kind, img.height, img.width, top, left, height, width, flip])}

    @staticmethod
    def collate(samples: list[dict]) -> dict[str, torch.Tensor]:
        sizes = torch.tensor([0] + [len(s["_encoded"]) for s in samples])
        return {"_encoded": torch.cat([s["_encoded"] for s in samples]), "_offsets": sizes.cumsum(0),
                "_params": torch.stack([s["_params"] for s in samples]),
                "labels": torch.tensor([s["labels"] for s in samples])}

    def _decode(self, chunks: list[torch.Tensor], params: torch.Tensor, device: torch.device) -> list:
        """Decoded (3, H, W) uint8 images on `device`, None where a sample cannot be decoded."""
        images: list = [None] * len(chunks)
        jpegs = [i for i, p in enumerate(params.tolist()) if p[0] == JPEG]
        for i, p in enumerate(params.tolist()):
            if p[0] == RAW:
                images[i] = chunks[i].view(p[1], p[2], 3).permute(2, 0, 1).to(device, non_blocking=True)
        if jpegs:
            try:
                decoded = decode_jpeg([chunks[i] for i in jpegs], mode=ImageReadMode.RGB, device=device)
            except Exception:  # one bad image fails the whole batched call: decode one by one
                decoded = [self._decode_one(chunks[i], device) for i in jpegs]
            for i, img in zip(jpegs, decoded):
                images[i] = img
        return images

    @staticmethod
    def _decode_one(chunk: torch.Tensor, device: torch.device):
        try:
            return decode_jpeg(chunk, mode=ImageReadMode.RGB, device=device)
        except Exception:
            try:  # the device decoder's gaps (e.g. arithmetic coding): PIL on the CPU
                return pil_to_tensor(to_rgb(Image.open(io.BytesIO(chunk.numpy().tobytes())))).to(device)
            except Exception:
                return None

    def to_device(self, batch: dict, device: torch.device, mean, std) -> dict:
        """Decode, crop, resize, flip and normalise a packed batch on `device` (`_skipped`: how many samples
        could not be decoded and were replaced by others of the batch)."""
        encoded, offsets, params = batch.pop("_encoded"), batch.pop("_offsets").tolist(), batch.pop("_params")
        chunks = [encoded[offsets[i]:offsets[i + 1]] for i in range(len(params))]
        decoded = self._decode(chunks, params, device)
        good = [i for i, img in enumerate(decoded) if img is not None]
        if not good:
            raise RuntimeError(f"none of the {len(decoded)} images of a batch could be decoded on {device}")
        labels = batch["labels"].clone()
        size = (self.img_size, self.img_size)
        images = torch.empty(len(decoded), 3, *size, dtype=torch.uint8, device=device)
        for i, img in enumerate(decoded):
            source = i if img is not None else good[i % len(good)]
            _, _, _, top, left, height, width, flip = params[source].tolist()
            crop = decoded[source][None, :, top:top + height, left:left + width].float()
            out = F.interpolate(crop, size=size, mode="bicubic", antialias=True, align_corners=False)
            out = out.round_().clamp_(0, 255)[0]
            images[i] = out.flip(-1) if flip else out
            labels[i] = batch["labels"][source]
        out = to_device({**batch, "images": images, "labels": labels}, device, mean, std)
        out["_skipped"] = len(decoded) - len(good)
        return out


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
        from timm.data.auto_augment import rand_augment_transform  # optional: only the finetune view

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
            v2.Resize(int(round(img_size / crop_pct)), interpolation=BICUBIC),
            v2.CenterCrop(img_size),
            v2.PILToTensor(),
        ])

    def __call__(self, img: Image.Image) -> dict[str, torch.Tensor]:
        return {"images": self.transform(img)}


def _scaled(jitter, strength: float) -> tuple[float, ...]:
    return tuple(min(j * strength, 0.5) if i == 3 else j * strength for i, j in enumerate(jitter))


class TwoViews:
    """Two augmented views stacked as `views` (B, 2, 3, H, W).

    `asymmetric=True` is the BYOL recipe MoCo-v3 uses (main_moco.py: jitter (0.4, 0.4, 0.2, 0.1),
    blur 1.0 / 0.1, solarize 0.2 only on the second view, bilinear crops); `False` is SimCLR's symmetric
    recipe (colour distortion (0.8, 0.8, 0.8, 0.2) x strength, blur 0.5 on both, bicubic crops).
    `jitter_strength` scales the colour jitter (SimCLR's color_jitter_strength); hue is capped at 0.5.
    """

    def __init__(self, img_size: int, crop_scale=(0.08, 1.0), asymmetric: bool = True, jitter_strength: float = 1.0,
                 interpolation=BILINEAR):
        if asymmetric:
            jitter = _scaled((0.4, 0.4, 0.2, 0.1), jitter_strength)
            crop = _crop_flip_jitter(img_size, crop_scale, jitter, interpolation)
            first = crop + [_blur(img_size, 1.0)]
            second = _crop_flip_jitter(img_size, crop_scale, jitter, interpolation) + [
                _blur(img_size, 0.1), v2.RandomSolarize(128, p=0.2)]
        else:
            jitter = _scaled((0.8, 0.8, 0.8, 0.2), jitter_strength)
            first = second = _crop_flip_jitter(img_size, crop_scale, jitter, interpolation) + [_blur(img_size, 0.5)]
        self.first = v2.Compose(first + [v2.PILToTensor()])
        self.second = v2.Compose(second + [v2.PILToTensor()])

    def __call__(self, img: Image.Image) -> dict[str, torch.Tensor]:
        return {"views": torch.stack([self.first(img), self.second(img)])}


class MultiCrop:
    """DINO's multi-crop (main_dino.py DataAugmentationDINO): two global views (the BYOL pair, bicubic) in
    `views` (B, 2, 3, H, W) and `num_local` small crops (jitter, blur 0.5) in `local_views` (B, L, 3, h, w)."""

    def __init__(self, img_size: int, crop_scale=(0.4, 1.0), num_local: int = 8, local_size: int = 96,
                 local_crop_scale=(0.05, 0.4), jitter_strength: float = 1.0):
        self.global_views = TwoViews(img_size, crop_scale, True, jitter_strength, interpolation=BICUBIC)
        jitter = _scaled((0.4, 0.4, 0.2, 0.1), jitter_strength)
        self.local = v2.Compose(_crop_flip_jitter(local_size, local_crop_scale, jitter)
                                + [_blur(local_size, 0.5), v2.PILToTensor()])
        self.num_local = num_local

    def __call__(self, img: Image.Image) -> dict[str, torch.Tensor]:
        out = self.global_views(img)
        if self.num_local:
            out["local_views"] = torch.stack([self.local(img) for _ in range(self.num_local)])
        return out


def decode_on_device(data, device: torch.device | None) -> bool:
    """Whether `data.decode` (auto | cpu | gpu) puts decoding on the training device: auto does so on CUDA for
    the single-view recipe; gpu on a machine without CUDA decodes in the training process (for testing)."""
    if data.decode == "cpu" or data.views != "single":
        return False
    on_cuda = device is not None and device.type == "cuda"
    if data.decode == "gpu" and not on_cuda:
        log.warning("data.decode=gpu without CUDA: decoding in the training process on %s", device or "cpu")
    elif on_cuda:
        log.info("data.decode=%s: workers read bytes, JPEGs are decoded on %s (nvjpeg)", data.decode, device)
    return data.decode == "gpu" or on_cuda


def build_views(data, img_size: int, device: torch.device | None = None):
    """The training views named by `data.views` ("single", "moco_v3", "simclr", "dino" or "finetune").

    `data.crop_scale` unset means the recipe's own (MAE 0.2, MoCo-v3/SimCLR 0.08, DINO 0.4); with
    `device`, `data.decode` may move single-view decoding onto it (DeviceSingleView).
    """
    if data.views not in RECIPE_CROP_SCALE:
        raise ValueError(f"data.views={data.views!r}: choose single, moco_v3, simclr, dino or finetune")
    scale = tuple(data.crop_scale or RECIPE_CROP_SCALE[data.views])
    if data.views == "single":
        cls = DeviceSingleView if decode_on_device(data, device) else SingleView
        return cls(img_size, scale, data.hflip)
    if data.views == "moco_v3":
        return TwoViews(img_size, scale, True, data.jitter_strength, BILINEAR)
    if data.views == "finetune":
        return FinetuneView(img_size, scale, data.hflip, data.rand_augment, data.mean)
    if data.views == "simclr":
        return TwoViews(img_size, scale, False, data.jitter_strength, BICUBIC)
    return MultiCrop(img_size, scale, data.local_crops, data.local_size, data.local_crop_scale, data.jitter_strength)
