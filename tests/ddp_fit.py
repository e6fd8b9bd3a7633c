"""Standalone QAT + precision-sweep run on the digits, with 1 or N CPU processes (DDP, gloo).

Lightning's ``ddp`` launcher re-executes ``sys.argv`` for ranks 1..N-1, so this must be a
script, never code inside pytest's process. ``tests/test_ddp.py`` runs it in a subprocess.

    python tests/ddp_fit.py --devices 2 --out results.json --epochs 3 --seed 0 [--save-ckpt ddp.ckpt]
    python tests/ddp_fit.py --devices 1 --out single.json --eval-ckpt ddp.ckpt   # test only

Rank 0 writes ``--out``: the sweep's test results, the validation history, and one
checksum per rank of the parameters and of the activation scales (equal across ranks
when DDP kept them in sync). At the end every rank calls
:func:`lightning_qsec.distributed.shutdown_distributed` (``--no-cleanup`` skips it, to
reproduce the occasional abort at exit); the exit code is non-zero if any rank failed.

Both runs see the same global batches: the global batch (``--batch-size``) is split
evenly across the ranks, and under DDP each rank takes every N-th sample of the same
``EpochSeededSampler`` order (a ``DistributedSampler`` subclass, which Lightning keeps
as it is), so one DDP step averages the gradients of exactly the batch one process sees.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("PL_DISABLE_FORK", "1")

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler  # noqa: E402

from conftest import UserCNN  # noqa: E402  (this script's folder is on sys.path)
from lightning_qsec.callbacks.precision_sweep import PrecisionSweep  # noqa: E402
from lightning_qsec.callbacks.qat import QuantizationAwareTraining  # noqa: E402
from lightning_qsec.data.digits import DigitsDataModule  # noqa: E402
from lightning_qsec.data.sampler import EpochSeededSampler  # noqa: E402
from lightning_qsec.distributed import shutdown_distributed  # noqa: E402
from lightning_qsec.quant.inspect import stat_scalers  # noqa: E402


class ShardedEpochSeededSampler(DistributedSampler):
    """Rank ``r`` of ``N`` takes positions ``r, r+N, ...`` of the ``EpochSeededSampler`` order.

    With a per-rank batch of ``B / N`` the N ranks together see exactly the batches of
    size ``B`` that one process sees. Being a ``DistributedSampler``, Lightning does not
    wrap it in its own (reshuffling) sampler; it calls ``set_epoch`` on it every epoch.
    """

    def __init__(self, dataset: Any, seed: int) -> None:
        super().__init__(dataset, shuffle=False, drop_last=False)
        self.inner = EpochSeededSampler(dataset, seed)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.inner.set_epoch(epoch)

    def __iter__(self):
        order = list(self.inner)
        order += order[: self.total_size - len(order)]  # pad like DistributedSampler
        return iter(order[self.rank : self.total_size : self.num_replicas])


class ShardedDigits(DigitsDataModule):
    """``DigitsDataModule`` whose training batches are shared out over the DDP ranks."""

    def train_dataloader(self) -> DataLoader:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return super().train_dataloader()
        self.setup()
        return DataLoader(
            self.train_dataset,
            batch_size=self.batch_size,
            sampler=ShardedEpochSeededSampler(self.train_dataset, self.seed),
            num_workers=self.num_workers,
        )


def _digest(tensors: list[torch.Tensor]) -> dict[str, Any]:
    h = hashlib.sha256()
    total = 0.0
    for t in tensors:
        t = t.detach().cpu().contiguous().to(torch.float64)
        h.update(t.numpy().tobytes())
        total += float(t.sum())
    return {"sha256": h.hexdigest(), "sum": total, "count": len(tensors)}


def checksums(model: nn.Module) -> dict[str, Any]:
    """Digests of every parameter and of every activation scale (stat scaler value)."""
    return {
        "parameters": _digest([p for _, p in sorted(model.named_parameters())]),
        "activation_scales": _digest([s.value for _, s in sorted(stat_scalers(model), key=lambda kv: kv[0])]),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch, split over the ranks")
    parser.add_argument("--save-ckpt", type=Path, help="after fit, save a checkpoint here (every rank calls, rank 0 writes)")
    parser.add_argument("--eval-ckpt", type=Path, help="skip fit: test the model of this checkpoint")
    parser.add_argument(
        "--no-cleanup",
        action="store_true",
        help="skip destroying the process group at the end (reproduces the exit crash)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.batch_size % args.devices:
        raise SystemExit(f"--batch-size {args.batch_size} is not divisible by --devices {args.devices}")
    torch.set_num_threads(1)
    pl.seed_everything(args.seed, verbose=False)

    model = UserCNN()
    datamodule = ShardedDigits(batch_size=args.batch_size // args.devices, seed=args.seed)
    sweep = PrecisionSweep([8, 4, 2])
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        max_epochs=args.epochs,
        deterministic=True,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[QuantizationAwareTraining(4, 4), sweep],
    )
    if args.eval_ckpt is None:
        trainer.fit(model, datamodule=datamodule)
        if args.save_ckpt is not None:
            trainer.save_checkpoint(args.save_ckpt)
        trainer.test(model, datamodule=datamodule, verbose=False)
    else:
        trainer.test(model, datamodule=datamodule, ckpt_path=str(args.eval_ckpt), verbose=False)

    mine = checksums(model)
    if trainer.world_size > 1:
        per_rank: list[Any] = [None] * trainer.world_size
        dist.all_gather_object(per_rank, mine)
    else:
        per_rank = [mine]

    if trainer.is_global_zero:
        result = {
            "devices": args.devices,
            "world_size": trainer.world_size,
            "epochs": args.epochs,
            "eval_ckpt": None if args.eval_ckpt is None else str(args.eval_ckpt),
            "seed": args.seed,
            "global_batch_size": args.batch_size,
            "test": sweep.results["test"],
            "validate_history": [r for r in sweep.history if r["stage"] == "validate"],
            "checksums": per_rank,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(args.out.suffix + ".tmp")
        tmp.write_text(json.dumps(result, indent=2, sort_keys=True))
        tmp.replace(args.out)

    if args.no_cleanup:
        return 0
    # Destroy the gloo process group on every rank (else the exit can abort: exit 134),
    # and on rank 0 wait for the rank processes Lightning launched: their exit codes.
    children = shutdown_distributed(trainer)
    if children != 0:
        print(f"ddp_fit: a launched rank exited with {children}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
