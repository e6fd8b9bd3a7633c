"""PoisonedDataDetection: real QAT on BadNets-poisoned digits, the functional core, the preset, bad input."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from lightning_qsec import safe_load
from lightning_qsec.attacks import PoisonedDataModule
from lightning_qsec.callbacks import PoisonedDataDetection, QuantizationAwareTraining
from lightning_qsec.callbacks.poison_detection import feature_layer_name
from lightning_qsec.data import DigitsDataModule
from lightning_qsec.defenses import activation_clustering, detect_poisoned_samples, spectral_signatures
from lightning_qsec.models import ClassificationModule, DigitsCNN
from lightning_qsec.quant.statistics import statistics_state
from conftest import quiet_trainer

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 6


def _fit(poison_rate: float, tmp_path: Path, **detection: Any) -> tuple[pl.Trainer, ClassificationModule, PoisonedDataModule, PoisonedDataDetection]:
    pl.seed_everything(0, verbose=False)
    dm = PoisonedDataModule(DigitsDataModule(batch_size=64, seed=0), poison_rate=poison_rate, target_class=0)
    model = ClassificationModule(DigitsCNN(), lr=3e-3)
    callback = PoisonedDataDetection(**detection)
    trainer = quiet_trainer(
        max_epochs=EPOCHS, limit_val_batches=0, logger=CSVLogger(tmp_path, name="logs"), log_every_n_steps=5,
        callbacks=[QuantizationAwareTraining(4, 4), callback],
    )
    trainer.fit(model, datamodule=dm)
    return trainer, model, dm, callback


@pytest.fixture(scope="module")
def poisoned_run(tmp_path_factory: pytest.TempPathFactory):
    return _fit(0.1, tmp_path_factory.mktemp("poisoned"))


def test_finds_badnets_samples_in_qat(poisoned_run) -> None:
    trainer, model, dm, callback = poisoned_run
    r = callback.results
    assert r["quantized"] and r["feature_layer"] == "net.classifier.1" and r["epoch"] == EPOCHS - 1
    assert r["num_samples"] == len(dm.train_dataset) and r["known_poisoned"] == len(dm.poison_indices) > 0
    assert r["recall"] >= 0.8, r
    assert r["false_positive_rate"] <= 0.05, r
    assert r["poisoned_classes"] == [0]
    # Indices are dataset indices: every suspect row carries the trigger and the target label
    # in dm.train_dataset (the training loader itself is shuffled).
    x, y = dm.train_dataset.tensors
    suspects = callback.suspect_indices
    assert suspects.dtype == torch.long and len(suspects) == r["num_suspects"]
    assert bool((y[suspects] == 0).all())
    assert bool((x[suspects, 0, -2:, -2:] == 1.0).all())
    found = set(suspects.tolist()) & set(dm.poison_indices.tolist())
    assert len(found) / len(dm.poison_indices) == pytest.approx(r["recall"])
    assert callback.scores.shape == (len(y),)
    # Logged on rank zero to the trainer's logger.
    metrics = (Path(trainer.logger.log_dir) / "metrics.csv").read_text()
    assert "qsec/poison/recall" in metrics and "qsec/poison/num_suspects" in metrics
    # Report section.
    section = callback.report_section()
    assert section is not None and section.name == "poison_detection"
    assert section.data["suspect_indices"] == suspects.tolist()
    json.dumps(section.data)


def test_state_dict_round_trip(poisoned_run, tmp_path: Path) -> None:
    trainer, _, _, callback = poisoned_run
    buffer = io.BytesIO()
    torch.save(callback.state_dict(), buffer)
    buffer.seek(0)
    fresh = PoisonedDataDetection()
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(fresh.suspect_indices, callback.suspect_indices)
    assert torch.equal(fresh.scores, callback.scores)
    assert fresh.results == callback.results and fresh.history == callback.history
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    state = safe_load(ckpt)["callbacks"]
    key = next(k for k in state if k.startswith("PoisonedDataDetection"))
    assert torch.equal(state[key]["suspect_indices"], callback.suspect_indices)


def test_bad_dataset_inputs(poisoned_run) -> None:
    trainer, model, dm, callback = poisoned_run
    saved = dm.train_dataset
    try:
        dm.train_dataset = TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long))
        with pytest.raises(ValueError, match="training dataset is empty"):
            callback.detect(trainer, model)
        dm.train_dataset = TensorDataset(saved.tensors[0][:100])  # inputs only, no labels
        with pytest.raises(ValueError, match="needs labelled training samples"):
            callback.detect(trainer, model)
    finally:
        dm.train_dataset = saved
    with pytest.raises(ValueError, match=r"feature_layer='nope' is not a module.*net\.classifier\.1"):
        PoisonedDataDetection(feature_layer="nope").detect(trainer, model)


class _BNNet(pl.LightningModule):
    """A small CNN with BatchNorm, trained by QAT with Brevitas collecting activation statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(8 * 16, 32), nn.ReLU(), nn.Linear(32, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def test_statistics_not_consumed(tmp_path: Path) -> None:
    pl.seed_everything(0, verbose=False)
    dm = PoisonedDataModule(DigitsDataModule(batch_size=64, seed=0), poison_rate=0.1, target_class=0)
    model = _BNNet()
    callback = PoisonedDataDetection(every_n_epochs=1)
    trainer = quiet_trainer(
        max_epochs=1, limit_val_batches=0,
        callbacks=[QuantizationAwareTraining(8, 8, calibrate_batches=0), callback],  # stats still being collected
    )
    trainer.fit(model, datamodule=dm)
    assert callback.results["feature_layer"] == "net.5"  # the first Linear after the last convolution
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats_before = statistics_state(model)
    callback.detect(trainer, model)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "BN or Brevitas buffers changed"
    assert repr(statistics_state(model)) == repr(stats_before)
    assert all(m.training for m in model.modules())


def test_clean_data_flags_little(tmp_path: Path) -> None:
    _, _, dm, callback = _fit(0.0, tmp_path, every_n_epochs=EPOCHS)
    r = callback.results
    assert len(dm.poison_indices) == 0
    assert r["suspect_fraction"] <= 0.05, r
    assert r["false_positive_rate"] == r["suspect_fraction"]
    assert len(callback.history) == 1


def test_functional_core_on_synthetic_features() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 16, generator=g) * 6
    labels = torch.arange(500) % 5
    features = centres[labels] + torch.randn(500, 16, generator=g)
    # 60 samples of classes 1..4 relabelled 0 with a strong shared "trigger" feature.
    poisoned = torch.arange(60) * 5 % 500 + 1 + torch.arange(60) % 4
    features[poisoned, :4] += 15.0
    labels = labels.clone()
    labels[poisoned] = 0
    found = detect_poisoned_samples(features, labels)
    flagged = set(found.suspect_indices.tolist())
    assert found.poisoned_classes == [0]
    assert len(flagged & set(poisoned.tolist())) / 60 >= 0.95
    assert len(flagged - set(poisoned.tolist())) <= 5
    clean_zero = (labels == 0).clone()
    clean_zero[poisoned] = False
    assert bool((found.scores[poisoned] > 0).all()) and bool((found.scores[clean_zero] < 0).all())
    # Chen et al.'s relative-size analysis: the poisoned cluster is smaller here.
    rel = activation_clustering(features, labels, analysis="relative_size", threshold=0.45)
    assert 0 in rel.poisoned_classes
    spectral = spectral_signatures(features, labels, eps=0.3, classes=[0])
    assert set(spectral.poisoned_classes) == {0}
    assert spectral.per_class[0]["removed"] == int(1.5 * 0.3 * int((labels == 0).sum()))
    combined = detect_poisoned_samples(features, labels, method="combined", eps=0.3)
    assert set(found.suspect_indices.tolist()) <= set(combined.suspect_indices.tolist())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(method="strip"), "method='strip' is not supported"),
        (dict(analysis="size"), "analysis='size' is not supported"),
        (dict(every_n_epochs=0), "every_n_epochs must be an integer >= 1"),
        (dict(start_epoch=-1), "start_epoch must be an integer >= 0"),
        (dict(eps=0.9), "eps .* must be a number in"),
        (dict(eps=0), "eps .* must be a number in"),
        (dict(threshold=-1.0), "threshold must be a finite number > 0"),
        (dict(analysis="relative_size", threshold=1.5), "threshold of analysis='relative_size' must be in"),
        (dict(min_source_entropy=2), "min_source_entropy must be a number in"),
        (dict(n_components=0), "n_components must be an integer >= 1"),
        (dict(batch_size=0), "batch_size must be an integer >= 1"),
        (dict(feature_layer=""), "feature_layer must be a module name"),
        (dict(seed=-1), "seed must be an integer >= 0"),
    ],
)
def test_callback_rejects_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PoisonedDataDetection(**kwargs)


def test_functional_core_rejects_bad_input() -> None:
    x, y = torch.randn(20, 4), torch.arange(20) % 2
    with pytest.raises(ValueError, match="features is empty"):
        detect_poisoned_samples(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must be a 1-D integer tensor"):
        detect_poisoned_samples(x, y.float())
    with pytest.raises(ValueError, match="features has 20 rows but labels has 19"):
        detect_poisoned_samples(x, y[:19])
    with pytest.raises(ValueError, match="features contains NaN"):
        detect_poisoned_samples(torch.full((20, 4), float("nan")), y)
    with pytest.raises(ValueError, match="features must be a floating-point tensor"):
        detect_poisoned_samples(torch.ones(20, dtype=torch.long), y)
    with pytest.raises(ValueError, match="eps"):
        spectral_signatures(x, y, eps=0.7)
    with pytest.raises(ValueError, match="method='x' is not supported"):
        detect_poisoned_samples(x, y, method="x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"classes \[7\] do not occur in labels; the labels present are \[0, 1\]"):
        spectral_signatures(x, y, classes=[7])
    with pytest.raises(ValueError, match="classes must be a list of integer class labels"):
        spectral_signatures(x, y, classes="0")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="labels must be class indices >= 0"):
        activation_clustering(x, y - 1)
    assert spectral_signatures(x, y, classes=[1]).per_class[0]["removed"] == 0  # class 0 not inspected


def test_functional_core_rejects_bad_seeds() -> None:
    x, y = torch.randn(20, 4), torch.arange(20) % 2
    for bad in (-1, "a", 1.5):
        with pytest.raises(ValueError, match="seed must be an integer >= 0"):
            activation_clustering(x, y, seed=bad)
        for method in ("activation_clustering", "combined", "spectral_signatures"):
            with pytest.raises(ValueError, match="seed must be an integer >= 0"):
                detect_poisoned_samples(x, y, method=method, seed=bad)


def test_bad_feature_layer_fails_before_training() -> None:
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0,
                            callbacks=[PoisonedDataDetection(feature_layer="classifer.1")])
    with pytest.raises(ValueError, match=r"feature_layer='classifer.1' is not a module of the model; available: \["):
        trainer.fit(ClassificationModule(DigitsCNN()), datamodule=DigitsDataModule(batch_size=64, seed=0))
    assert trainer.global_step == 0


def test_detections_with_different_settings_share_a_trainer() -> None:
    hooks = [PoisonedDataDetection(), PoisonedDataDetection(method="spectral_signatures"),
             PoisonedDataDetection(analysis="relative_size"), PoisonedDataDetection(feature_layer="net.classifier.3")]
    assert len({h.state_key for h in hooks}) == len(hooks)
    trainer = quiet_trainer(callbacks=hooks)  # Lightning refuses two stateful callbacks with one state_key
    assert trainer.callbacks[: len(hooks)] == hooks


def test_feature_layer_names() -> None:
    assert feature_layer_name(DigitsCNN()) == "classifier.1"
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    assert feature_layer_name(mlp) == "2"  # no convolution: the penultimate activation
    assert feature_layer_name(DigitsCNN(), "classifier.3") == "classifier.3"
    with pytest.raises(ValueError, match=r"has no nn\.Linear layer.*'0'"):
        feature_layer_name(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten()))
    with pytest.raises(ValueError, match=r"feature_layer='fc' is not a module of the model; available: \['features'"):
        feature_layer_name(DigitsCNN(), "fc")


@pytest.mark.filterwarnings("ignore::jsonargparse._deprecated.JsonargparseDeprecationWarning")
@pytest.mark.filterwarnings("ignore:.*LeafSpec.*")
def test_preset_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_qsec.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["qsec"])
    config = ROOT / "callbacks" / "qat-with-poison-detection.yaml"
    assert config.read_text().startswith("# ")
    main(["fit", "--config", str(config), "--trainer.max_epochs=2", "--trainer.limit_val_batches=2",
          f"--trainer.default_root_dir={tmp_path}"])
    out = tmp_path / "qsec_report" / "qat-with-poison-detection"
    report = json.loads((out / "report.json").read_text())
    latest = report["sections"]["poison_detection"]["latest"]
    assert latest["quantized"] and latest["num_samples"] == 1168 and latest["known_poisoned"] == 117
    assert 0.0 <= latest["recall"] <= 1.0 and 0.0 <= latest["false_positive_rate"] <= 1.0
    assert "Poisoned training data" in (out / "report.md").read_text()
    ckpt = next((out / "logs" / "version_0" / "checkpoints").glob("*.ckpt"))
    assert any(k.startswith("PoisonedDataDetection") for k in safe_load(ckpt)["callbacks"])
