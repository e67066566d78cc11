"""CIFAR-10-C style common corruptions of any image batch, at severities 1-5, in torch, seeded.

    noisy = corrupt(images, "gaussian_noise", severity=3, seed=0)     # (B, C, H, W) in [0, 1]
    ds_c = corrupt_dataset(dataset, "contrast", 5)                   # an ImageDataset

The severity parameters follow the published CIFAR-10-C tables (Hendrycks & Dietterich, "Benchmarking
Neural Network Robustness to Common Corruptions and Perturbations", 2019), written for 32x32
images; the implementations are ours (torch, and Pillow for JPEG), so the corrupted images are
close to, not bit-identical with, the released CIFAR-10-C files. Those files are read by
:func:`attrefine_fast.data.load_cifar_c`; this module gives any dataset (the embedded digits
default in particular) an out-of-distribution score.

Generated: 14 of the benchmark's 15 corruptions, all but frost, and three of its four extra ones
(speckle noise, Gaussian blur, saturate). The five with spatially structured randomness (glass
blur, motion blur, snow, fog, elastic transform) live in :mod:`attrefine_fast.corruptions_structured`.
Parameters in pixels keep their 32x32 values at every image size, except elastic transform's, which
the benchmark itself writes as fractions of the image side. Snow mixes in the RGB image's grey
(BT.601 luma); a 1-channel image is its own grey.

Not generated: frost, which overlays crops of the benchmark's own frost photographs (not shipped
here; a synthetic stand-in would be a different corruption), and the extra spatter.
"""
from __future__ import annotations

import io
import math
import numbers

import numpy as np
import torch
from torch.nn import functional as F

from .checks import check_images
from .corruptions_structured import FUNCTIONS as STRUCTURED_FUNCTIONS, clipped_zoom
from .data import ImageDataset, to_float

# Per-severity parameters (severity 1..5), from the CIFAR-10-C tables.
SEVERITY_PARAMS = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),  # noise std
    "shot_noise": (500, 250, 100, 75, 50),  # photons per unit intensity
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),  # share of salt-and-pepper values
    "speckle_noise": (0.06, 0.10, 0.12, 0.16, 0.20),  # multiplicative noise std
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),  # sigma in pixels
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1)),  # disk radius, alias sigma
    # Zooms np.arange(1, stop, 0.01), written as the table writes them: its float steps decide
    # where a zoomed crop's size rounds (1.2500000000000002, not 1.25, at the last one).
    "zoom_blur": (1.06, 1.11, 1.16, 1.21, 1.26),
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),  # factor on the deviation from the mean
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),  # added to the HSV value
    "saturate": ((0.3, 0.0), (0.1, 0.0), (1.5, 0.0), (2.0, 0.1), (2.5, 0.2)),  # HSV saturation * a + b
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),  # downsampling factor
    "jpeg_compression": (80, 65, 58, 50, 40),  # JPEG quality
    "glass_blur": ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),  # sigma, move distance, passes
    "motion_blur": ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),  # radius, sigma (pixels); angle U(-45, 45) degrees
    # Gaussian flakes (mean, std), zoom, threshold, motion blur radius and sigma, share of the scene kept
    "snow": (
        (0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9), (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
        (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85), (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
    ),
    "fog": ((0.2, 3), (0.5, 3), (0.75, 2.5), (1.0, 2), (1.5, 1.75)),  # haze thickness, fractal roughness decay
    # Displacement alpha, its smoothing sigma, affine jitter: fractions of the image side (x 32 at CIFAR)
    "elastic_transform": ((0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03)),
}
CORRUPTIONS = tuple(SEVERITY_PARAMS)
SEVERITIES = (1, 2, 3, 4, 5)


def _noise(shape, like, gen, kind="normal"):
    draw = torch.randn if kind == "normal" else torch.rand
    return draw(shape, generator=gen, dtype=torch.float32).to(like.device, like.dtype)


def gaussian_noise(x, c, gen):
    return x + _noise(x.shape, x, gen) * c


def shot_noise(x, c, gen):
    counts = torch.poisson((x * c).float().cpu(), generator=gen)
    return counts.to(x.device, x.dtype) / c


def impulse_noise(x, c, gen):
    # Every value independently: replaced with probability c, by 0 or 1 with equal odds.
    flip = _noise(x.shape, x, gen, "uniform") < c
    salt = _noise(x.shape, x, gen, "uniform") < 0.5
    return torch.where(flip, salt.to(x.dtype), x)


def speckle_noise(x, c, gen):
    return x + x * _noise(x.shape, x, gen) * c


def depthwise_filter(x, kernel, padding_mode):
    """Convolve each channel with the same 2-D kernel (k, k), k odd, same-size output."""
    k = kernel.shape[-1]
    c = x.shape[1]
    weight = kernel.to(x.device, x.dtype).expand(c, 1, k, k)
    pad = k // 2
    mode = padding_mode if padding_mode != "reflect" or min(x.shape[-2:]) > pad else "replicate"
    return F.conv2d(F.pad(x, (pad, pad, pad, pad), mode=mode), weight, groups=c)


def gaussian_kernel(sigma: float, radius: int) -> torch.Tensor:
    r = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (r / sigma) ** 2)
    g = g / g.sum()
    return torch.outer(g, g).float()


def gaussian_blur(x, sigma, gen):
    # Truncated at 4 sigma with edge replication, as scikit-image's gaussian filter does by default.
    return depthwise_filter(x, gaussian_kernel(sigma, max(1, int(4 * sigma + 0.5))), "replicate")


def defocus_blur(x, c, gen):
    radius, alias_sigma = c
    # A disk of the given radius, softened by a 3x3 Gaussian against aliasing, normalized.
    half = int(math.ceil(radius)) + 1
    r = torch.arange(-half, half + 1, dtype=torch.float64)
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    disk = (xx**2 + yy**2 <= radius**2).double()
    disk = disk / disk.sum()
    soft = F.conv2d(disk[None, None], gaussian_kernel(alias_sigma, 1).double()[None, None], padding=1)[0, 0]
    return depthwise_filter(x, (soft / soft.sum()).float(), "reflect")


def zoom_blur(x, c, gen):
    # The mean of the image and its clipped zooms by 1.00, 1.01, ... (the reference's crop, bilinear
    # stretch and trim, as snow's flakes are zoomed).
    zooms = np.arange(1, c, 0.01)
    out = x.clone()
    for z in zooms:
        out = out + clipped_zoom(x, float(z))
    return out / (len(zooms) + 1)


def contrast(x, c, gen):
    # Each channel towards its own mean over the image (the benchmark's per-channel means): the
    # colour balance stays, unlike a contrast around the grey level.
    mean = x.mean(dim=(2, 3), keepdim=True)
    return (x - mean) * c + mean


def brightness(x, c, gen):
    # With hue and saturation fixed, RGB scales linearly with the HSV value V = max(R, G, B).
    v = x.amax(dim=1, keepdim=True)
    v_new = (v + c).clamp(max=1.0)
    return torch.where(v > 0, x * v_new / v.clamp(min=1e-12), v_new.expand_as(x))


def saturate(x, c, gen):
    a, b = c
    v = x.amax(dim=1, keepdim=True)
    lo = x.amin(dim=1, keepdim=True)
    s = torch.where(v > 0, (v - lo) / v.clamp(min=1e-12), torch.zeros_like(v))
    s_new = (s * a + b).clamp(0.0, 1.0)
    # With hue and value fixed, each channel's distance below V scales with the saturation.
    # Grey pixels have hue 0 (red) in the HSV convention, so added saturation tints them red.
    scaled = v - (v - x) * (s_new / s.clamp(min=1e-12))
    red_hue = torch.cat([v, v * (1 - s_new), v * (1 - s_new)], dim=1) if x.shape[1] == 3 else v.expand_as(x)
    return torch.where(s > 0, scaled, red_hue)


def _box_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in): row i averages the input pixels under output pixel i's footprint, each
    weighted by the length it covers (exact area resampling, also for non-integer factors)."""
    edges = torch.arange(n_out + 1, dtype=torch.float64) * (n_in / n_out)
    lo = torch.maximum(edges[:-1, None], torch.arange(n_in, dtype=torch.float64)[None])
    hi = torch.minimum(edges[1:, None], torch.arange(1, n_in + 1, dtype=torch.float64)[None])
    w = (hi - lo).clamp(min=0)
    return w / w.sum(dim=1, keepdim=True)


def _box_resize(x, h: int, w: int):
    rows = _box_matrix(x.shape[-2], h).to(x.device, x.dtype)
    cols = _box_matrix(x.shape[-1], w).to(x.device, x.dtype)
    return rows @ x @ cols.T


def pixelate(x, c, gen):
    # Box down and box up, as CIFAR-10-C does with PIL; coverage weights rather than PIL's
    # nearest-centre sampling keep the distortion growing with the severity at 32 pixels
    # (torch's "area" + "nearest" shifts rows at factors like 30/32 and is not monotone).
    h, w = x.shape[-2:]
    return _box_resize(_box_resize(x, max(1, int(h * c)), max(1, int(w * c))), h, w)


def jpeg_compression(x, quality, gen):
    from PIL import Image

    if x.shape[1] not in (1, 3):
        raise ValueError(f"jpeg_compression needs 1 or 3 channels, got {x.shape[1]}")
    pixels = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = []
    for img in pixels:
        buf = io.BytesIO()
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(buf, format="JPEG", quality=int(quality))
        buf.seek(0)
        arr = np.asarray(Image.open(buf).convert("L" if img.shape[-1] == 1 else "RGB"))
        out.append(arr.reshape(img.shape))
    return to_float(torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)).to(x.device, x.dtype)


_FUNCTIONS = {
    "gaussian_noise": gaussian_noise, "shot_noise": shot_noise, "impulse_noise": impulse_noise,
    "speckle_noise": speckle_noise, "gaussian_blur": gaussian_blur, "defocus_blur": defocus_blur,
    "zoom_blur": zoom_blur, "contrast": contrast, "brightness": brightness, "saturate": saturate,
    "pixelate": pixelate, "jpeg_compression": jpeg_compression, **STRUCTURED_FUNCTIONS,
}


def corrupt(images: torch.Tensor, name: str, severity: int, *, seed: int | torch.Generator | None = 0) -> torch.Tensor:
    """A corrupted copy of ``images``.

    Args:
        images: (B, C, H, W) float in [0, 1] (uint8 0..255 is converted); not modified.
        name: one of :data:`CORRUPTIONS`.
        severity: 1..5.
        seed: an int or a CPU ``torch.Generator`` for the random corruptions: the noises, and the
            angles, fractals, pixel moves and fields of the structured ones (default 0: the same call
            gives the same images); None uses the global RNG.

    Returns:
        (B, C, H, W) float in [0, 1], on the device of ``images``.
    """
    if name not in _FUNCTIONS:
        raise ValueError(f"unknown corruption {name!r}; available: {CORRUPTIONS}")
    if isinstance(severity, bool) or not isinstance(severity, numbers.Integral) or severity not in SEVERITIES:
        raise ValueError(f"severity must be an integer 1..5, got {severity!r}")
    check_images("images", images)
    x = to_float(images)
    lo, hi = torch.stack(torch.aminmax(x)).tolist()  # the range in one pass and one host round trip
    if lo < 0 or hi > 1:
        raise ValueError(f"images must be float in [0, 1] (or uint8 0..255), got values in [{lo:.4g}, {hi:.4g}]")
    if isinstance(seed, torch.Generator):
        gen = seed
    elif seed is None:
        gen = None
    else:
        gen = torch.Generator().manual_seed(int(seed))
    out = _FUNCTIONS[name](x.detach(), SEVERITY_PARAMS[name][severity - 1], gen)
    return out.clamp(0.0, 1.0)


def corrupt_dataset(
    dataset: ImageDataset, name: str, severity: int, *, seed: int = 0, batch_size: int = 1024
) -> ImageDataset:
    """A corrupted copy of a whole dataset (float32 images). One generator seeded by ``seed`` runs
    through the batches in order, so the result is fixed by ``seed`` and ``batch_size`` together."""
    gen = torch.Generator().manual_seed(int(seed))
    parts = [corrupt(x, name, severity, seed=gen) for x, _ in dataset.batches(batch_size)]
    return ImageDataset(torch.cat(parts), dataset.labels.clone(), dataset.classes, f"{dataset.name}/{name}/{severity}")
