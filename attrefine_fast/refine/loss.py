"""The refinement objective's parts: masking flagged superpixels, the input-gradient penalty on
them (double backward), and the per-batch losses of the three training modes.

    L = CE(f(mask(x, S)), y) + alpha * CE(f(x_adv), y) + lam * mean_b ||grad_x l(x_b) * 1_S||^2
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from ..attacks import check_batch, check_mask, masked_pgd
from ..corruptions import depthwise_filter, gaussian_kernel
from ..neighborhood import fudge_images

# sigma=1.5 px erases a stroke of the 32x32 digits while keeping the region's overall brightness.
BLUR_SIGMA = 1.5


def segment_mean_images(images: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W): every pixel replaced by its superpixel's mean colour (LIME's hide colour)."""
    seg = segments.long()
    return fudge_images(images.detach(), seg, int(seg.max()) + 1)


def mask_images(
    images: torch.Tensor,
    pixel_mask: torch.Tensor,
    fill: str = "mean",
    *,
    segments: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    replacement: torch.Tensor | None = None,
) -> torch.Tensor:
    """``images`` with the masked pixels replaced (a new tensor; the input is not modified).

    Args:
        images: (B, C, H, W) in [0, 1].
        pixel_mask: (B, H, W) in [0, 1] (1 = replace).
        fill: "mean" (the superpixel's mean colour; needs ``segments``), "zero", "blur" (a
            Gaussian blur of the image) or "noise" (uniform in [0, 1], from ``generator``).
        replacement: (B, C, H, W) fill images computed beforehand (e.g. the segment means of a
            whole training set, which never change); overrides ``fill``.
    """
    if pixel_mask.shape != (images.shape[0],) + images.shape[2:]:
        raise ValueError(f"pixel_mask must be (B, H, W) = {(images.shape[0],) + tuple(images.shape[2:])}, got {tuple(pixel_mask.shape)}")
    check_batch(images)  # finite, in [0, 1]
    return _replace_pixels(images, check_mask(pixel_mask, images), fill, segments, generator, replacement)


def _replace_pixels(images, pixel_mask, fill, segments, generator, replacement) -> torch.Tensor:
    """:func:`mask_images` without its checks, whose value checks are host round trips: the
    training loop's (B, H, W) masks come from the flag store (0 / 1), and its images are checked
    in the same step by the attack (masked_pgd's check_batch)."""
    if replacement is not None:
        if replacement.shape != images.shape:
            raise ValueError(f"replacement must have the images' shape {tuple(images.shape)}, got {tuple(replacement.shape)}")
    elif fill == "mean":
        if segments is None:
            raise ValueError("fill='mean' needs the segments")
        replacement = segment_mean_images(images, segments)
    elif fill == "zero":
        replacement = torch.zeros_like(images)
    elif fill == "blur":
        replacement = depthwise_filter(images, gaussian_kernel(BLUR_SIGMA, max(1, round(2 * BLUR_SIGMA))), "reflect")
    elif fill == "noise":
        device = images.device if generator is None else generator.device
        replacement = torch.rand(images.shape, generator=generator, device=device).to(images.device, images.dtype)
    else:
        raise ValueError(f"fill must be 'mean', 'zero', 'blur' or 'noise', got {fill!r}")
    m = pixel_mask.unsqueeze(1).to(images.dtype)
    return images * (1 - m) + replacement * m


def masked_gradient_norm(loss: torch.Tensor, x: torch.Tensor, pixel_mask: torch.Tensor) -> torch.Tensor:
    """(B,) ||d loss / d x_b * 1_S||^2, kept differentiable (``create_graph=True``: backward through
    it is a double backward). ``loss`` must be a sum over samples so that each x_b gets its own
    sample's gradient."""
    grad = torch.autograd.grad(loss, x, create_graph=True)[0]
    return (grad * pixel_mask.unsqueeze(1).to(grad.dtype)).pow(2).flatten(1).sum(dim=1)


def input_gradient_penalty(model, images: torch.Tensor, labels: torch.Tensor, pixel_mask: torch.Tensor) -> torch.Tensor:
    """(B,) ||grad_x CE(f(x_b), y_b) * 1_S||^2 per sample, differentiable in the model's parameters.

    The model runs in its current mode; in eval mode (or without batch norm) each sample's
    gradient is exactly its own loss's gradient.
    """
    with torch.enable_grad():  # the input gradient is needed even when called under no_grad
        x = images.detach().requires_grad_(True)
        logits = model(x)
        if logits.dtype in (torch.float16, torch.bfloat16):  # autocast output; float64 stays float64
            logits = logits.float()
        return masked_gradient_norm(F.cross_entropy(logits, labels, reduction="sum"), x, pixel_mask)


def adversarial_examples(model, images, labels, pixel_mask, *, region: str, eps: float, steps: int, step_size: float,
                         norm: str, generator) -> torch.Tensor:
    """PGD examples at the shared attack budget: on the whole image ("full") or confined to the
    flagged pixels ("flagged"). The model is frozen during the attack (see attacks.masked_pgd)."""
    mask = pixel_mask if region == "flagged" else None
    return masked_pgd(model, images, labels, mask, eps=eps, steps=steps, step_size=step_size, norm=norm,
                      seed=generator, keep_best=False)


def batch_loss(mode: str, forward, module, images, labels, pixel_mask, segments, cfg, generator, fill_images=None) -> tuple[torch.Tensor, dict]:
    """The training loss of one batch for ``mode`` ("erm", "pgd_at" or "refine") and its parts.

    ``forward`` is the training model (a DistributedDataParallel wrapper under DDP) and runs
    exactly once per batch, as DDP requires; ``module`` is the bare model the attack runs on.
    ``fill_images``: precomputed replacements for the masked pixels (see :func:`mask_images`).
    Returns the loss and a dict of its parts as detached 0-dim tensors (read on the host once per
    step, by the caller) plus ``logits`` (the images accuracy is read from).
    """
    if mode == "erm":
        logits = forward(images).float()
        loss = F.cross_entropy(logits, labels)
        return loss, {"ce": loss.detach(), "logits": logits.detach()}
    region = "full" if mode == "pgd_at" else cfg.adv_region
    adv = adversarial_examples(module, images, labels, pixel_mask, region=region, eps=cfg.eps, steps=cfg.attack_steps,
                               step_size=cfg.step_size(), norm=cfg.norm, generator=generator)
    if mode == "pgd_at":
        logits = forward(adv).float()
        loss = F.cross_entropy(logits, labels)
        return loss, {"ce_adv": loss.detach(), "logits": logits.detach()}
    # refine: masked and adversarial images in one forward (one batch-norm batch, one DDP forward).
    masked = _replace_pixels(images, pixel_mask, cfg.fill, segments, generator, fill_images)
    b = images.shape[0]
    logits = forward(torch.cat([masked, adv])).float()
    ce_masked = F.cross_entropy(logits[:b], labels)
    ce_adv = F.cross_entropy(logits[b:], labels)
    loss = ce_masked + cfg.alpha * ce_adv
    parts = {"ce_masked": ce_masked.detach(), "ce_adv": ce_adv.detach(), "penalty": loss.new_zeros(()), "logits": logits[:b].detach()}
    rows = (pixel_mask.flatten(1).amax(dim=1) > 0).nonzero().flatten() if cfg.lam > 0 else images.new_zeros(0, dtype=torch.long)
    if len(rows) == 0:
        return loss, parts
    # The double backward costs several plain steps: at most penalty_samples flagged images
    # (a uniform draw) estimate the batch's penalty, rescaled to stay unbiased.
    scale = 1.0
    if len(rows) > cfg.penalty_samples:
        scale = len(rows) / cfg.penalty_samples
        pick = torch.randperm(len(rows), generator=generator, device=generator.device)[: cfg.penalty_samples].to(rows.device)
        rows = rows[pick.sort().values]
    # The penalty runs through the bare module, in training mode: its parameter gradients join
    # the DDP forward's in the same backward, before DDP's all-reduce. Not in eval mode: there
    # batch norm divides by running statistics that lag the weights, and the optimizer shrank the
    # penalty by rescaling convolutions (invisible to batch-normalized training losses), which
    # wrecked the eval-mode model (clean accuracy 19% in a 10-epoch demo run).
    penalty = input_gradient_penalty(module, images[rows], labels[rows], pixel_mask[rows]).sum() * scale / b
    parts["penalty"] = penalty.detach()
    return loss + cfg.lam * penalty, parts
