"""Shared fixtures for the lime parity tests: real photos, deterministic float64 classifiers."""
from __future__ import annotations

import functools

import numpy as np
import torch


@functools.lru_cache(maxsize=None)
def photo(name: str, size: int) -> np.ndarray:
    """scikit-image's bundled photo resized to (size, size, 3) uint8 (read-only)."""
    import skimage.data
    from skimage.transform import resize

    img = getattr(skimage.data, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=2)
    out = (resize(img[..., :3], (size, size), anti_aliasing=True) * 255).astype(np.uint8)
    out.setflags(write=False)
    return out


class PooledLinear(torch.nn.Module):
    """A deterministic float64 classifier: 4x4 average-pooled pixels -> linear -> softmax.
    Takes (n, 3, H, W) tensors with values in 0..255."""

    def __init__(self, num_classes: int = 8, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.weight = torch.nn.Parameter(torch.randn(48, num_classes, generator=gen, dtype=torch.float64) * 4)

    def forward(self, x):
        pooled = torch.nn.functional.adaptive_avg_pool2d(x.double() / 255.0, 4).flatten(1)
        return torch.softmax(pooled @ self.weight, dim=1)


def numpy_classifier(module: PooledLinear):
    """lime's kind of classifier_fn: (n, H, W, 3) array -> (n, classes) float64 array."""

    def fn(batch):
        with torch.no_grad():
            return module(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float64)).permute(0, 3, 1, 2)).numpy()

    return fn


def lime_samples(seed: int, num_samples: int, num_segments: int) -> np.ndarray:
    """The samples lime 0.2.0.1 draws with random_state=seed and random_seed=None."""
    rs = np.random.RandomState(seed)
    rs.randint(0, high=1000)  # lime's random_seed draw comes first
    data = rs.randint(0, 2, num_samples * num_segments).reshape(num_samples, num_segments)
    data[0] = 1
    return data


def assert_same_explanation(ours, ref, atol: float = 1e-6) -> None:
    """Same labels, coefficients, intercepts, score and local_pred; local_exp in lime's order
    wherever the |weights| are not within atol of each other."""
    assert getattr(ours, "top_labels", None) == getattr(ref, "top_labels", None)
    assert set(ours.local_exp) == set(ref.local_exp)
    for label, ref_exp in ref.local_exp.items():
        exp = ours.local_exp[label]
        assert dict(exp).keys() == dict(ref_exp).keys(), f"label {label}: selected features differ"
        np.testing.assert_allclose([w for _, w in exp], [dict(ref_exp)[f] for f, _ in exp], atol=atol, rtol=0)
        for (fa, wa), (fb, wb) in zip(exp, ref_exp):
            assert fa == fb or abs(abs(wa) - abs(wb)) <= 2 * atol, f"label {label}: order differs at {fa} vs {fb}"
        assert abs(ours.intercept[label] - ref.intercept[label]) <= atol
    assert abs(ours.score - ref.score) <= atol
    np.testing.assert_allclose(ours.local_pred, ref.local_pred, atol=atol, rtol=0)
