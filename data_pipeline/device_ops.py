"""The multi-view recipes' pixel operations, batched with per-sample parameters, in plain torch.

Each function takes float images (N, 3, H, W) holding uint8 values (0..255) on any device and returns
them the same way, rounded as the PIL operation the CPU path uses rounds (see `augment.render_view`):
brightness / contrast / saturation are PIL's `ImageEnhance` blends (truncated to uint8), hue is
torchvision's PIL `adjust_hue` (PIL's 8-bit HSV round trip), grayscale is PIL's "L" conversion,
solarize is `ImageOps.solarize` (threshold 128). The blur is a true Gaussian of the drawn sigma
(radius 3 sigma_max, edges replicated), which PIL's `GaussianBlur(radius=sigma)` approximates with
three box passes of the same variance. Factors and sigmas are (N,) tensors.
"""

import math

import torch
import torch.nn.functional as F

BLUR_SIGMA_MAX = 2.0


def blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's Image.blend(degenerate, x, factor): degenerate + factor (x - degenerate), clipped, truncated."""
    return (degenerate + factor.float().view(-1, 1, 1, 1) * (x - degenerate)).clamp_(0, 255).floor_()


def luma(x: torch.Tensor) -> torch.Tensor:
    """PIL's RGB -> L (ITU-R 601-2, 16-bit fixed point), (N, 1, H, W); exact in float32."""
    r, g, b = x.unbind(1)
    return torch.floor_((r * 19595 + g * 38470 + b * 7471 + 32768) / 65536).unsqueeze(1)


def brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return blend(torch.zeros_like(x), x, factor)


def contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the image's mean luma, rounded to an integer (ImageEnhance.Contrast)."""
    mean = torch.floor_(luma(x).double().mean(dim=(1, 2, 3), keepdim=True) + 0.5).float()
    return blend(mean.expand_as(x), x, factor)


def saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the image's luma (ImageEnhance.Color)."""
    return blend(luma(x).expand_as(x), x, factor)


def _rgb_to_hsv8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PIL's RGB -> HSV conversion (8-bit h, s, v; float32 steps where PIL's C code uses float)."""
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    cr = (maxc - minc).clamp_(min=1)
    s = cr / maxc.clamp(min=1)
    rc, gc, bc = (maxc - r) / cr, (maxc - g) / cr, (maxc - b) / cr
    h = torch.where(r == maxc, bc - gc, torch.where(g == maxc, (2.0 + rc.double() - bc).float(),
                                                    (4.0 + gc.double() - rc).float()))
    h = torch.fmod(h.double() / 6.0 + 1.0, 1.0).float()
    grey = maxc == minc
    h8 = torch.where(grey, 0, torch.floor(h.double() * 255.0).clamp_(0, 255))
    s8 = torch.where(grey, 0, torch.floor(s.double() * 255.0).clamp_(0, 255))
    return h8, s8, maxc.double()


def _hsv8_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """PIL's HSV -> RGB conversion of 8-bit h, s, v (float64 where PIL's C code uses double)."""
    h6 = h.double() * 6.0 / 255.0
    i = torch.floor(h6)
    f = (h6 - i).float()
    fs = (s.double() / 255.0).float()

    def round8(value):  # C's round() on non-negative values, then CLIP8
        return torch.floor(v * value + 0.5).clamp_(0, 255)

    p, q = round8(1.0 - fs.double()), round8(1.0 - (fs * f).double())
    t = round8(1.0 - fs.double() * (1.0 - f.double()))
    sector = i.long() % 6
    r = torch.stack([v, q, p, p, t, v]).gather(0, sector[None])[0]
    g = torch.stack([t, v, v, q, p, p]).gather(0, sector[None])[0]
    b = torch.stack([p, p, t, v, v, q]).gather(0, sector[None])[0]
    rgb = torch.stack([r, g, b], 1)
    return torch.where((s == 0).unsqueeze(1), v.unsqueeze(1), rgb).float()


def hue(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's PIL adjust_hue: HSV, h += int(factor * 255) modulo 256, back to RGB."""
    h, s, v = _rgb_to_hsv8(x)
    shift = torch.trunc(factor.double() * 255).view(-1, 1, 1)
    return _hsv8_to_rgb(torch.remainder(h + shift, 256), s, v)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    return luma(x).expand_as(x).contiguous()


def solarize(x: torch.Tensor, threshold: float = 128) -> torch.Tensor:
    return torch.where(x >= threshold, 255 - x, x)


def gaussian_kernels(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """(N, 2 radius + 1) normalised 1-D Gaussian kernels, one per sigma."""
    t = torch.arange(-radius, radius + 1, dtype=torch.float32, device=sigma.device)
    k = torch.exp(-(t[None] ** 2) / (2 * sigma.float()[:, None] ** 2))
    return k / k.sum(1, keepdim=True)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, sigma_max: float = BLUR_SIGMA_MAX) -> torch.Tensor:
    """Separable Gaussian blur with a sigma per image (grouped convolutions), rounded to uint8 values."""
    n, c, height, width = x.shape
    radius = min(math.ceil(3 * sigma_max), min(height, width) - 1)
    k = gaussian_kernels(sigma.to(x.device), radius).repeat_interleave(c, 0)  # (N*C, K)
    y = F.pad(x.reshape(1, n * c, height, width), (radius, radius, 0, 0), mode="replicate")
    y = F.conv2d(y, k.view(n * c, 1, 1, -1), groups=n * c)
    y = F.pad(y, (0, 0, radius, radius), mode="replicate")
    y = F.conv2d(y, k.view(n * c, 1, -1, 1), groups=n * c)
    return y.view(n, c, height, width).round_().clamp_(0, 255)


def resized_crop(image: torch.Tensor, top: int, left: int, height: int, width: int, size: int,
                 mode: str) -> torch.Tensor:
    """(3, size, size) float crop of a (3, H, W) uint8 image, resized with antialiasing (PIL's filters)."""
    crop = image[None, :, top:top + height, left:left + width].float()
    out = F.interpolate(crop, size=(size, size), mode=mode, antialias=True, align_corners=False)
    return out.round_().clamp_(0, 255)[0]


JITTER = (brightness, contrast, saturation, hue)  # torchvision ColorJitter's fn_idx order
