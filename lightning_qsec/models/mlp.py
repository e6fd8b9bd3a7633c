"""A small MLP for tabular data (Adult, COMPAS, German credit)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

__all__ = ["TabularMLP"]


class TabularMLP(nn.Module):
    """Linear-ReLU layers for tabular features.

    Args:
        in_features: number of input features.
        num_classes: number of output classes.
        hidden: widths of the hidden layers.

    Example:
        >>> import torch
        >>> TabularMLP(12, 2)(torch.zeros(3, 12)).shape
        torch.Size([3, 2])
    """

    def __init__(self, in_features: int, num_classes: int = 2, hidden: Sequence[int] = (64, 32)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(1))
