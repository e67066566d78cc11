"""Attribution-aware refinement: LIME-guided detection of spurious superpixels, masking,
a sensitivity-aware input-gradient penalty and adversarial augmentation, in a closed loop.

    from attrefine_fast.refine import RefineConfig, Refiner
    model = Refiner(RefineConfig(mode="refine", out="runs/refine")).fit()

See docs/refinement.md for the method and which of its choices are ours.
"""
from .bound import attribution_bound, correlation, empirical_min_eps
from .config import RefineConfig
from .detect import Detection, detect_spurious, flag_superpixels
from .flags import FlagStore
from .loss import input_gradient_penalty, mask_images
from .trainer import Refiner

__all__ = [
    "Detection", "FlagStore", "RefineConfig", "Refiner", "attribution_bound", "correlation", "detect_spurious",
    "empirical_min_eps", "flag_superpixels", "input_gradient_penalty", "mask_images",
]
