"""Multi-view augmentation: the device path's batched ops against the CPU path's PIL ops, the recipes'
random-parameter distributions, and exact resume of the device path."""

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps
from torchvision.transforms import functional as TF

from data_pipeline import device_ops
from data_pipeline.augment import (
    FACTORS,
    FLIP,
    GRAY,
    JITTER,
    NUM_PARAMS,
    ORDER,
    SIGMA,
    SOLARIZE,
    DeviceMultiView,
    FinetuneView,
    ViewRecipe,
    build_views,
    decode_image,
    posterize,
    render_view,
)
from data_pipeline.stream import StreamLoader, resolve_shards
from train.config import DataConfig

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def photo(seed: int, size=(56, 44)) -> Image.Image:
    """Smooth colours plus noise: every jitter op has something to change."""
    rng = np.random.default_rng(seed)
    low = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    return Image.fromarray(np.clip(np.asarray(low, float) + rng.normal(0, 25, (size[1], size[0], 3)), 0, 255)
                           .astype(np.uint8))


def as_tensor(img: Image.Image) -> torch.Tensor:
    return TF.pil_to_tensor(img).float()


@pytest.mark.parametrize("factor", [0.6, 0.97, 1.4])
def test_jitter_grayscale_solarize_are_the_pil_operations_exactly(factor):
    """Tolerance 0: the device ops reproduce PIL's (and torchvision's PIL) rounding bit for bit."""
    images = [photo(i) for i in range(3)]
    x = torch.stack([as_tensor(img) for img in images])
    f = torch.full((3,), factor)
    for op, pil in [(device_ops.brightness, lambda im: ImageEnhance.Brightness(im).enhance(factor)),
                    (device_ops.contrast, lambda im: ImageEnhance.Contrast(im).enhance(factor)),
                    (device_ops.saturation, lambda im: ImageEnhance.Color(im).enhance(factor))]:
        assert torch.equal(op(x, f), torch.stack([as_tensor(pil(im)) for im in images])), op.__name__
    hues = torch.tensor([-0.1, 0.003, 0.5 * (factor - 1)])  # negative, tiny and positive shifts, one per image
    expected = torch.stack([as_tensor(TF.adjust_hue(im, h.item())) for im, h in zip(images, hues)])
    assert torch.equal(device_ops.hue(x, hues), expected)
    assert torch.equal(device_ops.grayscale(x), torch.stack([as_tensor(im.convert("L").convert("RGB"))
                                                             for im in images]))
    assert torch.equal(device_ops.solarize(x), torch.stack([as_tensor(ImageOps.solarize(im, 128)) for im in images]))
    assert not torch.equal(device_ops.hue(x, hues), x)  # the ops do change the pixels


@pytest.mark.parametrize("mode, resample, max_diff", [("bilinear", Image.BILINEAR, 1), ("bicubic", Image.BICUBIC, 6)])
def test_crop_resize_agrees_with_pil(mode, resample, max_diff):
    """Antialiased torch resize vs PIL's filters (down- and upscaling): +-1 level (bilinear), +-6 (bicubic: PIL
    clips to uint8 between its horizontal and vertical pass, which shows where bicubic overshoots), mean < 0.3."""
    img = photo(0, (90, 70))
    x = TF.pil_to_tensor(img)
    for top, left, height, width, size in [(5, 3, 60, 50, 24), (0, 0, 70, 90, 32), (10, 20, 12, 9, 24)]:
        ours = device_ops.resized_crop(x, top, left, height, width, size, mode)
        pil = as_tensor(img.crop((left, top, left + width, top + height)).resize((size, size), resample))
        diff = (ours - pil).abs()
        assert diff.max() <= max_diff and diff.mean() < 0.3, (top, left, height, width, diff.max())


def reference_blur(x: np.ndarray, sigma: float, radius: int) -> np.ndarray:
    """The Gaussian blur by its definition: weights exp(-d^2 / 2 sigma^2) / sum over |d| <= radius, separable,
    edge pixels repeated."""
    weights = np.exp(-np.arange(-radius, radius + 1) ** 2 / (2 * sigma ** 2))
    weights /= weights.sum()
    for axis in (2, 1):
        padded = np.pad(x, [(0, 0)] + [(radius, radius) if a == axis else (0, 0) for a in (1, 2)], mode="edge")
        x = sum(w * np.take(padded, range(i, i + x.shape[axis]), axis=axis) for i, w in enumerate(weights))
    return x


def test_blur_is_the_gaussian_of_each_samples_sigma():
    images = [photo(i, (40, 30)) for i in range(3)]
    x = torch.stack([as_tensor(img) for img in images])
    sigma = torch.tensor([0.1, 0.9, 2.0])
    out = device_ops.gaussian_blur(x, sigma)
    for i, s in enumerate(sigma.tolist()):
        expected = np.round(reference_blur(x[i].double().numpy(), s, radius=6))
        assert np.abs(out[i].numpy() - expected).max() <= 1  # float32 rounding at .5 only
        # PIL's GaussianBlur(radius=sigma) (the CPU path) approximates it with three box blurs of the same variance
        pil = as_tensor(images[i].filter(ImageFilter.GaussianBlur(radius=s)))
        assert (out[i] - pil).abs().mean() < 1.0, s
    assert torch.equal(out[0], x[0])  # sigma 0.1 leaves uint8 pixels as they are
    assert (out[2] - x[2]).abs().mean() > 5  # sigma 2 does blur


def fake_image(width=500, height=375) -> Image.Image:
    return Image.new("RGB", (width, height))


@pytest.mark.parametrize("views, blur, solarize", [
    ("moco_v3", [1.0, 0.1], [0.0, 0.2]),  # main_moco.py augmentation1 / augmentation2
    ("dino", [1.0, 0.1, 0.5], [0.0, 0.2, 0.0]),  # main_dino.py global_transfo1 / 2 / local_transfo
    ("simclr", [0.5, 0.5], [0.0, 0.0]),  # simclr data_util.py: blur 0.5 on both, no solarize
])
def test_random_parameters_follow_the_recipe_over_10000_draws(views, blur, solarize):
    """Frequencies within 4 standard errors (about 0.016 at n = 10,000) of the recipe's probabilities."""
    data = DataConfig(views=views, local_crops=1)
    recipes = [r for group in build_views(data, 224).groups.values() for r in group]
    img, n = fake_image(), 10_000
    torch.manual_seed(0)
    for recipe, blur_p, solarize_p in zip(recipes, blur, solarize, strict=True):
        p = torch.tensor([recipe.draw(img) for _ in range(n)])
        tol = lambda q: 4 * (q * (1 - q) / n) ** 0.5 + 1e-9  # noqa: E731
        for column, q in [(FLIP, 0.5), (JITTER, 0.8), (GRAY, 0.2), (SOLARIZE, solarize_p)]:
            assert abs((p[:, column] > 0).double().mean() - q) <= tol(q), (recipe, column)
        sigma = p[:, SIGMA]
        assert abs((sigma > 0).double().mean() - blur_p) <= tol(blur_p)
        drawn = sigma[sigma > 0]
        assert drawn.min() >= 0.1 and drawn.max() <= 2.0 and abs(drawn.mean() - 1.05) < 0.02  # uniform [0.1, 2]
        b, c, s, h = recipe.jitter
        for k, (low, high) in enumerate([(1 - b, 1 + b), (1 - c, 1 + c), (1 - s, 1 + s), (-h, h)]):
            f = p[:, FACTORS + k]
            assert f.min() >= low and f.max() <= high and abs(f.mean() - (low + high) / 2) < 0.01 * (high - low + 1)
        order = p[:, ORDER:ORDER + 4].long()
        assert (order.sort(1).values == torch.arange(4)).all()  # a permutation per view
        assert ((order == 0).double().mean(0) - 0.25).abs().max() < 0.02  # brightness equally often at each place
        area = p[:, 2] * p[:, 3] / (img.width * img.height)
        assert area.min() >= recipe.scale[0] - 0.01 and area.max() <= recipe.scale[1] + 0.01  # sides are rounded
        aspect = p[:, 3] / p[:, 2]
        assert aspect.min() >= 0.74 and aspect.max() <= 1.35


def jpeg_sample(seed: int, size=(60, 44)) -> dict:
    buf = io.BytesIO()
    photo(seed, size).save(buf, format="JPEG", quality=95)
    return {"__key__": str(seed), "jpg": buf.getvalue()}


@pytest.mark.parametrize("views", ["moco_v3", "simclr", "dino"])
def test_device_views_equal_the_cpu_views_for_the_same_seed(views):
    """The same per-sample seed draws the same parameters on both paths, and the device path's pixels (on CPU
    tensors) agree with the PIL ones to resize/decoder rounding plus blur's box approximation."""
    data = DataConfig(views=views, local_crops=2, local_size=16, decode="gpu")
    cpu, device = build_views(DataConfig(views=views, local_crops=2, local_size=16), 24), build_views(data, 24)
    assert isinstance(device, DeviceMultiView) and device.groups == cpu.groups
    samples = [jpeg_sample(i) for i in range(6)]
    cpu_out, packed = [], []
    for i, sample in enumerate(samples):
        torch.manual_seed(100 + i)
        params = cpu.draw(decode_image(sample))
        torch.manual_seed(100 + i)
        cpu_out.append(cpu(decode_image(sample)))
        torch.manual_seed(100 + i)
        packed.append({**device.from_sample(sample), "labels": i})
        assert torch.equal(packed[-1]["_params"], torch.tensor(params, dtype=torch.float64))
    batch = device.to_device(device.collate(packed), torch.device("cpu"), MEAN, STD)
    assert batch["_skipped"] == 0 and batch["labels"].tolist() == list(range(6))
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    for key in cpu.groups:
        ours = torch.stack([o[key] for o in cpu_out]).float()
        theirs = (batch[key] * std + mean) * 255
        assert theirs.shape == ours.shape and batch[key].dtype == torch.float32
        diff = (theirs - ours).abs()
        assert diff.mean() < 1.5, (key, diff.mean())
        assert (diff > 8).double().mean() < 0.01, (key, (diff > 8).double().mean())
        assert (ours - ours.roll(1, 0)).abs().mean() > 10  # the views differ from sample to sample


def test_device_augment_applies_each_op_only_where_drawn():
    """augment() on hand-made parameters: each row gets exactly its own ops, in its own jitter order."""
    x = torch.stack([as_tensor(photo(i, (20, 16))) for i in range(4)])
    params = torch.zeros(4, NUM_PARAMS, dtype=torch.float64)
    params[:, FACTORS:FACTORS + 4] = torch.tensor([1.0, 1.0, 1.0, 0.0])
    params[:, ORDER:ORDER + 4] = torch.arange(4)
    params[1, FLIP] = 1
    params[2, [JITTER, FACTORS, FACTORS + 3]] = torch.tensor([1, 1.3, 0.08], dtype=torch.float64)
    params[2, ORDER:ORDER + 4] = torch.tensor([3, 1, 2, 0])  # hue first, then brightness
    params[3, [GRAY, SIGMA, SOLARIZE]] = torch.tensor([1, 1.5, 1], dtype=torch.float64)
    out = DeviceMultiView.augment(x.clone(), params)
    assert torch.equal(out[0], x[0]) and torch.equal(out[1], x[1].flip(-1))
    img2 = TF.to_pil_image(x[2].to(torch.uint8))
    expected = as_tensor(ImageEnhance.Brightness(TF.adjust_hue(img2, 0.08)).enhance(1.3))
    assert torch.equal(out[2], expected)
    gray = device_ops.grayscale(x[3:])
    assert torch.equal(out[3:], device_ops.solarize(device_ops.gaussian_blur(gray, torch.tensor([1.5]))))


def test_render_view_applies_the_drawn_parameters_with_pil():
    img = photo(3, (64, 48))
    p = [4, 6, 30, 40, 1, 1, 1.2, 0.8, 1.1, -0.05, 2, 0, 3, 1, 1, 1.2, 1]
    recipe = ViewRecipe(16, (0.08, 1.0), "bicubic")
    out = img.crop((6, 4, 46, 34)).resize((16, 16), Image.BICUBIC).transpose(Image.FLIP_LEFT_RIGHT)
    out = ImageEnhance.Color(out).enhance(1.1)
    out = ImageEnhance.Brightness(out).enhance(1.2)
    out = TF.adjust_hue(out, -0.05)
    out = ImageEnhance.Contrast(out).enhance(0.8)
    out = out.convert("L").convert("RGB").filter(ImageFilter.GaussianBlur(radius=1.2))
    assert np.array_equal(np.asarray(render_view(img, recipe, p)), np.asarray(ImageOps.solarize(out, 128)))


@pytest.mark.parametrize("views", ["dino", "moco_v3"])
def test_device_multi_view_resumes_exactly(digits_dir, views):
    urls = resolve_shards(str(digits_dir / "train.json")).urls
    view = build_views(DataConfig(views=views, local_crops=2, local_size=8, decode="gpu"), 16)

    def loader(state=None):
        return StreamLoader(urls, view, batch_size=4, seed=3, shuffle_buffer=32, workers=0, state=state,
                            device=torch.device("cpu"), mean=MEAN, std=STD)

    full = [b for _, b in zip(range(6), loader())]
    first = loader()
    for i, _ in enumerate(first):
        if i == 2:
            break
    resumed = [b for _, b in zip(range(3), loader(first.state_dict()))]
    for a, b in zip(full[3:], resumed):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], torch.Tensor):
                assert torch.equal(a[key], b[key]), key
    assert not torch.equal(full[0]["views"], full[1]["views"])


def test_finetune_rand_augment_never_fails_on_zero_posterize_bits():
    """RandAugment's magnitude noise can ask posterize for 0 bits: a black image (the official Pillow's result),
    never an exception that would count the sample as undecodable."""
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    assert np.asarray(posterize(img, 0)).max() == 0
    assert np.array_equal(np.asarray(posterize(img, 2)), np.asarray(ImageOps.posterize(img, 2)))
    view = FinetuneView(16, rand_augment="rand-m9-mstd0.5-inc1")
    torch.manual_seed(0)
    for _ in range(2000):  # about 4 in 2000 draws ask for 0 bits
        assert view(img)["images"].shape == (3, 16, 16)
