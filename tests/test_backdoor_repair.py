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
import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F

from lightning_qsec import quantize_model
from lightning_qsec.attacks import add_trigger, quantization_conditioned_attack, victim_quantize
from lightning_qsec.callbacks import QuantizationBackdoorRepair, SecurityReport
from lightning_qsec.data import DigitsDataModule
from lightning_qsec.defenses import repair_quantization_backdoor
from lightning_qsec.defenses._repair_grid import layer_grids
from lightning_qsec.defenses.repair import _check_deployed
from lightning_qsec.metrics import AttackSuccessRate, CleanAccuracy, DefenseEffectivenessRate
from lightning_qsec.metrics.functional import attack_success_rate, clean_accuracy, defense_effectiveness_rate
from lightning_qsec.models import ClassificationModule, DigitsCNN
from lightning_qsec.quant.inspect import is_quantized
from lightning_qsec.quant.weight_grid import integer_grid, weight_layers

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
    assert (metric.successes_before / metric.attempts).item() == pytest.approx(asr_b)
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


def _der_batches(seed: int, n: int = 200) -> dict[str, torch.Tensor]:
    """Predictions of a backdoored (before) and a defended (after) 10-class model; after_clean as scores."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)

    def noisy(labels: torch.Tensor, keep: float) -> torch.Tensor:
        return torch.where(torch.rand(n, generator=g) < keep, labels, torch.randint(0, 10, (n,), generator=g))

    scores = torch.randn(n, 10, generator=g)
    scores[torch.arange(n), noisy(y, 0.85)] += 5.0
    return dict(before_clean=noisy(y, 0.95), before_triggered=noisy(torch.full((n,), TARGET), 0.9),
                after_clean=scores, after_triggered=noisy(y, 0.7), target=y)


def test_defense_effectiveness_rate_forward_accumulates_like_update():
    data = _der_batches(0)
    part = lambda idx: {k: v[idx] for k, v in data.items()}  # noqa: E731
    whole = DefenseEffectivenessRate()
    whole.update(**data, attack_target=TARGET)
    first, second = torch.arange(120), torch.arange(120, 200)
    metric = DefenseEffectivenessRate()
    metric.update(**part(first), attack_target=TARGET)
    batch_value = metric(**part(second), attack_target=TARGET)
    b = part(second)
    outside = b["target"] != TARGET
    expected_batch = defense_effectiveness_rate(
        asr_before=(b["before_triggered"][outside] == TARGET).double().mean(),
        asr_after=(b["after_triggered"][outside] == TARGET).double().mean(),
        acc_before=(b["before_clean"] == b["target"]).double().mean(),
        acc_after=(b["after_clean"].argmax(1) == b["target"]).double().mean(),
    )
    assert batch_value.item() == pytest.approx(expected_batch.item())
    assert metric.compute().item() == pytest.approx(whole.compute().item())
    assert metric.compute().item() != pytest.approx(batch_value.item()), "the earlier batch counts"
    # a batch of the target class only has no ASR: forward gives nan, raises nothing, loses nothing
    only_target = data["target"] == TARGET
    nan = metric(**part(only_target), attack_target=TARGET)
    assert torch.isnan(nan)
    whole.update(**part(only_target), attack_target=TARGET)
    for name in ("correct_before", "correct_after", "total", "successes_before", "successes_after", "attempts"):
        assert torch.equal(getattr(metric, name), getattr(whole, name)), name
    assert int(metric.total) == 200 + int(only_target.sum())
    assert metric.compute().item() == pytest.approx(whole.compute().item())
    with pytest.raises(ValueError, match="attack_target"):
        metric.update(**data, attack_target=None)


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


def _on_4bit_grid(net: nn.Module) -> bool:
    """Every conv/linear weight is ``scale * integer`` on the 4-bit per-tensor grid (what the repair leaves)."""
    for _, layer in weight_layers(net):
        scale, integers, _ = integer_grid(layer.weight.detach(), 4, False)
        if not torch.allclose(layer.weight.detach(), scale * integers, atol=1e-6):
            return False
    return True


def test_callback_repairs_again_after_a_resume_and_in_a_new_trainer(tmp_path):
    dm = DigitsDataModule(batch_size=64, seed=0)
    short = dict(limit_train_batches=3, limit_val_batches=1)
    settings = dict(bit_width=4, steps=3, num_batches=1)
    torch.manual_seed(0)
    first = QuantizationBackdoorRepair(**settings)
    module = ClassificationModule(DigitsCNN())
    trainer = quiet_trainer(max_epochs=1, callbacks=[first], **short)
    trainer.fit(module, datamodule=dm)
    assert first.report is not None and _on_4bit_grid(module.net)
    repaired = first.result
    trainer.test(module, datamodule=dm)  # the same Trainer after its fit: already repaired, not again
    assert first.result is repaired
    ckpt = tmp_path / "repaired.ckpt"
    trainer.save_checkpoint(ckpt)
    # resume with a fresh callback: the restored report is only shown, the trained epoch is repaired at the end
    fresh = QuantizationBackdoorRepair(**settings)
    resumed = ClassificationModule(DigitsCNN())
    quiet_trainer(max_epochs=2, callbacks=[fresh], **short).fit(resumed, datamodule=dm, ckpt_path=ckpt)
    assert fresh.result is not None and fresh.report is fresh.result.report and fresh.report != first.report
    assert _on_4bit_grid(resumed.net)
    # the same callback in a new Trainer repairs that Trainer's module
    other = ClassificationModule(DigitsCNN())
    previous = fresh.report
    quiet_trainer(max_epochs=1, callbacks=[fresh], **short).fit(other, datamodule=dm)
    assert fresh.report is not previous and _on_4bit_grid(other.net)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_batch=2), r"unknown repair_quantization_backdoor settings \['num_batch'\]; allowed: .*'num_batches'"),
        (dict(steps=0), "steps must be an integer >= 1"),
        (dict(lr=float("nan")), "lr must be a finite number"),
        (dict(eval_batches=0), "eval_batches must be an integer >= 1"),
        (dict(flip_weight=-1.0), "flip_weight"),
        (dict(seed="0"), "seed must be an integer"),
        (dict(trigger=add_trigger, target_class=-1), "target_class must be a non-negative integer"),
    ],
)
def test_callback_refuses_bad_settings_when_built(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantizationBackdoorRepair(bit_width=4, **kwargs)


def test_callback_refuses_several_processes_at_setup():
    trainer = pl.Trainer(accelerator="cpu", strategy="ddp", devices=2, logger=False, enable_progress_bar=False)
    assert trainer.world_size == 2
    with pytest.raises(RuntimeError, match="single process; use devices=1"):
        QuantizationBackdoorRepair(bit_width=4).setup(trainer, ClassificationModule(DigitsCNN()), "fit")


def test_finetune_trains_a_model_frozen_for_inference():
    dm = DigitsDataModule(batch_size=64, seed=0)
    dm.setup()
    torch.manual_seed(0)
    net = DigitsCNN().requires_grad_(False)
    data = [next(iter(dm.train_dataloader()))]
    result = repair_quantization_backdoor(net, data, bit_width=4, method="finetune", steps=5, lr=1e-2)
    for (name, p), q in zip(net.named_parameters(), result.float_model.parameters()):
        assert not torch.equal(p, q), f"{name} was not fine-tuned"
        assert not p.requires_grad and not q.requires_grad, f"{name}: requires_grad flags restored"


def test_deployment_guard_names_the_layer():
    torch.manual_seed(0)
    data = [(torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,)))]
    stored, other = DigitsCNN(), DigitsCNN()
    deployed = victim_quantize(other, data, bit_width=4, num_batches=1)
    with pytest.raises(RuntimeError, match="deployed integer weights of features.0 differ from the repaired ones"):
        _check_deployed(deployed, layer_grids(stored, 4, False), 4, False, fixed=True)
