"""The attribution-aware robustness estimate, beside the empirical smallest flipping epsilon.

To first order, g(x + d) ~ g(x) + <grad g, d> for the margin g = f_y - max_{k != y} f_k, so no
perturbation with ||d|| < g / ||grad g||_* flips the prediction (||.||_* the dual norm: L1 for
L-inf attacks, L2 for L2). Splitting the gradient over the relevant pixels R and the flagged
(spurious) pixels S gives L_R = ||grad g * 1_R||_*, L_S = ||grad g * 1_S||_* and

    estimate = g / (L_R + L_S),    alignment rho = L_R / (L_R + L_S).

For L-inf, L_R + L_S = ||grad g||_1 exactly; for L2 it is an upper bound of ||grad g||_2, which
makes the estimate smaller. It is a local, first-order estimate, not a certificate: the model is
not linear, and the true smallest epsilon can be smaller.
"""
from __future__ import annotations

import numpy as np
from scipy.stats import rankdata
import torch

from ..attacks import check_batch, check_label_range, check_mask, frozen, pgd, predict
from ..checks import check_int, check_real


def margin_and_gradient(model, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) margins f_y - max_{k != y} f_k on the logits and their (B, C, H, W) input gradients."""
    with frozen(model), torch.enable_grad():
        x = images.detach().clone().requires_grad_(True)
        logits = model(x).float()
        check_label_range(labels, logits.shape[1])
        true = logits.gather(1, labels.view(-1, 1)).squeeze(1)
        others = logits.scatter(1, labels.view(-1, 1), float("-inf")).amax(dim=1)
        margin = true - others
        grad = torch.autograd.grad(margin.sum(), x)[0]
    return margin.detach(), grad


def attribution_bound(model, images: torch.Tensor, labels: torch.Tensor, pixel_mask: torch.Tensor, *, norm: str = "linf") -> dict:
    """Per-sample margin, L_R, L_S, the estimate g / (L_R + L_S) (0 for a misclassified sample)
    and the alignment rho, as (B,) tensors.

    Args:
        pixel_mask: (B, H, W) 0/1, the flagged (spurious) pixels S; the rest is R.
        norm: the attack's norm, "linf" (dual L1) or "l2" (dual L2).
    """
    if norm not in ("linf", "l2"):
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    labels = check_batch(images, labels)
    if tuple(pixel_mask.shape) != (images.shape[0],) + tuple(images.shape[2:]):
        raise ValueError(f"pixel_mask must be (B, H, W) = {(images.shape[0],) + tuple(images.shape[2:])}, got {tuple(pixel_mask.shape)}")
    pixel_mask = check_mask(pixel_mask, images)  # values in [0, 1], finite (a NaN made the estimate inf)
    margin, grad = margin_and_gradient(model, images, labels)
    s = pixel_mask.unsqueeze(1).to(grad.device, grad.dtype)
    p = 1 if norm == "linf" else 2
    l_s = (grad * s).flatten(1).norm(p=p, dim=1)
    l_r = (grad * (1 - s)).flatten(1).norm(p=p, dim=1)
    total = l_r + l_s
    estimate = torch.where(margin <= 0, torch.zeros_like(margin),
                           torch.where(total > 0, margin / total.clamp_min(1e-30), torch.full_like(margin, float("inf"))))
    rho = torch.where(total > 0, l_r / total.clamp_min(1e-30), torch.ones_like(total))
    return {"margin": margin, "L_R": l_r, "L_S": l_s, "estimate": estimate, "rho": rho}


def empirical_min_eps(model, images: torch.Tensor, labels: torch.Tensor, *, eps_max: float, iterations: int = 6,
                      steps: int = 10, norm: str = "linf", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample, the smallest epsilon at which PGD flips the prediction, found by bisection.

    Returns (eps, flipped): eps (B,) float64 is 0 for a sample misclassified already, the upper end of
    its final bracket (width eps_max / 2**iterations) when PGD flips it within ``eps_max``, and
    ``eps_max`` with flipped False when PGD cannot flip it there (a censored value). PGD: ``steps``
    steps of 2.5 * eps / steps from a random start, the worst iterate kept. Each bisection round
    groups the samples by their (dyadic) midpoint, one PGD call per distinct midpoint.
    """
    check_real("eps_max", eps_max, positive=True)
    check_int("iterations", iterations, 0)
    check_int("steps", steps, 1)
    labels = check_batch(images, labels)
    with frozen(model), torch.no_grad():
        check_label_range(labels, model(images[:1]).shape[1])  # (a label beyond them read as misclassified)
    b = images.shape[0]
    result = torch.zeros(b, dtype=torch.float64)
    flipped = torch.ones(b, dtype=torch.bool)
    correct = (predict(model, images) == labels).cpu()

    def broken(rows: torch.Tensor, eps: float, salt: int) -> torch.Tensor:
        x, y = images[rows], labels[rows]
        adv = pgd(model, x, y, eps=eps, steps=steps, step_size=2.5 * eps / steps, norm=norm, seed=seed + salt)
        return (predict(model, adv) != y).cpu()

    todo = correct.nonzero().flatten()
    if len(todo):
        at_max = broken(todo, eps_max, 0)
        result[todo[~at_max]] = eps_max
        flipped[todo[~at_max]] = False
        todo = todo[at_max]
    lo = torch.zeros(b, dtype=torch.float64)
    hi = torch.full((b,), float(eps_max), dtype=torch.float64)
    for it in range(iterations):
        if len(todo) == 0:
            break
        mid = (lo[todo] + hi[todo]) / 2
        for k, value in enumerate(torch.unique(mid).tolist()):
            rows = todo[mid == value]
            ok = broken(rows, value, 1 + 1000 * it + k)
            hi[rows[ok]] = value
            lo[rows[~ok]] = value
    result[todo] = hi[todo]
    return result, flipped


def correlation(a, b) -> dict:
    """Pearson and Spearman correlation of two equally long sequences (NaN when undefined)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"correlation() needs two 1-D sequences of equal length, got {a.shape} and {b.shape}")
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]

    def pearson(u, v):
        if len(u) < 2 or u.std() == 0 or v.std() == 0:
            return float("nan")
        return float(np.corrcoef(u, v)[0, 1])

    return {"pearson": pearson(a, b), "spearman": pearson(rankdata(a), rankdata(b)), "n": int(len(a))}
