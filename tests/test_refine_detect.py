"""Detection of spurious superpixels, masking, and masked adversarial examples."""
import pytest
import torch

from attrefine_fast.models import SmallCNN
from attrefine_fast.refine import detect_spurious, flag_superpixels, mask_images
from attrefine_fast.refine.detect import flags_to_pixels, gradient_share, input_gradient, normalized_relevance
from attrefine_fast.refine.loss import adversarial_examples
from attrefine_fast.segmentation import segment

from refine_helpers import digits_subset, one_thread  # noqa: F401


@pytest.fixture(scope="module")
def batch():
    ds = digits_subset(12)
    x, y = ds.tensors()
    seg, counts = segment(x, "slic", n_segments=25, compactness=10.0)
    torch.manual_seed(0)
    model = SmallCNN(10, width=8).eval()
    return model, x, y, seg, counts


def test_flags_by_hand():
    relevance = torch.tensor([[0.5, -0.2, 0.01, 0.29, 0.0], [0.1, 0.1, 0.8, 0.0, 0.0]])
    sensitivity = torch.tensor([[0.1, 0.5, 0.3, 0.1, 0.0], [0.9, 0.05, 0.05, 0.0, 0.0]])
    instability = torch.tensor([[0.0, 0.0, 0.0, 0.3, 0.9], [0.0, 0.0, 0.0, 0.0, 0.9]])
    counts = torch.tensor([5, 3])
    flags = flag_superpixels(relevance, sensitivity, instability, counts, tau=0.02, eps_s=0.2, delta=0.25)
    # image 0: j=1 (negative relevance, sensitive), j=2 (small relevance, sensitive), j=3 and 4 (unstable)
    # image 1: nothing passes on its 3 real superpixels; column 4 is padding and is never flagged
    assert flags.tolist() == [[False, True, True, True, True], [False, False, False, False, False]]
    capped = flag_superpixels(relevance, sensitivity, instability, counts, tau=0.02, eps_s=0.2, delta=0.25, max_flagged_fraction=0.4)
    assert capped.tolist()[0] == [False, True, True, False, False]  # the 2 most sensitive of the 4


@pytest.mark.parametrize("options", [
    {"instability": "adversarial"}, {"instability": "adversarial", "attack_steps": 2},
    {"instability": "runs", "instability_runs": 2}, {"instability": "none", "explain_label": "predicted"},
])
def test_flags_empty_when_nothing_passes(batch, options):
    model, x, y, seg, counts = batch
    det = detect_spurious(model, x, y, seg, counts, num_samples=24, tau=-2.0, eps_s=1.5, delta=3.0, seed=0, **options)
    if options["instability"] == "none":
        assert not det.instability.any()
    else:
        assert det.instability.max() > 0  # two different LIME fits: the scores did move
    assert det.flags.shape == (len(x), int(counts.max()))
    assert not det.flags.any()
    assert det.pixel_mask().sum() == 0
    # and some flags with permissive thresholds, on real superpixels only
    det = detect_spurious(model, x, y, seg, counts, num_samples=24, tau=2.0, eps_s=-1.0, delta=3.0, max_flagged_fraction=1.0, seed=0)
    valid = torch.arange(det.flags.shape[1]) < counts.unsqueeze(1)
    assert torch.equal(det.flags, valid)


def test_predicted_label_mode_measures_the_predicted_class_throughout(batch):
    # Explanation, sensitivity and attack all follow the explained class: with wrong labels,
    # "predicted" detects exactly what "true" detects when the true labels are the predictions.
    model, x, y, seg, counts = batch
    with torch.no_grad():
        predicted = model(x).argmax(1)
    wrong = (predicted + 1) % 10
    options = dict(num_samples=24, seed=3, attack_steps=2, eps=0.1)
    by_prediction = detect_spurious(model, x, wrong, seg, counts, explain_label="predicted", **options)
    by_label = detect_spurious(model, x, predicted, seg, counts, explain_label="true", **options)
    for field in ("relevance", "sensitivity", "instability", "flags"):
        torch.testing.assert_close(getattr(by_prediction, field), getattr(by_label, field), atol=0, rtol=0)


def test_scores_are_normalized(batch):
    model, x, y, seg, counts = batch
    share = gradient_share(input_gradient(model, x, y), seg, counts)
    torch.testing.assert_close(share.sum(1), torch.ones(len(x)))
    coef = torch.randn(len(x), int(counts.max()))
    r = normalized_relevance(coef, counts)
    valid = torch.arange(coef.shape[1]) < counts.unsqueeze(1)
    torch.testing.assert_close(r.abs().sum(1), torch.ones(len(x)))
    assert (r[~valid] == 0).all()


@pytest.mark.parametrize("fill", ["mean", "zero", "blur", "noise"])
def test_mask_images_changes_only_flagged_pixels(batch, fill):
    _, x, _, seg, counts = batch
    flags = torch.zeros(len(x), int(counts.max()), dtype=torch.bool)
    flags[:, 1] = True
    pixel = flags_to_pixels(flags, seg)
    before = x.clone()
    out = mask_images(x, pixel, fill, segments=seg, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, before)
    keep = (pixel == 0).unsqueeze(1).expand_as(x)
    assert torch.equal(out[keep], x[keep])
    if fill == "mean":
        for b in range(len(x)):
            region = seg[b] == 1
            expected = x[b][:, region].mean(dim=1)
            torch.testing.assert_close(out[b][:, region], expected[:, None].expand(-1, int(region.sum())))


def test_masked_pgd_never_changes_unflagged_pixels(batch):
    model, x, y, seg, counts = batch
    flags = torch.rand(len(x), int(counts.max())) < 0.3
    pixel = flags_to_pixels(flags, seg)
    adv = adversarial_examples(model, x, y, pixel, region="flagged", eps=0.2, steps=5, step_size=0.08, norm="linf",
                               generator=torch.Generator().manual_seed(0))
    outside = (pixel == 0).unsqueeze(1).expand_as(x)
    assert torch.equal(adv[outside], x[outside])
    assert (adv - x).abs().max() <= 0.2 + 1e-6
    assert (adv[~outside] != x[~outside]).any()  # the flagged region did move


def test_bad_inputs_raise_clear_errors(batch):
    from attrefine_fast.refine import attribution_bound, empirical_min_eps

    model, x, y, seg, counts = batch
    with pytest.raises(ValueError, match="segments"):
        detect_spurious(model, x, y, seg[:, :5], counts)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        detect_spurious(model, x * 3, y, seg, counts)
    with pytest.raises(ValueError, match="counts must hold each image's number of segments"):
        detect_spurious(model, x, y, seg, counts + 1)

    def never(images):
        raise AssertionError("the options are checked before the model runs")

    for kwargs, error, match in [({"instability": "dropout"}, ValueError, "instability"),
                                 ({"instability": "runs", "instability_runs": 1}, ValueError, "instability_runs"),
                                 ({"attack_steps": 1.5}, TypeError, "attack_steps"),
                                 ({"tau": float("nan")}, ValueError, "tau"),
                                 ({"max_flagged_fraction": 2.0}, ValueError, "max_flagged_fraction")]:
        with pytest.raises(error, match=match):
            detect_spurious(never, x, y, seg, counts, **kwargs)
    with pytest.raises(ValueError, match="fill"):
        mask_images(x, torch.zeros(len(x), 32, 32), "sponge")
    with pytest.raises(ValueError, match="pixel_mask"):
        mask_images(x, torch.zeros(len(x), 31, 32), "zero")
    with pytest.raises(ValueError, match="pixel_mask"):
        attribution_bound(model, x, y, torch.zeros(2, 32, 32))
    with pytest.raises(ValueError, match="eps_max"):
        empirical_min_eps(model, x, y, eps_max=0.0)


def test_bad_values_and_labels_are_refused_rather_than_computed_with(batch):
    # each went through: a NaN or out-of-range mask (a NaN made the estimate inf), float segments
    # (truncated), a label beyond the model's outputs (read as misclassified by empirical_min_eps)
    from attrefine_fast.refine import FlagStore, attribution_bound, empirical_min_eps

    model, x, y, seg, counts = batch
    nan_mask = torch.zeros(len(x), 32, 32)
    nan_mask[0, 0, 0] = float("nan")
    for mask, match in ((nan_mask, "NaN"), (torch.full((len(x), 32, 32), 2.0), r"\[0, 1\]")):
        with pytest.raises(ValueError, match=match):
            mask_images(x, mask, "zero")
        with pytest.raises(ValueError, match=match):
            attribution_bound(model, x, y, mask)
    with pytest.raises(ValueError, match="NaN"):
        mask_images(x * float("nan"), torch.zeros(len(x), 32, 32), "zero")
    with pytest.raises(TypeError, match="integer labels"):
        detect_spurious(model, x, y, seg + 0.7, counts)
    beyond = y.clone()
    beyond[0] = 10
    with pytest.raises(ValueError, match="num_classes = 10"):
        empirical_min_eps(model, x, beyond, eps_max=0.1, iterations=1)
    with pytest.raises(ValueError, match="num_classes = 10"):
        attribution_bound(model, x, beyond, torch.zeros(len(x), 32, 32))
    with pytest.raises(ValueError, match="counts must hold each image's number of segments"):
        FlagStore(seg, counts + 1)


def test_the_flag_cap_keeps_the_whole_share_it_allows():
    # 100 * 0.29 = 28.999999999999996: 29 passing superpixels of 100 are within a 29% cap
    m = 100
    sensitivity = torch.linspace(0.5, 0.9, m).unsqueeze(0)
    relevance = torch.zeros(1, m)
    instability = torch.zeros(1, m)
    instability[0, :29] = 1.0
    flags = flag_superpixels(relevance, sensitivity, instability, torch.tensor([m]), tau=-1.0, eps_s=2.0, delta=0.5,
                             max_flagged_fraction=0.29)
    assert int(flags.sum()) == 29


def test_the_flag_store_holds_more_labels_than_int16():
    from attrefine_fast.refine import FlagStore

    seg = torch.arange(40000).view(1, 200, 200)
    store = FlagStore(seg, torch.tensor([40000]))
    assert store.segments.max() == 39999 and store.segments.min() == 0
