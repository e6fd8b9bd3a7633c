"""Bad input gets a clear error naming the argument and the allowed values."""

from __future__ import annotations

import pytest
import torch
from conftest import UserCNN, quiet_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_qsec import at_precision, calibrate, quantize_model, read_batch
from lightning_qsec.callbacks import PrecisionSweep, QuantizationAwareTraining


def _net():
    return nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))


def test_numpy_bit_widths_and_frozen_layers():
    import numpy as np

    net = _net()
    net[0].weight.requires_grad_(False)
    q = quantize_model(net, weight_bit_width=np.arange(2, 9)[2], act_bit_width=np.int32(8))
    assert q[0].weight_quant.bit_width().item() == 4
    assert not q[0].weight.requires_grad and q[0].bias.requires_grad and q[2].weight.requires_grad


@pytest.mark.parametrize("bits", [0, 17, 4.5, "four", True])
def test_bad_bit_widths(bits):
    with pytest.raises(ValueError, match=r"weight_bit_width must be an integer from 2 to 16"):
        quantize_model(_net(), weight_bit_width=bits)
    with pytest.raises(ValueError, match=r"act_bit_width must be an integer from 2 to 16"):
        QuantizationAwareTraining(weight_bit_width=4, act_bit_width=bits)
    with pytest.raises(ValueError, match=r"weight_bit_width must be an integer from 2 to 16"):
        with at_precision(quantize_model(_net()), weight_bit_width=bits):
            pass
    with pytest.raises(ValueError, match=r"bit_widths .*2\.\.16|bit_widths.*integer from 2 to 16"):
        PrecisionSweep(bit_widths=[8, bits])
    with pytest.raises(ValueError, match=r"layer_bit_widths\['0'\] must be an integer from 2 to 16"):
        quantize_model(_net(), layer_bit_widths={"0": bits})


def test_bad_precision_string():
    with pytest.raises(ValueError, match=r"'w4x8' is not a precision: use an int bit width 2\.\.16"):
        PrecisionSweep(bit_widths=["w4x8"])


def test_unknown_glob_names_the_layers():
    with pytest.raises(ValueError, match=r"layer_bit_widths entry 'conv\*' matches no quantizable module; quantizable modules are \['0', '1', '2'\]"):
        quantize_model(_net(), layer_bit_widths={"conv*": 4})
    with pytest.raises(ValueError, match=r"skip entry 'head' matches no quantizable module"):
        quantize_model(_net(), skip=["head"])


def test_model_without_quantizable_layers():
    with pytest.raises(ValueError, match=r"model has no quantizable layers: quantize_model swaps \['Conv1d', 'Conv2d', 'Linear'\]"):
        quantize_model(nn.Sequential(nn.ReLU(), nn.Dropout()))
    with pytest.raises(ValueError, match="found none outside skip"):
        quantize_model(_net(), skip=["0", "2"])


@pytest.mark.parametrize(
    "batch, fragment",
    [
        ({"pixels": torch.zeros(2, 64)}, r"dict\{'pixels': Tensor\(shape=\(2, 64\)"),
        ((torch.zeros(2, 64),), r"tuple\[Tensor\(shape=\(2, 64\).*length 1"),
        ("not a batch", r"str: not a tuple, list or dict"),
        ((torch.zeros(2, 64), torch.zeros(2)), r"targets must be a 1-D integer tensor"),
        ((torch.zeros(3, 64), torch.zeros(2, dtype=torch.long)), r"inputs have 3 rows but targets 2"),
        ({"x": torch.zeros(2, 64)}, r"no target key found among \('y'"),
        ({"y": torch.zeros(2, dtype=torch.long)}, r"no input key found among \('x'"),
        ((torch.tensor(1.0), torch.tensor([1])), r"inputs must have a batch dimension"),
        ((torch.zeros(2, 64), torch.tensor([True, False])), r"targets must be a 1-D integer tensor"),
        ((torch.zeros(2, 64), torch.tensor([1, 0]), torch.tensor([0.5, 0.2])), r"groups must be integer group labels"),
    ],
)
def test_unreadable_batches(batch, fragment):
    with pytest.raises(ValueError, match=r"Cannot read batch of .*" + fragment):
        read_batch(batch)


def test_unreadable_batch_in_a_callback():
    data = [{"pixels": torch.zeros(4, 1, 8, 8)}]
    with pytest.raises(ValueError, match=r"Cannot read batch of dict\{'pixels'"):
        calibrate(quantize_model(UserCNN()), data)


def test_unreadable_batch_names_the_callback_that_read_it():
    from lightning_qsec.models import ClassificationModule

    class DictBatches(ClassificationModule):  # the module reads "pixels"; the sweep's default adapter cannot
        def training_step(self, batch, batch_idx):
            return super().training_step((batch["pixels"], batch["label"]), batch_idx)

        def validation_step(self, batch, batch_idx):
            return super().validation_step((batch["pixels"], batch["label"]), batch_idx)

    rows = [{"pixels": torch.rand(1, 8, 8), "label": 3}] * 16
    loader = DataLoader(rows, batch_size=8)
    trainer = quiet_trainer(max_epochs=1, callbacks=[QuantizationAwareTraining(calibrate_batches=0), PrecisionSweep([4])])
    with pytest.raises(ValueError, match=r"^PrecisionSweep: Cannot read batch of dict\{'pixels'"):
        trainer.fit(DictBatches(UserCNN()), loader, loader)


def test_a_user_adapter_error_passes_through_with_a_note():
    import json

    from lightning_qsec.batch import adapter_or_default

    def adapter(batch):
        return json.loads("{bad")  # the user's own error: its type and fields must survive

    with pytest.raises(json.JSONDecodeError) as info:
        adapter_or_default(adapter, owner="AdversarialTraining")(None)
    assert info.value.pos == 1 and "raised by the batch_adapter of AdversarialTraining" in info.value.__notes__
    with pytest.raises(TypeError, match="^FairnessEvaluation: batch_adapter must return lightning_qsec.Batch"):
        adapter_or_default(lambda batch: batch, owner="FairnessEvaluation")((torch.zeros(2, 3), torch.zeros(2)))


def test_empty_dataloader():
    empty = DataLoader(TensorDataset(torch.zeros(0, 64), torch.zeros(0, dtype=torch.long)), batch_size=8)
    with pytest.raises(ValueError, match="dataloader is empty"):
        calibrate(quantize_model(_net()), empty)
    module = UserCNN()
    empty_images = DataLoader(TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)), batch_size=8)
    trainer = quiet_trainer(callbacks=[QuantizationAwareTraining(8, 8), PrecisionSweep([8])])
    with pytest.raises(ValueError, match=r"PrecisionSweep measured nothing in trainer.test\(\): .*the test dataloader is empty"):
        trainer.test(module, dataloaders=empty_images, verbose=False)


def test_nan_inputs_in_calibration():
    x = torch.randn(16, 64)
    x[5, 3] = float("nan")
    with pytest.raises(ValueError, match=r"calibration inputs contain NaN \(batch 1 of dataloader\)"):
        calibrate(quantize_model(_net()), [(torch.randn(16, 64), torch.zeros(16, dtype=torch.long)), (x, torch.zeros(16, dtype=torch.long))])


def test_at_precision_on_a_float_model():
    with pytest.raises(ValueError, match=r"model has no quantized layers; call lightning_qsec.quantize_model"):
        with at_precision(_net(), weight_bit_width=4):
            pass


def test_num_batches_and_intervals():
    with pytest.raises(ValueError, match="num_batches must be an integer >= 1"):
        calibrate(quantize_model(_net()), [], num_batches=0)
    with pytest.raises(ValueError, match="every_n_epochs must be an integer >= 1"):
        PrecisionSweep(every_n_epochs=0)
    with pytest.raises(ValueError, match="calibrate_batches must be an integer >= 0"):
        QuantizationAwareTraining(calibrate_batches=-1)


def test_security_report_needs_a_stage(tmp_path):
    from lightning_qsec.callbacks import SecurityReport

    with pytest.raises(ValueError, match="`on` must name at least one stage"):
        SecurityReport(tmp_path, on=())
    with pytest.raises(ValueError, match="unknown stage 'train'"):
        SecurityReport(tmp_path, on=("train",))


def test_security_report_dirpath_must_not_be_a_file(tmp_path):
    from lightning_qsec.callbacks import SecurityReport

    file = tmp_path / "afile"
    file.write_text("x")
    with pytest.raises(ValueError, match="dirpath .* is a file"):
        SecurityReport(file)


def test_evaluation_hook_warns_when_fit_is_shorter_than_its_interval():
    from conftest import UserCNN, quiet_trainer

    from lightning_qsec.data import DigitsDataModule

    sweep = PrecisionSweep([8], every_n_epochs=5)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1,
                            callbacks=[QuantizationAwareTraining(8, 8, calibrate_batches=1), sweep])
    with pytest.warns(UserWarning, match=r"every_n_epochs=5\) will not measure during this fit \(max_epochs=1\)"):
        trainer.fit(UserCNN(), datamodule=DigitsDataModule())
    assert sweep.results == {}


def test_quant_config_flags_and_precision_lists_are_checked():
    from lightning_qsec.quant.spec import parse_precisions

    with pytest.raises(ValueError, match="per_channel must be True or False"):
        quantize_model(_net(), per_channel="false")
    with pytest.raises(ValueError, match="skip must be a sequence"):
        quantize_model(_net(), skip=None)
    with pytest.raises(ValueError, match="layer_bit_widths must be a mapping"):
        quantize_model(_net(), layer_bit_widths="ab")
    for bad in (None, {8}):
        with pytest.raises(ValueError, match="bit_widths must be a precision or a sequence"):
            parse_precisions(bad)
    assert [p.label for p in parse_precisions(8.0)] == ["w8a8"]
