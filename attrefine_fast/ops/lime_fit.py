"""lime_fit: LIME's weighted ridge regression for many images and labels in one solve.

For image b and label l, with binary samples z_i (the first M_b columns of masks[b]), targets
y_i = targets[b, i, l] and sample weights w_i, this is scikit-learn's
``Ridge(alpha, fit_intercept=True).fit(Z, y, sample_weight=w)`` as lime 0.2.0.1 calls it:

    x̄ = Σ w z / Σ w,  ȳ = Σ w y / Σ w,  Zc = Z - x̄,  yc = y - ȳ
    β = (Zcᵀ W Zc + α I)⁻¹ Zcᵀ W yc,  b = ȳ - x̄ᵀ β
    score = 1 - Σ w (y - ŷ)² / Σ w (y - ȳ)²      (weighted R², scikit-learn's r2_score)
    local_pred = b + Σ β                          (the prediction at the all-ones sample)

When ``weights`` is not given they are LIME's kernel weights of the cosine distance to the
all-ones sample: d_i = 1 - sqrt(k_i / M_b) (k_i = ones in z_i), w_i = sqrt(exp(-d_i² / kw²)).
"""
from __future__ import annotations

import math

import torch

from .. import backends
from ..checks import check_finite, check_real, check_same_device, check_tensor, require


def lime_kernel_weights(masks: torch.Tensor, num_segments: torch.Tensor, kernel_width: float, dtype: torch.dtype) -> torch.Tensor:
    """LIME's default sample weights: masks (B, N, M) bool, num_segments (B,) -> (B, N)."""
    m = masks.shape[2]
    valid = torch.arange(m, device=masks.device) < num_segments.unsqueeze(1)  # (B, M)
    ones = (masks & valid.unsqueeze(1)).sum(dim=2).to(dtype)  # (B, N)
    d = 1 - torch.sqrt(ones / num_segments.to(dtype).unsqueeze(1))
    return torch.sqrt(torch.exp(-(d**2) / kernel_width**2))


def r2_from_sums(rss: torch.Tensor, tss: torch.Tensor) -> torch.Tensor:
    """scikit-learn's weighted R² with force_finite: 1 for a perfect fit of a constant target,
    0 for an imperfect one."""
    score = 1 - rss / torch.where(tss == 0, torch.ones_like(tss), tss)
    constant = tss == 0
    return torch.where(constant, torch.where(rss == 0, torch.ones_like(score), torch.zeros_like(score)), score)


def exact_constant_fits(targets: torch.Tensor, coef, intercept, score, local_pred):
    """The fits of labels whose targets are the same for every sample of an image (a saturated
    classifier) made exact, as scikit-learn's are: zero coefficients, the constant as intercept
    and local prediction, R² = 1. A weighted mean of a constant is not always that constant in
    floating point, and its rounding error would otherwise come back as noise coefficients
    (about 1e-32) whose order decides which superpixels an explanation shows.

    Args and returns: ``targets`` (B, N, L) and :func:`lime_fit`'s four outputs.
    """
    constant = targets.amax(dim=1) == targets.amin(dim=1)  # (B, L)
    value = targets[:, 0].to(intercept.dtype)
    return (
        coef.masked_fill(constant.unsqueeze(2), 0),
        torch.where(constant, value, intercept),
        score.masked_fill(constant, 1),
        torch.where(constant, value, local_pred),
    )


def lime_fit_ref(
    masks: torch.Tensor,
    targets: torch.Tensor,
    num_segments: torch.Tensor,
    weights: torch.Tensor | None = None,
    kernel_width: float = 0.25,
    alpha: float = 1.0,
):
    """Pure-PyTorch reference.

    Args:
        masks: (B, N, M) bool (or uint8 / float 0-1), the binary samples; columns j >= M_b of
            image b are padding and ignored.
        targets: (B, N, L) float32 / float64, the classifier's output for each sample and label.
        num_segments: (B,) int64, M_b (1 <= M_b <= M).
        weights: optional (B, N) sample weights in targets' dtype; None computes LIME's kernel.
        kernel_width: kw of LIME's exponential kernel (used when weights is None).
        alpha: the ridge penalty (lime: 1.0; 0.01 in its 'highest_weights' pre-fit).

    Returns:
        coef (B, L, M) with zeros in padded columns, intercept (B, L), score (B, L),
        local_pred (B, L); all in targets' dtype.
    """
    dtype = targets.dtype
    b, n, m = masks.shape
    valid = (torch.arange(m, device=masks.device) < num_segments.unsqueeze(1)).to(dtype)  # (B, M)
    z = masks.to(dtype)
    w = lime_kernel_weights(masks.bool(), num_segments, kernel_width, dtype) if weights is None else weights.to(dtype)
    sw = w.sum(dim=1, keepdim=True)  # (B, 1)
    xbar = torch.einsum("bn,bnm->bm", w, z) / sw  # (B, M)
    ybar = torch.einsum("bn,bnl->bl", w, targets) / sw  # (B, L)
    zc = (z - xbar.unsqueeze(1)) * valid.unsqueeze(1)
    yc = targets - ybar.unsqueeze(1)
    wzc = w.unsqueeze(2) * zc
    gram = wzc.transpose(1, 2) @ zc  # (B, M, M)
    # Padded rows get a unit diagonal so they solve to exactly zero whatever alpha is.
    gram = gram + torch.diag_embed(alpha * valid + (1 - valid))
    rhs = wzc.transpose(1, 2) @ yc  # (B, M, L)
    chol, info = torch.linalg.cholesky_ex(gram)
    # Singular (alpha = 0 with a constant column): the minimum-norm least-squares solution.
    # pinv works on every device; lstsq's default CPU driver (gelsy) can misjudge the rank.
    if torch.compiler.is_compiling():  # the same branch, taken in the graph (no host round trip)
        beta = torch.cond((info != 0).any(), _least_squares, _cholesky, (gram, rhs, chol))
    elif bool((info != 0).any()):
        beta = _least_squares(gram, rhs, chol)
    else:
        beta = _cholesky(gram, rhs, chol)
    beta = beta * valid.unsqueeze(2)
    intercept = ybar - torch.einsum("bm,bml->bl", xbar * valid, beta)
    resid = yc - zc @ beta  # (B, N, L): y - ŷ
    # R²'s sums of squares in float64: float32 squares underflow for targets below about 1e-19 (a
    # class of tiny probability) and overflow above 1e19, where R² itself is defined as ever.
    w64 = w.double()
    rss = torch.einsum("bn,bnl->bl", w64, resid.double() ** 2)
    tss = torch.einsum("bn,bnl->bl", w64, yc.double() ** 2)
    score = r2_from_sums(rss, tss).to(dtype)
    local_pred = intercept + beta.sum(dim=1)
    return beta.transpose(1, 2).contiguous(), intercept, score, local_pred


def check_kernel_width(masks, num_segments, kernel_width: float, dtype: torch.dtype) -> None:
    """kw² must be a normal number of the fit's dtype (it divides every squared distance), and
    every image needs a sample whose kernel weight does not underflow to 0 (a fit of samples that
    all weigh 0 is undefined; scikit-learn refuses it)."""
    finfo = torch.finfo(dtype)
    kw2 = kernel_width * kernel_width  # (a float product: inf where ** would raise OverflowError)
    if not finfo.tiny <= kw2 <= finfo.max:
        raise ValueError(
            f"kernel_width must lie in [{finfo.tiny ** 0.5:.3g}, {finfo.max ** 0.5:.3g}] for a {dtype} fit "
            f"(its square divides the distances), got {kernel_width}"
        )
    # The farthest sample (distance 1) keeps a positive weight when exp(-1 / kw²) is a normal
    # number of the dtype; only a narrower kernel needs the pass over the masks.
    if math.exp(-1.0 / kw2) < finfo.tiny:
        weights = lime_kernel_weights(masks != 0, num_segments, kernel_width, dtype)
        require(
            (weights.sum(dim=1) > 0).all(),
            f"kernel_width={kernel_width} gives every sample of an image a kernel weight of 0 (none lies near enough "
            "the all-ones sample); use a larger kernel_width",
        )


# lime_fit_ref's two solves. torch.cond needs its branches' outputs with the same strides,
# size-1 dimensions included (which contiguous() leaves as they are): a fresh row-major copy.
def _cholesky(gram, rhs, chol):
    return torch.cholesky_solve(rhs, chol).clone(memory_format=torch.contiguous_format)


def _least_squares(gram, rhs, chol):
    return (torch.linalg.pinv(gram, hermitian=True) @ rhs).clone(memory_format=torch.contiguous_format)


@torch.no_grad()
def lime_fit(
    masks: torch.Tensor,
    targets: torch.Tensor,
    num_segments: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    *,
    kernel_width: float = 0.25,
    alpha: float = 1.0,
    backend: str = "auto",
):
    """Weighted ridge fits for every image and label at once: see :func:`lime_fit_ref`; a label
    whose targets are constant over an image's samples is fitted exactly (:func:`exact_constant_fits`)."""
    check_tensor("masks", masks, ndim=3, dtypes=(torch.bool, torch.uint8, torch.float32, torch.float64))
    check_tensor("targets", targets, ndim=3, dtypes=(torch.float32, torch.float64))
    b, n, m = masks.shape
    if b < 1 or m < 1 or targets.shape[2] < 1:
        raise ValueError(f"masks (B, N, M) and targets (B, N, L) must be non-empty, got {tuple(masks.shape)} and {tuple(targets.shape)}")
    if targets.shape[:2] != (b, n):
        raise ValueError(f"targets must have shape (B, N, L) = ({b}, {n}, L) to match masks, got {tuple(targets.shape)}")
    if n < 2:
        raise ValueError(f"need at least 2 samples per image, got N={n}")
    if num_segments is None:
        num_segments = torch.full((b,), m, dtype=torch.long, device=masks.device)
    check_tensor("num_segments", num_segments, ndim=1, dtypes=(torch.int32, torch.int64))
    if num_segments.shape[0] != b:
        raise ValueError(f"num_segments must hold B={b} counts in 1..{m}")
    check_same_device(masks=masks, targets=targets, num_segments=num_segments, weights=weights)
    check_finite("targets", targets)
    # traced, a message built from the sizes would fix them in the graph (a recompile per size)
    in_range = "num_segments must hold counts in 1..M" if torch.compiler.is_compiling() else f"num_segments must hold B={b} counts in 1..{m}"
    require(((num_segments >= 1) & (num_segments <= m)).all(), in_range)
    if weights is not None:
        check_tensor("weights", weights, ndim=2, dtypes=(torch.float32, torch.float64))
        if tuple(weights.shape) != (b, n):
            raise ValueError(f"weights must have shape (B, N) = ({b}, {n}), got {tuple(weights.shape)}")
        # checked as the fit reads them: in the targets' dtype (float64 1e-50 is 0 in float32)
        weights = weights.to(targets.dtype)
        check_finite("weights", weights)
        require((weights >= 0).all() & (weights.sum(dim=1) > 0).all(), "weights must be non-negative with a positive sum per image")
    kernel_width = check_real("kernel_width", kernel_width, positive=True)
    alpha = check_real("alpha", alpha, minimum=0.0)
    if weights is None:
        check_kernel_width(masks, num_segments, kernel_width, targets.dtype)
    if masks.dtype != torch.bool:
        require(((masks == 0) | (masks == 1)).all(), "masks must be binary: 0 or 1 (or bool)")
        masks = masks != 0
    impl = backends.resolve("lime_fit", backend, masks.device)
    return exact_constant_fits(targets, *impl(masks, targets, num_segments.long(), weights, kernel_width, alpha))
