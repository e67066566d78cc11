"""Bad input gets a clear error at the API boundary, and the caller's data is never modified."""
import numpy as np
import pytest
import torch

import attrefine_fast as af
from attrefine_fast import backends, ops
from attrefine_fast import lime as ours
from attrefine_fast.models import SmallCNN
from lime_helpers import PooledLinear, numpy_classifier, photo
from conftest import skip_unless_on_cpu


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
        (torch.randint(0, 255, (1, 3, 8, 8), dtype=torch.uint8), r"floating point .*images\.float\(\) / 255"),
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
        masks = torch.ones(2, 5, 4, dtype=torch.bool)
        masks[1, 0, 2] = False
        with pytest.raises(ValueError, match=r"masks\[:, 0\] must be all ones"):
            af.explain(self.model, images, segments=segments, masks=masks)
        af.explain(self.model, images, segments=segments, masks=masks, labels=[1])  # labels given: row 0 is free
        with pytest.raises(ValueError, match="mean and std"):
            af.explain(self.model, images, segments=segments, num_samples=4, mean=[0.5] * 3)
        with pytest.raises(ValueError, match="std contains zeros"):
            af.explain(self.model, images, segments=segments, num_samples=4, mean=[0.5] * 3, std=[0.0] * 3)
        with pytest.raises(ValueError, match="output"):
            af.explain(self.model, images, segments=segments, num_samples=4, output="logits")
        with pytest.raises(ValueError, match="hide_color"):
            af.explain(self.model, images, segments=segments, num_samples=4, hide_color=[1.0, 2.0])

    @pytest.mark.parametrize("backend", ["torch", "cpp"])
    @pytest.mark.parametrize("kwargs,error,match", [
        ({"alpha": -1.0}, ValueError, "alpha"),
        ({"alpha": float("inf")}, ValueError, "alpha must be finite"),
        ({"alpha": float("nan")}, ValueError, "alpha"),
        ({"kernel_width": 0.0}, ValueError, "kernel_width must be positive"),
        ({"kernel_width": float("nan")}, ValueError, "kernel_width"),
        ({"labels": [1.7]}, TypeError, "integer class indices"),
        ({"labels": [True]}, TypeError, "integer class indices"),
        ({"num_samples": 2.5}, TypeError, "num_samples must be an integer"),
        ({"top_labels": 2.5}, TypeError, "top_labels must be an integer"),
        ({"batch_size": 0}, ValueError, "batch_size must be an integer >= 1"),
    ])
    def test_bad_numbers_are_refused_by_every_backend(self, backend, kwargs, error, match):
        skip_unless_on_cpu("lime_fit", backend)
        images, segments, _ = grid_batch()
        with pytest.raises(error, match=match):
            af.explain(self.model, images, segments=segments, **{"num_samples": 4, **kwargs}, backend=backend)

    def test_bad_model_output(self):
        images, segments, _ = grid_batch()
        with pytest.raises(ValueError, match=r"\(batch, classes\)"):
            af.explain(lambda x: x.mean(dim=(1, 2, 3)), images, segments=segments, num_samples=4)
        with pytest.raises(ValueError, match="NaN"):
            af.explain(lambda x: x.mean(dim=(2, 3)) * float("nan"), images, segments=segments, num_samples=4)


class torch_classes_by_first_pixel(torch.nn.Module):
    """3 outputs for the batch that holds the original image first, 4 for the others."""

    def __init__(self, first_pixel: float):
        super().__init__()
        self.first_pixel = first_pixel

    def forward(self, x):
        return torch.zeros(len(x), 3 if float(x[0, 0, 0, 0]) == self.first_pixel else 4)


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
        for classifier in (lambda x: np.zeros((len(x), 3 if x[0, 0, 0, 0] == image[0, 0, 0] else 4)),
                           torch_classes_by_first_pixel(float(image[0, 0, 0]))):
            with pytest.raises(ValueError, match="4 classes for a batch after 3"):  # numpy's shape error, a cat error
                explainer.explain_instance(image, classifier, num_samples=20, batch_size=5)
        with pytest.raises(ValueError, match="segmentation must return"):
            explainer.explain_instance(image, self.clf, segmentation_fn=lambda im: np.zeros((3, 3), int), num_samples=10)
        with pytest.raises(ValueError, match="NaN or infinite labels"):
            explainer.explain_instance(image, self.clf, segmentation_fn=lambda im: np.full(im.shape[:2], np.nan), num_samples=10)
        with pytest.raises(ValueError, match="segmentation must return labels"):
            explainer.explain_instance(image, self.clf, segmentation_fn=lambda im: np.full(im.shape[:2], "a"), num_samples=10)
        with pytest.raises(ValueError, match="feature_selection"):
            ours.LimeImageExplainer(feature_selection="best")
        for kwargs, error, match in [({"labels": (1.5,), "top_labels": None}, TypeError, "each label must be an integer"),
                                     ({"labels": [], "top_labels": None}, ValueError, "non-empty sequence"),
                                     ({"num_features": 0}, ValueError, "num_features"),
                                     ({"top_labels": 2.5}, TypeError, "top_labels")]:
            with pytest.raises(error, match=match):
                explainer.explain_instance(image, self.clf, num_samples=10, **kwargs)

    @pytest.mark.parametrize("num_features", [3, 8])  # forward selection, and the highest weights
    def test_bad_kernel_weights(self, num_features):
        # forward selection met them first and failed with an IndexError
        image = photo("coffee", 32)
        for kwargs, match in [({"kernel_width": 0.0}, "weighs every sample 0"),  # lime's kernel: exp(-d² / 0)
                              ({"kernel": lambda d, kernel_width: np.full_like(d, np.nan)}, "NaN"),
                              ({"kernel": lambda d, kernel_width: np.ones(3)}, "one weight per sample")]:
            explainer = ours.LimeImageExplainer(random_state=0, **kwargs)
            with pytest.raises(ValueError, match=match):
                explainer.explain_instance(image, self.clf, num_samples=10, num_features=num_features)

    def test_callers_image_untouched(self):
        image = photo("astronaut", 32).copy()
        before = image.copy()
        ours.LimeImageExplainer(random_state=0).explain_instance(image, self.clf, num_samples=20, hide_color=0)
        ours.LimeImageExplainer(random_state=0).explain_instance(image, PooledLinear(), num_samples=20)
        np.testing.assert_array_equal(image, before)


class TestOps:
    def test_meta_tensors_are_refused_by_name(self):
        # segment_mean named them; masked_pgd_step and lime_fit failed in .item()
        x = torch.zeros(1, 1, 2, 2, device="meta")
        for call, name in ((lambda: ops.masked_pgd_step(x, x, x, step_size=0.1, eps=0.1), "x_adv"),
                           (lambda: ops.lime_fit(torch.ones(1, 3, 2, dtype=torch.bool, device="meta"),
                                                 torch.zeros(1, 3, 1, device="meta")), "targets"),
                           (lambda: ops.segment_mean(x, torch.zeros(1, 2, 2, dtype=torch.long, device="meta"), 1), "images")):
            with pytest.raises(ValueError, match=f"{name} is on the meta device"):
                call()

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

    @pytest.mark.parametrize("backend", backends.BACKENDS)
    def test_a_uint8_output_holds_uint8_images_only(self, backend):
        """A float or normalized value outside 0..255 would wrap around in a uint8 cast: every
        backend refuses that output, and writes nothing into out."""
        skip_unless_on_cpu("perturb", backend)
        images, segments, _ = grid_batch()
        masks = torch.ones(2, 5, 4, dtype=torch.bool)
        norm = {"mean": torch.full((3,), 0.5), "std": torch.full((3,), 0.25)}
        pixels = (images * 255).to(torch.uint8)
        for imgs, kwargs, got in [(images, {}, "got torch.float32 images"),
                                  (pixels, norm, "got torch.uint8 images with mean/std")]:
            fudge = torch.zeros_like(imgs)
            with pytest.raises(TypeError, match="a uint8 output needs uint8 images and no mean/std.*" + got):
                ops.perturb(imgs, segments, masks, fudge, out_dtype=torch.uint8, backend=backend, **kwargs)
            out = torch.full((10, 3, 8, 8), 7, dtype=torch.uint8)
            with pytest.raises(TypeError, match="a uint8 output needs uint8 images"):
                ops.perturb(imgs, segments, masks, fudge, out=out, backend=backend, **kwargs)
            assert (out == 7).all()
            if backend in ("cpp", "triton"):  # the op's own contract, called directly
                op = getattr(torch.ops.attrefine_fast, "perturb" if backend == "cpp" else "perturb_triton")
                mean, std = kwargs.get("mean"), kwargs.get("std")
                with pytest.raises(TypeError, match="a uint8 output needs uint8 images"):
                    op(imgs, segments, masks, fudge, 0, 5, mean, std, torch.uint8, False)
        assert torch.equal(ops.perturb(pixels, segments, masks, torch.zeros_like(pixels), out_dtype=torch.uint8, backend=backend),
                           pixels.repeat_interleave(5, 0))

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
        with pytest.raises(ValueError, match="alpha must be finite"):
            ops.lime_fit(masks, targets, alpha=float("inf"))
        for empty in ((masks[:0], targets[:0]), (masks[:, :, :0], targets), (masks, targets[:, :, :0])):
            with pytest.raises(ValueError, match="non-empty"):
                ops.lime_fit(*empty, backend="torch")
        with pytest.raises(ValueError, match="binary"):
            ops.lime_fit(masks.double() * 0.5, targets)
        with pytest.raises(ValueError, match="binary"):
            ops.lime_fit(torch.full((2, 6, 3), float("nan")), targets)
        assert torch.equal(ops.lime_fit(masks.double(), targets)[0], ops.lime_fit(masks, targets)[0])

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
        with pytest.raises(TypeError, match="num_segments must be an integer"):
            ops.segment_mean(images, segments, 20.5)

    @pytest.mark.parametrize("backend", ["torch", "cpp"])
    def test_masked_pgd_step_refuses_what_it_would_write_wrong(self, backend):
        skip_unless_on_cpu("masked_pgd_step", backend)
        x, g = torch.rand(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
        nan_weight, nan_x = torch.ones(2, 8, 8), x.clone()
        nan_weight[0, 1, 2] = nan_x[1, 0, 3, 3] = float("nan")
        x_adv = x.clone()
        shared = torch.rand(3, 3, 8, 8)  # x_adv and an input one image apart in one buffer
        for args, kwargs, error, match in [
            ((x_adv, x, g, nan_weight), {}, ValueError, "weight must lie in"),
            ((x_adv, nan_x, g), {}, ValueError, "x contains NaN"),
            ((x_adv, x, g), {"step_size": float("inf"), "norm": "l2"}, ValueError, "step_size must be finite"),
            ((x_adv, x, g), {"eps": "0.1"}, TypeError, "eps must be a real number"),
            ((x_adv, x, g), {"eps": torch.tensor(0.1)}, TypeError, "eps must be a real number"),
            ((x_adv, x, g), {"eps": -0.1}, ValueError, "eps must be >= 0"),
            ((x_adv, x, g), {"lo": None}, TypeError, "lo must be a real number"),
            ((x_adv, x, g), {"hi": float("nan")}, ValueError, "hi must be a number"),
            ((x.clone().requires_grad_(), x, g), {}, ValueError, "requires grad"),
            ((x[:1].expand(2, -1, -1, -1), x, g), {}, ValueError, "overlapping"),
            ((shared[:2], shared[1:], g), {}, ValueError, "x_adv shares some of its memory with x"),
            ((shared[:2], x, shared[1:].transpose(2, 3)), {}, ValueError, "shares some of its memory with grad"),
            ((shared[:2], x, g, shared.view(-1)[192:320].view(2, 8, 8)), {}, ValueError, "shares some of its memory with weight"),
        ]:
            before = args[0].detach().clone()
            with pytest.raises(error, match=match):
                ops.masked_pgd_step(*args, **{"step_size": 0.1, "eps": 0.1, **kwargs}, backend=backend)
            assert torch.equal(args[0].detach(), before), match

    @pytest.mark.parametrize("backend", ["torch", "cpp"])
    @pytest.mark.parametrize("norm", ["linf", "l2"])
    def test_masked_pgd_step_takes_inputs_that_share_memory_without_overlap(self, backend, norm):
        # x_adv as x itself, or beside x and grad in one buffer: as torch's in-place ops take them
        skip_unless_on_cpu("masked_pgd_step", backend)
        gen = torch.Generator().manual_seed(3)
        buffer = torch.rand(6, 3, 8, 8, generator=gen)
        x_adv, x, grad = buffer[:2], buffer[2:4], buffer[4:].sub_(0.5)
        want = ops.masked_pgd_step(x_adv.clone(), x.clone(), grad.clone(), step_size=0.1, eps=0.05, norm=norm, backend="torch")
        torch.testing.assert_close(ops.masked_pgd_step(x_adv, x, grad, step_size=0.1, eps=0.05, norm=norm, backend=backend), want)
        same = x.clone()
        want = ops.masked_pgd_step(same.clone(), same.clone(), grad, step_size=0.1, eps=0.05, norm=norm, backend="torch")
        torch.testing.assert_close(ops.masked_pgd_step(same, same, grad, step_size=0.1, eps=0.05, norm=norm, backend=backend), want)

    def test_integer_arguments_are_not_truncated(self):
        images, segments, _ = grid_batch()
        masks, fudge = torch.ones(2, 5, 4, dtype=torch.bool), torch.zeros_like(images)
        with pytest.raises(TypeError, match="offset must be an integer"):
            ops.perturb(images, segments, masks, fudge, 1.5, 2)
        with pytest.raises(TypeError, match="count must be an integer"):
            ops.perturb(images, segments, masks, fudge, 1, 2.7)
        with pytest.raises(TypeError, match="offset must be an integer"):
            ops.perturb(images, segments, masks, fudge, True, 2)

    def test_a_stray_huge_segment_id_is_refused_without_allocating_for_it(self):
        images, segments, _ = grid_batch()
        segments[0, 0, 0] = 10**12
        with pytest.raises(ValueError, match="only 64 pixels"):
            ops.segment_mean(images, segments)


def test_unavailable_backend_names_reason_and_fix():
    with pytest.raises(backends.BackendUnavailable, match="cuda backend runs on CUDA tensors"):
        ops.lime_fit(torch.ones(1, 4, 2, dtype=torch.bool), torch.rand(1, 4, 1), backend="cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        ops.lime_fit(torch.ones(1, 4, 2, dtype=torch.bool), torch.rand(1, 4, 1), backend="opencl")


@pytest.mark.parametrize("missing, advice", [
    ("triton", "pip install triton"),
    ("attrefine_fast.kernels", "install the package with `pip install --no-build-isolation -e .`"),
    ("numpy.somewhere", "failed to load: ModuleNotFoundError"),
])
def test_a_missing_module_behind_the_triton_backend_is_named(monkeypatch, missing, advice):
    def missing_module(name):
        raise ModuleNotFoundError(f"No module named {missing!r}", name=missing)

    monkeypatch.setattr(backends, "_triton_load_error", "")
    monkeypatch.setattr(backends, "_module", missing_module)
    available, why = backends.status("perturb", "triton", "cpu")
    assert not available and advice in why


def test_triton_kernels_failing_to_load_leave_the_other_backends_usable(monkeypatch):
    # e.g. a Triton or torch release the kernels do not support: the reason, not a crash of every op
    calls = []

    def broken(name):
        calls.append(name)
        raise ValueError("unsupported annotation")

    monkeypatch.setattr(backends, "_triton_load_error", "")
    monkeypatch.setattr(backends, "_module", broken)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    pytest.importorskip("triton")
    available, why = backends.status("perturb", "triton", "cpu")
    assert not available and "failed to load" in why and "ValueError: unsupported annotation" in why
    with pytest.raises(backends.BackendUnavailable, match="unsupported annotation"):
        backends.resolve("lime_fit", "triton", "cpu")
    assert calls == ["attrefine_fast.kernels"]  # imported once; the reason is kept
    assert backends.status("perturb", "torch", "cpu")[0]


def test_info_lists_every_op_and_backend():
    from attrefine_fast.info import report

    text = report()
    for name in backends.OPS + backends.BACKENDS:
        assert name in text


def test_a_reader_that_leaves_early_is_no_error_of_the_command():
    # `attrefine-fast info | head -1`: the pipe is closed before the command writes (its imports
    # take a moment), which gave a "Broken pipe" error line
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # output held until the end, as usual
    proc = subprocess.Popen([sys.executable, "-m", "attrefine_fast", "info"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env)
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and b"error" not in err and b"Traceback" not in err, err


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



def test_datasets_segmentation_models_and_predict_refuse_bad_arguments():
    from attrefine_fast.attacks import predict
    from attrefine_fast.data import ImageDataset
    from attrefine_fast.evaluate import accuracy
    from attrefine_fast.models import Normalize

    x = torch.rand(4, 3, 8, 8)
    with pytest.raises(TypeError, match="labels must have an integer dtype"):
        ImageDataset(x, torch.tensor([0.5, 1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="labels must be >= 0"):
        ImageDataset(x, torch.tensor([0, -1, 2, 3]))
    with pytest.raises(ValueError, match="2 classes named"):
        ImageDataset(x, torch.tensor([0, 1, 2, 1]), classes=["a", "b"])
    model = SmallCNN(num_classes=4, width=4)
    with pytest.raises(ValueError, match="model's 4 outputs"):
        accuracy(model, (x, torch.tensor([0, 1, 2, 9])))
    with pytest.raises(ValueError, match="batch_size"):
        predict(model, x, batch_size=0)
    with pytest.raises(ValueError, match="std must be positive and finite"):
        Normalize([0.5] * 3, [1.0, float("inf"), 1.0])
    for kwargs, match in [({"grid": (-2, 3)}, "grid"), ({"n_segments": -4}, "n_segments"), ({"grid": (2,)}, "grid")]:
        with pytest.raises(ValueError, match=match):
            af.segment(x, "grid", **kwargs)
    with pytest.raises(ValueError, match="n_segments"):
        af.segment(x, "slic", n_segments=0)
    # half-precision images segment as their float32 values do
    for half in (torch.float16, torch.bfloat16):
        y = x.to(half)
        assert torch.equal(af.segment(y, "slic", n_segments=6)[0], af.segment(y.float(), "slic", n_segments=6)[0])


def test_attacks_and_corruptions_refuse_arguments_of_the_wrong_kind():
    from attrefine_fast.attacks import pgd
    from attrefine_fast.corruptions import corrupt
    from attrefine_fast.evaluate import corruption_accuracy

    x, y = torch.rand(2, 3, 8, 8), torch.tensor([0, 1])
    with pytest.raises(TypeError, match="torch.nn.Module"):
        pgd(lambda images: images.mean(dim=(2, 3)), x, y)
    with pytest.raises(ValueError, match="severity must be an integer"):
        corrupt(x, "contrast", 3.0)
    model = SmallCNN(num_classes=4, width=4)
    with pytest.raises(TypeError, match="sequence of names"):
        corruption_accuracy(model, (x, y), corruptions="contrast")
    with pytest.raises(TypeError, match="sequence of severities"):
        corruption_accuracy(model, (x, y), corruptions=["contrast"], severities=1)


@pytest.mark.parametrize("backend", backends.BACKENDS)
def test_public_ops_give_outputs_without_grad_on_every_backend(backend):
    """The ops are not differentiable: inputs that require grad give outputs that do not, on the
    reference as on the compiled and Triton kernels (which the dispatcher keeps out of autograd)."""
    skip_unless_on_cpu("lime_fit", backend)
    images, segments, counts = grid_batch()
    images.requires_grad_()
    masks = torch.rand(2, 6, 4) > 0.5
    masks[:, 0] = True
    targets = torch.rand(2, 6, 3, requires_grad=True)
    outputs = [ops.segment_mean(images, segments, backend=backend), *ops.lime_fit(masks, targets, counts, backend=backend),
               ops.perturb(images, segments, masks, torch.zeros_like(images), 0, 3, backend=backend)]
    x_adv = images.detach().clone()
    outputs.append(ops.masked_pgd_step(x_adv, images, torch.randn(2, 3, 8, 8, requires_grad=True), step_size=0.1, eps=0.1,
                                       backend=backend))
    assert [t.requires_grad for t in outputs] == [False] * len(outputs)
