"""Shared test configuration.

Without a CUDA GPU the Triton kernels run on CPU tensors through Triton's interpreter, which
must be switched on before any kernel is defined: hence here, before the package is imported.
"""
import os
import random

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# Every device-parametrized test runs on the CPU here and on CUDA where a GPU is present.
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]


def skip_unless_on_cpu(op: str, backend: str) -> None:
    """Skip the calling test where ``backend`` cannot run ``op`` on the CPU here, with the reason."""
    from attrefine_fast import backends

    available, why = backends.status(op, backend, "cpu")
    if not available:
        pytest.skip(f"no {backend} backend for {op} on the CPU here ({why})")


@pytest.fixture(autouse=True)
def seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
