"""Group fairness of the float model and of each precision, with bootstrap confidence intervals."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torchmetrics import Metric

from lightning_qsec._eval import eval_mode
from lightning_qsec._validation import check_positive_int, check_probability, check_seed
from lightning_qsec.batch import BatchAdapter, adapter_or_default, describe_batch
from lightning_qsec.callbacks._evaluation_hook import EvaluationCallback, Stage
from lightning_qsec.callbacks._target import quantized_target
from lightning_qsec.metrics.functional._groups import (
    check_group_counts,
    check_groups,
    check_rate_denominators,
    ratio,
    spread,
)
from lightning_qsec.metrics.functional.demographic_parity import (
    _demographic_parity_difference_from_counts,
    _demographic_parity_ratio_from_counts,
)
from lightning_qsec.metrics.functional.equalized_odds import (
    _equal_opportunity_difference_from_counts,
    _equalized_odds_difference_from_counts,
)
from lightning_qsec.metrics.functional.quantization_induced_disparity import (
    _group_accuracy_drop_from_counts,
    _qid_from_counts,
)
from lightning_qsec.quant.precision import float_mode
from lightning_qsec.quant.spec import Precision, PrecisionLike, parse_precisions
from lightning_qsec.report.markdown import format_interval
from lightning_qsec.report.section import Plot, ReportSection, Table

__all__ = ["FairnessEvaluation"]


#: Metrics reported for the float model and every precision; the binary-only ones last.
ALL_METRICS = ("worst_group_accuracy", "accuracy_difference")
BINARY_METRICS = (
    "demographic_parity_difference",
    "demographic_parity_ratio",
    "equalized_odds_difference",
    "equal_opportunity_difference",
)
SHORT = {
    "worst_group_accuracy": "worst-group acc",
    "accuracy_difference": "acc difference",
    "demographic_parity_difference": "DP difference",
    "demographic_parity_ratio": "DP ratio",
    "equalized_odds_difference": "EO difference",
    "equal_opportunity_difference": "EOpp difference",
    "quantization_induced_disparity": "quantization-induced disparity",
}
_CHUNK_ELEMENTS = 2_000_000  # resample weights held at once (float64): about 16 MB


class _Predictions(Metric):
    """Rows ``(target, group, float pred, pred at each precision)`` in a cat state, gathered over DDP."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("rows", default=[], dist_reduce_fx="cat")

    def update(self, rows: Tensor) -> None:
        self.rows.append(rows)

    def compute(self) -> Tensor:
        rows = self.rows
        if isinstance(rows, Tensor):
            return rows
        return torch.cat(rows) if rows else torch.zeros(0, 0, dtype=torch.long)


def _counts(target: Tensor, groups: Tensor, preds: dict[str, Tensor], num_groups: int, binary: bool,
            weights: Tensor | None = None) -> dict[str, Tensor]:
    """Per-group count tensors ``(R, G)`` for ``R`` resamples (``weights (R, N)``; ``None``: the sample itself)."""
    cols: dict[str, Tensor] = {"total": torch.ones_like(target, dtype=torch.float64)}
    pos = target == 1
    if binary:
        cols["pos"] = pos.double()
        cols["neg"] = (~pos).double()
    for key, p in preds.items():
        cols[f"{key}/correct"] = (p == target).double()
        if binary:
            sel = p == 1
            cols[f"{key}/selected"] = sel.double()
            cols[f"{key}/tp"] = (sel & pos).double()
            cols[f"{key}/fp"] = (sel & ~pos).double()
    names = list(cols)
    features = torch.stack([cols[n] for n in names], dim=1)  # (N, M)
    w = torch.ones(1, len(target), dtype=torch.float64) if weights is None else weights
    out = torch.zeros(w.shape[0], num_groups, len(names), dtype=torch.float64)
    for g in range(num_groups):
        idx = (groups == g).nonzero(as_tuple=True)[0]
        out[:, g] = w[:, idx] @ features[idx]
    return {n: out[..., i] for i, n in enumerate(names)}


def _values(c: dict[str, Tensor], keys: Sequence[str], binary: bool) -> dict[str, Tensor]:
    """Every reported number, as ``(R,)`` tensors, from per-group counts ``(R, G)``."""
    out: dict[str, Tensor] = {}
    for key in keys:
        acc = ratio(c[f"{key}/correct"], c["total"])
        out[f"{key}/accuracy"] = ratio(c[f"{key}/correct"].sum(-1), c["total"].sum(-1))
        for g in range(acc.shape[-1]):
            out[f"{key}/group{g}_accuracy"] = acc[..., g]
        out[f"{key}/worst_group_accuracy"] = acc.amin(-1)
        out[f"{key}/accuracy_difference"] = spread(acc)
        if binary:
            sel, tp, fp = c[f"{key}/selected"], c[f"{key}/tp"], c[f"{key}/fp"]
            out[f"{key}/demographic_parity_difference"] = _demographic_parity_difference_from_counts(sel, c["total"])
            out[f"{key}/demographic_parity_ratio"] = _demographic_parity_ratio_from_counts(sel, c["total"])
            out[f"{key}/equalized_odds_difference"] = _equalized_odds_difference_from_counts(tp, c["pos"], fp, c["neg"])
            out[f"{key}/equal_opportunity_difference"] = _equal_opportunity_difference_from_counts(tp, c["pos"])
    metrics = ALL_METRICS + (BINARY_METRICS if binary else ())
    for key in keys[1:]:
        for m in metrics:
            out[f"{key}/{m}_change"] = out[f"{key}/{m}"] - out[f"float/{m}"]
        out[f"{key}/quantization_induced_disparity"] = _qid_from_counts(
            c["float/correct"], c[f"{key}/correct"], c["total"]
        )
        drops = _group_accuracy_drop_from_counts(c["float/correct"], c[f"{key}/correct"], c["total"])
        for g in range(drops.shape[-1]):
            out[f"{key}/group{g}_accuracy_drop"] = drops[..., g]
    return out


def _bootstrap(target: Tensor, groups: Tensor, preds: dict[str, Tensor], num_groups: int, binary: bool,
               resamples: int, confidence: float, seed: int) -> dict[str, Any]:
    """Percentile intervals of every number, resampling within each group (group sizes fixed)."""
    gen = torch.Generator().manual_seed(seed)
    n = len(target)
    chunk = max(1, _CHUNK_ELEMENTS // max(n, 1))
    members = [(groups == g).nonzero(as_tuple=True)[0] for g in range(num_groups)]
    parts: list[dict[str, Tensor]] = []
    done = 0
    while done < resamples:
        r = min(chunk, resamples - done)
        w = torch.zeros(r, n, dtype=torch.float64)
        for idx in members:
            draw = idx[torch.randint(len(idx), (r, len(idx)), generator=gen)]
            w.scatter_add_(1, draw, torch.ones(r, len(idx), dtype=torch.float64))
        parts.append(_values(_counts(target, groups, preds, num_groups, binary, w), list(preds), binary))
        done += r
    alpha = (1.0 - confidence) / 2
    q = torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64)
    out: dict[str, Any] = {}
    for name in parts[0]:
        values = torch.cat([p[name] for p in parts])
        finite = values[~values.isnan()]
        low, high = (torch.quantile(finite, q).tolist() if len(finite) else [math.nan, math.nan])
        out[name] = {"ci_low": low, "ci_high": high, "undefined_resamples": int(values.isnan().sum())}
    return out


class FairnessEvaluation(EvaluationCallback):
    """Group fairness of the float model and of each precision, and its change under quantization.

    At the end of validation (every ``every_n_epochs`` epochs, never in the sanity
    check) and at test, each evaluation batch is read through the batch adapter, which
    must give sensitive groups (``(x, y, group)`` batches, or a dict with a group key);
    a batch without groups is a ``ValueError`` naming its structure. The batch is run
    through the float model (:func:`~lightning_qsec.quant.float_mode`) and through the
    model at every precision (:func:`~lightning_qsec.quant.at_precision`), in place, in
    eval mode, as :class:`~lightning_qsec.callbacks.PrecisionSweep` does; a model that
    was never quantized gets a post-training-quantized twin calibrated on
    ``calibrate_batches`` training batches.

    Predicted labels, targets and groups are kept (one int64 row per sample, in a
    torchmetrics ``cat`` state gathered over DDP ranks, so memory grows with the
    evaluation set) and, at epoch end, every rank computes from all of them, with
    fairlearn's definitions (``method="between_groups"``; see
    :mod:`lightning_qsec.metrics`):

    * ``accuracy``, per-group accuracy, ``worst_group_accuracy`` and
      ``accuracy_difference`` (largest minus smallest group accuracy), for any number
      of classes;
    * for binary tasks (2 classes, targets 0/1) also ``demographic_parity_difference``,
      ``demographic_parity_ratio``, ``equalized_odds_difference`` and
      ``equal_opportunity_difference``;
    * for each precision, the change of each of these numbers from float (quantized
      minus float), ``quantization_induced_disparity`` (worst group's accuracy drop
      minus the overall drop) and each group's accuracy drop.

    Confidence intervals: ``bootstrap`` resamples (0: none) on global rank zero,
    broadcast to the other ranks. Each resample draws, with replacement and within each
    group, as many samples as the group has (a stratified bootstrap: group sizes stay
    fixed, so no resample loses a group); the same resample serves the float model and
    every precision, so changes are paired. Intervals are percentile intervals at
    ``confidence``, seeded with ``seed``; resamples where a number is undefined (e.g. a
    group without positives) are left out and counted.

    Logged under ``qsec/fair/<precision>/<metric>`` with ``<precision>`` ``float`` or a
    label such as ``w4a4`` (``group<g>_accuracy``, ``<metric>_change``,
    ``quantization_induced_disparity`` ...), kept in :attr:`results` (latest per stage)
    and :attr:`history`, and written by :class:`~lightning_qsec.callbacks.SecurityReport`
    (tables of each gap with its interval, grouped bar plots of per-group accuracy).

    Errors: besides a batch without groups, a group label outside ``0..num_groups-1``,
    a group with no or a single sample, a binary task where a group has no positive or
    no negative targets, and empty evaluation data raise a ``ValueError``.

    Args:
        bit_widths: precisions: ints, ``(w, a)`` pairs or strings like ``"w4a8"``.
        num_groups: number of groups (labels ``0..num_groups-1``); default the
            datamodule's ``num_groups``, else ``max(group) + 1`` over the evaluation data.
        group_names: names of the groups for the report; default the datamodule's
            ``group_names``, else ``"group 0"``, ...
        every_n_epochs: evaluate at validation every this many epochs.
        calibrate_batches: training batches to calibrate a PTQ twin of a float model.
        bootstrap: bootstrap resamples for the confidence intervals (0: none).
        confidence: confidence level of the intervals, in ``(0, 1)``.
        seed: seed of the bootstrap.
        batch_adapter: reads batches; default :func:`~lightning_qsec.read_batch`.

    Example:
        >>> from lightning_qsec.callbacks import FairnessEvaluation
        >>> fair = FairnessEvaluation(bit_widths=[8, 4], bootstrap=200)
        >>> [p.label for p in fair.precisions]
        ['w8a8', 'w4a4']
    """

    def __init__(
        self,
        bit_widths: Sequence[PrecisionLike] = (8, 4, 2),
        *,
        num_groups: int | None = None,
        group_names: Sequence[str] | None = None,
        every_n_epochs: int = 1,
        calibrate_batches: int = 10,
        bootstrap: int = 1000,
        confidence: float = 0.95,
        seed: int = 0,
        batch_adapter: BatchAdapter | None = None,
    ) -> None:
        super().__init__(every_n_epochs=every_n_epochs)
        self.precisions: list[Precision] = parse_precisions(bit_widths, "bit_widths")
        self.num_groups = None if num_groups is None else check_positive_int(num_groups, "num_groups")
        if group_names is not None:
            if isinstance(group_names, str) or not all(isinstance(n, str) for n in group_names):
                raise ValueError(f"group_names must be a sequence of strings, got {group_names!r}")
            if self.num_groups is not None and len(group_names) != self.num_groups:
                raise ValueError(f"group_names has {len(group_names)} names but num_groups={self.num_groups}")
        self.group_names = None if group_names is None else list(group_names)
        self.calibrate_batches = check_positive_int(calibrate_batches, "calibrate_batches")
        self.bootstrap = check_positive_int(bootstrap, "bootstrap", allow_zero=True)
        self.confidence = check_probability(confidence, "confidence")
        self.seed = check_seed(seed)
        self._read = adapter_or_default(batch_adapter, owner=type(self).__name__)
        self._batch_adapter = batch_adapter
        self._target: nn.Module | None = None
        self._is_twin = False
        self._store: _Predictions | None = None
        self._num_classes: int | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(bit_widths=[p.label for p in self.precisions])

    @property
    def keys(self) -> list[str]:
        """``"float"`` and the precision labels, in order."""
        return ["float"] + [p.label for p in self.precisions]

    # ------------------------------------------------------------------ lifecycle
    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._target, self._is_twin = quantized_target(
            trainer, pl_module, calibrate_batches=self.calibrate_batches, batch_adapter=self._batch_adapter
        )
        self._store = _Predictions().to(pl_module.device)
        self._num_classes = None

    def _update(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        assert self._target is not None and self._store is not None
        b = self._read(batch)
        if b.groups is None:
            raise ValueError(
                f"FairnessEvaluation needs a sensitive group for every sample, but evaluation batch {batch_idx} "
                f"is {describe_batch(batch)}, read as (x, y) without groups. Return (x, y, group) batches "
                "(e.g. lightning_qsec.data.AdultDataModule), a dict with a 'group' key, or pass "
                "batch_adapter=callable(batch) -> lightning_qsec.Batch(inputs, targets, groups)"
            )
        groups = check_groups(b.groups, self.num_groups)
        x, y = b.inputs.to(pl_module.device), b.targets.to(pl_module.device)
        model = self._target
        cols = [y.long(), groups.to(y.device).long()]
        with eval_mode(model), torch.no_grad():
            with float_mode(model):
                logits = model(x)
            self._num_classes = int(logits.shape[1])
            cols.append(logits.argmax(1))
            for p in self.precisions:
                with self.precision(model, p):
                    cols.append(model(x).argmax(1))
        self._store.update(torch.stack(cols, dim=1))

    def _resolve_groups(self, trainer: pl.Trainer, groups: Tensor) -> tuple[int, list[str]]:
        dm = trainer.datamodule
        num_groups = self.num_groups or getattr(dm, "num_groups", None)
        if num_groups is None:
            num_groups = int(groups.max()) + 1
        check_groups(groups, num_groups)
        check_group_counts(torch.bincount(groups, minlength=num_groups)[:num_groups], "FairnessEvaluation")
        names = self.group_names or getattr(dm, "group_names", None) or [f"group {g}" for g in range(num_groups)]
        names = [str(n) for n in names]
        if len(names) != num_groups:
            raise ValueError(f"FairnessEvaluation: {len(names)} group names {names} for num_groups={num_groups}")
        return int(num_groups), names

    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Stage) -> dict[str, Any]:
        assert self._store is not None
        rows = self._store.compute().detach().cpu()  # every rank's rows (a collective call under DDP)
        self._store.reset()
        self._target, self._store = None, None
        if rows.numel() == 0:
            raise ValueError(f"FairnessEvaluation saw no {stage} samples: the evaluation data is empty")
        target, groups = rows[:, 0], rows[:, 1]
        preds = {key: rows[:, 2 + i] for i, key in enumerate(self.keys)}
        num_groups, names = self._resolve_groups(trainer, groups)
        binary = self._num_classes == 2 and bool(((target == 0) | (target == 1)).all())
        if binary:
            pos = (target == 1).long()
            owner = f"FairnessEvaluation ({stage})"
            per_group_pos = torch.zeros(num_groups, dtype=torch.long).index_add_(0, groups, pos)
            per_group_neg = torch.zeros(num_groups, dtype=torch.long).index_add_(0, groups, 1 - pos)
            check_rate_denominators(per_group_pos, owner, "target 1 (positives; the true positive rate)")
            check_rate_denominators(per_group_neg, owner, "target 0 (negatives; the false positive rate)")
        values = _values(_counts(target, groups, preds, num_groups, binary), self.keys, binary)
        point = {k: float(v[0]) for k, v in values.items()}
        ci: dict[str, Any] | None = None
        if self.bootstrap and trainer.is_global_zero:
            ci = _bootstrap(target, groups, preds, num_groups, binary, self.bootstrap, self.confidence, self.seed)
        if self.bootstrap and trainer.world_size > 1:
            ci = trainer.strategy.broadcast(ci, src=0)
        result = self._result(trainer, stage, point, ci, num_groups, names, binary,
                              torch.bincount(groups, minlength=num_groups).tolist(), len(target))
        for name, value in point.items():
            pl_module.log(f"qsec/fair/{name}", value, sync_dist=True)  # equal on every rank already
        return result

    def _result(self, trainer: pl.Trainer, stage: Stage, point: dict[str, float], ci: dict[str, Any] | None,
                num_groups: int, names: list[str], binary: bool, sizes: list[int], n: int) -> dict[str, Any]:
        def entry(name: str) -> dict[str, Any]:
            out: dict[str, Any] = {"value": point[name]}
            if ci is not None:
                out.update(ci[name])
            return out

        metrics = ALL_METRICS + (BINARY_METRICS if binary else ())
        result: dict[str, Any] = {
            "stage": stage,
            "epoch": self.epoch(trainer),
            "global_step": int(trainer.global_step),
            "ptq_twin": self._is_twin,
            "samples": n,
            "binary": binary,
            "group_names": names,
            "group_sizes": dict(zip(names, sizes)),
            "bootstrap": {
                "resamples": self.bootstrap, "confidence": self.confidence, "seed": self.seed,
                "method": "percentile; resampled with replacement within each group; paired across precisions",
            },
            "float": {},
            "precisions": {},
        }
        for key in self.keys:
            r: dict[str, Any] = {
                "accuracy": point[f"{key}/accuracy"],
                "group_accuracy": {names[g]: point[f"{key}/group{g}_accuracy"] for g in range(num_groups)},
                "metrics": {m: entry(f"{key}/{m}") for m in metrics},
            }
            if key == "float":
                result["float"] = r
                continue
            p = next(p for p in self.precisions if p.label == key)
            r = {"weight_bit_width": p.weight_bit_width, "act_bit_width": p.act_bit_width, **r}
            r["change"] = {m: entry(f"{key}/{m}_change") for m in metrics}
            r["quantization_induced_disparity"] = entry(f"{key}/quantization_induced_disparity")
            r["group_accuracy_drop"] = {names[g]: point[f"{key}/group{g}_accuracy_drop"] for g in range(num_groups)}
            result["precisions"][key] = r
        return result

    # ------------------------------------------------------------------ report
    def report_section(self) -> ReportSection | None:
        if not self.results:
            return None
        tables, plots = [], []
        level = f"{self.confidence:.0%}"
        for stage, r in self.results.items():
            metrics = ALL_METRICS + (BINARY_METRICS if r["binary"] else ())
            where = f"{stage}, epoch {r['epoch']}{', post-training quantized twin' if r['ptq_twin'] else ''}"
            rows = [["float", r["float"]["accuracy"], *[format_interval(r["float"]["metrics"][m]) for m in metrics]]]
            rows += [[label, v["accuracy"], *[format_interval(v["metrics"][m]) for m in metrics]]
                     for label, v in r["precisions"].items()]
            tables.append(Table(
                title=f"Group fairness per precision ({where}; value [{level} bootstrap CI])",
                columns=["precision", "accuracy", *[SHORT[m] for m in metrics]], rows=rows,
            ))
            tables.append(Table(
                title=f"Change from float, quantized minus float ({where}; value [{level} bootstrap CI])",
                columns=["precision", *[f"Δ {SHORT[m]}" for m in metrics], SHORT["quantization_induced_disparity"]],
                rows=[[label, *[format_interval(v["change"][m]) for m in metrics], format_interval(v["quantization_induced_disparity"])]
                      for label, v in r["precisions"].items()],
            ))
            names = r["group_names"]
            group_rows = [["float", *[r["float"]["group_accuracy"][n] for n in names]]]
            group_rows += [[label, *[v["group_accuracy"][n] for n in names]] for label, v in r["precisions"].items()]
            group_rows.append(["samples", *[r["group_sizes"][n] for n in names]])
            tables.append(Table(title=f"Accuracy per group ({where})", columns=["precision", *names], rows=group_rows))
        latest = self.results.get("test") or self.results.get("validate") or {}
        if latest:
            keys = ["float", *latest["precisions"]]
            entries = {"float": latest["float"], **latest["precisions"]}
            plots.append(Plot(
                filename="fairness_group_accuracy.png",
                title=f"Accuracy per group and precision ({latest['stage']})",
                xlabel="precision", ylabel="accuracy",
                series={n: [(k, entries[k]["group_accuracy"][n]) for k in keys] for n in latest["group_names"]},
                kind="bar",
            ))
            metrics = ("accuracy_difference",) + (BINARY_METRICS if latest["binary"] else ())
            metrics = tuple(m for m in metrics if m != "demographic_parity_ratio")
            plots.append(Plot(
                filename="fairness_gaps.png", title=f"Group gaps per precision ({latest['stage']})",
                xlabel="precision", ylabel="gap (max - min over groups)",
                series={SHORT[m]: [(k, entries[k]["metrics"][m]["value"]) for k in keys] for m in metrics},
                kind="bar",
            ))
        notes = [
            "Definitions follow fairlearn (method='between_groups'); equalized odds is the worse of the TPR and "
            "FPR differences; equal opportunity is the TPR difference.",
            "Quantization-induced disparity: the worst group's accuracy drop minus the overall accuracy drop, "
            "float -> precision (0 when all groups lose alike).",
            f"Intervals: {self.bootstrap} stratified bootstrap resamples (within each group), percentile method, "
            f"seed {self.seed}; changes use paired resamples. A gap (max - min over groups) and the disparity are "
            "never below 0 and their estimates lean upwards, so their interval lies above 0 even for a fair model: "
            "it is no test of 'gap > 0'. Read the signed changes, whose intervals can cover 0. "
            "'(k undefined)' counts resamples where a metric had no value (a group without positives) and were left out.",
        ]
        return ReportSection(
            name="fairness_evaluation", title="Group fairness under quantization",
            data={"latest": self.results, "history": self.history}, tables=tables, plots=plots, notes=notes,
        )
