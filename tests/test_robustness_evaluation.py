"""RobustnessEvaluation: robust accuracy per precision x attack x eps, transfer, DIVA, amplification, masking flags."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import pytorch_lightning as pl
import torch
from conftest import UserCNN, quiet_trainer
from torch import nn

from lightning_qsec import at_precision, float_mode, is_quantized
from lightning_qsec.callbacks import QuantizationAwareTraining, RobustnessEvaluation, SecurityReport
from lightning_qsec.callbacks._masking import effective_tolerance, gradient_masking_flags, masking_flags_by_precision
from lightning_qsec.data import DigitsDataModule
from lightning_qsec.quant.amplification import error_amplification_ratio
from lightning_qsec.quant.precision import bit_widths
from lightning_qsec.quant.statistics import statistics_state

EPS = ["0", "0.05", "0.1", "0.2", "0.3"]


class RoundedInput(UserCNN):
    """Rounds its input to quarter steps without a straight-through estimator: zero input gradients."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(torch.round(x * 4) / 4)


class BatchNormCNN(UserCNN):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu1(self.bn(self.conv1(x))))
        x = self.relu2(self.conv2(x))
        x = torch.nn.functional.max_pool2d(x, 2).flatten(1)
        return self.fc2(self.relu3(self.fc1(x)))


def _fit(module, callbacks, *, epochs, **trainer_kwargs):
    pl.seed_everything(0, verbose=False)
    trainer = quiet_trainer(max_epochs=epochs, callbacks=callbacks, **trainer_kwargs)
    trainer.fit(module, datamodule=DigitsDataModule())
    return trainer


def _test_samples(n: int):
    dm = DigitsDataModule()
    dm.setup()
    x, y = dm.test_dataset.tensors
    return x[:n], y[:n]


def _curve(entry, attack):
    return [entry["attacks"][attack][k]["robust_accuracy"] for k in EPS]


# ---------------------------------------------------------------- clean QAT model
@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    pl.seed_everything(0, verbose=False)
    module = UserCNN()
    rob = RobustnessEvaluation(max_samples=128, steps=5, every_n_epochs=2)
    trainer = _fit(module, [QuantizationAwareTraining(4, 4), rob, SecurityReport(tmp)], epochs=3)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    trainer.test(module, datamodule=DigitsDataModule(), verbose=False)
    return module, rob, trainer, tmp, state


def test_results_structure_and_logging(clean_run):
    module, rob, trainer, _, _ = clean_run
    assert [h["stage"] for h in rob.history] == ["validate", "test"]
    assert rob.history[0]["epoch"] == 1  # every_n_epochs=2 of 3 epochs, no sanity-check run
    r = rob.results["test"]
    assert r["num_samples"] == 128 and r["num_classes"] == 10 and not r["ptq_twin"]
    assert r["transfer_eps"] == 0.1 and r["transfer_attack"] == "pgd"
    assert list(r["precisions"]) == ["float", "w8a8", "w4a4"]
    for label, entry in r["precisions"].items():
        assert list(entry["attacks"]) == ["fgsm", "pgd"]
        assert list(entry["attacks"]["pgd"]) == EPS
        for per_eps in entry["attacks"].values():
            for v in per_eps.values():
                assert 0.0 <= v["robust_accuracy"] <= 1.0 and 0.0 <= v["success_rate"] <= 1.0
        if label == "float":
            continue
        assert (entry["weight_bit_width"], entry["act_bit_width"]) == {"w8a8": (8, 8), "w4a4": (4, 4)}[label]
        for direction in ("float_to_quant", "quant_to_float"):
            assert 0.0 <= entry["transfer"][direction]["robust_accuracy"] <= 1.0
            assert 0.0 <= entry["transfer"][direction]["transfer_rate"] <= 1.0
        # inputs crafted on a near-identical twin transfer well
        assert entry["transfer"]["float_to_quant"]["transfer_rate"] > 0.5
        assert 0.0 <= entry["diva"]["success_rate"] <= 1.0
        assert entry["amplification"]["ratio"] > 0
    logged = trainer.callback_metrics
    assert float(logged["qsec/robust/w4a4/pgd/eps=0.1/acc"]) == pytest.approx(
        r["precisions"]["w4a4"]["attacks"]["pgd"]["0.1"]["robust_accuracy"]
    )
    for key in ("qsec/robust/float/fgsm/eps=0.3/asr", "qsec/robust/w8a8/transfer/float_to_quant/rate",
                "qsec/robust/w8a8/transfer/quant_to_float/acc", "qsec/robust/w4a4/diva/success",
                "qsec/robust/w4a4/amplification", "qsec/robust/w4a4/clean_acc", "qsec/robust/w4a4/masking_flags"):
        assert key in logged, key


def test_eps_zero_is_clean_accuracy_and_matches_hand_measurement(clean_run):
    module, rob, _, _, _ = clean_run
    r = rob.results["test"]
    x, y = _test_samples(128)
    module.eval()
    with torch.no_grad():
        with float_mode(module):
            float_acc = (module(x).argmax(1) == y).float().mean().item()
        with at_precision(module, weight_bit_width=8, act_bit_width=8):
            w8_acc = (module(x).argmax(1) == y).float().mean().item()
    assert r["precisions"]["float"]["clean_accuracy"] == pytest.approx(float_acc)
    assert r["precisions"]["w8a8"]["clean_accuracy"] == pytest.approx(w8_acc)
    for entry in r["precisions"].values():
        assert entry["clean_accuracy"] > 0.6
        for attack in ("fgsm", "pgd"):
            assert entry["attacks"][attack]["0"]["robust_accuracy"] == entry["clean_accuracy"]
            assert entry["attacks"][attack]["0"]["success_rate"] == 0.0


def test_amplification_matches_error_amplification_ratio(clean_run):
    module, rob, _, _, _ = clean_run
    x, y = _test_samples(128)
    with at_precision(module, weight_bit_width=4, act_bit_width=4):
        expected = error_amplification_ratio(module, x, eps=0.1, targets=y)
    assert rob.results["test"]["precisions"]["w4a4"]["amplification"]["ratio"] == pytest.approx(expected, rel=1e-4)


def test_robust_accuracy_falls_with_eps_and_no_masking_flag_on_clean_model(clean_run):
    _, rob, _, _, _ = clean_run
    for stage in ("validate", "test"):
        r = rob.results[stage]
        assert r["gradient_masking"] == [], r["gradient_masking"]
        for entry in r["precisions"].values():
            assert entry["masking_flags"] == [] and entry["zero_gradient_fraction"] == 0.0
            pgd = _curve(entry, "pgd")
            assert all(b <= a + 0.02 for a, b in zip(pgd, pgd[1:])), pgd
            assert pgd[-1] < 0.1 < pgd[0] - 0.5  # eps 0.3 breaks an undefended model
            fgsm = _curve(entry, "fgsm")
            assert fgsm[-1] < fgsm[0]


def test_report_has_section_and_plot(clean_run):
    _, _, _, tmp, _ = clean_run
    report = json.loads((tmp / "report.json").read_text())
    section = report["sections"]["robustness_evaluation"]
    assert section["latest"]["test"]["precisions"]["w4a4"]["attacks"]["pgd"]["0.3"]["robust_accuracy"] < 0.1
    md = (tmp / "report.md").read_text()
    assert "Adversarial robustness" in md and "robust accuracy" in md and "No gradient-masking flag" in md
    assert "DIVA success" in md and "error amplification ratio" in md
    png = tmp / "robust_accuracy_vs_eps.png"
    assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"


def test_state_dict_round_trip(clean_run):
    _, rob, _, _, _ = clean_run
    other = RobustnessEvaluation(max_samples=128, steps=5)
    assert other.report_section() is None
    other.load_state_dict(rob.state_dict())
    assert other.results == rob.results and other.history == rob.history
    section = other.report_section()
    assert section is not None and section.plots[0].filename == "robust_accuracy_vs_eps.png"
    json.dumps(section.data)  # JSON-serialisable


def test_evaluation_leaves_model_state_untouched(clean_run):
    module, _, _, _, before = clean_run
    after = module.state_dict()
    assert set(after) == set(before)
    for key, value in before.items():  # weights, bit widths, Brevitas counters and scales
        assert torch.equal(after[key], value), key
    assert set(bit_widths(module)["weight"].values()) == {4}


def test_batchnorm_and_brevitas_statistics_not_consumed():
    pl.seed_everything(0, verbose=False)
    module = BatchNormCNN()
    rob = RobustnessEvaluation((0.0, 0.1), max_samples=64, steps=2, bit_widths=[4], stages=("validate",))
    trainer = _fit(module, [QuantizationAwareTraining(4, 4, calibrate_batches=0), rob], epochs=1,
                   limit_train_batches=3, num_sanity_val_steps=0)
    module.train()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    stats = statistics_state(module)
    assert stats and {s["counter"] for s in stats.values()} == {3}  # mid-collection: eval must not advance it
    assert "bn.num_batches_tracked" in before
    flags = {name: m.training for name, m in module.named_modules()}
    grads = {name: p.requires_grad for name, p in module.named_parameters()}
    trainer.validate(module, datamodule=DigitsDataModule(), verbose=False)
    assert rob.results["validate"]["num_samples"] == 64
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key]), key
    after = statistics_state(module)
    for name, s in stats.items():
        assert after[name]["counter"] == s["counter"] and torch.equal(after[name]["buffer"], s["buffer"]), name
    assert {name: m.training for name, m in module.named_modules()} == flags
    assert {name: p.requires_grad for name, p in module.named_parameters()} == grads
    assert all(p.grad is None or not p.grad.any() for p in module.parameters())


# ---------------------------------------------------------------- masked model
def test_masking_flag_fires_on_non_differentiable_preprocessing():
    module = RoundedInput()
    rob = RobustnessEvaluation(max_samples=128, steps=5, stages=("test",))
    trainer = _fit(module, [QuantizationAwareTraining(4, 4), rob], epochs=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the attacks warn about the zero gradient
        trainer.test(module, datamodule=DigitsDataModule(), verbose=False)
    r = rob.results["test"]
    assert r["gradient_masking"]
    for label, entry in r["precisions"].items():
        assert entry["zero_gradient_fraction"] == 1.0
        assert any("gradient is zero" in f for f in entry["masking_flags"]), (label, entry["masking_flags"])
        assert _curve(entry, "fgsm") == [entry["clean_accuracy"]] * len(EPS)  # FGSM cannot move the input
    assert any("does not fall" in f for f in r["gradient_masking"])


# ---------------------------------------------------------------- float model, inference_mode=False
def test_float_model_gets_ptq_twin_under_inference_mode_false():
    module = UserCNN()
    rob = RobustnessEvaluation((0.0, 0.1, 0.3), attacks=("pgd", "apgd"), bit_widths=[8, "w4a8"], max_samples=64,
                               steps=3, stages=("test",), calibrate_batches=3)
    trainer = _fit(module, [rob], epochs=2, inference_mode=False)
    trainer.test(module, datamodule=DigitsDataModule(), verbose=False)
    first = rob.results["test"]
    assert not is_quantized(module)  # the user's model was never touched
    assert first["ptq_twin"] and list(first["precisions"]) == ["float", "w8a8", "w4a8"]
    assert first["transfer_eps"] == 0.1
    w8 = first["precisions"]["w8a8"]
    assert w8["attacks"]["apgd"]["0.3"]["robust_accuracy"] < w8["clean_accuracy"] - 0.3
    trainer.test(module, datamodule=DigitsDataModule(), verbose=False)
    second = rob.results["test"]
    assert second["precisions"] == first["precisions"]  # seeded: deterministic


# ---------------------------------------------------------------- the pure masking function
def _entry(clean, curves, zero=0.0, **extra):
    attacks = {a: {f"{e:g}": {"eps": e, "robust_accuracy": acc} for e, acc in zip((0.0, 0.1, 0.3), accs)}
               for a, accs in curves.items()}
    return {"clean_accuracy": clean, "zero_gradient_fraction": zero, "attacks": attacks, **extra}


def _results(**precisions):
    return {"num_classes": 10, "num_samples": 1000, "transfer_eps": 0.1, "precisions": precisions}


def test_masking_function_quiet_on_clean_results():
    clean = _entry(0.95, {"fgsm": (0.95, 0.5, 0.1), "pgd": (0.95, 0.3, 0.0)},
                   transfer={"float_to_quant": {"robust_accuracy": 0.4}})
    assert gradient_masking_flags(_results(float=_entry(0.95, {"pgd": (0.95, 0.3, 0.0)}), w4a4=clean)) == []


@pytest.mark.parametrize(
    ("entry", "needle"),
    [
        (_entry(0.95, {"fgsm": (0.95, 0.2, 0.1), "pgd": (0.95, 0.6, 0.0)}), "FGSM beats white-box PGD at eps=0.1"),
        (_entry(0.95, {"pgd": (0.95, 0.6, 0.0)}, transfer={"float_to_quant": {"robust_accuracy": 0.2}}),
         "transfer from float beats white-box PGD"),
        (_entry(0.95, {"pgd": (0.95, 0.3, 0.6)}), "rises with eps"),
        (_entry(0.95, {"pgd": (0.95, 0.95, 0.94)}), "does not fall"),
        (_entry(0.95, {"pgd": (0.95, 0.3, 0.0)}, zero=0.9), "gradient is zero for 90%"),
    ],
)
def test_masking_function_flags(entry, needle):
    flags = gradient_masking_flags(_results(w2a2=entry))
    assert any(flag.startswith("w2a2: ") and needle in flag for flag in flags), flags


def test_masking_function_transfer_to_float_and_tolerance():
    results = _results(
        float=_entry(0.95, {"pgd": (0.95, 0.5, 0.0)}),
        w4a4=_entry(0.95, {"pgd": (0.95, 0.3, 0.0)}, transfer={"quant_to_float": {"robust_accuracy": 0.45}}),
    )
    assert masking_flags_by_precision(results)["float"][0].startswith("transfer from w4a4 beats")
    assert masking_flags_by_precision(results, tolerance=0.1) == {"float": [], "w4a4": []}
    assert masking_flags_by_precision({**results, "num_samples": 64}) == {"float": [], "w4a4": []}  # 1/8 noise
    assert effective_tolerance(0.03, 128) == pytest.approx(1 / math.sqrt(128))
    assert effective_tolerance(0.03, None) == 0.03
    # a model at chance accuracy is not "robust" at any eps: no flag from (b)
    assert gradient_masking_flags(_results(w2a2=_entry(0.1, {"pgd": (0.1, 0.1, 0.1)}))) == []
    with pytest.raises(ValueError, match="tolerance"):
        gradient_masking_flags(results, tolerance=-1)


# ---------------------------------------------------------------- bad arguments
@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"eps": (0.0, -0.1)}, "eps"),
        ({"eps": (0.0, 1.5)}, "eps"),
        ({"eps": (0.0, float("nan"))}, "eps"),
        ({"eps": ()}, "eps"),
        ({"attacks": ("cw",)}, "attacks"),
        ({"attacks": ()}, "attacks"),
        ({"attacks": ("fgsm",), "norm": "l2"}, "attacks"),
        ({"norm": "l3"}, "norm"),
        ({"steps": 0}, "steps"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": -0.1}, "alpha"),
        ({"max_samples": 0}, "max_samples"),
        ({"every_n_epochs": 0}, "every_n_epochs"),
        ({"calibrate_batches": 0}, "calibrate_batches"),
        ({"bit_widths": [1]}, "bit_widths"),
        ({"bit_widths": ["int4"]}, "bit_widths"),
        ({"clip_min": 1.0, "clip_max": 0.0}, "clip_min"),
        ({"seed": 0.5}, "seed"),
        ({"transfer": "yes"}, "transfer"),
        ({"stages": ("fit",)}, "stages"),
        ({"masking_tolerance": 2}, "masking_tolerance"),
        ({"batch_adapter": 3}, "batch_adapter"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        RobustnessEvaluation(**kwargs)


def test_inputs_outside_the_domain_name_clip_bounds():
    module = UserCNN()
    rob = RobustnessEvaluation((0.0, 0.1), max_samples=16, steps=1, bit_widths=[8], clip_min=0.0, clip_max=0.5,
                               stages=("test",), calibrate_batches=1)
    trainer = quiet_trainer(max_epochs=1, callbacks=[rob], limit_test_batches=1)
    with pytest.raises(ValueError, match="clip_min"):
        trainer.test(module, datamodule=DigitsDataModule(), verbose=False)


def test_l2_norm_measures_amplification_with_an_l2_step_at_radii_above_one():
    module = UserCNN()
    rob = RobustnessEvaluation((0.0, 1.5, 3.0), attacks=("pgd",), bit_widths=[8], norm="l2", max_samples=64,
                               steps=3, stages=("test",), calibrate_batches=3, transfer=False, diva=False)
    trainer = _fit(module, [rob], epochs=1)
    trainer.test(module, datamodule=DigitsDataModule(), verbose=False)
    w8 = rob.results["test"]["precisions"]["w8a8"]
    assert math.isfinite(w8["amplification"]["ratio"]) and w8["amplification"]["float"] > 0
    assert w8["attacks"]["pgd"]["3"]["robust_accuracy"] < w8["clean_accuracy"]


def test_ptq_twin_does_not_change_the_training_order():
    """Building the float model's PTQ twin must not draw from the global RNG that shuffles the data."""
    from torch.utils.data import DataLoader, TensorDataset

    dm = DigitsDataModule()
    dm.setup()
    train = TensorDataset(*dm.train_dataset.tensors)

    class Labels(pl.Callback):
        def __init__(self) -> None:
            self.seen: list[torch.Tensor] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.seen.append(batch[1].clone())

    orders = []
    for extra in ([], [RobustnessEvaluation((0.0, 0.1), attacks=("fgsm",), bit_widths=[8], max_samples=8,
                                            calibrate_batches=1, transfer=False, diva=False, amplification=False)]):
        pl.seed_everything(0, verbose=False)
        labels = Labels()
        trainer = quiet_trainer(max_epochs=2, limit_train_batches=3, limit_val_batches=1, callbacks=[labels, *extra])
        trainer.fit(UserCNN(), DataLoader(train, batch_size=16, shuffle=True), DataLoader(train, batch_size=16))
        orders.append(torch.cat(labels.seen))
    assert torch.equal(orders[0], orders[1])


def test_cheap_and_strong_hooks_share_a_trainer_and_eps_takes_arrays():
    import numpy as np

    fast = RobustnessEvaluation(np.linspace(0, 0.3, 4), max_samples=32, steps=2, bit_widths=[4], stages=("validate",))
    strong = RobustnessEvaluation(torch.tensor([0.0, 0.1, 0.3]), max_samples=64, steps=5, bit_widths=[4],
                                  stages=("test",))
    assert fast.eps == pytest.approx([0.0, 0.1, 0.2, 0.3]) and strong.eps == pytest.approx([0.0, 0.1, 0.3])
    assert fast.state_key != strong.state_key
    quiet_trainer(callbacks=[QuantizationAwareTraining(4, 4), fast, strong])  # Lightning refuses equal keys
    with pytest.raises(ValueError, match="eps entries must be finite numbers >= 0"):
        RobustnessEvaluation([np.float32(0.1), float("nan")])


def test_hooks_that_would_log_the_same_keys_are_refused_and_l2_logs_apart():
    linf = RobustnessEvaluation([0.0, 0.1], attacks=("pgd",), bit_widths=[8], max_samples=16, steps=1)
    l2 = RobustnessEvaluation([0.0, 0.5], attacks=("pgd",), bit_widths=[8], max_samples=16, steps=1, norm="l2")
    assert (linf.log_prefix, l2.log_prefix) == ("qsec/robust", "qsec/robust/l2")
    twin = RobustnessEvaluation([0.0, 0.2], attacks=("pgd",), bit_widths=[8], max_samples=16, steps=2)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1,
                            callbacks=[QuantizationAwareTraining(8, 8, calibrate_batches=1), linf, twin])
    with pytest.raises(ValueError, match="would log the same qsec/robust/... keys"):
        trainer.fit(UserCNN(), datamodule=DigitsDataModule())
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1,
                            callbacks=[QuantizationAwareTraining(8, 8, calibrate_batches=1), linf, l2])
    trainer.fit(UserCNN(), datamodule=DigitsDataModule())
    assert "qsec/robust/l2/w8a8/pgd/eps=0.5/acc" in trainer.callback_metrics
    assert "qsec/robust/w8a8/pgd/eps=0.1/acc" in trainer.callback_metrics
