"""Spurious-superpixel detection: per-superpixel relevance, sensitivity and instability, and the
flagged set S(x) = {j : r_j < tau and s_j > eps_s} or {j : v_j > delta}.

Shapes: images (B, C, H, W) in [0, 1]; segments (B, H, W) int labels 0..M_b-1; counts (B,) = M_b;
every score is (B, M) with M = the largest count, and padded columns (j >= M_b) are never flagged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from ..attacks import check_batch, fgsm, frozen, pgd
from ..checks import check_choice, check_int, check_real, check_segment_counts
from ..explain import DEFAULT_BATCH_SIZE, explain
from .config import EXPLAIN_LABELS, INSTABILITIES


@dataclass
class Detection:
    """Scores and flags of a batch: relevance, sensitivity, instability and flags are (B, M)."""

    relevance: torch.Tensor
    sensitivity: torch.Tensor
    instability: torch.Tensor
    flags: torch.Tensor
    segments: torch.Tensor
    counts: torch.Tensor

    def pixel_mask(self) -> torch.Tensor:
        """(B, H, W) float: 1 on the pixels of flagged superpixels."""
        return flags_to_pixels(self.flags, self.segments)


def flags_to_pixels(flags: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """(B, M) bool flags and (B, H, W) segments -> (B, H, W) float 0/1 mask of flagged pixels."""
    b, h, w = segments.shape
    if flags.shape[1] == 0:
        return torch.zeros(b, h, w, device=segments.device)
    picked = torch.gather(flags.to(torch.float32), 1, segments.reshape(b, -1).long())
    return picked.reshape(b, h, w)


def valid_columns(counts: torch.Tensor, m: int) -> torch.Tensor:
    """(B, M) bool: column j is a real superpixel of image b (j < counts[b])."""
    return torch.arange(m, device=counts.device).unsqueeze(0) < counts.unsqueeze(1)


def superpixel_sums(values: torch.Tensor, segments: torch.Tensor, m: int) -> torch.Tensor:
    """(B, H, W) per-pixel values -> (B, M) sums over each superpixel."""
    b = values.shape[0]
    out = torch.zeros(b, m, dtype=values.dtype, device=values.device)
    return out.scatter_add_(1, segments.reshape(b, -1).long(), values.reshape(b, -1))


def normalized_relevance(coef: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """r_j = w_j / sum_k |w_k| over the image's superpixels (0 where every weight is 0)."""
    coef = coef * valid_columns(counts, coef.shape[1])
    total = coef.abs().sum(dim=1, keepdim=True)
    return torch.where(total > 0, coef / total.clamp_min(1e-30), torch.zeros_like(coef))


def input_gradient(model, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) gradient of each sample's cross-entropy with respect to its input, with the
    model frozen (eval mode, no parameter gradients)."""
    with frozen(model), torch.enable_grad():
        x = images.detach().clone().requires_grad_(True)
        loss = F.cross_entropy(model(x).float(), labels, reduction="sum")
        return torch.autograd.grad(loss, x)[0]


def gradient_share(grad: torch.Tensor, segments: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """s_j: the share of the input-gradient mass sum_c |grad| falling in superpixel j (rows sum to 1,
    or 0 for a zero gradient)."""
    m = int(counts.max())
    mass = superpixel_sums(grad.abs().sum(dim=1), segments, m)
    total = mass.sum(dim=1, keepdim=True)
    return torch.where(total > 0, mass / total.clamp_min(1e-30), torch.zeros_like(mass))


def flag_superpixels(
    relevance: torch.Tensor,
    sensitivity: torch.Tensor,
    instability: torch.Tensor,
    counts: torch.Tensor,
    *,
    tau: float,
    eps_s: float,
    delta: float,
    max_flagged_fraction: float = 1.0,
) -> torch.Tensor:
    """(B, M) bool: S = {r < tau and s > eps_s} or {v > delta}, on real superpixels only.

    When more than ``max_flagged_fraction`` of an image's superpixels pass, only the most
    sensitive ones are kept, so that masking never erases the whole image.
    """
    valid = valid_columns(counts, relevance.shape[1])
    flags = (((relevance < tau) & (sensitivity > eps_s)) | (instability > delta)) & valid
    # (M · fraction rounds below a whole number it equals: 100 * 0.29 = 28.999999999999996)
    limit = torch.floor(counts.to(torch.float64) * max_flagged_fraction + 1e-9).long()
    over = flags.sum(dim=1) > limit
    if bool(over.any()):
        score = torch.where(flags, sensitivity, torch.full_like(sensitivity, -1.0))
        rank = torch.argsort(torch.argsort(score, dim=1, descending=True, stable=True), dim=1)
        keep = rank < limit.unsqueeze(1)
        flags = torch.where(over.unsqueeze(1), flags & keep, flags)
    return flags


def detect_spurious(
    model,
    images: torch.Tensor,
    labels: torch.Tensor,
    segments: torch.Tensor,
    counts: torch.Tensor,
    *,
    num_samples: int = 128,
    explain_label: str = "true",
    tau: float = 0.02,
    eps_s: float = 0.08,
    delta: float = 0.15,
    instability: str = "adversarial",
    instability_runs: int = 3,
    eps: float = 0.1,
    attack_steps: int = 0,
    norm: str = "linf",
    max_flagged_fraction: float = 0.5,
    seed: int = 0,
    backend: str = "auto",
) -> Detection:
    """Explain ``images`` with batched LIME and flag their spurious superpixels.

    Args:
        model: classifier on [0, 1] images returning logits; its mode is restored afterwards.
        images: (B, C, H, W) in [0, 1]; labels: (B,) true classes.
        segments, counts: the superpixels (B, H, W) and their numbers (B,).
        explain_label: explain the "true" class or the model's "predicted" one; the sensitivity
            (input gradient of the loss) and the attack of the instability term use that same
            class, so the three measures describe one class.
        instability: "adversarial" (|r(x) - r(x_adv)| with x_adv from FGSM, or PGD when
            ``attack_steps`` > 0, at ``eps``; both LIME runs share their samples), "runs" (the
            standard deviation of r over ``instability_runs`` LIME runs with different samples),
            or "none" (v = 0).
        seed: seeds the LIME samples and the attack.
    """
    labels = check_batch(images, labels)
    b, _, h, w = images.shape
    if tuple(segments.shape) != (b, h, w) or tuple(counts.shape) != (b,):
        raise ValueError(f"segments must be (B, H, W) = {(b, h, w)} and counts (B,), got {tuple(segments.shape)} and {tuple(counts.shape)}")
    check_choice("explain_label", explain_label, EXPLAIN_LABELS)
    check_choice("instability", instability, INSTABILITIES)
    check_int("attack_steps", attack_steps, 0)
    if instability == "runs":
        check_int("instability_runs", instability_runs, 2)
    for name, value in (("tau", tau), ("eps_s", eps_s), ("delta", delta), ("eps", eps)):
        check_real(name, value)
    if not 0.0 <= check_real("max_flagged_fraction", max_flagged_fraction) <= 1.0:
        raise ValueError(f"max_flagged_fraction must be in [0, 1], got {max_flagged_fraction}")
    if segments.dtype.is_floating_point or segments.dtype == torch.bool or segments.is_complex():
        raise TypeError(f"segments must hold integer labels, got {segments.dtype}")
    segments = segments.to(images.device).long()
    check_segment_counts(segments, counts, images)
    counts = counts.to(images.device)
    with torch.no_grad():
        if explain_label == "predicted":
            with frozen(model):
                target = model(images).argmax(dim=1)
        else:
            target = labels
    # The model sees at least the whole chunk of images per forward pass (detect_batch_size of
    # them in a refresh), more where explain's default batch holds several samples of each.
    batch_size = max(DEFAULT_BATCH_SIZE.get(images.device.type, DEFAULT_BATCH_SIZE["cuda"]), images.shape[0])
    common = dict(segments=segments, labels=target.unsqueeze(1), num_samples=num_samples, output="softmax", backend=backend,
                  batch_size=batch_size)
    coef = explain(model, images, seed=seed, **common).coef[:, 0].float()
    relevance = normalized_relevance(coef, counts)
    sensitivity = gradient_share(input_gradient(model, images, target), segments, counts)
    if instability == "adversarial":
        if attack_steps > 0:
            adv = pgd(model, images, target, eps=eps, steps=attack_steps, norm=norm, seed=seed, keep_best=False)
        else:
            adv = fgsm(model, images, target, eps=eps, norm=norm)
        adv_coef = explain(model, adv, seed=seed, **common).coef[:, 0].float()
        unstable = (normalized_relevance(adv_coef, counts) - relevance).abs()
    elif instability == "runs":
        runs = [relevance] + [
            normalized_relevance(explain(model, images, seed=seed + 7919 * (r + 1), **common).coef[:, 0].float(), counts)
            for r in range(instability_runs - 1)
        ]
        unstable = torch.stack(runs).std(dim=0, unbiased=False)
    else:  # "none"
        unstable = torch.zeros_like(relevance)
    flags = flag_superpixels(
        relevance, sensitivity, unstable, counts, tau=tau, eps_s=eps_s, delta=delta, max_flagged_fraction=max_flagged_fraction
    )
    return Detection(relevance, sensitivity, unstable, flags, segments, counts)
