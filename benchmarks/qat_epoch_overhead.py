"""Epoch-time overhead of QAT through the ``QuantizationAwareTraining`` callback.

What is compared (all on :class:`~lightning_qsec.data.DigitsDataModule`, batch size 64,
Adam with the same learning rate, the same float initial weights, CPU):

``callback``
    ``pl.Trainer`` + ``ClassificationModule(DigitsCNN())`` (a plain float CNN) +
    ``QuantizationAwareTraining(4, 4, calibrate_batches=N)``. The callback swaps the
    layers in ``setup`` and (with ``N > 0``) calibrates in ``on_train_start``.
``hand+Trainer``
    ``pl.Trainer`` + ``ClassificationModule(HandQuantDigitsCNN(4))``: the same network
    written by hand with ``brevitas.nn.QuantConv2d``/``QuantLinear``/``QuantReLU`` and
    the quantizers ``quantize_model`` uses (``Int8WeightPerTensorFloat`` weights,
    ``Uint8ActPerTensorFloat`` after ReLUs, ``Int8ActPerTensorFloat`` on the input of the
    first layer, bit widths as ``stateful_const`` buffers). No callback. Calibrated, when
    ``N > 0``, with Brevitas' own ``calibration_mode`` before ``fit``.
``hand+loop``
    The same hand-written Brevitas network trained by a plain PyTorch loop
    (``zero_grad``/``cross_entropy``/``backward``/``step``) over the very same
    DataLoader object type (``dm.train_dataloader()``), no Lightning at all.

The script checks first that the hand-written network and the callback's network are
the same: identical ``state_dict`` keys and identical logits from the same weights.

Method. Every run is a fresh model and optimizer; it trains ``1 + --epochs`` epochs and
the first (warm-up) epoch is dropped. An epoch is timed from the first batch fetch to
the last optimizer step: ``on_train_epoch_start`` -> ``on_train_epoch_end`` in a
Trainer (validation is off), the ``for`` loop in the plain loop. Both process CPU time
(judged: with one torch thread it is the work done, hardly disturbed by other
processes sharing the cores) and wall time (printed) are taken. A run's time is the
median of its steady-state epochs. The three variants are
run ``--repeats`` times, *interleaved* (the order rotates every repeat), so a change
of machine load hits all of them alike; each repeat gives paired ratios, and the
reported ratio is the median over repeats (min..max shows the spread). Calibration,
layer swapping and Trainer setup happen outside the timed epochs by design: they are
one-off costs, not per-epoch overhead.

Ratios printed:

* ``callback / hand+loop``: the full cost of using the plugin instead of hand-written
  Brevitas QAT. It contains Lightning's own loop overhead (logging, hooks), which is
  not the callback's. Target <= 1.05.
* ``callback / hand+Trainer``: the callback's own cost, Lightning held fixed. Expected
  ~1.00 (the callback has no per-batch hook); target <= 1.05.
* ``hand+Trainer / hand+loop``: Lightning's loop overhead alone, for context (no target).

Run: ``.venv/bin/python benchmarks/qat_epoch_overhead.py [--epochs 4] [--repeats 5]``.
Uses ``--threads`` torch threads (default 1: steadier on a shared machine).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

os.environ.setdefault("PL_DISABLE_FORK", "1")

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from brevitas.graph.calibrate import calibration_mode  # noqa: E402
from brevitas.nn import QuantConv2d, QuantLinear, QuantReLU  # noqa: E402
from brevitas.quant import Int8ActPerTensorFloat, Int8WeightPerTensorFloat, Uint8ActPerTensorFloat  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from lightning_qsec import quantize_model  # noqa: E402
from lightning_qsec.callbacks import QuantizationAwareTraining  # noqa: E402
from lightning_qsec.data import DigitsDataModule  # noqa: E402
from lightning_qsec.models import ClassificationModule, DigitsCNN  # noqa: E402

LR = 1e-3
CLOCKS = ("cpu", "wall")
TARGET = 1.05


class HandQuantDigitsCNN(nn.Module):
    """``DigitsCNN`` written by hand with Brevitas layers and ``quantize_model``'s quantizers."""

    def __init__(self, bits: int, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        weight = dict(
            weight_quant=Int8WeightPerTensorFloat, weight_bit_width=bits, weight_bit_width_impl_type="stateful_const"
        )
        first_input = dict(
            input_quant=Int8ActPerTensorFloat, input_bit_width=bits, input_bit_width_impl_type="stateful_const"
        )

        def relu() -> QuantReLU:
            return QuantReLU(act_quant=Uint8ActPerTensorFloat, bit_width=bits, bit_width_impl_type="stateful_const")

        self.features = nn.Sequential(
            QuantConv2d(1, width, 3, padding=1, **weight, **first_input),
            relu(),
            nn.MaxPool2d(2),
            QuantConv2d(width, 2 * width, 3, padding=1, **weight),
            relu(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            QuantLinear(2 * width * 4, 64, bias=True, **weight),
            relu(),
            QuantLinear(64, num_classes, bias=True, **weight),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


Clock = tuple[float, float]  # (process CPU seconds, wall seconds)


def now() -> Clock:
    return time.process_time(), time.perf_counter()


def since(start: Clock) -> Clock:
    cpu, wall = now()
    return cpu - start[0], wall - start[1]


class EpochClock(pl.Callback):
    """CPU and wall time of every training epoch (first batch fetch to last step)."""

    def __init__(self) -> None:
        self.times: list[Clock] = []
        self._start: Clock = (0.0, 0.0)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = now()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.times.append(since(self._start))


def float_net(seed: int) -> DigitsCNN:
    torch.manual_seed(seed)
    return DigitsCNN()


def hand_net(bits: int, seed: int) -> HandQuantDigitsCNN:
    net = HandQuantDigitsCNN(bits)
    missing, unexpected = net.load_state_dict(float_net(seed).state_dict(), strict=False)
    assert not unexpected, unexpected
    return net


def brevitas_calibrate(net: nn.Module, loader: Any, batches: int) -> None:
    """Brevitas' own PTQ recipe: ``calibration_mode`` over ``batches`` training batches."""
    net.eval()
    with torch.no_grad(), calibration_mode(net):
        for i, (x, _) in enumerate(loader):
            if i >= batches:
                break
            net(x)
    net.train()


def trainer(max_epochs: int, callbacks: list[pl.Callback]) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=callbacks,
    )


def run_callback(dm: DigitsDataModule, bits: int, calib: int, epochs: int, seed: int) -> list[Clock]:
    clock = EpochClock()
    qat = QuantizationAwareTraining(bits, bits, calibrate_batches=calib)
    trainer(epochs, [qat, clock]).fit(ClassificationModule(float_net(seed), lr=LR), datamodule=dm)
    return clock.times


def run_hand_trainer(dm: DigitsDataModule, bits: int, calib: int, epochs: int, seed: int) -> list[Clock]:
    net = hand_net(bits, seed)
    if calib:
        brevitas_calibrate(net, dm.train_dataloader(), calib)
    clock = EpochClock()
    trainer(epochs, [clock]).fit(ClassificationModule(net, lr=LR), datamodule=dm)
    return clock.times


def run_hand_loop(dm: DigitsDataModule, bits: int, calib: int, epochs: int, seed: int) -> list[Clock]:
    net = hand_net(bits, seed)
    loader = dm.train_dataloader()
    if calib:
        brevitas_calibrate(net, loader, calib)
    optimizer = torch.optim.Adam(net.parameters(), lr=LR)
    net.train()
    times = []
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)  # as Lightning does
        start = now()
        for x, y in loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            optimizer.step()
        times.append(since(start))
    return times


VARIANTS: dict[str, Callable[..., list[Clock]]] = {
    "callback": run_callback,
    "hand+Trainer": run_hand_trainer,
    "hand+loop": run_hand_loop,
}


def check_same_network(dm: DigitsDataModule, bits: int, seed: int) -> float:
    """Hand-written net == callback's net: same state_dict keys, same logits (train-mode step)."""
    auto = quantize_model(float_net(seed), weight_bit_width=bits, act_bit_width=bits)
    hand = hand_net(bits, seed)
    if set(auto.state_dict()) != set(hand.state_dict()):
        raise SystemExit(f"hand-written net differs from quantize_model's: {set(auto.state_dict()) ^ set(hand.state_dict())}")
    x, _ = next(iter(dm.train_dataloader()))
    auto.train(), hand.train()
    diff = (auto(x) - hand(x)).abs().max().item()
    auto.eval(), hand.eval()
    diff = max(diff, (auto(x) - hand(x)).abs().max().item())
    if diff != 0.0:
        raise SystemExit(f"hand-written net gives other logits than quantize_model's (max diff {diff})")
    return diff


def verdict(ratio: float, target: float) -> str:
    return "PASS" if ratio <= target else "MISS"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4, help="timed epochs per run (after 1 warm-up epoch)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved runs of each variant")
    parser.add_argument("--bits", type=int, default=4, help="weight and activation bit width")
    parser.add_argument("--calibrate-batches", type=int, default=10, help="0: Brevitas collects stats while training")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    dm = DigitsDataModule(batch_size=args.batch_size)
    dm.setup()
    check_same_network(dm, args.bits, seed=0)
    n_batches = len(dm.train_dataloader())
    print(
        f"QAT epoch overhead: DigitsCNN w{args.bits}a{args.bits}, {len(dm.train_dataset)} train images, "
        f"{n_batches} batches/epoch, calibrate_batches={args.calibrate_batches}, torch threads={args.threads}"
    )
    print(f"{args.repeats} interleaved repeats x {args.epochs} timed epochs (+1 warm-up); hand-written net verified identical")

    names = list(VARIANTS)
    # per_run[clock][variant]: one median per run; epochs[clock][variant]: every steady epoch
    per_run: dict[str, dict[str, list[float]]] = {c: {n: [] for n in names} for c in CLOCKS}
    epochs: dict[str, dict[str, list[float]]] = {c: {n: [] for n in names} for c in CLOCKS}
    for r in range(args.repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            steady = VARIANTS[name](dm, args.bits, args.calibrate_batches, args.epochs + 1, seed=r)[1:]
            for k, clock in enumerate(CLOCKS):
                values = [t[k] for t in steady]
                per_run[clock][name].append(statistics.median(values))
                epochs[clock][name].extend(values)

    print()
    print(f"{'variant':<14}{'CPU ms/epoch':>14}{'wall ms/epoch':>15}   (median of steady epochs; min..max CPU)")
    for name in names:
        cpu, wall = epochs["cpu"][name], epochs["wall"][name]
        print(
            f"{name:<14}{1e3 * statistics.median(cpu):>14.1f}{1e3 * statistics.median(wall):>15.1f}"
            f"   {1e3 * min(cpu):.1f}..{1e3 * max(cpu):.1f}"
        )

    print()
    print(f"{'ratio (median of paired repeats)':<34}{'CPU':>7}{'CPU min..max':>15}{'wall':>8}{'target':>10}  result (CPU)")
    rows = [
        ("callback / hand+loop", "callback", "hand+loop", TARGET),
        ("callback / hand+Trainer", "callback", "hand+Trainer", TARGET),
        ("hand+Trainer / hand+loop", "hand+Trainer", "hand+loop", None),
    ]
    for label, a, b, target in rows:
        ratios = {c: [x / y for x, y in zip(per_run[c][a], per_run[c][b])] for c in CLOCKS}
        cpu, wall = statistics.median(ratios["cpu"]), statistics.median(ratios["wall"])
        spread = f"{min(ratios['cpu']):.3f}..{max(ratios['cpu']):.3f}"
        tail = "Lightning's loop alone (context)" if target is None else verdict(cpu, target)
        shown = "-" if target is None else f"<= {target:.2f}"
        print(f"{label:<34}{cpu:>7.3f}{spread:>15}{wall:>8.3f}{shown:>10}  {tail}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
