"""End-to-end setup functions: explaining images (the explanation overhead) and segmenting them.

Explanation overhead = time(explain) / time(the model's forward passes over the same B*N
perturbed inputs, in the same batches) - 1: what the explainer adds to the work the model must
do anyway. Every explainer's model calls are also timed from inside (a wrapped model), so its
non-model time (total minus the time inside the model) is reported beside it and compared with
lime's. Segmentation is computed once outside the timed region (the same segments for every
provider) and timed separately in the segmentation cases.

All explainers explain the most probable class of each image (``top_labels=1``) unless a case asks
for more labels (``labels=L``: the L most probable classes, fitted on the same samples). captum's
Lime attributes one target per call, so for L labels it is called once per label, as its users
would call it.

Memory layout: lime hands the model (n, H, W, 3) arrays, which become channels-last tensors at no
cost, and convolutions on the CPU run up to twice as fast on those (SmallCNN at 224x224, one
thread: 0.68 s against 1.12 s for 32 images). So ours runs with ``channels_last=True`` and the
model alone is timed on channels-last inputs too; captum and our lime drop-in feed (n, C, H, W)
as they do by default.
"""
from __future__ import annotations

import math

import torch

from ..explain import explain
from ..neighborhood import draw_masks, fudge_images, perturbed_chunks
from ..segmentation import segment
from .core import Case, Provider, Stopwatch, skip
from .inputs import (
    MODELS,
    OUR_BACKENDS,
    TimedModel,
    auto_choice,
    backend_status,
    build_model,
    explanation_segments,
    lime_missing,
    model_forwards,
    numpy_classifier,
    photo_batch,
    quiet_lime,
)

EXPLAIN_OPS = ("segment_mean", "perturb_into", "lime_fit")
# Model inputs per forward pass, for every explainer (lime's own default is 10).
FORWARD_BATCH = 256
# The per-image explainers (lime, captum, our drop-in) run only up to this batch: beyond it
# they take minutes per call, and their per-image cost is measured at B=1 anyway.
PEER_MAX_BATCH = 8


def _softmax(module: torch.nn.Module) -> torch.nn.Module:
    return torch.nn.Sequential(module, torch.nn.Softmax(dim=1))


def _our_explainers(images, seg, model, samples, labels, device) -> list[Provider]:
    """ours[backend] for every backend that has all the explanation ops, and ours[auto] when
    ``backend="auto"`` mixes backends (so a partly compiled backend is still timed)."""
    out = []

    def provider(name, backend):
        watch = Stopwatch(device)
        timed = TimedModel(model, watch)
        fn = lambda: explain(  # noqa: E731
            timed, images, segments=seg, top_labels=labels, num_samples=samples, seed=0,
            batch_size=FORWARD_BATCH, channels_last=True, backend=backend,
        )
        return Provider(name, "ours", fn=fn, stopwatch=watch, detail="attrefine_fast.explain, whole batch, channels-last")

    for backend in OUR_BACKENDS:
        ok, why = backend_status(EXPLAIN_OPS, backend, device)
        out.append(provider(f"ours[{backend}]", backend) if ok else skip(f"ours[{backend}]", "ours", why))
    choice = auto_choice(EXPLAIN_OPS, device)
    if len(set(choice.values())) > 1:
        mixed = ", ".join(f"{op}={b}" for op, b in choice.items())
        p = provider("ours[auto]", "auto")
        p.detail = f"backend='auto': {mixed}"
        out.append(p)
    return out


def _drop_in(images_np, seg_np, model, samples, labels, device) -> Provider:
    """Our lime drop-in (same API and results as lime), one image at a time like lime."""
    from ..lime import LimeImageExplainer

    watch = Stopwatch(device)
    timed = _softmax(TimedModel(model, watch))
    explainer = LimeImageExplainer(random_state=0)

    def run():
        for im, s in zip(images_np, seg_np):
            explainer.explain_instance(
                im, timed, top_labels=labels, num_samples=samples, batch_size=FORWARD_BATCH,
                segmentation_fn=lambda _, s=s: s,
            )

    return Provider("ours[drop-in]", "ours", fn=run, stopwatch=watch, detail="attrefine_fast.lime.LimeImageExplainer, per image")


def _lime(images_np, seg_np, model, samples, labels, device) -> Provider:
    missing = lime_missing()
    if missing:
        return skip("lime", "peer", missing)
    import lime.lime_image

    watch = Stopwatch(device)
    classifier = numpy_classifier(model, device, watch)
    explainer = lime.lime_image.LimeImageExplainer(random_state=0)

    def run():
        with quiet_lime():
            for im, s in zip(images_np, seg_np):
                explainer.explain_instance(
                    im, classifier, top_labels=labels, num_samples=samples, batch_size=FORWARD_BATCH,
                    segmentation_fn=lambda _, s=s: s,
                )

    return Provider("lime", "peer", fn=run, stopwatch=watch, detail=f"lime.lime_image, per image, batch_size={FORWARD_BATCH}")


def lime_kernel_on_samples(original_input, perturbed_input, interpretable_sample, **kwargs) -> float:
    """LIME's weight of a sample, for captum's ``similarity_func``: lime's kernel of width 0.25 on
    the cosine distance between the on/off sample and the all-ones one, d = 1 - sqrt(k / M) for
    k segments on (captum's own cosine kernel compares the perturbed images' pixels instead: a
    different explanation, and a pass over every perturbed image)."""
    from ..lime import lime_kernel

    m = interpretable_sample.numel()
    k = float(interpretable_sample.sum())
    return float(lime_kernel(1.0 - math.sqrt(k / m) if k > 0 else 1.0, 0.25))


def _captum(images, seg, fudge, model, samples, labels, device) -> Provider:
    """captum's Lime set up as LIME: the hide-colour image as baseline, the superpixels as the
    feature mask, a ridge fit (alpha=1) and lime's kernel on the on/off samples
    (:func:`lime_kernel_on_samples`); one call per explained label."""
    try:
        from captum._utils.models.linear_model import SkLearnRidge
        from captum.attr import Lime
    except ImportError as e:
        return skip("captum", "peer", f"captum is not importable ({e}); install it with `pip install captum`")
    watch = Stopwatch(device)
    forward = _softmax(TimedModel(model, watch))
    explainer = Lime(forward, interpretable_model=SkLearnRidge(alpha=1.0), similarity_func=lime_kernel_on_samples)

    def run():
        for i in range(images.shape[0]):
            x = images[i : i + 1]
            with torch.no_grad():
                targets = forward(x)[0].topk(labels).indices.tolist()
            for target in targets:
                explainer.attribute(
                    x, baselines=fudge[i : i + 1], target=target, feature_mask=seg[i].view(1, 1, *seg.shape[1:]),
                    n_samples=samples, perturbations_per_eval=FORWARD_BATCH,
                )

    return Provider("captum", "peer", fn=run, stopwatch=watch, detail=f"captum.attr.Lime, per image, {FORWARD_BATCH} per eval")


def setup_explain(
    device: torch.device, model: str, size: int, batch: int, samples: int, labels: int = 1, captum: bool = True
) -> Case:
    """Explain B images with N samples each, their ``labels`` most probable classes. Providers:
    the model's forward passes alone ("model"), ours per backend, and up to B=PEER_MAX_BATCH our lime drop-in, lime and
    captum (beyond it they are listed as skipped, with the reason; ``captum=False`` leaves
    captum out where it would dominate a short run)."""
    net = build_model(model, device)
    images = photo_batch(size, batch).to(device)
    seg, counts, seg_name = explanation_segments(images)
    seg, counts = seg.to(device), counts.to(device)
    m = int(counts.max())
    rows_per_chunk = batch * max(1, FORWARD_BATCH // batch)
    fudge = fudge_images(images, seg, m, "mean", "torch")
    masks = draw_masks(counts, samples, seed=0, device=device)
    chunk = next(perturbed_chunks(images, seg, masks, fudge, rows_per_chunk // batch, "torch", channels_last=True))[2]

    providers = [Provider("model", "model", fn=model_forwards(net, chunk, batch * samples),
                          detail=f"the model alone over {batch * samples} channels-last inputs, {chunk.shape[0]} per pass")]
    providers += _our_explainers(images, seg, net, samples, labels, device)
    if batch <= PEER_MAX_BATCH:
        images_np = [im.permute(1, 2, 0).cpu().numpy().copy() for im in images]
        seg_np = seg.cpu().numpy()
        providers.append(_drop_in(images_np, seg_np, net, samples, labels, device))
        providers.append(_lime(images_np, seg_np, net, samples, labels, device))
        if captum:
            providers.append(_captum(images, seg, fudge, net, samples, labels, device))
        else:
            providers.append(skip("captum", "peer", "left out of this case to keep the CPU run short (the other cases compare captum)"))
    else:
        reason = f"explains one image at a time: timed up to B={PEER_MAX_BATCH}, per image in the B=1 cases"
        providers += [skip(n, r, reason) for n, r in (("ours[drop-in]", "ours"), ("lime", "peer"), ("captum", "peer"))]
    segs = counts.float()
    return Case(
        id=f"explain/{model}/{size}px/B{batch}/N{samples}" + (f"/L{labels}" if labels > 1 else ""), kind="explain",
        title=f"explain: {MODELS[model][0]}, {size}x{size}, B={batch}, N={samples}, "
        + ("top label" if labels == 1 else f"top {labels} labels"),
        params={"model": model, "size": size, "batch": batch, "samples": samples, "labels": labels, "segmentation": seg_name,
                "segments_mean": round(float(segs.mean()), 1), "segments_max": m, "forward_batch": int(chunk.shape[0])},
        device=device, providers=providers,
    )


def _lime_segmentation(images: torch.Tensor) -> Provider:
    """lime's quickshift wrapper with its default settings, one image at a time."""
    missing = lime_missing()
    if missing:
        return skip("lime", "peer", missing)
    from lime.wrappers.scikit_image import SegmentationAlgorithm

    images_np = [im.permute(1, 2, 0).numpy().copy() for im in images]
    quickshift = SegmentationAlgorithm("quickshift", kernel_size=4, max_dist=200, ratio=0.2, random_seed=0)
    return Provider("lime", "peer", fn=lambda: [quickshift(im) for im in images_np], detail="lime's quickshift, per image")


def setup_segmentation(device: torch.device, size: int, batch: int) -> Case:
    """Superpixels for B images (scikit-image on the CPU whatever the device). lime: its
    quickshift wrapper, one image at a time; ours: segment() with the same quickshift settings
    (one image per thread), and the cheaper slic and grid."""
    images = photo_batch(size, batch)
    providers = [
        Provider("ours[quickshift]", "ours", fn=lambda: segment(images, "quickshift"), detail="lime's quickshift settings, threaded"),
        Provider("ours[slic]", "ours", fn=lambda: segment(images, "slic", n_segments=50), detail="slic, 50 segments"),
        Provider("ours[grid]", "ours", fn=lambda: segment(images, "grid", n_segments=64), detail="8x8 grid"),
        _lime_segmentation(images),
    ]
    return Case(
        id=f"segmentation/{size}px/B{batch}", kind="segmentation",
        title=f"segmentation: {size}x{size}, B={batch}",
        params={"size": size, "batch": batch}, device=torch.device("cpu"), providers=providers,
        notes=["scikit-image runs on the CPU; only ours[quickshift] computes what lime computes"],
    )
