"""Classifiers defined in the package (torchvision is optional and absent on CPU-only torch)."""
from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """A small CNN for any input size: three conv blocks, global average pooling, a linear head.

    Args:
        num_classes: outputs (logits).
        in_channels: input channels.
        width: channels of the first block (doubled in each later block).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 32):
        super().__init__()
        layers, c = [], in_channels
        for i in range(3):
            out = width * 2**i
            layers += [nn.Conv2d(c, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            if i < 2:
                layers.append(nn.MaxPool2d(2))
            c = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))
