"""Building blocks shared by the neural models (two-tower towers, re-ranker heads)."""
from __future__ import annotations

from typing import Sequence

from torch import nn


def mlp(sizes: Sequence[int], dropout: float = 0.0) -> nn.Sequential:
    """Linear layers ``sizes[0] -> sizes[1] -> ... -> sizes[-1]``, each but the last followed by a
    ReLU (and a Dropout when ``dropout`` > 0): the one MLP of the library, so every model's
    hidden stack reads the same."""
    layers: list[nn.Module] = []
    for k, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if k < len(sizes) - 2:
            layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)
