"""Random precision training (Double-Win Quant): every step at a randomly drawn bit width."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_qsec._float_phase import in_float_phase
from lightning_qsec._validation import check_seed
from lightning_qsec.defenses._regularizer import check_resumed_config
from lightning_qsec.distributed import broadcast_from_rank_zero
from lightning_qsec.quant.precision import at_precision, bit_widths, require_quantized
from lightning_qsec.quant.spec import Precision, PrecisionLike, parse_precisions

__all__ = ["RandomPrecisionTraining"]

_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _batch_norms(module: nn.Module) -> dict[str, nn.modules.batchnorm._NormBase]:
    return {
        name: m
        for name, m in module.named_modules()
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats and m.running_mean is not None
    }


def _read_bn(bns: dict[str, nn.Module]) -> dict[str, dict[str, Tensor]]:
    return {
        name: {b: getattr(m, b).detach().clone() for b in _BN_BUFFERS if getattr(m, b, None) is not None}
        for name, m in bns.items()
    }


def _write_bn(bns: dict[str, nn.Module], stats: dict[str, dict[str, Tensor]]) -> None:
    with torch.no_grad():
        for name, m in bns.items():
            for b, value in stats[name].items():
                getattr(m, b).copy_(value)


def _configured_precision(model: nn.Module) -> Precision | None:
    widths = bit_widths(model, adjustable_only=True)
    weights, acts = set(widths["weight"].values()), set(widths["act"].values())
    if len(weights) == 1 and len(acts) == 1:
        return Precision(weights.pop(), acts.pop())
    return None


class RandomPrecisionTraining(pl.Callback):
    """Train a quantized model at a randomly drawn precision every optimizer step.

    Random precision training of Double-Win Quant: Fu, Yu, Zhang, Wu, Ouyang, Cox & Lin,
    "Double-Win Quant: Aggressively Winning Robustness of Quantized Deep Neural Networks
    via Random Precision Training and Inference", ICML 2021,
    https://arxiv.org/abs/2012.10391. Adversarial examples transfer poorly between
    precisions; a model trained at random precisions works at all of them, so it can be
    run at a random precision at inference too. Combine it with adversarial training
    for the paper's robust setting.

    The model must already be quantized, e.g. by
    :class:`~lightning_qsec.callbacks.QuantizationAwareTraining` (any position in
    ``callbacks``). For each optimizer step a precision is drawn uniformly from
    ``bit_widths`` by a ``torch.Generator`` seeded with ``seed`` (the same sequence on
    every DDP rank); with gradient accumulation all micro-batches of one step share it.
    It is set in place at ``on_train_batch_start`` with
    :func:`~lightning_qsec.quant.at_precision` (entered through a ``contextlib.ExitStack``)
    and restored at ``on_train_batch_end`` (and on an exception or at the end of
    training), so validation, checkpoints and the model after ``fit`` have the configured
    bit widths.

    With ``switchable_bn=True`` every precision keeps its own BatchNorm running
    statistics (switchable BN, as in the paper): the model's own BatchNorm buffers hold
    those of its configured precision, which must be one of ``bit_widths`` and uniform
    (for example QAT ``(4, 4)`` with ``4`` in ``bit_widths``); the others are swapped in
    for the steps at their precision and kept in this callback's ``state_dict``. Use
    :meth:`switched` to evaluate the model at another precision with its own statistics.
    Affine BatchNorm parameters stay shared.

    ``state_dict`` holds the configuration, the generator state (a resumed run draws
    exactly the precisions an uninterrupted one would), the count of steps per
    precision (:attr:`counts`) and the per-precision BatchNorm statistics. The precision
    of each step is logged as ``qsec/random_precision/weight_bit_width`` and
    ``.../act_bit_width``.

    Args:
        bit_widths: the precisions to draw from: ints (same weight and activation bits),
            ``(w, a)`` pairs or strings like ``"w4a8"``; each bit width 2..16.
        switchable_bn: one set of BatchNorm running statistics per precision.
        seed: seed of the precision generator, an integer ``>= 0``.

    Raises:
        ValueError: bad ``bit_widths``, ``switchable_bn`` or ``seed`` (at construction); a
            model that is not quantized, or ``switchable_bn=True``
            with a configured precision that is mixed or not in ``bit_widths`` (at the
            start of training).

    Example:
        >>> import pytorch_lightning as pl
        >>> from lightning_qsec.callbacks import QuantizationAwareTraining
        >>> from lightning_qsec.defenses import RandomPrecisionTraining
        >>> rpt = RandomPrecisionTraining(bit_widths=(4, 6, 8), seed=0)
        >>> [p.label for p in rpt.precisions]
        ['w4a4', 'w6a6', 'w8a8']
        >>> trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
        ...                      callbacks=[QuantizationAwareTraining(4, 4), rpt])
    """

    def __init__(
        self,
        bit_widths: Sequence[PrecisionLike] = (4, 5, 6, 7, 8),
        switchable_bn: bool = False,
        seed: int = 0,
    ) -> None:
        self.precisions: list[Precision] = parse_precisions(bit_widths, "bit_widths")
        if not isinstance(switchable_bn, bool):
            raise ValueError(f"switchable_bn must be True or False, got {switchable_bn!r}")
        check_seed(seed, non_negative=True)
        self.switchable_bn = switchable_bn
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.counts: Counter[str] = Counter()
        self.current: Precision | None = None
        self.bn_statistics: dict[str, dict[str, dict[str, Tensor]]] = {}
        self._configured: Precision | None = None
        self._stack = ExitStack()

    @property
    def state_key(self) -> str:
        return "RandomPrecisionTraining"

    def config(self) -> dict[str, Any]:
        return {
            "bit_widths": [p.label for p in self.precisions],
            "switchable_bn": self.switchable_bn,
            "seed": self.seed,
        }

    # -- lifecycle -----------------------------------------------------------------------

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        require_quantized(pl_module, "the LightningModule")
        self._configured = _configured_precision(pl_module)
        if not self.switchable_bn:
            return
        if self._configured is None or self._configured not in self.precisions:
            configured = self._configured.label if self._configured else "mixed per-layer bit widths"
            raise ValueError(
                f"switchable_bn=True keeps the model's own BatchNorm statistics for its configured precision, "
                f"which must be uniform and one of bit_widths {[p.label for p in self.precisions]}; "
                f"the model is at {configured}"
            )
        bns = _batch_norms(pl_module)
        if not bns:
            rank_zero_warn(
                "RandomPrecisionTraining(switchable_bn=True): the model has no BatchNorm with running statistics"
            )
        current = _read_bn(bns)
        for p in self.precisions:
            if p != self._configured and p.label not in self.bn_statistics:
                self.bn_statistics[p.label] = {k: dict(v) for k, v in current.items()}  # start from the shared stats
        for label, stats in self.bn_statistics.items():
            if set(stats) != set(bns):
                raise ValueError(
                    f"RandomPrecisionTraining: the saved BatchNorm statistics of {label} are for layers "
                    f"{sorted(stats)}, but the model's BatchNorm layers are {sorted(bns)}"
                )

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._stack.close()
        if in_float_phase(trainer):
            return  # QuantizationAwareTraining(float_epochs=...) still trains the float model
        if self.current is None or batch_idx % trainer.accumulate_grad_batches == 0:
            index = int(torch.randint(len(self.precisions), (1,), generator=self.generator))
            self.current = self.precisions[index]
            self.counts[self.current.label] += 1
        p = self.current
        self._stack.enter_context(
            at_precision(pl_module, weight_bit_width=p.weight_bit_width, act_bit_width=p.act_bit_width)
        )
        if self.switchable_bn and p != self._configured:
            self._stack.enter_context(self._bn_swapped(pl_module, p))
        pl_module.log("qsec/random_precision/weight_bit_width", float(p.weight_bit_width))
        pl_module.log("qsec/random_precision/act_bit_width", float(p.act_bit_width))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._stack.close()
        used = self.current
        if in_float_phase(trainer):
            return
        if trainer.world_size > 1 and self.switchable_bn and used is not None and used != self._configured:
            # Each rank updated its own copy of this precision's statistics; keep rank 0's, as DDP
            # keeps rank 0's buffers for the statistics that live in the model.
            stats = self.bn_statistics[used.label]
            broadcast_from_rank_zero(t for buffers in stats.values() for t in buffers.values())

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stack.close()
        self.current = None  # Lightning ends the accumulation window with the epoch

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stack.close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._stack.close()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._stack.close()

    # -- switchable BatchNorm ------------------------------------------------------------

    @contextmanager
    def _bn_swapped(self, model: nn.Module, precision: Precision) -> Iterator[None]:
        bns = _batch_norms(model)
        own = _read_bn(bns)
        _write_bn(bns, self.bn_statistics[precision.label])
        try:
            yield
        finally:
            self.bn_statistics[precision.label] = _read_bn(bns)
            _write_bn(bns, own)

    @contextmanager
    def switched(self, model: nn.Module, precision: PrecisionLike) -> Iterator[nn.Module]:
        """Run ``model`` at ``precision`` with that precision's BatchNorm statistics.

        Without ``switchable_bn`` (or at the configured precision) this is
        :func:`~lightning_qsec.quant.at_precision`. Bit widths and statistics are restored
        on exit; statistics gathered inside (train mode) are kept for ``precision``.

        Example:
            >>> # after fit: evaluate at w8a8 with the w8a8 statistics
            >>> # with rpt.switched(model.eval(), 8): logits = model(x)
        """
        p = Precision.parse(precision, "precision")
        with ExitStack() as stack:
            stack.enter_context(
                at_precision(model, weight_bit_width=p.weight_bit_width, act_bit_width=p.act_bit_width)
            )
            if self.switchable_bn and p.label in self.bn_statistics:
                stack.enter_context(self._bn_swapped(model, p))
            yield model

    # -- state ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": self.config(),
            "generator": self.generator.get_state(),
            "counts": dict(self.counts),
            "current": None if self.current is None else self.current.label,
            "bn_statistics": {
                label: {name: {b: t.detach().cpu() for b, t in bufs.items()} for name, bufs in stats.items()}
                for label, stats in self.bn_statistics.items()
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_resumed_config("RandomPrecisionTraining", state_dict.get("config"), self.config())
        self.generator.set_state(state_dict["generator"])
        self.counts = Counter(state_dict.get("counts", {}))
        current = state_dict.get("current")
        self.current = None if current is None else Precision.parse(current)
        self.bn_statistics = {
            label: {name: dict(bufs) for name, bufs in stats.items()}
            for label, stats in state_dict.get("bn_statistics", {}).items()
        }
