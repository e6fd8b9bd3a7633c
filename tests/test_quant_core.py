"""The functional quantization core on real digits data: swap, precision, float mode, calibration."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from brevitas.nn import QuantConv2d, QuantLinear, QuantReLU
from sklearn.datasets import load_digits
from torch import nn

from lightning_qsec import at_precision, bit_widths, calibrate, float_mode, is_quantized, quantize_model


def _digits():
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16
    return x, torch.tensor(d.target)


def _net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 16, 10),
    )


@pytest.fixture(scope="module")
def trained():
    """A float CNN trained on digits for a few seconds, and the data."""
    torch.manual_seed(0)
    x, y = _digits()
    net = _net()
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(6):
        for i in range(0, 1400, 64):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x[i : i + 64]), y[i : i + 64]).backward()
            opt.step()
    return net.eval(), x, y


def _acc(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def _batches(x, y, n=10, size=64):
    return [(x[i * size : (i + 1) * size], y[i * size : (i + 1) * size]) for i in range(n)]


def test_swap_types_and_exact_weights(trained):
    net, _, _ = trained
    q = quantize_model(copy.deepcopy(net), weight_bit_width=4, act_bit_width=4)
    assert isinstance(q[0], QuantConv2d) and isinstance(q[2], QuantReLU) and isinstance(q[7], QuantLinear)
    assert isinstance(q[1], nn.BatchNorm2d)  # normalisation stays float
    for i in (0, 4, 7):
        assert torch.equal(q[i].weight, net[i].weight) and torch.equal(q[i].bias, net[i].bias)
    assert is_quantized(q) and not is_quantized(net)


def test_float_mode_is_exactly_the_float_model(trained):
    net, x, _ = trained
    q = quantize_model(copy.deepcopy(net), weight_bit_width=2, act_bit_width=2).eval()
    with float_mode(q), torch.no_grad():
        assert torch.equal(q(x[:200]), net(x[:200]))
    with torch.no_grad():
        assert not torch.allclose(q(x[:200]), net(x[:200]))  # quantization is back on


def test_idempotent_swap(trained):
    net, x, _ = trained
    q = quantize_model(copy.deepcopy(net), weight_bit_width=4, act_bit_width=4)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    modules = list(q.modules())
    assert quantize_model(q, weight_bit_width=8) is q
    assert list(q.modules()) == modules
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())


def test_ptq_calibration_and_in_place_precision_sweep(trained):
    net, x, y = trained
    float_acc = _acc(net, x[1400:], y[1400:])
    q = quantize_model(copy.deepcopy(net), weight_bit_width=4, act_bit_width=4).eval()
    calibrate(q, _batches(x, y))
    accs = {}
    for bits in (8, 4, 2):
        with at_precision(q, weight_bit_width=bits, act_bit_width=bits):
            accs[bits] = _acc(q, x[1400:], y[1400:])
    assert abs(accs[8] - float_acc) <= 0.01
    assert accs[4] >= float_acc - 0.05
    assert accs[2] < accs[4] - 0.2  # 2 bits really is a different model
    assert set(bit_widths(q)["weight"].values()) == {4} and set(bit_widths(q)["act"].values()) == {4}


def test_at_precision_restores_mixed_widths(trained):
    net, x, _ = trained
    q = quantize_model(copy.deepcopy(net), weight_bit_width=8, act_bit_width=8, layer_bit_widths={"7": 4})
    before = bit_widths(q)
    assert before["weight"]["7.weight_quant.tensor_quant.msb_clamp_bit_width_impl"] == 4
    with at_precision(q, weight_bit_width=2):
        assert set(bit_widths(q)["weight"].values()) == {2}
        assert bit_widths(q)["act"] == before["act"]
    assert bit_widths(q) == before
    with pytest.raises(RuntimeError), at_precision(q, act_bit_width=3):
        raise RuntimeError("restored even on error")
    assert bit_widths(q) == before


def test_bit_widths_live_in_state_dict(trained):
    net, x, y = trained
    q = quantize_model(copy.deepcopy(net), weight_bit_width=4, act_bit_width=6, per_channel=True).eval()
    calibrate(q, _batches(x, y, n=3))
    state = q.state_dict()
    widths = {k: int(v) for k, v in state.items() if k.endswith("bit_width")}
    assert widths and set(widths.values()) == {4, 6}
    twin = quantize_model(_net(), weight_bit_width=8, act_bit_width=8, per_channel=True).eval()
    twin.load_state_dict(state)
    assert bit_widths(twin) == bit_widths(q)
    with torch.no_grad():
        assert torch.equal(twin(x[:100]), q(x[:100]))


def test_skip_and_layer_globs(trained):
    net, _, _ = trained
    q = quantize_model(copy.deepcopy(net), skip=["7"], layer_bit_widths={"[04]": 3})
    assert type(q[7]) is nn.Linear
    assert bit_widths(q)["weight"] == {
        "0.weight_quant.tensor_quant.msb_clamp_bit_width_impl": 3,
        "4.weight_quant.tensor_quant.msb_clamp_bit_width_impl": 3,
    }


def test_unquantizable_layers_stay_float_with_one_warning():
    net = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Embedding(3, 2), nn.Linear(8, 2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantize_model(net)
    ours = [w for w in caught if "left" in str(w.message)]
    assert len(ours) == 1
    assert "1 (GELU)" in str(ours[0].message) and "2 (Embedding)" in str(ours[0].message)
    assert type(net[1]) is nn.GELU


def test_calibrate_twice_gives_the_same_scales(trained):
    net, x, y = trained
    q = quantize_model(copy.deepcopy(net), weight_bit_width=4, act_bit_width=4).eval()
    calibrate(q, _batches(x, y))
    first = {k: v.clone() for k, v in q.state_dict().items()}
    calibrate(q, _batches(x, y))
    assert all(torch.allclose(first[k], v) for k, v in q.state_dict().items())


def test_calibrate_leaves_batchnorm_and_mode_alone(trained):
    net, x, y = trained
    q = quantize_model(copy.deepcopy(net)).train()
    running = q[1].running_mean.clone()
    calibrate(q, _batches(x, y, n=2))
    assert torch.equal(q[1].running_mean, running)
    assert all(m.training for m in q.modules())


def test_calibrate_inside_inference_mode(trained):
    net, x, y = trained
    q = quantize_model(copy.deepcopy(net)).eval()
    with torch.inference_mode():
        calibrate(q, _batches(x, y, n=2))
    assert _acc(q, x[1400:], y[1400:]) > 0.8
