"""Common corruptions: range, determinism, severity ordering, the caller's data, bad input."""
import functools

import numpy as np
import pytest
import torch

from attrefine_fast.corruptions import CORRUPTIONS, SEVERITIES, SEVERITY_PARAMS, corrupt, corrupt_dataset
from attrefine_fast.data import ImageDataset
from robustness_helpers import digits, one_thread  # noqa: F401

NOISES = ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise")
# The published saturate table desaturates at severities 1-2 and oversaturates at 3-5: its
# distortion is not ordered by severity, by design of the benchmark.
NOT_ORDERED = ("saturate",)


@functools.lru_cache(maxsize=None)
def photos() -> torch.Tensor:
    """scikit-image's bundled photos at 32x32: textures and colour that the digits lack."""
    import skimage.data
    from skimage.transform import resize

    imgs = [resize(getattr(skimage.data, n)()[..., :3], (32, 32), anti_aliasing=True)
            for n in ("astronaut", "coffee", "chelsea", "rocket")]
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float().clamp(0, 1)


def images() -> torch.Tensor:
    return torch.cat([photos(), digits("test", 32).images[:12]])


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_range_shape_determinism_and_input_untouched(name):
    x = images()
    before = x.clone()
    for s in SEVERITIES:
        out = corrupt(x, name, s, seed=0)
        assert out.shape == x.shape and out.dtype == x.dtype
        assert float(out.min()) >= 0 and float(out.max()) <= 1
        assert corrupt(x, name, s, seed=0).equal(out), "same seed, same images"
        assert not out.equal(x) or name == "saturate", f"{name} severity {s} changed nothing"
        if name in NOISES:
            assert not corrupt(x, name, s, seed=1).equal(out)
    assert x.equal(before)


@pytest.mark.parametrize("name", [c for c in CORRUPTIONS if c not in NOT_ORDERED])
def test_distortion_grows_with_severity(name):
    x = images()
    for part in (x[:4], x[4:]):  # photos and digits separately: each must be ordered
        distortion = [float((corrupt(part, name, s, seed=0) - part).abs().mean()) for s in SEVERITIES]
        assert all(a < b for a, b in zip(distortion, distortion[1:])), (name, distortion)


def test_corruption_semantics():
    x = photos()
    assert corrupt(x, "contrast", 5).std() < corrupt(x, "contrast", 1).std() < x.std()
    assert corrupt(x, "brightness", 5).mean() > corrupt(x, "brightness", 1).mean() > x.mean()
    flat = torch.full((2, 3, 16, 16), 0.4)
    for blur in ("gaussian_blur", "defocus_blur", "zoom_blur", "pixelate"):
        assert torch.allclose(corrupt(flat, blur, 5), flat, atol=1e-6), f"{blur} must keep a flat image flat"
    # Impulse noise sets a share of the values to exactly 0 or 1, about the table's share.
    grey = torch.full((4, 3, 32, 32), 0.5)
    hit = (corrupt(grey, "impulse_noise", 5) != 0.5).float().mean()
    assert abs(float(hit) - SEVERITY_PARAMS["impulse_noise"][4]) < 0.02
    assert torch.allclose(corrupt(grey, "gaussian_noise", 5).std(), torch.tensor(0.10), rtol=0.05)


def test_uint8_input_grey_images_and_generators():
    x = photos()
    as_uint8 = (x * 255).round().to(torch.uint8)
    assert torch.allclose(corrupt(as_uint8, "contrast", 3), corrupt(as_uint8.float() / 255, "contrast", 3))
    grey = x[:, :1]
    for name in ("jpeg_compression", "brightness", "pixelate", "defocus_blur"):
        out = corrupt(grey, name, 4)
        assert out.shape == grey.shape and float(out.max()) <= 1
    gen = torch.Generator().manual_seed(5)
    first, second = corrupt(x, "shot_noise", 2, seed=gen), corrupt(x, "shot_noise", 2, seed=gen)
    assert not first.equal(second)
    assert corrupt(x, "shot_noise", 2, seed=torch.Generator().manual_seed(5)).equal(first)


def test_corrupt_dataset():
    ds = ImageDataset(images(), torch.arange(16) % 4, name="mix")
    out = corrupt_dataset(ds, "gaussian_noise", 3, seed=2, batch_size=5)
    assert len(out) == 16 and out.labels.equal(ds.labels) and out.name == "mix/gaussian_noise/3"
    assert out.images.equal(corrupt_dataset(ds, "gaussian_noise", 3, seed=2, batch_size=5).images)
    assert float(out.images.min()) >= 0 and float(out.images.max()) <= 1


@pytest.mark.parametrize("args,match", [
    (("fog", 1), "unknown corruption"),
    (("contrast", 0), "severity"),
    (("contrast", 6), "severity"),
    (("contrast", True), "severity"),
])
def test_bad_names_and_severities(args, match):
    with pytest.raises(ValueError, match=match):
        corrupt(photos(), *args)


@pytest.mark.parametrize("x,match", [
    (torch.rand(3, 8, 8), "4 dimensions"),
    (torch.rand(1, 3, 8, 8) + 1, r"\[0, 1\]"),
    (torch.full((1, 3, 8, 8), float("nan")), "NaN"),
    (torch.zeros(1, 3, 8, 8, dtype=torch.int64), "dtype"),
])
def test_bad_images(x, match):
    with pytest.raises((ValueError, TypeError), match=match):
        corrupt(x, "contrast", 1)
