"""Small reference networks and a minimal classification LightningModule (demo, CLI, tests)."""

from lightning_qsec.models.classifier import ClassificationModule
from lightning_qsec.models.cnn import DigitsCNN, MNISTBatchNormCNN, MNISTCNN
from lightning_qsec.models.mlp import TabularMLP

__all__ = ["ClassificationModule", "DigitsCNN", "MNISTBatchNormCNN", "MNISTCNN", "TabularMLP"]
