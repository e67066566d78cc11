"""The pure-PyTorch references against brute-force loops (property tests with awkward shapes)."""
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.linear_model import Ridge

from attrefine_fast import ops
from attrefine_fast.ops import (
    lime_fit_ref,
    lime_kernel_weights,
    masked_pgd_step_ref,
    perturb_into_ref,
    perturb_ref,
    segment_mean_ref,
)
from conftest import skip_unless_on_cpu

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def segmented_batch(draw, dtype=torch.float64):
    b = draw(st.integers(1, 3))
    c = draw(st.sampled_from([1, 3, 4]))
    h = draw(st.sampled_from([1, 5, 7, 12]))
    w = draw(st.sampled_from([1, 3, 11]))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    counts = [draw(st.integers(1, max(1, min(h * w, 9)))) for _ in range(b)]
    segments = torch.zeros(b, h, w, dtype=torch.long)
    for i, m in enumerate(counts):
        # every label 0..m-1 present, the rest random
        flat = torch.cat([torch.arange(m), torch.randint(0, m, (h * w - m,), generator=gen)])
        segments[i] = flat[torch.randperm(h * w, generator=gen)].view(h, w)
    if dtype == torch.uint8:
        images = torch.randint(0, 256, (b, c, h, w), generator=gen, dtype=torch.uint8)
    else:
        images = torch.rand(b, c, h, w, generator=gen, dtype=torch.float64).to(dtype)
    return images, segments, torch.tensor(counts), gen


@SETTINGS
@given(segmented_batch(), st.booleans())
def test_segment_mean_matches_loop(batch, as_uint8):
    images, segments, counts, _ = batch
    if as_uint8:
        images = (images * 255).to(torch.uint8)
    m = int(counts.max())
    out = segment_mean_ref(images, segments, m)
    b, c = images.shape[:2]
    assert out.shape == (b, m, c)
    for i in range(b):
        for s in range(m):
            sel = segments[i] == s
            for ch in range(c):
                expected = images[i, ch][sel].double().mean().item() if sel.any() else 0.0
                assert out[i, s, ch].item() == pytest.approx(expected, abs=1e-12)


@SETTINGS
@given(segmented_batch(), st.integers(2, 9), st.data())
def test_perturb_matches_loop(batch, n, data):
    images, segments, counts, gen = batch
    b, c, h, w = images.shape
    m = int(counts.max())
    masks = torch.rand(b, n, m, generator=gen) > 0.5
    fudge = torch.rand(b, c, h, w, generator=gen, dtype=images.dtype)
    offset = data.draw(st.integers(0, n - 1))
    count = data.draw(st.integers(1, n - offset))
    norm = data.draw(st.booleans())
    mean, std = (torch.rand(c, dtype=torch.float64), torch.rand(c, dtype=torch.float64) + 0.5) if norm else (None, None)
    out = perturb_ref(images, segments, masks, fudge, offset, count, mean, std, None, data.draw(st.booleans()))
    assert out.shape == (b * count, c, h, w)
    for i in range(b):
        for k in range(count):
            for y in range(h):
                for x in range(w):
                    src = images if masks[i, offset + k, segments[i, y, x]] else fudge
                    px = src[i, :, y, x]
                    if norm:
                        px = (px - mean) / std
                    torch.testing.assert_close(out[i * count + k, :, y, x], px, rtol=1e-12, atol=1e-12)


def test_perturb_non_contiguous_and_dtype_options():
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(2, 7, 13, 3, generator=gen).permute(0, 3, 1, 2)  # non-contiguous (2, 3, 7, 13)
    segments = torch.randint(0, 5, (2, 13, 7), generator=gen).transpose(1, 2)
    segments[:, 0, :5] = torch.arange(5)
    masks = torch.rand(2, 4, 5, generator=gen) > 0.3
    fudge = torch.zeros_like(images)
    out = perturb_ref(images, segments, masks, fudge, 1, 3, None, None, torch.bfloat16, True)
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
    full = perturb_ref(images.contiguous(), segments.contiguous(), masks, fudge, 1, 3, None, None, None, False)
    torch.testing.assert_close(out.float(), full.to(torch.bfloat16).float())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.uint8])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("out_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_perturb_into_ref_writes_exactly_perturb_refs_chunk(dtype, normalize, out_dtype, channels_last):
    # perturb_into_ref normalizes and casts the two sources before the select, perturb_ref after
    # it: per-pixel operations commute with the choice, so the results are identical.
    gen = torch.Generator().manual_seed(1)
    images, fudge = ((torch.rand(2, 3, 7, 13, generator=gen) * 255).to(dtype) for _ in range(2))
    segments = torch.randint(0, 5, (2, 7, 13), generator=gen)
    masks = torch.rand(2, 9, 5, generator=gen) > 0.5
    mean, std = (torch.tensor([0.4, 0.5, 0.6], dtype=torch.float64), torch.tensor([0.2, 0.3, 0.25])) if normalize else (None, None)
    expected = perturb_ref(images, segments, masks, fudge, 2, 6, mean, std, out_dtype, channels_last)
    buffer = torch.full((2 * 8, 3, 7, 13), 7, dtype=expected.dtype)
    buffer = buffer.contiguous(memory_format=torch.channels_last) if channels_last else buffer
    perturb_into_ref(images, segments, masks, fudge, 2, mean, std, buffer[:12])
    assert torch.equal(buffer[:12], expected)
    assert torch.all(buffer[12:] == 7)


def sklearn_fit(z, y, w, alpha):
    model = Ridge(alpha=alpha, fit_intercept=True).fit(z, y, sample_weight=w)
    return model.coef_, model.intercept_, model.score(z, y, sample_weight=w), model.predict(np.ones((1, z.shape[1])))[0]


@SETTINGS
@given(st.integers(1, 3), st.sampled_from([2, 3, 17, 64]), st.integers(1, 11), st.integers(1, 4), st.sampled_from([1.0, 0.01, 3.0]),
       st.booleans(), st.integers(0, 2**16))
def test_lime_fit_matches_sklearn_ridge(b, n, m, l, alpha, given_weights, seed):
    gen = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, m + 1, (b,), generator=gen)
    counts[0] = m
    masks = torch.rand(b, n, m, generator=gen) > 0.5
    masks[:, 0] = True
    targets = torch.rand(b, n, l, generator=gen, dtype=torch.float64)
    weights = torch.rand(b, n, generator=gen, dtype=torch.float64) + 0.1 if given_weights else None
    coef, intercept, score, local_pred = lime_fit_ref(masks, targets, counts, weights, 0.25, alpha)
    kernel = lime_kernel_weights(masks, counts, 0.25, torch.float64)
    for i in range(b):
        mb = int(counts[i])
        assert torch.all(coef[i, :, mb:] == 0)
        z = masks[i, :, :mb].double().numpy()
        w = (weights[i] if given_weights else kernel[i]).numpy()
        if not given_weights:  # lime's weights: cosine distance to the all-ones sample
            from sklearn.metrics import pairwise_distances

            d = pairwise_distances(z, np.ones((1, mb)), metric="cosine").ravel()
            np.testing.assert_allclose(w, np.sqrt(np.exp(-(d**2) / 0.25**2)), atol=1e-12)
        for j in range(l):
            c, icpt, sc, lp = sklearn_fit(z, targets[i, :, j].numpy(), w, alpha)
            np.testing.assert_allclose(coef[i, j, :mb].numpy(), c, atol=1e-9)
            assert intercept[i, j].item() == pytest.approx(icpt, abs=1e-9)
            assert score[i, j].item() == pytest.approx(sc, abs=1e-9)
            assert local_pred[i, j].item() == pytest.approx(lp, abs=1e-9)


def test_lime_fit_constant_target_follows_sklearn_r2_convention():
    masks = torch.tensor([[[1, 1], [0, 1], [1, 0], [0, 0]]], dtype=torch.bool)
    targets = torch.full((1, 4, 1), 0.5, dtype=torch.float64)
    coef, intercept, score, local_pred = lime_fit_ref(masks, targets, torch.tensor([2]), None, 0.25, 1.0)
    assert score.item() == 1.0 and torch.all(coef == 0) and intercept.item() == pytest.approx(0.5)


def test_lime_fit_float32_close_to_float64():
    gen = torch.Generator().manual_seed(1)
    masks = torch.rand(3, 1000, 40, generator=gen) > 0.5
    targets = torch.rand(3, 1000, 5, generator=gen, dtype=torch.float64)
    counts = torch.tensor([40, 13, 1])
    ref = lime_fit_ref(masks, targets, counts, None, 0.25, 1.0)
    low = lime_fit_ref(masks, targets.float(), counts, None, 0.25, 1.0)
    for a, b in zip(low, ref):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, atol=2e-4, rtol=1e-3)


@SETTINGS
@given(st.sampled_from(["linf", "l2"]), st.booleans(), st.integers(1, 3), st.integers(0, 2**16))
def test_masked_pgd_step_matches_formula(norm, with_weight, b, seed):
    gen = torch.Generator().manual_seed(seed)
    shape = (b, 3, 5, 7)
    x = torch.rand(shape, generator=gen, dtype=torch.float64)
    x_adv = (x + 0.05 * torch.randn(shape, generator=gen, dtype=torch.float64)).clamp(0, 1)
    grad = torch.randn(shape, generator=gen, dtype=torch.float64)
    weight = torch.rand(b, 5, 7, generator=gen, dtype=torch.float64) if with_weight else None
    eps, step = (0.03, 0.01) if norm == "linf" else (0.5, 0.2)
    out = masked_pgd_step_ref(x_adv.clone(), x, grad, weight, step, eps, 0.0, 1.0, norm)
    for i in range(b):
        wgt = torch.ones(5, 7, dtype=torch.float64) if weight is None else weight[i]
        if norm == "linf":
            moved = x_adv[i] + step * wgt * grad[i].sign()
            delta = torch.minimum(torch.maximum(moved - x[i], torch.tensor(-eps)), torch.tensor(eps))
        else:
            g = grad[i] * wgt
            moved = x_adv[i] + step * g / (g.norm() + 1e-10)
            delta = moved - x[i]
            delta = delta * min(1.0, eps / delta.norm().item())
        torch.testing.assert_close(out[i], (x[i] + delta).clamp(0, 1))
        if norm == "linf":
            assert (out[i] - x[i]).abs().max() <= eps + 1e-12
        else:
            assert (out[i] - x[i]).norm() <= eps + 1e-9


def test_masked_pgd_step_zero_weight_keeps_pixels():
    x = torch.rand(2, 3, 4, 4)
    x_adv = x.clone()
    weight = torch.zeros(2, 4, 4)
    weight[:, :2] = 1
    out = masked_pgd_step_ref(x_adv, x, torch.randn_like(x), weight, 0.1, 0.2, 0.0, 1.0, "linf")
    assert torch.equal(out[:, :, 2:], x[:, :, 2:])
    assert not torch.equal(out[:, :, :2], x[:, :, :2])


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_lime_fit_fits_constant_targets_exactly(backend):
    """A label whose outputs never change (a saturated classifier) gets zero coefficients, its
    value as intercept and local prediction, and R² = 1, as scikit-learn gives; the other labels
    are untouched."""
    skip_unless_on_cpu("lime_fit", backend)
    gen = torch.Generator().manual_seed(0)
    masks = torch.rand(2, 50, 7, generator=gen) > 0.5
    targets = torch.rand(2, 50, 3, generator=gen, dtype=torch.float64)
    targets[0, :, 1] = 0.7
    coef, intercept, score, local_pred = ops.lime_fit(masks, targets, backend=backend)
    assert torch.equal(coef[0, 1], torch.zeros(7, dtype=torch.float64))
    assert intercept[0, 1] == local_pred[0, 1] == 0.7 and score[0, 1] == 1.0
    ref = ops.lime_fit_ref(masks, targets, torch.tensor([7, 7]))
    others = torch.ones(2, 3, dtype=torch.bool)
    others[0, 1] = False
    torch.testing.assert_close(score[others], ref[2][others])
    torch.testing.assert_close(coef[others], ref[0][others])
