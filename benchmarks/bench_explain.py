"""Explanations (the model alone, ours per backend, our lime drop-in, lime, captum) and
segmentation (ours with three methods, lime's quickshift)."""
from attrefine_fast.backends import BACKENDS

PROVIDERS = {
    "explain": ("model",) + tuple(f"ours[{b}]" for b in BACKENDS) + ("ours[auto]", "ours[drop-in]", "lime", "captum"),
    "segmentation": ("ours[quickshift]", "ours[slic]", "ours[grid]", "lime"),
}


def test_explain(measure):
    measure()
