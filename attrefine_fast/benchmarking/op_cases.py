"""One setup function per op: each builds the op's inputs once and returns a Case whose
providers are our backends (torch, cpp, cuda, triton) and, where lime has the same step as a
piece of its own code, lime.

Ours are timed through the implementation ``backend=`` resolves to, as the explanation engine
calls it (input validation excluded). lime runs on the CPU with numpy whatever the device.
Without the lime package its providers are skipped with the reason, except segment_mean's: lime's
hide-colour step is inline code, copied here, which needs no package.
"""
from __future__ import annotations

import numpy as np
import torch

from .. import backends
from ..neighborhood import draw_masks, fudge_images, perturbed_chunks
from .core import Case, Provider, skip
from .inputs import OUR_BACKENDS, TOP_LABELS, backend_status, grid_batch, lime_missing, photo_batch, quiet_lime

# Samples per perturbation chunk, as explain()'s default batch_size: B * (FORWARD_BATCH // B) rows.
FORWARD_BATCH = 256
NO_PEER_LIME = "lime has no separate step for this op"


def _ours(op: str, device: torch.device, make_fn) -> list[Provider]:
    """A provider per backend: make_fn(backend) -> the call, or a skip with the reason."""
    out = []
    for backend in OUR_BACKENDS:
        ok, why = backend_status((op,), backend, device)
        name = f"ours[{backend}]"
        out.append(Provider(name, "ours", fn=make_fn(backend)) if ok else skip(name, "ours", why))
    return out


def _hwc(images: torch.Tensor) -> list[np.ndarray]:
    return [im.permute(1, 2, 0).cpu().numpy().copy() for im in images]


def lime_hide_colour(image: np.ndarray, segments: np.ndarray) -> np.ndarray:
    """lime 0.2.0.1's hide-colour step, which lives inline in ``explain_instance`` (there is no
    function to call): for every segment, three boolean masks to take the channel means and a
    fourth to paint them, exactly the work lime does."""
    fudged = image.copy()
    for x in np.unique(segments):
        fudged[segments == x] = (
            np.mean(image[segments == x][:, 0]),
            np.mean(image[segments == x][:, 1]),
            np.mean(image[segments == x][:, 2]),
        )
    return fudged


def setup_segment_mean(device: torch.device, size: int, batch: int, segments: int) -> Case:
    """The hide-colour image: per-segment channel means (the segment_mean op), painted back into
    an image. Ours: segment_mean on the backend plus one gather; lime: its loop per image."""
    images = photo_batch(size, batch).to(device)
    seg, _ = grid_batch(batch, size, segments)
    seg = seg.to(device)

    providers = _ours("segment_mean", device, lambda b: lambda: fudge_images(images, seg, segments, "mean", b))
    images_np, seg_np = _hwc(images), seg.cpu().numpy()
    providers.append(Provider(
        "lime", "peer", fn=lambda: [lime_hide_colour(im, s) for im, s in zip(images_np, seg_np)],
        detail="lime's hide-colour loop (numpy, CPU), one image at a time",
    ))
    return Case(
        id=f"segment_mean/{size}px/B{batch}/M{segments}", kind="op",
        title=f"segment_mean: hide-colour image, {size}x{size}, B={batch}, M={segments}",
        params={"op": "segment_mean", "size": size, "batch": batch, "segments": segments},
        device=device, providers=providers,
    )


def setup_perturb(device: torch.device, size: int, batch: int, samples: int, segments: int) -> Case:
    """All N perturbed images of every image, produced in chunks of FORWARD_BATCH model inputs,
    as explain() produces them: written chunk after chunk into one buffer (perturb_into), kept
    between calls on the CPU as explain() keeps it, and dropped (the model is not run). lime: its
    ``data_labels`` with a classifier that returns zeros, one image at a time (it also draws the
    samples: negligible)."""
    images = photo_batch(size, batch).to(device)
    seg, counts = grid_batch(batch, size, segments)
    seg, counts = seg.to(device), counts.to(device)
    masks = draw_masks(counts, samples, seed=0, device=device)
    fudge = fudge_images(images, seg, segments, "mean", "torch")
    per_chunk = max(1, FORWARD_BATCH // batch)

    def ours(backend):
        def run():
            for _ in perturbed_chunks(images, seg, masks, fudge, per_chunk, backend, reuse_buffer=True):
                pass
        return run

    providers = _ours("perturb_into", device, ours)
    if device.type == "cuda" and batch > 1 and size > 64:
        providers.append(skip("lime", "peer", "lime perturbs one image at a time on the CPU: timed at B=1 only at this size"))
    else:
        providers.append(_lime_perturb(images, fudge, seg, samples))
    return Case(
        id=f"perturb/{size}px/B{batch}/N{samples}/M{segments}", kind="op",
        title=f"perturb: {samples} perturbed images per image, {size}x{size}, B={batch}, M={segments}",
        params={"op": "perturb", "size": size, "batch": batch, "samples": samples, "segments": segments,
                "rows_per_chunk": batch * per_chunk},
        device=device, providers=providers,
    )


def _lime_perturb(images: torch.Tensor, fudge: torch.Tensor, seg: torch.Tensor, samples: int) -> Provider:
    """lime's ``data_labels`` with a classifier that returns zeros, one image at a time."""
    missing = lime_missing()
    if missing:
        return skip("lime", "peer", missing)
    import lime.lime_image

    explainer = lime.lime_image.LimeImageExplainer(random_state=0)
    images_np, fudge_np, seg_np = _hwc(images), _hwc(fudge), seg.cpu().numpy()

    def zeros(x):
        return np.zeros((len(x), 1), dtype=np.float32)

    def run():
        with quiet_lime():
            for im, fu, s in zip(images_np, fudge_np, seg_np):
                explainer.data_labels(im, fu, s, zeros, samples, batch_size=FORWARD_BATCH)

    return Provider("lime", "peer", fn=run, detail="lime's data_labels (numpy, CPU), one image at a time")


def setup_lime_fit(device: torch.device, batch: int, samples: int, segments: int, labels: int = TOP_LABELS) -> Case:
    """The weighted ridge fits of L labels (float64, as explain() fits). lime: cosine distances,
    its kernel, and LimeBase's fit of every label with feature_selection='none' (the fit alone,
    without lime's default Ridge(alpha=0.01) pre-fit that only orders the features)."""
    gen = torch.Generator().manual_seed(0)
    counts = torch.full((batch,), segments, dtype=torch.long)
    masks = draw_masks(counts, samples, seed=0)
    targets = torch.rand(batch, samples, labels, generator=gen, dtype=torch.float64)
    masks_d, targets_d, counts_d = masks.to(device), targets.to(device), counts.to(device)

    def ours(backend):
        impl = backends.resolve("lime_fit", backend, device)
        return lambda: impl(masks_d, targets_d, counts_d, None, 0.25, 1.0)

    providers = _ours("lime_fit", device, ours) + [_lime_fit(masks, targets, segments, labels)]
    return Case(
        id=f"lime_fit/B{batch}/N{samples}/M{segments}/L{labels}", kind="op",
        title=f"lime_fit: {labels} labels, B={batch}, N={samples}, M={segments}",
        params={"op": "lime_fit", "batch": batch, "samples": samples, "segments": segments, "labels": labels},
        device=device, providers=providers,
    )


def _lime_fit(masks: torch.Tensor, targets: torch.Tensor, segments: int, labels: int) -> Provider:
    """lime's cosine distances, its kernel and LimeBase's fit of every label, one image at a time."""
    missing = lime_missing()
    if missing:
        return skip("lime", "peer", missing)
    import lime.lime_image
    from sklearn.metrics import pairwise_distances

    base = lime.lime_image.LimeImageExplainer(random_state=0).base
    data_np = [m.numpy().astype(np.int64) for m in masks]
    targets_np = targets.numpy()

    def run():
        for data, y in zip(data_np, targets_np):
            distances = pairwise_distances(data, data[0].reshape(1, -1), metric="cosine").ravel()
            for label in range(labels):
                base.explain_instance_with_data(data, y, distances, label, segments, feature_selection="none")

    return Provider("lime", "peer", fn=run, detail="lime's distances, kernel and LimeBase fit per label (CPU)")


def setup_masked_pgd_step(device: torch.device, size: int, batch: int, norm: str = "linf") -> Case:
    """One PGD update with a per-pixel weight (a superpixel mask), in place."""
    gen = torch.Generator().manual_seed(0)
    x = photo_batch(size, batch).to(device)
    grad = torch.randn(x.shape, generator=gen).to(device)
    seg, _ = grid_batch(batch, size, 64)
    weight = (seg % 2).to(device=device, dtype=x.dtype)  # every other superpixel
    x_adv = (x + 0.01 * torch.randn(x.shape, generator=gen).to(device)).clamp(0, 1)

    def ours(backend):
        impl = backends.resolve("masked_pgd_step", backend, device)
        return lambda: impl(x_adv, x, grad, weight, 2 / 255, 8 / 255, 0.0, 1.0, norm)

    providers = _ours("masked_pgd_step", device, ours)
    providers.append(skip("torchattacks", "peer", "torchattacks' PGD update is inline in its attack loop: compared in the attack cases"))
    return Case(
        id=f"masked_pgd_step/{size}px/B{batch}/{norm}", kind="op",
        title=f"masked_pgd_step: {norm}, {size}x{size}, B={batch}",
        params={"op": "masked_pgd_step", "size": size, "batch": batch, "norm": norm},
        device=device, providers=providers,
    )


OP_SETUPS = {
    "segment_mean": setup_segment_mean,
    "perturb": setup_perturb,
    "lime_fit": setup_lime_fit,
    "masked_pgd_step": setup_masked_pgd_step,
}
