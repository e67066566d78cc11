"""The batched tensor API: explain a (B, C, H, W) batch with LIME on any device."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from . import backends
from .checks import (
    FLOAT_DTYPES, check_choice, check_images, check_int, check_real, check_same_device, check_segments, check_tensor,
)
from .model_state import evaluating
from .neighborhood import draw_masks, fudge_images, perturbed_chunks
from .ops.lime_fit import check_kernel_width, exact_constant_fits
from .segmentation import segment

OUTPUTS = ("softmax", "identity")


@dataclass
class Explanation:
    """LIME explanations of a batch, as tensors (M = the largest segment count; padded
    coefficients are 0).

    coef (B, L, M), intercept (B, L), score (B, L) weighted R², local_pred (B, L),
    labels (B, L) the explained classes (for ``top_labels`` the most probable first),
    segments (B, H, W), num_segments (B,), images (B, C, H, W) the explained images.
    """

    coef: torch.Tensor
    intercept: torch.Tensor
    score: torch.Tensor
    local_pred: torch.Tensor
    labels: torch.Tensor
    segments: torch.Tensor
    num_segments: torch.Tensor
    images: torch.Tensor
    from_top_labels: bool = True

    def heatmap(self) -> torch.Tensor:
        """(B, L, H, W): each pixel's LIME weight (the coefficient of its superpixel)."""
        b, l, _ = self.coef.shape
        h, w = self.segments.shape[1:]
        index = self.segments.reshape(b, 1, h * w).expand(b, l, h * w)
        return torch.gather(self.coef, 2, index).reshape(b, l, h, w)

    def to_lime(self, i: int):
        """Image i as lime's ``ImageExplanation`` (see :class:`attrefine_fast.lime.ImageExplanation`)."""
        from .lime import ImageExplanation

        image = self.images[i].detach().permute(1, 2, 0).cpu()
        image = (image.float() if image.dtype == torch.bfloat16 else image).numpy()  # (numpy has no bfloat16)
        exp = ImageExplanation(image, self.segments[i].cpu().numpy())
        m = int(self.num_segments[i])
        labels = self.labels[i].tolist()
        coef = self.coef[i, :, :m].detach().double().cpu().numpy()
        for j, label in enumerate(labels):
            exp.intercept[label] = float(self.intercept[i, j])
            exp.local_exp[label] = sorted(enumerate(coef[j].tolist()), key=lambda x: abs(x[1]), reverse=True)
        # lime keeps the score and local_pred of the label it fitted last: the most probable
        # for top_labels, else the last label asked for.
        last = 0 if self.from_top_labels else len(labels) - 1
        exp.score = float(self.score[i, last])
        exp.local_pred = np.array([float(self.local_pred[i, last])])
        if self.from_top_labels:
            exp.top_labels = labels
        return exp


# Model inputs per forward pass when explain() is not told. On the CPU small batches are faster:
# their activations stay in cache (benchmarks/RESULTS.md, "Forward batch size on the CPU": a tiny
# CNN's 224x224 explanation 3.7x faster in batches of 32 than of 256, explain-demo's four photos
# 13-20%). A GPU wants large batches.
DEFAULT_BATCH_SIZE = {"cpu": 32, "cuda": 256}


def _model_device(model) -> torch.device | None:
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
        for buf in model.buffers():
            return buf.device
    return None


@contextlib.contextmanager
def eval_mode(model):
    """Run ``model`` in eval mode without autograd, restoring its train/eval mode afterwards."""
    if not isinstance(model, torch.nn.Module):
        with torch.no_grad():
            yield
        return
    with evaluating(model), torch.no_grad():
        yield


def _forward(model: Callable, inputs: torch.Tensor, batch_size: int, output: str, classes: int | None) -> torch.Tensor:
    """The model's outputs on ``inputs``, ``batch_size`` rows per call, checked: (rows, classes)
    (``classes`` as earlier calls gave, where known), finite; softmax-ed for output="softmax"."""
    outs = []
    for start in range(0, inputs.shape[0], batch_size):
        rows = min(batch_size, inputs.shape[0] - start)
        out = model(inputs[start : start + rows])
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != rows:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"the model must return a (batch, classes) tensor; for {rows} inputs it returned {shape}")
        if classes is not None and out.shape[1] != classes:
            raise ValueError(f"the model returned {out.shape[1]} classes for a batch after {classes} for the first")
        classes = out.shape[1]
        outs.append(out)
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    out = out.to(torch.promote_types(out.dtype, torch.float32))  # a float64 model's outputs stay float64
    if not bool(torch.isfinite(out).all()):
        raise ValueError("the model returned NaN or infinite values")
    return out.softmax(dim=1) if output == "softmax" else out


def explain(
    model: Callable,
    images: torch.Tensor,
    *,
    segments: torch.Tensor | None = None,
    segmentation: str = "quickshift",
    segmentation_params: dict | None = None,
    labels: torch.Tensor | Sequence | None = None,
    top_labels: int | None = None,
    num_samples: int = 1000,
    masks: torch.Tensor | None = None,
    seed: int | None = None,
    kernel_width: float = 0.25,
    alpha: float = 1.0,
    hide_color="mean",
    batch_size: int | None = None,
    output: str = "softmax",
    mean: Sequence[float] | torch.Tensor | None = None,
    std: Sequence[float] | torch.Tensor | None = None,
    amp: bool = False,
    channels_last: bool = False,
    fit_dtype: torch.dtype = torch.float64,
    backend: str = "auto",
) -> Explanation:
    """LIME explanations for a whole batch at once.

    Args:
        model: a torch module (or any callable) mapping (n, C, H, W) to (n, classes) scores on
            the images' device. Its train/eval mode is restored afterwards; no autograd runs.
            Its input batches share one buffer, overwritten batch after batch (a fresh tensor per
            batch would cost more than writing it) and, on the CPU, kept for the thread's next
            explanation (``attrefine_fast.input_buffers.release_buffers()`` frees it): a model that
            keeps its inputs beyond its forward call must keep copies.
        images: (B, C, H, W) float tensor, the model's input before ``mean``/``std``.
        segments: (B, H, W) labels 0..M_b-1; computed with :func:`segment` when None
            (``segmentation`` and ``segmentation_params``).
        labels: (B, L) classes to explain, or one sequence for every image. When None, the
            ``top_labels`` (default 5) most probable classes of each image are explained (equal
            outputs ordered as lime orders them: numpy's argsort).
        num_samples: N, samples per image (sample 0 is the image itself).
        masks: (B, N, M) bool samples to use instead of drawing them (e.g. lime's own).
        seed: seeds the samples (drawn on the CPU, so identical on every device); an integer in
            torch's range for seeds, [-2**63, 2**64).
        kernel_width, alpha: LIME's kernel width and the ridge penalty.
        hide_color: "mean" (lime's default), a value, per-channel values or a (B, C, H, W) image.
        batch_size: model inputs per forward pass; default 32 on the CPU, 256 elsewhere (see
            :data:`DEFAULT_BATCH_SIZE`). channels_last=True is often faster still on the CPU.
        output: "softmax" explains probabilities (lime's convention: classifiers return
            probabilities); "identity" explains the model's raw outputs.
        mean, std: per-channel normalization fused into the perturbation kernel.
        amp: run the model under autocast (bfloat16 on CPU, float16 on CUDA).
        channels_last: feed the model channels-last inputs.
        fit_dtype: dtype of the ridge fit (float64 default; float32 is faster on GPUs).
        backend: "auto", "torch", "cpp", "cuda" or "triton" for the engine's ops.
    """
    check_images("images", images)
    if images.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"images must be floating point for explain(), got {images.dtype}: convert them as the model expects "
            "(images.float() / 255 for [0, 1], images.float() for 0..255: then pass segments, since quickshift, "
            "the default segmentation, takes floats in [0, 1]), or use attrefine_fast.lime's explainer, "
            "which feeds uint8 images to the model as 0..255"
        )
    check_choice("output", output, OUTPUTS)
    if fit_dtype not in (torch.float32, torch.float64):
        raise TypeError(f"fit_dtype must be float32 or float64, got {fit_dtype}")
    model_device = _model_device(model)
    if model_device is not None and model_device != images.device:
        raise ValueError(f"the model is on {model_device} but images are on {images.device}")
    if batch_size is None:
        batch_size = DEFAULT_BATCH_SIZE.get(images.device.type, DEFAULT_BATCH_SIZE["cuda"])
    check_int("batch_size", batch_size, 1)
    kernel_width = check_real("kernel_width", kernel_width, positive=True)
    alpha = check_real("alpha", alpha, minimum=0.0)
    images = images.contiguous()
    b, c = images.shape[:2]
    device = images.device

    if segments is None:
        segments, counts = segment(images, segmentation, **(segmentation_params or {}))
    else:
        counts = check_segments(segments, images)
    segments = segments.to(device).long()
    counts = counts.to(device)
    m = int(counts.max())

    masks_given = masks is not None
    if not masks_given:
        check_int("num_samples", num_samples, 2)
        masks = draw_masks(counts, num_samples, seed, device)
    else:
        check_tensor("masks", masks, ndim=3, dtypes=(torch.bool, torch.uint8, torch.int32, torch.int64))
        check_same_device(images=images, masks=masks)
        if masks.shape[0] != b or masks.shape[2] != m or masks.shape[1] < 2:
            raise ValueError(f"masks must have shape (B, N, M) = ({b}, N >= 2, {m}), got {tuple(masks.shape)}")
        if masks.dtype != torch.bool and bool(((masks != 0) & (masks != 1)).any()):
            raise ValueError("masks must hold 0 and 1 only (segment off / on)")
        masks = masks != 0
    n = masks.shape[1]

    norm = {}
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std, or neither")
    if mean is not None:
        # in the perturbation's arithmetic: float64 for float64 images, float32 otherwise
        norm_dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
        norm = {
            name: torch.as_tensor(v.detach() if isinstance(v, torch.Tensor) else v, dtype=norm_dtype, device=device).flatten()
            for name, v in (("mean", mean), ("std", std))
        }
        for name, t in norm.items():
            if t.numel() != c or not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} must hold {c} finite values")
        if bool((norm["std"] == 0).any()):
            raise ValueError("std contains zeros")

    fixed_labels = None
    if labels is not None:
        fixed_labels = torch.as_tensor(labels, device=device)
        if fixed_labels.dim() == 1:
            fixed_labels = fixed_labels.unsqueeze(0).expand(b, -1)
        if fixed_labels.dim() != 2 or fixed_labels.shape[0] != b or fixed_labels.shape[1] == 0:
            raise ValueError(f"labels must be (B, L) or one sequence of labels, got shape {tuple(fixed_labels.shape)}")
        if fixed_labels.dtype.is_floating_point or fixed_labels.dtype == torch.bool or fixed_labels.is_complex():
            raise TypeError(f"labels must be integer class indices, got dtype {fixed_labels.dtype}")
        fixed_labels = fixed_labels.long()
        if bool((fixed_labels < 0).any()):
            raise ValueError("labels must be non-negative class indices")
    elif top_labels is None:
        top_labels = 5
    if fixed_labels is None:
        check_int("top_labels", top_labels, 1)
        # Drawn masks start with the image itself: all ones in each image's own columns (an image
        # with fewer segments than M may pad its row with anything, zeros as well).
        padding = torch.arange(m, device=device) >= counts[:, None]
        if masks_given and not bool((masks[:, 0] | padding).all()):
            raise ValueError("masks[:, 0] must be all ones (the image itself, as lime draws it): the top labels are "
                             "read from that sample; or pass labels=")

    # before any forward pass: a kernel too narrow for the samples leaves a fit without weights
    check_kernel_width(masks, counts, kernel_width, fit_dtype)
    fudge = fudge_images(images, segments, m, hide_color, backend)
    autocast = torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16) if amp else contextlib.nullcontext()
    per_chunk = max(1, batch_size // b)  # samples of every image per chunk; fewer images than b per forward below
    targets = torch.empty(b, n, 0 if fixed_labels is None else fixed_labels.shape[1], dtype=fit_dtype, device=device)
    chosen = fixed_labels
    classes = None
    chunks = perturbed_chunks(
        images, segments, masks, fudge, per_chunk, backend, reuse_buffer=True, channels_last=channels_last, **norm
    )
    # closing(): a model that raises gives the input buffer back at once, not when the traceback goes
    with eval_mode(model), autocast, contextlib.closing(chunks):
        for offset, count, inputs in chunks:
            out = _forward(model, inputs, batch_size, output, classes).view(b, count, -1)
            classes = out.shape[2]
            if chosen is None:  # offset 0: sample 0 is the image itself
                k = min(top_labels, out.shape[2])
                # lime's choice, ties included: numpy's argsort of each image's outputs, the last k
                first = out[:, 0].detach().cpu().numpy()
                chosen = torch.from_numpy(np.stack([np.argsort(row)[-k:][::-1] for row in first]).copy()).to(device)
                targets = torch.empty(b, n, k, dtype=fit_dtype, device=device)
            elif offset == 0 and int(chosen.max()) >= out.shape[2]:
                raise ValueError(f"label {int(chosen.max())} is outside the model's {out.shape[2]} outputs")
            targets[:, offset : offset + count] = torch.gather(out, 2, chosen.unsqueeze(1).expand(b, count, -1)).to(fit_dtype)

    fit = backends.resolve("lime_fit", backend, device)
    coef, intercept, score, local_pred = exact_constant_fits(targets, *fit(masks, targets, counts, None, kernel_width, alpha))
    return Explanation(
        coef=coef, intercept=intercept, score=score, local_pred=local_pred, labels=chosen,
        segments=segments, num_segments=counts, images=images, from_top_labels=fixed_labels is None,
    )
