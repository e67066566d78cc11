"""PGD-10: ours per backend of the update step, torchattacks, and the model's own passes."""
from attrefine_fast.backends import BACKENDS

PROVIDERS = {"pgd": ("model",) + tuple(f"ours[{b}]" for b in BACKENDS) + ("torchattacks",)}


def test_pgd(measure):
    measure()
