"""A drop-in for lime 0.2.0.1's ``lime_image.LimeImageExplainer``, on the engine's kernels.

Same constructor, same ``explain_instance`` arguments, same random draws: with the same
``random_state`` it samples exactly what lime samples and returns the same explanation. The
perturbed images come from the ``perturb`` op in chunks, the ridge fits of all labels from one
``lime_fit`` solve. ``classifier_fn`` is lime's numpy function ((n, H, W, C) array in the
image's dtype -> (n, classes)) or a torch module, which then receives (n, C, H, W) tensors on
its own device (float32 for uint8, float16 and float32 images, float64 for the others; values
as in the image) and whose
output is used as it is, like lime uses classifier_fn's.
"""
from __future__ import annotations

import contextlib
import inspect
import warnings
from functools import partial

import numpy as np
import torch

from . import backends
from .checks import check_int
from .explain import _model_device
from .feature_selection import forward_selection, highest_weights, lasso_path
from .neighborhood import fudge_images, lime_masks, perturbed_chunks
from .ops.lime_fit import exact_constant_fits
from .segmentation import LIME_QUICKSHIFT

FEATURE_SELECTION = ("auto", "none", "highest_weights", "forward_selection", "lasso_path")


# Image dtypes the engine's ops take as they are; the others go through float64.
ENGINE_DTYPES = (np.uint8, np.float16, np.float32, np.float64)
# Where the fudge_images op's segment means round exactly as lime's numpy means do: uint8 sums are
# exact in any order. The others take lime's own computation: numpy accumulates float32 means in
# float32 and float64 ones pairwise (the op sums in order: an ulp apart), and casts integer ones
# back to the image's own dtype.
EXACT_MEAN_DTYPES = (np.uint8, np.float16)


def hidden_image(image: np.ndarray, segments: np.ndarray, hide_color) -> np.ndarray:
    """lime's ``fudged_image``, computed as lime computes it: every superpixel's mean colour
    (``hide_color=None``) or ``hide_color`` assigned into a copy of the image, in its dtype."""
    fudged = image.copy()
    if hide_color is None:
        for x in np.unique(segments):
            where = segments == x
            inside = image[where]
            fudged[where] = tuple(np.mean(inside[:, k]) for k in range(image.shape[2]))
    else:
        fudged[:] = hide_color
    return fudged


def lime_features(segments: np.ndarray) -> tuple[np.ndarray, int, int]:
    """lime's features of a segmentation, as the engine's labels.

    lime counts n = the distinct labels and lets feature j switch off the pixels labelled j: with
    labels 0..n-1 (quickshift's, or slic's with start_label=0) that is one feature per segment;
    with others (slic's default 1-based labels, gaps, negative labels) some features switch off
    nothing and some pixels are never switched off. Returns the engine's (H, W) int64 labels (j
    for the pixels labelled j < n, and n for the pixels no feature reaches), n, and the engine's
    segment count m (n, or n + 1 when some pixels are never switched off).
    """
    n = int(np.unique(segments).shape[0])
    labels = segments.astype(np.int64) if segments.dtype == bool else segments
    inside = (labels >= 0) & (labels < n)
    if np.issubdtype(labels.dtype, np.floating):
        inside &= labels == np.floor(labels)  # lime compares labels with the (integer) feature index
    engine = np.where(inside, labels, n).astype(np.int64)
    if not inside.all():
        outside = np.unique(segments[~inside])
        warnings.warn(
            f"the segmentation's {n} labels are not 0..{n - 1}: as in lime, feature j switches off the pixels labelled "
            f"j, so the pixels labelled {outside[:5].tolist()}{'...' if outside.size > 5 else ''} are never switched "
            "off (relabel them 0..M-1, e.g. slic's start_label=0, to explain every segment)",
            stacklevel=3,
        )
    return engine, n, n + 1 if not inside.all() else n


def lime_kernel(d, kernel_width):
    """lime's default kernel on distances: sqrt(exp(-d² / kw²))."""
    return np.sqrt(np.exp(-(d**2) / kernel_width**2))


class ImageExplanation:
    """lime's ``ImageExplanation``: ``local_exp[label]`` lists (segment, weight) by decreasing
    |weight|; ``intercept[label]``; ``score`` and ``local_pred`` of the label fitted last (as in
    lime 0.2.0.1); ``top_labels`` (most probable first) when top labels were asked for."""

    def __init__(self, image: np.ndarray, segments: np.ndarray):
        self.image = image
        self.segments = segments
        self.intercept = {}
        self.local_exp = {}
        self.local_pred = None
        self.score = None

    def get_image_and_mask(self, label, positive_only=True, negative_only=False, hide_rest=False, num_features=5, min_weight=0.0):
        """(image, mask) highlighting the label's most important superpixels, as lime returns them.

        positive_only / negative_only keep the first num_features superpixels with weight above
        min_weight (below -min_weight); otherwise the first num_features with |weight| >=
        min_weight are kept, marked 1 (positive) or -1 (negative) in the mask and tinted in the
        image (channel 1 for positive, 0 for negative, set to the image's maximum). hide_rest
        zeroes every other pixel.
        """
        if label not in self.local_exp:
            raise KeyError("Label not in explanation")
        if positive_only and negative_only:
            raise ValueError("Positive_only and negative_only cannot be true at the same time.")
        exp = self.local_exp[label]
        mask = np.zeros(self.segments.shape, self.segments.dtype)
        out = np.zeros(self.image.shape) if hide_rest else self.image.copy()
        if positive_only or negative_only:
            keep = [f for f, w in exp if (w > 0 and w > min_weight if positive_only else w < 0 and abs(w) > min_weight)][:num_features]
            region = np.isin(self.segments, keep)
            out[region] = self.image[region]
            mask[region] = 1
            return out, mask
        top = np.max(self.image)
        for f, w in exp[:num_features]:
            if abs(w) < min_weight:
                continue
            region = self.segments == f
            mask[region] = -1 if w < 0 else 1
            out[region] = self.image[region]
            out[region, 0 if w < 0 else 1] = top
        return out, mask


class LimeImageExplainer:
    """lime's image explainer, same arguments and same results, on the engine's kernels.

    Args:
        kernel_width: width of the exponential kernel on the distance to the image.
        kernel: kernel(d, kernel_width) -> weights; default sqrt(exp(-d² / kw²)).
        verbose: print the intercept, local prediction and model output of each fit.
        feature_selection: 'auto', 'none', 'highest_weights', 'forward_selection' or 'lasso_path'.
        random_state: an int or numpy RandomState; draws exactly lime's samples.
    """

    def __init__(self, kernel_width=0.25, kernel=None, verbose=False, feature_selection="auto", random_state=None):
        from sklearn.utils import check_random_state

        if feature_selection not in FEATURE_SELECTION:
            raise ValueError(f"feature_selection must be one of {FEATURE_SELECTION}, got {feature_selection!r}")
        self.kernel_width = float(kernel_width)
        self.kernel_fn = partial(kernel if kernel is not None else lime_kernel, kernel_width=self.kernel_width)
        self.verbose = verbose
        self.feature_selection = feature_selection
        self.random_state = check_random_state(random_state)

    def explain_instance(
        self,
        image,
        classifier_fn,
        labels=(1,),
        hide_color=None,
        top_labels=5,
        num_features=100000,
        num_samples=1000,
        batch_size=10,
        segmentation_fn=None,
        distance_metric="cosine",
        model_regressor=None,
        random_seed=None,
        backend="auto",
        channels_last=False,
    ) -> ImageExplanation:
        """Explain ``classifier_fn``'s prediction on ``image`` (H, W, 3) or (H, W) grayscale;
        with a ``segmentation_fn``, (H, W, C) for any number of channels (RGBA, multispectral).

        As in lime, ``top_labels=True`` means one label, and 'none' and 'lasso_path' feature
        selection take ``num_features=0``. Beyond lime's arguments: ``backend`` for the engine's
        ops, and ``channels_last`` to feed a torch module channels-last batches (often faster on
        the CPU; lime's numpy function gets (n, H, W, C) arrays in any case)."""
        image = self._check_image(image, any_channels=segmentation_fn is not None)
        check_int("num_samples", num_samples, 2)
        check_int("batch_size", batch_size, 1)
        # lime's 'none' ignores num_features and its lasso path takes 0; the others fail on it
        check_int("num_features", num_features, 0 if self.feature_selection in ("none", "lasso_path") else 1)
        if top_labels is True:  # lime slices argsort(...)[-top_labels:]: True counts as 1
            top_labels = 1
        if top_labels:
            check_int("top_labels", top_labels, 1)
        else:  # the labels asked for, checked before the classifier runs
            labels = list(labels) if not isinstance(labels, (str, bytes)) and hasattr(labels, "__iter__") else labels
            if not isinstance(labels, list) or not labels:
                raise ValueError(f"labels must be a non-empty sequence of class indices when top_labels is not set, got {labels!r}")
            for label in labels:
                check_int("each label", label, 0)
        if random_seed is None:  # drawn even when unused, to keep lime's random stream
            random_seed = self.random_state.randint(0, high=1000)
        segments = self._segments(image, segmentation_fn, random_seed)
        engine_segments, n, m = lime_features(segments)
        model_device = _model_device(classifier_fn) if isinstance(classifier_fn, torch.nn.Module) else None
        device = model_device if model_device is not None else torch.device("cpu")

        # The engine's ops take uint8 and float images; other integer images go through float64,
        # which holds their values exactly up to 2^53 in magnitude (64-bit pixels beyond it are
        # rounded), and reach lime's function in their own dtype again.
        engine = image if image.dtype in ENGINE_DTYPES else image.astype(np.float64)
        image_t = torch.from_numpy(engine.copy()).permute(2, 0, 1).unsqueeze(0).contiguous().to(device)
        segments_t = torch.from_numpy(engine_segments).unsqueeze(0).to(device)
        if hide_color is None and image.dtype in EXACT_MEAN_DTYPES:
            fudge = fudge_images(image_t, segments_t, m, "mean", backend)
        else:  # lime's own computation (numpy's float32 mean, casting and broadcasting rules)
            fudged = hidden_image(image, segments, hide_color).astype(engine.dtype, copy=False)
            fudge = torch.from_numpy(fudged).permute(2, 0, 1).unsqueeze(0).contiguous().to(device)
        data = lime_masks(self.random_state, num_samples, n)
        masks = torch.from_numpy(data.astype(bool))
        if m > n:  # the pixels no feature switches off
            masks = torch.cat([masks, masks.new_ones(num_samples, m - n)], dim=1)
        masks = masks.unsqueeze(0).to(device)

        outputs = self._predict(classifier_fn, image_t, segments_t, masks, fudge, batch_size, backend, image.dtype, channels_last)
        first = outputs[0].detach().cpu().numpy() if isinstance(outputs, torch.Tensor) else outputs[0]

        from sklearn.metrics import pairwise_distances

        distances = pairwise_distances(data, data[0].reshape(1, -1), metric=distance_metric).ravel()
        weights = np.asarray(self.kernel_fn(distances), dtype=np.float64)
        _check_kernel_weights(weights, num_samples)

        exp = ImageExplanation(image, segments)
        if top_labels:
            fit_labels = list(np.argsort(first)[-top_labels:])
            exp.top_labels = fit_labels[::-1]
        else:
            fit_labels = list(labels)
        n_classes = outputs.shape[1]
        for label in fit_labels:
            if not 0 <= int(label) < n_classes:
                raise ValueError(f"label {label} is outside the classifier's {n_classes} outputs")
        self._fit(exp, data, outputs, weights, fit_labels, num_features, model_regressor, device, backend)
        return exp

    @staticmethod
    def _check_image(image, any_channels: bool) -> np.ndarray:
        image = np.asarray(image)
        if image.ndim == 2:
            from skimage.color import gray2rgb

            image = gray2rgb(image)
        if image.ndim != 3 or image.shape[2] < 1:
            raise ValueError(f"image must be (H, W, 3) RGB or (H, W) grayscale, got shape {image.shape}")
        if image.shape[2] != 3 and not any_channels:
            raise ValueError(
                f"image must be (H, W, 3) RGB or (H, W) grayscale for the default segmentation (quickshift), got shape "
                f"{image.shape}; pass a segmentation_fn for images with {image.shape[2]} channels"
            )
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise ValueError(f"image is empty: shape {image.shape}")
        if image.dtype == bool or not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
            raise TypeError(f"image must hold integers or floats, got {image.dtype}")
        if np.issubdtype(image.dtype, np.floating) and not np.isfinite(image).all():
            raise ValueError("image contains NaN or infinite values")
        return image

    @staticmethod
    def _segments(image: np.ndarray, segmentation_fn, random_seed: int) -> np.ndarray:
        if segmentation_fn is None:
            from skimage.segmentation import quickshift

            params = dict(LIME_QUICKSHIFT)
            # lime hands quickshift its random_seed wherever quickshift takes one by that name
            # (scikit-image 0.20; later releases call it rng and run with their default)
            if "random_seed" in inspect.signature(quickshift).parameters:
                params["random_seed"] = random_seed
            segments = quickshift(image, **params)
        else:
            segments = segmentation_fn(image)
        segments = np.asarray(segments)
        numeric = segments.dtype == bool or np.issubdtype(segments.dtype, np.integer) or np.issubdtype(segments.dtype, np.floating)
        if segments.shape != image.shape[:2] or not numeric:
            raise ValueError(f"segmentation must return labels (integers) of shape {image.shape[:2]}, got {segments.dtype} {segments.shape}")
        if np.issubdtype(segments.dtype, np.floating) and not np.isfinite(segments).all():
            raise ValueError("segmentation returned NaN or infinite labels")
        return segments

    @staticmethod
    def _predict(classifier_fn, image_t, segments_t, masks, fudge, batch_size, backend, image_dtype, channels_last):
        """The classifier's outputs for all samples: a tensor on the module's device, or a
        numpy array from lime's function, called with batches of batch_size like lime. A module
        is fed every batch from one buffer, as by explain(); lime's function gets a fresh array
        per batch, as from lime."""
        n = masks.shape[1]
        if isinstance(classifier_fn, torch.nn.Module):
            dtype = torch.float64 if image_t.dtype == torch.float64 else torch.float32
            chunks = []
            batches = perturbed_chunks(image_t, segments_t, masks, fudge, batch_size, backend, reuse_buffer=True, out_dtype=dtype,
                                       channels_last=bool(channels_last))
            with torch.no_grad(), contextlib.closing(batches):  # the buffer goes back even if the module raises
                for _, count, inputs in batches:
                    out = classifier_fn(inputs)
                    _check_output(out, count, chunks[0].shape[1] if chunks else None)
                    # the next batch overwrites the buffer: keep no view of it
                    aliased = out.untyped_storage().data_ptr() == inputs.untyped_storage().data_ptr()
                    chunks.append(out.clone() if aliased else out)
            return torch.cat(chunks)
        preds = []
        for _, count, inputs in perturbed_chunks(image_t, segments_t, masks, fudge, batch_size, backend, channels_last=True):
            out = np.asarray(classifier_fn(inputs.permute(0, 2, 3, 1).numpy().astype(image_dtype, copy=False)))
            _check_output(out, count, len(preds[0]) if preds else None)
            preds.extend(out)
        preds = np.array(preds)
        if preds.shape[0] != n:
            raise ValueError(f"the classifier returned {preds.shape[0]} predictions for {n} samples")
        return preds

    def _fit(self, exp, data, outputs, weights, fit_labels, num_features, model_regressor, device, backend):
        """Feature selection and the final ridge fit of every label, as lime does them."""
        if isinstance(outputs, torch.Tensor):
            y = outputs[:, fit_labels].to(torch.float64)
        else:
            y = torch.from_numpy(np.asarray(outputs[:, fit_labels], dtype=np.float64)).to(device)
        z = torch.from_numpy(data.astype(np.float64)).to(device)
        w = torch.from_numpy(weights).to(device)
        m = data.shape[1]
        masks = z.bool().unsqueeze(0)
        fit = backends.resolve("lime_fit", backend, device)

        def ridge(columns, label_idx, alpha):
            idx = torch.as_tensor(columns, dtype=torch.long, device=device)
            counts = torch.tensor([len(columns)], device=device)
            targets = y[:, label_idx].unsqueeze(0)
            # The weights come from kernel_fn; the op's width (unused with weights) is any valid
            # one, since lime takes widths (inf, 0 with a custom kernel) the op would refuse.
            return exact_constant_fits(targets, *fit(masks[:, :, idx], targets, counts, w.unsqueeze(0), 1.0, alpha))

        method = self.feature_selection
        if method == "auto":
            method = "forward_selection" if num_features <= 6 else "highest_weights"
        all_labels = list(range(len(fit_labels)))
        if method == "none":
            used = [list(range(m))] * len(fit_labels)
        elif method == "highest_weights":
            used = highest_weights(z, y, w, num_features, lambda alpha: ridge(list(range(m)), all_labels, alpha)[0][0])
        elif method == "forward_selection":
            used = forward_selection(z, y, w, num_features)
        else:
            used = lasso_path(z, y, w, num_features)

        if model_regressor is not None:
            results = [self._fit_regressor(model_regressor, data, y[:, j].cpu().numpy(), weights, used[j]) for j in all_labels]
        elif all(u == used[0] for u in used):  # one solve for every label
            coef, intercept, score, local_pred = (t[0].cpu().numpy() for t in ridge(used[0], all_labels, 1.0))
            results = [(used[0], coef[j], intercept[j], score[j], local_pred[j]) for j in all_labels]
        else:
            results = []
            for j in all_labels:
                coef, intercept, score, local_pred = (t[0].cpu().numpy() for t in ridge(used[j], [j], 1.0))
                results.append((used[j], coef[0], intercept[0], score[0], local_pred[0]))

        for j, label in enumerate(fit_labels):
            columns, coef, intercept, score, local_pred = results[j]
            exp.intercept[label] = float(intercept)
            exp.local_exp[label] = sorted(zip([int(c) for c in columns], [float(c) for c in coef]), key=lambda x: np.abs(x[1]), reverse=True)
            exp.score = float(score)
            exp.local_pred = np.array([float(local_pred)])
            if self.verbose:
                print("Intercept", exp.intercept[label])
                print("Prediction_local", exp.local_pred)
                print("Right:", float(y[0, j]))

    @staticmethod
    def _fit_regressor(regressor, data, y, weights, columns):
        """A user-given scikit-learn regressor, fitted and scored as lime does."""
        x = data[:, columns]
        regressor.fit(x, y, sample_weight=weights)
        score = regressor.score(x, y, sample_weight=weights)
        local_pred = regressor.predict(data[0, columns].reshape(1, -1))[0]
        return columns, np.asarray(regressor.coef_).ravel(), float(np.ravel(regressor.intercept_)[0]), score, local_pred


def _check_kernel_weights(weights: np.ndarray, rows: int) -> None:
    """The kernel's sample weights, as scikit-learn's fit would judge them (every feature
    selection method then gets the same clear error)."""
    if weights.shape != (rows,):
        raise ValueError(f"the kernel must return one weight per sample: {rows} samples, got shape {weights.shape}")
    if not np.isfinite(weights).all():
        raise ValueError("the kernel returned NaN or infinite sample weights")
    if not weights.any():
        raise ValueError("the kernel weighs every sample 0: kernel_width is too small for these samples")


def _check_output(out, rows: int, classes: int | None = None) -> None:
    """One batch's outputs: (rows, classes), finite; ``classes`` as the first batch's where given."""
    if out.ndim != 2 or out.shape[0] != rows:
        raise ValueError(f"classifier_fn must return a (batch, classes) array; for {rows} images it returned shape {tuple(out.shape)}")
    if classes is not None and out.shape[1] != classes:
        raise ValueError(f"classifier_fn returned {out.shape[1]} classes for a batch after {classes} for the first")
    finite = bool(torch.isfinite(out).all()) if isinstance(out, torch.Tensor) else bool(np.isfinite(out).all())
    if not finite:
        raise ValueError("classifier_fn returned NaN or infinite values")
