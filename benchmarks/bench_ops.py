"""The ops, per backend, beside lime's own code for the same step (lime has none for the PGD
update: torchattacks' is inline in its attack, compared in bench_attacks)."""
from attrefine_fast.backends import BACKENDS

OURS = tuple(f"ours[{b}]" for b in BACKENDS)
PROVIDERS = {
    "segment_mean": OURS + ("lime",),
    "perturb": OURS + ("lime",),
    "lime_fit": OURS + ("lime",),
    "masked_pgd_step": OURS,
}


def test_op(measure):
    measure()
