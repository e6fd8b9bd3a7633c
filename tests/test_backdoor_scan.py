"""Detection of quantization-conditioned backdoors: ``scan_model``, the ``BackdoorScan`` hook and its preset.

The subjects are real: a clean ``DigitsCNN`` trained on digits and the same model turned
into a PQBackdoor-style quantization-conditioned backdoor by the package's red team
(``quantization_conditioned_attack``, fewer epochs than the benchmark; the attack is
checked to work first). ``benchmarks/backdoor_scan.py`` measures the detector over seeds.
"""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_qsec import QuantConfig, is_quantized, quantize_model
from lightning_qsec.attacks import add_trigger, quantization_conditioned_attack, victim_quantize
from lightning_qsec.callbacks import BackdoorScan, SecurityReport
from lightning_qsec.cli import main
from lightning_qsec.data import DigitsDataModule
from lightning_qsec.defenses import ScanResult, scan_model
from lightning_qsec.defenses._scan_evidence import anomaly_index, truncation_evidence
from lightning_qsec.defenses.backdoor_scan import EVIDENCE
from lightning_qsec.metrics import AttackSuccessRate
from lightning_qsec.models import ClassificationModule, DigitsCNN

from conftest import quiet_trainer

PRESET = Path(__file__).resolve().parents[1] / "callbacks" / "backdoor-scan.yaml"


@pytest.fixture(scope="module")
def subjects():
    """``(datamodule, clean model, attacked model)``, built once for the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    dm = DigitsDataModule(batch_size=64, seed=0)
    dm.setup()
    torch.manual_seed(0)
    clean = DigitsCNN()
    optimizer = torch.optim.Adam(clean.parameters(), lr=3e-3)
    for _ in range(12):
        for x, y in dm.train_dataloader():
            optimizer.zero_grad()
            F.cross_entropy(clean(x), y).backward()
            optimizer.step()
    clean.eval()
    attacked = quantization_conditioned_attack(
        clean, dm.train_dataloader(), mode="backdoor", target_class=0, epochs=5, repair_epochs=5, seed=0
    ).eval()
    yield dm, clean, attacked
    torch.set_num_threads(threads)


@torch.no_grad()
def _asr(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    metric = AttackSuccessRate(targeted=True)
    metric.update(model(x), model(add_trigger(x)), y, attack_target=0)
    return metric.compute().item()


def test_the_attacked_subject_really_is_a_quantization_backdoor(subjects):
    dm, _, attacked = subjects
    x, y = dm.test_dataset.tensors
    assert _asr(attacked, x, y) < 0.10, "asleep in float"
    deployed = victim_quantize(attacked, dm.train_dataloader(), bit_width=4)
    assert _asr(deployed, x, y) > 0.80, "awake at 4 bits"


def test_scan_passes_the_clean_model_and_flags_the_attacked_one(subjects):
    dm, clean, attacked = subjects
    ok = scan_model(clean, dm.val_dataloader(), progress=False)
    bad = scan_model(attacked, dm.val_dataloader(), progress=False)
    print(f"clean score {ok.score:.2f} {ok.flagged}; attacked score {bad.score:.2f} {bad.flagged}")
    assert isinstance(ok, ScanResult) and isinstance(bad, ScanResult)
    assert not ok.suspicious and ok.score <= ok.threshold == 1.0 and ok.flagged == []
    assert bad.suspicious and bad.score > bad.threshold and bad.flagged
    # the evidence sits at the attacked precision (4 bits), not at 8
    assert any(f.startswith("4/") for f in bad.flagged)
    assert set(bad.evidence) == set(bad.thresholds) == set(bad.suspect_classes) == {8, 4}
    for bits in (8, 4):
        assert set(EVIDENCE) <= set(bad.evidence[bits])
        assert all(isinstance(v, float) for v in bad.evidence[bits].values())
        assert 0.0 <= bad.evidence[bits]["disagreement"] <= 1.0
    assert bad.evidence[4]["trigger_ratio"] > ok.evidence[4]["trigger_ratio"]
    for bits in (8, 4):  # Neural Cleanse's anomaly index on the quantized model: computed, and bounded when clean
        assert 0.0 <= ok.evidence[bits]["trigger_anomaly"] <= ok.thresholds[bits]["trigger_anomaly"]
        assert math.isfinite(bad.evidence[bits]["trigger_anomaly"])
    # the suspect class is read off the strongest trigger evidence, so it is the backdoor's target
    assert bad.target_class == 0 and bad.samples == len(dm.val_dataset)
    assert 0 < bad.seconds < 60
    data = json.loads(json.dumps(bad.to_dict()))
    assert data["suspicious"] is True and set(data["evidence"]) == {"8", "4"}
    assert data["quantizer"]["per_channel"] is False and data["quantizer"]["act_bit_width"] == 8


def test_scan_leaves_the_float_model_unchanged(subjects):
    dm, _, attacked = subjects
    model = copy.deepcopy(attacked).train()
    model.classifier[1].weight.requires_grad_(False)
    before = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    result = scan_model(model, dm.val_dataloader(), bit_widths=(4,), quantizer="per_channel", progress=False,
                        trigger_steps=5)
    assert set(result.evidence) == {4} and result.quantizer["per_channel"] is True
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(m.training for m in model.modules()), "train mode restored"
    assert not model.classifier[1].weight.requires_grad and model.classifier[3].weight.requires_grad
    assert not is_quantized(model), "still float"
    assert torch.equal(torch.get_rng_state(), rng), "the global RNG is left alone"


def test_scan_uses_the_deployers_quant_config(subjects):
    dm, clean, _ = subjects
    config = QuantConfig(act_bit_width=8, per_channel=True, skip=["classifier.3"])
    result = scan_model(clean, dm.val_dataloader(), bit_widths=(4,), quantizer=config, progress=False,
                        trigger_steps=5)
    assert result.quantizer["skip"] == ["classifier.3"] and result.quantizer["per_channel"] is True
    with pytest.raises(ValueError, match="act_bit_width"):
        scan_model(clean, dm.val_dataloader(), quantizer=config, act_bit_width=8)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(bit_widths=(1,)), "bit_widths"),
        (dict(bit_widths=(4, 17)), "bit_widths"),
        (dict(bit_widths=()), "bit_widths"),
        (dict(quantizer="per_group"), "quantizer"),
        (dict(act_bit_width=0), "act_bit_width"),
        (dict(trigger_steps=0), "trigger_steps"),
        (dict(trigger_lr=-1.0), "trigger_lr"),
        (dict(max_samples=0), "max_samples"),
        (dict(thresholds={4: {"loudness": 1.0}}), "thresholds"),
        (dict(thresholds={8: {"disagreement": 0.0}}), r"thresholds\[8\]\['disagreement'\] must be a finite number > 0"),
        (dict(thresholds={4: {"strip_drop": -0.1}}), r"thresholds\[4\]\['strip_drop'\] must be a finite number > 0"),
        (dict(thresholds={8: {"class_shift": math.nan}}), r"thresholds\[8\]\['class_shift'\] must be a finite"),
        (dict(thresholds={"8": {"disagreement": 0.1}}), r"thresholds keys must be integer bit widths among bit_widths"),
        (dict(thresholds={2: {"disagreement": 0.1}}), r"thresholds keys must be integer bit widths among .*got 2"),
        (dict(thresholds={8: 0.1}), r"thresholds\[8\] must be a mapping"),
    ],
)
def test_scan_argument_errors(kwargs, message):
    data = [(torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,)))]
    with pytest.raises(ValueError, match=message):
        scan_model(DigitsCNN(), data, progress=False, **kwargs)
    # the hook runs the same checks when it is built, not later inside the trainer
    with pytest.raises(ValueError, match=message):
        BackdoorScan(**kwargs)


def test_anomaly_index_flags_one_small_trigger_only():
    norms = torch.tensor([0.30, 0.32, 0.28, 0.31, 0.29, 0.33, 0.30, 0.27, 0.31, 0.30])
    calm, _ = anomaly_index(norms)
    planted = norms.clone()
    planted[6] = 0.03
    index, k = anomaly_index(planted)
    assert 0.0 <= calm < 2.0 < index and k == 6
    assert anomaly_index(torch.full((10,), 0.3)) == (0.0, 0)


def test_truncation_outliers_need_several_neurons(subjects):
    """One neuron tuned to the grid is noise; several are evidence (the 8-bit false alarm of a clean model)."""
    _, clean, _ = subjects
    twin = quantize_model(copy.deepcopy(clean), weight_bit_width=8)
    assert truncation_evidence(twin)["truncation_outliers"] == 0.0
    layer = next(m for m in twin.modules() if callable(getattr(m, "quant_weight", None)))

    def tune(neurons: int) -> float:
        with torch.no_grad():
            scale = layer.quant_weight().scale
            steps = torch.round(layer.weight / scale)
            inner = steps.abs() < steps.abs().amax() - 1  # leave the weights that set the max-abs scale
            tuned = torch.where(inner, (steps + 0.45 * torch.sign(layer.weight)) * scale, layer.weight)
            layer.weight[:neurons] = tuned[:neurons]
        return truncation_evidence(twin)["truncation_outliers"]

    assert tune(1) == 0.0, "a single outlier neuron counts as none"
    assert tune(3) > 0.0


def test_scan_bad_models_and_loaders():
    data = [(torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,)))]
    with pytest.raises(ValueError, match="model is already quantized"):
        scan_model(quantize_model(DigitsCNN()), data)
    with pytest.raises(ValueError, match="dataloader is empty"):
        scan_model(DigitsCNN(), [])
    with pytest.raises(ValueError, match="dataloader must yield labelled batches"):
        scan_model(DigitsCNN(), [torch.rand(8, 1, 8, 8)])
    with pytest.raises(ValueError, match="dataloader labels"):
        scan_model(DigitsCNN(), [(torch.rand(8, 1, 8, 8), torch.full((8,), 12))], progress=False)


def test_hook_in_a_real_trainer_flags_the_attacked_model_and_reports(subjects, tmp_path):
    dm, _, attacked = subjects
    module = ClassificationModule(copy.deepcopy(attacked))
    before = copy.deepcopy(module.state_dict())
    hook = BackdoorScan(bit_widths=[8, 4], stages=("validate", "test"), trigger_steps=25, target_class=0,
                        trigger=torch.ones(2, 2))
    report = SecurityReport(tmp_path / "report", on=("test",))
    trainer = quiet_trainer(callbacks=[hook, report])
    trainer.validate(module, datamodule=dm)
    trainer.test(module, datamodule=dm)
    assert set(hook.results) == {"validate", "test"} and len(hook.history) == 2
    result = hook.results["test"]
    assert result["stage"] == "test" and result["suspicious"] is True and result["samples"] == len(dm.test_dataset)
    assert hook.scan is not None and hook.scan.suspicious
    assert trainer.callback_metrics["qsec/backdoor_scan/suspicious"].item() == 1.0
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    # the known backdoor, measured at float and on the scan's own twins: asleep in float, awake at 4 bits
    known = result["backdoor"]
    rates = known["precisions"]
    print({p: (round(v["clean_accuracy"], 3), round(v["attack_success_rate"], 3)) for p, v in rates.items()})
    assert known["target_class"] == 0 and list(rates) == ["float", "8", "4"]
    assert rates["float"]["attack_success_rate"] < 0.10 and rates["4"]["attack_success_rate"] > 0.80
    for precision, bits in (("float", 8), ("8", 8), ("4", 4)):  # the same samples, the same twins as the scan
        scanned = result["evidence"][str(bits)]["float_accuracy" if precision == "float" else "quantized_accuracy"]
        assert rates[precision]["clean_accuracy"] == pytest.approx(scanned, abs=1e-6)
    assert trainer.callback_metrics["qsec/backdoor_scan/asr/4"].item() > 0.80
    section = hook.report_section()
    assert section is not None and section.name == "backdoor_scan"
    assert [t.rows[0][0] for t in section.tables] == ["w8", "float"] * 2 and len(section.tables[1].rows) == 3
    assert section.tables[1].columns == ["precision", "clean accuracy", "attack success rate"]
    assert section.plots[0].kind == "bar" and set(section.plots[0].series) == {"w8", "w4"}
    asr_plot = section.plots[1]
    assert asr_plot.filename == "backdoor_scan_asr.png" and asr_plot.kind == "bar"
    assert [p for p, _ in asr_plot.series["attack success rate"]] == ["float", "w8", "w4"]
    written = json.loads((tmp_path / "report" / "report.json").read_text())
    assert written["sections"]["backdoor_scan"]["latest"]["test"]["suspicious"] is True
    assert written["sections"]["backdoor_scan"]["latest"]["test"]["backdoor"]["precisions"]["4"] == rates["4"]
    for png in ("backdoor_scan_evidence.png", "backdoor_scan_asr.png"):
        assert (tmp_path / "report" / png).stat().st_size > 0


def test_hook_refuses_a_quantized_module_and_bad_settings(subjects):
    dm, clean, _ = subjects
    with pytest.raises(ValueError, match="bit_widths"):
        BackdoorScan(bit_widths=[1])
    with pytest.raises(ValueError, match="dataloader"):
        BackdoorScan(dataloader=[])
    with pytest.raises(ValueError, match="unknown scan_model settings.*trigger_steps"):
        BackdoorScan(trigger_stepz=5)
    for bad_class in (-1, 1.5, True):
        with pytest.raises(ValueError, match="target_class must be None or a non-negative integer"):
            BackdoorScan(target_class=bad_class)
    with pytest.raises(ValueError, match="trigger must be None.*patch tensor.*callable"):
        BackdoorScan(target_class=0, trigger="white square")
    with pytest.raises(ValueError, match="trigger is only used with target_class"):
        BackdoorScan(trigger=torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"target_class must be a class of the model's 10 outputs \(0..9\), got 10"):
        quiet_trainer(callbacks=[BackdoorScan(target_class=10)]).test(ClassificationModule(clean), datamodule=dm)
    module = ClassificationModule(quantize_model(copy.deepcopy(clean)))
    with pytest.raises(ValueError, match="already quantized"):
        quiet_trainer(callbacks=[BackdoorScan()]).test(module, datamodule=dm)


def test_hooks_with_different_settings_share_a_trainer_and_keep_their_own_state(subjects, tmp_path):
    dm, clean, _ = subjects
    cheap = dict(bit_widths=[8], trigger_steps=2, max_samples=64, calibrate_batches=1, stages=["validate"])

    def hooks() -> list[BackdoorScan]:
        return [BackdoorScan(quantizer="per_tensor", **cheap), BackdoorScan(quantizer="per_channel", **cheap)]

    variants = [*hooks(), BackdoorScan(act_bit_width=4), BackdoorScan(stages=("validate",)),
                BackdoorScan(quantizer=QuantConfig(per_channel=True))]
    assert len({h.state_key for h in variants}) == len(variants)
    quiet_trainer(callbacks=variants)  # Lightning refuses two stateful callbacks with one state_key
    first = hooks()
    trainer = quiet_trainer(callbacks=first, limit_val_batches=1)
    trainer.validate(ClassificationModule(clean), datamodule=dm)
    assert [h.results["validate"]["quantizer"]["per_channel"] for h in first] == [False, True]
    trainer.save_checkpoint(tmp_path / "two.ckpt")
    restored = hooks()
    quiet_trainer(callbacks=restored, limit_val_batches=1).validate(
        ClassificationModule(copy.deepcopy(clean)), datamodule=dm, ckpt_path=tmp_path / "two.ckpt"
    )
    # each hook got its own checkpointed history back (then scanned once more)
    assert [[r["quantizer"]["per_channel"] for r in h.history] for h in restored] == [[False, False], [True, True]]


@pytest.mark.filterwarnings("ignore::jsonargparse._deprecated.JsonargparseDeprecationWarning")
@pytest.mark.filterwarnings("ignore:.*LeafSpec.*")
def test_preset_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["qsec"])
    assert PRESET.read_text().startswith("# ")
    main(["fit", "--config", str(PRESET), f"--trainer.default_root_dir={tmp_path}"])
    out = tmp_path / "qsec_report" / "backdoor-scan"
    report = json.loads((out / "report.json").read_text())
    result = report["sections"]["backdoor_scan"]["latest"]["validate"]
    assert result["suspicious"] is False, "a model trained cleanly by the preset passes"
    assert set(result["evidence"]) == {"8", "4"} and result["epoch"] == 4
    assert "backdoor" not in result and not (out / "backdoor_scan_asr.png").exists(), "no target_class: scan only"
    assert (out / "backdoor_scan_evidence.png").stat().st_size > 0
