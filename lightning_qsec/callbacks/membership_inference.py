"""Membership-inference leakage of the float model and of each precision, with bootstrap intervals."""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from pytorch_lightning.utilities.model_helpers import is_overridden
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics import Metric

from lightning_qsec._eval import eval_mode
from lightning_qsec._validation import check_positive_int, check_probability, check_seed
from lightning_qsec.batch import BatchAdapter, adapter_or_default, describe_batch
from lightning_qsec.callbacks._evaluation_hook import EvaluationCallback, Stage
from lightning_qsec.callbacks._target import single_loader, quantized_target
from lightning_qsec.privacy import (
    ROC_METRICS,
    confidence_scores,
    lira_offline_scores,
    loss_threshold_scores,
    roc_curve,
)
from lightning_qsec.privacy.bootstrap import bootstrap_indices, bootstrap_metrics, percentile_interval
from lightning_qsec.privacy.roc import _roc_batch
from lightning_qsec.quant.calibration import calibrate
from lightning_qsec.quant.precision import float_mode
from lightning_qsec.quant.spec import Precision, PrecisionLike, parse_precisions
from lightning_qsec.report.markdown import format_interval
from lightning_qsec.report.section import Plot, ReportSection, Table

__all__ = ["MembershipInferenceEvaluation"]

Attack = Literal["loss", "confidence", "lira"]
ATTACKS: tuple[str, ...] = ("loss", "confidence", "lira")
ATTACK_NAMES = {"loss": "loss threshold", "confidence": "confidence threshold", "lira": "offline LiRA"}
SHORT = {"auc": "AUC", "tpr_at_1pct_fpr": "TPR@1%FPR", "tpr_at_0.1pct_fpr": "TPR@0.1%FPR", "advantage": "advantage"}
#: FPR values at which the stored ROC curves are sampled (the exact curve's best TPR at FPR <= each).
ROC_GRID: tuple[float, ...] = (0.0, 0.001, 0.002, 0.005, *(i / 100 for i in range(1, 101)))
_EVAL_BATCH = 1024


class _Reservoir:
    """A uniform random sample of at most ``size`` rows of a stream (Vitter's Algorithm R), seeded."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seen = 0
        self.inputs: Tensor | None = None
        self.targets: Tensor | None = None
        self._gen = torch.Generator().manual_seed(seed)

    def update(self, inputs: Tensor, targets: Tensor) -> None:
        n = len(targets)
        if n == 0:
            return
        if self.inputs is None or self.targets is None:
            self.inputs = inputs.new_empty((0, *inputs.shape[1:]))
            self.targets = targets.new_empty((0,))
        fill = min(self.size - len(self.targets), n)
        if fill > 0:
            self.inputs = torch.cat([self.inputs, inputs[:fill]])
            self.targets = torch.cat([self.targets, targets[:fill]])
        rest = torch.arange(fill, n)
        if len(rest):
            # Row number i (0-based, over the whole stream) replaces slot j ~ U{0..i} when j < size.
            i = self.seen + rest
            j = (torch.rand(len(rest), generator=self._gen, dtype=torch.float64) * (i + 1)).long()
            keep = j < self.size
            rows, slots = rest[keep], j[keep]
            if len(rows):  # a later row wins a slot drawn twice, as in the sequential algorithm
                order = torch.argsort(slots * n + rows)
                rows, slots = rows[order], slots[order]
                last = torch.ones_like(slots, dtype=torch.bool)
                last[:-1] = slots[1:] != slots[:-1]
                rows, slots = rows[last], slots[last]
                device = self.targets.device
                self.inputs[slots.to(device)] = inputs[rows.to(inputs.device)]
                self.targets[slots.to(device)] = targets[rows.to(targets.device)]
        self.seen += n


class _HeldOut(Metric):
    """Held-out inputs and targets in ``cat`` states, gathered over DDP ranks."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("inputs", default=[], dist_reduce_fx="cat")
        self.add_state("targets", default=[], dist_reduce_fx="cat")

    def update(self, inputs: Tensor, targets: Tensor) -> None:
        self.inputs.append(inputs)
        self.targets.append(targets)

    def compute(self) -> tuple[Tensor, Tensor] | None:
        inputs, targets = self.inputs, self.targets
        if isinstance(inputs, list):
            if not inputs:
                return None
            inputs, targets = torch.cat(inputs), torch.cat(targets)
        return inputs, targets


def _datasets(loaders: Any) -> list[Any]:
    loaders = getattr(loaders, "iterables", loaders)
    if loaders is None:
        return []
    if isinstance(loaders, dict):
        loaders = list(loaders.values())
    if not isinstance(loaders, (list, tuple)):
        loaders = [loaders]
    return [getattr(loader, "dataset", None) for loader in loaders if getattr(loader, "dataset", None) is not None]


def _forward(model: nn.Module, x: Tensor, device: torch.device) -> Tensor:
    parts = [model(x[i : i + _EVAL_BATCH].to(device)).detach().float().cpu() for i in range(0, len(x), _EVAL_BATCH)]
    out = torch.cat(parts)
    if out.ndim != 2 or out.shape[0] != len(x):
        raise ValueError(
            f"MembershipInferenceEvaluation needs the model to return logits of shape (N, C), got {tuple(out.shape)}"
        )
    return out


def _logits_per_key(
    model: nn.Module,
    x: Tensor,
    precisions: Sequence[Precision],
    device: torch.device,
    switch: Callable[[nn.Module, Precision], contextlib.AbstractContextManager[Any]],
) -> dict[str, Tensor]:
    """Logits of ``model`` on ``x`` with quantization off and at every precision (set by ``switch``), in place."""
    out: dict[str, Tensor] = {}
    with eval_mode(model), torch.no_grad():
        with float_mode(model):
            out["float"] = _forward(model, x, device)
        for p in precisions:
            with switch(model, p):
                out[p.label] = _forward(model, x, device)
    return out


def _keep_rng(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Restore the global torch RNG (CPU and ``device``) on exit: the hook must not shift the user's randomness."""
    return torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else [])


def _sampled_roc(member: Tensor, nonmember: Tensor) -> dict[str, list[float]]:
    fpr, tpr, _ = roc_curve(member, nonmember)
    grid = torch.tensor(ROC_GRID, dtype=torch.float64)
    best = torch.where(fpr[None, :] <= grid[:, None] + 1e-12, tpr[None, :], torch.zeros(1, dtype=torch.float64))
    return {"fpr": list(ROC_GRID), "tpr": best.amax(1).tolist()}


class MembershipInferenceEvaluation(EvaluationCallback):
    """Membership-inference leakage of the float model and of each precision.

    Does the model, float or quantized, give away which samples it was trained on?
    At the end of each stage in ``stages`` (``trainer.test`` by default) the hook runs
    three attacks against the float model (:func:`~lightning_qsec.quant.float_mode`)
    and against the model at every precision (:func:`~lightning_qsec.quant.at_precision`),
    in place and in eval mode, as :class:`~lightning_qsec.callbacks.PrecisionSweep` does;
    a model that was never quantized gets a post-training-quantized twin calibrated on
    ``calibrate_batches`` training batches.

    **Members and non-members.** Members are training samples: the first
    ``max_members`` from ``trainer.datamodule.train_dataloader()``, else from the
    trainer's training dataloader (during ``trainer.fit``, or the one of the last
    ``trainer.fit`` of a trainer holding this callback), else
    from the module's own ``train_dataloader()``. Non-members are the **held-out split
    of the stage**: the batches of the test dataloader(s) at ``trainer.test`` and of
    the validation dataloader(s) at ``"validate"``: a seeded uniform random sample of
    ``max_nonmembers`` of all evaluated rows (reservoir sampling, so memory stays
    bounded and a split sorted by class is still sampled evenly). Members are taken in
    the training loader's order, which is shuffled in the usual case; an unshuffled
    loader sorted by class would give members another class mix than non-members and
    bias the attacks. Non-members must not overlap the training data: a held-out
    dataloader whose dataset *is* the training dataset is refused, but overlap inside
    different dataset objects cannot be seen. Under DDP the held-out rows are gathered from all ranks,
    everything is computed on global rank zero and the results are broadcast.

    **Attacks** (``attacks``; scores from :mod:`lightning_qsec.privacy`):

    * ``"loss"``: loss threshold (Yeom et al. 2018, https://arxiv.org/abs/1709.01604).
    * ``"confidence"``: largest softmax probability (Salem et al. 2019,
      https://arxiv.org/abs/1806.01246).
    * ``"lira"``: offline LiRA (Carlini et al. 2022, https://arxiv.org/abs/2112.03570).
      The held-out set is split (seeded) into two halves; ``num_shadow`` shadow models,
      copies of the model's architecture (``copy.deepcopy`` of the quantized model,
      then ``reset_parameters()`` on every submodule that has one), train for
      ``shadow_epochs`` epochs on one half each (alternately), with Adam
      (``shadow_lr``), batch ``shadow_batch_size`` and cross-entropy in a plain torch
      loop. A quantized user module's shadows are calibrated and then trained with
      quantization on (QAT at the module's own bit widths); a PTQ twin's shadows are
      trained in float and then calibrated, as the twin was. Each sample (members are
      also assigned a half at random) is scored against the ``num_shadow / 2``
      shadows that never saw it (its OUT models), at the same precision as the
      target: a Gaussian fit of the logit-scaled confidence and a one-sided test
      (``lira_variance``: ``"global"``, one variance for all samples, which the paper
      recommends for few shadows, or ``"per_sample"``).

    For each attack and each of float and every precision: ``auc``, ``tpr_at_1pct_fpr``,
    ``tpr_at_0.1pct_fpr`` and ``advantage`` (max TPR - FPR), exact (every distinct
    score is a threshold, :func:`~lightning_qsec.privacy.roc_metrics`), each with a
    percentile bootstrap interval: ``bootstrap`` resamples (0: none), members and
    non-members resampled separately at their own sizes, the same resamples for every
    attack and precision, so ``auc_change`` (quantized minus float AUC) is paired.
    Also each model's accuracy on members and non-members, and their gap.

    **Cost**, bounded by the settings: forward passes over at most ``max_members +
    max_nonmembers`` samples for ``1 + len(bit_widths)`` precisions, by the target and
    (with LiRA) each shadow; ``num_shadow * shadow_epochs`` epochs over at most
    ``ceil(max_nonmembers / 2)`` samples for the shadows; ``bootstrap`` exact ROC
    evaluations of ``max_members + max_nonmembers`` scores per attack and precision.
    The time taken is in ``results[stage]["seconds"]``. At most ``max_members +
    max_nonmembers`` samples are held in memory (the held-out ones once per process
    under DDP). The global torch RNG is left as it was.

    Logged under ``qsec/privacy/<precision>/<attack>/<metric>`` (``<precision>``
    ``float`` or a label such as ``w4a4``), kept in :attr:`results` (latest per stage)
    and :attr:`history`, and written by :class:`~lightning_qsec.callbacks.SecurityReport`
    (a table, ROC curves per attack with one line per precision, and AUC bars).

    Errors (``ValueError``): an empty held-out set, no training data, a held-out
    dataloader over the training dataset, logits that are not ``(N, C)``, and too few
    held-out samples for LiRA's shadow models.

    Args:
        bit_widths: precisions: ints, ``(w, a)`` pairs or strings like ``"w4a8"``.
        attacks: any of ``"loss"``, ``"confidence"``, ``"lira"``.
        num_shadow: LiRA shadow models, even and ``>= 2`` (``>= 4`` with
            ``lira_variance="per_sample"``).
        shadow_epochs: training epochs of each shadow model.
        shadow_lr: Adam learning rate of the shadow models.
        shadow_batch_size: batch size of the shadow models' training.
        shadow_samples: training rows of each shadow model, a seeded random subset of
            its half (``None``: the whole half). With ``shadow_epochs``, it lets the
            shadows follow the target's training (its training-set size and epochs),
            as the paper's shadow models do.
        lira_variance: ``"global"`` or ``"per_sample"`` (see above).
        max_members: most training samples used as members.
        max_nonmembers: most held-out samples used as non-members (and for shadows).
        bootstrap: bootstrap resamples for the confidence intervals (0: none).
        confidence: confidence level of the intervals, in ``(0, 1)``.
        seed: seed of the subsampling, the halves, shadow initialisation and the bootstrap.
        calibrate_batches: training batches to calibrate a PTQ twin (and shadow models).
        batch_adapter: reads batches; default :func:`~lightning_qsec.read_batch`.
        stages: ``"test"`` (``trainer.test``) and/or ``"validate"`` (standalone
            ``trainer.validate`` and, every ``every_n_epochs`` epochs, the validation
            of ``trainer.fit``; never the sanity check).
        every_n_epochs: measure at validation during fit every this many epochs.

    Example:
        >>> from lightning_qsec.callbacks import MembershipInferenceEvaluation
        >>> mia = MembershipInferenceEvaluation(bit_widths=[8, 4], attacks=("loss", "lira"), num_shadow=4)
        >>> [p.label for p in mia.precisions], mia.attacks
        (['w8a8', 'w4a4'], ['loss', 'lira'])
    """

    empty_stage_meaning = "the held-out set is empty"

    def __init__(
        self,
        bit_widths: Sequence[PrecisionLike] = (8, 4),
        *,
        attacks: Sequence[Attack] = ATTACKS,  # type: ignore[assignment]
        num_shadow: int = 4,
        shadow_epochs: int = 20,
        shadow_lr: float = 1e-3,
        shadow_batch_size: int = 128,
        shadow_samples: int | None = None,
        lira_variance: Literal["global", "per_sample"] = "global",
        max_members: int = 2000,
        max_nonmembers: int = 2000,
        bootstrap: int = 200,
        confidence: float = 0.95,
        seed: int = 0,
        calibrate_batches: int = 10,
        batch_adapter: BatchAdapter | None = None,
        stages: Sequence[Stage] = ("test",),
        every_n_epochs: int = 1,
    ) -> None:
        self.precisions: list[Precision] = parse_precisions(bit_widths, "bit_widths")
        attacks = (attacks,) if isinstance(attacks, str) else tuple(attacks)
        unknown = [a for a in attacks if a not in ATTACKS]
        if not attacks or unknown or len(set(attacks)) != len(attacks):
            raise ValueError(f"attacks must be distinct names from {ATTACKS}, got {list(attacks)!r}")
        self.attacks: list[str] = list(attacks)
        if lira_variance not in ("global", "per_sample"):
            raise ValueError(f"lira_variance must be 'global' or 'per_sample', got {lira_variance!r}")
        self.lira_variance = lira_variance
        self.num_shadow = check_positive_int(num_shadow, "num_shadow")
        least = 4 if lira_variance == "per_sample" else 2
        if "lira" in self.attacks and (self.num_shadow % 2 or self.num_shadow < least):
            raise ValueError(
                f"num_shadow must be even and >= {least} for LiRA with lira_variance={lira_variance!r} (each "
                f"half of the held-out set trains num_shadow / 2 shadow models), got {num_shadow!r}"
            )
        self.shadow_epochs = check_positive_int(shadow_epochs, "shadow_epochs")
        if isinstance(shadow_lr, bool) or not isinstance(shadow_lr, (int, float)) or not shadow_lr > 0:
            raise ValueError(f"shadow_lr must be a positive number, got {shadow_lr!r}")
        self.shadow_lr = float(shadow_lr)
        self.shadow_batch_size = check_positive_int(shadow_batch_size, "shadow_batch_size")
        self.shadow_samples = None if shadow_samples is None else check_positive_int(shadow_samples, "shadow_samples")
        self.max_members = check_positive_int(max_members, "max_members")
        self.max_nonmembers = check_positive_int(max_nonmembers, "max_nonmembers")
        self.bootstrap = check_positive_int(bootstrap, "bootstrap", allow_zero=True)
        self.confidence = check_probability(confidence, "confidence")
        self.seed = check_seed(seed)
        self.calibrate_batches = check_positive_int(calibrate_batches, "calibrate_batches")
        super().__init__(every_n_epochs=every_n_epochs, stages=(stages,) if isinstance(stages, str) else stages)
        self._read = adapter_or_default(batch_adapter, owner=type(self).__name__)
        self._batch_adapter = batch_adapter
        self._target: nn.Module | None = None
        self._is_twin = False
        self._store: _Reservoir | None = None
        self._members: tuple[Any, str] | None = None
        self._fit_loader: Any = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(bit_widths=[p.label for p in self.precisions], attacks=self.attacks)

    @property
    def keys(self) -> list[str]:
        """``"float"`` and the precision labels, in order."""
        return ["float"] + [p.label for p in self.precisions]

    # ------------------------------------------------------------------ data
    def _member_loader(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[Any, str]:
        dm = trainer.datamodule
        if dm is not None and is_overridden("train_dataloader", dm):
            return single_loader(dm.train_dataloader()), "train_dataloader() of the datamodule"
        if trainer.train_dataloader is not None:
            return single_loader(trainer.train_dataloader), "training dataloader of the trainer"
        if self._fit_loader is not None:  # Lightning drops the trainer's loaders when a new stage starts
            return self._fit_loader, "training dataloader of the trainer's last fit"
        if is_overridden("train_dataloader", pl_module):
            return single_loader(pl_module.train_dataloader()), "train_dataloader() of the LightningModule"
        raise ValueError(
            "MembershipInferenceEvaluation needs the training samples (the members): give the trainer a "
            "datamodule with train_dataloader(), or call trainer.fit(...) on this trainer before "
            "trainer.test(...)/validate(...)"
        )

    def _check_disjoint(self, trainer: pl.Trainer, member_loader: Any, stage: Stage) -> None:
        train = getattr(member_loader, "dataset", None)
        held_out = _datasets(trainer.test_dataloaders if stage == "test" else trainer.val_dataloaders)
        if train is not None and any(d is train for d in held_out):
            raise ValueError(
                f"MembershipInferenceEvaluation: the {stage} dataloader reads the training dataset itself, so "
                "its samples are members, not held-out non-members; evaluate on a held-out split"
            )

    def _collect_members(self, loader: Any) -> tuple[Tensor, Tensor]:
        xs, ys, n = [], [], 0
        for i, batch in enumerate(loader):
            b = self._read(batch)
            if b.inputs.ndim == 0 or len(b.inputs) != len(b.targets):
                raise ValueError(f"training batch {i} is {describe_batch(batch)}: expected inputs (N, ...)")
            take = self.max_members - n
            xs.append(b.inputs[:take].detach().cpu())
            ys.append(b.targets[:take].detach().cpu())
            n += len(ys[-1])
            if n >= self.max_members:
                break
        if n == 0:
            raise ValueError(
                "MembershipInferenceEvaluation: the training dataloader (the members) is empty; membership "
                "inference needs training samples and held-out samples"
            )
        return torch.cat(xs), torch.cat(ys).long()

    # ------------------------------------------------------------------ lifecycle
    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        stage: Stage = "test" if trainer.testing else "validate"
        with _keep_rng(pl_module.device):  # building a PTQ twin and iterating loaders draw random numbers
            members = self._member_loader(trainer, pl_module)
            self._check_disjoint(trainer, members[0], stage)
            if trainer.limit_train_batches not in (None, 1.0) or trainer.max_steps not in (None, -1):
                rank_zero_warn(
                    "MembershipInferenceEvaluation takes its members from the training dataloader, but this "
                    "trainer limits training (limit_train_batches or max_steps): some members may never have "
                    "been trained on, which pulls the AUC toward 0.5 and understates leakage"
                )
            self._members = members
            self._target, self._is_twin = quantized_target(
                trainer, pl_module, calibrate_batches=self.calibrate_batches, batch_adapter=self._batch_adapter
            )
        self._store = _Reservoir(self.max_nonmembers, self.seed + trainer.global_rank)

    def _update(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        assert self._store is not None
        b = self._read(batch)
        self._store.update(b.inputs.detach(), b.targets.detach().long())

    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Stage) -> dict[str, Any]:
        assert self._store is not None and self._members is not None
        gather = _HeldOut().to(pl_module.device)
        if self._store.targets is not None and len(self._store.targets):
            gather.update(self._store.inputs.to(pl_module.device), self._store.targets.to(pl_module.device))
        held_out = gather.compute()  # every rank's rows (a collective call under DDP)
        target, members, self._store, self._target, self._members = self._target, self._members, None, None, None
        assert target is not None
        if held_out is None or len(held_out[1]) == 0:
            raise ValueError(
                f"MembershipInferenceEvaluation: the held-out set is empty (no {stage} samples); membership "
                "inference needs held-out non-members to compare the training samples with"
            )
        result: dict[str, Any] | None = None
        if trainer.is_global_zero:
            # Shadow training needs autograd, and the evaluation loop runs in inference mode.
            with torch.inference_mode(False), _keep_rng(pl_module.device):
                result = self._measure(trainer, pl_module, target, members, held_out, stage)
        if trainer.world_size > 1:
            result = trainer.strategy.broadcast(result, src=0)
        assert result is not None
        for key in self.keys:
            entry = result["float"] if key == "float" else result["precisions"][key]
            for attack, values in entry["attacks"].items():
                for metric in ROC_METRICS:
                    pl_module.log(f"qsec/privacy/{key}/{attack}/{metric}", values[metric]["value"],
                                  sync_dist=True)  # equal on every rank already
        return result

    # ------------------------------------------------------------------ measurement
    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, target: nn.Module,
                 members: tuple[Any, str], held_out: tuple[Tensor, Tensor], stage: Stage) -> dict[str, Any]:
        start = time.perf_counter()
        device = pl_module.device
        gen = torch.Generator().manual_seed(self.seed)
        x_n, y_n = held_out[0].cpu().clone(), held_out[1].cpu().clone()  # normal tensors, not inference ones
        if len(y_n) > self.max_nonmembers:
            keep = torch.randperm(len(y_n), generator=gen)[: self.max_nonmembers].sort().values
            x_n, y_n = x_n[keep], y_n[keep]
        x_m, y_m = self._collect_members(members[0])
        x_m, y_m = x_m.clone(), y_m.clone()
        n_m, n_n = len(y_m), len(y_n)
        x_all, y_all = torch.cat([x_m, x_n]), torch.cat([y_m, y_n])
        logits = _logits_per_key(target, x_all, self.precisions, device, self.precision)
        lira_info: dict[str, Any] | None = None
        shadow_logits: list[dict[str, Tensor]] = []
        halves = torch.zeros(0, dtype=torch.long)
        if "lira" in self.attacks:
            shadow_start = time.perf_counter()
            halves, shadow_logits, sizes = self._shadows(target, x_all, y_all, n_m, device, gen)
            lira_info = {
                "num_shadow": self.num_shadow, "shadow_epochs": self.shadow_epochs, "shadow_lr": self.shadow_lr,
                "shadow_batch_size": self.shadow_batch_size, "shadow_train_samples": sizes,
                "shadow_samples": self.shadow_samples,
                "out_shadows_per_sample": self.num_shadow // 2, "variance": self.lira_variance,
                "shadow_training": "QAT at the module's bit widths" if not self._is_twin else "float, then PTQ",
                "seconds": time.perf_counter() - shadow_start,
            }
        scores: dict[tuple[str, str], tuple[Tensor, Tensor]] = {}
        for key in self.keys:
            for attack in self.attacks:
                s = self._scores(attack, logits[key], y_all, [sl[key] for sl in shadow_logits], halves)
                scores[key, attack] = (s[:n_m], s[n_m:])
        entries = self._entries(logits, y_all, n_m, scores)
        result: dict[str, Any] = {
            "stage": stage,
            "epoch": self.epoch(trainer),
            "global_step": int(trainer.global_step),
            "ptq_twin": self._is_twin,
            "members": n_m,
            "nonmembers": n_n,
            "member_source": members[1],
            "nonmember_source": f"{stage} dataloader(s)",
            "attacks": list(self.attacks),
            "lira": lira_info,
            "bootstrap": {
                "resamples": self.bootstrap, "confidence": self.confidence, "seed": self.seed,
                "method": "percentile; members and non-members resampled separately; paired across precisions",
            },
            "float": entries["float"],
            "precisions": {},
        }
        for p in self.precisions:
            result["precisions"][p.label] = {
                "weight_bit_width": p.weight_bit_width, "act_bit_width": p.act_bit_width, **entries[p.label]
            }
        result["seconds"] = time.perf_counter() - start
        return result

    def _scores(self, attack: str, logits: Tensor, targets: Tensor, shadow: list[Tensor], halves: Tensor) -> Tensor:
        if attack == "loss":
            return loss_threshold_scores(logits, targets)
        if attack == "confidence":
            return confidence_scores(logits, targets, kind="max")
        # Each sample's OUT shadows: those trained on the other half (shadow k trained on half k % 2).
        first = halves[:, None] == 0
        out = torch.stack([torch.where(first, shadow[2 * j + 1], shadow[2 * j]) for j in range(len(shadow) // 2)])
        return lira_offline_scores(logits, targets, out, variance=self.lira_variance)

    def _entries(self, logits: dict[str, Tensor], targets: Tensor, n_m: int,
                 scores: dict[tuple[str, str], tuple[Tensor, Tensor]]) -> dict[str, dict[str, Any]]:
        n_n = len(targets) - n_m
        idx = bootstrap_indices(n_m, n_n, self.bootstrap, self.seed) if self.bootstrap else None
        boot: dict[tuple[str, str], dict[str, Tensor]] = {}
        out: dict[str, dict[str, Any]] = {}
        for key in self.keys:
            correct = (logits[key].argmax(1) == targets).double()
            member_acc, nonmember_acc = float(correct[:n_m].mean()), float(correct[n_m:].mean())
            entry: dict[str, Any] = {
                "member_accuracy": member_acc, "nonmember_accuracy": nonmember_acc,
                "generalization_gap": member_acc - nonmember_acc, "attacks": {},
            }
            for attack in self.attacks:
                member, nonmember = scores[key, attack]
                point = {k: float(v[0]) for k, v in _roc_batch(member[None], nonmember[None]).items()}
                a: dict[str, Any] = {m: {"value": point[m]} for m in ROC_METRICS}
                if idx is not None:
                    boot[key, attack] = bootstrap_metrics(member, nonmember, *idx)
                    for m in ROC_METRICS:
                        low, high = percentile_interval(boot[key, attack][m], self.confidence)
                        a[m].update(ci_low=low, ci_high=high)
                if key != "float":
                    change = {"value": point["auc"] - out["float"]["attacks"][attack]["auc"]["value"]}
                    if idx is not None:
                        diff = boot[key, attack]["auc"] - boot["float", attack]["auc"]
                        change["ci_low"], change["ci_high"] = percentile_interval(diff, self.confidence)
                    a["auc_change"] = change
                a["roc"] = _sampled_roc(member, nonmember)
                entry["attacks"][attack] = a
            out[key] = entry
        return out

    # ------------------------------------------------------------------ shadow models
    def _shadows(self, target: nn.Module, x: Tensor, y: Tensor, n_m: int, device: torch.device,
                 gen: torch.Generator) -> tuple[Tensor, list[dict[str, Tensor]], list[int]]:
        """Train the shadow models; ``(half of each sample, logits per shadow and key, train sizes)``."""
        n_n = len(y) - n_m
        if n_n < 4:
            raise ValueError(
                f"MembershipInferenceEvaluation: LiRA trains shadow models on two halves of the held-out set, "
                f"which needs at least 4 held-out samples, got {n_n}; add held-out data or drop 'lira' from attacks"
            )
        nonmember_half = torch.zeros(n_n, dtype=torch.long)
        nonmember_half[torch.randperm(n_n, generator=gen)[n_n // 2 :]] = 1
        member_half = torch.zeros(n_m, dtype=torch.long)
        member_half[torch.randperm(n_m, generator=gen)[n_m // 2 :]] = 1
        halves = torch.cat([member_half, nonmember_half])
        logits, sizes = [], []
        for k in range(self.num_shadow):
            rows = n_m + (nonmember_half == k % 2).nonzero(as_tuple=True)[0]
            if self.shadow_samples is not None and self.shadow_samples < len(rows):
                rows = rows[torch.randperm(len(rows), generator=gen)[: self.shadow_samples].sort().values]
            shadow = self._train_shadow(target, x[rows], y[rows], k, device)
            logits.append(_logits_per_key(shadow, x, self.precisions, device, self.precision))
            sizes.append(len(rows))
            del shadow
        return halves, logits, sizes

    def _train_shadow(self, target: nn.Module, x: Tensor, y: Tensor, k: int, device: torch.device) -> nn.Module:
        with torch.enable_grad(), _keep_rng(device):
            torch.manual_seed(self.seed * 1000 + k)
            shadow = copy.deepcopy(target)
            for module in shadow.modules():
                reset = getattr(module, "reset_parameters", None)
                if callable(reset):
                    reset()
            batches = [(x[i : i + self.shadow_batch_size], y[i : i + self.shadow_batch_size])
                       for i in range(0, len(y), self.shadow_batch_size)]
            if not self._is_twin:  # QAT model: fresh activation scales, then quantization-aware training
                calibrate(shadow, batches, self.calibrate_batches)
            params = [p for p in shadow.parameters() if p.requires_grad]
            if not params:
                raise ValueError(
                    "MembershipInferenceEvaluation: the model has no trainable parameters to train shadow models"
                )
            optimizer = torch.optim.Adam(params, lr=self.shadow_lr)
            order_gen = torch.Generator().manual_seed(self.seed * 1000 + k)
            shadow.train()
            context = float_mode(shadow) if self._is_twin else contextlib.nullcontext()
            with context:
                for _ in range(self.shadow_epochs):
                    perm = torch.randperm(len(y), generator=order_gen)
                    for i in range(0, len(y), self.shadow_batch_size):
                        idx = perm[i : i + self.shadow_batch_size]
                        loss = F.cross_entropy(shadow(x[idx].to(device)), y[idx].to(device))
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        optimizer.step()
            shadow.eval()
            if self._is_twin:  # float-trained like the user's module: post-training calibration, like the twin
                calibrate(shadow, batches, self.calibrate_batches)
        return shadow

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_loader = single_loader(trainer.train_dataloader)

    # ------------------------------------------------------------------ report
    def report_section(self) -> ReportSection | None:
        if not self.results:
            return None
        tables: list[Table] = []
        plots: list[Plot] = []
        level = f"{self.confidence:.0%}"
        for stage, r in self.results.items():
            where = (f"{stage}, epoch {r['epoch']}, {r['members']} members vs {r['nonmembers']} held-out"
                     f"{', post-training quantized twin' if r['ptq_twin'] else ''}")
            entries = {"float": r["float"], **r["precisions"]}
            rows = []
            for key, e in entries.items():
                for attack in r["attacks"]:
                    a = e["attacks"][attack]
                    rows.append([key, ATTACK_NAMES[attack], *[format_interval(a[m], 3) for m in ROC_METRICS],
                                 format_interval(a.get("auc_change"), 3)])
            tables.append(Table(
                title=f"Membership inference per precision ({where}; value [{level} bootstrap CI])",
                columns=["precision", "attack", *[SHORT[m] for m in ROC_METRICS], "Δ AUC vs float"], rows=rows,
            ))
            tables.append(Table(
                title=f"Accuracy on members and held-out samples ({stage})",
                columns=["precision", "member accuracy", "held-out accuracy", "generalization gap"],
                rows=[[k, e["member_accuracy"], e["nonmember_accuracy"], e["generalization_gap"]]
                      for k, e in entries.items()],
            ))
        latest = self.results.get("test") or self.results.get("validate") or {}
        if latest:
            entries = {"float": latest["float"], **latest["precisions"]}
            for attack in latest["attacks"]:
                series: dict[str, list[tuple[Any, float]]] = {
                    f"{k} (AUC {e['attacks'][attack]['auc']['value']:.3f})":
                        list(zip(e["attacks"][attack]["roc"]["fpr"], e["attacks"][attack]["roc"]["tpr"]))
                    for k, e in entries.items()
                }
                series["chance"] = [(0.0, 0.0), (1.0, 1.0)]
                plots.append(Plot(
                    filename=f"membership_roc_{attack}.png",
                    title=f"Membership inference ROC: {ATTACK_NAMES[attack]} ({latest['stage']})",
                    xlabel="false positive rate (held-out called member)",
                    ylabel="true positive rate (members found)", series=series, kind="line",
                ))
            plots.append(Plot(
                filename="membership_auc.png", title=f"Membership-inference AUC per precision ({latest['stage']})",
                xlabel="precision", ylabel="AUC (0.5: no leakage)",
                series={ATTACK_NAMES[a]: [(k, e["attacks"][a]["auc"]["value"]) for k, e in entries.items()]
                        for a in latest["attacks"]},
                kind="bar", hlines={"chance": 0.5},
            ))
        notes = [
            "Members: training samples; non-members: held-out samples of the evaluated split. AUC 0.5 means no "
            "measurable leakage: read the AUC interval against 0.5. The advantage is a maximum over thresholds (an "
            "upper bound for an attacker who must choose one): it is above 0 even for an attack that learns "
            "nothing, so its interval cannot show 'no leakage'.",
            "Attacks: loss threshold (Yeom et al. 2018), largest-softmax confidence (Salem et al. 2019), offline "
            "LiRA with OUT shadow models trained on held-out halves (Carlini et al. 2022).",
            f"Intervals: {self.bootstrap} bootstrap resamples (members and non-members resampled separately), "
            f"percentile method, seed {self.seed}; Δ AUC uses paired resamples. With N non-members an FPR below "
            "1/N allows no false positive: the TPR at 1% FPR needs at least 100 non-members and at 0.1% FPR at "
            "least 1,000; with fewer, that column is the TPR at zero false positives.",
        ]
        return ReportSection(
            name="membership_inference", title="Membership inference under quantization",
            data={"latest": self.results, "history": self.history}, tables=tables, plots=plots, notes=notes,
        )
