"""The attribution-aware estimate and the empirical smallest flipping epsilon on a linear model,
where the first-order estimate is exact."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from attrefine_fast.refine import attribution_bound, correlation, empirical_min_eps

from refine_helpers import one_thread  # noqa: F401


def _linear_model(seed=0, size=6):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * size * size, 2))
    return model.eval()


def test_estimate_and_alignment_by_hand():
    model = _linear_model()
    x = torch.full((4, 3, 6, 6), 0.5) + 0.01 * torch.randn(4, 3, 6, 6)
    y = torch.tensor([0, 1, 0, 1])
    mask = torch.zeros(4, 6, 6)
    mask[:, :3] = 1
    out = attribution_bound(model, x, y, mask, norm="linf")
    w = model[1].weight.detach()
    logits = model(x).detach()
    for i in range(4):
        other = 1 - int(y[i])
        g = (w[y[i]] - w[other]).view(3, 6, 6)
        margin = logits[i, y[i]] - logits[i, other]
        l_s = (g * mask[i]).abs().sum()
        l_r = (g * (1 - mask[i])).abs().sum()
        torch.testing.assert_close(out["margin"][i], margin)
        torch.testing.assert_close(out["L_S"][i], l_s)
        torch.testing.assert_close(out["L_R"][i], l_r)
        torch.testing.assert_close(out["rho"][i], l_r / (l_r + l_s))
        expected = margin.clamp_min(0) / (l_r + l_s)
        torch.testing.assert_close(out["estimate"][i], expected)
    with pytest.raises(ValueError):
        attribution_bound(model, x, y, mask, norm="l1")


def test_empirical_eps_matches_the_exact_linear_answer():
    # Two classes, linear logits, images far from the box edges: the smallest L-inf flip is
    # exactly margin / ||grad margin||_1, which the bisection must bracket.
    model = _linear_model(1)
    torch.manual_seed(3)
    x = 0.5 + 0.02 * torch.randn(6, 3, 6, 6)
    y = model(x).argmax(1).detach()
    est = attribution_bound(model, x, y, torch.zeros(6, 6, 6))["estimate"].double()
    eps_max = float(est.max()) * 1.5
    if eps_max >= 0.45:
        pytest.skip("the random model's margins are too wide for the [0, 1] box")
    emp, flipped = empirical_min_eps(model, x, y, eps_max=eps_max, iterations=7, steps=20, seed=0)
    assert flipped.all()
    width = eps_max / 2**7
    assert ((emp >= est - 1e-6) & (emp <= est + width + 1e-6)).all(), (emp, est)


def test_estimate_is_zero_for_a_misclassified_sample_even_with_a_zero_gradient():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 2))
    torch.nn.init.zeros_(model[1].weight)
    with torch.no_grad():
        model[1].bias.copy_(torch.tensor([1.0, 0.0]))  # always class 0, gradient exactly zero
    x = torch.rand(2, 3, 4, 4)
    out = attribution_bound(model, x, torch.tensor([0, 1]), torch.zeros(2, 4, 4))
    assert out["estimate"][0] == float("inf") and out["estimate"][1] == 0


def test_misclassified_and_unbreakable_samples():
    model = _linear_model(2)
    x = 0.5 + 0.02 * torch.randn(4, 3, 6, 6)
    pred = model(x).argmax(1).detach()
    y = pred.clone()
    y[0] = 1 - y[0]  # misclassified: 0
    emp, flipped = empirical_min_eps(model, x, y, eps_max=1e-6, iterations=3, steps=3)
    assert emp[0] == 0 and flipped[0]
    assert (emp[1:] == 1e-6).all() and not flipped[1:].any()  # censored at eps_max
    for kwargs, match in (({"steps": 0}, "steps"), ({"eps_max": float("nan")}, "eps_max"), ({"eps_max": 0.0}, "eps_max")):
        with pytest.raises(ValueError, match=match):
            empirical_min_eps(model, x, y, **{"eps_max": 0.1, **kwargs})


def test_correlation():
    a = np.arange(10.0)
    out = correlation(a, a**3)
    assert out["spearman"] == pytest.approx(1.0) and out["n"] == 10
    assert out["pearson"] == pytest.approx(float(np.corrcoef(a, a**3)[0, 1]))
    assert correlation([1.0, 2.0, 3.0], [3.0, 2.0, 1.0])["spearman"] == pytest.approx(-1.0)
    assert math.isnan(correlation([1.0], [2.0])["pearson"])
    with pytest.raises(ValueError):
        correlation([1.0, 2.0], [1.0])
