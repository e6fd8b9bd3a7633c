"""ONNX export and deployed-runtime comparison, on a small CNN trained on real digits."""

from __future__ import annotations

import sys

import onnx
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from lightning_qsec.quant.calibration import calibrate
from lightning_qsec.quant.convert import quantize_model
from lightning_qsec.quant.export import (
    GRAPH_OPTIMIZATIONS,
    OnnxRuntimeModel,
    compare_deployed,
    export_onnx,
    onnxruntime_session,
)
from lightning_qsec.quant.precision import at_precision, bit_widths

N_TRAIN = 1400


def _cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 16, 10)
    )


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return images, torch.tensor(data.target)


@pytest.fixture(scope="module")
def trained(digits) -> nn.Sequential:
    """The CNN trained in float for a few epochs, then quantized w4a4 and calibrated."""
    x, y = digits
    torch.manual_seed(0)
    net = _cnn()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(6):
        perm = torch.randperm(N_TRAIN)
        for i in range(0, N_TRAIN, 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    quantize_model(net, weight_bit_width=4, act_bit_width=4)
    calibrate(net, [(x[i : i + 64], y[i : i + 64]) for i in range(0, 640, 64)], num_batches=10)
    return net.eval()


@pytest.fixture
def model(trained) -> nn.Sequential:
    trained.eval()
    return trained


@pytest.fixture(scope="module")
def test_set(digits) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = digits
    return x[N_TRAIN:], y[N_TRAIN:]


def _simulate(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def _assert_matches(runtime: OnnxRuntimeModel, model: nn.Module, x: torch.Tensor) -> None:
    sim, deployed = _simulate(model, x), runtime(x)
    assert deployed.shape == sim.shape
    assert (sim - deployed).abs().max().item() < 1e-4
    assert torch.equal(sim.argmax(1), deployed.argmax(1))


def test_quantized_cnn_is_a_real_classifier(model, test_set):
    x, y = test_set
    assert bit_widths(model)["weight"] and set(bit_widths(model)["weight"].values()) == {4}
    assert (_simulate(model, x).argmax(1) == y).float().mean().item() > 0.7


def test_qcdq_w4a4_matches_simulation_with_optimizations_disabled(model, test_set, tmp_path):
    x, _ = test_set
    path = export_onnx(model, tmp_path / "w4a4.onnx", example_input=x[:4])
    assert path == tmp_path / "w4a4.onnx" and path.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w4a4.onnx"]  # no temp file left
    onnx.checker.check_model(str(path), full_check=True)
    graph = onnx.load(str(path)).graph
    ops = {node.op_type for node in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert [i.name for i in graph.input] == ["input"]  # weights are initializers, not inputs
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    runtime = OnnxRuntimeModel(path)
    assert runtime.format == "qcdq"
    assert runtime.settings["graph_optimization"] == "disabled"
    assert runtime.settings["graph_optimization_level"] == "ORT_DISABLE_ALL"
    assert "CPUExecutionProvider" in runtime.settings["providers"]
    _assert_matches(runtime, model, x)


def test_w8a8_export_via_at_precision_and_precision_restored(model, test_set, tmp_path):
    x, _ = test_set
    sim4 = _simulate(model, x)
    with at_precision(model, weight_bit_width=8, act_bit_width=8):
        path = export_onnx(model, tmp_path / "w8a8.onnx", example_input=x[:2])
        runtime = onnxruntime_session(path, graph_optimization="disabled", intra_op_num_threads=1)
        _assert_matches(runtime, model, x)
        sim8 = _simulate(model, x)
    assert runtime.settings["intra_op_num_threads"] == 1
    assert set(bit_widths(model)["weight"].values()) == {4}
    assert set(bit_widths(model)["act"].values()) == {4}
    assert torch.equal(_simulate(model, x), sim4)
    # the file holds the 8-bit graph, not the model's 4-bit state
    assert not torch.allclose(sim4, sim8)
    assert (runtime(x) - sim8).abs().max().item() < 1e-4


@pytest.mark.parametrize("batch", [1, 7, 33])
def test_dynamic_batch_runs_other_batch_sizes(model, test_set, tmp_path_factory, batch):
    x, _ = test_set
    path = tmp_path_factory.getbasetemp() / "dynamic.onnx"
    if not path.exists():
        export_onnx(model, path, example_input=x[:4])
    _assert_matches(OnnxRuntimeModel(path), model, x[:batch])


def test_static_batch_refuses_other_batch_sizes(model, test_set, tmp_path):
    x, _ = test_set
    path = export_onnx(model, tmp_path / "static.onnx", example_input=x[:4], dynamic_batch=False)
    runtime = OnnxRuntimeModel(path)
    _assert_matches(runtime, model, x[:4])
    with pytest.raises(ValueError, match="fixed batch size of 4"):
        runtime(x[:5])


def test_export_restores_modes_and_outputs_inside_inference_mode(model, test_set, tmp_path):
    x, _ = test_set
    before = _simulate(model, x)
    model[0].train()  # a mixed state: only the first conv in train mode
    try:
        with torch.inference_mode():
            export_onnx(model, tmp_path / "m.onnx", example_input=x[:2])
        assert model[0].training and not model.training and not model[4].training
    finally:
        model.eval()
    assert torch.equal(_simulate(model, x), before)


def test_compare_deployed_default_all_optimizations(model, test_set, tmp_path, capsys):
    x, y = test_set
    path = export_onnx(model, tmp_path / "m.onnx", example_input=x[:2])
    result = compare_deployed(model, path, x, y, batch_size=100)
    assert set(result) == {
        "num_samples",
        "max_abs_logit_diff",
        "mean_abs_logit_diff",
        "prediction_flip_rate",
        "num_flipped",
        "simulation_accuracy",
        "runtime_accuracy",
        "runtime",
    }
    assert result["num_samples"] == len(x)
    assert result["runtime"]["graph_optimization"] == "all"
    assert result["runtime"]["graph_optimization_level"] == GRAPH_OPTIMIZATIONS["all"]
    assert result["runtime"]["onnxruntime_version"]
    assert 0.0 <= result["mean_abs_logit_diff"] <= result["max_abs_logit_diff"]
    assert 0.0 <= result["prediction_flip_rate"] <= 1.0
    assert result["num_flipped"] == round(result["prediction_flip_rate"] * len(x))
    sim_acc = (_simulate(model, x).argmax(1) == y).float().mean().item()
    assert result["simulation_accuracy"] == pytest.approx(sim_acc)
    assert abs(result["runtime_accuracy"] - result["simulation_accuracy"]) <= result["prediction_flip_rate"] + 1e-9
    with capsys.disabled():  # the measured difference, whatever it is, for the record
        print(
            f"\n[sim vs ORT 'all'] max|dlogit|={result['max_abs_logit_diff']:.4g} "
            f"flips={result['prediction_flip_rate']:.4f} acc sim={result['simulation_accuracy']:.4f} "
            f"ort={result['runtime_accuracy']:.4f}"
        )

    disabled = compare_deployed(model, path, x, graph_optimization="disabled")
    assert disabled["max_abs_logit_diff"] < 1e-4 and disabled["num_flipped"] == 0
    assert disabled["simulation_accuracy"] is None and disabled["runtime_accuracy"] is None
    assert disabled["runtime"]["graph_optimization"] == "disabled"


def test_qonnx_export_checks_and_executes(model, test_set, tmp_path):
    x, y = test_set
    path = export_onnx(model, tmp_path / "q.onnx", example_input=x[:4], format="qonnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.onnx"]
    onnx.checker.check_model(str(path))
    assert "Quant" in {node.op_type for node in onnx.load(str(path)).graph.node}
    runtime = OnnxRuntimeModel(path)
    assert runtime.format == "qonnx" and runtime.settings["runtime"].startswith("qonnx")
    _assert_matches(runtime, model, x)
    _assert_matches(runtime, model, x[:3])
    result = compare_deployed(model, path, x, y)  # default: no optimizations for qonnx
    assert result["max_abs_logit_diff"] < 1e-4 and result["num_flipped"] == 0
    with pytest.raises(ValueError, match="node-by-node"):
        OnnxRuntimeModel(path, graph_optimization="all")


def test_failed_export_leaves_old_file_and_no_temp(test_set, tmp_path):
    class HardCodedBatch(nn.Module):
        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return t.reshape(4, -1)

    x, _ = test_set
    net = quantize_model(nn.Sequential(HardCodedBatch(), nn.Linear(64, 10))).eval()
    target = tmp_path / "m.onnx"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="dynamic_batch"):
        export_onnx(net, target, example_input=x[:4])
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    # overwriting succeeds when the batch is not asked to be dynamic
    export_onnx(net, target, example_input=x[:4], dynamic_batch=False)
    onnx.checker.check_model(str(target))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_errors(model, test_set, tmp_path, monkeypatch):
    x, _ = test_set
    with pytest.raises(ValueError, match="no quantized layers"):
        export_onnx(_cnn(), tmp_path / "f.onnx", example_input=x[:2])
    with pytest.raises(ValueError, match=r"format must be one of \['qcdq', 'qonnx'\]"):
        export_onnx(model, tmp_path / "f.onnx", example_input=x[:2], format="tflite")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="example_input"):
        export_onnx(model, tmp_path / "f.onnx", example_input=x[0, 0, 0, 0])
    with pytest.raises(ValueError, match=r"opset_version must be >= 12 for QCDQ .* got 11"):
        export_onnx(model, tmp_path / "f.onnx", example_input=x[:2], opset_version=11)
    per_channel = quantize_model(_cnn(), per_channel=True)
    with pytest.raises(ValueError, match=r"with per-channel weights, as here: True\), got 12"):
        export_onnx(per_channel, tmp_path / "f.onnx", example_input=x[:2], opset_version=12)
    wide_input = quantize_model(_cnn(), weight_bit_width=4, act_bit_width=4, input_bit_width=12)
    with pytest.raises(ValueError, match=r"format='qcdq' exports bit widths up to 8 .*input_quant.*12"):
        export_onnx(wide_input, tmp_path / "f.onnx", example_input=x[:2])
    assert list(tmp_path.iterdir()) == []
    path = export_onnx(model, tmp_path / "m.onnx", example_input=x[:2])
    with pytest.raises(ValueError, match="graph_optimization must be one of"):
        OnnxRuntimeModel(path, graph_optimization="max")  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError):
        OnnxRuntimeModel(tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match="targets must be"):
        compare_deployed(model, path, x[:5], torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="no quantized layers"):
        compare_deployed(_cnn(), path, x[:5])
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    with pytest.raises(ImportError, match=r"pip install lightning-qsec\[export\]"):
        export_onnx(model, tmp_path / "n.onnx", example_input=x[:2])
    with pytest.raises(ImportError, match="onnxruntime"):
        OnnxRuntimeModel(path)
    assert not (tmp_path / "n.onnx").exists()
