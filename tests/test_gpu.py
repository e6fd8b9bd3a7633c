"""The callbacks on a CUDA device: QAT, sweep, robustness, report, checkpoint loading, attacks.

Also the defenses (scan, repair, fair mixed precision) and BatchNorm QAT on CUDA.
Skipped without a GPU (CI has none); run on a machine with one:
``pytest tests/test_gpu.py``.
"""

from __future__ import annotations

import copy
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


def test_defenses_and_batchnorm_qat_on_cuda():
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_qsec.defenses import (
        AdversarialTraining,
        fair_mixed_precision,
        repair_quantization_backdoor,
        scan_model,
    )
    from lightning_qsec.models import ClassificationModule, DigitsCNN, MNISTBatchNormCNN

    pl.seed_everything(0, verbose=False)
    dm = DigitsDataModule()
    dm.setup()
    x, y = dm.train_dataset.tensors
    loader = DataLoader(TensorDataset(x.cuda(), y.cuda()), batch_size=64)

    # BatchNorm QAT (calibration with batch statistics) and adversarial training on the GPU
    module = ClassificationModule(MNISTBatchNormCNN(width=8), lr=1e-2)
    trainer = pl.Trainer(accelerator="gpu", devices=1, max_epochs=3, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, limit_val_batches=0,
                         callbacks=[QuantizationAwareTraining(4, 4, calibrate_batches=4), AdversarialTraining("fgsm_rs")])
    trainer.fit(module, datamodule=DigitsDataModule())
    assert _test_accuracy(module.cuda(), dm) > 0.5

    # a float model someone else trained: scan, repair, FairQuanti-style mixed precision, all on CUDA
    float_module = ClassificationModule(DigitsCNN(), lr=1e-2)
    pl.Trainer(accelerator="gpu", devices=1, max_epochs=5, logger=False, enable_progress_bar=False,
               enable_checkpointing=False, limit_val_batches=0).fit(float_module, datamodule=DigitsDataModule())
    net = float_module.net.cuda().eval()
    scan = scan_model(net, loader, bit_widths=(8, 4), progress=False, max_samples=256, trigger_steps=10)
    assert not scan.suspicious, scan
    repaired = repair_quantization_backdoor(net, loader, bit_width=4, trigger=torch.ones(2, 2), target_class=0, steps=20,
                                            num_batches=4)
    assert repaired.report.clean_acc_after > 0.8 and repaired.report.asr_after is not None and next(repaired.model.parameters()).device.type == "cuda"
    mixed, result = fair_mixed_precision(copy.deepcopy(net), loader, flip_fn=lambda t: t.flip(-1), score_batches=2)
    assert next(mixed.parameters()).device.type == "cuda" and 0 < result.high_precision_fraction < 1


def _test_accuracy(model, dm) -> float:
    x, y = (t.cuda() for t in dm.test_dataset.tensors)
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()
