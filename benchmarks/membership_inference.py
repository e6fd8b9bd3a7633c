"""Membership-inference leakage on Adult: float vs int8 vs int4, and an overfit model.

Setup. :class:`~lightning_qsec.data.AdultDataModule` (``sensitive="sex"``; members are
training rows, non-members rows of the official test split), a
:class:`~lightning_qsec.models.TabularMLP` in
:class:`~lightning_qsec.models.ClassificationModule` (Adam, lr 3e-3), for each of
``--seeds`` (default 0 1 2: the seed sets the split, the initial weights, the shuffling,
the member/non-member samples, the shadow models and the bootstrap). Three models
(``--models``):

``qat``
    the standard model: 101 -> 64 -> 32 -> 2, ``--epochs`` (3) epochs on the ~25.6k
    training rows, batch 256, with ``QuantizationAwareTraining(4, 4)``; "float" is the
    same weights with quantization off.
``ptq``
    the same, trained in float; the hook measures a post-training-quantized twin.
``overfit``
    101 -> 512 -> 512 -> 2 trained with ``QuantizationAwareTraining(4, 4)`` for
    ``--overfit-epochs`` (400) epochs on 60 training rows (``val_fraction=0.998`` of
    ``adult.data``; the rest is not used), one full batch per step, Adam without weight
    decay: a model that memorises its training set. On Adult a loss threshold sees
    membership only where the training set is tiny (benchmarks/README.md lists the
    larger splits tried).
``digits-overfit``
    a control with more room to overfit than Adult: :class:`~lightning_qsec.data.DigitsDataModule`
    with 180 training and 719 test images (``val_fraction=0.5, test_fraction=0.4``),
    64 -> 256 -> 256 -> 10 with ``QuantizationAwareTraining(4, 4)``, 150 epochs, batch 64.
    On Adult even a memorising model keeps about 78 % held-out accuracy (the majority
    class is 75 %), which caps what a loss threshold can see; on digits it does not.

Measurement. ``MembershipInferenceEvaluation(bit_widths=(8, 4))`` with its defaults
(loss-threshold, confidence-threshold and offline-LiRA attacks; up to 2,000 members and
2,000 non-members; 4 shadow models of 20 epochs on halves of the non-members; 200
bootstrap resamples) at ``trainer.test``: AUC, TPR at 1 % and 0.1 % FPR and membership
advantage for float, w8a8 and w4a4, each with a 95 % percentile bootstrap interval.

Output. Per model, attack and precision: mean ± std over the seeds (sample std, n-1) of
each number, the mean 95 % interval, and in how many seeds the AUC interval lies above
0.5. Nothing is asserted; for the two overfit models the script prints, per precision and
attack, whether the AUC is >= 0.6 in every seed (PASS/MISS).

Run: ``.venv/bin/python benchmarks/membership_inference.py [--seeds 0 1 2]``
(``--threads`` torch threads, default 1). About 2 minutes of CPU time.
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

from lightning_qsec.callbacks import MembershipInferenceEvaluation, QuantizationAwareTraining  # noqa: E402
from lightning_qsec.data import AdultDataModule, DigitsDataModule  # noqa: E402
from lightning_qsec.models import ClassificationModule, TabularMLP  # noqa: E402
from lightning_qsec.privacy import ROC_METRICS  # noqa: E402

KEYS = ("float", "w8a8", "w4a4")
ATTACKS = ("loss", "confidence", "lira")


def run(model: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Train one model and return MembershipInferenceEvaluation's test results."""
    pl.seed_everything(seed, verbose=False)
    if model == "digits-overfit":
        dm = DigitsDataModule(batch_size=64, seed=seed, val_fraction=0.5, test_fraction=0.4)
        net, epochs = TabularMLP(64, 10, hidden=(256, 256)), args.digits_epochs
    elif model == "overfit":
        dm = AdultDataModule(batch_size=128, seed=seed, val_fraction=0.998)
        net, epochs = TabularMLP(dm.num_features, hidden=(512, 512)), args.overfit_epochs
    else:
        dm = AdultDataModule(batch_size=256, seed=seed)
        net, epochs = TabularMLP(dm.num_features), args.epochs
    module = ClassificationModule(net, lr=3e-3)
    mia = MembershipInferenceEvaluation(bit_widths=(8, 4), seed=seed)
    callbacks: list[pl.Callback] = [] if model == "ptq" else [QuantizationAwareTraining(4, 4)]
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
        limit_val_batches=0, callbacks=[*callbacks, mia], deterministic=True,
    )
    trainer.fit(module, datamodule=dm)
    trainer.test(module, datamodule=dm, verbose=False)
    return mia.results["test"]


def mean_std(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {sd:.3f}"


def entry(result: dict[str, Any], key: str) -> dict[str, Any]:
    return result["float"] if key == "float" else result["precisions"][key]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    models = ["qat", "ptq", "overfit", "digits-overfit"]
    parser.add_argument("--models", nargs="+", default=models, choices=models)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--overfit-epochs", type=int, default=400)
    parser.add_argument("--digits-epochs", type=int, default=150)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")

    start = time.perf_counter()
    results: dict[str, list[dict[str, Any]]] = {}
    for model in args.models:
        for seed in args.seeds:
            t = time.perf_counter()
            r = run(model, seed, args)
            results.setdefault(model, []).append(r)
            print(f"# {model} seed {seed}: {r['members']} members, {r['nonmembers']} non-members, "
                  f"{time.perf_counter() - t:.1f} s (hook {r['seconds']:.1f} s, shadows "
                  f"{r['lira']['seconds']:.1f} s)", flush=True)

    print(f"\n{len(args.seeds)} seeds {args.seeds}, mean ± std; [mean 95 % bootstrap CI]; "
          "AUC>0.5: seeds whose AUC interval lies above 0.5\n")
    print("| model | precision | member / held-out acc | attack | AUC [CI] | AUC>0.5 | TPR@1%FPR [CI] "
          "| TPR@0.1%FPR [CI] | advantage [CI] |")
    print("|---|---|---|---|---|---|---|---|---|")
    for model, rs in results.items():
        for key in KEYS:
            acc = (f"{statistics.fmean(entry(r, key)['member_accuracy'] for r in rs):.3f} / "
                   f"{statistics.fmean(entry(r, key)['nonmember_accuracy'] for r in rs):.3f}")
            for attack in ATTACKS:
                cells = []
                for m in ROC_METRICS:
                    vals = [entry(r, key)["attacks"][attack][m] for r in rs]
                    lo = statistics.fmean(v["ci_low"] for v in vals)
                    hi = statistics.fmean(v["ci_high"] for v in vals)
                    cells.append(f"{mean_std([v['value'] for v in vals])} [{lo:.3f}, {hi:.3f}]")
                above = sum(entry(r, key)["attacks"][attack]["auc"]["ci_low"] > 0.5 for r in rs)
                print(f"| {model} | {key} | {acc} | {attack} | {cells[0]} | {above}/{len(rs)} | "
                      f"{' | '.join(cells[1:])} |")
    for model in ("overfit", "digits-overfit"):
        if model not in results:
            continue
        print()
        for key in KEYS:
            for attack in ATTACKS:
                aucs = [entry(r, key)["attacks"][attack]["auc"]["value"] for r in results[model]]
                verdict = "PASS" if min(aucs) >= 0.6 else "MISS"
                print(f"{model}, {key}, {attack}: AUC per seed {[round(a, 3) for a in aucs]} "
                      f"(>= 0.6 in every seed): {verdict}")
    print(f"\ntotal {time.perf_counter() - start:.0f} s, torch {torch.__version__}, {args.threads} thread(s)")


if __name__ == "__main__":
    main()
