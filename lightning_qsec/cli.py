"""The ``qsec`` command: ``qsec demo`` and a LightningCLI for the YAML presets.

``qsec demo [--output DIR] [--epochs N] [--seed S]`` runs :func:`~lightning_qsec.demo.run_demo`.
Every other command line goes to :class:`QsecCLI`, a
:class:`~pytorch_lightning.cli.LightningCLI` whose model defaults to
:class:`~lightning_qsec.models.ClassificationModule` around
:class:`~lightning_qsec.models.DigitsCNN` and whose data defaults to
:class:`~lightning_qsec.data.DigitsDataModule`, so a preset runs on its own::

    qsec fit --config callbacks/qat-int4.yaml
    qsec fit --config callbacks/qat-int4.yaml --trainer.max_epochs=3
    qsec fit --config callbacks/ptq-sweep.yaml --model.lr=0.01
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

__all__ = ["DEFAULT_DATA", "DEFAULT_MODEL", "QsecCLI", "main"]

DEFAULT_MODEL: dict[str, Any] = {
    "class_path": "lightning_qsec.models.ClassificationModule",
    "init_args": {"net": {"class_path": "lightning_qsec.models.DigitsCNN"}},
}
"""Model used when neither the config nor the command line names one."""

DEFAULT_DATA: dict[str, Any] = {"class_path": "lightning_qsec.data.DigitsDataModule"}
"""Datamodule used when neither the config nor the command line names one."""

_DESCRIPTION = (
    "lightning-qsec: quantization security for PyTorch Lightning. "
    "Run a preset from a source checkout with `qsec fit --config callbacks/qat-int4.yaml`; "
    "`qsec demo [--output DIR] [--epochs N] [--seed S]` runs the offline QAT demo."
)


class QsecCLI(LightningCLI):
    """LightningCLI with lightning-qsec's defaults.

    Any :class:`~pytorch_lightning.LightningModule` and
    :class:`~pytorch_lightning.LightningDataModule` can be chosen by ``class_path``
    (subclass mode for both); without one the model is
    ``ClassificationModule(net=DigitsCNN())`` and the data is ``DigitsDataModule``.
    The seed defaults to 0, and the resolved config is saved next to the logs
    (overwriting an earlier one), so a run can be repeated exactly.

    Args:
        args: command-line arguments (without the program name); ``None`` reads
            ``sys.argv``. Tests pass a list.
        run: run the subcommand (``fit``, ``validate``, ``test``, ...) after parsing.
        **kwargs: other :class:`~pytorch_lightning.cli.LightningCLI` arguments; they
            override the defaults above.

    Example:
        >>> cli = QsecCLI(args=["fit", "--config", "callbacks/qat-int4.yaml"])  # doctest: +SKIP
    """

    def __init__(self, args: Sequence[str] | None = None, run: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("model_class", pl.LightningModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("datamodule_class", pl.LightningDataModule)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("parser_kwargs", {"prog": "qsec", "description": _DESCRIPTION})
        super().__init__(args=None if args is None else list(args), run=run, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Default the model to ClassificationModule(DigitsCNN) and the data to DigitsDataModule.

        Args:
            parser: the subcommand's parser.
        """
        parser.set_defaults({"model": DEFAULT_MODEL, "data": DEFAULT_DATA})


def _demo_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qsec demo",
        description=(
            "Quantization-aware training (w4a4) of a small CNN on scikit-learn digits, a "
            "precision sweep over 8/4/2 bits and a security report. Offline, under a minute on CPU."
        ),
    )
    parser.add_argument("--output", default="qsec_report", help="report directory (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``qsec`` console script.

    Args:
        argv: arguments without the program name; ``None`` reads ``sys.argv[1:]``.
            ``["demo", ...]`` runs the demo; anything else is handed to :class:`QsecCLI`.

    Raises:
        SystemExit: on ``--help`` or invalid arguments (from argparse/jsonargparse).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "demo":
        options = _demo_parser().parse_args(args[1:])
        if options.epochs < 1:
            _demo_parser().error(f"--epochs must be >= 1, got {options.epochs}")
        if options.seed < 0:
            _demo_parser().error(f"--seed must be >= 0, got {options.seed}")
        from lightning_qsec.demo import run_demo

        run_demo(options.output, epochs=options.epochs, seed=options.seed)
        return
    # From the console script, let LightningCLI read sys.argv itself (passing the same
    # arguments as ``args`` too makes it warn); from Python, hand it the list.
    QsecCLI(args=None if argv is None else args)


if __name__ == "__main__":  # pragma: no cover
    main()
