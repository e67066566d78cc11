"""The input-gradient penalty (double backward) against finite differences, and its effect in training."""
import torch
from torch.func import functional_call

from attrefine_fast.models import SmallCNN
from attrefine_fast.refine import RefineConfig, Refiner, input_gradient_penalty

from refine_helpers import SmoothNet, digits_subset, one_thread  # noqa: F401


def _penalty_of_params(model, x, y, mask):
    names = [n for n, _ in model.named_parameters()]

    def penalty(*params):
        wrapped = lambda inp: functional_call(model, dict(zip(names, params)), (inp,))  # noqa: E731
        return input_gradient_penalty(wrapped, x, y, mask)

    return penalty, tuple(p.detach().clone().requires_grad_(True) for p in model.parameters())


def test_penalty_gradient_matches_finite_differences_float64():
    torch.manual_seed(0)
    model = SmoothNet(size=5).double()
    x = torch.rand(2, 3, 5, 5, dtype=torch.float64)
    y = torch.tensor([0, 3])
    mask = (torch.rand(2, 5, 5) < 0.4).double()
    penalty, params = _penalty_of_params(model, x, y, mask)
    assert torch.autograd.gradcheck(penalty, params, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


def test_penalty_directional_derivative_smallcnn_float64():
    # The real model (conv, batch norm in eval mode, ReLU, max-pool): piecewise smooth, so compare a
    # directional derivative with a central difference whose step keeps every ReLU on its side.
    torch.manual_seed(1)
    model = SmallCNN(5, width=4).double().eval()
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    y = torch.tensor([1, 4])
    mask = (torch.rand(2, 8, 8) < 0.5).double()
    penalty, params = _penalty_of_params(model, x, y, mask)
    value = penalty(*params).sum()
    grads = torch.autograd.grad(value, params)
    direction = [torch.randn_like(p) for p in params]
    analytic = sum((g * d).sum() for g, d in zip(grads, direction))
    h = 1e-6
    with torch.no_grad():
        plus = penalty(*[p + h * d for p, d in zip(params, direction)]).sum()
        minus = penalty(*[p - h * d for p, d in zip(params, direction)]).sum()
    numeric = (plus - minus) / (2 * h)
    torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-9)


def test_penalty_is_zero_without_flags_and_respects_mask():
    torch.manual_seed(2)
    model = SmoothNet(size=6)
    x, y = torch.rand(2, 3, 6, 6), torch.tensor([0, 1])
    assert torch.equal(input_gradient_penalty(model, x, y, torch.zeros(2, 6, 6)), torch.zeros(2))
    full = input_gradient_penalty(model, x, y, torch.ones(2, 6, 6))
    xg = x.clone().requires_grad_(True)
    g = torch.autograd.grad(torch.nn.functional.cross_entropy(model(xg), y, reduction="sum"), xg)[0]
    torch.testing.assert_close(full, g.pow(2).flatten(1).sum(1))


def test_refinement_lowers_input_gradient_mass_on_flagged_regions(tmp_path):
    import json

    train = digits_subset(256)
    common = dict(batch_size=32, lime_samples=16, detect_batch_size=64, progress=False, width=8)
    erm = Refiner(RefineConfig(mode="erm", cycles=1, epochs_per_cycle=6, out=str(tmp_path / "erm"), **common), train=train)
    model = erm.fit()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = dict(mode="refine", cycles=1, epochs_per_cycle=2, explain_from_cycle=0, refresh_fraction=0.5, alpha=0.0,
               attack_steps=0, penalty_samples=32, lr=0.02, **common)
    records = {}
    for lam in (0.0, 30.0):
        model.load_state_dict(state)
        Refiner(RefineConfig(lam=lam, out=str(tmp_path / f"lam{lam}"), **cfg), train=train, model=model).fit()
        records[lam] = [json.loads(line) for line in open(tmp_path / f"lam{lam}" / "metrics.jsonl")]
    refresh = next(r for r in records[30.0] if r["event"] == "refresh")
    assert refresh["flagged_fraction"] > 0
    end = {lam: [r for r in recs if r["event"] == "epoch"][-1]["flagged_grad_mass_end"] for lam, recs in records.items()}
    # the same images, flags and start: the penalty alone makes the difference
    assert end[30.0] < refresh["flagged_grad_mass_start"]
    assert end[30.0] < end[0.0]
