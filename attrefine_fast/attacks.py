"""White-box attacks in [0, 1] pixel space: FGSM, PGD (L-inf and L2) and masked PGD.

    adv = pgd(model, images, labels, eps=8/255, steps=10, seed=0)
    adv = masked_pgd(model, images, labels, mask, eps=8/255)     # mask: (B, H, W) in [0, 1]
    attack = PGD(model, eps=8/255, steps=10, seed=0); adv = attack(images, labels)

Conventions, shared by every attack here:
- ``images`` are (B, C, H, W) floats in [0, 1]; normalization belongs to the model (wrap it in
  :class:`~attrefine_fast.models.NormalizedModel`, or put a :class:`Normalize` first).
- The caller's tensors are never modified; a new tensor is returned.
- The model runs in eval mode with its parameters' ``requires_grad`` off, so batch-norm statistics
  are never updated and no parameter gradient is computed; each module's mode and each
  parameter's ``requires_grad`` are restored afterwards, even when the attack raises.
- Every update step is the implementation :func:`attrefine_fast.ops.masked_pgd_step` runs, so the
  compiled kernels run where available (``backend="auto"``); the arguments are validated once per
  attack, the gradient (refused if not finite) at every step. PGD is masked PGD with no mask.
- ``seed``: an int (a private generator: the same call gives the same result, the global RNG is
  untouched), a ``torch.Generator`` (advanced by the call), or None (the global RNG).
- ``targeted=True`` reads ``labels`` as the target classes and minimizes their loss.
- ``amp``: run the model's forward under autocast (True: bfloat16, or pass a dtype). Sign and
  normalized-gradient steps do not depend on the gradient's scale, per sample: under float16,
  whose gradients underflow (a confident sample's logit gradient, about e^-margin, is 0 there),
  each sample's loss is scaled so that its logit gradient has unit norm before the backward.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import nn
from torch.nn import functional as F

from .checks import FLOAT_DTYPES, check_choice, check_int, check_tensor
from .model_state import frozen
from .models import Normalize, NormalizedModel
from .ops.masked_pgd_step import NORMS, division_guard, resolve_step

__all__ = [
    "Attack", "FGSM", "PGD", "PGDL2", "Normalize", "NormalizedModel",
    "fgsm", "frozen", "masked_pgd", "pgd", "predict",
]


def check_batch(images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor | None:
    """images: (B, C, H, W) float in [0, 1], finite; labels: (B,) integer >= 0. Returns labels as int64
    on the images' device."""
    check_tensor("images", images, ndim=4, dtypes=FLOAT_DTYPES)
    if images.numel() == 0:
        raise ValueError(f"images is empty: shape {tuple(images.shape)}")
    if labels is not None:
        check_tensor("labels", labels, ndim=1)
        if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
            raise TypeError(f"labels must have an integer dtype, got {labels.dtype}")
        if labels.shape[0] != images.shape[0]:
            raise ValueError(f"labels must have one entry per image: {images.shape[0]} images, {labels.shape[0]} labels")
        labels = labels.to(images.device, torch.long)
        if labels.is_inference():  # (made under torch.inference_mode: autograd cannot save it)
            labels = labels.clone()
    # Every value check from one pass over the images and one host round trip: the extremes are
    # NaN or infinite where an element is (min and max propagate NaN).
    extremes = list(torch.aminmax(images))
    if labels is not None:
        extremes.append(labels.min())
    lo, hi, *lowest_label = torch.stack([v.to(torch.float64) for v in extremes]).tolist()
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("images contains NaN or infinite values")
    if lo < 0 or hi > 1:
        raise ValueError(
            f"images must lie in [0, 1] (pixel space; normalization belongs to the model), got values in [{lo:.4g}, {hi:.4g}]"
        )
    if lowest_label and lowest_label[0] < 0:
        raise ValueError("labels must be >= 0")
    return labels


def check_mask(mask, images: torch.Tensor) -> torch.Tensor | None:
    """(H, W), (B, H, W) or (B, 1, H, W), bool or float in [0, 1] -> (B, H, W) in images' dtype."""
    if mask is None:
        return None
    check_tensor("mask", mask, dtypes=FLOAT_DTYPES + (torch.bool,))
    b, _, h, w = images.shape
    m = mask
    if m.dim() == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if m.dim() == 2:
        m = m.unsqueeze(0)
    if m.dim() != 3 or tuple(m.shape[1:]) != (h, w) or m.shape[0] not in (1, b):
        raise ValueError(f"mask must have shape (H, W), (B, H, W) or (B, 1, H, W) with (B, H, W) = {(b, h, w)}, got {tuple(mask.shape)}")
    floating = m.is_floating_point()  # (a bool mask is 0 or 1)
    m = m.detach().to(images.device, images.dtype)  # (no autograd through the attack's weights)
    if floating:  # in the images' dtype: a value that rounds into [0, 1] there is in range
        lo, hi = torch.stack(torch.aminmax(m)).tolist()  # NaN or infinite where an element is
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError("mask contains NaN or infinite values")
        if lo < 0 or hi > 1:
            raise ValueError(f"mask values must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")
    return m.expand(b, h, w).contiguous()


def _generator(seed, device: torch.device) -> torch.Generator | None:
    if seed is None or isinstance(seed, torch.Generator):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, a torch.Generator or None, got {type(seed).__name__}")
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


def _rand(shape, like: torch.Tensor, gen: torch.Generator | None, normal: bool = False) -> torch.Tensor:
    device = like.device if gen is None else gen.device
    draw = torch.randn if normal else torch.rand
    return draw(shape, generator=gen, device=device, dtype=torch.float32).to(like.device, like.dtype)


def _amp_dtype(amp) -> torch.dtype | None:
    if amp is False or amp is None:
        return None
    if amp is True:
        return torch.bfloat16
    if amp in (torch.bfloat16, torch.float16):
        return amp
    raise ValueError(f"amp must be False, True (bfloat16) or torch.bfloat16 / torch.float16, got {amp!r}")


def _forward(model: nn.Module, x: torch.Tensor, amp_dtype, labels=None) -> torch.Tensor:
    """(B, K) float32 logits. ``labels``: refuse labels >= K (once per attack: a host round trip)."""
    if amp_dtype is None and not torch.is_autocast_enabled(x.device.type):
        logits = model(x)  # entering a disabled autocast region costs tens of microseconds per call
    else:
        with torch.autocast(device_type=x.device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            logits = model(x)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != x.shape[0]:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"the model must return logits of shape (B, num_classes), got {shape}")
    if labels is not None:
        check_label_range(labels, logits.shape[1])
    return logits.float()


def check_label_range(labels: torch.Tensor, num_classes: int) -> None:
    """labels < the model's number of outputs (one host round trip)."""
    if int(labels.max()) >= num_classes:
        raise ValueError(f"labels must be < num_classes = {num_classes}, got {int(labels.max())}")


def _gradient_scale(logits: torch.Tensor, labels: torch.Tensor, amp_dtype) -> torch.Tensor | float:
    """1, or under float16 autocast (B,) per-sample factors giving each sample's cross-entropy
    gradient on the logits, softmax - onehot, a unit norm (detached: it rescales each sample's
    gradient, whose direction alone the steps use, and keeps it from underflowing in float16)."""
    if amp_dtype != torch.float16:
        return 1.0
    with torch.no_grad():
        norm = (logits.softmax(dim=1) - F.one_hot(labels, logits.shape[1])).norm(dim=1)
        return torch.where(norm > 0, 1 / norm.clamp_min(torch.finfo(norm.dtype).tiny), torch.ones_like(norm))


def _gradient(model, x, labels, targeted, amp_dtype, check_labels):
    """The gradient of the summed objective alone (the steps that keep no score)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        logits = _forward(model, x, amp_dtype, labels if check_labels else None)
        loss = F.cross_entropy(logits, labels, reduction="none")
        loss = (loss * _gradient_scale(logits, labels, amp_dtype)).sum()
        return torch.autograd.grad(-loss if targeted else loss, x)[0]


def _evaluate(model, x, labels, targeted, amp_dtype, need_grad, check_labels):
    """Per-sample objective (higher = stronger attack), success flags and the gradient."""
    with torch.enable_grad() if need_grad else torch.no_grad():
        x = x.detach().requires_grad_(need_grad)
        logits = _forward(model, x, amp_dtype, labels if check_labels else None)
        loss = F.cross_entropy(logits, labels, reduction="none")
        objective = -loss if targeted else loss
        scaled = objective * _gradient_scale(logits, labels, amp_dtype) if need_grad else None
        grad = torch.autograd.grad(scaled.sum(), x)[0] if need_grad else None
    pred = logits.detach().argmax(dim=1)
    success = pred == labels if targeted else pred != labels
    return objective.detach(), success, grad


def _random_start(x, weight, eps, norm, gen):
    b = x.shape[0]
    w = 1.0 if weight is None else weight.unsqueeze(1)
    if norm == "linf":
        delta = (2 * _rand(x.shape, x, gen) - 1) * eps * w
    else:  # direction ~ N(0, I) restricted to the mask, radius ~ U(0, eps)
        delta = _rand(x.shape, x, gen, normal=True) * w
        norms = delta.reshape(b, -1).norm(dim=1).view(b, 1, 1, 1) + division_guard(delta.dtype)
        delta = delta / norms * _rand((b, 1, 1, 1), x, gen) * eps
    return (x + delta).clamp(0.0, 1.0)


def masked_pgd(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    eps: float = 8 / 255,
    norm: str = "linf",
    step_size: float | None = None,
    steps: int = 10,
    random_start: bool = True,
    restarts: int = 1,
    targeted: bool = False,
    keep_best: bool = True,
    seed=None,
    amp=False,
    backend: str = "auto",
) -> torch.Tensor:
    """Projected gradient descent on the cross-entropy, restricted to / weighted by a per-pixel mask.

    Args:
        model: classifier taking (B, C, H, W) images in [0, 1], returning (B, K) logits.
        images: (B, C, H, W) float in [0, 1].
        labels: (B,) integer: the true classes (the target classes if ``targeted``).
        mask: None (no restriction: plain PGD) or (H, W), (B, H, W), (B, 1, H, W), bool or float in
            [0, 1], shared by the channels. The random start and every step are multiplied by it:
            a 0/1 mask confines the perturbation to the ones. Fractional values scale the L-inf
            step per pixel; in L2 they weight the gradient before it is normalized, so they
            shift the step towards the heavier pixels and the step keeps its length.
        eps: radius of the ε-ball around ``images`` (L-inf or L2, in [0, 1] pixel units).
        norm: "linf" or "l2".
        step_size: step per iteration; default ``eps / 4``.
        steps: iterations per restart.
        random_start: start at a random point of the (masked) ε-ball instead of the clean image.
        restarts: independent runs; each later run attacks only the samples not yet broken.
        targeted: minimize the loss of ``labels`` instead of maximizing it.
        keep_best: return, per sample, the worst case over every iterate and restart (a successful
            one first, then the highest loss); False returns the last iterate of the best restart.
        seed, amp, backend: see the module docstring.

    Returns:
        (B, C, H, W) adversarial images, same dtype and device as ``images``, within ``eps`` of
        ``images`` and in [0, 1].
    """
    labels = check_batch(images, labels)
    check_choice("norm", norm, NORMS)
    weight = check_mask(mask, images)
    eps = float(eps)
    step_size = eps / 4 if step_size is None else float(step_size)
    if not (eps >= 0 and eps != float("inf")):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    if not (step_size >= 0 and step_size != float("inf")):
        raise ValueError(f"step_size must be finite and >= 0, got {step_size}")
    check_int("steps", steps, 0)
    check_int("restarts", restarts, 1)
    amp_dtype = _amp_dtype(amp)
    gen = _generator(seed, images.device)
    step = resolve_step(backend, images.device)

    x = images.detach()
    # Whether the final iterate must be scored (one forward without gradient).
    score_last = keep_best or restarts > 1
    if eps == 0 or (steps == 0 and not score_last):
        # No step needs the model: one forward still checks its outputs and the labels against
        # them, as every other setting does.
        with frozen(model), torch.no_grad():
            _forward(model, x.clone(), amp_dtype, labels)  # (a model may write into its input)
        if eps == 0:
            return x.clone()
    best = x.clone()
    best_obj = torch.full((x.shape[0],), -float("inf"), device=x.device)
    best_success = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)

    with frozen(model):
        for restart in range(restarts):
            idx = None if restart == 0 else (~best_success).nonzero().flatten()
            if idx is not None and idx.numel() == 0:
                break
            xs = x if idx is None else x[idx]
            ys = labels if idx is None else labels[idx]
            ws = weight if (weight is None or idx is None) else weight[idx]
            x_adv = _random_start(xs, ws, eps, norm, gen) if random_start else xs.clone()
            obj = success = None
            for k in range(steps + 1):
                last = k == steps
                if last and not score_last:
                    break
                first = restart == 0 and k == 0
                if keep_best or last:
                    obj, success, grad = _evaluate(model, x_adv, ys, targeted, amp_dtype, need_grad=not last, check_labels=first)
                    # Success first, then the higher objective; ties keep the earlier candidate.
                    old_obj = best_obj if idx is None else best_obj[idx]
                    old_success = best_success if idx is None else best_success[idx]
                    better = (success & ~old_success) | ((success == old_success) & (obj > old_obj))
                    _update(best, best_obj, best_success, idx, better, x_adv, obj, success)
                else:
                    grad = _gradient(model, x_adv, ys, targeted, amp_dtype, check_labels=first)
                if not last:
                    step(x_adv, xs, grad, ws, step_size, eps, 0.0, 1.0, norm)
            if not score_last:  # one restart, last iterate wanted
                return x_adv
    return best


def _update(best, best_obj, best_success, idx, better, x_adv, obj, success) -> None:
    if idx is None:
        best.copy_(torch.where(better.view(-1, 1, 1, 1), x_adv, best))
        best_obj.copy_(torch.where(better, obj, best_obj))
        best_success.copy_(torch.where(better, success, best_success))
        return
    sel = idx[better]
    best[sel] = x_adv[better]
    best_obj[sel] = obj[better]
    best_success[sel] = success[better]


def pgd(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, **kwargs) -> torch.Tensor:
    """PGD (L-inf or L2): :func:`masked_pgd` without a mask; same keyword arguments."""
    if "mask" in kwargs:
        raise TypeError("pgd() takes no mask; use masked_pgd()")
    return masked_pgd(model, images, labels, None, **kwargs)


def fgsm(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    eps: float = 8 / 255,
    norm: str = "linf",
    mask: torch.Tensor | None = None,
    targeted: bool = False,
    amp=False,
    backend: str = "auto",
) -> torch.Tensor:
    """Fast gradient sign method: one step of size ``eps`` from the clean images (for
    ``norm="l2"``, one step of length ``eps`` along the normalized gradient: FGM).
    Arguments as in :func:`masked_pgd`."""
    return masked_pgd(
        model, images, labels, mask, eps=eps, norm=norm, step_size=eps, steps=1, random_start=False,
        restarts=1, targeted=targeted, keep_best=False, amp=amp, backend=backend,
    )


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, *, batch_size: int = 256, amp=False) -> torch.Tensor:
    """(B,) predicted classes, in batches, with the model frozen (eval mode, restored afterwards)."""
    check_batch(images)
    check_int("batch_size", batch_size, 1)
    amp_dtype = _amp_dtype(amp)
    with frozen(model):
        # (clones: a model may write into its input)
        preds = [_forward(model, images[i : i + batch_size].clone(), amp_dtype).argmax(1) for i in range(0, images.shape[0], batch_size)]
    return torch.cat(preds)


class Attack:
    """An attack bound to a model and its settings, called like torchattacks' attacks:
    ``attack(images, labels)`` (plus ``mask=`` for the masked variants). An int ``seed`` seeds a
    generator owned by the object: successive calls draw fresh, reproducible random starts."""

    def __init__(self, model: nn.Module, *, seed=None, **settings):
        self.model = model
        self.settings = settings
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
        self.generator = _generator(seed, device)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        items = ", ".join(f"{k}={v!r}" for k, v in self.settings.items())
        return f"{type(self).__name__}({items})"


class FGSM(Attack):
    """:func:`fgsm` as a callable object."""

    def __init__(self, model, eps: float = 8 / 255, *, norm: str = "linf", targeted: bool = False, amp=False, backend: str = "auto"):
        super().__init__(model, eps=eps, norm=norm, targeted=targeted, amp=amp, backend=backend)

    def __call__(self, images, labels, mask=None):
        return fgsm(self.model, images, labels, mask=mask, **self.settings)


class PGD(Attack):
    """:func:`masked_pgd` as a callable object (``mask=None``: plain PGD)."""

    def __init__(
        self, model, eps: float = 8 / 255, step_size: float | None = None, steps: int = 10, *, norm: str = "linf",
        random_start: bool = True, restarts: int = 1, targeted: bool = False, keep_best: bool = True, seed=None,
        amp=False, backend: str = "auto",
    ):
        super().__init__(
            model, seed=seed, eps=eps, step_size=step_size, steps=steps, norm=norm, random_start=random_start,
            restarts=restarts, targeted=targeted, keep_best=keep_best, amp=amp, backend=backend,
        )

    def __call__(self, images, labels, mask=None):
        return masked_pgd(self.model, images, labels, mask, seed=self.generator, **self.settings)


class PGDL2(PGD):
    """PGD in the L2 norm (default ε = 0.5, step ε/4)."""

    def __init__(self, model, eps: float = 0.5, step_size: float | None = None, steps: int = 10, **kwargs):
        super().__init__(model, eps, step_size, steps, norm="l2", **kwargs)
