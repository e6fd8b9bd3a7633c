"""Fairness-aware quantization-aware training: group-balanced distillation from the float model."""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.func import functional_call
from torch.nn import functional as F

from lightning_qsec._float_phase import in_float_phase
from lightning_qsec.batch import BatchAdapter, adapter_or_default, describe_batch
from lightning_qsec.defenses._regularizer import BatchRegularizer, CoefficientLike
from lightning_qsec.quant.inspect import is_quantized
from lightning_qsec.quant.precision import float_mode

__all__ = ["FairQuantizationTraining", "FairQATMode", "FairQATTeacher", "per_sample_kl", "group_kl"]

FairQATMode = Literal["balanced_distillation", "group_dro"]
_MODES = ("balanced_distillation", "group_dro")
FairQATTeacher = Literal["live", "frozen"]
_TEACHERS = ("live", "frozen")


def per_sample_kl(teacher_logits: Tensor, student_logits: Tensor, temperature: float) -> Tensor:
    """``T**2 * KL(softmax(teacher / T) || softmax(student / T))`` for each row, shape ``(N,)``.

    The ``T**2`` factor (Hinton, Vinyals & Dean 2015, https://arxiv.org/abs/1503.02531)
    keeps the gradient's size independent of the temperature.
    """
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    log_q = F.log_softmax(student_logits.float() / temperature, dim=1)
    return (temperature**2) * (log_p.exp() * (log_p - log_q)).sum(dim=1)


def group_kl(kl: Tensor, groups: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """Mean of ``kl`` per group and the groups present: ``(means (G,), present (G,) bool)``.

    Absent groups get a mean of 0. Differentiable in ``kl``.
    """
    groups = groups.to(kl.device).long()
    sums = torch.zeros(num_groups, dtype=kl.dtype, device=kl.device).index_add(0, groups, kl)
    counts = torch.bincount(groups, minlength=num_groups).to(kl.dtype)
    present = counts > 0
    return sums / counts.clamp_min(1), present


class FairQuantizationTraining(BatchRegularizer):
    """Distil the quantized model from its own float self, each sensitive group weighted equally.

    Quantization does not cost every group the same: compression concentrates its
    errors on under-represented groups (Hooker, Moorosi, Clark, Bengio & Denton,
    "Characterising Bias in Compressed Models", 2020, https://arxiv.org/abs/2010.03058),
    and quantization-aware training can be less fair than post-training quantization
    ("Understanding the Unfairness in Network Quantization", ICML 2025). This callback,
    used together with :class:`~lightning_qsec.callbacks.QuantizationAwareTraining`
    (listed before it), adds to the user's objective a term that pulls the quantized
    model's predictions toward the float model's (the module with every quantizer off,
    :func:`~lightning_qsec.quant.float_mode`), group by group:

    * per sample ``i``: ``kl_i = T**2 * KL(softmax(f(x_i) / T) || softmax(q(x_i) / T))``,
      ``f`` the float teacher (no gradient), ``q`` the quantized student, ``T``
      ``temperature`` (knowledge distillation, Hinton et al. 2015,
      https://arxiv.org/abs/1503.02531);
    * per group ``g`` present in the batch: ``KL_g = mean of kl_i over the rows of g``;
    * ``mode="balanced_distillation"``: ``term = mean over the present groups of KL_g``,
      so a small group's quantized-vs-float divergence counts as much as a large one's;
    * ``mode="group_dro"``: online group DRO (Sagawa, Koh, Hashimoto & Liang,
      "Distributionally Robust Neural Networks for Group Shifts", ICLR 2020,
      https://arxiv.org/abs/1911.08731, Algorithm 1): before each step the group
      weights ``w`` (``num_groups`` of them, uniform at first) are updated by
      exponentiated gradient, ``w_g <- w_g * exp(dro_step * KL_g)`` for the present
      groups, then renormalised to sum 1, and ``term = sum_g w_g * KL_g`` (absent
      groups count 0), so the group whose divergence stays largest gets the most
      weight. The weights are in :meth:`state_dict`.

    The float teacher (``teacher``): ``"live"``, the module's current weights with
    quantization off (they move with training; use it when QAT starts from scratch), or
    ``"frozen"``, the float weights as they were when quantized training started (the
    first step, or the first after ``QuantizationAwareTraining(float_epochs=N)``'s float
    epochs, during which this callback adds nothing), kept in :attr:`teacher_params`
    (and in :meth:`state_dict`, so a resume keeps them): the float model that QAT
    fine-tunes toward int4, whose predictions are the reference.
    Only parameters are frozen; buffers (BatchNorm statistics) are the live ones. Give the
    distillation time: on Adult at w4a4 with 8-bit input (``benchmarks/fair_quantization.py``)
    ten QAT epochs with the frozen teacher cut the worst group's accuracy drop by more than
    half, three epochs did not, and the live teacher made the drop larger.

    The objective becomes ``user loss + lam * term``. The user's module, loss and
    ``forward`` do not change: the term's gradient is added to ``.grad`` in
    ``on_after_backward`` (:mod:`lightning_qsec.defenses._regularizer`), scaled by
    ``1 / accumulate_grad_batches`` (and the AMP loss scale when a ``GradScaler`` runs)
    and averaged over DDP ranks. Under DDP, with ``group_dro``, the per-group KL sums
    and counts of the DRO update (and its logged per-group KLs) are summed over ranks, so
    every rank keeps the same weights; with ``balanced_distillation`` the logged
    per-group KLs are each rank's own batch. The two extra forwards (teacher and student) run in the train/eval mode
    of training, under the precision plugin's autocast, with a forked RNG, and leave
    BatchNorm running statistics and Brevitas activation statistics still being
    collected as they were (:class:`~lightning_qsec.defenses._regularizer.BatchRegularizer`).
    Cost: two extra forwards and one extra backward per batch.

    Groups are read from the batch by ``batch_adapter`` (default
    :func:`~lightning_qsec.read_batch`: ``(x, y, group)`` or a dict with a group key);
    a batch without groups is an error naming the batch's structure.

    Logged: ``qsec/fair_qat/kl`` (the term, before ``lam``), ``qsec/fair_qat/lam``,
    ``qsec/fair_qat/kl_group<g>`` (the mean KL of each group present in the step's
    batch) and, with ``group_dro``, ``qsec/fair_qat/weight_group<g>``.

    Args:
        lam: coefficient ``>= 0``, or ``(epoch, value)`` milestones (see
            :class:`~lightning_qsec.defenses._regularizer.Coefficient`). While it is 0
            nothing is computed (and DRO weights do not move).
        temperature: distillation temperature ``> 0``.
        mode: ``"balanced_distillation"`` or ``"group_dro"``.
        num_groups: number of groups; group labels must lie in ``0..num_groups-1``.
            ``None``: the datamodule's ``num_groups`` attribute if it has one, else
            ``max label + 1`` of the batches seen so far (``balanced_distillation``
            grows it when a later batch has a larger label; ``group_dro``, whose
            weights are per group, refuses that label).
        dro_step: exponentiated-gradient step size of ``group_dro``, ``> 0``.
        teacher: ``"live"`` or ``"frozen"`` (see above).
        batch_adapter: reads a batch into a :class:`~lightning_qsec.Batch` with groups.

    Raises:
        ValueError: a bad argument, manual optimization, a module that is not quantized
            when training starts, a batch without groups, or a group label out of range.

    Example:
        >>> import pytorch_lightning as pl
        >>> from lightning_qsec.callbacks import QuantizationAwareTraining
        >>> from lightning_qsec.defenses import FairQuantizationTraining
        >>> trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
        ...                      callbacks=[QuantizationAwareTraining(4, 4), FairQuantizationTraining(lam=1.0)])
        >>> # QAT fine-tuning of a trained float model toward int4, distilled from that float model:
        >>> fair = FairQuantizationTraining(lam=3.0, teacher="frozen")
    """

    name: ClassVar[str] = "fair_qat"
    coefficient_argument: ClassVar[str] = "lam"

    def __init__(
        self,
        *,
        lam: CoefficientLike = 1.0,
        temperature: float = 2.0,
        mode: FairQATMode = "balanced_distillation",
        num_groups: int | None = None,
        dro_step: float = 0.01,
        teacher: FairQATTeacher = "live",
        batch_adapter: BatchAdapter | None = None,
    ) -> None:
        super().__init__(lam)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            math.isfinite(temperature) and temperature > 0
        ):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        if num_groups is not None and (
            isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1
        ):
            raise ValueError(f"num_groups must be an integer >= 1 or None, got {num_groups!r}")
        if isinstance(dro_step, bool) or not isinstance(dro_step, (int, float)) or not (
            math.isfinite(dro_step) and dro_step > 0
        ):
            raise ValueError(f"dro_step must be a finite number > 0, got {dro_step!r}")
        if teacher not in _TEACHERS:
            raise ValueError(f"teacher must be one of {_TEACHERS}, got {teacher!r}")
        if batch_adapter is not None and not callable(batch_adapter):
            raise ValueError(
                f"batch_adapter must be a callable batch -> lightning_qsec.Batch or None, got {batch_adapter!r}"
            )
        self.temperature = float(temperature)
        self.mode: FairQATMode = mode
        self.num_groups_arg = num_groups
        self.num_groups: int | None = num_groups
        self._inferred_groups = False  # num_groups taken from the batches, not given or from the datamodule
        self.dro_step = float(dro_step)
        self.teacher: FairQATTeacher = teacher
        self.teacher_params: dict[str, Tensor] | None = None
        self._read = adapter_or_default(batch_adapter, owner=type(self).__name__)
        self.group_weights: Tensor | None = (
            torch.full((num_groups,), 1.0 / num_groups, dtype=torch.float64) if num_groups is not None else None
        )

    # ------------------------------------------------------------------ config / state
    def config(self) -> dict[str, Any]:
        return {
            "lam": self.coefficient.to_state(),
            "temperature": self.temperature,
            "mode": self.mode,
            "num_groups": self.num_groups_arg,
            "dro_step": self.dro_step,
            "teacher": self.teacher,
        }

    def state_dict(self) -> dict[str, Any]:
        weights = None if self.group_weights is None else self.group_weights.clone()
        frozen = None if self.teacher_params is None else {k: v.cpu() for k, v in self.teacher_params.items()}
        return {
            "config": self.config(),
            "num_groups": self.num_groups,
            "inferred_groups": self._inferred_groups,
            "group_weights": weights,
            "teacher_params": frozen,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.num_groups = state_dict.get("num_groups", self.num_groups)
        self._inferred_groups = bool(state_dict.get("inferred_groups", self._inferred_groups))
        weights = state_dict.get("group_weights")
        self.group_weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float64).clone()
        frozen = state_dict.get("teacher_params")
        self.teacher_params = None if frozen is None else {k: v.clone() for k, v in frozen.items()}

    # ------------------------------------------------------------------ the term
    def _set_num_groups(self, n: int) -> None:
        self.num_groups = n
        if self.group_weights is None or len(self.group_weights) != n:
            self.group_weights = torch.full((n,), 1.0 / n, dtype=torch.float64)

    def _check_groups(self, groups: Tensor, batch: Any) -> Tensor:
        if groups.dtype.is_floating_point or groups.dtype == torch.bool:
            raise ValueError(
                f"FairQuantizationTraining: group labels must be integers, got dtype {groups.dtype} "
                f"in a batch of {describe_batch(batch)}"
            )
        groups = groups.long()
        if len(groups) and int(groups.min()) < 0:
            raise ValueError(f"FairQuantizationTraining: group labels must be >= 0, got {int(groups.min())}")
        if self.num_groups is None:
            self._inferred_groups = True
            self._set_num_groups(int(groups.max()) + 1 if len(groups) else 1)
        if len(groups) and int(groups.max()) >= self.num_groups and self._inferred_groups:
            if self.mode == "balanced_distillation":
                self._set_num_groups(int(groups.max()) + 1)
        if len(groups) and int(groups.max()) >= self.num_groups:
            raise ValueError(
                f"FairQuantizationTraining: group label {int(groups.max())} is out of range for "
                f"num_groups={self.num_groups}; pass num_groups= the number of groups"
            )
        return groups

    def group_divergence(self, pl_module: torch.nn.Module, inputs: Tensor, groups: Tensor) -> tuple[Tensor, Tensor]:
        """Per-group mean KL(teacher || student) on one batch, differentiable in the student.

        Returns ``(means (num_groups,), present (num_groups,) bool)``. The teacher is
        ``pl_module`` inside :func:`~lightning_qsec.quant.float_mode`, without gradient, with
        its current weights (``teacher="live"``, or before training starts) or with
        :attr:`teacher_params` (``teacher="frozen"``); the student is ``pl_module`` as it is
        (quantized).
        """
        if self.num_groups is None:
            self._set_num_groups(int(groups.max()) + 1 if len(groups) else 1)
        assert self.num_groups is not None
        with torch.no_grad(), float_mode(pl_module):
            if self.teacher_params is None:
                teacher = pl_module(inputs)
            else:  # the frozen float weights in the same module (its buffers are the live ones)
                teacher = functional_call(pl_module, self.teacher_params, (inputs,), strict=False)
        student = pl_module(inputs)
        for name, out in (("teacher", teacher), ("student", student)):
            if not isinstance(out, Tensor) or out.dim() != 2:
                raise ValueError(
                    f"FairQuantizationTraining needs forward() to return (N, C) logits; the {name} forward returned "
                    f"{describe_batch(out)}"
                )
        kl = per_sample_kl(teacher.detach(), student, self.temperature)
        return group_kl(kl, groups, self.num_groups)

    def combine(self, means: Tensor, present: Tensor) -> Tensor:
        """The term from per-group KLs: mean over present groups, or the DRO-weighted sum."""
        if self.mode == "balanced_distillation":
            return means[present].mean()
        assert self.group_weights is not None
        return (self.group_weights.to(means) * means * present.to(means)).sum()

    def compute_term(self, pl_module: torch.nn.Module, inputs: Tensor, groups: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(term, per-group KL, present)`` on one batch, with the current :attr:`group_weights` (no update)."""
        means, present = self.group_divergence(pl_module, inputs, groups)
        return self.combine(means, present), means, present

    def dro_update(self, group_means: Tensor, present: Tensor) -> None:
        """Exponentiated-gradient step on :attr:`group_weights` (present groups only), renormalised."""
        assert self.group_weights is not None
        step = torch.where(present.cpu(), self.dro_step * group_means.detach().double().cpu(), torch.zeros(()).double())
        # in log space for stability: w <- softmax(log w + step)
        self.group_weights = torch.softmax(torch.log(self.group_weights.clamp_min(1e-300)) + step, dim=0)

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and self.num_groups is None:
            n = getattr(trainer.datamodule, "num_groups", None) if trainer.datamodule is not None else None
            if isinstance(n, int) and not isinstance(n, bool) and n >= 1:
                self._set_num_groups(n)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not is_quantized(pl_module):
            raise ValueError(
                "FairQuantizationTraining distils the quantized model from its float self and needs quantized "
                "layers; add QuantizationAwareTraining to the callbacks, listed before FairQuantizationTraining"
            )
        self._freeze_teacher(trainer, pl_module)
        if self.teacher == "frozen" and self.teacher_params is not None:
            self.teacher_params = {k: v.to(pl_module.device) for k, v in self.teacher_params.items()}

    def _freeze_teacher(self, trainer: pl.Trainer | None, pl_module: pl.LightningModule) -> None:
        """With ``teacher="frozen"``, not restored from a checkpoint, and quantized training begun (before
        its first step): take the float weights of now as the teacher."""
        if self.teacher == "frozen" and self.teacher_params is None and not in_float_phase(trainer):
            self.teacher_params = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    def hold_batch(self, batch: Any) -> tuple[Tensor, Tensor]:
        read = self._read(batch)
        if read.groups is None:
            raise ValueError(
                f"FairQuantizationTraining needs a sensitive group for every row, but the batch of "
                f"{describe_batch(batch)} has none; use batches (x, y, group), a dict with a group key, or "
                "batch_adapter= returning lightning_qsec.Batch(inputs, targets, groups)"
            )
        return read.inputs, self._check_groups(read.groups, batch)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._freeze_teacher(trainer, pl_module)  # the first batch after QAT's float epochs
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def batch_term(self, trainer: pl.Trainer, pl_module: pl.LightningModule, held: Any) -> Tensor | None:
        if in_float_phase(trainer):
            return None  # nothing to distil while QuantizationAwareTraining still trains the float model
        inputs, groups = held
        x, g = inputs.to(pl_module.device), groups.to(pl_module.device)
        assert self.num_groups is not None
        with trainer.precision_plugin.forward_context():
            means, present = self.group_divergence(pl_module, x, g)
        if self.mode == "group_dro":
            # Sagawa et al., Algorithm 1: update the weights with this batch's group losses, then step.
            with torch.no_grad():
                counts = torch.bincount(g.long(), minlength=self.num_groups).to(means)
                sums = means.detach() * counts
                if trainer.world_size > 1:
                    both = trainer.strategy.reduce(torch.cat([sums, counts]), reduce_op="sum")
                    sums, counts = both[: self.num_groups], both[self.num_groups :]
                self.dro_update(sums / counts.clamp_min(1), counts > 0)
            self._logged = ((sums / counts.clamp_min(1)).detach(), counts > 0)  # over all ranks
        else:
            self._logged = (means.detach(), present)
        return self.combine(means, present)

    def log_batch_term(self, pl_module: pl.LightningModule, value: Tensor, coefficient: float) -> None:
        means, present = self._logged
        pl_module.log("qsec/fair_qat/kl", value.float())
        pl_module.log("qsec/fair_qat/lam", float(coefficient))
        assert self.num_groups is not None
        for k in range(self.num_groups):
            if bool(present[k]):
                pl_module.log(f"qsec/fair_qat/kl_group{k}", means[k].float())
            if self.mode == "group_dro":
                assert self.group_weights is not None
                pl_module.log(f"qsec/fair_qat/weight_group{k}", float(self.group_weights[k]))
