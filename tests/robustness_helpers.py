"""Small classifiers trained on the embedded digits in a fraction of a second, for the attack
and evaluation tests: seeded, so every run trains the same weights."""
from __future__ import annotations

import functools

import pytest
import torch
from torch.nn import functional as F

from attrefine_fast.data import load_digits
from attrefine_fast.models import SmallCNN

SIZE = 16  # digits upsampled to 16x16: 4x fewer pixels than the default, same content


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one intra-op thread is faster than two, and far faster when the
    cores are shared with other work (spinning OpenMP threads contend). Import it into a test
    module to apply it there."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@functools.lru_cache(maxsize=None)
def digits(split: str, size: int = SIZE):
    return load_digits(split, size=size)


def train(model: torch.nn.Module, steps: int, *, size: int = SIZE, dataset=None, lr: float = 1e-2, batch: int = 64,
          seed: int = 0):
    """Adam on ``dataset`` (default: digits' train split at ``size``); returns the model in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    x, y = (dataset or digits("train", size)).tensors()
    opt = torch.optim.Adam(model.parameters(), lr)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (batch,), generator=gen)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@functools.lru_cache(maxsize=None)
def trained_cnn() -> SmallCNN:
    """SmallCNN (width 8, with batch norm) after 150 steps: ~90% clean test accuracy at 16x16.
    Cached: callers must not train it further."""
    torch.manual_seed(0)
    return train(SmallCNN(10, width=8), 150)


@functools.lru_cache(maxsize=None)
def trained_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * SIZE * SIZE, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    return train(net, 200)
