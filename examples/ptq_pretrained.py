"""Post-training quantization (PTQ) of a pretrained float model: how does it hold up?

You have float weights someone else trained (a ``state_dict`` file) and want to know
what quantization does to them before deploying at 8, 4 or 2 bits. Here the
"someone else" is simulated: a float :class:`~lightning_qsec.models.ClassificationModule`
around :class:`~lightning_qsec.models.DigitsCNN` is trained briefly and its
``state_dict`` saved with ``torch.save``. Then:

1. **Callback path.** The weights are loaded with ``torch.load(..., weights_only=True)``
   (never unpickle code from a file you did not write) into a fresh module, and
   ``trainer.test`` runs with :class:`~lightning_qsec.callbacks.PrecisionSweep` only.
   As the module is not quantized, the sweep builds a quantized *twin* (the loaded
   model is untouched), calibrates its activation scales on training batches and
   measures it at w8a8, w4a4 and w2a2 (``ptq_twin: True`` in the result).
2. **Functional path.** The same by hand: :func:`lightning_qsec.quantize_model`,
   :func:`lightning_qsec.calibrate`, then :func:`lightning_qsec.at_precision` per bit width.

Run (offline, scikit-learn digits, well under a minute on CPU)::

    python examples/ptq_pretrained.py --epochs 5 --output qsec_report/examples/ptq_pretrained
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

import lightning_qsec
from lightning_qsec.callbacks import PrecisionSweep
from lightning_qsec.data import DigitsDataModule
from lightning_qsec.models import ClassificationModule, DigitsCNN

BIT_WIDTHS: tuple[int, ...] = (8, 4, 2)


def quiet_trainer(**kwargs: Any) -> pl.Trainer:
    """A CPU trainer without progress bar, model summary, logger or checkpoints.

    Args:
        **kwargs: overrides of the defaults.

    Returns:
        The trainer.
    """
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


@torch.no_grad()
def accuracy(model: nn.Module, loader: Any) -> float:
    """Top-1 accuracy of ``model`` (put in eval mode) over ``loader``.

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
    """Train and save a float model, reload it safely, then sweep it under PTQ two ways.

    Args:
        argv: command-line arguments (``None``: ``sys.argv[1:]``).

    Returns:
        ``{"callback": <PrecisionSweep test result>, "functional": {label: accuracy}}``.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5, help="epochs of the stand-in pretraining (default: %(default)s)")
    parser.add_argument("--output", default="qsec_report/examples/ptq_pretrained", help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads; this CNN is tiny (default: 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(args.seed, verbose=False)
    datamodule = DigitsDataModule(batch_size=64, seed=args.seed)

    # --- Someone else's float model, shipped as a state_dict file. -----------------
    pretrained = ClassificationModule(DigitsCNN(), lr=3e-3)
    quiet_trainer(max_epochs=args.epochs).fit(pretrained, datamodule=datamodule)
    weights = output / "pretrained_digits_cnn.pt"
    torch.save(pretrained.state_dict(), weights)

    # --- 1. Callback path: load safely, test with PrecisionSweep alone. -----------
    model = ClassificationModule(DigitsCNN())
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    sweep = PrecisionSweep(bit_widths=list(BIT_WIDTHS), calibrate_batches=10)
    quiet_trainer(callbacks=[sweep]).test(model, datamodule=datamodule, verbose=False)
    swept = sweep.results["test"]
    assert swept["ptq_twin"] and not lightning_qsec.is_quantized(model)  # the loaded model is untouched
    print("PrecisionSweep (PTQ twin, calibrated on 10 training batches), test split:")
    print(f"  float: accuracy {swept['float']['accuracy']:.4f}")
    for label, r in swept["precisions"].items():
        print(f"  {label}: accuracy {r['accuracy']:.4f}  drop {r['drop']:+.4f}  disagreement {r['disagreement']:.4f}")

    # --- 2. Functional path: quantize a copy, calibrate, evaluate per precision. ----
    net = lightning_qsec.quantize_model(copy.deepcopy(model.net))
    lightning_qsec.calibrate(net, datamodule.train_dataloader(), num_batches=10)
    test_loader = datamodule.test_dataloader()
    functional: dict[str, float] = {}
    with lightning_qsec.float_mode(net):
        functional["float"] = accuracy(net, test_loader)
    for bits in BIT_WIDTHS:
        with lightning_qsec.at_precision(net, weight_bit_width=bits, act_bit_width=bits):
            functional[f"w{bits}a{bits}"] = accuracy(net, test_loader)
    print("quantize_model + calibrate + at_precision, test split:")
    for label, acc in functional.items():
        print(f"  {label}: accuracy {acc:.4f}")
    return {"callback": swept, "functional": functional}


if __name__ == "__main__":
    main()
