"""AdversarialTraining: in-place batch replacement, robustness gained, schedule, composition, state, presets."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_qsec import bit_widths
from lightning_qsec.attacks import pgd
from lightning_qsec.callbacks import QuantizationAwareTraining
from lightning_qsec.data import DigitsDataModule
from lightning_qsec.defenses import AdversarialTraining, RandomPrecisionTraining
from lightning_qsec.defenses import adversarial_training as at_module
from lightning_qsec.defenses.adversarial_training import trades_adversary
from lightning_qsec.models import ClassificationModule, DigitsCNN
from lightning_qsec.quant.inspect import stat_scalers

from conftest import UserCNN, quiet_trainer

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ROOT / "callbacks"
EPS = 0.1

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
    pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`"),
    pytest.mark.filterwarnings("ignore:The number of training batches .* is smaller than the logging interval"),
]


def _digits(batch_size: int = 64) -> DigitsDataModule:
    dm = DigitsDataModule(batch_size=batch_size, seed=0)
    dm.setup()
    return dm


class Snapshot(pl.Callback):
    """Placed before AdversarialTraining: clones the clean inputs of every batch."""

    def __init__(self) -> None:
        self.clean: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.clean.append(batch[0].clone())


class Recorder(ClassificationModule):
    """Records what training_step receives (the user's code, unchanged otherwise)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.seen.append(batch[0].clone())
        return super().training_step(batch, batch_idx)


# -- the mechanism ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["pgd", "fgsm_rs"])
def test_batch_is_replaced_in_place_within_eps(method: str) -> None:
    pl.seed_everything(0, verbose=False)
    module = Recorder(DigitsCNN())
    snap = Snapshot()
    at = AdversarialTraining(method, eps=EPS, steps=None if method == "fgsm_rs" else 3, ratio=0.5)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=0,
                            callbacks=[QuantizationAwareTraining(4, 4), snap, at])
    trainer.fit(module, _digits())
    assert at.batches_attacked == 3 and len(module.seen) == 3
    for clean, seen in zip(snap.clean, module.seen):
        k = round(0.5 * clean.shape[0])
        delta = seen - clean
        assert delta[:k].abs().amax() <= EPS + 1e-6
        assert (delta[:k].flatten(1).abs().amax(1) > 0).float().mean() > 0.9  # really perturbed
        assert torch.equal(seen[k:], clean[k:])  # rows beyond the ratio stay clean
        assert seen.min() >= 0.0 and seen.max() <= 1.0  # in the input domain


def test_trades_leaves_the_batch_clean_and_logs_its_terms() -> None:
    pl.seed_everything(0, verbose=False)
    module = Recorder(DigitsCNN())
    snap = Snapshot()
    at = AdversarialTraining("trades", eps=EPS, steps=2)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0,
                            callbacks=[QuantizationAwareTraining(4, 4), snap, at])
    trainer.fit(module, _digits())
    for clean, seen in zip(snap.clean, module.seen):
        assert torch.equal(clean, seen)
    metrics = trainer.callback_metrics
    assert float(metrics["qsec/adv/eps"]) == pytest.approx(EPS)
    assert float(metrics["qsec/adv/trades_beta"]) == 6.0
    assert float(metrics["qsec/adv/trades_kl"]) > 0


def test_stored_batches_and_dataset_views_are_restored_after_each_step() -> None:
    x, y = _digits().train_dataset.tensors
    before = x.clone()

    class Slices:  # yields views into the dataset tensor
        def __iter__(self):
            for i in range(0, 128, 64):
                yield x[i : i + 64], y[i : i + 64]

        def __len__(self) -> int:
            return 2

    stored = [(x[i : i + 64].clone(), y[i : i + 64]) for i in range(0, 128, 64)]  # the same tensors every epoch
    stored_before = [b.clone() for b, _ in stored]
    seen: list[torch.Tensor] = []

    class Spy(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = DigitsCNN()

        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            return self.net(inputs)

        def training_step(self, batch, batch_idx):
            seen.append(batch[0].detach().clone())
            return F.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    for loader in (Slices(), DataLoader(stored, batch_size=None)):
        seen.clear()
        trainer = quiet_trainer(max_epochs=2, limit_val_batches=0, callbacks=[AdversarialTraining("fgsm_rs", eps=0.1)])
        trainer.fit(Spy(), train_dataloaders=loader)
        assert len(seen) == 4
        assert all((s - c).abs().max() > 0.01 for s, c in zip(seen, [before[:64], before[64:128]] * 2))  # attacked
    assert torch.equal(x, before)  # the dataset never changed
    assert all(torch.equal(b, c) for (b, _), c in zip(stored, stored_before))


# -- robustness gained -----------------------------------------------------------------------

EPOCHS, LR = 6, 0.01


def _train(at: AdversarialTraining | None) -> tuple[float, float]:
    """QAT w4a4 on digits for EPOCHS epochs (same seed), then clean and PGD-20 accuracy on the test split."""
    pl.seed_everything(0, verbose=False)
    module = ClassificationModule(DigitsCNN(), lr=LR)
    dm = _digits()
    callbacks: list[pl.Callback] = [QuantizationAwareTraining(4, 4)]
    if at is not None:
        callbacks.append(at)
    quiet_trainer(max_epochs=EPOCHS, limit_val_batches=0, callbacks=callbacks).fit(module, dm)
    x, y = dm.test_dataset.tensors
    module.eval()
    x_adv = pgd(module, x, y, eps=EPS, alpha=EPS / 8, steps=20, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        clean = (module(x).argmax(1) == y).float().mean().item()
        robust = (module(x_adv).argmax(1) == y).float().mean().item()
    return clean, robust


@pytest.fixture(scope="module")
def undefended() -> tuple[float, float]:
    return _train(None)


@pytest.mark.parametrize(
    "at",
    [
        pytest.param(lambda: AdversarialTraining("fgsm_rs", eps=EPS), id="fgsm_rs"),
        pytest.param(lambda: AdversarialTraining("pgd", eps=EPS, steps=3), id="pgd"),
        pytest.param(lambda: AdversarialTraining("trades", eps=EPS, steps=3), id="trades"),
    ],
)
def test_improves_pgd_robust_accuracy_over_undefended_twin(at, undefended) -> None:
    base_clean, base_robust = undefended
    clean, robust = _train(at())
    # Measured (6 epochs, lr 0.01): undefended 0.51; fgsm_rs 0.70, pgd-3 0.75, trades-3 0.76.
    assert robust >= base_robust + 0.10, (robust, base_robust)
    assert clean >= 0.85 and clean >= base_clean - 0.08, (clean, base_clean)


# -- schedule --------------------------------------------------------------------------------


def test_warmup_and_milestone_schedule_values() -> None:
    at = AdversarialTraining("pgd", eps=0.2, warmup_epochs=2)
    assert [at.eps_at(e) for e in (0.0, 0.5, 1.0, 1.5, 2.0, 5.0)] == pytest.approx([0, 0.05, 0.1, 0.15, 0.2, 0.2])
    assert at.alpha_for(0.2) == pytest.approx(2.5 * 0.2 / 10)
    sched = AdversarialTraining("fgsm_rs", eps=[(0, 0.1), (2, 0.3)], warmup_epochs=1)
    assert [sched.eps_at(e) for e in (0.0, 0.5, 1.0, 2.0, 3.0)] == pytest.approx([0, 0.05, 0.1, 0.3, 0.3])
    assert sched.alpha_for(0.3) == pytest.approx(1.25 * 0.3)
    assert AdversarialTraining("pgd", alpha=0.01).alpha_for(0.3) == 0.01  # explicit alpha is absolute


def test_warmup_ramps_eps_per_step_during_fit() -> None:
    logged: list[tuple[float, float]] = []

    class Watch(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            logged.append((float(trainer.callback_metrics["qsec/adv/eps"]), float(trainer.callback_metrics["qsec/adv/alpha"])))

    at = AdversarialTraining("fgsm_rs", eps=EPS, warmup_epochs=1)
    trainer = quiet_trainer(max_epochs=2, limit_train_batches=4, limit_val_batches=0,
                            callbacks=[QuantizationAwareTraining(4, 4), at, Watch()])
    trainer.fit(ClassificationModule(DigitsCNN()), _digits())
    eps = [e for e, _ in logged]
    assert eps == pytest.approx([0.0, 0.025, 0.05, 0.075, 0.1, 0.1, 0.1, 0.1])
    assert [a for _, a in logged] == pytest.approx([1.25 * e for e in eps])
    assert at.batches_attacked == 7  # no attack while eps is 0


# -- composition -----------------------------------------------------------------------------


class SGDCNN(UserCNN):
    """SGD, and a user loss switched off so that the step holds the TRADES term alone."""

    def training_step(self, batch, batch_idx):
        return 0.0 * super().training_step(batch, batch_idx)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_trades_extra_gradient_is_exact_with_accumulation(accumulate: int) -> None:
    beta, steps, lr = 6.0, 3, 0.1
    pl.seed_everything(0, verbose=False)
    module = SGDCNN()
    start = copy.deepcopy(module)
    x, y = _digits().train_dataset.tensors
    loader = DataLoader(TensorDataset(x[:64], y[:64]), batch_size=64 // accumulate, shuffle=False)
    at = AdversarialTraining("trades", eps=EPS, steps=steps, trades_beta=beta, seed=5)
    trainer = quiet_trainer(max_steps=1, accumulate_grad_batches=accumulate, callbacks=[at])
    trainer.fit(module, train_dataloaders=loader)
    assert at.batches_attacked == accumulate

    params = list(start.parameters())
    total = [torch.zeros_like(p) for p in params]
    where = SimpleNamespace(global_rank=0, current_epoch=0)
    for batch_idx, (xb, _) in enumerate(loader):
        gen = at._generator(where, xb.device, batch_idx)
        x_adv = trades_adversary(start, xb, eps=EPS, alpha=2.5 * EPS / steps, steps=steps, generator=gen)
        kl = F.kl_div(F.log_softmax(start(x_adv), 1), F.softmax(start(xb), 1), reduction="batchmean")
        for t, g in zip(total, torch.autograd.grad(beta * kl / accumulate, params)):
            t += g
    for (name, after), p0, g in zip(module.named_parameters(), params, total):
        torch.testing.assert_close(after.detach(), p0.detach() - lr * g, atol=2e-6, rtol=1e-4, msg=name)


def test_pgd_composes_with_accumulate_grad_batches() -> None:
    at = AdversarialTraining("pgd", eps=EPS, steps=2)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=6, limit_val_batches=0, accumulate_grad_batches=2,
                            callbacks=[QuantizationAwareTraining(4, 4), at])
    trainer.fit(ClassificationModule(DigitsCNN()), _digits())
    assert trainer.global_step == 3 and at.batches_attacked == 6


@pytest.mark.parametrize("method", ["pgd", "trades"])
def test_brevitas_and_batchnorm_statistics_not_consumed(method: str) -> None:
    class BNNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                                      nn.Linear(8 * 64, 10))

        def forward(self, x):
            return self.body(x)

    module = ClassificationModule(BNNet())
    at = AdversarialTraining(method, eps=EPS, steps=2)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=5, limit_val_batches=0,
                            callbacks=[QuantizationAwareTraining(4, 4, calibrate_batches=0), at])
    trainer.fit(module, _digits())
    counters = [s.counter for _, s in stat_scalers(module)]
    assert counters and all(c == trainer.global_step == 5 for c in counters), counters
    assert int(module.net.body[1].num_batches_tracked) == 5


def test_random_precision_first_then_attacks_at_the_drawn_precision(monkeypatch) -> None:
    drawn: list[tuple[str, set[int]]] = []
    real_pgd = at_module.pgd
    rpt = RandomPrecisionTraining(bit_widths=(4, 8), seed=1)

    def spy(model, *args, **kwargs):
        drawn.append((rpt.current.label, set(bit_widths(model)["weight"].values())))
        return real_pgd(model, *args, **kwargs)

    monkeypatch.setattr(at_module, "pgd", spy)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=6, limit_val_batches=0,
                            callbacks=[QuantizationAwareTraining(4, 4), rpt, AdversarialTraining("pgd", steps=2)])
    trainer.fit(ClassificationModule(DigitsCNN()), _digits())
    assert len(drawn) == 6 and {label for label, _ in drawn} == {"w4a4", "w8a8"}
    assert all(widths == {int(label[1])} for label, widths in drawn)


def test_warns_when_random_precision_comes_after() -> None:
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0,
                            callbacks=[QuantizationAwareTraining(4, 4), AdversarialTraining("fgsm_rs"),
                                       RandomPrecisionTraining(bit_widths=(4, 8))])
    with pytest.warns(UserWarning, match="list RandomPrecisionTraining first"):
        trainer.fit(ClassificationModule(DigitsCNN()), _digits())


def test_on_float_attacks_the_float_twin_and_needs_a_quantized_model(monkeypatch) -> None:
    kinds: list[str] = []
    real_pgd = at_module.pgd

    def spy(model, *args, **kwargs):
        kinds.append(type(model).__name__)
        return real_pgd(model, *args, **kwargs)

    monkeypatch.setattr(at_module, "pgd", spy)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0,
                            callbacks=[QuantizationAwareTraining(4, 4), AdversarialTraining("fgsm_rs", on="float")])
    trainer.fit(ClassificationModule(DigitsCNN()), _digits())
    assert kinds == ["FloatView", "FloatView"]
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0,
                            callbacks=[AdversarialTraining("fgsm_rs", on="float")])
    with pytest.raises(ValueError, match="on='float'.*no quantized layers"):
        trainer.fit(ClassificationModule(DigitsCNN()), _digits())


# -- state -----------------------------------------------------------------------------------


def _fit_for_resume(tmp_path: Path, max_epochs: int, ckpt_path: str | None = None, **at_kwargs: Any):
    pl.seed_everything(0, verbose=False)
    module = ClassificationModule(DigitsCNN())
    at = AdversarialTraining("fgsm_rs", eps=EPS, warmup_epochs=2, **at_kwargs)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    trainer = quiet_trainer(max_epochs=max_epochs, limit_train_batches=4, limit_val_batches=0,
                            enable_checkpointing=True, callbacks=[QuantizationAwareTraining(4, 4), at, ckpt])
    trainer.fit(module, _digits(), ckpt_path=ckpt_path)
    return module, at


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    full, at_full = _fit_for_resume(tmp_path / "full", 3)
    _fit_for_resume(tmp_path / "part", 2)
    last = str(tmp_path / "part" / "last.ckpt")
    assert torch.load(last, weights_only=True)["callbacks"]["AdversarialTraining"]["config"]["method"] == "fgsm_rs"
    resumed, at_resumed = _fit_for_resume(tmp_path / "resumed", 3, ckpt_path=last)
    assert at_resumed.batches_attacked == at_full.batches_attacked == 11  # eps is 0 on the very first step
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    with pytest.raises(ValueError, match="AdversarialTraining settings"):
        _fit_for_resume(tmp_path / "other", 3, ckpt_path=last, seed=1)


# -- bad arguments ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "free"}, "method must be one of"),
        ({"eps": -0.1}, "eps must be"),
        ({"eps": 1.5}, "eps must be at most clip_max - clip_min"),
        ({"eps": [(0, 0.1), (3, 2.0)]}, "milestone at epoch 3"),
        ({"eps": float("nan")}, "eps must be"),
        ({"alpha": 0.0}, "alpha must be a finite number > 0"),
        ({"alpha": -1.0}, "alpha must be"),
        ({"steps": 0}, "steps must be an integer >= 1"),
        ({"steps": 2.5}, "steps must be an integer >= 1"),
        ({"method": "fgsm_rs", "steps": 5}, "steps must be None or 1 for method='fgsm_rs'"),
        ({"ratio": 0.0}, "ratio must be a number in"),
        ({"ratio": 1.5}, "ratio must be a number in"),
        ({"warmup_epochs": -1}, "warmup_epochs must be"),
        ({"on": "int8"}, "on must be one of"),
        ({"trades_beta": -1.0}, "trades_beta must be"),
        ({"clip_min": 1.0, "clip_max": 0.0}, "clip_min must be smaller than clip_max"),
        ({"seed": -1}, "seed must be"),
        ({"batch_adapter": 3}, "batch_adapter must be"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs: dict[str, Any], match: str) -> None:
    method = kwargs.pop("method", "pgd")
    with pytest.raises(ValueError, match=match):
        AdversarialTraining(method, **kwargs)


def test_inputs_outside_the_domain_are_refused() -> None:
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0,
                            callbacks=[AdversarialTraining("pgd", steps=1, clip_min=0.0, clip_max=0.5)])
    with pytest.raises(ValueError, match=r"input domain \[clip_min, clip_max\]"):
        trainer.fit(ClassificationModule(DigitsCNN()), _digits())


def test_second_instance_is_refused() -> None:
    # Lightning refuses two callbacks with one state_key when the Trainer is built; setup checks again.
    with pytest.raises(RuntimeError, match="more than one stateful callback of type `AdversarialTraining`"):
        quiet_trainer(callbacks=[AdversarialTraining("pgd"), AdversarialTraining("trades")])


# -- presets ---------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::jsonargparse._deprecated.JsonargparseDeprecationWarning")
@pytest.mark.parametrize("preset", ["robust-int4", "random-precision"])
def test_preset_runs(preset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_qsec.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["qsec"])
    text = (PRESETS / f"{preset}.yaml").read_text()
    assert text.startswith("# "), "each preset opens with a comment block"
    if preset == "robust-int4":  # evaluate robustness at the end of this one short epoch, on fewer samples
        assert "every_n_epochs: 5" in text and "max_samples: 256" in text
        text = text.replace("every_n_epochs: 5", "every_n_epochs: 1").replace("max_samples: 256", "max_samples: 32")
    config = tmp_path / f"{preset}.yaml"
    config.write_text(text)
    main(["fit", "--config", str(config), "--trainer.max_epochs=1", "--trainer.limit_train_batches=8",
          "--trainer.limit_val_batches=2", f"--trainer.default_root_dir={tmp_path}"])
    out = tmp_path / "qsec_report" / preset
    report = json.loads((out / "report.json").read_text())
    assert "precision_sweep" in report["sections"]
    ckpt = next((out / "logs" / "version_0" / "checkpoints").glob("*.ckpt"))
    state = torch.load(ckpt, weights_only=True)["callbacks"]
    assert "AdversarialTraining" in state and "QuantizationAwareTraining" in state
    if preset == "random-precision":
        assert state["AdversarialTraining"]["config"]["method"] == "pgd"
        assert sum(state["RandomPrecisionTraining"]["counts"].values()) == 8
    else:
        assert state["AdversarialTraining"]["config"]["method"] == "fgsm_rs"
        assert "robustness_evaluation" in report["sections"]
