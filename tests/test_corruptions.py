"""Common corruptions: range, determinism, severity ordering, the caller's data, bad input, and what
each structured corruption (glass/motion blur, snow, fog, elastic) does."""
import functools

import numpy as np
import pytest
import torch

from attrefine_fast.corruptions import CORRUPTIONS, SEVERITIES, SEVERITY_PARAMS, corrupt, corrupt_dataset
from attrefine_fast.corruptions_structured import local_copies
from attrefine_fast.data import ImageDataset
from robustness_helpers import digits, one_thread  # noqa: F401

NOISES = ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise")
STRUCTURED = ("glass_blur", "motion_blur", "snow", "fog", "elastic_transform")
RANDOM = NOISES + STRUCTURED
# Tables whose mean pixel change is not ordered by severity, by design of the benchmark (each has
# its own ordering test below):
# - saturate desaturates at severities 1-2 and oversaturates at 3-5;
# - glass blur's blur sigma goes 0.05, 0.25, 0.4, 0.25, 0.4 while its passes of pixel moves go from
#   1 to 2 at severity 4: a stronger blur after the moves smooths the change they make (3 < 2, 5 < 4);
# - elastic transform's affine jitter shrinks (0.08 to 0.03 of the side) as its smooth
#   displacement grows: at 32x32 the mean pixel change falls with severity while the non-affine
#   warp grows.
NOT_ORDERED = ("saturate", "glass_blur", "elastic_transform")
# Motion blur's severities 3 and 4 differ only in radius 6 -> 8 at sigma 2: the added taps 13-16
# weigh under 1e-9, so the two give the same images.
SAME = {"motion_blur": (3, 4)}
# Snow draws a flake layer per image; severities 2 and 3 differ in expectation by ~7% of the change
# (bigger but sparser flakes), less than the spread over a few layers: compared over 8 draws per image.
DRAWS = {"snow": 8}


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
        if name in RANDOM:
            assert not corrupt(x, name, s, seed=1).equal(out)
    assert x.equal(before)


@pytest.mark.parametrize("name", [c for c in CORRUPTIONS if c not in NOT_ORDERED])
def test_distortion_grows_with_severity(name):
    x = images()
    for part in (x[:4], x[4:]):  # photos and digits separately: each must be ordered
        part = part.repeat(DRAWS.get(name, 1), 1, 1, 1)
        distortion = [float((corrupt(part, name, s, seed=0) - part).abs().mean()) for s in SEVERITIES]
        for s, (a, b) in enumerate(zip(distortion, distortion[1:]), start=1):
            if SAME.get(name) == (s, s + 1):
                assert b == pytest.approx(a, abs=1e-6), (name, distortion)
            else:
                assert a < b, (name, distortion)


def test_corruption_semantics():
    x = photos()
    assert corrupt(x, "contrast", 5).std() < corrupt(x, "contrast", 1).std() < x.std()
    assert corrupt(x, "brightness", 5).mean() > corrupt(x, "brightness", 1).mean() > x.mean()
    flat = torch.full((2, 3, 16, 16), 0.4)
    blurs = ("gaussian_blur", "defocus_blur", "zoom_blur", "pixelate", "glass_blur", "motion_blur", "elastic_transform")
    for blur in blurs:
        assert torch.allclose(corrupt(flat, blur, 5), flat, atol=1e-6), f"{blur} must keep a flat image flat"
    # Impulse noise sets a share of the values to exactly 0 or 1, about the table's share.
    grey = torch.full((4, 3, 32, 32), 0.5)
    hit = (corrupt(grey, "impulse_noise", 5) != 0.5).float().mean()
    assert abs(float(hit) - SEVERITY_PARAMS["impulse_noise"][4]) < 0.02
    assert torch.allclose(corrupt(grey, "gaussian_noise", 5).std(), torch.tensor(0.10), rtol=0.05)


def scipy_clipped_zoom(plane: np.ndarray, zoom: float) -> np.ndarray:
    """The benchmark's clipped zoom of one square (H, W) plane, with scipy: crop the centre
    ceil(H / zoom) pixels, zoom them (order 1), trim the centre H."""
    from scipy.ndimage import zoom as scipy_zoom

    h = plane.shape[0]
    crop = int(np.ceil(h / zoom))
    top = (h - crop) // 2
    out = scipy_zoom(plane[top : top + crop, top : top + crop], zoom, order=1)
    trim = (out.shape[0] - h) // 2
    return out[trim : trim + h, trim : trim + h]


@pytest.mark.parametrize("severity", SEVERITIES)
def test_contrast_and_zoom_blur_follow_the_benchmark_definitions(severity):
    x = photos().double()
    planes = x.numpy()
    # Contrast: each channel towards its own mean, so a colour cast survives.
    c = SEVERITY_PARAMS["contrast"][severity - 1]
    means = planes.mean(axis=(2, 3), keepdims=True)
    want = np.clip((planes - means) * c + means, 0, 1)
    np.testing.assert_allclose(corrupt(x, "contrast", severity).numpy(), want, atol=1e-12)
    red = torch.tensor([0.9, 0.0, 0.1], dtype=torch.float64).view(1, 3, 1, 1).expand(1, 3, 8, 8)
    assert torch.allclose(corrupt(red, "contrast", severity), red, atol=1e-12)
    # Zoom blur: the mean of the image and its clipped zooms by np.arange(1, stop, 0.01).
    zooms = np.arange(1, SEVERITY_PARAMS["zoom_blur"][severity - 1], 0.01)
    total = planes + sum(np.vectorize(scipy_clipped_zoom, signature="(h,w),()->(h,w)")(planes, z) for z in zooms)
    np.testing.assert_allclose(corrupt(x, "zoom_blur", severity).numpy(), np.clip(total / (len(zooms) + 1), 0, 1), atol=1e-12)


def reference_moves(h, w, delta, dy, dx):
    """The reference's loop, one image at a time, as numpy runs it: visit rows h - delta .. delta + 1
    and in each the columns w - delta .. delta + 1, backwards, with its statement
    ``x[h, w], x[h', w'] = x[h', w'], x[h, w]`` on an (H, W, 3) array of pixel ids."""
    out = []
    for b in range(dy.shape[1]):
        x = np.repeat(np.arange(h * w).reshape(h, w, 1), 3, axis=2)
        visit = 0
        for r in range(h - delta, delta, -1):
            for c in range(w - delta, delta, -1):
                r2, c2 = r + int(dy[visit, b]), c + int(dx[visit, b])
                x[r, c], x[r2, c2] = x[r2, c2], x[r, c]
                visit += 1
        out.append(x[..., 0].reshape(-1))
    return torch.from_numpy(np.stack(out)).T


@pytest.mark.parametrize("h,w,delta", [(9, 7, 1), (13, 11, 2), (2, 5, 1), (32, 32, 1)])
def test_glass_blur_moves_match_the_reference_loop(h, w, delta):
    gen = torch.Generator().manual_seed(h)
    visits = max(h - 2 * delta, 0) * max(w - 2 * delta, 0)
    dy, dx = torch.randint(-delta, delta, (2, visits, 3), generator=gen)
    source = torch.arange(h * w)[:, None].repeat(1, 3)
    assert local_copies(source, h, w, delta, dy, dx).equal(reference_moves(h, w, delta, dy, dx))


def test_glass_blur_moves_whole_pixels_locally():
    # Severity 1's sigma 0.05 blurs nothing (kernel radius 0): the output is the moved input.
    b, h, w = 6, 11, 9
    ids = torch.arange(h * w, dtype=torch.float64).view(1, 1, h, w).expand(b, 1, h, w) / (h * w)
    x = torch.cat([ids, 1 - ids, ids / 2], dim=1)  # every pixel unique, channels tied together
    out = corrupt(x, "glass_blur", 1, seed=3)
    assert out[:, 1].equal(1 - out[:, 0]) and out[:, 2].equal(out[:, 0] / 2)  # whole pixels
    assert not out.equal(x)
    # Each visited pixel takes the pixel one up and / or left of it, not yet visited in the
    # backward pass: a copy of an input pixel of its 2x2 corner; row 0 and column 0 are never
    # visited. Copies leave the neighbour as it was: some pixels appear twice, others not at all.
    assert out[..., 0, :].equal(x[..., 0, :]) and out[..., :, 0].equal(x[..., :, 0])
    for r in range(1, h):
        for c in range(1, w):
            corner = x[:, 0, r - 1 : r + 1, c - 1 : c + 1].flatten(1)
            assert (out[:, 0, r, c, None] == corner).any(dim=1).all()
    assert any(out[i, 0].unique().numel() < h * w for i in range(b))
    # Two passes move more than one: the table's severity 4 against its severity 2 (same sigma 0.25).
    photo = photos()
    assert (corrupt(photo, "glass_blur", 4) - photo).abs().mean() > (corrupt(photo, "glass_blur", 2) - photo).abs().mean()


def test_motion_blur_smears_one_way_within_45_degrees():
    x = torch.zeros(16, 1, 33, 33, dtype=torch.float64)
    x[:, :, 16, 24] = 1.0
    for s in SEVERITIES:
        out = corrupt(x, "motion_blur", s, seed=s)
        # Each pixel averages the pixels on a ray at -45..45 degrees from it, so the point spreads
        # to the left only, within 45 degrees of the horizontal, its total kept.
        rows, cols = torch.meshgrid(torch.arange(33), torch.arange(33), indexing="ij")
        inside = (cols <= 24) & ((rows - 16).abs() <= 24 - cols)
        assert float(out[:, :, ~inside].abs().max()) == 0.0
        assert torch.allclose(out.sum(dim=(1, 2, 3)), torch.ones(16, dtype=torch.float64))
    photo = photos()
    assert torch.allclose(corrupt(photo, "motion_blur", 3), corrupt(photo, "motion_blur", 4), atol=1e-6)


def test_snow_whitens_and_treats_one_channel_as_its_grey():
    x = images()
    for s in SEVERITIES:
        assert bool((corrupt(x, "snow", s) >= x).all()), "snow only adds light"
    grey = photos().mean(dim=1, keepdim=True)
    # BT.601 weights sum to 1: the grey of a grey RGB image is that image, and the flakes do not
    # depend on the channel count.
    for s in (1, 5):
        rgb = corrupt(grey.expand(-1, 3, -1, -1), "snow", s, seed=7)
        assert torch.allclose(corrupt(grey, "snow", s, seed=7), rgb[:, :1], atol=1e-6)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        corrupt(torch.rand(2, 2, 8, 8), "snow", 1)


def test_fog_adds_normalized_haze_below_the_peak():
    x = photos()
    for s in SEVERITIES:
        thickness = SEVERITY_PARAMS["fog"][s - 1][0]
        peak = x.amax(dim=(1, 2, 3), keepdim=True)
        out = corrupt(x, "fog", s, seed=2)
        # The same haze on a flat image at each image's peak: the difference is the image's own
        # variation, scaled by peak / (peak + thickness).
        flat = corrupt(peak.expand_as(x).contiguous(), "fog", s, seed=2)
        assert torch.allclose(out - flat, (x - peak) * peak / (peak + thickness), atol=1e-6)
        # The haze spans [0, 1] on a 32x32 map: a flat image v goes to [v^2 / (v + t), v].
        v = 0.6
        hazy = corrupt(torch.full((3, 3, 32, 32), v), "fog", s, seed=2)
        assert float(hazy.max()) == pytest.approx(v, abs=1e-6)
        assert float(hazy.min()) == pytest.approx(v * v / (v + thickness), abs=1e-6)
    # Any size: the fractal is drawn on the next power of two and cropped.
    assert corrupt(torch.rand(2, 1, 7, 13), "fog", 3).shape == (2, 1, 7, 13)


def test_elastic_is_affine_at_severity_1_and_warps_more_with_severity():
    h = w = 32
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    ramp = (0.2 + 0.4 * cols / (w - 1) + 0.3 * rows / (h - 1)).expand(8, 1, h, w)
    curvature = []
    for s in SEVERITIES:
        # Bilinear sampling keeps a linear ramp linear under an affine map; in the centre no read
        # leaves the image, so second differences measure the non-affine warp alone.
        out = corrupt(ramp, "elastic_transform", s, seed=0)[:, 0, 10:22, 10:22]
        assert out.shape == (8, 12, 12)
        d2 = torch.cat([(out[:, 2:] - 2 * out[:, 1:-1] + out[:, :-2]).flatten(),
                        (out[:, :, 2:] - 2 * out[:, :, 1:-1] + out[:, :, :-2]).flatten()])
        curvature.append(float(d2.abs().mean()))
    assert curvature[0] < 1e-12, curvature  # alpha 0: the affine map alone
    assert all(a < b for a, b in zip(curvature, curvature[1:])), curvature
    assert not corrupt(ramp, "elastic_transform", 1, seed=0).equal(ramp)


@pytest.mark.parametrize("shape", [(3, 1, 8, 8), (2, 3, 7, 13), (1, 3, 1, 5), (2, 1, 2, 2)])
def test_structured_corruptions_on_awkward_shapes(shape):
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    for name in STRUCTURED:
        for s in (1, 5):
            out = corrupt(x, name, s, seed=1)
            assert out.shape == x.shape and float(out.min()) >= 0 and float(out.max()) <= 1
    strided = torch.rand(2, 13, 7, 3).permute(0, 3, 2, 1)  # non-contiguous
    for name in STRUCTURED:
        assert corrupt(strided, name, 3).equal(corrupt(strided.contiguous(), name, 3))


def test_uint8_input_grey_images_and_generators():
    x = photos()
    as_uint8 = (x * 255).round().to(torch.uint8)
    assert torch.allclose(corrupt(as_uint8, "contrast", 3), corrupt(as_uint8.float() / 255, "contrast", 3))
    grey = x[:, :1]
    for name in ("jpeg_compression", "brightness", "pixelate", "defocus_blur") + STRUCTURED:
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
    (("frost", 1), "unknown corruption"),  # needs the benchmark's frost photographs: not generated
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
    (torch.linspace(-1e-3, 1, 192).reshape(1, 3, 8, 8), r"\[0, 1\]"),
    (torch.full((1, 3, 8, 8), float("nan")), "NaN"),
    (torch.zeros(1, 3, 8, 8, dtype=torch.int64), "dtype"),
])
def test_bad_images(x, match):
    with pytest.raises((ValueError, TypeError), match=match):
        corrupt(x, "contrast", 1)
