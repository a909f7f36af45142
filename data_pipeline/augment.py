"""Decoding and per-method views. Views are uint8 tensors; normalisation happens on the device.

A views object is called on a decoded RGB PIL image in a DataLoader worker and returns the sample's
batch entries. `DeviceSingleView` and `DeviceMultiView` are the exception: they need the encoded bytes
(`from_sample`), pack them with their own `collate`, and decode + augment on the training device in
`to_device` (torchvision's nvjpeg decoder on CUDA), so the CPU workers only read bytes and draw each
sample's random parameters.

The multi-view recipes (MoCo v3, SimCLR, DINO) are lists of `ViewRecipe`s. A view's random parameters
(crop box, flip, jitter factors and order, grayscale, blur sigma, solarize) are drawn by
`ViewRecipe.draw` from the torch RNG, which the stream seeds per sample, so they are a pure function
of the sample's seed; `render_view` applies them with the official recipes' own PIL operations (the
CPU path) and `DeviceMultiView` with the batched torch ops of `device_ops` (the device path).
"""

import contextlib
import functools
import io
import logging
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import ColorJitter, RandomResizedCrop, v2
from torchvision.transforms import functional as TF
from torchvision.transforms.v2.functional import pil_to_tensor

from data_pipeline import device_ops
from data_pipeline.batch import to_device

log = logging.getLogger(__name__)
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp")
# the official recipes' (global) crop scales, used when data.crop_scale is not set
RECIPE_CROP_SCALE = {"single": (0.2, 1.0), "moco_v3": (0.08, 1.0), "simclr": (0.08, 1.0), "dino": (0.4, 1.0),
                     "finetune": (0.08, 1.0), "mapet": (1.0, 1.0)}
BICUBIC = v2.InterpolationMode.BICUBIC


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
    if img.mode == "RGB":
        img.load()  # decoded in place: convert() would copy the pixels
        return img
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


class SingleView:
    """One random-resized-crop + flip view, as MAE and the other masked-image methods use (bicubic, as MAE)."""

    def __init__(self, img_size: int, crop_scale=(0.2, 1.0), hflip: float = 0.5):
        self.img_size, self.crop_scale, self.hflip = img_size, tuple(crop_scale), hflip

    def params(self, img: Image.Image) -> tuple[int, int, int, int, bool]:
        """(top, left, height, width, flip) drawn from the torch RNG; needs only the image size."""
        top, left, height, width = RandomResizedCrop.get_params(img, list(self.crop_scale), [3 / 4, 4 / 3])
        return top, left, height, width, bool(torch.rand(1).item() < self.hflip)

    def crop(self, img: Image.Image) -> Image.Image:
        """The random resized crop (in PIL, bicubic) and flip."""
        top, left, height, width, flip = self.params(img)
        out = img.crop((left, top, left + width, top + height)).resize((self.img_size,) * 2, Image.BICUBIC)
        return out.transpose(Image.FLIP_LEFT_RIGHT) if flip else out

    def __call__(self, img: Image.Image) -> dict[str, torch.Tensor]:
        return {"images": pil_to_tensor(self.crop(img))}


JPEG, RAW = 0, 1  # how the device views ship a sample: JPEG bytes, or RGB pixels decoded in the worker


def _clean_jpeg(img: Image.Image, data: bytes) -> bool:
    """A baseline-decodable RGB/grayscale JPEG that ends with its EOI marker (truncated files do not)."""
    return img.format == "JPEG" and img.mode in ("RGB", "L") and data.rstrip(b"\0").endswith(b"\xff\xd9")


def pack_image(sample: dict, img: Image.Image) -> tuple[torch.Tensor, list[int]]:
    """(payload, [kind, height, width]): the JPEG bytes, or the worker-decoded RGB pixels of other images."""
    _, data = image_bytes(sample)
    if _clean_jpeg(img, data):
        kind, payload = JPEG, data
    else:
        kind, payload = RAW, decode_image(sample).tobytes()
    return torch.frombuffer(bytearray(payload), dtype=torch.uint8), [kind, img.height, img.width]


def collate_packed(samples: list[dict]) -> dict[str, torch.Tensor]:
    """Concatenated payloads + offsets; the other tensors stacked."""
    sizes = torch.tensor([0] + [len(s["_encoded"]) for s in samples])
    out = {"_encoded": torch.cat([s["_encoded"] for s in samples]), "_offsets": sizes.cumsum(0),
           "labels": torch.tensor([s["labels"] for s in samples])}
    for key in samples[0]:
        if key not in out:
            out[key] = torch.stack([s[key] for s in samples])
    return out


def _decode_one(chunk: torch.Tensor, device: torch.device):
    try:
        return decode_jpeg(chunk, mode=ImageReadMode.RGB, device=device)
    except Exception:
        try:  # the device decoder's gaps (e.g. arithmetic coding): PIL on the CPU
            return pil_to_tensor(to_rgb(Image.open(io.BytesIO(chunk.numpy().tobytes())))).to(device)
        except Exception:
            return None


def decode_packed(batch: dict, device: torch.device) -> tuple[list, list[int]]:
    """Decode a packed batch's images on `device`: ((3, H, W) uint8 images, None where one cannot be decoded;
    for each sample the index of the sample whose image stands in for it (itself when decodable))."""
    encoded, offsets, header = batch.pop("_encoded"), batch.pop("_offsets").tolist(), batch.pop("_header").tolist()
    chunks = [encoded[offsets[i]:offsets[i + 1]] for i in range(len(header))]
    images: list = [None] * len(chunks)
    jpegs = [i for i, p in enumerate(header) if p[0] == JPEG]
    for i, (kind, height, width) in enumerate(header):
        if kind == RAW:
            images[i] = chunks[i].view(height, width, 3).permute(2, 0, 1).to(device, non_blocking=True)
    if jpegs:
        try:
            decoded = decode_jpeg([chunks[i] for i in jpegs], mode=ImageReadMode.RGB, device=device)
        except Exception:  # one bad image fails the whole batched call: decode one by one
            decoded = [_decode_one(chunks[i], device) for i in jpegs]
        for i, img in zip(jpegs, decoded):
            images[i] = img
    good = [i for i, img in enumerate(images) if img is not None]
    if not good:
        raise RuntimeError(f"none of the {len(images)} images of a batch could be decoded on {device}")
    return images, [i if img is not None else good[i % len(good)] for i, img in enumerate(images)]


class DeviceSingleView(SingleView):
    """SingleView with the pixel work on the training device.

    Workers read the bytes, parse the header and draw the crop and flip from the same per-sample seed
    as SingleView; `to_device` decodes the batch (nvjpeg on CUDA), crops, resizes (bicubic with
    antialiasing, as PIL), flips and normalises. JPEGs that are not plain RGB/grayscale or look
    truncated (and PNGs etc.) are decoded in the worker and shipped as pixels; a JPEG the device
    decoder rejects is decoded on the CPU, and an undecodable one is replaced by another sample of
    the batch and counted as skipped.
    """

    collate = staticmethod(collate_packed)

    def from_sample(self, sample: dict) -> dict[str, torch.Tensor]:
        img = open_image(sample)
        top, left, height, width, flip = self.params(img)
        payload, header = pack_image(sample, img)
        return {"_encoded": payload, "_header": torch.tensor(header),
                "_params": torch.tensor([top, left, height, width, flip])}

    def to_device(self, batch: dict, device: torch.device, mean, std) -> dict:
        """Decode, crop, resize, flip and normalise a packed batch on `device` (`_skipped`: how many samples
        could not be decoded and were replaced by others of the batch)."""
        decoded, source = decode_packed(batch, device)
        params = batch.pop("_params")[source].tolist()
        images = torch.empty(len(decoded), 3, self.img_size, self.img_size, dtype=torch.uint8, device=device)
        for i, (top, left, height, width, flip) in enumerate(params):
            out = device_ops.resized_crop(decoded[source[i]], top, left, height, width, self.img_size, "bicubic")
            images[i] = out.flip(-1) if flip else out
        out = to_device({**batch, "images": images, "labels": batch["labels"][source]}, device, mean, std)
        out["_skipped"] = sum(i != s for i, s in enumerate(source))
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


def posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's RandAugment posterize as on the Pillow the official runs used: 0 bits kept gives a black image
    (Pillow >= 11 raises instead, which made about 0.2% of fine-tuning samples count as undecodable)."""
    if bits_to_keep >= 8:
        return img
    return ImageOps.posterize(img, bits_to_keep) if bits_to_keep >= 1 else Image.new(img.mode, img.size)


class FinetuneView(SingleView):
    """MAE/BEiT fine-tuning: random-resized crop (bicubic), flip and timm's RandAugment ("rand-m9-mstd0.5-inc1").

    Random erasing and Mixup/CutMix act on the normalised batch on the device (the finetune method).
    """

    def __init__(self, img_size: int, crop_scale=(0.08, 1.0), hflip: float = 0.5,
                 rand_augment: str = "rand-m9-mstd0.5-inc1", mean=(0.485, 0.456, 0.406)):
        from timm.data.auto_augment import rand_augment_transform  # optional: only the finetune view

        super().__init__(img_size, crop_scale, hflip)
        hparams = {"translate_const": int(img_size * 0.45), "img_mean": tuple(min(255, round(255 * m)) for m in mean),
                   "interpolation": Image.BICUBIC}
        self.rand_augment = rand_augment_transform(rand_augment, hparams) if rand_augment else None
        for op in self.rand_augment.ops if self.rand_augment else ():
            if op.aug_fn.__name__ == "posterize":
                op.aug_fn = posterize

    def __call__(self, img: Image.Image) -> dict[str, torch.Tensor]:
        img = self.crop(img)
        if self.rand_augment is not None:
            # RandAugment draws from Python's and NumPy's global RNGs: seed them from torch's (seeded
            # per sample by the stream), so a resumed stream reproduces the same images
            with seeded_global_rngs(int(torch.randint(2**31, ()))):
                img = self.rand_augment(img)
        return {"images": pil_to_tensor(img)}


class CentreSquareJitterView:
    """MaPeT's pretraining view (official config: timm loader with scale [1, 1], ratio [1, 1], hflip 0,
    color_jitter 0.4): the centred square of the short side, resized (bicubic), colour-jittered
    (brightness, contrast, saturation 0.4 x `jitter_strength`), never flipped. `teacher_images` is
    the same crop without jitter: the official k-CLIP tokens are computed on the un-augmented crop."""

    def __init__(self, img_size: int, jitter_strength: float = 1.0):
        self.img_size = img_size
        self.jitter = v2.ColorJitter(*(0.4 * jitter_strength,) * 3)

    def __call__(self, img: Image.Image) -> dict[str, torch.Tensor]:
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        crop = img.crop((left, top, left + side, top + side)).resize((self.img_size,) * 2, Image.BICUBIC)
        return {"images": pil_to_tensor(self.jitter(crop)), "teacher_images": pil_to_tensor(crop)}


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


# a view's parameters, one float64 row per view (see ViewRecipe.draw)
TOP, LEFT, HEIGHT, WIDTH, FLIP, JITTER, FACTORS, ORDER, GRAY, SIGMA, SOLARIZE = 0, 1, 2, 3, 4, 5, 6, 10, 14, 15, 16
NUM_PARAMS = 17
IDENTITY = (1.0, 1.0, 1.0, 0.0)  # brightness, contrast, saturation, hue factors that change nothing
RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


@dataclass(frozen=True)
class ViewRecipe:
    """One augmented view as the official recipes write it: random resized crop, horizontal flip, colour
    jitter (torchvision ColorJitter: random order) with probability `jitter_p`, grayscale, Gaussian blur
    (sigma uniform in [0.1, 2], PIL's blur with radius = sigma) and solarize (threshold 128)."""

    size: int
    scale: tuple[float, float]
    interpolation: str = "bicubic"
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 0.0
    solarize_p: float = 0.0
    hflip: float = 0.5
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    sigma: tuple[float, float] = (0.1, 2.0)

    @functools.cached_property
    def _jitter_ranges(self) -> tuple:
        cj = ColorJitter(*self.jitter)
        return cj.brightness, cj.contrast, cj.saturation, cj.hue

    def draw(self, img: Image.Image) -> list[float]:
        """The view's parameters from the torch RNG (needs only the image size): crop box, flip, jitter
        applied, its four factors and order, grayscale, blur sigma (0: none), solarize."""
        top, left, height, width = RandomResizedCrop.get_params(img, list(self.scale), list(self.ratio))
        flip = float(torch.rand(1) < self.hflip)
        jitter = float(torch.rand(1) < self.jitter_p)
        order, *factors = ColorJitter.get_params(*self._jitter_ranges)
        factors = [identity if f is None else f for f, identity in zip(factors, IDENTITY)]
        gray = float(torch.rand(1) < self.gray_p)
        blur = bool(torch.rand(1) < self.blur_p)
        sigma = float(torch.empty(1).uniform_(*self.sigma))
        solarize = float(torch.rand(1) < self.solarize_p)
        return [top, left, height, width, flip, jitter, *factors, *order.tolist(), gray, sigma if blur else 0.0,
                solarize]


def render_view(img: Image.Image, recipe: ViewRecipe, p: list[float]) -> Image.Image:
    """The view with parameters `p`, made with the official recipes' PIL operations (torchvision v1 on PIL)."""
    top, left, height, width = (int(v) for v in p[:4])
    out = img.crop((left, top, left + width, top + height)).resize((recipe.size,) * 2, RESAMPLE[recipe.interpolation])
    if p[FLIP]:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    if p[JITTER]:
        for op in p[ORDER:ORDER + 4]:
            factor = p[FACTORS + int(op)]
            if factor == IDENTITY[int(op)]:
                continue
            if op == 0:
                out = ImageEnhance.Brightness(out).enhance(factor)
            elif op == 1:
                out = ImageEnhance.Contrast(out).enhance(factor)
            elif op == 2:
                out = ImageEnhance.Color(out).enhance(factor)
            else:
                out = TF.adjust_hue(out, factor)
    if p[GRAY]:
        out = out.convert("L").convert("RGB")  # the pixels of torchvision's to_grayscale(img, 3)
    if p[SIGMA]:
        out = out.filter(ImageFilter.GaussianBlur(radius=p[SIGMA]))
    if p[SOLARIZE]:
        out = ImageOps.solarize(out, 128)
    return out


class MultiView:
    """Several augmented views of one image: `groups` maps a batch key to its view recipes, each key's
    views of one size, stacked (B, V, 3, size, size)."""

    def __init__(self, groups: dict[str, list[ViewRecipe]]):
        for key, recipes in groups.items():
            if len({r.size for r in recipes}) > 1:
                raise ValueError(f"views of {key!r} differ in size: {[r.size for r in recipes]}")
        self.groups = {key: list(recipes) for key, recipes in groups.items() if recipes}

    def draw(self, img: Image.Image) -> list[list[float]]:
        """Every view's parameters, in the order of the groups and their recipes."""
        return [recipe.draw(img) for recipes in self.groups.values() for recipe in recipes]

    def __call__(self, img: Image.Image) -> dict[str, torch.Tensor]:
        params = iter(self.draw(img))
        return {key: torch.stack([pil_to_tensor(render_view(img, r, next(params))) for r in recipes])
                for key, recipes in self.groups.items()}


def two_views(img_size: int, crop_scale=(0.08, 1.0), asymmetric: bool = True, jitter_strength: float = 1.0,
              interpolation: str = "bilinear") -> dict[str, list[ViewRecipe]]:
    """Two global views as `views`.

    `asymmetric=True` is the BYOL recipe MoCo-v3 uses (main_moco.py: jitter (0.4, 0.4, 0.2, 0.1),
    blur 1.0 / 0.1, solarize 0.2 only on the second view, bilinear crops); `False` is SimCLR's symmetric
    recipe (colour distortion (0.8, 0.8, 0.8, 0.2) x strength, blur 0.5 on both, bicubic crops).
    `jitter_strength` scales the colour jitter (SimCLR's color_jitter_strength); hue is capped at 0.5.
    """
    crop = {"size": img_size, "scale": tuple(crop_scale), "interpolation": interpolation}
    if asymmetric:
        jitter = _scaled((0.4, 0.4, 0.2, 0.1), jitter_strength)
        return {"views": [ViewRecipe(**crop, jitter=jitter, blur_p=1.0),
                          ViewRecipe(**crop, jitter=jitter, blur_p=0.1, solarize_p=0.2)]}
    jitter = _scaled((0.8, 0.8, 0.8, 0.2), jitter_strength)
    return {"views": [ViewRecipe(**crop, jitter=jitter, blur_p=0.5)] * 2}


def multi_crop(img_size: int, crop_scale=(0.4, 1.0), num_local: int = 8, local_size: int = 96,
               local_crop_scale=(0.05, 0.4), jitter_strength: float = 1.0) -> dict[str, list[ViewRecipe]]:
    """DINO's multi-crop (main_dino.py DataAugmentationDINO): two global views (the BYOL pair, bicubic) in
    `views` and `num_local` small crops (jitter, blur 0.5) in `local_views`."""
    groups = two_views(img_size, crop_scale, True, jitter_strength, "bicubic")
    local = ViewRecipe(local_size, tuple(local_crop_scale), "bicubic", _scaled((0.4, 0.4, 0.2, 0.1), jitter_strength),
                       blur_p=0.5)
    return {**groups, "local_views": [local] * num_local}


class DeviceMultiView(MultiView):
    """MultiView with the pixel work on the training device.

    Workers read the bytes, parse the header and draw every view's parameters exactly as MultiView does
    (the same per-sample seed gives the same parameters); `to_device` decodes the batch (nvjpeg on CUDA)
    and makes each view with `device_ops`: per-sample crop + antialiased resize, then flip, colour jitter
    in each sample's order, grayscale, blur and solarize, each batched over the views that apply it.
    Images are handled as DeviceSingleView handles them (non-clean JPEGs decoded in the worker,
    undecodable ones replaced by another sample of the batch and counted).
    """

    collate = staticmethod(collate_packed)

    def from_sample(self, sample: dict) -> dict[str, torch.Tensor]:
        img = open_image(sample)
        params = self.draw(img)
        payload, header = pack_image(sample, img)
        return {"_encoded": payload, "_header": torch.tensor(header),
                "_params": torch.tensor(params, dtype=torch.float64)}

    @staticmethod
    def augment(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Flip, jitter, grayscale, blur and solarize float views (N, 3, H, W) with their (N, NUM_PARAMS)
        parameters (on the host: the masks are computed there, without device syncs)."""
        def rows(mask: torch.Tensor) -> torch.Tensor | None:
            index = mask.nonzero().squeeze(1)
            return index if len(index) else None

        if (index := rows(params[:, FLIP] > 0)) is not None:
            x[index] = x[index].flip(-1)
        jitter = params[:, JITTER] > 0
        for position in range(4):
            for op, fn in enumerate(device_ops.JITTER):
                factor = params[:, FACTORS + op]
                mask = jitter & (params[:, ORDER + position] == op) & (factor != IDENTITY[op])
                if (index := rows(mask)) is not None:
                    x[index] = fn(x[index], factor[index].to(x.device, non_blocking=True))
        if (index := rows(params[:, GRAY] > 0)) is not None:
            x[index] = device_ops.grayscale(x[index])
        if (index := rows(params[:, SIGMA] > 0)) is not None:
            x[index] = device_ops.gaussian_blur(x[index], params[index, SIGMA].to(x.device, non_blocking=True))
        if (index := rows(params[:, SOLARIZE] > 0)) is not None:
            x[index] = device_ops.solarize(x[index])
        return x

    def to_device(self, batch: dict, device: torch.device, mean, std) -> dict:
        """Decode, augment and normalise a packed batch on `device` (`_skipped` as DeviceSingleView's)."""
        decoded, source = decode_packed(batch, device)
        params = batch.pop("_params")[source]  # (B, V, NUM_PARAMS)
        out, first = {}, 0
        for key, recipes in self.groups.items():
            group = params[:, first:first + len(recipes)].reshape(-1, NUM_PARAMS)  # sample-major
            recipe = [recipes[i % len(recipes)] for i in range(len(group))]
            crops = torch.stack([
                device_ops.resized_crop(decoded[source[i // len(recipes)]], *(int(v) for v in p[:4]), r.size,
                                        r.interpolation)
                for i, (p, r) in enumerate(zip(group.tolist(), recipe))])
            views = self.augment(crops, group).to(torch.uint8)
            out[key] = views.view(len(source), len(recipes), *views.shape[1:])
            first += len(recipes)
        result = to_device({**batch, **out, "labels": batch["labels"][source]}, device, mean, std)
        result["_skipped"] = sum(i != s for i, s in enumerate(source))
        return result


DEVICE_VIEWS = ("single", "moco_v3", "simclr", "dino")  # the recipes data.decode can move onto the device


def decode_on_device(data, device: torch.device | None) -> bool:
    """Whether `data.decode` (auto | cpu | gpu) puts decoding and augmentation on the training device: auto
    does so on CUDA for every recipe but finetune (RandAugment stays in the workers); gpu on a machine
    without CUDA does the device half in the training process (for testing)."""
    if data.decode == "cpu" or data.views not in DEVICE_VIEWS:
        return False
    on_cuda = device is not None and device.type == "cuda"
    if data.decode == "gpu" and not on_cuda:
        log.warning("data.decode=gpu without CUDA: decoding in the training process on %s", device or "cpu")
    elif on_cuda:
        log.info("data.decode=%s: workers read bytes and draw %s parameters; decoding (nvjpeg) and augmentation "
                 "on %s", data.decode, data.views, device)
    return data.decode == "gpu" or on_cuda


def build_views(data, img_size: int, device: torch.device | None = None):
    """The training views named by `data.views` ("single", "moco_v3", "simclr", "dino", "finetune" or "mapet").

    `data.crop_scale` unset means the recipe's own (MAE 0.2, MoCo-v3/SimCLR 0.08, DINO 0.4); with
    `device`, `data.decode` may move decoding and augmentation onto it (DeviceSingleView, DeviceMultiView).
    """
    if data.views not in RECIPE_CROP_SCALE:
        raise ValueError(f"data.views={data.views!r}: choose single, moco_v3, simclr, dino, finetune or mapet")
    scale = tuple(data.crop_scale or RECIPE_CROP_SCALE[data.views])
    if data.views == "mapet":
        return CentreSquareJitterView(img_size, data.jitter_strength)
    if data.views == "finetune":
        return FinetuneView(img_size, scale, data.hflip, data.rand_augment, data.mean)
    on_device = decode_on_device(data, device)
    if data.views == "single":
        return (DeviceSingleView if on_device else SingleView)(img_size, scale, data.hflip)
    if data.views == "dino":
        groups = multi_crop(img_size, scale, data.local_crops, data.local_size, data.local_crop_scale,
                            data.jitter_strength)
    else:
        moco = data.views == "moco_v3"
        groups = two_views(img_size, scale, moco, data.jitter_strength, "bilinear" if moco else "bicubic")
    return (DeviceMultiView if on_device else MultiView)(groups)
