"""QuantizationAwareTraining on a plain user-written LightningModule and real digits data."""

from __future__ import annotations

import json

import pytest
import pytorch_lightning as pl
import torch
from brevitas.nn import QuantConv2d, QuantLinear
from conftest import UserCNN, quiet_trainer
from pytorch_lightning.callbacks import ModelCheckpoint, ModelPruning, StochasticWeightAveraging

from lightning_qsec import at_precision, bit_widths, float_mode, is_quantized, load_quantized_checkpoint
from lightning_qsec.callbacks import PrecisionSweep, QuantizationAwareTraining, SecurityReport
from lightning_qsec.data import DigitsDataModule
from lightning_qsec.quant.inspect import stat_scalers


def _fit(module, callbacks, *, epochs, dm=None, ckpt_path=None, **trainer_kwargs):
    trainer = quiet_trainer(max_epochs=epochs, callbacks=callbacks, **trainer_kwargs)
    trainer.fit(module, datamodule=dm or DigitsDataModule(), ckpt_path=ckpt_path)
    return trainer


def _test_acc(module, trainer_callbacks=()) -> float:
    trainer = quiet_trainer(callbacks=list(trainer_callbacks))
    return trainer.test(module, datamodule=DigitsDataModule(), verbose=False)[0]["test_acc"]


@pytest.fixture(scope="module")
def qat_w4a4_and_float():
    """UserCNN trained 10 epochs with QAT w4a4, and the same module trained in float."""
    pl.seed_everything(0, verbose=False)
    qat = UserCNN()
    sweep = PrecisionSweep([8, 4])
    _fit(qat, [QuantizationAwareTraining(4, 4), sweep], epochs=10)
    pl.seed_everything(0, verbose=False)
    ref = UserCNN()
    _fit(ref, [], epochs=10)
    return qat, ref, sweep


def test_qat_w4a4_accuracy_and_w8a8_close_to_float(qat_w4a4_and_float):
    qat, ref, _ = qat_w4a4_and_float
    assert isinstance(qat.conv1, QuantConv2d) and isinstance(qat.fc2, QuantLinear)
    w4a4 = _test_acc(qat)
    assert w4a4 >= 0.95, w4a4
    with at_precision(qat, weight_bit_width=8, act_bit_width=8):
        w8a8 = _test_acc(qat)
    float_acc = _test_acc(ref)
    # QAT must not cost more than 1 point at w8a8; being better than float is allowed.
    assert w8a8 >= float_acc - 0.01, (w8a8, float_acc)


def test_sweep_logged_and_kept(qat_w4a4_and_float):
    _, _, sweep = qat_w4a4_and_float
    result = sweep.results["validate"]
    assert result["epoch"] == 9 and not result["ptq_twin"]
    assert set(result["precisions"]) == {"w8a8", "w4a4"}
    for v in result["precisions"].values():
        assert 0.0 <= v["disagreement"] <= 1.0
        assert v["drop"] == pytest.approx(result["float"]["accuracy"] - v["accuracy"])
    assert len(sweep.history) == 10


def test_swap_in_setup_reaches_the_optimizer():
    pl.seed_everything(0, verbose=False)
    module = UserCNN()
    trainer = _fit(module, [QuantizationAwareTraining(4, 4)], epochs=1)
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert all(id(p) in optimized for p in module.parameters())
    scales = [s.value for _, s in stat_scalers(module)]
    assert scales and all(id(v) in optimized for v in scales)


def _weights(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("calibrate_batches", [0, 10])
def test_resume_is_exact(tmp_path, calibrate_batches):
    """Stop at epoch 2 of 4 and resume; with calibrate_batches=0 the run crosses Brevitas' step 300."""

    def dm():
        return DigitsDataModule(batch_size=16)  # 73 steps an epoch: 292 before the stop, 584 in all

    def run(epochs, ckpt_path=None, save=False):
        pl.seed_everything(0, verbose=False)
        module = UserCNN()
        callbacks = [QuantizationAwareTraining(4, 4, calibrate_batches=calibrate_batches)]
        if save:
            callbacks.append(ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0))
        _fit(module, callbacks, epochs=epochs, dm=dm(), ckpt_path=ckpt_path, enable_checkpointing=save)
        return module

    full = _weights(run(4))
    run(2, save=True)
    resumed = _weights(run(4, ckpt_path=tmp_path / "last.ckpt"))
    assert full.keys() == resumed.keys()
    diff = max((full[k].float() - resumed[k].float()).abs().max().item() for k in full)
    assert diff <= 1e-6


def test_test_ckpt_path_and_inference_loading(tmp_path):
    pl.seed_everything(0, verbose=False)
    module = UserCNN()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    _fit(module, [QuantizationAwareTraining(4, 4), ckpt], epochs=3, enable_checkpointing=True)
    expected = _test_acc(module)

    fresh = UserCNN()  # float: the callback swaps it in setup(stage="test") before the restore
    sweep, report = PrecisionSweep(bit_widths=[4]), SecurityReport(tmp_path / "report", on=["test"])
    trainer = quiet_trainer(callbacks=[QuantizationAwareTraining(4, 4), sweep, report])
    got = trainer.test(fresh, datamodule=DigitsDataModule(), ckpt_path=tmp_path / "last.ckpt", verbose=False)
    assert got[0]["test_acc"] == pytest.approx(expected)
    # the results carry the last epoch the weights were trained in (the third, 0-based 2, as fit's
    # validation labels it), not the fresh trainer's 0 nor Lightning's completed-epoch count
    assert sweep.results["test"]["epoch"] == 2
    metadata = json.loads((tmp_path / "report" / "report.json").read_text())["metadata"]
    assert metadata["checkpoint_epoch"] == 2 and metadata["stage"] == "test"
    trainer.test(fresh, datamodule=DigitsDataModule(), verbose=False)  # no checkpoint this time
    assert sweep.results["test"]["epoch"] == 0
    assert "checkpoint_epoch" not in json.loads((tmp_path / "report" / "report.json").read_text())["metadata"]

    loaded = load_quantized_checkpoint(UserCNN(), tmp_path / "last.ckpt")
    assert is_quantized(loaded) and not loaded.training
    assert bit_widths(loaded) == bit_widths(module)
    assert _test_acc(loaded) == pytest.approx(expected)


def test_resume_with_other_settings_is_refused(tmp_path):
    pl.seed_everything(0, verbose=False)
    _fit(UserCNN(), [QuantizationAwareTraining(4, 4), ModelCheckpoint(dirpath=tmp_path, save_last=True)],
         epochs=1, enable_checkpointing=True)
    with pytest.raises((ValueError, RuntimeError)):
        _fit(UserCNN(), [QuantizationAwareTraining(4, 4, per_channel=True)], epochs=2,
             ckpt_path=tmp_path / "last.ckpt")


def test_combines_with_model_pruning():
    pl.seed_everything(0, verbose=False)
    module = UserCNN()
    pruning = ModelPruning("l1_unstructured", amount=0.3, verbose=0)
    _fit(module, [QuantizationAwareTraining(8, 8), pruning], epochs=2)
    assert isinstance(module.fc1, QuantLinear)
    assert (module.fc1.weight == 0).float().mean().item() >= 0.3  # the quantized layer was pruned
    with torch.no_grad():
        quant_w = module.fc1.quant_weight().value
    assert (quant_w == 0).float().mean().item() >= 0.3  # and the zeros reach the quantized weights
    assert _test_acc(module) > 0.5  # trains with pruning applied every epoch (chance: 0.1)


def test_pruning_listed_first_is_refused():
    pruning = ModelPruning("l1_unstructured", amount=0.3, verbose=0)
    with pytest.raises(ValueError, match="list QuantizationAwareTraining first"):
        _fit(UserCNN(), [pruning, QuantizationAwareTraining(8, 8)], epochs=1)


def test_combines_with_stochastic_weight_averaging():
    pl.seed_everything(0, verbose=False)
    module = UserCNN()
    swa = StochasticWeightAveraging(swa_lrs=1e-3, swa_epoch_start=2)
    _fit(module, [QuantizationAwareTraining(4, 4), swa], epochs=4)
    assert is_quantized(module) and is_quantized(swa._average_model)
    avg = dict(swa._average_model.named_parameters())
    assert all(torch.equal(p, avg[n]) for n, p in module.named_parameters())  # SWA weights were copied in
    assert _test_acc(module) > 0.7  # averaged quantized weights still classify (chance: 0.1)


def test_validation_does_not_consume_activation_statistics():
    """During Brevitas' collection phase, only training steps may advance the counters."""
    pl.seed_everything(0, verbose=False)
    module = UserCNN()
    trainer = _fit(module, [QuantizationAwareTraining(4, 4, calibrate_batches=0), PrecisionSweep([8, 4, 2])],
                   epochs=2, num_sanity_val_steps=2)
    counters = {s.counter for _, s in stat_scalers(module)}
    assert counters == {trainer.global_step}


def test_float_mode_inside_trained_module(qat_w4a4_and_float):
    qat, _, sweep = qat_w4a4_and_float
    with float_mode(qat):
        acc = _test_acc(qat)
    assert acc == pytest.approx(sweep.results["validate"]["float"]["accuracy"], abs=0.1)


def test_calibration_before_qat_of_a_batchnorm_network_helps():
    """Calibrated with batch statistics, as training normalises: not with untrained running ones."""
    from lightning_qsec.models import ClassificationModule, MNISTBatchNormCNN

    accuracies = {}
    for batches in (0, 4):
        pl.seed_everything(0, verbose=False)
        module = ClassificationModule(MNISTBatchNormCNN(width=8), lr=1e-2)
        _fit(module, [QuantizationAwareTraining(4, 4, calibrate_batches=batches)], epochs=3, limit_val_batches=0)
        accuracies[batches] = _test_acc(module)
    assert accuracies[4] > 0.7, accuracies
    assert accuracies[4] >= accuracies[0] - 0.05, accuracies


def test_checkpoint_loads_into_the_inner_net_with_globs_and_without_callback_state(tmp_path):
    from lightning_qsec import QuantConfig
    from lightning_qsec.models import ClassificationModule, DigitsCNN

    pl.seed_everything(0, verbose=False)
    module = ClassificationModule(DigitsCNN())
    qat = QuantizationAwareTraining(8, 8, layer_bit_widths={"net.features.*": 4}, calibrate_batches=2)
    trainer = _fit(module, [qat], epochs=1, limit_train_batches=3, limit_val_batches=1)
    trainer.save_checkpoint(tmp_path / "qat.ckpt")
    trainer.save_checkpoint(tmp_path / "weights.ckpt", weights_only=True)
    x = torch.rand(8, 1, 8, 8)
    module.eval()
    with torch.no_grad():
        expected = module(x)
    inner = load_quantized_checkpoint(DigitsCNN(), tmp_path / "qat.ckpt", prefix="net.")  # globs made the net's
    with torch.no_grad():
        assert torch.allclose(inner(x), expected, atol=1e-6)
    weights = {name.split(".weight_quant")[0]: bits for name, bits in bit_widths(inner)["weight"].items()}
    assert weights["features.0"] == 4 and weights["classifier.1"] == 8
    with pytest.raises(ValueError, match="save_weights_only=True"):
        load_quantized_checkpoint(ClassificationModule(DigitsCNN()), tmp_path / "weights.ckpt")
    again = load_quantized_checkpoint(ClassificationModule(DigitsCNN()), tmp_path / "weights.ckpt",
                                      config=QuantConfig(8, 8, layer_bit_widths={"net.features.*": 4}))
    with torch.no_grad():
        assert torch.allclose(again(x), expected, atol=1e-6)
    with pytest.raises(ValueError, match="model is already quantized"):
        load_quantized_checkpoint(inner, tmp_path / "qat.ckpt", prefix="net.")


def test_fixed_input_bit_width_survives_checkpoints_and_evaluation_at_other_widths(tmp_path):
    from lightning_qsec.callbacks import PrecisionSweep
    from lightning_qsec.models import ClassificationModule, DigitsCNN

    pl.seed_everything(0, verbose=False)
    module = ClassificationModule(DigitsCNN())
    seen: list[dict[str, int]] = []

    class Widths(pl.Callback):  # the input width while the sweep runs the model at w2a2
        def on_validation_epoch_end(self, trainer, pl_module):
            seen.append(bit_widths(pl_module)["act"])

    qat = QuantizationAwareTraining(4, 4, input_bit_width=8, calibrate_batches=2)
    trainer = _fit(module, [qat, PrecisionSweep(bit_widths=[2]), Widths()], epochs=1, limit_train_batches=5,
                   limit_val_batches=2)
    inputs = [k for k in bit_widths(module)["act"] if "input_quant" in k]
    assert len(inputs) == 1 and all(widths[inputs[0]] == 8 for widths in seen)
    trainer.save_checkpoint(tmp_path / "qat.ckpt")
    loaded = load_quantized_checkpoint(ClassificationModule(DigitsCNN()), tmp_path / "qat.ckpt")
    assert bit_widths(loaded) == bit_widths(module)
    with at_precision(loaded, act_bit_width=2):
        assert bit_widths(loaded)["act"][inputs[0]] == 8


# -- float_epochs: train in float first, then QAT in the same fit ------------------------------


class _QuantizationOn(pl.Callback):
    """Records, at each training epoch's end, whether the model differs from its float view."""

    def __init__(self) -> None:
        self.on: list[bool] = []

    def on_train_epoch_end(self, trainer, pl_module):
        x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            out = pl_module(x)
            with float_mode(pl_module):
                ref = pl_module(x)
        self.on.append(not torch.equal(out, ref))


def test_float_epochs_train_exactly_the_float_model():
    pl.seed_everything(0, verbose=False)
    plain = UserCNN()
    start = _weights(plain)
    _fit(plain, [], epochs=2)
    delayed = UserCNN()
    delayed.load_state_dict(start)
    qat, seen = QuantizationAwareTraining(4, 4, float_epochs=2), _QuantizationOn()
    with pytest.warns(UserWarning, match=r"fit ended in its float epochs \(float_epochs=2"):
        _fit(delayed, [qat, seen], epochs=2)
    weights = {k: v for k, v in _weights(delayed).items() if k in start}
    assert weights.keys() == start.keys()
    assert all(torch.allclose(weights[k], v, atol=1e-6) for k, v in _weights(plain).items())
    assert seen.on == [False, False] and not qat.calibrated  # quantized training never began
    assert is_quantized(delayed)  # and the model is left with quantization on, not in float mode


def test_float_epochs_then_qat_calibrates_and_hooks_measure_only_quantized_epochs():
    pl.seed_everything(0, verbose=False)
    module = UserCNN()
    qat, seen, sweep = QuantizationAwareTraining(4, 4, float_epochs=1), _QuantizationOn(), PrecisionSweep([4])
    _fit(module, [qat, seen, sweep], epochs=3)
    assert seen.on == [False, True, True] and qat.calibrated
    assert [r["epoch"] for r in sweep.history] == [1, 2]
    assert sweep.results["validate"]["precisions"]["w4a4"]["accuracy"] > 0.5  # calibrated: uncalibrated is chance


@pytest.mark.parametrize("stop", [1, 2])  # inside the float epochs, and where they end
def test_float_epochs_resume_exactly_and_refuse_other_settings(tmp_path, stop):
    def run(epochs, ckpt_path=None, save=False, float_epochs=2):
        pl.seed_everything(0, verbose=False)
        module = UserCNN()
        callbacks: list[pl.Callback] = [QuantizationAwareTraining(4, 4, float_epochs=float_epochs)]
        if save:
            callbacks.append(ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0))
        _fit(module, callbacks, epochs=epochs, ckpt_path=ckpt_path, enable_checkpointing=save)
        return module

    full = _weights(run(4))
    with pytest.warns(UserWarning, match="fit ended in its float epochs"):
        run(stop, save=True)
    resumed = _weights(run(4, ckpt_path=tmp_path / "last.ckpt"))
    assert max((full[k].float() - resumed[k].float()).abs().max().item() for k in full) <= 1e-6
    with pytest.raises(ValueError, match="float_epochs=2, but this QuantizationAwareTraining has float_epochs=1"):
        run(4, ckpt_path=tmp_path / "last.ckpt", float_epochs=1)


def test_float_epochs_resumed_mid_epoch_stay_float_and_their_checkpoints_are_refused(tmp_path):
    from lightning_qsec import QuantConfig

    class QuantizedAtBatch(pl.Callback):
        def __init__(self) -> None:
            self.on: list[tuple[int, bool]] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                out = pl_module(x)
                with float_mode(pl_module):
                    ref = pl_module(x)
            self.on.append((trainer.current_epoch, not torch.equal(out, ref)))

    def run(ckpt_path=None, **kwargs):
        pl.seed_everything(0, verbose=False)
        seen = QuantizedAtBatch()
        callbacks = [QuantizationAwareTraining(4, 4, float_epochs=1, calibrate_batches=2), seen,
                     ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1)]
        _fit(UserCNN(), callbacks, epochs=2, ckpt_path=ckpt_path, enable_checkpointing=True, limit_train_batches=4,
             limit_val_batches=1, **kwargs)
        return seen.on

    with pytest.warns(UserWarning, match="fit ended in its float epochs"):
        run(max_steps=2)  # stops in the middle of the float epoch
    mid = tmp_path / "epoch=0-step=2.ckpt"
    assert run(ckpt_path=mid) == [(0, False), (0, False)] + [(1, True)] * 4  # Lightning skips that epoch's start
    with pytest.raises(ValueError, match="written in QuantizationAwareTraining's float epochs"):
        load_quantized_checkpoint(UserCNN(), mid)
    later = load_quantized_checkpoint(UserCNN(), tmp_path / "epoch=1-step=8.ckpt")  # a quantized epoch loads
    assert is_quantized(later) and QuantConfig.from_dict(later.qsec_config).weight_bit_width == 4
    trainer = quiet_trainer(callbacks=[QuantizationAwareTraining(4, 4, float_epochs=1)])
    with pytest.warns(UserWarning, match="this checkpoint was written in the float epochs"):
        trainer.test(UserCNN(), datamodule=DigitsDataModule(), ckpt_path=mid, verbose=False)


def test_hooks_warn_when_no_epoch_after_the_float_epochs_would_measure():
    sweep = PrecisionSweep([4], every_n_epochs=2)
    with pytest.warns(UserWarning, match=r"will not measure during this fit \(max_epochs=3, QuantizationAwareTraining "
                                         r"float_epochs=2\)"):
        _fit(UserCNN(), [QuantizationAwareTraining(4, 4, float_epochs=2), sweep], epochs=3, limit_train_batches=2,
             limit_val_batches=1)
    assert sweep.history == []


def test_input_bit_width_needs_the_first_layer_quantized():
    from lightning_qsec import quantize_model

    with pytest.raises(ValueError, match=r"input_bit_width=8 fixes the precision of the model input, but the first "
                                         r"conv/linear layer 'conv1' is in skip="):
        quantize_model(UserCNN(), weight_bit_width=4, act_bit_width=4, input_bit_width=8, skip=["conv1"])
    net = quantize_model(UserCNN(), weight_bit_width=4, act_bit_width=4, input_bit_width=8)
    marked = [n for n, m in net.named_modules() if getattr(m, "qsec_fixed_bit_width", False)]
    assert marked == ["conv1.input_quant"]  # only the quantizer that sees the data is held fixed


def test_random_precision_draws_nothing_in_the_float_epochs():
    from lightning_qsec.defenses import RandomPrecisionTraining

    rpt = RandomPrecisionTraining(bit_widths=(4, 8))
    _fit(UserCNN(), [QuantizationAwareTraining(4, 4, float_epochs=1), rpt], epochs=2, limit_train_batches=3,
         limit_val_batches=1)
    assert sum(rpt.counts.values()) == 3  # the quantized epoch's steps only


def test_weight_averaging_that_starts_in_the_float_epochs_warns():
    swa = StochasticWeightAveraging(swa_lrs=1e-2, swa_epoch_start=2)  # averages from epoch 1 (0-based)
    with pytest.warns(UserWarning, match=r"starts averaging at epoch 1 \(0-based\), inside .*float_epochs=2"):
        _fit(UserCNN(), [QuantizationAwareTraining(4, 4, float_epochs=2), swa], epochs=3, limit_train_batches=2,
             limit_val_batches=1)


def test_bad_float_epochs():
    with pytest.raises(ValueError, match="float_epochs"):
        QuantizationAwareTraining(4, 4, float_epochs=-1)
