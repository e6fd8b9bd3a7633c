"""Adversarial robustness of the float model and every precision, at validation and test."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any, Literal, get_args

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics import Metric

from lightning_qsec._validation import check_positive_int, check_seed
from lightning_qsec.attacks import apgd, diva, fgsm, pgd
from lightning_qsec.attacks._checks import check_domain, check_norm
from lightning_qsec.attacks._context import Norm, as_attack_tensor, attack_mode
from lightning_qsec.batch import BatchAdapter, adapter_or_default
from lightning_qsec.callbacks._masking import effective_tolerance, masking_flags_by_precision
from lightning_qsec.callbacks._evaluation_hook import STAGES, EvaluationCallback, Stage
from lightning_qsec.callbacks._target import quantized_target
from lightning_qsec.metrics import AttackSuccessRate, RobustAccuracy
from lightning_qsec.quant.amplification import amplification_terms
from lightning_qsec.quant.precision import float_mode
from lightning_qsec.quant.spec import Precision, PrecisionLike, parse_precisions
from lightning_qsec.report.section import Plot, ReportSection, Table

__all__ = ["RobustnessEvaluation"]

AttackName = Literal["fgsm", "pgd", "apgd"]
ATTACK_NAMES: tuple[str, ...] = get_args(AttackName)


class _Ratio(Metric):
    """``sum(numerator) / sum(denominator)``: two sum-reduced states, exact under DDP; ``nan`` on 0/0."""

    full_state_update: bool = False
    num: Tensor
    den: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("num", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("den", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, numerator: Tensor, denominator: Tensor) -> None:
        self.num += numerator.detach().sum().to(self.num.dtype)
        self.den += denominator.detach().sum().to(self.den.dtype)

    def compute(self) -> Tensor:
        return self.num / self.den if float(self.den) > 0 else torch.tensor(math.nan)


def _eps_key(eps: float) -> str:
    return f"{eps:g}"


def _check_eps_values(eps: Any, norm: Norm, clip_min: float, clip_max: float) -> list[float]:
    if isinstance(eps, (np.ndarray, torch.Tensor)):  # e.g. np.linspace(0, 0.3, 4)
        eps = eps.tolist()
    values = [eps] if isinstance(eps, (numbers.Real, float)) and not isinstance(eps, bool) else eps
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"eps must be a number or a sequence of numbers, got {eps!r}")
    out: list[float] = []
    width = clip_max - clip_min
    for value in values:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
            raise ValueError(f"eps entries must be finite numbers >= 0, got {value!r} in eps={eps!r}")
        if norm == "linf" and value > width:
            raise ValueError(
                f"eps entries must be at most clip_max - clip_min = {width:g} for norm='linf' (the largest "
                f"distance inside the input domain), got {value!r} in eps={eps!r}"
            )
        if float(value) not in out:
            out.append(float(value))
    if not out:
        raise ValueError("eps must hold at least one value")
    return sorted(out)


def _check_names(values: Any, name: str, allowed: tuple[str, ...]) -> list[str]:
    values = [values] if isinstance(values, str) else values
    if not isinstance(values, Sequence):
        raise ValueError(f"{name} must be a sequence of {', '.join(map(repr, allowed))}, got {values!r}")
    out: list[str] = []
    for value in values:
        if value not in allowed:
            raise ValueError(f"{name} entries must be one of {', '.join(map(repr, allowed))}, got {value!r}")
        if value not in out:
            out.append(value)
    if not out:
        raise ValueError(f"{name} must name at least one of {', '.join(map(repr, allowed))}")
    return out


def _check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


class RobustnessEvaluation(EvaluationCallback):
    """Robust accuracy of the float model and of each precision, per attack and eps.

    At the end of validation (every ``every_n_epochs`` epochs, never in the sanity
    check) and at test (see ``stages``), on up to ``max_samples`` evaluation samples
    (taken from the first evaluation batches; under DDP each rank attacks its own
    ``ceil(max_samples / world_size)``), it measures:

    * for the float model (quantization switched off with
      :func:`~lightning_qsec.quant.float_mode`) and every precision (bit widths changed
      in place with :func:`~lightning_qsec.quant.at_precision`), for each attack
      (:func:`~lightning_qsec.attacks.fgsm`, :func:`~lightning_qsec.attacks.pgd`,
      :func:`~lightning_qsec.attacks.apgd`, white-box on that very model) and each eps:
      robust accuracy (:class:`~lightning_qsec.metrics.RobustAccuracy`; at eps 0 the
      clean accuracy) and attack success rate
      (:class:`~lightning_qsec.metrics.AttackSuccessRate`);
    * ``transfer``: at the middle eps (``transfer_eps``), inputs crafted on the float
      model evaluated on each precision, and crafted on each precision evaluated on the
      float model (with the PGD attack if run, else APGD, else FGSM): robust accuracy of
      the receiving model, and transfer rate (among samples both models get right and
      the source gets wrong, the fraction the receiver also gets wrong);
    * ``diva``: success of :func:`~lightning_qsec.attacks.diva` at ``transfer_eps``
      (among samples both models get right, the fraction where the float model stays
      right and the quantized one turns wrong);
    * ``amplification``: the error-amplification ratio of Defensive Quantization
      (:func:`~lightning_qsec.quant.amplification.error_amplification_ratio`, one
      gradient step of size ``transfer_eps`` on each model, towards the true labels
      (``targets=y``): FGSM for ``norm="linf"``, the L2 fast gradient method for
      ``"l2"``), quantized over float;
    * the fraction of samples whose loss has a zero input gradient, and the gradient
      masking flags of :func:`~lightning_qsec.callbacks._masking.gradient_masking_flags`.

    Nothing is copied (a model never quantized gets a post-training-quantized twin,
    calibrated on ``calibrate_batches`` training batches); attacks run in eval mode with
    frozen parameters, so neither Brevitas activation statistics nor BatchNorm
    statistics move, and modes and bit widths are restored. Every attack gets a fresh
    generator seeded with ``seed``: results are deterministic. All numbers are
    torchmetrics sum-reduced states, exact across DDP ranks.

    Logged under ``qsec/robust/<precision>/`` (``qsec/robust/l2/<precision>/`` with
    ``norm="l2"``): ``<attack>/eps=<e>/acc`` and ``/asr``,
    ``clean_acc``, ``transfer/float_to_quant/{acc,rate}``,
    ``transfer/quant_to_float/{acc,rate}``, ``diva/success``, ``amplification``,
    ``zero_grad``, ``masking_flags`` (their count). Kept in :attr:`results` (latest per
    stage) and :attr:`history`, and written by
    :class:`~lightning_qsec.callbacks.SecurityReport` (tables, masking flags, and
    ``robust_accuracy_vs_eps.png``).

    Args:
        eps: perturbation radii (``0`` measures clean accuracy), in the units of ``norm``.
        attacks: ``"fgsm"``, ``"pgd"`` and/or ``"apgd"`` (FGSM only with ``norm="linf"``).
        bit_widths: precisions: ints, ``(w, a)`` pairs or strings like ``"w4a8"``.
        steps: iterations of PGD, APGD and DIVA.
        alpha: step size of PGD and DIVA; ``None``: ``2.5 * eps / steps`` per eps.
        max_samples: evaluation samples attacked (over all ranks).
        every_n_epochs: evaluate at validation every this many epochs.
        transfer: measure float ↔ quantized transfer.
        diva: measure DIVA success.
        amplification: measure the error-amplification ratio.
        norm: ``"linf"`` or ``"l2"``.
        clip_min: lower bound of the input domain.
        clip_max: upper bound of the input domain.
        calibrate_batches: training batches to calibrate a PTQ twin of a float model.
        seed: seed of every attack's random start.
        batch_adapter: reads batches; default :func:`~lightning_qsec.read_batch`.
        stages: ``"validate"`` (validation inside fit, and ``trainer.validate``) and/or
            ``"test"``.
        masking_tolerance: accuracy margin a gradient-masking check must exceed (at
            least ``1 / sqrt(samples)``, the size of sampling noise).

    Example:
        >>> from lightning_qsec.callbacks import RobustnessEvaluation
        >>> rob = RobustnessEvaluation([0, 0.1, 0.3], attacks=["fgsm", "pgd"], bit_widths=[8, 4])
        >>> [p.label for p in rob.precisions], rob.transfer_eps
        (['w8a8', 'w4a4'], 0.1)
    """

    def __init__(
        self,
        eps: Sequence[float] = (0.0, 0.05, 0.1, 0.2, 0.3),
        *,
        attacks: Sequence[AttackName] = ("fgsm", "pgd"),
        bit_widths: Sequence[PrecisionLike] = (8, 4),
        steps: int = 10,
        alpha: float | None = None,
        max_samples: int = 256,
        every_n_epochs: int = 1,
        transfer: bool = True,
        diva: bool = True,
        amplification: bool = True,
        norm: Norm = "linf",
        clip_min: float = 0.0,
        clip_max: float = 1.0,
        calibrate_batches: int = 10,
        seed: int = 0,
        batch_adapter: BatchAdapter | None = None,
        stages: Sequence[Stage] = ("validate", "test"),
        masking_tolerance: float = 0.03,
    ) -> None:
        super().__init__(every_n_epochs=every_n_epochs, stages=_check_names(stages, "stages", STAGES))  # type: ignore[arg-type]
        self.norm: Norm = check_norm(norm)
        self.clip_min, self.clip_max = check_domain(clip_min, clip_max)
        self.eps: list[float] = _check_eps_values(eps, self.norm, self.clip_min, self.clip_max)
        self.attacks: list[str] = _check_names(attacks, "attacks", ATTACK_NAMES)
        if self.norm != "linf" and "fgsm" in self.attacks:
            raise ValueError("attacks: 'fgsm' is an L-infinity attack; with norm='l2' use 'pgd' and/or 'apgd'")
        self.precisions: list[Precision] = parse_precisions(bit_widths, "bit_widths")
        self.steps = check_positive_int(steps, "steps")
        if alpha is not None and (
            isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0
        ):
            raise ValueError(f"alpha must be None (2.5 * eps / steps) or a finite number > 0, got {alpha!r}")
        self.alpha = None if alpha is None else float(alpha)
        self.max_samples = check_positive_int(max_samples, "max_samples")
        self.transfer = _check_bool(transfer, "transfer")
        self.diva = _check_bool(diva, "diva")
        self.amplification = _check_bool(amplification, "amplification")
        self.calibrate_batches = check_positive_int(calibrate_batches, "calibrate_batches")
        self.seed = check_seed(seed)
        if batch_adapter is not None and not callable(batch_adapter):
            raise ValueError(f"batch_adapter must be a callable(batch) -> Batch or None, got {batch_adapter!r}")
        self._read = adapter_or_default(batch_adapter, owner=type(self).__name__)
        self._batch_adapter = batch_adapter
        if (
            isinstance(masking_tolerance, bool)
            or not isinstance(masking_tolerance, (int, float))
            or not 0 <= masking_tolerance <= 1
        ):
            raise ValueError(f"masking_tolerance must be a number in [0, 1], got {masking_tolerance!r}")
        self.masking_tolerance = float(masking_tolerance)
        positive = [e for e in self.eps if e > 0]
        middle = self.eps[len(self.eps) // 2]
        self.transfer_eps: float | None = (middle if middle > 0 else positive[0]) if positive else None
        self.transfer_attack = next(a for a in ("pgd", "apgd", "fgsm") if a in self.attacks)
        self._cap = self.max_samples
        self._samples: list[tuple[Tensor, Tensor]] = []

    @property
    def state_key(self) -> str:
        # every setting that changes the numbers: a cheap hook at validation and a strong one at test coexist
        return self._generate_state_key(
            eps=self.eps, attacks=self.attacks, bit_widths=[p.label for p in self.precisions], norm=self.norm,
            stages=self.stages, steps=self.steps, max_samples=self.max_samples, seed=self.seed,
        )  # fmt: skip

    @property
    def log_prefix(self) -> str:
        """``qsec/robust`` (``qsec/robust/l2`` for ``norm="l2"``), so an L-infinity and an L2 hook log apart."""
        return "qsec/robust" if self.norm == "linf" else f"qsec/robust/{self.norm}"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        clash = [
            cb for cb in trainer.callbacks
            if isinstance(cb, RobustnessEvaluation) and cb is not self and cb.log_prefix == self.log_prefix
            and set(cb.stages) & set(self.stages)
        ]  # fmt: skip
        if clash:
            raise ValueError(
                f"two RobustnessEvaluation hooks measure at {sorted(set(clash[0].stages) & set(self.stages))} with "
                f"norm={self.norm!r} and would log the same {self.log_prefix}/... keys (Lightning would average "
                "them); give them different stages= or norms"
            )

    # ------------------------------------------------------------------ collection
    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._samples = []
        self._cap = -(-self.max_samples // max(int(trainer.world_size), 1))

    def _update(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        kept = sum(len(s[1]) for s in self._samples)
        if kept >= self._cap:
            return
        b = self._read(batch)
        take = self._cap - kept
        self._samples.append((b.inputs[:take].detach().clone(), b.targets[:take].detach().clone()))

    # ------------------------------------------------------------------ measurement
    def _alpha(self, eps: float) -> float:
        return self.alpha if self.alpha is not None else 2.5 * eps / self.steps

    def _generator(self, x: Tensor) -> torch.Generator:
        return torch.Generator(device=x.device).manual_seed(self.seed)

    def _attack(self, model: nn.Module, attack: str, x: Tensor, y: Tensor, eps: float) -> Tensor:
        if eps == 0:
            return x
        domain = {"clip_min": self.clip_min, "clip_max": self.clip_max}
        if attack == "fgsm":
            return fgsm(model, x, y, eps=eps, **domain)
        if attack == "pgd":
            return pgd(model, x, y, eps=eps, alpha=self._alpha(eps), steps=self.steps, norm=self.norm,
                       generator=self._generator(x), **domain)
        return apgd(model, x, y, eps=eps, steps=self.steps, norm=self.norm, seed=self.seed, **domain)

    def _one_step(self, model: nn.Module, x: Tensor, y: Tensor, eps: float) -> Tensor:
        """One gradient step of size ``eps`` in ``norm``: FGSM for linf, the L2 fast gradient method for l2."""
        domain = {"clip_min": self.clip_min, "clip_max": self.clip_max}
        if self.norm == "linf":
            return fgsm(model, x, y, eps=eps, **domain)
        return pgd(model, x, y, eps=eps, alpha=eps, steps=1, norm="l2", random_start=False, **domain)

    @staticmethod
    def _predict(model: nn.Module, x: Tensor) -> Tensor:
        with attack_mode(model), torch.no_grad():
            return model(as_attack_tensor(x)).argmax(1)

    @staticmethod
    def _zero_gradient(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """Per sample: is the input gradient of the cross-entropy exactly zero (or denormal)?"""
        with attack_mode(model):
            x_in = as_attack_tensor(x).clone().requires_grad_(True)
            loss = F.cross_entropy(model(x_in), as_attack_tensor(y).long(), reduction="sum")
            if not loss.requires_grad:  # the output does not depend differentiably on the input
                return torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
            (grad,) = torch.autograd.grad(loss, x_in, allow_unused=True)
        if grad is None:
            return torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        return grad.flatten(1).abs().amax(1) <= torch.finfo(grad.dtype).tiny

    def _configs(self, model: nn.Module) -> Iterator[tuple[str, Precision | None, Callable[[], AbstractContextManager[Any]]]]:
        yield "float", None, lambda: float_mode(model)
        for p in self.precisions:
            yield p.label, p, lambda p=p: self.precision(model, p)

    def _measure(self, model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Metric]:
        metrics: dict[str, Metric] = {}

        def metric(key: str, kind: type[Metric]) -> Metric:
            if key not in metrics:
                metrics[key] = kind().to(x.device)
            return metrics[key]

        mid = self.transfer_eps
        float_clean: Tensor | None = None
        float_mid_adv: Tensor | None = None
        float_amp: tuple[Tensor, Tensor] | None = None
        for label, precision, context in self._configs(model):
            with context():
                clean = self._predict(model, x)
                metric(f"{label}/clean_acc", RobustAccuracy).update(clean, y)
                zero = self._zero_gradient(model, x, y)
                metric(f"{label}/zero_grad", _Ratio).update(zero.float(), torch.ones_like(zero, dtype=torch.float))
                mid_adv: Tensor | None = None
                fgsm_mid: Tensor | None = None
                for attack in self.attacks:
                    for e in self.eps:
                        adv = self._attack(model, attack, x, y, e)
                        pred = self._predict(model, adv)
                        metric(f"{label}/{attack}/eps={_eps_key(e)}/acc", RobustAccuracy).update(pred, y)
                        metric(f"{label}/{attack}/eps={_eps_key(e)}/asr", AttackSuccessRate).update(clean, pred, y)
                        if e == mid and attack == self.transfer_attack:
                            mid_adv = adv
                        if e == mid and attack == "fgsm":
                            fgsm_mid = adv
                if mid is None:
                    continue
                if self.amplification:
                    if fgsm_mid is None:
                        fgsm_mid = self._one_step(model, x, y, mid)
                    terms = amplification_terms(model, x, fgsm_mid)
                    if precision is None:
                        float_amp = terms
                    else:
                        assert float_amp is not None
                        metric(f"{label}/amplification/quant", _Ratio).update(*terms)
                        metric(f"{label}/amplification/float", _Ratio).update(*float_amp)
                if precision is None:
                    float_clean, float_mid_adv = clean, mid_adv
                    continue
                assert float_clean is not None
                both = (clean == y) & (float_clean == y)
                if self.transfer:
                    assert float_mid_adv is not None and mid_adv is not None
                    # float -> quantized
                    received = self._predict(model, float_mid_adv)
                    with float_mode(model):
                        source = self._predict(model, float_mid_adv)
                    eligible = both & (source != y)
                    metric(f"{label}/transfer/float_to_quant/acc", RobustAccuracy).update(received, y)
                    metric(f"{label}/transfer/float_to_quant/rate", AttackSuccessRate).update(
                        clean[eligible], received[eligible], y[eligible]
                    )
                    # quantized -> float
                    source = self._predict(model, mid_adv)
                    with float_mode(model):
                        received = self._predict(model, mid_adv)
                    eligible = both & (source != y)
                    metric(f"{label}/transfer/quant_to_float/acc", RobustAccuracy).update(received, y)
                    metric(f"{label}/transfer/quant_to_float/rate", AttackSuccessRate).update(
                        float_clean[eligible], received[eligible], y[eligible]
                    )
                if self.diva:
                    adv = diva(model, model, x, y, eps=mid, alpha=self._alpha(mid), steps=self.steps, norm=self.norm,
                               clip_min=self.clip_min, clip_max=self.clip_max, generator=self._generator(x))
                    quant_pred = self._predict(model, adv)
                    with float_mode(model):
                        float_pred = self._predict(model, adv)
                    success = both & (float_pred == y) & (quant_pred != y)
                    metric(f"{label}/diva/success", _Ratio).update(success.float(), both.float())
        return metrics

    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Stage) -> dict[str, Any]:
        samples, self._samples = self._samples, []
        if not samples:
            raise ValueError(f"RobustnessEvaluation saw no {stage} batches: the evaluation dataloader is empty")
        x = torch.cat([s[0] for s in samples]).to(pl_module.device)
        y = torch.cat([s[1] for s in samples]).to(pl_module.device)
        model, is_twin = quantized_target(
            trainer, pl_module, calibrate_batches=self.calibrate_batches, batch_adapter=self._batch_adapter
        )
        with torch.no_grad():
            with attack_mode(model), float_mode(model):
                num_classes = int(model(as_attack_tensor(x[:1])).shape[1])
        metrics = self._measure(model, x, y)
        values = {key: float(m.compute()) for key, m in metrics.items()}  # syncs over DDP ranks
        count = trainer.strategy.reduce(torch.tensor(float(len(y)), device=x.device), reduce_op="sum")
        result = self._assemble(values, stage, trainer, is_twin, num_classes, int(count))
        root = self.log_prefix
        logs = {f"{root}/{key}": value for key, value in values.items() if "/amplification/" not in key}
        for label, entry in result["precisions"].items():
            if "amplification" in entry:
                logs[f"{root}/{label}/amplification"] = entry["amplification"]["ratio"]
            logs[f"{root}/{label}/masking_flags"] = float(len(entry["masking_flags"]))
        for name, value in logs.items():
            pl_module.log(name, math.nan if value is None else value, sync_dist=True)  # equal on every rank already
        return result

    def _assemble(
        self, values: dict[str, float], stage: str, trainer: pl.Trainer, is_twin: bool, num_classes: int,
        num_samples: int,
    ) -> dict[str, Any]:
        result: dict[str, Any] = {
            "stage": stage,
            "epoch": self.epoch(trainer),
            "global_step": int(trainer.global_step),
            "ptq_twin": is_twin,
            "num_samples": num_samples,
            "num_classes": num_classes,
            "eps": list(self.eps),
            "attacks": list(self.attacks),
            "norm": self.norm,
            "steps": self.steps,
            "alpha": self.alpha,
            "seed": self.seed,
            "transfer_eps": self.transfer_eps,
            "transfer_attack": self.transfer_attack,
            "masking_tolerance": effective_tolerance(self.masking_tolerance, num_samples),
            "precisions": {},
        }
        for label, precision in [("float", None), *((p.label, p) for p in self.precisions)]:
            entry: dict[str, Any] = {}
            if precision is not None:
                entry.update(weight_bit_width=precision.weight_bit_width, act_bit_width=precision.act_bit_width)
            entry["clean_accuracy"] = values[f"{label}/clean_acc"]
            entry["zero_gradient_fraction"] = values[f"{label}/zero_grad"]
            entry["attacks"] = {
                attack: {
                    _eps_key(e): {
                        "eps": e,
                        "robust_accuracy": values[f"{label}/{attack}/eps={_eps_key(e)}/acc"],
                        "success_rate": values[f"{label}/{attack}/eps={_eps_key(e)}/asr"],
                    }
                    for e in self.eps
                }
                for attack in self.attacks
            }
            if precision is not None and self.transfer_eps is not None:
                if self.transfer:
                    entry["transfer"] = {
                        direction: {
                            "robust_accuracy": values[f"{label}/transfer/{direction}/acc"],
                            "transfer_rate": values[f"{label}/transfer/{direction}/rate"],
                        }
                        for direction in ("float_to_quant", "quant_to_float")
                    }
                if self.diva:
                    entry["diva"] = {"success_rate": values[f"{label}/diva/success"]}
                if self.amplification:
                    quant, floating = values[f"{label}/amplification/quant"], values[f"{label}/amplification/float"]
                    ratio = quant / floating if math.isfinite(quant) and math.isfinite(floating) and floating > 0 else math.nan
                    entry["amplification"] = {"ratio": ratio, "quantized": quant, "float": floating}
            result["precisions"][label] = entry
        flags = masking_flags_by_precision(result, tolerance=self.masking_tolerance)
        for label, entry in result["precisions"].items():
            entry["masking_flags"] = flags[label]
        result["gradient_masking"] = [f"{label}: {flag}" for label, fl in flags.items() for flag in fl]
        return result

    # ------------------------------------------------------------------ report
    def report_section(self) -> ReportSection | None:
        if not self.results:
            return None
        tables: list[Table] = []
        notes: list[str] = []
        for stage, r in self.results.items():
            eps_keys = [_eps_key(e) for e in r["eps"]]
            where = f"{stage}, epoch {r['epoch']}, {r['num_samples']} samples, {r['norm']}"
            if r["ptq_twin"]:
                where += ", post-training quantized twin"
            for quantity, title in (("robust_accuracy", "robust accuracy"), ("success_rate", "attack success rate")):
                rows = [
                    [label, attack.upper(), entry["clean_accuracy"]]
                    + [entry["attacks"][attack][k][quantity] for k in eps_keys]
                    for label, entry in r["precisions"].items()
                    for attack in r["attacks"]
                ]
                tables.append(Table(
                    title=f"{stage}: {title} ({where})",
                    columns=["precision", "attack", "clean acc"] + [f"eps={k}" for k in eps_keys],
                    rows=rows,
                ))
            if r["transfer_eps"] is not None:
                rows = []
                for label, entry in r["precisions"].items():
                    if label == "float":
                        continue
                    t = entry.get("transfer", {})
                    rows.append([
                        label,
                        t.get("float_to_quant", {}).get("robust_accuracy"),
                        t.get("float_to_quant", {}).get("transfer_rate"),
                        t.get("quant_to_float", {}).get("robust_accuracy"),
                        t.get("quant_to_float", {}).get("transfer_rate"),
                        entry.get("diva", {}).get("success_rate"),
                        entry.get("amplification", {}).get("ratio"),
                    ])
                tables.append(Table(
                    title=f"{stage}: float vs quantized at eps={r['transfer_eps']:g} ({r['transfer_attack'].upper()})",
                    columns=["precision", "float→quant acc", "float→quant transfer rate", "quant→float acc",
                             "quant→float transfer rate", "DIVA success", "error amplification ratio"],
                    rows=rows,
                ))
            tables.append(Table(
                title=f"{stage}: gradient masking checks",
                columns=["precision", "zero-gradient samples", "flags"],
                rows=[[label, entry["zero_gradient_fraction"], len(entry["masking_flags"])]
                      for label, entry in r["precisions"].items()],
            ))
            if r["gradient_masking"]:
                notes += [f"Possible gradient masking ({stage}) — {flag}" for flag in r["gradient_masking"]]
                notes.append(
                    "Robust accuracy under a masked gradient overstates robustness: check with transfer, "
                    "black-box or stronger (APGD, more steps) attacks."
                )
            else:
                notes.append(
                    f"No gradient-masking flag at {stage} (gaps below {r['masking_tolerance']:.3f} on "
                    f"{r['num_samples']} samples are not detectable)."
                )
        first = next(iter(self.results.values()))
        notes.append(
            f"Attacks: {', '.join(a.upper() for a in first['attacks'])}; {first['steps']} steps, step size "
            f"{'2.5 * eps / steps' if first['alpha'] is None else first['alpha']}, seed {first['seed']}. "
            "Transfer rate: among samples both models classify right whose source model the attack fools, "
            "the fraction the receiving model also gets wrong. DIVA success: among samples both get right, "
            "float right and quantized wrong after the attack. Error amplification ratio: Defensive "
            "Quantization's normalized output over input distance, quantized over float (> 1 amplifies)."
        )
        latest = self.results.get("test") or self.results.get("validate") or first
        series = {
            f"{label} {attack.upper()}": [
                (v["eps"], v["robust_accuracy"]) for v in entry["attacks"][attack].values()
            ]
            for label, entry in latest["precisions"].items()
            for attack in latest["attacks"]
        }
        plot = Plot(
            filename="robust_accuracy_vs_eps.png",
            title=f"Robust accuracy vs eps ({latest['stage']}, {latest['norm']})",
            xlabel="eps", ylabel="robust accuracy", series=series, kind="line",
        )
        return ReportSection(
            name="robustness_evaluation", title="Adversarial robustness",
            data={"latest": self.results, "history": self.history},
            tables=tables, plots=[plot], notes=notes,
        )
