"""The attack setup function: PGD-k, L-inf, ours (per backend of the update step) against
torchattacks' PGD, beside the model's own k forward+backward passes (the floor any PGD-k pays).

Ours runs with ``keep_best=False`` so that both attacks do exactly k forward+backward passes and
return the last iterate (torchattacks' behaviour); our default ``keep_best=True`` adds one
forward pass to score the last iterate.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from .core import Case, Provider, skip
from .inputs import MODELS, NUM_CLASSES, OUR_BACKENDS, backend_status, build_model, photo_batch

EPS = 8 / 255
STEP = 2 / 255


def forward_backward(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int):
    """``steps`` forward passes and input-gradient backward passes, the model's parameters
    frozen as our attacks freeze them: the cost of PGD-k without its updates."""

    def run():
        grads = [p.requires_grad for p in model.parameters()]
        for p in model.parameters():
            p.requires_grad_(False)
        try:
            x = images.clone().requires_grad_(True)
            for _ in range(steps):
                loss = F.cross_entropy(model(x), labels)
                torch.autograd.grad(loss, x)
        finally:
            for p, g in zip(model.parameters(), grads):
                p.requires_grad_(g)

    return run


def setup_pgd(device: torch.device, model: str, size: int, batch: int, steps: int = 10) -> Case:
    net = build_model(model, device)
    images = photo_batch(size, batch).to(device)
    labels = torch.arange(batch, device=device) % NUM_CLASSES

    providers = [Provider("model", "model", fn=forward_backward(net, images, labels, steps),
                          detail=f"{steps} forward+backward passes of the model alone")]
    try:
        from .. import attacks
    except ImportError as e:
        attacks, why = None, f"attrefine_fast.attacks is not importable ({e})"
    for backend in OUR_BACKENDS:
        name = f"ours[{backend}]"
        ok, why = backend_status(("masked_pgd_step",), backend, device) if attacks is not None else (False, why)
        if not ok:
            providers.append(skip(name, "ours", why))
            continue
        fn = lambda b=backend: attacks.pgd(  # noqa: E731
            net, images, labels, eps=EPS, step_size=STEP, steps=steps, keep_best=False, seed=0, backend=b,
        )
        providers.append(Provider(name, "ours", fn=fn, detail="attrefine_fast.attacks.pgd, keep_best=False"))
    try:
        import torchattacks

        attack = torchattacks.PGD(net, eps=EPS, alpha=STEP, steps=steps, random_start=True)
        providers.append(Provider("torchattacks", "peer", fn=lambda: attack(images, labels), detail="torchattacks.PGD"))
    except ImportError as e:
        providers.append(skip("torchattacks", "peer", f"torchattacks is not importable ({e}); `pip install --no-deps torchattacks`"))
    return Case(
        id=f"pgd/{model}/{size}px/B{batch}/steps{steps}", kind="attack",
        title=f"PGD-{steps} L-inf (eps 8/255, step 2/255): {MODELS[model][0]}, {size}x{size}, B={batch}",
        params={"model": model, "size": size, "batch": batch, "steps": steps, "eps": EPS, "step_size": STEP},
        device=device, providers=providers,
    )
