"""Poisoned-sample detection during quantization-aware training, on the quantized model's features."""

from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_info, rank_zero_only
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_qsec._eval import eval_mode
from lightning_qsec._validation import check_positive_int, check_seed
from lightning_qsec.batch import BatchAdapter, adapter_or_default, describe_batch
from lightning_qsec.callbacks._target import single_loader
from lightning_qsec.defenses.poison_detection import (
    ANALYSES,
    METHODS,
    Analysis,
    DetectionMethod,
    _check_choice,
    _check_entropy,
    _check_eps,
    _check_int,
    _threshold,
    detect_poisoned_samples,
)
from lightning_qsec.quant.inspect import is_quantized
from lightning_qsec.report.section import ReportSection, Table

__all__ = ["PoisonedDataDetection", "feature_layer_name"]


def feature_layer_name(model: nn.Module, feature_layer: str | None = None) -> str:
    """The module whose *input* is taken as each sample's features.

    ``feature_layer`` names it (a key of ``model.named_modules()``). ``None`` picks the
    classifier head's input: the first ``nn.Linear`` (Brevitas ``QuantLinear`` included)
    registered after the model's last convolution, or, in a model without
    convolutions, the last ``nn.Linear`` (its input is the penultimate activation).

    Raises:
        ValueError: an unknown name (the message lists the available ones), or no
            ``nn.Linear`` layer for the default.
    """
    named = list(model.named_modules())
    if feature_layer is not None:
        names = [name for name, _ in named if name]
        if not isinstance(feature_layer, str) or feature_layer not in names:
            raise ValueError(f"feature_layer={feature_layer!r} is not a module of the model; available: {names}")
        return feature_layer
    linear = [i for i, (_, m) in enumerate(named) if isinstance(m, nn.Linear)]
    if not linear:
        names = [name for name, _ in named if name]
        raise ValueError(
            f"the model has no nn.Linear layer, so feature_layer cannot default to the classifier's input; "
            f"pass feature_layer= one of {names}"
        )
    conv = [i for i, (_, m) in enumerate(named) if isinstance(m, nn.modules.conv._ConvNd)]
    after = [i for i in linear if conv and i > conv[-1]]
    return named[after[0] if after else linear[-1]][0]


def _dataset(trainer: pl.Trainer) -> Any:
    datamodule = getattr(trainer, "datamodule", None)
    dataset = getattr(datamodule, "train_dataset", None)
    if dataset is None:
        loader = single_loader(trainer.train_dataloader)
        dataset = getattr(loader, "dataset", None)
    if dataset is None or not hasattr(dataset, "__len__"):
        raise ValueError(
            "PoisonedDataDetection needs the training dataset: a datamodule with train_dataset, or a training "
            "dataloader over a map-style dataset"
        )
    if len(dataset) == 0:
        raise ValueError("PoisonedDataDetection: the training dataset is empty, there is nothing to inspect")
    return dataset


class PoisonedDataDetection(pl.Callback):
    """Find poisoned training samples from the quantized model's features, during QAT.

    At the end of training (or every ``every_n_epochs`` training epochs, from epoch
    ``start_epoch`` on, 0-based) the hook runs the module as it is, i.e. as
    :class:`~lightning_qsec.callbacks.QuantizationAwareTraining` left it (the deployer's
    quantizer), in eval mode and without gradients, over the whole training dataset in
    dataset order (an unshuffled loader over ``trainer.datamodule.train_dataset``, else
    over the training dataloader's dataset), so the reported indices are dataset indices.
    Eval mode means BatchNorm running statistics and Brevitas activation statistics are
    read, never updated, and the train/eval flags are restored afterwards.

    Features are the input of ``feature_layer`` (a forward pre-hook), by default the
    classifier head's input (see :func:`feature_layer_name`). On ``DigitsCNN`` that is
    the flattened convolutional features: the input of the *last* Linear (the 64-unit
    hidden layer) did not separate BadNets samples (2-means split the 117 poisoned
    samples 83/34, with 7 clean ones), the head's input did (117/0).

    Detection is :func:`~lightning_qsec.defenses.detect_poisoned_samples` (activation
    clustering, Chen et al. 2018, https://arxiv.org/abs/1811.03728, and spectral
    signatures, Tran et al. 2018, https://arxiv.org/abs/1811.00636), on the labels as
    trained. Results: :attr:`suspect_indices` (int64 dataset indices) and
    :attr:`scores`, :attr:`results` (per-class statistics; with a datamodule that has
    ``poison_indices``, such as :class:`~lightning_qsec.attacks.PoisonedDataModule`, also
    recall on the poisoned samples and the false-positive rate on the clean ones) and
    :attr:`history`, all in ``state_dict``. Logged to the trainer's loggers on global
    rank zero: ``qsec/poison/num_suspects``, ``qsec/poison/suspect_fraction``,
    ``qsec/poison/num_poisoned_classes`` and, when known, ``qsec/poison/recall`` and
    ``qsec/poison/false_positive_rate``. :class:`~lightning_qsec.callbacks.SecurityReport`
    writes :meth:`report_section`.

    Under DDP every rank runs the same computation on the whole training dataset (not
    its shard), so all ranks hold the same result.

    Args:
        method: ``"activation_clustering"``, ``"combined"`` or ``"spectral_signatures"``.
        feature_layer: name of the module whose input gives the features; ``None``: the
            classifier head's input.
        every_n_epochs: run at the end of every this many training epochs; ``None``: once,
            at the end of training.
        start_epoch: first epoch (0-based) after which the hook may run.
        n_components, analysis, threshold, min_source_entropy, seed: activation clustering's
            settings (:func:`~lightning_qsec.defenses.activation_clustering`).
        eps: spectral signatures' bound on the poisoned fraction of a class.
        batch_size: rows per forward pass.
        batch_adapter: reads the dataset's batches; default :func:`~lightning_qsec.read_batch`.

    Example:
        >>> import pytorch_lightning as pl
        >>> from lightning_qsec.callbacks import PoisonedDataDetection, QuantizationAwareTraining
        >>> detection = PoisonedDataDetection()
        >>> trainer = pl.Trainer(max_epochs=10, logger=False, callbacks=[QuantizationAwareTraining(4, 4), detection])
    """

    def __init__(
        self,
        *,
        method: DetectionMethod = "activation_clustering",
        feature_layer: str | None = None,
        every_n_epochs: int | None = None,
        start_epoch: int = 0,
        n_components: int = 10,
        analysis: Analysis = "separation",
        threshold: float | None = None,
        min_source_entropy: float = 0.85,
        eps: float = 0.1,
        seed: int = 0,
        batch_size: int = 256,
        batch_adapter: BatchAdapter | None = None,
    ) -> None:
        self.method = _check_choice(method, "method", METHODS)
        if feature_layer is not None and (not isinstance(feature_layer, str) or not feature_layer):
            raise ValueError(f"feature_layer must be a module name (str) or None, got {feature_layer!r}")
        self.feature_layer = feature_layer
        self.every_n_epochs = None if every_n_epochs is None else check_positive_int(every_n_epochs, "every_n_epochs")
        self.start_epoch = check_positive_int(start_epoch, "start_epoch", allow_zero=True)
        self.n_components = _check_int(n_components, "n_components")
        self.analysis = _check_choice(analysis, "analysis", ANALYSES)
        self.threshold = _threshold(self.analysis, threshold)
        self.min_source_entropy = _check_entropy(min_source_entropy)
        self.eps = _check_eps(eps)
        self.seed = check_seed(seed, non_negative=True)
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self._read = adapter_or_default(batch_adapter, owner=type(self).__name__)
        self.suspect_indices: Tensor = torch.zeros(0, dtype=torch.long)
        self.scores: Tensor = torch.zeros(0)
        self.results: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []

    @property
    def state_key(self) -> str:
        # every setting that tells two hooks of one Trainer apart, so that each restores its own state
        return self._generate_state_key(method=self.method, analysis=self.analysis, feature_layer=self.feature_layer)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == TrainerFn.FITTING.value:
            feature_layer_name(pl_module, self.feature_layer)  # a bad name fails now, not after training

    # ------------------------------------------------------------------ schedule
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch < self.start_epoch:
            return
        if self.every_n_epochs is not None:
            if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
                self.detect(trainer, pl_module)
            return
        max_epochs, max_steps = trainer.max_epochs, trainer.max_steps
        last = (
            trainer.should_stop
            or (max_epochs is not None and max_epochs >= 0 and trainer.current_epoch + 1 >= max_epochs)
            or (max_steps is not None and max_steps >= 0 and trainer.global_step >= max_steps)
        )
        if last:
            self.detect(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Training stopped where the epoch-end check could not see it (e.g. a callback that stops later).
        if self.every_n_epochs is None and self.results.get("global_step") != trainer.global_step:
            self.detect(trainer, pl_module)

    # ------------------------------------------------------------------ detection
    def _features(self, pl_module: pl.LightningModule, dataset: Any) -> tuple[Tensor, Tensor, str]:
        name = feature_layer_name(pl_module, self.feature_layer)
        layer = dict(pl_module.named_modules())[name]
        captured: list[Tensor] = []

        def grab(module: nn.Module, args: tuple[Any, ...]) -> None:
            value = getattr(args[0], "value", args[0])  # a Brevitas QuantTensor carries its values in .value
            captured.append(value.detach().flatten(1).float().cpu())

        feats: list[Tensor] = []
        labels: list[Tensor] = []
        handle = layer.register_forward_pre_hook(grab)
        try:
            with eval_mode(pl_module), torch.no_grad():
                for batch in DataLoader(dataset, batch_size=self.batch_size, shuffle=False):
                    try:
                        b = self._read(batch)
                    except ValueError as err:
                        raise ValueError(
                            f"PoisonedDataDetection needs labelled training samples (x, y) to inspect each class; "
                            f"got batches of {describe_batch(batch)}. Pass batch_adapter= for other formats"
                        ) from err
                    captured.clear()
                    pl_module(b.inputs.to(pl_module.device))
                    if len(captured) != 1:
                        raise ValueError(
                            f"feature_layer={name!r} ran {len(captured)} times in one forward pass; name a layer "
                            "that runs exactly once"
                        )
                    feats.append(captured[0])
                    labels.append(b.targets.detach().cpu().long())
        finally:
            handle.remove()
        return torch.cat(feats), torch.cat(labels), name

    def detect(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """Run the detection now on the training dataset; store, log and return the result."""
        features, labels, layer = self._features(pl_module, _dataset(trainer))
        found = detect_poisoned_samples(
            features, labels, method=self.method, n_components=self.n_components, analysis=self.analysis,
            threshold=self.threshold, min_source_entropy=self.min_source_entropy, eps=self.eps, seed=self.seed,
        )
        self.suspect_indices, self.scores = found.suspect_indices.clone(), found.scores.clone()
        n = len(labels)
        result: dict[str, Any] = {
            "epoch": int(trainer.current_epoch),
            "global_step": int(trainer.global_step),
            "method": self.method,
            "analysis": self.analysis,
            "threshold": self.threshold,
            "eps": self.eps,
            "feature_layer": layer,
            "feature_dim": int(features.shape[1]),
            "quantized": is_quantized(pl_module),
            "num_samples": n,
            "num_suspects": len(self.suspect_indices),
            "suspect_fraction": len(self.suspect_indices) / n,
            "poisoned_classes": found.poisoned_classes,
            "per_class": {str(c): stats for c, stats in found.per_class.items()},
        }
        truth = getattr(getattr(trainer, "datamodule", None), "poison_indices", None)
        if isinstance(truth, Tensor) and (len(truth) == 0 or int(truth.max()) < n):
            poisoned = torch.zeros(n, dtype=torch.bool)
            poisoned[truth.long()] = True
            flagged = torch.zeros(n, dtype=torch.bool)
            flagged[self.suspect_indices] = True
            num_clean = int((~poisoned).sum())
            result["known_poisoned"] = int(poisoned.sum())
            result["recall"] = float((flagged & poisoned).sum()) / len(truth) if len(truth) else math.nan
            result["false_positive_rate"] = float((flagged & ~poisoned).sum()) / num_clean if num_clean else math.nan
        self.results = result
        self.history.append({k: v for k, v in result.items() if k != "per_class"})
        self._log(trainer, result)
        rank_zero_info(
            f"PoisonedDataDetection: {result['num_suspects']} of {n} training samples suspect "
            f"(classes {result['poisoned_classes']})"
        )
        return result

    @staticmethod
    @rank_zero_only
    def _log(trainer: pl.Trainer, result: dict[str, Any]) -> None:
        metrics = {
            "qsec/poison/num_suspects": float(result["num_suspects"]),
            "qsec/poison/suspect_fraction": float(result["suspect_fraction"]),
            "qsec/poison/num_poisoned_classes": float(len(result["poisoned_classes"])),
        }
        for key in ("recall", "false_positive_rate"):
            if key in result:
                metrics[f"qsec/poison/{key}"] = float(result[key])
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "suspect_indices": self.suspect_indices,
            "scores": self.scores,
            "results": self.results,
            "history": self.history,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.suspect_indices = state_dict["suspect_indices"].clone()
        self.scores = state_dict["scores"].clone()
        self.results = dict(state_dict.get("results", {}))
        self.history = list(state_dict.get("history", []))

    # ------------------------------------------------------------------ report
    def report_section(self) -> ReportSection | None:
        if not self.results:
            return None
        r = self.results
        rows = [
            [
                int(c), s["size"], s.get("cluster_sizes", ["-"])[0] if s.get("cluster_sizes") else "-",
                s.get("relative_size"), s.get("silhouette"), s.get("separation"),
                s["source_entropy"][0] if "source_entropy" in s else None, "yes" if s["poisoned"] else "no",
            ]
            for c, s in r["per_class"].items()
        ]
        tables = [
            Table(
                title=f"Poisoned-sample detection, epoch {r['epoch']} ({r['method']}, {r['num_samples']} training samples)",
                columns=["class", "samples", "suspect cluster", "relative size", "silhouette", "separation",
                         "source entropy", "poisoned"],
                rows=rows,
            )
        ]
        summary = [["suspect samples", r["num_suspects"]], ["suspect fraction", r["suspect_fraction"]]]
        if "recall" in r:
            summary += [["recall on known poisoned", r["recall"]], ["false-positive rate on clean", r["false_positive_rate"]]]
        tables.append(Table(title="Poisoned-sample detection: summary", columns=["quantity", "value"], rows=summary))
        notes = [
            f"Features: input of `{r['feature_layer']}` ({r['feature_dim']} dims) of the "
            f"{'quantized' if r['quantized'] else 'float'} model in eval mode. Activation clustering "
            f"(analysis `{r['analysis']}`, threshold {r['threshold']:g}) decides the poisoned classes"
            + (f"; spectral signatures (eps {r['eps']:g}) adds suspects in them." if r["method"] == "combined" else "."),
        ]
        data = {
            "latest": r,
            "history": self.history,
            "suspect_indices": self.suspect_indices.tolist(),
        }
        return ReportSection(
            name="poison_detection", title="Poisoned training data", data=data, tables=tables, notes=notes
        )
