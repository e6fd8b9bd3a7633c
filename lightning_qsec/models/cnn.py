"""Small reference CNNs for 8x8 (digits) and 28x28 (MNIST, Fashion-MNIST) images."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["DigitsCNN", "MNISTBatchNormCNN", "MNISTCNN"]


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


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU()]


class MNISTBatchNormCNN(nn.Module):
    """Four 3x3 convolution-BatchNorm-ReLU blocks and global average pooling, for 1x28x28 images.

    The layout of the ResNets that post-training quantization papers quantize (e.g. KURE,
    Shkolnik et al., NeurIPS 2020, https://arxiv.org/abs/2002.07686), at MNIST scale: every
    convolution feeds a BatchNorm, so per-tensor weight quantization noise is rescaled
    channel by channel, which makes 4-bit PTQ of this network much harder than of
    :class:`MNISTCNN`.

    Args:
        num_classes: number of output classes.
        width: channels of the first block (then ``2 * width``, ``2 * width``, ``4 * width``;
            the second and fourth blocks have stride 2).

    Example:
        >>> import torch
        >>> MNISTBatchNormCNN()(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn_relu(1, width, 1),
            *_conv_bn_relu(width, 2 * width, 2),
            *_conv_bn_relu(2 * width, 2 * width, 1),
            *_conv_bn_relu(2 * width, 4 * width, 2),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(4 * width, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))
