"""The batched tensor API: shapes, options, invariances and the model's state."""
import pytest
import torch

import attrefine_fast as af
from attrefine_fast import backends
from attrefine_fast.models import SmallCNN
from attrefine_fast.neighborhood import draw_masks, fudge_images
from conftest import DEVICES


def batch(device="cpu", b=3, size=24):
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(b, 3, size, size, generator=gen).to(device)
    segments, counts = af.segment(images, "grid", n_segments=9)
    segments[1] = torch.div(segments[1], 3, rounding_mode="floor")  # fewer segments in image 1
    counts[1] = 3
    return images, segments.to(device), counts


@pytest.mark.parametrize("device", DEVICES)
def test_shapes_padding_and_heatmap(device):
    torch.manual_seed(0)
    model = SmallCNN(num_classes=6, width=8).to(device)
    images, segments, counts = batch(device)
    exp = af.explain(model, images, segments=segments, num_samples=64, top_labels=3, seed=1)
    assert exp.coef.shape == (3, 3, 9) and exp.labels.shape == (3, 3)
    for t in (exp.intercept, exp.score, exp.local_pred):
        assert t.shape == (3, 3) and not t.requires_grad
    assert torch.all(exp.coef[1, :, 3:] == 0)
    heat = exp.heatmap()
    assert heat.shape == (3, 3, 24, 24)
    assert torch.equal(heat[2, 1], exp.coef[2, 1][segments[2]])
    # labels are the most probable classes, most probable first
    with torch.no_grad():
        probs = model.eval()(images).softmax(1)
    assert torch.equal(exp.labels, probs.argsort(1, descending=True)[:, :3])


def test_chunking_and_backend_do_not_change_the_result():
    model = SmallCNN(num_classes=4, width=8)
    images, segments, _ = batch()
    a = af.explain(model, images, segments=segments, num_samples=50, seed=3, batch_size=7)
    b = af.explain(model, images, segments=segments, num_samples=50, seed=3, batch_size=1000, backend="torch")
    torch.testing.assert_close(a.coef, b.coef, atol=1e-6, rtol=1e-5)
    c = af.explain(model, images, segments=segments, num_samples=50, seed=4)
    assert not torch.allclose(a.coef, c.coef)


def test_model_state_and_inputs_untouched():
    model = SmallCNN(num_classes=4, width=8).train()
    model.features[1].eval()  # a mixed-mode model keeps its per-module modes
    running = model.features[1].running_mean.clone()
    images, segments, _ = batch()
    before_images, before_segments = images.clone(), segments.clone()
    af.explain(model, images, segments=segments, num_samples=20)
    assert model.training and not model.features[1].training
    assert torch.equal(model.features[1].running_mean, running)
    assert torch.equal(images, before_images) and torch.equal(segments, before_segments)


def test_normalization_channels_last_and_amp():
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    model = SmallCNN(num_classes=5, width=8).eval()

    class Normalized(torch.nn.Module):
        def forward(self, x):
            return model((x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))

    images, segments, _ = batch()
    a = af.explain(model, images, segments=segments, num_samples=40, seed=0, mean=mean, std=std, channels_last=True)
    b = af.explain(Normalized(), images, segments=segments, num_samples=40, seed=0)
    torch.testing.assert_close(a.coef, b.coef, atol=1e-5, rtol=1e-4)
    c = af.explain(model, images, segments=segments, num_samples=40, seed=0, amp=True, labels=a.labels)
    assert torch.isfinite(c.coef).all()


def test_given_labels_hide_color_and_fit_dtype():
    model = SmallCNN(num_classes=5, width=8)
    images, segments, _ = batch()
    exp = af.explain(model, images, segments=segments, labels=[4, 0], num_samples=30, hide_color=0.0, fit_dtype=torch.float32)
    assert exp.labels.tolist() == [[4, 0]] * 3 and exp.coef.dtype == torch.float32
    lime_view = exp.to_lime(0)
    assert set(lime_view.local_exp) == {4, 0}
    assert lime_view.score == pytest.approx(float(exp.score[0, 1]))  # lime keeps the last label's score
    assert not hasattr(lime_view, "top_labels")


def test_given_masks_may_pad_with_zeros_and_a_float64_model_is_fitted_in_float64():
    model = SmallCNN(num_classes=4, width=8).eval()
    images, segments, counts = batch()
    masks = draw_masks(counts, 40, 0, "cpu")
    padded = masks.clone()
    padded[1, :, 3:] = False  # image 1 has 3 segments: its columns 3..8 are padding
    a = af.explain(model, images, segments=segments, masks=masks, top_labels=2)
    b = af.explain(model, images, segments=segments, masks=padded, top_labels=2)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.coef, b.coef)
    bad = masks.clone()
    bad[1, 0, 2] = False  # a real segment off in the image's own row
    with pytest.raises(ValueError, match="must be all ones"):
        af.explain(model, images, segments=segments, masks=bad, top_labels=2)
    with pytest.raises(ValueError, match="0 and 1 only"):
        af.explain(model, images, segments=segments, masks=masks.to(torch.uint8) * 2, top_labels=2)
    # A float64 model's outputs reach the float64 fit unrounded: on 1000 + a linear signal,
    # rounding them to float32 (steps of 6e-5) would swamp coefficients of about 0.01.
    exp = af.explain(lambda x: 1000 + x.double().mean(dim=(2, 3)), images, segments=segments, num_samples=60,
                     output="identity", labels=[0], hide_color=0.0, alpha=1e-9)
    hw = images.shape[2] * images.shape[3]
    for i in range(3):
        share = torch.zeros(9, dtype=torch.float64).index_add_(0, segments[i].flatten(), images[i, 0].flatten().double()) / hw
        torch.testing.assert_close(exp.coef[i, 0, : int(counts[i])], share[: int(counts[i])], atol=1e-9, rtol=0)


def test_segments_computed_when_not_given():
    model = SmallCNN(num_classes=3, width=8)
    images = torch.rand(2, 3, 32, 32)
    exp = af.explain(model, images, segmentation="slic", segmentation_params={"n_segments": 10}, num_samples=20, top_labels=1)
    assert exp.segments.shape == (2, 32, 32)
    assert torch.equal(exp.num_segments, exp.segments.flatten(1).max(1).values + 1)


def test_plain_callable_model():
    images, segments, counts = batch()
    exp = af.explain(lambda x: x.mean(dim=(2, 3)), images, segments=segments, num_samples=60, output="identity",
                     labels=[0], hide_color=0.0, alpha=1e-9)
    # with black replacements the mean of channel 0 is linear in the segment switches: an exact fit
    # whose coefficients are each segment's share of that mean
    assert torch.allclose(exp.score, torch.ones_like(exp.score), atol=1e-9)
    hw = images.shape[2] * images.shape[3]
    for i in range(3):
        share = torch.zeros(int(counts.max()), dtype=torch.float64).index_add_(0, segments[i].flatten(), images[i, 0].flatten().double()) / hw
        torch.testing.assert_close(exp.coef[i, 0, : int(counts[i])], share[: int(counts[i])], atol=1e-6, rtol=1e-5)


def test_perturbations_are_produced_in_bounded_chunks():
    """Peak memory does not grow with num_samples: the model only ever sees batch_size inputs."""
    seen = []

    def model(x):
        seen.append(x.shape[0])
        return x.mean(dim=(2, 3))

    images, segments, _ = batch(b=2)
    af.explain(model, images, segments=segments, num_samples=1001, batch_size=64, labels=[0])
    assert max(seen) <= 64 and sum(seen) == 2 * 1001


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_the_models_batches_share_one_buffer(backend):
    """Every batch is written into the same buffer (a fresh tensor per batch would cost more in
    page faults than writing it), including the last, shorter one; each batch still holds its own
    samples when the model sees it."""
    if backend == "cpp" and not backends.status("perturb_into", "cpp", "cpu")[0]:
        pytest.skip("compiled extension not loaded")
    images, segments, _ = batch(b=2)
    masks = draw_masks(torch.tensor([9, 3]), 23, seed=5)
    fudge = fudge_images(images, segments, 9)
    pointers, batches = [], []

    def model(x):
        pointers.append(x.data_ptr())
        batches.append(x.clone())
        return x.mean(dim=(2, 3))

    af.explain(model, images, segments=segments, masks=masks, batch_size=10, labels=[0], backend=backend)
    assert len(set(pointers)) == 1 and len(batches) == 5
    for k, seen in enumerate(batches):
        count = seen.shape[0] // 2
        torch.testing.assert_close(seen, af.ops.perturb_ref(images, segments, masks, fudge, 5 * k, count), atol=0, rtol=0)


def test_the_default_forward_batch_is_small_on_the_cpu():
    """32 model inputs per forward pass on the CPU unless told (small batches stay in cache)."""
    from attrefine_fast.explain import DEFAULT_BATCH_SIZE

    rows = []

    def model(x):
        rows.append(x.shape[0])
        return x.mean(dim=(2, 3))

    images = torch.rand(2, 3, 8, 8)
    segments, _ = af.segment(images, "grid", n_segments=4)
    af.explain(model, images, segments=segments, num_samples=100, labels=[0])
    assert DEFAULT_BATCH_SIZE["cpu"] == 32 and max(rows) == 32 and sum(rows) == 200
    rows.clear()
    af.explain(model, images, segments=segments, num_samples=100, labels=[0], batch_size=100)
    assert max(rows) == 100


def test_a_batch_size_below_the_image_count_is_the_models_batch():
    seen = []

    def model(x):
        seen.append(x.shape[0])
        return x.mean(dim=(2, 3))

    images, segments, _ = batch(b=3)
    a = af.explain(model, images, segments=segments, num_samples=10, batch_size=2, labels=[0], seed=0)
    assert max(seen) <= 2 and sum(seen) == 3 * 10  # every chunk of 3 images went in 2 + 1
    b = af.explain(model, images, segments=segments, num_samples=10, batch_size=30, labels=[0], seed=0)
    torch.testing.assert_close(a.coef, b.coef, atol=1e-12, rtol=0)


def test_float64_images_are_normalized_in_float64():
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    model = SmallCNN(num_classes=5, width=8).double().eval()

    class Normalized(torch.nn.Module):
        def forward(self, x):
            m, s = (torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1) for v in (mean, std))
            return model((x - m) / s)

    images, segments, _ = batch()
    images = images.double()
    a = af.explain(model, images, segments=segments, num_samples=40, seed=0, mean=mean, std=std)
    b = af.explain(Normalized(), images, segments=segments, num_samples=40, seed=0)
    torch.testing.assert_close(a.coef, b.coef, atol=1e-12, rtol=0)  # mean and std rounded to float32: 6e-8


def test_tied_top_labels_are_chosen_as_lime_chooses_them():
    # lime takes the last k of numpy's argsort, whose order among equal values is numpy's (its
    # SIMD sorts are not stable); a stable descending sort took the lowest classes
    import numpy as np

    row = [0.2, 0.2, 0.2, 0.2, 0.1, 0.1]

    def model(x):
        return torch.tensor([row]).expand(x.shape[0], 6)

    images, segments, _ = batch(b=2)
    exp = af.explain(model, images, segments=segments, num_samples=10, top_labels=2, output="identity")
    limes = np.argsort(np.array(row, dtype=np.float32))[-2:][::-1].tolist()
    assert exp.labels.tolist() == [limes, limes] and exp.to_lime(0).top_labels == limes


def test_explain_refuses_what_would_fail_later_with_a_clear_error():
    model = SmallCNN(num_classes=4, width=4)
    images, segments, _ = batch(b=2)
    # lime_fit's checks, before any forward pass
    with pytest.raises(ValueError, match="kernel_width must lie in"):
        af.explain(model, images, segments=segments, num_samples=10, kernel_width=1e-200)
    no_image = torch.zeros(2, 6, 9, dtype=torch.bool)
    no_image[:, :, 0] = True  # one segment on in every sample: none is the image itself
    with pytest.raises(ValueError, match="kernel weight of 0"):
        af.explain(model, images, segments=segments, masks=no_image, labels=[0], kernel_width=1e-3)
    with pytest.raises(ValueError, match="on the meta device"):
        af.explain(model, images.to("meta"), segments=segments.to("meta"), num_samples=10)
    calls = []

    def changing(x):  # 5 classes, then 7
        calls.append(1)
        return x.mean(dim=(2, 3)).repeat(1, 3)[:, : 5 if len(calls) == 1 else 7]

    with pytest.raises(ValueError, match="7 classes for a batch after 5"):
        af.explain(changing, images, segments=segments, num_samples=10, batch_size=6, labels=[0])
    with pytest.raises(ValueError, match="convert2lab=False"):
        af.segment(torch.rand(1, 4, 16, 16), "quickshift")
    segments4, _ = af.segment(torch.rand(1, 4, 16, 16), "quickshift", convert2lab=False, kernel_size=2)
    assert segments4.shape == (1, 16, 16)
    # a seed numpy and lime would refuse (a float was truncated, a string parsed, 2**64 overflowed)
    for seed, error in ((1.5, TypeError), ("0", TypeError), (True, TypeError), (2**64, ValueError), (-(2**63) - 1, ValueError)):
        with pytest.raises(error, match="seed must be"):
            af.explain(model, images, segments=segments, num_samples=10, seed=seed, labels=[0])


def test_hide_colour_tensors_with_autograd_and_bfloat16_images():
    model = SmallCNN(num_classes=4, width=4)
    images, segments, _ = batch(b=2)
    grey = torch.full((3,), 0.5, requires_grad=True)
    a = af.explain(model, images, segments=segments, num_samples=10, seed=0, hide_color=grey, labels=[1])
    b = af.explain(model, images, segments=segments, num_samples=10, seed=0, hide_color=0.5, labels=[1])
    torch.testing.assert_close(a.coef, b.coef, atol=0, rtol=0)
    half = af.explain(model.bfloat16(), images.bfloat16(), segments=segments, num_samples=10, seed=0, labels=[1])
    assert half.to_lime(0).image.dtype.name == "float32"
