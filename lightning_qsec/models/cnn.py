"""Small reference CNNs for 8x8 (digits) and 28x28 (MNIST, Fashion-MNIST) images."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["DigitsCNN", "MNISTCNN"]


class DigitsCNN(nn.Module):
    """A two-convolution CNN for 1x8x8 images (scikit-learn digits).

    Args:
        num_classes: number of output classes.
        width: channels of the first convolution (the second has twice as many).

    Example:
        >>> import torch
        >>> DigitsCNN()(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * 4, 64), nn.ReLU(), nn.Linear(64, num_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class MNISTCNN(nn.Module):
    """A two-convolution CNN for 1x28x28 images (MNIST, Fashion-MNIST).

    Args:
        num_classes: number of output classes.
        width: channels of the first convolution (the second has twice as many).

    Example:
        >>> import torch
        >>> MNISTCNN()(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * 49, 128), nn.ReLU(), nn.Linear(128, num_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))
