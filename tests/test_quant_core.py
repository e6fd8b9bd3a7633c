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


def test_calibrate_with_batch_statistics_matches_train_mode_batchnorm(trained):
    net, x, y = trained
    fresh = _net()  # running statistics still the initial ones (mean 0, var 1), as before QAT
    q_running = quantize_model(copy.deepcopy(fresh), act_bit_width=8)
    q_batch = quantize_model(copy.deepcopy(fresh), act_bit_width=8)
    calibrate(q_running, _batches(x, y, n=3))
    calibrate(q_batch, _batches(x, y, n=3), batchnorm="batch")
    assert torch.equal(q_batch[1].running_var, fresh[1].running_var)  # running statistics untouched
    with float_mode(q_batch):  # the ReLU after BatchNorm sees what training mode produces
        q_batch.train()
        post_bn = q_batch[2](q_batch[1](q_batch[0](x[:192])))
        q_batch.eval()
    scale_batch = float(q_batch[2].act_quant.scale().detach())
    scale_running = float(q_running[2].act_quant.scale().detach())
    assert scale_batch * 255 == pytest.approx(float(post_bn.abs().max()), rel=0.5)
    assert scale_batch > 2 * scale_running  # eval-mode BN with untrained statistics under-estimates
    with pytest.raises(ValueError, match="batchnorm must be one of"):
        calibrate(q_batch, _batches(x, y, n=1), batchnorm="train")


def test_failed_calibration_keeps_the_earlier_one(trained):
    net, x, y = trained
    q = quantize_model(copy.deepcopy(net), weight_bit_width=4, act_bit_width=4).eval()
    calibrate(q, _batches(x, y, n=3))
    before = {k: v.clone() for k, v in q.state_dict().items()}
    logits = q(x[:64])
    bad = x[:64].clone()
    bad[0, 0, 0, 0] = float("nan")
    for loader in ([], [(x[:64], y[:64]), (bad, y[:64])]):
        with pytest.raises(ValueError, match="empty|NaN"):
            calibrate(q, loader)
        assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())
        assert torch.equal(q(x[:64]), logits)


@pytest.mark.parametrize("low, high", [(-1.0, 1.0), (-0.5, 0.5)])
def test_hardtanh_keeps_its_clamp_quantized_and_in_float_mode(low, high):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Hardtanh(low, high), nn.Linear(8, 3))
    x = torch.randn(256, 4) * 3  # most pre-activations far outside the clamp
    expected = net(x)
    q = quantize_model(copy.deepcopy(net), act_bit_width=8, quantize_input=False)
    calibrate(q, [(x[i : i + 64],) for i in range(0, 256, 64)])
    hidden = q[1](q[0](x))
    assert float(hidden.min()) >= low - 1e-6 and float(hidden.max()) <= high + 1e-6
    assert (q(x) - expected).abs().max() < 0.05  # 8-bit quantization of a bounded activation
    with float_mode(q):
        assert torch.allclose(q(x), expected, atol=1e-6)


def test_float_mode_keeps_every_train_eval_flag(trained):
    net, x, y = trained
    q = quantize_model(copy.deepcopy(net), act_bit_width=4).train()
    q[2].eval()  # a frozen block inside a model in training mode
    flags = {name: m.training for name, m in q.named_modules()}
    with float_mode(q):
        assert {name: m.training for name, m in q.named_modules()} == flags
        q(x[:8])
    assert {name: m.training for name, m in q.named_modules()} == flags


def test_calibrate_takes_unlabeled_batches(trained):
    net, x, y = trained
    labeled = quantize_model(copy.deepcopy(net), act_bit_width=4)
    calibrate(labeled, _batches(x, y, n=2))
    for batches in ([x[:64], x[64:128]], [(x[:64],), (x[64:128],)]):
        unlabeled = quantize_model(copy.deepcopy(net), act_bit_width=4)
        calibrate(unlabeled, batches)
        assert all(torch.equal(a, b) for a, b in zip(labeled.state_dict().values(), unlabeled.state_dict().values()))


def test_calibrate_inside_inference_mode(trained):
    net, x, y = trained
    q = quantize_model(copy.deepcopy(net)).eval()
    with torch.inference_mode():
        calibrate(q, _batches(x, y, n=2))
    assert _acc(q, x[1400:], y[1400:]) > 0.8


def test_fixed_input_bit_width_is_kept_by_at_precision(trained):
    net, x, y = trained
    q = quantize_model(copy.deepcopy(net), weight_bit_width=4, act_bit_width=4, input_bit_width=8).eval()
    calibrate(q, _batches(x, y))
    acts = bit_widths(q)["act"]
    inputs = {k: v for k, v in acts.items() if "input_quant" in k}
    assert list(inputs.values()) == [8] and set(acts.values()) == {4, 8}
    assert set(bit_widths(q, adjustable_only=True)["act"].values()) == {4}
    with at_precision(q, weight_bit_width=2, act_bit_width=2):
        assert set(bit_widths(q)["act"].values()) == {2, 8}
        assert all(bit_widths(q)["act"][k] == 8 for k in inputs)
    assert bit_widths(q)["act"] == acts
    # the digits' 17 pixel levels pass an 8-bit input grid; a 4-bit one merges them
    coarse = quantize_model(copy.deepcopy(net), weight_bit_width=4, act_bit_width=4).eval()
    calibrate(coarse, _batches(x, y))
    with torch.no_grad():
        assert len(torch.unique(q[0].input_quant(x))) == 17
        assert len(torch.unique(coarse[0].input_quant(x))) <= 8


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"input_bit_width": 1}, "input_bit_width"), ({"input_bit_width": 8, "quantize_input": False}, "quantize_input")],
)
def test_bad_input_bit_width(trained, kwargs, message):
    net, _, _ = trained
    with pytest.raises(ValueError, match=message):
        quantize_model(copy.deepcopy(net), **kwargs)
