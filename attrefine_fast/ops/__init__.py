"""The engine's ops. Each public function validates its inputs once, then runs the chosen
backend; ``<op>_ref`` is the pure-PyTorch reference every backend is tested against.

None of the ops is differentiable: the public functions run without autograd, so their outputs
never require grad, whichever backend computed them (the references called directly still record
a graph; they are the readable definition, not an API)."""
from .lime_fit import lime_fit, lime_fit_ref, lime_kernel_weights
from .masked_pgd_step import masked_pgd_step, masked_pgd_step_ref
from .perturb import perturb, perturb_into_ref, perturb_ref
from .segment_mean import segment_mean, segment_mean_ref

__all__ = [
    "lime_fit", "lime_fit_ref", "lime_kernel_weights",
    "masked_pgd_step", "masked_pgd_step_ref",
    "perturb", "perturb_ref", "perturb_into_ref",
    "segment_mean", "segment_mean_ref",
]
