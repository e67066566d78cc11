"""Bad input gets a clear error at the API boundary, and the caller's data is never modified."""
import numpy as np
import pytest
import torch

import attrefine_fast as af
from attrefine_fast import backends, ops
from attrefine_fast import lime as ours
from attrefine_fast.models import SmallCNN
from lime_helpers import PooledLinear, numpy_classifier, photo


def grid_batch(b=2, c=3, size=8):
    images = torch.rand(b, c, size, size)
    segments, counts = af.segment(images, "grid", n_segments=4)
    return images, segments, counts


class TestExplain:
    model = SmallCNN(num_classes=4, width=4)

    @pytest.mark.parametrize("images,match", [
        (torch.rand(3, 8, 8), "4 dimensions"),
        (torch.rand(1, 3, 0, 8), "empty"),
        (torch.full((1, 3, 8, 8), float("nan")), "NaN"),
        (torch.full((1, 3, 8, 8), float("inf")), "NaN or infinite"),
        (torch.randint(0, 255, (1, 3, 8, 8), dtype=torch.uint8), "floating point"),
    ])
    def test_bad_images(self, images, match):
        with pytest.raises((ValueError, TypeError), match=match):
            af.explain(self.model, images, segments=torch.zeros(1, 8, 8, dtype=torch.long), num_samples=4)

    def test_bad_segments(self):
        images, segments, _ = grid_batch()
        with pytest.raises(ValueError, match="shape"):
            af.explain(self.model, images, segments=segments[:, :4], num_samples=4)
        gap = segments.clone()
        gap[gap == 1] = 2
        with pytest.raises(ValueError, match="not numbered 0..M-1"):
            af.explain(self.model, images, segments=gap, num_samples=4)
        with pytest.raises(ValueError, match="negative"):
            af.explain(self.model, images, segments=segments - 1, num_samples=4)
        with pytest.raises(TypeError, match="integer"):
            af.explain(self.model, images, segments=segments.float(), num_samples=4)

    def test_bad_options(self):
        images, segments, _ = grid_batch()
        with pytest.raises(ValueError, match="num_samples"):
            af.explain(self.model, images, segments=segments, num_samples=1)
        with pytest.raises(ValueError, match="outside the model's 4 outputs"):
            af.explain(self.model, images, segments=segments, labels=[7], num_samples=4)
        with pytest.raises(ValueError, match="masks must have shape"):
            af.explain(self.model, images, segments=segments, masks=torch.ones(2, 5, 3, dtype=torch.bool))
        with pytest.raises(ValueError, match="mean and std"):
            af.explain(self.model, images, segments=segments, num_samples=4, mean=[0.5] * 3)
        with pytest.raises(ValueError, match="std contains zeros"):
            af.explain(self.model, images, segments=segments, num_samples=4, mean=[0.5] * 3, std=[0.0] * 3)
        with pytest.raises(ValueError, match="output"):
            af.explain(self.model, images, segments=segments, num_samples=4, output="logits")
        with pytest.raises(ValueError, match="hide_color"):
            af.explain(self.model, images, segments=segments, num_samples=4, hide_color=[1.0, 2.0])

    def test_bad_model_output(self):
        images, segments, _ = grid_batch()
        with pytest.raises(ValueError, match=r"\(batch, classes\)"):
            af.explain(lambda x: x.mean(dim=(1, 2, 3)), images, segments=segments, num_samples=4)
        with pytest.raises(ValueError, match="NaN"):
            af.explain(lambda x: x.mean(dim=(2, 3)) * float("nan"), images, segments=segments, num_samples=4)


class TestDropIn:
    clf = staticmethod(numpy_classifier(PooledLinear()))

    def test_bad_images(self):
        explainer = ours.LimeImageExplainer(random_state=0)
        for image, match in [(np.zeros((4, 4, 4)), "RGB"), (np.zeros((2, 4, 4, 3)), "RGB"), (np.full((8, 8, 3), np.nan), "NaN")]:
            with pytest.raises(ValueError, match=match):
                explainer.explain_instance(image, self.clf, num_samples=10)
        with pytest.raises(TypeError, match="integers or floats"):
            explainer.explain_instance(np.zeros((8, 8, 3), dtype=bool), self.clf, num_samples=10)

    def test_bad_arguments(self):
        explainer = ours.LimeImageExplainer(random_state=0)
        image = photo("coffee", 32)
        with pytest.raises(ValueError, match="num_samples"):
            explainer.explain_instance(image, self.clf, num_samples=1)
        with pytest.raises(ValueError, match="outside the classifier's 8 outputs"):
            explainer.explain_instance(image, self.clf, labels=(9,), top_labels=None, num_samples=10)
        with pytest.raises(ValueError, match=r"\(batch, classes\)"):
            explainer.explain_instance(image, lambda x: np.zeros(len(x)), num_samples=10)
        with pytest.raises(ValueError, match="segmentation must return"):
            explainer.explain_instance(image, self.clf, segmentation_fn=lambda im: np.zeros((3, 3), int), num_samples=10)
        with pytest.raises(ValueError, match="not numbered"):
            explainer.explain_instance(image, self.clf, segmentation_fn=lambda im: np.ones(im.shape[:2], int), num_samples=10)
        with pytest.raises(ValueError, match="feature_selection"):
            ours.LimeImageExplainer(feature_selection="best")

    def test_callers_image_untouched(self):
        image = photo("astronaut", 32).copy()
        before = image.copy()
        ours.LimeImageExplainer(random_state=0).explain_instance(image, self.clf, num_samples=20, hide_color=0)
        ours.LimeImageExplainer(random_state=0).explain_instance(image, PooledLinear(), num_samples=20)
        np.testing.assert_array_equal(image, before)


class TestOps:
    def test_perturb(self):
        images, segments, counts = grid_batch()
        masks = torch.ones(2, 5, 4, dtype=torch.bool)
        fudge = torch.zeros_like(images)
        with pytest.raises(ValueError, match="<= N=5, got offset=3, count=4"):
            ops.perturb(images, segments, masks, fudge, 3, 4)
        with pytest.raises(TypeError, match="masks must have dtype"):
            ops.perturb(images, segments, masks.float(), fudge)
        with pytest.raises(ValueError, match="fudge must match"):
            ops.perturb(images, segments, masks, fudge.double())
        with pytest.raises(ValueError, match="masks must have shape"):
            ops.perturb(images, segments, masks[:, :, :2], fudge)
        with pytest.raises(ValueError, match="one value per channel"):
            ops.perturb(images, segments, masks, fudge, mean=torch.zeros(2), std=torch.ones(2))
        out = ops.perturb(images, segments, masks, fudge, 1, 2)
        assert out.shape == (4, 3, 8, 8)

    def test_perturb_into_a_buffer(self):
        images, segments, counts = grid_batch()
        masks = torch.ones(2, 5, 4, dtype=torch.bool)
        fudge = torch.zeros_like(images)
        with pytest.raises(ValueError, match="out must have shape"):
            ops.perturb(images, segments, masks, fudge, out=torch.empty(3, 3, 8, 8))
        with pytest.raises(ValueError, match="contiguous or channels-last"):
            ops.perturb(images, segments, masks, fudge, out=torch.empty(4, 3, 8, 8).transpose(2, 3))
        with pytest.raises(ValueError, match="count=3 but out holds 2"):
            ops.perturb(images, segments, masks, fudge, 0, 3, out=torch.empty(4, 3, 8, 8))
        with pytest.raises(TypeError, match="out_dtype"):
            ops.perturb(images, segments, masks, fudge, out_dtype=torch.float16, out=torch.empty(4, 3, 8, 8))
        with pytest.raises(ValueError, match="channels_last=True"):
            ops.perturb(images, segments, masks, fudge, channels_last=True, out=torch.empty(4, 3, 8, 8))
        with pytest.raises(ValueError, match="got offset=4, count=2"):
            ops.perturb(images, segments, masks, fudge, 4, out=torch.empty(4, 3, 8, 8))
        with pytest.raises(ValueError, match="require grad"):
            ops.perturb(images, segments, masks, fudge, out=torch.empty(4, 3, 8, 8, requires_grad=True))
        with pytest.raises(ValueError, match="shares memory with images"):
            ops.perturb(images, segments, masks, fudge, out=images)
        with pytest.raises(TypeError, match="out must be a torch.Tensor"):
            ops.perturb(images, segments, masks, fudge, out=np.zeros((4, 3, 8, 8)))
        before = images.clone()
        out = torch.empty(4, 3, 8, 8)
        assert ops.perturb(images, segments, masks, fudge, 1, out=out) is out
        assert torch.equal(out, ops.perturb(images, segments, masks, fudge, 1, 2)) and torch.equal(images, before)

    def test_lime_fit(self):
        masks = torch.ones(2, 6, 3, dtype=torch.bool)
        targets = torch.rand(2, 6, 2, dtype=torch.float64)
        with pytest.raises(ValueError, match="at least 2 samples"):
            ops.lime_fit(masks[:, :1], targets[:, :1])
        with pytest.raises(ValueError, match="targets must have shape"):
            ops.lime_fit(masks, targets[:1])
        with pytest.raises(ValueError, match="num_segments"):
            ops.lime_fit(masks, targets, torch.tensor([3, 4]))
        with pytest.raises(ValueError, match="NaN"):
            ops.lime_fit(masks, targets * float("nan"))
        with pytest.raises(ValueError, match="non-negative"):
            ops.lime_fit(masks, targets, weights=-torch.ones(2, 6, dtype=torch.float64))

    def test_segment_mean_and_pgd(self):
        images, segments, _ = grid_batch()
        with pytest.raises(ValueError, match="smaller than"):
            ops.segment_mean(images, segments, 2)
        x = torch.rand(2, 3, 8, 8)
        with pytest.raises(ValueError, match="norm"):
            ops.masked_pgd_step(x.clone(), x, x, step_size=0.1, eps=0.1, norm="l1")
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            ops.masked_pgd_step(x.clone(), x, x, 2 * torch.ones(2, 8, 8), step_size=0.1, eps=0.1)
        with pytest.raises(TypeError, match="dtype"):
            ops.masked_pgd_step(x.clone(), x.double(), x, step_size=0.1, eps=0.1)


def test_unavailable_backend_names_reason_and_fix():
    with pytest.raises(backends.BackendUnavailable, match="cuda backend runs on CUDA tensors"):
        ops.lime_fit(torch.ones(1, 4, 2, dtype=torch.bool), torch.rand(1, 4, 1), backend="cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        ops.lime_fit(torch.ones(1, 4, 2, dtype=torch.bool), torch.rand(1, 4, 1), backend="opencl")


def test_info_lists_every_op_and_backend():
    from attrefine_fast.info import report

    text = report()
    for name in backends.OPS + backends.BACKENDS:
        assert name in text


def test_finite_check_is_exact_when_the_sum_overflows():
    from attrefine_fast.checks import all_finite

    big = torch.full((4, 5), torch.finfo(torch.float32).max)
    assert not torch.isfinite(big.sum()) and all_finite(big)
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = torch.zeros(4, 5)
        t[2, 3] = bad
        assert not all_finite(t)
        big[1, 1] = bad
        assert not all_finite(big)
        big[1, 1] = 1.0
    assert all_finite(torch.zeros(0)) and all_finite(torch.arange(3))

