"""Small models, data and fixtures shared by the refinement tests."""
import pytest
import torch
from torch import nn


class SmoothNet(nn.Module):
    """conv -> tanh -> linear: smooth, so second derivatives are well defined everywhere."""

    def __init__(self, channels: int = 3, size: int = 8, classes: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(channels, 4, 3, padding=1)
        self.head = nn.Linear(4 * size * size, classes)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).flatten(1))


def digits_subset(n: int, split: str = "train"):
    from attrefine_fast.data import load_digits

    return load_digits(split, size=32).subset(n)


@pytest.fixture(autouse=True)
def one_thread():
    """These tests run tiny convolutions, where one thread is faster than two and far faster on a
    busy machine (threads waiting for each other); imported by each refine test module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
