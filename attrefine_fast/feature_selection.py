"""lime 0.2.0.1's feature selection for one image, all labels at once where the method allows.

Each function takes the binary samples Z (N, M), the targets Y (N, L) and the sample weights w
(N,) as float64 tensors and returns, per label, the indices of the selected features in the
order lime would list them.
"""
from __future__ import annotations

import numpy as np
import torch

from .ops.lime_fit import r2_from_sums


# R² values closer than this are one score to forward selection (see forward_selection).
SCORE_TIE = 1e-12


def _weighted_centered(z: torch.Tensor, y: torch.Tensor, w: torch.Tensor):
    sw = w.sum()
    zc = z - (w @ z) / sw
    yc = y - (w @ y) / sw
    return zc, yc


def highest_weights(z, y, w, num_features: int, prefit) -> list[list[int]]:
    """Rank features by |coefficient| of a Ridge(alpha=0.01) pre-fit; keep the first num_features.

    ``prefit(alpha)`` returns the (L, M) coefficients of the ridge fit with that penalty.
    With num_features >= M every feature is kept, so the pre-fit (which only reorders them)
    is skipped.
    """
    m, l = z.shape[1], y.shape[1]
    if num_features >= m:
        return [list(range(m)) for _ in range(l)]
    coef = prefit(0.01).cpu().numpy()
    # Python's sort is stable with reverse=True too, so ties keep feature order as in lime.
    return [[j for j, _ in sorted(enumerate(row), key=lambda x: abs(x[1]), reverse=True)[:num_features]] for row in coef]


def forward_selection(z, y, w, num_features: int) -> list[list[int]]:
    """Greedy forward selection by the weighted R² of an unpenalized least-squares fit with
    intercept (lime's Ridge(alpha=0)), every candidate of a step scored in one batched solve.

    With the centered weighted Gram matrix G and right-hand side r, the fit on a feature set S
    explains rᵀ_S G_S⁺ r_S of the total weighted sum of squares; the pseudo-inverse gives the
    least-squares answer that scikit-learn falls back to when G_S is singular.
    """
    zc, yc = _weighted_centered(z, y, w)
    gram = zc.T @ (w[:, None] * zc)  # (M, M)
    rhs = zc.T @ (w[:, None] * yc)  # (M, L)
    tss = w @ (yc**2)  # (L,)
    m = z.shape[1]
    constant = y.amax(dim=0) == y.amin(dim=0)  # scikit-learn scores every candidate 1: lime takes them in order
    selected = []
    for label in range(y.shape[1]):
        used: list[int] = []
        for _ in range(0 if constant[label] else min(num_features, m)):
            cand = torch.tensor([j for j in range(m) if j not in used], dtype=torch.long, device=z.device)
            idx = torch.cat([torch.tensor(used, dtype=torch.long, device=z.device).expand(len(cand), len(used)), cand[:, None]], dim=1)
            g = gram[idx[:, :, None], idx[:, None, :]]
            r = rhs[idx, label]
            explained = (r * (torch.linalg.pinv(g, hermitian=True) @ r.unsqueeze(2)).squeeze(2)).sum(dim=1)
            score = r2_from_sums((tss[label] - explained).clamp_min(0), tss[label].expand_as(explained))
            # The first best, as lime's `>`. Scores within SCORE_TIE of the best count as ties: an
            # exact fit scores exactly 1 in scikit-learn for every candidate that reaches it, and
            # its rounding noise here would pick among them.
            best = (score >= score.max() - SCORE_TIE).nonzero()[0, 0]
            used.append(int(cand[best]))
        selected.append(used if not constant[label] else list(range(min(num_features, m))))
    return selected


def lasso_path(z, y, w, num_features: int) -> list[list[int]]:
    """The largest LARS-lasso active set with at most num_features features, per label."""
    from sklearn.linear_model import lars_path

    # In numpy, as lime centres them (np.average): LARS breaks ties between identical columns by
    # differences of an ulp in the target, which another order of summation flips.
    z_np, y_np, w_np = z.cpu().numpy(), y.cpu().numpy(), w.cpu().numpy()
    root = np.sqrt(w_np)
    data = (z_np - np.average(z_np, axis=0, weights=w_np)) * root[:, np.newaxis]
    selected = []
    for label in range(y.shape[1]):
        target = (y_np[:, label] - np.average(y_np[:, label], weights=w_np)) * root
        _, _, coefs = lars_path(data, target, method="lasso", verbose=False)
        used = np.arange(z.shape[1])
        for step in range(coefs.shape[1] - 1, 0, -1):
            used = coefs[:, step].nonzero()[0]
            if len(used) <= num_features:
                break
        selected.append([int(j) for j in used])
    return selected
