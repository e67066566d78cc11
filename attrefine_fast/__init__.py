"""attrefine_fast: compiled kernels for batched LIME and attribution-aware model refinement.

    import attrefine_fast as af
    segments, counts = af.segment(images, method="slic", n_segments=50)
    exp = af.explain(model, images, segments=segments, top_labels=3, num_samples=1000)
    exp.heatmap()          # (B, L, H, W) LIME weight of each pixel's superpixel

A drop-in for lime's explainer lives in :mod:`attrefine_fast.lime`.
"""
__version__ = "0.1.0"

from . import ops  # noqa: E402
from .explain import Explanation, explain  # noqa: E402
from .segmentation import segment  # noqa: E402

__all__ = ["Explanation", "explain", "ops", "segment", "__version__"]
