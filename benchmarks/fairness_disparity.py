"""How much quantization changes the group-fairness gaps on Adult: float vs int8 / int4 / int2.

Setup. :class:`~lightning_qsec.data.AdultDataModule` (``--sensitive``, default ``sex``:
groups Male / Female; official test split, 15,060 rows), a
:class:`~lightning_qsec.models.TabularMLP` (101 -> 64 -> 32 -> 2) in
:class:`~lightning_qsec.models.ClassificationModule` (Adam, lr 3e-3, batch 256),
``--epochs`` epochs (default 3) per run, for each of ``--seeds`` (default 0 1 2: the
seed sets the split, the initial weights and the shuffling). Two kinds of model
(``--modes``):

``qat``
    trained with ``QuantizationAwareTraining(4, 4)``. "float" is the same network with
    every quantizer switched off (``float_mode``); int8 / int4 / int2 are the same
    weights at w8a8 / w4a4 / w2a2 (``at_precision``), i.e. the precision it was
    trained for and one above and below.
``ptq``
    trained in float. ``FairnessEvaluation`` measures a post-training quantized twin
    (calibrated on 10 training batches) at w8a8 / w4a4 / w2a2.

Measurement. ``FairnessEvaluation(bit_widths=(8, 4, 2), bootstrap=--bootstrap)`` at
``trainer.test``: demographic parity difference and ratio, equalized odds difference,
equal opportunity difference, accuracy difference and worst-group accuracy for the
float model and each precision, the change of each from float (quantized minus float,
with a paired, group-stratified percentile bootstrap interval at 95 %), and the
quantization-induced disparity (worst group's accuracy drop minus the overall drop).

Output. Per mode, mean ± std over the seeds (sample std, n-1) of the float value and of
each change, and in how many seeds the 95 % interval of the change excludes 0 (``+``:
the gap grew, ``-``: it shrank). Nothing is asserted and no sign is expected: the
numbers are printed as they come. For the gaps (differences) a positive change means
quantization widened the gap; for the DP ratio and worst-group accuracy a positive
change is an improvement.

Run: ``.venv/bin/python benchmarks/fairness_disparity.py [--seeds 0 1 2] [--epochs 3]``
(``--threads`` torch threads, default 1). About 2 minutes on 2 shared CPU cores.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
import warnings
from typing import Any

os.environ.setdefault("PL_DISABLE_FORK", "1")

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402

from lightning_qsec.callbacks import FairnessEvaluation, QuantizationAwareTraining  # noqa: E402
from lightning_qsec.callbacks.fairness_evaluation import BINARY_METRICS  # noqa: E402
from lightning_qsec.data import AdultDataModule  # noqa: E402
from lightning_qsec.models import ClassificationModule, TabularMLP  # noqa: E402

METRICS = (*BINARY_METRICS, "accuracy_difference", "worst_group_accuracy")
PRECISIONS = ("w8a8", "w4a4", "w2a2")


def run(mode: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Train one model and return FairnessEvaluation's test results."""
    pl.seed_everything(seed, verbose=False)
    dm = AdultDataModule(sensitive=args.sensitive, batch_size=256, seed=seed)
    module = ClassificationModule(TabularMLP(dm.num_features), lr=3e-3)
    fair = FairnessEvaluation(bit_widths=(8, 4, 2), bootstrap=args.bootstrap, seed=seed, every_n_epochs=10**6)
    callbacks: list[pl.Callback] = [QuantizationAwareTraining(4, 4)] if mode == "qat" else []
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=args.epochs, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
        limit_val_batches=0, callbacks=[*callbacks, fair], deterministic=True,
    )
    trainer.fit(module, datamodule=dm)
    trainer.test(module, datamodule=dm, verbose=False)
    return fair.results["test"]


def mean_std(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):+.4f} ± {sd:.4f}"


def excludes_zero(entries: list[dict[str, Any]]) -> str:
    up = sum(e["ci_low"] > 0 for e in entries)
    down = sum(e["ci_high"] < 0 for e in entries)
    return f"{up}+ {down}-"


def report(mode: str, results: list[dict[str, Any]]) -> None:
    n = len(results)
    print(f"\n== {mode.upper()} model, {n} seeds: mean ± std over seeds; [k+ k-] = seeds whose 95% CI of the "
          "change lies above / below 0")
    acc = [r["float"]["accuracy"] for r in results]
    line = f"{'accuracy':32s} float {mean_std(acc)}"
    for p in PRECISIONS:
        line += f" | {p} {mean_std([r['precisions'][p]['accuracy'] - r['float']['accuracy'] for r in results])}"
    print(line + "   (change = quantized - float)")
    header = f"{'metric':32s} {'float value':>17s}" + "".join(f" | {'change to ' + p:>27s}" for p in PRECISIONS)
    print(header)
    print("-" * len(header))
    for m in METRICS:
        row = f"{m:32s} {mean_std([r['float']['metrics'][m]['value'] for r in results]):>17s}"
        for p in PRECISIONS:
            changes = [r["precisions"][p]["change"][m] for r in results]
            row += f" | {mean_std([c['value'] for c in changes]):>17s} [{excludes_zero(changes)}]"
        print(row)
    row = f"{'quantization_induced_disparity':32s} {'-':>17s}"
    for p in PRECISIONS:
        q = [r["precisions"][p]["quantization_induced_disparity"] for r in results]
        row += f" | {mean_std([e['value'] for e in q]):>17s} [{excludes_zero(q)}]"
    print(row)
    names = results[0]["group_names"]
    for p in PRECISIONS:
        drops = ", ".join(
            f"{g} {mean_std([r['precisions'][p]['group_accuracy_drop'][g] for r in results])}" for g in names
        )
        print(f"  accuracy drop per group at {p}: {drops}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--sensitive", choices=["sex", "race"], default="sex")
    parser.add_argument("--modes", nargs="+", choices=["qat", "ptq"], default=["qat", "ptq"])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    start = time.perf_counter()
    print(f"Adult (sensitive={args.sensitive}), TabularMLP, {args.epochs} epochs, seeds {args.seeds}, "
          f"{args.bootstrap} bootstrap resamples, torch {torch.__version__}, {args.threads} thread(s)")
    for mode in args.modes:
        results = []
        for seed in args.seeds:
            t0 = time.perf_counter()
            results.append(run(mode, seed, args))
            r = results[-1]
            print(f"  {mode} seed {seed}: float acc {r['float']['accuracy']:.4f}, groups {r['group_sizes']}, "
                  f"{time.perf_counter() - t0:.0f} s")
        report(mode, results)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
