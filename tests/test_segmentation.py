import numpy as np
import pytest
import torch

from attrefine_fast import segment
from attrefine_fast.segmentation import grid_segments, relabel
from lime_helpers import photo


def assert_labels_0_to_m(segments, counts):
    for s, m in zip(segments, counts):
        assert torch.equal(torch.unique(s), torch.arange(int(m)))


@pytest.mark.parametrize("method,params", [("quickshift", {}), ("slic", {"n_segments": 30}), ("felzenszwalb", {"scale": 50}), ("grid", {"n_segments": 16})])
def test_methods_give_labels_0_to_m_minus_1(method, params):
    images = np.stack([photo("astronaut", 48), photo("coffee", 48)])
    segments, counts = segment(images, method, **params)
    assert segments.shape == (2, 48, 48) and segments.dtype == torch.int64
    assert_labels_0_to_m(segments, counts)


def test_quickshift_default_is_limes_segmentation():
    from lime.wrappers.scikit_image import SegmentationAlgorithm

    image = photo("chelsea", 64)
    lime_seg = SegmentationAlgorithm("quickshift", kernel_size=4, max_dist=200, ratio=0.2, random_seed=3)(image)
    segments, _ = segment(image)
    np.testing.assert_array_equal(segments[0].numpy(), lime_seg)


def test_slic_starts_at_zero_and_tensor_input_matches_array_input():
    image = photo("rocket", 40)
    tensor = torch.from_numpy(image.copy()).permute(2, 0, 1).unsqueeze(0)
    a, _ = segment(tensor, "slic", n_segments=12)
    b, _ = segment(image, "slic", n_segments=12)
    assert torch.equal(a, b) and int(a.min()) == 0


def test_threads_give_the_same_result():
    images = torch.rand(4, 3, 20, 20)
    a, ca = segment(images, "felzenszwalb", n_jobs=1)
    b, cb = segment(images, "felzenszwalb", n_jobs=4)
    assert torch.equal(a, b) and torch.equal(ca, cb)


def test_grid_and_relabel():
    g = grid_segments(7, 5, grid=(3, 2))
    assert g.shape == (7, 5) and g.max() == 5 and set(np.unique(g)) == set(range(6))
    labels, m = relabel(np.array([[5, 9], [9, 2]]))
    assert m == 3 and labels.tolist() == [[1, 2], [2, 0]]
    single, counts = segment(torch.rand(1, 1, 1, 1), "grid")
    assert counts.tolist() == [1]


def test_grayscale_and_bad_input():
    segments, counts = segment(torch.rand(2, 1, 16, 16), "quickshift", kernel_size=2)
    assert_labels_0_to_m(segments, counts)
    with pytest.raises(ValueError, match="method"):
        segment(torch.rand(1, 3, 8, 8), "watershed")
    with pytest.raises(ValueError, match="NaN"):
        segment(torch.full((1, 3, 8, 8), float("nan")))
    with pytest.raises(ValueError, match="shape"):
        segment(torch.rand(3, 8))


def test_parameters_segment_sets_itself_and_thread_counts_are_checked():
    image = torch.rand(1, 3, 16, 16)
    for method, params in (("slic", {"channel_axis": -1}), ("felzenszwalb", {"channel_axis": -1}), ("quickshift", {"return_tree": True})):
        with pytest.raises(ValueError, match="segment\\(\\) sets"):
            segment(image, method, **params)
    for n_jobs, error in ((0, ValueError), (2.5, TypeError), ("2", TypeError)):
        with pytest.raises(error, match="n_jobs"):
            segment(image, "grid", n_jobs=n_jobs)
    assert torch.equal(segment(image, "slic", n_jobs=-1)[0], segment(image, "slic", n_jobs=1)[0])  # -1: every CPU


def test_quickshift_on_floats_past_1_warns_of_its_finer_segments():
    # scikit-image scales uint8 to [0, 1] for the Lab conversion and takes floats as they are
    image = np.asarray(photo("astronaut", 64), dtype=np.float64)
    with pytest.warns(UserWarning, match="far finer segments"):
        _, fine = segment(image)
    _, scaled = segment(image / 255)
    assert int(fine[0]) > int(scaled[0])


def test_grayscale_quickshift_without_lab_takes_the_one_channel_as_scikit_image_does():
    # RGB copies are for the Lab conversion (lime's gray2rgb); without it they scaled the colour
    # distances by sqrt(3)
    from skimage.segmentation import quickshift

    image = np.random.RandomState(0).rand(24, 24, 1)
    ours, _ = segment(image, "quickshift", convert2lab=False, kernel_size=2)
    want = relabel(quickshift(image, convert2lab=False, kernel_size=2, max_dist=200, ratio=0.2))[0]
    assert np.array_equal(ours[0].numpy(), want)
