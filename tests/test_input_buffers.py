"""The kept CPU input buffer of explanations (attrefine_fast.input_buffers) and the streamed
writes of large perturbation outputs (csrc/cpu/perturb.cpp)."""
import threading

import pytest
import torch

from attrefine_fast import _extension
from attrefine_fast.input_buffers import lent_buffer, release_buffers
from attrefine_fast.ops import perturb_into_ref, perturb_ref
from op_cases import labels


def test_the_buffer_is_kept_between_calls_and_lent_once():
    release_buffers()
    with lent_buffer(8, (3, 4, 5), torch.float32, torch.device("cpu")) as first:
        ptr = first.data_ptr()
        with lent_buffer(8, (3, 4, 5), torch.float32, torch.device("cpu")) as second:  # lent already
            assert second.data_ptr() != ptr
    with lent_buffer(6, (3, 4, 5), torch.float32, torch.device("cpu")) as again:  # its leading rows
        assert again.data_ptr() == ptr and again.shape == (6, 3, 4, 5)
    with lent_buffer(6, (3, 4, 5), torch.float64, torch.device("cpu")) as other:  # more bytes: a new one
        assert other.data_ptr() != ptr and other.dtype == torch.float64
        ptr = other.data_ptr()
    # Anything that fits in its bytes reuses it, in the shape, dtype and layout asked for: the
    # explainer's channels-last batches and the drop-in's NCHW ones take turns in one buffer.
    for _ in range(2):
        with lent_buffer(4, (3, 4, 5), torch.float32, torch.device("cpu"), torch.channels_last) as cl:
            assert cl.data_ptr() == ptr and cl.shape == (4, 3, 4, 5) and cl.is_contiguous(memory_format=torch.channels_last)
            cl.copy_(torch.arange(240.0).view(4, 3, 4, 5))
            assert torch.equal(cl, torch.arange(240.0).view(4, 3, 4, 5))
        with lent_buffer(3, (5, 2, 7), torch.bfloat16, torch.device("cpu")) as nchw:
            assert nchw.data_ptr() == ptr and nchw.dtype == torch.bfloat16 and nchw.is_contiguous()
    release_buffers()


def test_each_thread_has_its_own_buffer():
    release_buffers()
    with lent_buffer(2, (1, 2, 2), torch.float32, torch.device("cpu")) as mine:
        seen = []

        def other_thread():
            with lent_buffer(2, (1, 2, 2), torch.float32, torch.device("cpu")) as theirs:
                seen.append(theirs.data_ptr())

        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
        assert seen and seen[0] != mine.data_ptr()
    release_buffers()


def test_a_buffer_given_up_mid_iteration_is_lent_again():
    from attrefine_fast.neighborhood import draw_masks, perturbed_chunks

    release_buffers()
    images = torch.rand(1, 3, 6, 6)
    segments = labels(1, 6, 6, [4], torch.Generator().manual_seed(0))
    masks = draw_masks(torch.tensor([4]), 10, seed=0)
    chunks = perturbed_chunks(images, segments, masks, images.clone(), 3, "torch", reuse_buffer=True)
    first = next(chunks)[2].data_ptr()
    chunks.close()  # the consumer stops early: the buffer is returned
    again = next(perturbed_chunks(images, segments, masks, images.clone(), 3, "torch", reuse_buffer=True))[2]
    assert again.data_ptr() == first
    release_buffers()


@pytest.mark.skipif(not _extension.loaded(), reason="needs the compiled extension")
@pytest.mark.parametrize("channels_last", [False, True])
def test_large_outputs_are_streamed_exactly(channels_last):
    # >= 64 MiB of output takes the streaming (non-temporal) stores; band segments take the runs path.
    gen = torch.Generator().manual_seed(11)
    images, fudge = torch.rand(2, 3, 96, 96, generator=gen), torch.rand(2, 3, 96, 96, generator=gen)
    segments = labels(2, 96, 96, [9, 5], gen, coherent=True)
    masks = torch.rand(2, 330, 9, generator=gen) > 0.5
    args = (images, segments, masks, fudge, 7, 320, None, None, None, channels_last)
    out = torch.ops.attrefine_fast.perturb(*args)
    assert out.numel() * 4 >= 64 << 20
    torch.testing.assert_close(out, perturb_ref(*args), atol=0, rtol=0)


@pytest.mark.skipif(not _extension.loaded(), reason="needs the compiled extension")
def test_streamed_output_that_starts_off_a_16_byte_boundary():
    gen = torch.Generator().manual_seed(12)
    images, fudge = torch.rand(1, 3, 97, 97, generator=gen), torch.rand(1, 3, 97, 97, generator=gen)
    segments = labels(1, 97, 97, [7], gen, coherent=True)
    masks = torch.rand(1, 600, 7, generator=gen) > 0.5
    rows = 600
    flat = torch.empty(rows * 3 * 97 * 97 + 1)
    out = flat[1:].view(rows, 3, 97, 97)  # one float past an aligned address
    assert out.data_ptr() % 16 != 0 and out.numel() * 4 >= 64 << 20
    torch.ops.attrefine_fast.perturb_into(images, segments, masks, fudge, 0, None, None, out)
    expected = torch.empty(rows, 3, 97, 97)
    perturb_into_ref(images, segments, masks, fudge, 0, None, None, expected)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_the_drop_in_keeps_no_view_of_the_shared_buffer():
    # A module whose output is a view of its input must not see its earlier outputs overwritten by
    # the next batch: it explains the same as lime's numpy function computing the same values.
    import numpy as np

    from attrefine_fast.lime import LimeImageExplainer

    class FirstPixels(torch.nn.Module):
        def forward(self, x):  # (n, C, H, W): channel 0 of the first three pixels, a view of x
            return x.flatten(1)[:, :3]

    image = np.random.default_rng(0).random((8, 8, 3))
    segments = np.arange(64).reshape(8, 8) // 16

    def explain(classifier_fn):
        return LimeImageExplainer(random_state=0).explain_instance(
            image, classifier_fn, labels=(0, 1), top_labels=None, num_samples=40, batch_size=7,
            segmentation_fn=lambda _: segments,
        )

    got = explain(FirstPixels())
    want = explain(lambda x: x[:, 0, :3, 0])  # (n, H, W, C): the same values
    for label in (0, 1):
        np.testing.assert_allclose([w for _, w in got.local_exp[label]], [w for _, w in want.local_exp[label]], atol=1e-9)


def test_a_model_that_raises_gives_the_buffer_back():
    import attrefine_fast as af

    class Fails(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("model failed")

    class Keeps(torch.nn.Module):
        seen = []

        def forward(self, x):
            self.seen.append(x.data_ptr())
            return torch.zeros(len(x), 2)

    release_buffers()
    images = torch.rand(1, 3, 8, 8)
    segments = labels(1, 8, 8, [4], torch.Generator().manual_seed(1))
    af.explain(Keeps(), images, segments=segments, labels=[0], num_samples=20, seed=0)
    kept = Keeps.seen[-1]
    with pytest.raises(RuntimeError, match="model failed") as failure:
        af.explain(Fails(), images, segments=segments, labels=[0], num_samples=20, seed=0)
    af.explain(Keeps(), images, segments=segments, labels=[0], num_samples=20, seed=0)
    assert Keeps.seen[-1] == kept  # lent again, although the failed call's traceback is alive
    assert failure.traceback  # (held until here)
    release_buffers()


def test_a_lending_generator_closed_on_another_thread_gives_back_its_own_threads_buffer():
    # the flag of the thread that lent the buffer is cleared, not the closing thread's
    def chunks():
        with lent_buffer(2, (3, 4, 4), torch.float32, torch.device("cpu")) as buffer:
            yield buffer

    release_buffers()
    gen = chunks()
    first = next(gen)
    results = {}

    def other():
        with lent_buffer(2, (3, 4, 4), torch.float32, torch.device("cpu")) as mine:
            gen.close()  # this thread's own buffer is lent meanwhile
            with lent_buffer(2, (3, 4, 4), torch.float32, torch.device("cpu")) as second:
                results["distinct"] = second.data_ptr() != mine.data_ptr()

    worker = threading.Thread(target=other)
    worker.start()
    worker.join()
    assert results["distinct"]
    with lent_buffer(2, (3, 4, 4), torch.float32, torch.device("cpu")) as again:
        assert again.data_ptr() == first.data_ptr()  # given back: lent again on this thread
