"""The shared mechanism of the regularizer callbacks: an extra gradient, never a changed loss.

A regularizer callback adds ``coefficient * term`` to the user's objective without
touching the user's LightningModule, its ``training_step`` or its ``forward``. It runs
one extra ``torch.autograd.grad`` on the term alone and adds the result to the
parameters' ``.grad``, which already hold the gradient of the user's loss. Since the
gradient of a sum is the sum of the gradients, the optimizer then steps on
``loss + coefficient * term`` exactly.

Two hooks, by what the term depends on:

* **Weight-only terms** (:class:`WeightRegularizer`: Lipschitz, KURE) run in
  ``on_before_optimizer_step``: once per optimizer step, after the whole accumulation
  window (so no ``1 / accumulate_grad_batches`` factor is needed), after AMP has
  unscaled the gradients, and before gradient clipping (which then clips the total).
  The weights are identical on every DDP rank, so is the extra gradient: no
  communication.
* **Data-dependent terms** (:class:`BatchRegularizer`: gradient-L1, fair QAT) run in
  ``on_after_backward``, once per micro-batch, on that micro-batch; the extra gradient
  is scaled by ``1 / trainer.accumulate_grad_batches`` (as Lightning scales the loss), by the AMP
  loss scale when a ``GradScaler`` is active (the ``.grad`` are still scaled then), and
  averaged over DDP ranks (as DDP averages the loss gradient).

A step whose backward was skipped (``training_step`` returned ``None``: no parameter
has a ``.grad``) gets no extra gradient either. The callbacks need automatic
optimization.

Coefficient schedule: every regularizer takes its coefficient as a
:data:`CoefficientLike`: a number ``>= 0`` (constant), or a list of
``(epoch, value)`` milestones, piecewise constant: the value of the last milestone
whose epoch is ``<= trainer.current_epoch``. The first milestone must be at epoch 0
and epochs must increase. Example: ``[(0, 0.0), (2, 1e-3)]`` is off for epochs 0 and 1
and ``1e-3`` from epoch 2 on. The schedule is plain data, saved in the callback's
``state_dict``.

Every term is logged with ``pl_module.log("qsec/reg/<name>", value)`` (the raw term,
before the coefficient) and the coefficient as ``qsec/reg/<name>_coef``.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar, Union

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from lightning_qsec.quant.inspect import stat_scalers
from lightning_qsec.quant.statistics import load_statistics_state, statistics_state

__all__ = [
    "Coefficient",
    "preserved_running_state",
    "CoefficientLike",
    "Regularizer",
    "WeightRegularizer",
    "BatchRegularizer",
    "add_to_grad",
    "check_resumed_config",
    "regularized_weights",
]

CoefficientLike = Union[float, Sequence[tuple[int, float]]]
"""A constant ``>= 0`` or piecewise-constant ``(epoch, value)`` milestones from epoch 0."""

_WEIGHT_LAYERS = (nn.Linear, nn.modules.conv._ConvNd)


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


class Coefficient:
    """A regularization coefficient: a constant, or ``(epoch, value)`` milestones.

    Args:
        value: a finite number ``>= 0``, or a non-empty sequence of ``(epoch, value)``
            pairs, integer epochs ``>= 0`` strictly increasing from 0, values finite ``>= 0``.
        argument: the argument's name, for error messages.

    Raises:
        ValueError: naming ``argument`` and the allowed forms.

    Example:
        >>> c = Coefficient([(0, 0.0), (2, 0.5)], "beta")
        >>> [c.at(e) for e in range(4)]
        [0.0, 0.0, 0.5, 0.5]
    """

    def __init__(self, value: CoefficientLike, argument: str) -> None:
        self.argument = argument
        forms = (
            "a finite number >= 0, or a list of (epoch, value) milestones with integer epochs "
            "increasing from 0 and finite values >= 0"
        )
        if _is_number(value):
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{argument} must be {forms}; got {value!r}")
            self.milestones: tuple[tuple[int, float], ...] = ((0, float(value)),)
            self.constant = True
            return
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) == 0:
            raise ValueError(f"{argument} must be {forms}; got {value!r}")
        milestones = []
        for entry in value:
            if isinstance(entry, (str, bytes)) or not isinstance(entry, Sequence) or len(entry) != 2:
                raise ValueError(f"{argument} must be {forms}; entry {entry!r} is not an (epoch, value) pair")
            epoch, coef = entry
            if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
                raise ValueError(f"{argument} must be {forms}; epoch {epoch!r} in {entry!r} is not an integer >= 0")
            if not _is_number(coef) or not math.isfinite(coef) or coef < 0:
                raise ValueError(f"{argument} must be {forms}; value {coef!r} in {entry!r} is not a finite number >= 0")
            milestones.append((int(epoch), float(coef)))
        epochs = [e for e, _ in milestones]
        if epochs[0] != 0 or any(b <= a for a, b in zip(epochs, epochs[1:])):
            raise ValueError(f"{argument} must be {forms}; got epochs {epochs}")
        self.milestones = tuple(milestones)
        self.constant = False

    def at(self, epoch: int) -> float:
        """The coefficient during ``epoch``."""
        current = self.milestones[0][1]
        for start, value in self.milestones:
            if start > epoch:
                break
            current = value
        return current

    def to_state(self) -> float | list[list[float]]:
        """Plain data for a ``state_dict`` (a float, or ``[[epoch, value], ...]``)."""
        if self.constant:
            return self.milestones[0][1]
        return [[e, v] for e, v in self.milestones]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Coefficient) and self.milestones == other.milestones

    def __repr__(self) -> str:
        return repr(self.to_state())


def check_skip(skip: Any) -> tuple[str, ...]:
    """``skip`` as a tuple of module-name globs, or a ``ValueError``."""
    if isinstance(skip, str) or not isinstance(skip, Sequence) or not all(isinstance(s, str) for s in skip):
        raise ValueError(f"skip must be a sequence of module names or globs (strings), got {skip!r}")
    return tuple(skip)


def regularized_weights(module: nn.Module, skip: Sequence[str] = ()) -> list[tuple[str, nn.Parameter]]:
    """``(module name, weight)`` of every conv/linear layer (float or Brevitas) not in ``skip``.

    Brevitas' ``QuantConv*d``/``QuantLinear`` subclass ``nn.Conv*d``/``nn.Linear``; their
    ``weight`` is the float (shadow) weight that the optimizer trains.
    """
    out = []
    for name, m in module.named_modules():
        if isinstance(m, _WEIGHT_LAYERS) and isinstance(getattr(m, "weight", None), nn.Parameter):
            if not any(fnmatch.fnmatchcase(name, g) for g in skip):
                out.append((name, m.weight))
    return out


def add_to_grad(params: Sequence[Tensor], grads: Sequence[Tensor | None]) -> None:
    """``p.grad += g`` for every pair (``p.grad = g`` where it was ``None``); ``None`` grads are skipped."""
    with torch.no_grad():
        for p, g in zip(params, grads):
            if g is None:
                continue
            if p.grad is None:
                p.grad = g.detach().clone()
            else:
                p.grad.add_(g.detach())


@contextmanager
def preserved_running_state(module: nn.Module) -> Iterator[None]:
    """Run extra forward passes that leave running statistics as they were.

    Saves and restores, around the block: BatchNorm running mean, variance and
    ``num_batches_tracked``; and, while any Brevitas activation scaler is still
    collecting statistics (``counter <= collect_stats_steps``, i.e. a train-mode forward
    would advance it), the scalers' counter, buffer and value
    (:func:`~lightning_qsec.quant.statistics.statistics_state`). Train/eval flags are not
    touched: the extra pass sees the model exactly as training does. Restoring happens
    after the block, so gradients through the extra pass can still be taken inside it.
    """
    bn = [
        m
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats and m.running_mean is not None
    ]
    saved_bn = [
        (
            m,
            m.running_mean.clone(),
            m.running_var.clone(),
            None if m.num_batches_tracked is None else m.num_batches_tracked.clone(),
        )
        for m in bn
    ]
    collecting = any(s.counter <= s.collect_stats_steps for _, s in stat_scalers(module))
    saved_stats = statistics_state(module) if collecting else None
    try:
        yield
    finally:
        with torch.no_grad():
            for m, mean, var, tracked in saved_bn:
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                if tracked is not None:
                    m.num_batches_tracked.copy_(tracked)
            if saved_stats is not None:
                load_statistics_state(module, saved_stats)


def check_resumed_config(callback: str, saved: Any, current: Any) -> None:
    """Refuse to resume a defense callback whose settings differ from the checkpoint's."""
    if saved != current:
        raise ValueError(
            f"checkpoint was trained with {callback} settings {saved}, but this callback has {current}; use the "
            "same settings to resume (or load only the weights, without ckpt_path, to fine-tune with other settings)"
        )


class Regularizer(pl.Callback):
    """Base class: coefficient schedule, layer selection, checks and configuration state.

    Subclasses set ``name`` (the log key ``qsec/reg/<name>``) and implement a hook.
    One instance of each subclass per Trainer (its ``state_key`` is the class name, and
    Lightning refuses two stateful callbacks with one key), so a resume with other
    settings reaches :meth:`load_state_dict`, which refuses it.
    """

    name: ClassVar[str] = "regularizer"
    coefficient_argument: ClassVar[str] = "coefficient"

    def __init__(self, coefficient: CoefficientLike, *, skip: Sequence[str] = ()) -> None:
        self.coefficient = Coefficient(coefficient, self.coefficient_argument)
        self.skip = check_skip(skip)

    @property
    def state_key(self) -> str:
        return type(self).__name__

    def config(self) -> dict[str, Any]:
        """The settings saved in ``state_dict`` and compared on resume."""
        return {self.coefficient_argument: self.coefficient.to_state(), "skip": list(self.skip)}

    def coefficient_at(self, trainer: pl.Trainer) -> float:
        """The coefficient for the trainer's current epoch."""
        return self.coefficient.at(trainer.current_epoch)

    def weights(self, pl_module: nn.Module) -> list[nn.Parameter]:
        """The regularized weights: conv/linear weights outside ``skip`` that require grad."""
        return [w for _, w in regularized_weights(pl_module, self.skip) if w.requires_grad]

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not pl_module.automatic_optimization:
            raise ValueError(
                f"{type(self).__name__} needs automatic optimization; with manual optimization add "
                "the term to your loss in training_step"
            )
        names = [n for n, _ in regularized_weights(pl_module)]
        for glob in self.skip:
            if not any(fnmatch.fnmatchcase(n, glob) for n in names):
                raise ValueError(f"skip entry {glob!r} matches no conv/linear layer; those layers are {names}")
        if not regularized_weights(pl_module, self.skip):
            raise ValueError(
                f"{type(self).__name__} found no conv/linear weight to regularize in "
                f"{type(pl_module).__name__} (skip={list(self.skip)})"
            )

    def log_term(self, pl_module: pl.LightningModule, value: Tensor, coefficient: float) -> None:
        pl_module.log(f"qsec/reg/{self.name}", value.detach().float())
        pl_module.log(f"qsec/reg/{self.name}_coef", float(coefficient))

    def state_dict(self) -> dict[str, Any]:
        return {"config": self.config()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_resumed_config(type(self).__name__, state_dict.get("config"), self.config())


def _optimizer_params(optimizer: Any) -> Iterator[Tensor]:
    for group in getattr(optimizer, "param_groups", []):
        yield from group["params"]


class WeightRegularizer(Regularizer):
    """A term that depends on the weights only, added once per optimizer step.

    Subclasses implement :meth:`penalty` (the term, differentiable in the weights); the
    objective gains ``coefficient * factor * penalty``.
    """

    factor: ClassVar[float] = 1.0

    def penalty(self, weights: Sequence[Tensor]) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        owned = {id(p) for p in _optimizer_params(optimizer)}
        weights = [w for w in self.weights(pl_module) if id(w) in owned]
        if not weights:
            return
        if all(p.grad is None for p in _optimizer_params(optimizer)):
            return  # the user's step skipped backward: no step, no extra gradient
        coefficient = self.coefficient_at(trainer)
        with torch.inference_mode(False), torch.enable_grad():
            value = self.penalty(weights)
            if coefficient > 0:
                grads = torch.autograd.grad(coefficient * self.factor * value, weights)
                add_to_grad(weights, grads)
        self.log_term(pl_module, value, coefficient)


class BatchRegularizer(Regularizer):
    """A term that depends on the training batch, added in ``on_after_backward``.

    The batch is held from ``on_train_batch_start`` (as :meth:`hold_batch` returns it) to
    ``on_train_batch_end``. After the user's backward, :meth:`batch_term` computes the
    term on it, differentiable in the parameters; ``coefficient * term`` is
    differentiated w.r.t. every trainable parameter, scaled by
    ``1 / accumulate_grad_batches`` and the AMP loss scale, averaged over DDP ranks and
    added to ``.grad``. The extra passes run with gradients on (also under
    ``inference_mode``), with a forked RNG and with running statistics preserved
    (:func:`preserved_running_state`). Subclasses implement :meth:`batch_term` and may
    override :meth:`hold_batch` and :meth:`log_batch_term`.

    Example:
        >>> class LogitL2(BatchRegularizer):
        ...     name = "logit_l2"
        ...     def batch_term(self, trainer, pl_module, held):
        ...         return pl_module(held[0].to(pl_module.device)).pow(2).mean()
        >>> LogitL2(1e-3).coefficient
        0.001
    """

    _batch: Any = None

    def hold_batch(self, batch: Any) -> Any:
        """What ``on_after_backward`` gets of ``batch`` (checked here, early); default the batch."""
        return batch

    def batch_term(self, trainer: pl.Trainer, pl_module: pl.LightningModule, held: Any) -> Tensor | None:
        """The term on the held batch (a differentiable scalar), or None to add nothing."""
        raise NotImplementedError  # pragma: no cover - abstract

    def log_batch_term(self, pl_module: pl.LightningModule, value: Tensor, coefficient: float) -> None:
        """Log the term (before the coefficient); default :meth:`Regularizer.log_term`."""
        self.log_term(pl_module, value, coefficient)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch = self.hold_batch(batch)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._batch = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._batch = None

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._batch is None:
            return
        coefficient = self.coefficient_at(trainer)
        if coefficient == 0:
            return
        params = [p for p in pl_module.parameters() if p.requires_grad]
        if not params or all(p.grad is None for p in params):
            return  # the user's step skipped backward
        scale = coefficient / trainer.accumulate_grad_batches
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            scale *= float(scaler.get_scale())
        devices = [pl_module.device] if pl_module.device.type == "cuda" else []
        with torch.inference_mode(False), torch.enable_grad(), preserved_running_state(pl_module):
            with torch.random.fork_rng(devices=devices):
                term = self.batch_term(trainer, pl_module, self._batch)
                if term is None:
                    return
                extra = torch.autograd.grad(scale * term, params, allow_unused=True)
        used = [(p, g.detach()) for p, g in zip(params, extra) if g is not None]
        if trainer.world_size > 1 and used:
            # Data-dependent: average over ranks, as DDP averages the loss gradient. Every rank
            # runs the same graph, so the same parameters are used on all of them.
            flat = trainer.strategy.reduce(torch.cat([g.reshape(-1) for _, g in used]), reduce_op="mean")
            used = [(p, g.view_as(p)) for (p, _), g in zip(used, torch.split(flat, [p.numel() for p, _ in used]))]
        add_to_grad([p for p, _ in used], [g for _, g in used])
        self.log_batch_term(pl_module, term.detach(), coefficient)
