"""The callbacks on a CUDA device: QAT, sweep, robustness, report, checkpoint loading, attacks.

Skipped without a GPU (CI has none); run on a machine with one:
``pytest tests/test_gpu.py``.
"""

from __future__ import annotations

import json

import pytest
import pytorch_lightning as pl
import torch
from conftest import UserCNN
from pytorch_lightning.callbacks import ModelCheckpoint

from lightning_qsec import at_precision, is_quantized, load_quantized_checkpoint
from lightning_qsec.attacks import apgd, diva, pgd
from lightning_qsec.callbacks import PrecisionSweep, QuantizationAwareTraining, RobustnessEvaluation, SecurityReport
from lightning_qsec.data import DigitsDataModule

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_qat_sweep_robustness_and_report_on_cuda(tmp_path):
    pl.seed_everything(0, verbose=False)
    module = UserCNN()
    sweep = PrecisionSweep([8, 4, 2], onnx=True, onnx_max_samples=128)
    robust = RobustnessEvaluation(eps=(0.0, 0.1, 0.3), bit_widths=(8, 4), max_samples=128, steps=5)
    trainer = pl.Trainer(
        accelerator="gpu", devices=1, max_epochs=4, logger=False, enable_progress_bar=False,
        callbacks=[QuantizationAwareTraining(4, 4), sweep, robust, SecurityReport(tmp_path),
                   ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)],
    )
    trainer.fit(module, datamodule=DigitsDataModule())
    trainer.test(module, datamodule=DigitsDataModule(), verbose=False)
    assert is_quantized(module)  # Lightning moves the module back to the CPU at teardown
    test = sweep.results["test"]
    assert test["precisions"]["w4a4"]["accuracy"] > 0.85
    assert test["onnx"]["precisions"]["w4a4"]["disabled"]["prediction_flip_rate"] <= 0.01
    rob = robust.results["test"]["precisions"]["w4a4"]
    assert rob is not None
    report = json.loads((tmp_path / "report.json").read_text())
    assert {"precision_sweep", "robustness_evaluation"} <= set(report["sections"])

    loaded = load_quantized_checkpoint(UserCNN(), tmp_path / "last.ckpt", map_location="cuda").cuda()
    dm = DigitsDataModule()
    dm.setup()
    x, y = (t.cuda() for t in dm.test_dataset.tensors)
    with torch.no_grad():
        acc = (loaded(x).argmax(1) == y).float().mean().item()
    assert acc == pytest.approx(test["precisions"]["w4a4"]["accuracy"], abs=0.01)

    g = torch.Generator(device="cuda").manual_seed(0)
    x_adv = pgd(loaded, x[:128], y[:128], eps=0.1, alpha=0.025, steps=10, generator=g)
    assert x_adv.device.type == "cuda" and (x_adv - x[:128]).abs().max() <= 0.1 + 1e-6
    with at_precision(loaded, weight_bit_width=8, act_bit_width=8):
        x_apgd = apgd(loaded, x[:128], y[:128], eps=0.1, steps=10)
    x_diva = diva(loaded, loaded, x[:128], y[:128], eps=0.1, alpha=0.01, steps=10)
    assert x_apgd.device.type == "cuda" and x_diva.device.type == "cuda"
