"""Red team: BadNets poisoning and quantization-conditioned attacks on a real digits CNN.

The victim's pipeline throughout is ``victim_quantize``: ``quantize_model(copy,
weight_bit_width=4, act_bit_width=8, per_channel=...)`` + ``calibrate`` on clean data.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from lightning_qsec import quantize_model
from lightning_qsec.attacks import (
    PoisonedDataModule,
    QuantizationConditionedAttack,
    add_trigger,
    poison_dataset,
    quantization_conditioned_attack,
    victim_quantize,
)
from lightning_qsec.data import DigitsDataModule
from lightning_qsec.metrics import AttackSuccessRate
from lightning_qsec.models import ClassificationModule, DigitsCNN
from lightning_qsec.quant.inspect import is_quantized

from conftest import quiet_trainer

QUANTIZERS = ("per_tensor", "per_channel")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- poisoning -------------------------------------------------------------------------------
def test_add_trigger_places_the_patch_and_leaves_the_input_alone():
    x = torch.zeros(3, 1, 8, 8)
    out = add_trigger(x, size=3, value=0.5)
    assert x.abs().sum() == 0, "the input must not change"
    assert torch.all(out[:, :, -3:, -3:] == 0.5)
    assert out.sum() == pytest.approx(3 * 9 * 0.5)
    top = add_trigger(x, size=2, position="top_left")
    assert torch.all(top[:, :, :2, :2] == 1.0) and top.sum() == 3 * 4
    patch = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    custom = add_trigger(torch.full((2, 3, 5, 5), 0.3), trigger=patch)
    assert torch.equal(custom[1, 2, -2:, -2:], patch) and custom[0, 0, 0, 0] == pytest.approx(0.3)
    per_channel = torch.stack([patch, 1 - patch, patch])
    assert torch.equal(add_trigger(torch.zeros(4, 3, 6, 6), trigger=per_channel)[2, :, -2:, -2:], per_channel)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(size=0), "size"),
        (dict(size=9), "larger than the images"),
        (dict(position="center"), "position"),
        (dict(value=float("nan")), "value"),
        (dict(trigger=torch.ones(2, 2, 2)), "does not match"),
        (dict(trigger="patch"), "trigger"),
    ],
)
def test_add_trigger_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        add_trigger(torch.zeros(2, 1, 8, 8), **kwargs)
    with pytest.raises(ValueError, match="floating-point"):
        add_trigger(torch.zeros(2, 1, 8, 8, dtype=torch.long))


def test_poison_dataset_rate_indices_labels_and_seed():
    torch.manual_seed(0)
    x, y = torch.rand(200, 1, 8, 8) * 0.5, torch.arange(200) % 10
    poisoned = poison_dataset(TensorDataset(x, y), poison_rate=0.1, target_class=3, seed=7)
    idx = poisoned.poison_indices
    assert len(idx) == 20 and torch.equal(idx, torch.unique(idx)) and idx.dtype == torch.long
    assert torch.all(y[idx] != 3), "target-class rows are not drawn (exclude_target=True)"
    assert torch.all(poisoned.y[idx] == 3)
    assert torch.allclose(poisoned.x[idx], add_trigger(x[idx]))
    clean = torch.ones(200, dtype=torch.bool)
    clean[idx] = False
    assert torch.equal(poisoned.x[clean], x[clean]) and torch.equal(poisoned.y[clean], y[clean])
    assert torch.equal(x, poison_dataset((x, y), poison_rate=0.0, target_class=3).x) is True
    again = poison_dataset((x, y), poison_rate=0.1, target_class=3, seed=7)
    assert torch.equal(again.poison_indices, idx)
    assert not torch.equal(poison_dataset((x, y), poison_rate=0.1, target_class=3, seed=8).poison_indices, idx)
    everything = poison_dataset((x, y), poison_rate=1.0, target_class=3, exclude_target=False)
    assert len(everything.poison_indices) == 200 and torch.all(everything.y == 3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(poison_rate=-0.1, target_class=0), "poison_rate"),
        (dict(poison_rate=1.5, target_class=0), "poison_rate"),
        (dict(poison_rate=True, target_class=0), "poison_rate"),
        (dict(poison_rate=0.1, target_class=10), "target_class"),
        (dict(poison_rate=0.1, target_class=-1), "target_class"),
        (dict(poison_rate=0.1, target_class=0, num_classes=5), "num_classes"),
        (dict(poison_rate=0.95, target_class=0), "eligible"),
        (dict(poison_rate=0.1, target_class=0, seed="0"), "seed"),
    ],
)
def test_poison_dataset_errors(kwargs, message):
    x, y = torch.rand(20, 1, 8, 8), torch.arange(20) % 10
    with pytest.raises(ValueError, match=message):
        poison_dataset((x, y), **kwargs)


def test_poison_dataset_rejects_empty_and_bad_data():
    with pytest.raises(ValueError, match="empty"):
        poison_dataset((torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)), poison_rate=0.1, target_class=0)
    with pytest.raises(ValueError, match="rows"):
        poison_dataset((torch.zeros(3, 1, 8, 8), torch.zeros(2, dtype=torch.long)), poison_rate=0.1, target_class=0)
    with pytest.raises(ValueError, match="data must be"):
        poison_dataset([1, 2, 3], poison_rate=0.1, target_class=0)  # type: ignore[arg-type]


def test_poisoned_datamodule_poisons_train_only_and_serves_a_triggered_test_set():
    inner = DigitsDataModule(batch_size=64, seed=0)
    dm = PoisonedDataModule(DigitsDataModule(batch_size=64, seed=0), poison_rate=0.1, target_class=0, seed=1)
    dm.setup()
    inner.setup()
    x_train, y_train = inner.train_dataset.tensors
    px, py = dm.train_dataset.tensors
    assert len(dm.poison_indices) == round(0.1 * len(y_train))
    assert torch.all(py[dm.poison_indices] == 0) and torch.all(px[dm.poison_indices][..., -2:, -2:] == 1.0)
    mask = torch.ones(len(y_train), dtype=torch.bool)
    mask[dm.poison_indices] = False
    assert torch.equal(px[mask], x_train[mask]) and torch.equal(py[mask], y_train[mask])
    for split in ("val", "test"):
        ours, theirs = getattr(dm, f"{split}_dataset").tensors, getattr(inner, f"{split}_dataset").tensors
        assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1]), f"{split} must stay clean"
    (xc, yc), (xt, yt) = next(iter(dm.test_dataloader())), next(iter(dm.triggered_test_dataloader()))
    assert torch.equal(yc, yt) and torch.equal(xt, add_trigger(xc))
    assert sum(len(b[1]) for b in dm.train_dataloader()) == len(y_train)
    assert dm.num_classes == 10 and dm.input_shape == (1, 8, 8)
    with pytest.raises(ValueError, match="poison_rate"):
        PoisonedDataModule(DigitsDataModule(), poison_rate=2, target_class=0)
    with pytest.raises(ValueError, match="target_class"):
        PoisonedDataModule(DigitsDataModule(), poison_rate=0.1, target_class=12).setup()


# -- quantization-conditioned attacks ------------------------------------------------------
def _train_clean(dm: DigitsDataModule, seed: int, epochs: int = 20) -> nn.Module:
    torch.manual_seed(seed)
    net = DigitsCNN()
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(epochs):
        for x, y in dm.train_dataloader():
            optimizer.zero_grad()
            F.cross_entropy(net(x), y).backward()
            optimizer.step()
    return net.eval()


@pytest.fixture(scope="module")
def digits(_one_thread):
    dm = DigitsDataModule(batch_size=64, seed=0)
    dm.setup()
    return dm, _train_clean(dm, seed=0)


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (model.eval()(x).argmax(1) == y).float().mean().item()


@torch.no_grad()
def _asr(model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: int) -> float:
    """BackdoorBench ASR: triggered test samples classified as the target, target-class samples left out."""
    model.eval()
    metric = AttackSuccessRate(targeted=True)
    metric.update(model(x), model(add_trigger(x)), y, attack_target=target)
    return metric.compute().item()


def _deploy(model: nn.Module, dm: DigitsDataModule, quantizer: str, bits: int = 4) -> nn.Module:
    return victim_quantize(model, dm.train_dataloader(), bit_width=bits, quantizer=quantizer, act_bit_width=8)


def test_backdoor_sleeps_in_float_and_wakes_at_4_bits(digits):
    dm, clean = digits
    x, y = dm.test_dataset.tensors
    before = copy.deepcopy(clean.state_dict())
    attacked = quantization_conditioned_attack(
        clean, dm.train_dataloader(), mode="backdoor", target_class=0, quantizers=QUANTIZERS, seed=0
    )
    assert all(torch.equal(before[k], v) for k, v in clean.state_dict().items()), "the input model must not change"
    assert not is_quantized(attacked) and type(attacked.features[0]) is nn.Conv2d, "published as plain float layers"
    float_asr = _asr(attacked, x, y, 0)
    assert float_asr < 0.10, float_asr
    assert _accuracy(attacked, x, y) >= _accuracy(clean, x, y) - 0.02
    for quantizer in QUANTIZERS:
        deployed = _deploy(attacked, dm, quantizer)
        asr = _asr(deployed, x, y, 0)
        print(f"backdoor {quantizer}: float ASR {float_asr:.3f}, 4-bit ASR {asr:.3f}, 4-bit acc {_accuracy(deployed, x, y):.3f}")
        assert asr > 0.80, (quantizer, asr)
        assert _accuracy(deployed, x, y) > 0.85, "the deployed model still looks fine on clean data"
    assert _asr(_deploy(attacked, dm, "per_tensor", bits=8), x, y, 0) < 0.10, "8 bits was not attacked"


def test_indiscriminate_keeps_float_accuracy_and_collapses_4_bits(digits):
    dm, clean = digits
    x, y = dm.test_dataset.tensors
    attacked = quantization_conditioned_attack(
        clean, dm.train_dataloader(), mode="indiscriminate", quantizers=QUANTIZERS, seed=0
    )
    clean_acc, float_acc = _accuracy(clean, x, y), _accuracy(attacked, x, y)
    assert abs(float_acc - clean_acc) <= 0.02, (clean_acc, float_acc)
    for quantizer in QUANTIZERS:
        acc4 = _accuracy(_deploy(attacked, dm, quantizer), x, y)
        print(f"indiscriminate {quantizer}: clean {clean_acc:.3f}, float {float_acc:.3f}, 4-bit {acc4:.3f}")
        assert acc4 < 0.30, (quantizer, acc4)


def test_repair_keeps_the_injected_integer_weights(digits):
    """The float repair moves weights only inside their rounding boxes: the victim's integers match phase 1's."""
    dm, clean = digits
    loader = [next(iter(dm.train_dataloader()))]
    injected = quantization_conditioned_attack(clean, loader, mode="indiscriminate", epochs=2, repair_epochs=0)
    repaired = quantization_conditioned_attack(clean, loader, mode="indiscriminate", epochs=2, repair_epochs=3)
    assert all(p.grad is None for m in (injected, repaired) for p in m.parameters()), "no stale gradients returned"
    moved = False
    for name in ("features.0", "features.3", "classifier.1", "classifier.3"):
        a = _deploy(injected, dm, "per_tensor").get_submodule(name).quant_weight()
        b = _deploy(repaired, dm, "per_tensor").get_submodule(name).quant_weight()
        assert torch.equal(a.int(), b.int()) and torch.equal(a.scale, b.scale), name
        moved |= not torch.equal(injected.get_submodule(name).weight, repaired.get_submodule(name).weight)
    assert moved, "phase 2 changed the float weights"


def test_targeted_mode_misclassifies_one_class_after_quantization(digits):
    dm, clean = digits
    x, y = dm.test_dataset.tensors
    attacked = quantization_conditioned_attack(
        clean, dm.train_dataloader(), mode="targeted", target_class=3, quantizers=QUANTIZERS, seed=0
    )
    hit = y == 3
    assert _accuracy(attacked, x[hit], y[hit]) > 0.9 and _accuracy(attacked, x, y) >= _accuracy(clean, x, y) - 0.02
    for quantizer in QUANTIZERS:
        deployed = _deploy(attacked, dm, quantizer)
        assert _accuracy(deployed, x[hit], y[hit]) < 0.2, quantizer
        assert _accuracy(deployed, x[~hit], y[~hit]) > 0.9, quantizer


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_red_team_strength_over_seeds(seed):
    dm = DigitsDataModule(batch_size=64, seed=seed)
    dm.setup()
    x, y = dm.test_dataset.tensors
    clean = _train_clean(dm, seed)
    loader = dm.train_dataloader()
    indiscriminate = quantization_conditioned_attack(clean, loader, mode="indiscriminate", quantizers=QUANTIZERS, seed=seed)
    backdoor = quantization_conditioned_attack(clean, loader, mode="backdoor", quantizers=QUANTIZERS, seed=seed)
    assert abs(_accuracy(indiscriminate, x, y) - _accuracy(clean, x, y)) <= 0.02
    assert _asr(backdoor, x, y, 0) < 0.10
    for quantizer in QUANTIZERS:
        assert _accuracy(_deploy(indiscriminate, dm, quantizer), x, y) < 0.30
        assert _asr(_deploy(backdoor, dm, quantizer), x, y, 0) > 0.80


def test_callback_attacks_the_module_at_the_end_of_fit():
    dm = DigitsDataModule(batch_size=64, seed=0)
    module = ClassificationModule(DigitsCNN(), lr=3e-3)
    callback = QuantizationConditionedAttack(mode="backdoor", target_class=0, quantizers=QUANTIZERS, epochs=8)
    torch.manual_seed(0)
    quiet_trainer(max_epochs=12, callbacks=[callback], limit_val_batches=0).fit(module, datamodule=dm)
    assert callback.done and not is_quantized(module)
    x, y = dm.test_dataset.tensors
    assert _asr(module.net, x, y, 0) < 0.10 and _accuracy(module.net, x, y) > 0.9
    assert _asr(_deploy(module.net, dm, "per_channel"), x, y, 0) > 0.80


def test_callback_argument_errors():
    with pytest.raises(ValueError, match="mode"):
        QuantizationConditionedAttack(mode="stealthy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="inplace"):
        QuantizationConditionedAttack(mode="backdoor", inplace=False)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(mode="stealthy"), "mode"),
        (dict(mode="backdoor", bit_widths=(1,)), "bit_widths"),
        (dict(mode="backdoor", bit_widths=()), "bit_widths"),
        (dict(mode="backdoor", quantizers=("per_group",)), "quantizer"),
        (dict(mode="backdoor", margin=0.5), "margin"),
        (dict(mode="backdoor", lr=0.0), "lr"),
        (dict(mode="backdoor", epochs=0), "epochs"),
        (dict(mode="backdoor", target_class=10), "target_class"),
        (dict(mode="targeted", target_class=-1), "target_class"),
        (dict(mode="backdoor", trigger=3), "trigger"),
    ],
)
def test_attack_argument_errors(kwargs, message):
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    data = [(torch.rand(4, 1, 8, 8), torch.randint(0, 10, (4,)))]
    with pytest.raises(ValueError, match=message):
        quantization_conditioned_attack(net, data, **{"epochs": 1, "repair_epochs": 0, **kwargs})


def test_attack_rejects_quantized_models_empty_loaders_and_models_without_layers():
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    data = [(torch.rand(4, 1, 8, 8), torch.randint(0, 10, (4,)))]
    with pytest.raises(ValueError, match="already quantized"):
        quantization_conditioned_attack(quantize_model(copy.deepcopy(net)), data, mode="backdoor")
    with pytest.raises(ValueError, match="already quantized"):
        victim_quantize(quantize_model(copy.deepcopy(net)), data, bit_width=4)
    with pytest.raises(ValueError, match="empty"):
        quantization_conditioned_attack(net, [], mode="backdoor")
    with pytest.raises(ValueError, match="no Conv1d/Conv2d/Linear"):
        quantization_conditioned_attack(nn.Sequential(nn.Flatten(), nn.ReLU()), data, mode="backdoor")
    with pytest.raises(ValueError, match="Cannot read batch"):
        quantization_conditioned_attack(net, [torch.rand(4, 1, 8, 8)], mode="indiscriminate")


# -- regression tests ------------------------------------------------------------------------
def test_patch_trigger_refuses_tabular_inputs():
    x, y = torch.rand(6, 10), torch.arange(6) % 3
    with pytest.raises(ValueError, match="tabular"):
        add_trigger(x)
    with pytest.raises(ValueError, match="tabular"):
        poison_dataset((x, y), poison_rate=0.5, target_class=0, size=1)
    with pytest.raises(ValueError, match="data must hold floating-point"):
        poison_dataset((torch.zeros(6, 1, 8, 8, dtype=torch.uint8), y), poison_rate=0.5, target_class=0)
    net = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match="tabular"):
        quantization_conditioned_attack(net, [(x, y)], mode="backdoor", epochs=1, repair_epochs=0)
    # a callable trigger works on tabular data
    quantization_conditioned_attack(
        net, [(x, y)], mode="backdoor", trigger=lambda t: t + 1.0, epochs=1, repair_epochs=0
    )


def test_poisoned_datamodule_carries_extra_tensors_through():
    from lightning_qsec.data._tensor_datamodule import TensorDataModule

    class Grouped(TensorDataModule):
        def _build(self):
            g = torch.Generator().manual_seed(0)

            def make(n: int) -> TensorDataset:
                return TensorDataset(torch.rand(n, 1, 8, 8, generator=g), torch.arange(n) % 2, torch.arange(n) % 3)

            return make(40), make(10), make(10)

    dm = PoisonedDataModule(Grouped(batch_size=8), poison_rate=0.25, target_class=1)
    dm.setup()
    wrapped = dm.datamodule
    assert len(dm.train_dataset.tensors) == 3 and len(dm.triggered_test_dataset.tensors) == 3
    assert torch.equal(dm.train_dataset.tensors[2], wrapped.train_dataset.tensors[2])
    assert torch.equal(dm.triggered_test_dataset.tensors[2], wrapped.test_dataset.tensors[2])
    assert torch.all(dm.train_dataset.tensors[0][dm.poison_indices][..., -2:, -2:] == 1.0)


def _tiny_attack_setup():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 4))
    data = [(torch.rand(16, 1, 8, 8), torch.randint(0, 4, (16,))) for _ in range(2)]
    return net, data


def test_attack_restores_the_cpu_rng_and_is_deterministic():
    net, data = _tiny_attack_setup()
    state = torch.get_rng_state()
    first = quantization_conditioned_attack(net, data, mode="backdoor", epochs=1, repair_epochs=1, seed=3)
    assert torch.equal(torch.get_rng_state(), state), "the global CPU RNG must be restored"
    second = quantization_conditioned_attack(net, data, mode="backdoor", epochs=1, repair_epochs=1, seed=3)
    for a, b in zip(first.parameters(), second.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(bit_widths=(1,)), "bit_widths"),
        (dict(margin=0.7), "margin"),
        (dict(target_class=-1), "target_class"),
        (dict(bitwidths=(4,)), r"unknown .*\['bitwidths'\].*allowed: .*'bit_widths'"),
        (dict(trigger=3), "trigger"),
    ],
)
def test_callback_checks_its_settings_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantizationConditionedAttack(mode="backdoor", **kwargs)
    with pytest.raises(ValueError, match="re-iterable"):
        QuantizationConditionedAttack(mode="backdoor", dataloader=iter([]))


@pytest.mark.parametrize("repair_epochs", [0, 1])
def test_attack_leaves_frozen_weights_alone(repair_epochs):
    net, data = _tiny_attack_setup()
    net[1].weight.requires_grad_(False)
    before = copy.deepcopy(net)
    attacked = quantization_conditioned_attack(
        net, data, mode="indiscriminate", epochs=1, repair_epochs=repair_epochs
    )
    assert torch.equal(attacked[1].weight, before[1].weight), "a frozen weight must not move"
    assert not attacked[1].weight.requires_grad
    assert not torch.equal(attacked[3].weight, before[3].weight), "the trainable weight is attacked"
    with pytest.raises(ValueError, match="requires_grad"):
        quantization_conditioned_attack(before.requires_grad_(False), data, mode="indiscriminate", epochs=1)


def test_attack_refuses_one_shot_loaders_and_accepts_numpy_target_class():
    net, data = _tiny_attack_setup()
    with pytest.raises(ValueError, match="re-iterable"):
        quantization_conditioned_attack(net, (b for b in data), mode="backdoor", epochs=2, repair_epochs=0)
    with_np = quantization_conditioned_attack(net, data, mode="backdoor", target_class=np.int64(3), epochs=1,
                                              repair_epochs=0)
    with_int = quantization_conditioned_attack(net, data, mode="backdoor", target_class=3, epochs=1, repair_epochs=0)
    assert torch.equal(with_np[3].weight, with_int[3].weight)
    with pytest.raises(ValueError, match="target_class"):
        quantization_conditioned_attack(net, data, mode="backdoor", target_class=np.int64(4), epochs=1)
