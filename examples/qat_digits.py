"""Quantization-aware training of your own LightningModule, swept and reported.

The user story: you already have an ordinary LightningModule built from
``nn.Conv2d``, ``nn.Linear`` and ``nn.ReLU``. Without changing a line of it, three
callbacks make the run quantization-aware and security-aware:

* :class:`~lightning_qsec.callbacks.QuantizationAwareTraining` swaps the float layers
  for Brevitas quantized ones (w4a4 here) before training, so the weights learn to
  live on the 4-bit grid;
* :class:`~lightning_qsec.callbacks.PrecisionSweep` measures the float model and the
  same weights at w8a8, w4a4 and w2a2 after every validation epoch and at test;
* :class:`~lightning_qsec.callbacks.SecurityReport` writes ``report.json``,
  ``report.md`` and plots into ``--output``.

Finally the checkpoint is loaded for inference into a *fresh* instance of the same
float module with :func:`lightning_qsec.load_quantized_checkpoint` (safe
``weights_only`` loading) and evaluated on the test split.

Run (offline, scikit-learn digits, well under a minute on CPU)::

    python examples/qat_digits.py --epochs 5 --output qsec_report/examples/qat_digits
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import Tensor, nn
from torch.nn import functional as F

import lightning_qsec
from lightning_qsec.callbacks import PrecisionSweep, QuantizationAwareTraining, SecurityReport
from lightning_qsec.data import DigitsDataModule


class UserModule(pl.LightningModule):
    """An ordinary LightningModule for 1x8x8 digits: nothing quantization-specific in it.

    Args:
        lr: Adam learning rate.
    """

    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.fc1 = nn.Linear(32 * 2 * 2, 64)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(64, 10)
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(self.relu1(self.conv1(x)), 2)
        x = F.max_pool2d(self.relu2(self.conv2(x)), 2).flatten(1)
        return self.fc2(self.relu3(self.fc1(x)))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean())

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("test_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


@torch.no_grad()
def accuracy(model: nn.Module, loader: Any) -> float:
    """Top-1 accuracy of ``model`` (in eval mode) over ``loader``.

    Args:
        model: a classifier returning logits.
        loader: batches of ``(x, y)``.

    Returns:
        The fraction of correctly classified samples.
    """
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    return correct / total


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train with QAT, sweep, report, then reload the checkpoint for inference.

    Args:
        argv: command-line arguments (``None``: ``sys.argv[1:]``).

    Returns:
        The PrecisionSweep test result plus ``reloaded_accuracy`` and ``checkpoint``.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5, help="training epochs (default: %(default)s)")
    parser.add_argument("--output", default="qsec_report/examples/qat_digits", help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads; this CNN is tiny (default: 1)")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"--epochs must be at least 1, got {args.epochs}")
    torch.set_num_threads(args.threads)
    output = Path(args.output)

    pl.seed_everything(args.seed, verbose=False)
    datamodule = DigitsDataModule(batch_size=64, seed=args.seed)
    sweep = PrecisionSweep(bit_widths=[8, 4, 2])
    checkpoint = ModelCheckpoint(dirpath=output / "checkpoints", filename="qat-w4a4", enable_version_counter=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=args.epochs,
        callbacks=[
            QuantizationAwareTraining(weight_bit_width=4, act_bit_width=4),  # first: the others see quant layers
            sweep,
            SecurityReport(dirpath=output),  # last: collects the sections of the callbacks before it
            checkpoint,
        ],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        default_root_dir=str(output),
    )
    model = UserModule()
    trainer.fit(model, datamodule=datamodule)
    trainer.test(model, datamodule=datamodule, verbose=False)

    results = sweep.results["test"]
    print(f"float accuracy: {results['float']['accuracy']:.4f}")
    for label, r in results["precisions"].items():
        print(f"{label}: accuracy {r['accuracy']:.4f}  drop {r['drop']:+.4f}  disagreement {r['disagreement']:.4f}")
    print(f"report: {output / 'report.json'}")

    # Inference: a fresh float UserModule, quantized as the checkpoint records, weights loaded safely.
    ckpt_path = checkpoint.best_model_path
    deployed = lightning_qsec.load_quantized_checkpoint(UserModule(), ckpt_path)
    assert lightning_qsec.is_quantized(deployed)
    reloaded = accuracy(deployed, datamodule.test_dataloader())
    print(f"reloaded from {ckpt_path}: w4a4 test accuracy {reloaded:.4f}")
    return {**results, "reloaded_accuracy": reloaded, "checkpoint": ckpt_path}


if __name__ == "__main__":
    main()
