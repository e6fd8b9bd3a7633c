"""Repair of quantization-conditioned backdoors, BackdoorBench metrics and the repair callback.

Subjects are real: a DigitsCNN trained on digits, attacked with
``quantization_conditioned_attack`` (``backdoor`` and ``indiscriminate``, 4-bit per-tensor,
cheap settings; the backdoor against both quantizers), deployed with ``victim_quantize`` (w4, a8; per
tensor, and per channel for the callback).
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_qsec import quantize_model
from lightning_qsec.attacks import add_trigger, quantization_conditioned_attack, victim_quantize
from lightning_qsec.callbacks import QuantizationBackdoorRepair, SecurityReport
from lightning_qsec.data import DigitsDataModule
from lightning_qsec.defenses import repair_quantization_backdoor
from lightning_qsec.metrics import AttackSuccessRate, CleanAccuracy, DefenseEffectivenessRate
from lightning_qsec.metrics.functional import attack_success_rate, clean_accuracy, defense_effectiveness_rate
from lightning_qsec.models import ClassificationModule, DigitsCNN
from lightning_qsec.quant.inspect import is_quantized

from conftest import quiet_trainer

TARGET = 0


@pytest.fixture(scope="module")
def subjects():
    torch.set_num_threads(1)
    dm = DigitsDataModule(batch_size=64, seed=0)
    dm.setup()
    torch.manual_seed(0)
    clean = DigitsCNN()
    optimizer = torch.optim.Adam(clean.parameters(), lr=3e-3)
    for _ in range(15):
        for x, y in dm.train_dataloader():
            optimizer.zero_grad()
            F.cross_entropy(clean(x), y).backward()
            optimizer.step()
    clean.eval()
    loader = dm.train_dataloader()
    backdoor = quantization_conditioned_attack(clean, loader, mode="backdoor", target_class=TARGET, epochs=6,
                                               repair_epochs=6, quantizers=("per_tensor", "per_channel"), seed=0)
    indiscriminate = quantization_conditioned_attack(clean, loader, mode="indiscriminate", epochs=6, repair_epochs=6,
                                                     seed=0)
    return dm, clean, backdoor, indiscriminate


def _repair(model: nn.Module, dm: DigitsDataModule, **kwargs):
    trigger = dict(trigger=add_trigger, target_class=TARGET) if "trigger" not in kwargs else {}
    return repair_quantization_backdoor(
        model, dm.train_dataloader(), bit_width=4, eval_loader=dm.test_dataloader(), **trigger, **kwargs
    )


def test_flip_rounding_removes_the_backdoor_at_4_bits(subjects):
    dm, _, backdoor, _ = subjects
    before = copy.deepcopy(backdoor.state_dict())
    result = _repair(backdoor, dm, method="flip_rounding")
    r = result.report
    print(r)
    # the attack worked: asleep in float, awake after the victim's 4-bit deployment
    assert r.asr_float < 0.10 and r.asr_before > 0.80, r
    assert r.asr_after < 0.05, r
    assert r.clean_acc_after >= r.clean_acc_float - 0.01, "at most 1 point below the published float model"
    assert 0.5 < r.der <= 1.0
    assert all(torch.equal(before[k], v) for k, v in backdoor.state_dict().items()), "the input model must not change"
    # the returned pieces: a deployed quantized model, and a float model that deploys to it
    assert is_quantized(result.model) and not is_quantized(result.float_model)
    again = victim_quantize(result.float_model, dm.train_dataloader(), bit_width=4)
    for name in ("features.0", "features.3", "classifier.1", "classifier.3"):
        a, b = result.model.get_submodule(name).quant_weight(), again.get_submodule(name).quant_weight()
        assert torch.equal(a.int(), b.int()) and torch.equal(a.scale, b.scale), name
    x, _ = dm.test_dataset.tensors
    with torch.no_grad():
        assert torch.equal(result.model(x).argmax(1), again(x).argmax(1))


@pytest.mark.parametrize("method", ["activation_alignment", "finetune"])
def test_other_methods_report_and_reduce_the_backdoor(subjects, method):
    dm, _, backdoor, _ = subjects
    r = _repair(backdoor, dm, method=method).report
    print(r)
    assert r.method == method and r.asr_before > 0.80
    assert r.asr_after < 0.5 * r.asr_before, r
    assert r.clean_acc_after >= r.clean_acc_before - 0.01, r


def test_flip_rounding_recovers_accuracy_of_an_indiscriminate_attack(subjects):
    dm, _, _, indiscriminate = subjects
    r = _repair(indiscriminate, dm, method="flip_rounding", trigger=None).report
    print(r)
    assert r.asr_before is None and r.der is None, "no trigger, no ASR"
    assert r.clean_acc_before < 0.30, "the attack worked"
    assert r.clean_acc_after >= r.clean_acc_float - 0.01, r
    assert r.agreement_after > 0.95 > r.agreement_before


def test_metrics_match_a_hand_computation_on_real_predictions(subjects):
    dm, _, backdoor, _ = subjects
    x, y = dm.test_dataset.tensors
    before = victim_quantize(backdoor, dm.train_dataloader(), bit_width=4)
    result = _repair(backdoor, dm, method="flip_rounding", steps=100)
    with torch.no_grad():
        preds = {k: (m(x).argmax(1), m(add_trigger(x)).argmax(1)) for k, m in (("b", before), ("a", result.model))}
    # by hand, in Python integers
    rows = list(zip(y.tolist(), preds["b"][0].tolist(), preds["b"][1].tolist(), preds["a"][0].tolist(),
                    preds["a"][1].tolist()))
    acc_b = sum(t == p for t, p, *_ in rows) / len(rows)
    acc_a = sum(t == p for t, _, _, p, _ in rows) / len(rows)
    outside = [row for row in rows if row[0] != TARGET]
    asr_b = sum(row[2] == TARGET for row in outside) / len(outside)
    asr_a = sum(row[4] == TARGET for row in outside) / len(outside)
    der = (max(0.0, asr_b - asr_a) - max(0.0, acc_b - acc_a) + 1) / 2

    assert clean_accuracy(preds["b"][0], y).item() == pytest.approx(acc_b)
    assert attack_success_rate(preds["a"][0], preds["a"][1], y, attack_target=TARGET).item() == pytest.approx(asr_a)
    stateful = CleanAccuracy()
    metric = DefenseEffectivenessRate()
    for chunk in torch.arange(len(y)).split(50):  # batched updates give the same result
        stateful.update(preds["a"][0][chunk], y[chunk])
        metric.update(before_clean=preds["b"][0][chunk], before_triggered=preds["b"][1][chunk],
                      after_clean=preds["a"][0][chunk], after_triggered=preds["a"][1][chunk], target=y[chunk],
                      attack_target=TARGET)
    assert stateful.compute().item() == pytest.approx(acc_a)
    assert metric.asr_before.compute().item() == pytest.approx(asr_b)
    assert metric.compute().item() == pytest.approx(der)
    assert defense_effectiveness_rate(asr_before=asr_b, asr_after=asr_a, acc_before=acc_b, acc_after=acc_a).item() == (
        pytest.approx(der))
    # the report uses the same definitions on the same data
    r = result.report
    assert (r.clean_acc_before, r.clean_acc_after) == (pytest.approx(acc_b), pytest.approx(acc_a))
    assert (r.asr_before, r.asr_after, r.der) == (pytest.approx(asr_b), pytest.approx(asr_a), pytest.approx(der))
    metric.reset()
    with pytest.raises(ValueError, match="asr_before"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchmetrics warns about compute() before update()
        metric.compute()  # nothing measured: nan is not a rate
    asr = AttackSuccessRate(targeted=True)
    asr.update(preds["b"][0], preds["b"][1], y, attack_target=TARGET)
    assert asr.compute().item() == pytest.approx(asr_b)
    for bad in (1.5, float("nan"), torch.tensor([0.1, 0.2])):
        with pytest.raises(ValueError, match="acc_after"):
            defense_effectiveness_rate(asr_before=0.5, asr_after=0.1, acc_before=0.9, acc_after=bad)


def test_callback_repairs_the_module_at_test_in_a_real_trainer(subjects):
    dm, _, backdoor, _ = subjects
    module = ClassificationModule(copy.deepcopy(backdoor))
    callback = QuantizationBackdoorRepair(bit_width=4, method="flip_rounding", quantizer="per_channel",
                                          trigger=add_trigger, target_class=TARGET)
    assert callback.report_section() is None
    quiet_trainer(callbacks=[callback]).test(module, datamodule=dm)
    r = callback.report
    assert r is not None and r.asr_before > 0.80 and r.asr_after < 0.05, r
    # the module now holds the repaired weights: the deployer's own pipeline gives a clean model
    deployed = victim_quantize(module.net, dm.train_dataloader(), bit_width=4, quantizer="per_channel")
    x, y = dm.test_dataset.tensors
    metric = AttackSuccessRate(targeted=True)
    with torch.no_grad():
        metric.update(deployed(x), deployed(add_trigger(x)), y, attack_target=TARGET)
    assert metric.compute().item() < 0.05
    section = callback.report_section()
    assert section.name == "backdoor_repair" and section.data["asr_after"] == r.asr_after
    assert len(section.tables[0].rows) == 3 and "attack success rate" in section.plots[0].series
    restored = QuantizationBackdoorRepair(bit_width=4)
    restored.load_state_dict(callback.state_dict())
    assert restored.report == r


def test_callback_runs_at_the_end_of_fit_and_goes_into_the_security_report(tmp_path):
    dm = DigitsDataModule(batch_size=64, seed=0)
    torch.manual_seed(0)
    module = ClassificationModule(DigitsCNN(), lr=3e-3)
    callback = QuantizationBackdoorRepair(bit_width=4, method="finetune", steps=20)
    trainer = quiet_trainer(max_epochs=2, callbacks=[callback, SecurityReport(tmp_path)], limit_val_batches=2)
    trainer.fit(module, datamodule=dm)
    r = callback.report
    assert r is not None and r.asr_after is None and r.method == "finetune"
    assert 0.0 <= r.clean_acc_after <= 1.0 and r.eval_samples == len(dm.val_dataset)
    written = json.loads((tmp_path / "report.json").read_text())["sections"]["backdoor_repair"]
    assert written["clean_acc_after"] == pytest.approx(r.clean_acc_after)
    assert (tmp_path / "backdoor_repair.png").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(bit_width=1), "bit_width"),
        (dict(bit_width=17), "bit_width"),
        (dict(bit_width=4, act_bit_width=0), "act_bit_width"),
        (dict(bit_width=4, method="prune"), "method must be one of 'flip_rounding', 'activation_alignment', 'finetune'"),
        (dict(bit_width=4, quantizer="mse"), "quantizer"),
        (dict(bit_width=4, trigger=add_trigger), "target_class"),
        (dict(bit_width=4, steps=0), "steps"),
        (dict(bit_width=4, lr=-1.0), "lr"),
    ],
)
def test_bad_arguments(kwargs, message):
    net = DigitsCNN()
    data = [(torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,)))]
    with pytest.raises(ValueError, match=message):
        repair_quantization_backdoor(net, data, **kwargs)


def test_bad_models_and_loaders():
    net = DigitsCNN()
    data = [(torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,)))]
    unlabelled = [torch.rand(8, 1, 8, 8)]
    with pytest.raises(ValueError, match="calibration_loader is empty"):
        repair_quantization_backdoor(net, [], bit_width=4)
    with pytest.raises(ValueError, match="already quantized"):
        repair_quantization_backdoor(quantize_model(copy.deepcopy(net)), data, bit_width=4)
    with pytest.raises(ValueError, match="no Conv1d/Conv2d/Linear"):
        repair_quantization_backdoor(nn.Sequential(nn.Flatten(), nn.ReLU()), data, bit_width=4)
    with pytest.raises(ValueError, match="calibration_loader yields batches without labels; method='finetune'"):
        repair_quantization_backdoor(net, unlabelled, bit_width=4, method="finetune", eval_loader=data)
    with pytest.raises(ValueError, match="eval_loader"):
        repair_quantization_backdoor(net, unlabelled, bit_width=4, steps=2)
    with pytest.raises(ValueError, match="eval_loader yields batches without labels"):
        repair_quantization_backdoor(net, data, bit_width=4, eval_loader=unlabelled)
    with pytest.raises(ValueError, match="eval_loader is empty"):
        repair_quantization_backdoor(net, data, bit_width=4, eval_loader=[])
    # inputs without labels are enough for the label-free methods
    r = repair_quantization_backdoor(net, unlabelled, bit_width=4, steps=2, eval_loader=data).report
    assert r.eval_samples == 8
    with pytest.raises(ValueError, match="method"):
        QuantizationBackdoorRepair(method="prune")
    with pytest.raises(ValueError, match="bit_width"):
        QuantizationBackdoorRepair(bit_width=20)
    with pytest.raises(ValueError, match="target_class"):
        QuantizationBackdoorRepair(trigger=add_trigger)
    with pytest.raises(ValueError, match="calibration_loader"):
        QuantizationBackdoorRepair(calibration_loader=data)
