"""``qsec demo``: quantization-aware training on scikit-learn digits, swept and reported.

Runs offline in well under a minute on two CPU cores: a
:class:`~lightning_qsec.models.ClassificationModule` around
:class:`~lightning_qsec.models.DigitsCNN` is trained at w4a4 with
:class:`~lightning_qsec.callbacks.QuantizationAwareTraining`, then tested with
:class:`~lightning_qsec.callbacks.PrecisionSweep` over 8, 4 and 2 bits, and
:class:`~lightning_qsec.callbacks.SecurityReport` writes ``report.json``,
``report.md`` and the plots.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from lightning_qsec._validation import check_seed
from lightning_qsec.callbacks import PrecisionSweep, QuantizationAwareTraining, SecurityReport
from lightning_qsec.data import DigitsDataModule
from lightning_qsec.models import ClassificationModule, DigitsCNN

__all__ = ["format_sweep_table", "run_demo"]

DEMO_BIT_WIDTHS: tuple[int, ...] = (8, 4, 2)


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one intra-op thread, then restore the previous setting.

    The demo network is tiny: splitting its convolutions over threads costs more than
    it saves, and on a busy machine it is several times slower.

    Yields:
        Nothing.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence Lightning's informational log lines and its known-harmless warnings.

    Yields:
        Nothing; the previous logger levels and warning filters are restored on exit.
    """
    names = ("pytorch_lightning", "lightning_fabric", "lightning.pytorch", "lightning.fabric")
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
            warnings.filterwarnings("ignore", message=".*is smaller than the logging interval.*")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def format_sweep_table(results: Mapping[str, Any]) -> str:
    """Render a :class:`~lightning_qsec.callbacks.PrecisionSweep` result as a text table.

    Args:
        results: one stage's result (``PrecisionSweep.results["test"]``).

    Returns:
        A fixed-width table with the columns precision, accuracy, drop and
        disagreement; the float model comes first.
    """
    header = ("precision", "accuracy", "drop", "disagreement")
    rows = [("float", f"{results['float']['accuracy']:.4f}", "-", "-")]
    for label, r in results["precisions"].items():
        rows.append((label, f"{r['accuracy']:.4f}", f"{r['drop']:+.4f}", f"{r['disagreement']:.4f}"))
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:
        return " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    rule = "-+-".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def run_demo(output: str | os.PathLike[str] = "qsec_report", *, epochs: int = 10, seed: int = 0) -> dict[str, Any]:
    """Train a w4a4 QAT CNN on scikit-learn digits, sweep 8/4/2 bits and write the report.

    Nothing is downloaded: the digits ship with scikit-learn. The trainer is quiet
    (no progress bar, no model summary, no logger, no checkpoints); the only files
    written are the security report in ``output``. Torch runs on one intra-op thread
    for the duration (restored afterwards): the network is far too small to gain from more.

    Args:
        output: directory for ``report.json``, ``report.md`` and the plot PNGs.
        epochs: training epochs (>= 1).
        seed: seed of the data split, shuffling and weight initialisation.

    Returns:
        The :class:`~lightning_qsec.callbacks.PrecisionSweep` test result: ``stage``,
        ``epoch``, ``ptq_twin``, ``float`` (``accuracy``) and ``precisions``
        (label -> ``accuracy``, ``drop``, ``disagreement``, bit widths).

    Raises:
        ValueError: ``epochs`` is not a positive integer.

    Example:
        >>> results = run_demo("qsec_report", epochs=2)  # doctest: +SKIP
        >>> results["precisions"]["w4a4"]["accuracy"]  # doctest: +SKIP
        0.93
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    output = Path(output)
    with quiet_lightning(), single_thread():
        check_seed(seed, non_negative=True)
        pl.seed_everything(seed, verbose=False)
        datamodule = DigitsDataModule(batch_size=64, seed=seed)
        module = ClassificationModule(DigitsCNN(), lr=3e-3)
        qat = QuantizationAwareTraining(weight_bit_width=4, act_bit_width=4)
        sweep = PrecisionSweep(bit_widths=list(DEMO_BIT_WIDTHS))
        report = SecurityReport(dirpath=output)
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_epochs=epochs,
            callbacks=[qat, sweep, report],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            deterministic=True,
            default_root_dir=str(output),
        )
        trainer.fit(module, datamodule=datamodule)
        trainer.test(module, datamodule=datamodule, verbose=False)
    results = sweep.results["test"]
    print(f"QAT w4a4 on scikit-learn digits, {epochs} epoch(s), test split:")
    print(format_sweep_table(results))
    print(f"Security report: {report.last_report_path}")
    return results


if __name__ == "__main__":  # pragma: no cover
    run_demo()
