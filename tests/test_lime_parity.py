"""The drop-in explainer and the batched API against lime 0.2.0.1 on real photos."""
import numpy as np
import pytest
import torch

from attrefine_fast import explain
from attrefine_fast import lime as ours
from lime_helpers import PooledLinear, assert_same_explanation, lime_samples, numpy_classifier, photo

lime_image = pytest.importorskip("lime.lime_image")


@pytest.fixture(autouse=True)
def quiet_lime(monkeypatch):
    """lime shows a progress bar per sample; silence it (results are unaffected)."""
    import functools

    import tqdm.auto

    monkeypatch.setattr(lime_image, "tqdm", functools.partial(tqdm.auto.tqdm, disable=True))


def both(image, classifier, explainer_kwargs=None, **kwargs):
    explainer_kwargs = explainer_kwargs or {}
    ref = lime_image.LimeImageExplainer(**explainer_kwargs).explain_instance(image, classifier, **kwargs)
    mine = ours.LimeImageExplainer(**explainer_kwargs).explain_instance(image, classifier, **kwargs)
    return mine, ref


@pytest.mark.parametrize("random_seed", [None, 5])
def test_a_quickshift_taking_random_seed_gets_limes_seed(monkeypatch, random_seed):
    # scikit-image 0.20's quickshift takes a random_seed, which lime hands it (drawn from its
    # random_state when not given); later releases call it rng and lime's seed is dropped.
    import lime.wrappers.scikit_image as lime_wrappers
    from skimage import segmentation

    real, seen = segmentation.quickshift, []

    def quickshift_with_random_seed(image, ratio=1.0, kernel_size=5, max_dist=10, return_tree=False, sigma=0,
                                    convert2lab=True, random_seed=42, *, channel_axis=-1):
        seen.append(random_seed)
        return real(image, ratio=ratio, kernel_size=kernel_size, max_dist=max_dist, sigma=sigma, convert2lab=convert2lab,
                    channel_axis=channel_axis)

    monkeypatch.setattr(segmentation, "quickshift", quickshift_with_random_seed)
    monkeypatch.setattr(lime_wrappers, "quickshift", quickshift_with_random_seed)
    clf = numpy_classifier(PooledLinear(seed=2))
    mine, ref = both(photo("astronaut", 48), clf, {"random_state": 3}, num_samples=100, random_seed=random_seed)
    assert len(seen) == 2 and seen[0] == seen[1] and seen[0] != 42
    assert random_seed is None or seen[0] == random_seed
    assert_same_explanation(mine, ref)


@pytest.mark.parametrize(
    "name,size,seed,num_samples",
    [("astronaut", 64, 0, 500), ("coffee", 96, 1, 300), ("chelsea", 48, 7, 1000), ("rocket", 80, 3, 257)],
)
def test_default_explanation_matches_lime(name, size, seed, num_samples):
    clf = numpy_classifier(PooledLinear(seed=seed))
    mine, ref = both(photo(name, size), clf, {"random_state": seed}, num_samples=num_samples)
    np.testing.assert_array_equal(mine.segments, ref.segments)
    assert_same_explanation(mine, ref)


@pytest.mark.parametrize(
    "feature_selection,num_features",
    [("auto", 100000), ("auto", 4), ("none", 3), ("highest_weights", 5), ("highest_weights", 100000), ("forward_selection", 3), ("lasso_path", 4)],
)
def test_feature_selection_matches_lime(feature_selection, num_features):
    clf = numpy_classifier(PooledLinear(seed=2))
    mine, ref = both(
        photo("astronaut", 64), clf, {"random_state": 5, "feature_selection": feature_selection},
        num_samples=400, num_features=num_features, top_labels=3,
    )
    assert_same_explanation(mine, ref)


def test_explicit_labels_hide_color_kernel_and_distance_match_lime():
    clf = numpy_classifier(PooledLinear(seed=4))

    def kernel(d, kernel_width):
        return np.exp(-d / kernel_width)

    mine, ref = both(
        photo("coffee", 64), clf, {"random_state": 11, "kernel_width": 0.4, "kernel": kernel},
        labels=(2, 0, 5), top_labels=None, hide_color=17, num_samples=300, batch_size=7, distance_metric="euclidean",
    )
    assert_same_explanation(mine, ref)


@pytest.mark.parametrize("explainer_kwargs", [
    {"kernel_width": float("inf")},  # every sample weighs 1
    {"kernel_width": 0.0, "kernel": lambda d, kernel_width: np.exp(-d)},  # a kernel ignoring the width
], ids=["infinite-width", "zero-width-custom-kernel"])
def test_kernel_widths_that_lime_takes_and_the_fit_op_would_refuse(explainer_kwargs):
    # The drop-in hands the fit lime's own weights, so the op never judges the width.
    mine, ref = both(photo("coffee", 48), numpy_classifier(PooledLinear(seed=2)), {"random_state": 3, **explainer_kwargs},
                     num_samples=120, top_labels=2)
    assert_same_explanation(mine, ref)


def test_model_regressor_and_custom_segmentation_match_lime():
    from lime.wrappers.scikit_image import SegmentationAlgorithm
    from sklearn.linear_model import Ridge

    clf = numpy_classifier(PooledLinear(seed=6))
    seg = SegmentationAlgorithm("slic", n_segments=20, start_label=0)
    mine, ref = both(
        photo("chelsea", 64), clf, {"random_state": 2}, segmentation_fn=seg, model_regressor=Ridge(alpha=0.3),
        num_samples=300, random_seed=9,
    )
    assert_same_explanation(mine, ref)


def _raster(shape, per_label):
    return np.arange(shape[0] * shape[1]).reshape(shape[:2]) // per_label


@pytest.mark.parametrize("segmentation", [
    "slic-1-based",  # lime's own wrapper, with scikit-image's default start_label=1
    lambda im: _raster(im.shape, 300) * 2,  # gaps: labels 0, 2, 4, ...
    lambda im: _raster(im.shape, 300) - 1,  # a negative label
    lambda im: _raster(im.shape, 300) + 0.5 * (_raster(im.shape, 1) % 2),  # float labels, half of them fractional
], ids=["slic-1-based", "gaps", "negative", "float"])
def test_labels_other_than_0_to_m_minus_1_are_explained_as_lime_does(segmentation):
    # lime's feature j switches off the pixels labelled j (j < the number of distinct labels):
    # other labels are never switched off. The drop-in refused such segmentations.
    from lime.wrappers.scikit_image import SegmentationAlgorithm

    if segmentation == "slic-1-based":
        segmentation = SegmentationAlgorithm("slic", n_segments=10)
    with pytest.warns(UserWarning, match="never switched off"):
        mine, ref = both(photo("chelsea", 48), numpy_classifier(PooledLinear(seed=6)), {"random_state": 2},
                         segmentation_fn=segmentation, num_samples=200, random_seed=9, top_labels=2)
    assert_same_explanation(mine, ref)
    for label in ref.top_labels:
        for kwargs in ({"positive_only": True, "num_features": 3}, {"positive_only": False, "hide_rest": True, "num_features": 5}):
            for a, b in zip(mine.get_image_and_mask(label, **kwargs), ref.get_image_and_mask(label, **kwargs)):
                np.testing.assert_array_equal(a, b)


def test_float_and_grayscale_images_match_lime():
    clf = numpy_classifier(PooledLinear(seed=1))
    image = photo("rocket", 48).astype(np.float64)
    assert_same_explanation(*both(image, clf, {"random_state": 8}, num_samples=300))
    gray = photo("astronaut", 48)[..., 0]
    assert_same_explanation(*both(gray, clf, {"random_state": 9}, num_samples=300))


def test_torch_module_classifier_matches_lime():
    """A module runs on tensors (no numpy round trips) and gives lime's explanation."""
    module = PooledLinear(seed=3)
    image = photo("astronaut", 64).astype(np.float64)
    ref = lime_image.LimeImageExplainer(random_state=4).explain_instance(image, numpy_classifier(module), num_samples=300)
    mine = ours.LimeImageExplainer(random_state=4).explain_instance(image, module, num_samples=300)
    assert_same_explanation(mine, ref)


def test_random_state_stream_matches_lime_across_calls():
    """Two explanations in a row with one explainer draw the same samples as lime's."""
    clf = numpy_classifier(PooledLinear(seed=0))
    a, b = lime_image.LimeImageExplainer(random_state=21), ours.LimeImageExplainer(random_state=21)
    for name in ("astronaut", "coffee"):
        image = photo(name, 48)
        assert_same_explanation(b.explain_instance(image, clf, num_samples=200), a.explain_instance(image, clf, num_samples=200))


@pytest.mark.parametrize("name,size,seed", [("astronaut", 64, 0), ("chelsea", 72, 5)])
def test_batched_api_given_lime_samples_matches_lime(name, size, seed):
    module = PooledLinear(seed=seed)
    image = photo(name, size).astype(np.float64)  # float images: the segment means are not truncated
    ref = lime_image.LimeImageExplainer(random_state=seed).explain_instance(image, numpy_classifier(module), num_samples=400, top_labels=4)
    m = int(ref.segments.max()) + 1
    masks = torch.from_numpy(lime_samples(seed, 400, m).astype(bool)).unsqueeze(0)
    images = torch.from_numpy(image.astype(np.float64)).permute(2, 0, 1).unsqueeze(0)
    segments = torch.from_numpy(ref.segments.astype(np.int64)).unsqueeze(0)
    exp = explain(module, images, segments=segments, masks=masks, top_labels=4, output="identity", batch_size=64)
    assert exp.labels[0].tolist() == ref.top_labels
    assert_same_explanation(exp.to_lime(0), ref)


@pytest.mark.parametrize("positive_only,negative_only,hide_rest,num_features,min_weight",
                         [(True, False, False, 5, 0.0), (False, True, True, 3, 0.0), (False, False, False, 4, 0.001), (False, False, True, 10, 0.0)])
def test_get_image_and_mask_matches_lime(positive_only, negative_only, hide_rest, num_features, min_weight):
    clf = numpy_classifier(PooledLinear(seed=2))
    mine, ref = both(photo("coffee", 48), clf, {"random_state": 3}, num_samples=200)
    label = ref.top_labels[0]
    kwargs = dict(positive_only=positive_only, negative_only=negative_only, hide_rest=hide_rest, num_features=num_features, min_weight=min_weight)
    img_a, mask_a = mine.get_image_and_mask(label, **kwargs)
    img_b, mask_b = ref.get_image_and_mask(label, **kwargs)
    np.testing.assert_array_equal(mask_a, mask_b)
    np.testing.assert_array_equal(img_a, img_b)
    assert img_a.dtype == img_b.dtype and mask_a.dtype == mask_b.dtype


def _grid(image):
    """16 square superpixels on a 32x32 image, 0..15."""
    return (np.arange(image.shape[0])[:, None] // 8) * 4 + np.arange(image.shape[1])[None] // 8


def _linear_logits(scale: float):
    """Raw linear outputs of the flattened pixels: a classifier on which every rounding difference
    of the perturbed images shows in the coefficients."""
    weight = np.random.RandomState(1).randn(32 * 32 * 3, 4) / 3000 * scale
    return lambda batch: np.asarray(batch, dtype=np.float64).reshape(len(batch), -1) @ weight


def test_images_of_other_dtypes_reach_the_classifier_and_the_explanation_in_their_own():
    """int16 / int32 images stay integers (hide colours truncated as lime's assignment does) and
    float32 segment means round as numpy's do: the same perturbed images, so the same answer."""
    base = np.random.RandomState(0).randint(0, 256, (32, 32, 3))
    for image, scale in [(base.astype(np.int16), 1.0), (base.astype(np.int32), 1.0), ((base / 255).astype(np.float32), 255.0)]:
        seen = set()
        linear = _linear_logits(scale)

        def classifier(batch, linear=linear, seen=seen):
            seen.add(batch.dtype)
            return linear(batch)

        mine, ref = both(image, classifier, {"random_state": 0}, segmentation_fn=_grid, num_samples=100)
        assert seen == {image.dtype} and mine.image.dtype == image.dtype
        assert_same_explanation(mine, ref, atol=1e-9)
        for kwargs in ({}, {"positive_only": False, "hide_rest": True}):
            for a, b in zip(mine.get_image_and_mask(mine.top_labels[0], **kwargs), ref.get_image_and_mask(ref.top_labels[0], **kwargs)):
                assert a.dtype == b.dtype and np.array_equal(a, b)


def test_float64_images_are_perturbed_to_the_bit_as_lime_perturbs_them():
    # numpy sums a float64 segment's pixels pairwise, the segment_mean op in order: hide colours
    # an ulp apart (visible to a classifier that quantizes its input), so float64 takes lime's path.
    image = np.random.RandomState(5).rand(32, 32, 3)
    batches = {"ours": [], "lime": []}

    def recording(key):
        def classifier(batch):
            batches[key].append(np.array(batch))
            return _linear_logits(1.0)(batch)
        return classifier

    kwargs = dict(segmentation_fn=_grid, num_samples=40, random_seed=0, top_labels=1)
    ours.LimeImageExplainer(random_state=0).explain_instance(image, recording("ours"), **kwargs)
    lime_image.LimeImageExplainer(random_state=0).explain_instance(image, recording("lime"), **kwargs)
    assert np.array_equal(np.concatenate(batches["ours"]), np.concatenate(batches["lime"]))


def test_a_constant_classifier_output_is_fitted_exactly_as_lime_fits_it():
    image = np.random.RandomState(0).randint(0, 256, (32, 32, 3)).astype(np.uint8)
    constant = lambda batch: np.tile([0.1, 0.7, 0.2], (len(batch), 1))  # noqa: E731
    for explainer_kwargs, kwargs in [({}, {}), ({"feature_selection": "highest_weights"}, {"num_features": 3}),
                                     ({"feature_selection": "forward_selection"}, {"num_features": 3})]:
        mine, ref = both(image, constant, {"random_state": 0, **explainer_kwargs}, segmentation_fn=_grid, num_samples=100,
                         top_labels=1, **kwargs)
        assert mine.score == ref.score == 1.0 and all(w == 0 for _, w in mine.local_exp[1])
        assert [f for f, _ in mine.local_exp[1]] == [f for f, _ in ref.local_exp[1]]
        assert np.array_equal(mine.get_image_and_mask(1, positive_only=False)[1], ref.get_image_and_mask(1, positive_only=False)[1])


def test_forward_selection_breaks_exact_fit_ties_as_lime():
    """Once a fit is exact every remaining candidate scores 1 in scikit-learn and lime takes the
    first; rounding must not pick another."""
    image = np.random.RandomState(0).randint(0, 256, (32, 32, 3)).astype(np.uint8)

    def two_segments(batch):  # depends on superpixels 0 and 1 only, linearly
        mean = np.asarray(batch, dtype=np.float64)[:, :8, :16].mean(axis=(1, 2, 3)) / 255
        return np.stack([mean, mean], axis=1)

    mine, ref = both(image, two_segments, {"random_state": 0}, segmentation_fn=_grid, num_samples=300, num_features=3,
                     labels=(1,), top_labels=None)
    assert [f for f, _ in mine.local_exp[1]] == [f for f, _ in ref.local_exp[1]]
    assert_same_explanation(mine, ref)


@pytest.mark.filterwarnings("ignore:Regressors in active set degenerate")  # LARS on identical columns, lime's too
def test_lasso_path_breaks_ties_between_identical_features_as_lime():
    """LARS chooses between identical columns by ulps of the centred target: centred as lime
    centres it (np.average), the choice is lime's."""
    from lime.lime_base import LimeBase

    from attrefine_fast.feature_selection import lasso_path
    from attrefine_fast.neighborhood import lime_masks

    base, rng, compared = LimeBase(lambda d: d, random_state=0), np.random.RandomState(0), 0
    for _ in range(120):
        n, m = int(rng.choice([5, 8, 20, 60])), int(rng.choice([3, 5, 8]))
        data = lime_masks(rng, n, m)
        data[:, -1] = data[:, 0]  # two identical features
        y = rng.rand(n, 2)
        w = np.sqrt(np.exp(-((1 - np.sqrt(data.sum(1) / m)) ** 2) / 0.25**2))
        for num_features in (1, 2, 4):
            got = lasso_path(*(torch.from_numpy(a.astype(np.float64)) for a in (data, y, w)), num_features)
            for label in range(2):
                assert got[label] == [int(j) for j in base.feature_selection(data, y[:, label], w, num_features, "lasso_path")]
                compared += 1
    assert compared == 720


def test_a_module_fed_channels_last_gives_the_same_explanation():
    module = PooledLinear(seed=3)
    seen = []

    class Recording(torch.nn.Module):
        def forward(self, x):
            seen.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
            return module(x)

    image = photo("astronaut", 48)
    plain = ours.LimeImageExplainer(random_state=4).explain_instance(image, module, num_samples=200)
    fast = ours.LimeImageExplainer(random_state=4).explain_instance(image, Recording(), num_samples=200, channels_last=True)
    assert seen and all(seen)
    assert_same_explanation(fast, plain, atol=1e-12)


def quadrants(image):
    """16 square superpixels for any image of 4k x 4k pixels."""
    h, w = image.shape[:2]
    return (np.arange(h)[:, None] * 4 // h) * 4 + np.arange(w)[None, :] * 4 // w


@pytest.mark.parametrize("channels,hide_color", [(4, 0), (4, None), (1, 0.5), (5, 0.25)])
def test_images_with_other_channel_counts_match_lime_or_extend_it(channels, hide_color):
    """With a segmentation_fn lime explains any number of channels when given hide_color; its
    mean colour takes exactly 3, where ours takes each channel's mean."""
    image = np.random.RandomState(channels).rand(16, 16, channels)

    def classifier(batch):
        s = np.asarray(batch).reshape(len(batch), -1, channels)[:, :64].mean(axis=(1, 2))
        return np.stack([s, 1 - s, s * s], axis=1)

    kwargs = dict(segmentation_fn=quadrants, num_samples=60, hide_color=hide_color, top_labels=2)
    mine = ours.LimeImageExplainer(random_state=3).explain_instance(image, classifier, **kwargs)
    if hide_color is not None:
        assert_same_explanation(mine, lime_image.LimeImageExplainer(random_state=3).explain_instance(image, classifier, **kwargs))
        return
    segments = quadrants(image)
    fudged = np.stack([image[segments == j].mean(axis=0) for j in range(16)])[segments]
    data = lime_samples(3, 60, 16)
    batch = np.where(data[:, segments, None].astype(bool), image, fudged)
    y = classifier(batch)
    assert mine.top_labels == list(np.argsort(y[0])[-2:][::-1])
    from sklearn.linear_model import Ridge

    d = 1 - np.sqrt(data.sum(axis=1) / 16)
    for label in mine.top_labels:  # lime's fit, by scikit-learn, on the samples made by hand
        ridge = Ridge(alpha=1).fit(data, y[:, label], sample_weight=np.sqrt(np.exp(-(d**2) / 0.25**2)))
        np.testing.assert_allclose([dict(mine.local_exp[label])[j] for j in range(16)], ridge.coef_, atol=1e-9)
    with pytest.raises(ValueError, match="segmentation_fn"):
        ours.LimeImageExplainer(random_state=3).explain_instance(image, classifier, num_samples=60)


@pytest.mark.parametrize("feature_selection", ["none", "lasso_path"])
def test_top_labels_true_and_num_features_zero_match_lime(feature_selection):
    """lime reads top_labels=True as 1, and its 'none' and lasso path take num_features=0."""
    clf = numpy_classifier(PooledLinear(seed=6))
    mine, ref = both(photo("coffee", 48), clf, {"random_state": 2, "feature_selection": feature_selection},
                     num_samples=300, num_features=0, top_labels=True)
    assert mine.top_labels is not None and len(mine.top_labels) == 1
    assert_same_explanation(mine, ref)
