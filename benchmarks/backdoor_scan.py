"""Detection: ``scan_model`` on clean and quantization-conditioned models, digits and MNIST-5k.

Models (plain PyTorch, as ``benchmarks/red_team.py`` builds them; the seed sets the
split, the initial weights and the shuffling):

* **clean**: ``DigitsCNN`` (Adam 3e-3, 20 epochs) or ``MNISTCNN`` (5 epochs), seeds
  0-9 (``--clean-seeds``);
* **attacked** (ours): from the clean model of seeds 0-4 (``--seeds``),
  :func:`~lightning_qsec.attacks.quantization_conditioned_attack` in ``indiscriminate``
  and ``backdoor`` mode (target class 0, BadNets 2x2 patch), against 4-bit weights with
  both quantizers, with ``red_team.py``'s settings: 10 attacked models per dataset;
* **outside** (not from this package, written here): plain straight-through fine-tuning
  of the clean model without any box constraint, PQBackdoor-style (Ma et al. 2021):
  loss ``CE(f(x), y) + CE(f(x + trigger), y) + CE(q(x), y) + CE(q(x + trigger), 0)``,
  where ``q`` is the model with 4-bit max-abs fake-quantized weights (per tensor and per
  channel, alternating per step) and a straight-through gradient; Adam 1e-3, 10 epochs
  on digits, 3 on MNIST-5k.

Each attacked model is first checked through the victim's pipeline (``victim_quantize``,
per-tensor, 4-bit weights, 8-bit activations): 4-bit accuracy (indiscriminate) or
BackdoorBench ASR on the test split (backdoor, outside), float ASR alongside.

Every model is scanned with the defaults of ``scan_model`` (bit widths 8 and 4,
per-tensor weights, 8-bit activations, seed 0) on the first 512 samples of the
validation split. Targets (issue 4): at least 9 of the 10 attacked models flagged and at
most 1 of the 10 clean models flagged, per dataset; one scan <= 60 s on 2 CPU cores.

``--calibrate`` trains clean models on seeds 100, 101, ... (``--calibration-models``
per dataset; disjoint from every evaluation seed), scans them and prints the thresholds
``max(floor, 1.5 x the largest clean value)`` per evidence and bit width, as the
``CALIBRATED`` dict of ``lightning_qsec/defenses/_scan_thresholds.py``. No attacked model
takes part.

Run: ``.venv/bin/python benchmarks/backdoor_scan.py [--data digits mnist5k] [--seeds 5]
[--clean-seeds 10] [--calibrate [--calibration-models 8]] [--timing 3 --threads 2]``.
``--timing`` only times the default scan (progress bar on) of a clean model.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import red_team  # noqa: E402  (the clean and attacked models of the red-team benchmark)

from lightning_qsec._warnings import filter_known_warnings  # noqa: E402
from lightning_qsec.attacks import add_trigger, quantization_conditioned_attack  # noqa: E402
from lightning_qsec.defenses import ScanResult, scan_model  # noqa: E402
from lightning_qsec.defenses._scan_thresholds import CALIBRATED, EVIDENCE, calibrated_threshold  # noqa: E402

OUTSIDE_EPOCHS = {"digits": 10, "mnist5k": 3}
CALIBRATION_SEED = 100


def _fake_quantize(weight: Tensor, bits: int, per_channel: bool) -> Tensor:
    """Max-abs signed narrow-range quantize-dequantize, straight-through gradient."""
    qmax = 2 ** (bits - 1) - 1
    if per_channel:
        peak = weight.abs().amax(dim=tuple(range(1, weight.ndim)), keepdim=True)
    else:
        peak = weight.abs().max()
    scale = (peak / qmax).clamp_min(1e-12)
    return weight + (torch.clamp(torch.round(weight / scale), -qmax, qmax) * scale - weight).detach()


def outside_attack(clean: nn.Module, loader: Any, *, epochs: int, seed: int, bits: int = 4) -> nn.Module:
    """Unconstrained STE fine-tuning for a quantization-conditioned backdoor (no boxes)."""
    torch.manual_seed(seed)
    model = copy.deepcopy(clean)
    names = [n for n, p in model.named_parameters() if n.endswith("weight") and p.ndim > 1]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    step = 0
    for _ in range(epochs):
        for x, y in loader:
            per_channel = step % 2 == 1
            params = dict(model.named_parameters())
            quant = {n: _fake_quantize(params[n], bits, per_channel) for n in names}
            xt = add_trigger(x)
            target = torch.full_like(y, red_team.TARGET_CLASS)
            loss = (F.cross_entropy(model(x), y) + F.cross_entropy(model(xt), y)
                    + F.cross_entropy(functional_call(model, quant, (x,)), y)
                    + F.cross_entropy(functional_call(model, quant, (xt,)), target))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
    return model.eval()


def check_attack(model: nn.Module, dm: Any, kind: str) -> str:
    """The attack's effect through the victim's pipeline (per tensor, w4a8), on the test split."""
    x, y = dm.test_dataset.tensors
    float_acc, float_asr = red_team.measure(model, x, y)
    acc4, asr4 = red_team.measure(red_team.deploy(model, dm, 4, "per_tensor"), x, y)
    if kind == "indiscriminate":
        return f"float acc {100 * float_acc:.1f}, 4-bit acc {100 * acc4:.1f}"
    return f"float acc {100 * float_acc:.1f}, float ASR {100 * float_asr:.1f}, 4-bit ASR {100 * asr4:.1f}"


def scan(model: nn.Module, dm: Any) -> ScanResult:
    return scan_model(model, dm.val_dataloader(), progress=False)


def line(data: str, seed: int, kind: str, result: ScanResult, attack: str = "") -> str:
    top = ", ".join(result.flagged[:4]) + (" ..." if len(result.flagged) > 4 else "")
    return (f"| {data} | {seed} | {kind} | {attack} | {'FLAGGED' if result.suspicious else 'pass'} "
            f"| {result.score:.2f} | {result.target_class} | {top or '-'} | {result.seconds:.1f} |")


def evaluate(data: str, seeds: int, clean_seeds: int) -> dict[str, list[ScanResult]]:
    setting = red_team.SETTINGS[data]
    found: dict[str, list[ScanResult]] = {"clean": [], "indiscriminate": [], "backdoor": [], "outside": []}
    for seed in range(max(seeds, clean_seeds)):
        dm = red_team.datamodule(data, seed)
        clean = red_team.train_clean(data, dm, seed, setting.clean_epochs)
        if seed < clean_seeds:
            found["clean"].append(scan(clean, dm))
            print(line(data, seed, "clean", found["clean"][-1]), flush=True)
        if seed >= seeds:
            continue
        loader = dm.train_dataloader()
        for mode in ("indiscriminate", "backdoor"):
            kwargs: dict[str, Any] = dict(quantizers=red_team.QUANTIZERS, bit_widths=(4,), seed=seed)
            kwargs.update(getattr(setting, mode))
            attacked = quantization_conditioned_attack(
                clean, loader, mode=mode, target_class=red_team.TARGET_CLASS, **kwargs
            )
            found[mode].append(scan(attacked, dm))
            print(line(data, seed, mode, found[mode][-1], check_attack(attacked, dm, mode)), flush=True)
        outside = outside_attack(clean, loader, epochs=OUTSIDE_EPOCHS[data], seed=seed)
        found["outside"].append(scan(outside, dm))
        print(line(data, seed, "outside", found["outside"][-1], check_attack(outside, dm, "outside")), flush=True)
    return found


def summary(data: str, found: dict[str, list[ScanResult]]) -> None:
    print(f"\n### {data}: detection summary")
    attacked = found["indiscriminate"] + found["backdoor"]
    flagged = sum(r.suspicious for r in attacked)
    false = sum(r.suspicious for r in found["clean"])
    seconds = [r.seconds for r in sum(found.values(), [])]
    print(f"attacked (ours, both modes) flagged: {flagged}/{len(attacked)} "
          f"-> {'PASS' if flagged >= 0.9 * len(attacked) else 'MISS'} (target >= 9 of 10)")
    print(f"clean flagged: {false}/{len(found['clean'])} "
          f"-> {'PASS' if false <= 0.1 * len(found['clean']) else 'MISS'} (target <= 1 of 10)")
    print(f"outside attack (unconstrained STE) flagged: {sum(r.suspicious for r in found['outside'])}"
          f"/{len(found['outside'])} (reported, no target)")
    for kind, results in found.items():
        if results:
            scores = [r.score for r in results]
            print(f"  score {kind}: {statistics.mean(scores):.2f} ± {statistics.pstdev(scores):.2f} "
                  f"(min {min(scores):.2f}, max {max(scores):.2f})")
    print(f"scan time: {statistics.mean(seconds):.1f} ± {statistics.pstdev(seconds):.1f} s, max {max(seconds):.1f} s "
          f"-> {'PASS' if max(seconds) <= 60 else 'MISS'} (target <= 60 s)", flush=True)


def calibrate_thresholds(datasets: list[str], models: int) -> None:
    values: dict[int, dict[str, list[float]]] = {}
    print(f"calibration: clean models, seeds {CALIBRATION_SEED}..{CALIBRATION_SEED + models - 1}, {datasets}")
    for data in datasets:
        for seed in range(CALIBRATION_SEED, CALIBRATION_SEED + models):
            dm = red_team.datamodule(data, seed)
            clean = red_team.train_clean(data, dm, seed, red_team.SETTINGS[data].clean_epochs)
            result = scan(clean, dm)
            for bits, evidence in result.evidence.items():
                for name in EVIDENCE:
                    values.setdefault(bits, {}).setdefault(name, []).append(evidence[name])
            print(f"  {data} seed {seed}: " + " | ".join(
                f"{b}: " + " ".join(f"{n}={result.evidence[b][n]:.3f}" for n in EVIDENCE) for b in result.evidence
            ) + f" ({result.seconds:.1f} s)", flush=True)
    print("\n| bit width | evidence | clean mean ± std | clean max | threshold |")
    print("|---|---|---|---|---|")
    for bits, per_name in values.items():
        for name, vals in per_name.items():
            print(f"| {bits} | {name} | {statistics.mean(vals):.4f} ± {statistics.pstdev(vals):.4f} | {max(vals):.4f} "
                  f"| {calibrated_threshold(vals, name):.4f} |")
    print("\nCALIBRATED: dict[int, dict[str, float]] = {")
    for bits, per_name in values.items():
        inner = ", ".join(f'"{n}": {calibrated_threshold(v, n):.4f}' for n, v in per_name.items())
        print(f"    {bits}: {{{inner}}},")
    print("}")


def timing(datasets: list[str], repeats: int) -> None:
    """Wall time of one default scan (progress bar on) of a clean model, ``repeats`` times per dataset."""
    for data in datasets:
        dm = red_team.datamodule(data, 0)
        clean = red_team.train_clean(data, dm, 0, red_team.SETTINGS[data].clean_epochs)
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            scan_model(clean, dm.val_dataloader(), progress=True)
            seconds.append(time.perf_counter() - start)
        print(f"{data}: one scan {statistics.mean(seconds):.1f} ± {statistics.pstdev(seconds):.1f} s "
              f"(max {max(seconds):.1f} s over {repeats}) -> {'PASS' if max(seconds) <= 60 else 'MISS'} (<= 60 s)",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=["digits", "mnist5k"], choices=sorted(red_team.SETTINGS))
    parser.add_argument("--seeds", type=int, default=5, help="seeds of the attacked models (2 modes each)")
    parser.add_argument("--clean-seeds", type=int, default=10)
    parser.add_argument("--calibrate", action="store_true", help="print calibrated thresholds instead")
    parser.add_argument("--calibration-models", type=int, default=8)
    parser.add_argument("--timing", type=int, default=0, metavar="REPEATS",
                        help="only time REPEATS scans of a clean model per dataset (use --threads 2)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    filter_known_warnings()
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    print(f"torch {torch.__version__}, {args.threads} thread(s)")
    if args.timing:
        timing(args.data, args.timing)
    elif args.calibrate:
        calibrate_thresholds(args.data, args.calibration_models)
    else:
        print(f"thresholds: CALIBRATED = {CALIBRATED}")
        print("| data | seed | model | attack effect (test split, per-tensor w4a8) | verdict | score | suspect class "
              "| evidence over threshold | scan s |")
        print("|---|---|---|---|---|---|---|---|---|")
        for data in args.data:
            summary(data, evaluate(data, args.seeds, args.clean_seeds))
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
