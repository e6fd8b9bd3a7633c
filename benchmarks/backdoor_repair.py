"""Repair of quantization-conditioned backdoors: digits and MNIST-5k, 5 seeds, three methods.

For each dataset and seed, the clean model and the attacks are built as in
``benchmarks/red_team.py`` (same training, same per-dataset attack settings), here against
4-bit per-tensor weights only (``quantizers=("per_tensor",)``):

* ``backdoor`` (PQBackdoor-style, BadNets 2x2 white patch bottom-right, target class 0);
* ``indiscriminate`` (Qu-ANTI-zation objective).

The deployer quantizes with ``victim_quantize(model, train_loader, bit_width=4,
quantizer="per_tensor", act_bit_width=8)``. Each attacked float model is repaired with
``repair_quantization_backdoor(model, train_loader, bit_width=4, method=m)`` for the three
methods (10 calibration batches of 64 clean training images, default settings), and the
repaired deployment is measured on the whole test split. ASR is BackdoorBench's (triggered
test samples outside the target class classified as the target); DER is BackdoorBench's
defense effectiveness rate.

Targets (issue 4, "Repair"), judged per seed (PASS only if every seed passes):

* backdoor: ASR after repair < 5 %, and clean accuracy after repair at most 1 point below
  the published float model's (the accuracy the deployer was promised);
* indiscriminate: clean accuracy after repair at most 1 point below the float model's.

The clean twin's plain 4-bit deployment accuracy is printed for reference.

Run: ``.venv/bin/python benchmarks/backdoor_repair.py [--data digits mnist5k] [--seeds 5]
[--methods flip_rounding activation_alignment finetune] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from red_team import SETTINGS, datamodule, train_clean  # noqa: E402

from lightning_qsec._warnings import filter_known_warnings  # noqa: E402
from lightning_qsec.attacks import add_trigger, quantization_conditioned_attack, victim_quantize  # noqa: E402
from lightning_qsec.defenses import repair_quantization_backdoor  # noqa: E402
from lightning_qsec.metrics.functional import clean_accuracy  # noqa: E402

METHODS = ("flip_rounding", "activation_alignment", "finetune")
TARGET_CLASS = 0


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    return clean_accuracy(model.eval()(x), y).item()


def run_seed(data: str, seed: int, methods: list[str]) -> dict[str, float]:
    dm = datamodule(data, seed)
    x, y = dm.test_dataset.tensors
    setting = SETTINGS[data]
    clean = train_clean(data, dm, seed, setting.clean_epochs)
    loader = dm.train_dataloader()
    row: dict[str, float] = {
        "twin4": accuracy(victim_quantize(clean, loader, bit_width=4, quantizer="per_tensor"), x, y)
    }
    for key, mode in (("bd", "backdoor"), ("ind", "indiscriminate")):
        kwargs: dict[str, Any] = dict(quantizers=("per_tensor",), bit_widths=(4,), seed=seed, **getattr(setting, mode))
        attacked = quantization_conditioned_attack(clean, loader, mode=mode, target_class=TARGET_CLASS, **kwargs)
        trigger = dict(trigger=add_trigger, target_class=TARGET_CLASS) if mode == "backdoor" else {}
        for method in methods:
            r = repair_quantization_backdoor(
                attacked, loader, bit_width=4, method=method, quantizer="per_tensor",  # type: ignore[arg-type]
                eval_loader=dm.test_dataloader(), seed=seed, **trigger,
            ).report
            for name, value in r.to_dict().items():
                if isinstance(value, float):
                    row[f"{key}/{method}/{name}"] = value
    return row


def mean_std(values: list[float], scale: float = 100.0) -> str:
    if len(values) == 1:
        return f"{scale * values[0]:.1f}"
    return f"{scale * statistics.mean(values):.1f} ± {scale * statistics.stdev(values):.1f}"


def verdict(flags: list[bool]) -> str:
    return f"{'PASS' if all(flags) else 'MISS'} ({sum(flags)}/{len(flags)})"


def report(data: str, rows: list[dict[str, float]], methods: list[str]) -> None:
    def col(k: str) -> list[float]:
        return [r[k] for r in rows]

    print(f"\n### {data}: {len(rows)} seed(s), 4-bit per-tensor victim (w4a8), percent, mean ± std")
    print(f"clean twin, plain 4-bit deployment: accuracy {mean_std(col('twin4'))}")
    print("\nbackdoor mode")
    print("| method | float acc | float ASR | 4-bit ASR before | acc before | ASR after | acc after | DER | "
          "weights changed | seconds | target (ASR < 5, acc >= float - 1) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for m in methods:
        p = f"bd/{m}/"
        ok = [r[p + "asr_after"] < 0.05 and r[p + "clean_acc_after"] >= r[p + "clean_acc_float"] - 0.01 for r in rows]
        print(f"| {m} | {mean_std(col(p + 'clean_acc_float'))} | {mean_std(col(p + 'asr_float'))} "
              f"| {mean_std(col(p + 'asr_before'))} | {mean_std(col(p + 'clean_acc_before'))} "
              f"| {mean_std(col(p + 'asr_after'))} | {mean_std(col(p + 'clean_acc_after'))} "
              f"| {mean_std(col(p + 'der'), 1)} | {mean_std(col(p + 'changed_weights'))} "
              f"| {mean_std(col(p + 'seconds'), 1)} | {verdict(ok)} |")
    print("\nindiscriminate mode")
    print("| method | float acc | 4-bit acc before | acc after | agreement with float after | seconds "
          "| target (acc >= float - 1) |")
    print("|---|---|---|---|---|---|---|")
    for m in methods:
        p = f"ind/{m}/"
        ok = [r[p + "clean_acc_after"] >= r[p + "clean_acc_float"] - 0.01 for r in rows]
        print(f"| {m} | {mean_std(col(p + 'clean_acc_float'))} | {mean_std(col(p + 'clean_acc_before'))} "
              f"| {mean_std(col(p + 'clean_acc_after'))} | {mean_std(col(p + 'agreement_after'))} "
              f"| {mean_std(col(p + 'seconds'), 1)} | {verdict(ok)} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=["digits", "mnist5k"], choices=sorted(SETTINGS))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    filter_known_warnings()
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    print(f"torch {torch.__version__}, {args.threads} thread(s); victim: quantize_model(w=4, a=8, per tensor) + calibrate")
    for data in args.data:
        rows = []
        for seed in range(args.seeds):
            rows.append(run_seed(data, seed, args.methods))
            print(f"  {data} seed {seed} done ({time.perf_counter() - start:.0f} s)", flush=True)
        report(data, rows, args.methods)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
