"""PrecisionSweep: in place, under inference_mode or not, PTQ twins, ONNX runtime check, DDP-safe states."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from conftest import UserCNN, quiet_trainer

from lightning_qsec import is_quantized
from lightning_qsec.callbacks import PrecisionSweep, QuantizationAwareTraining, SecurityReport
from lightning_qsec.data import DigitsDataModule


def _run(callbacks, *, epochs=2, inference_mode=True, module=None):
    pl.seed_everything(0, verbose=False)
    module = module or UserCNN()
    trainer = quiet_trainer(max_epochs=epochs, callbacks=callbacks, inference_mode=inference_mode)
    trainer.fit(module, datamodule=DigitsDataModule())
    trainer.test(module, datamodule=DigitsDataModule(), verbose=False)
    return module, trainer


@pytest.mark.parametrize("inference_mode", [True, False])
def test_sweep_in_place_without_copies(inference_mode):
    sweep = PrecisionSweep([8, "w4a8", 2])
    module, trainer = _run([QuantizationAwareTraining(4, 4), sweep], inference_mode=inference_mode)
    test = sweep.results["test"]
    assert not test["ptq_twin"]
    assert list(test["precisions"]) == ["w8a8", "w4a8", "w2a2"]
    assert test["precisions"]["w4a8"] == {**test["precisions"]["w4a8"], "weight_bit_width": 4, "act_bit_width": 8}
    assert test["precisions"]["w8a8"]["accuracy"] > 0.6  # two epochs; chance is 0.1
    assert test["precisions"]["w2a2"]["disagreement"] > test["precisions"]["w8a8"]["disagreement"]
    logged = trainer.callback_metrics
    assert float(logged["qsec/w8a8/acc"]) == pytest.approx(test["precisions"]["w8a8"]["accuracy"])
    assert "qsec/float/acc" in logged and "qsec/w2a2/disagreement" in logged


def test_sweep_matches_direct_measurement():
    """The sweep's numbers equal a hand measurement with at_precision on the test split."""
    from lightning_qsec import at_precision, float_mode

    sweep = PrecisionSweep([8, 4])
    module, _ = _run([QuantizationAwareTraining(4, 4), sweep])
    dm = DigitsDataModule()
    dm.setup()
    x, y = dm.test_dataset.tensors
    module.eval()
    with torch.no_grad():
        with float_mode(module):
            float_pred = module(x).argmax(1)
        with at_precision(module, weight_bit_width=8, act_bit_width=8):
            w8 = module(x).argmax(1)
    r = sweep.results["test"]
    assert r["float"]["accuracy"] == pytest.approx((float_pred == y).float().mean().item())
    assert r["precisions"]["w8a8"]["accuracy"] == pytest.approx((w8 == y).float().mean().item())
    assert r["precisions"]["w8a8"]["disagreement"] == pytest.approx((w8 != float_pred).float().mean().item())


def test_ptq_twin_for_a_float_model_leaves_the_model_float(tmp_path):
    sweep = PrecisionSweep([8, 4, 2], calibrate_batches=5)
    module, _ = _run([sweep, SecurityReport(tmp_path)], epochs=3)
    assert not is_quantized(module)  # the user's model was never touched
    r = sweep.results["test"]
    assert r["ptq_twin"]
    assert abs(r["precisions"]["w8a8"]["drop"]) <= 0.02
    assert r["precisions"]["w2a2"]["accuracy"] < r["precisions"]["w8a8"]["accuracy"]
    assert (tmp_path / "report.json").exists() and (tmp_path / "accuracy_vs_bit_width.png").exists()


def test_sweep_every_n_epochs_and_not_in_sanity_check():
    sweep = PrecisionSweep([8], every_n_epochs=2)
    _run([QuantizationAwareTraining(8, 8), sweep], epochs=4)
    assert [h["epoch"] for h in sweep.history if h["stage"] == "validate"] == [1, 3]


def test_onnx_runtime_measured(tmp_path):
    pytest.importorskip("onnxruntime")
    sweep = PrecisionSweep([8, 4], onnx=True, onnx_max_samples=128)
    _run([QuantizationAwareTraining(4, 4), sweep, SecurityReport(tmp_path)], epochs=1)
    onnx = sweep.results["test"]["onnx"]
    assert onnx["samples"] == 128
    disabled = onnx["precisions"]["w4a4"]["disabled"]
    assert disabled["prediction_flip_rate"] == 0.0 and disabled["max_abs_logit_diff"] < 1e-3
    assert onnx["precisions"]["w4a4"]["all"]["runtime"]["graph_optimization"] == "all"
    assert "onnxruntime" in (tmp_path / "report.md").read_text()
