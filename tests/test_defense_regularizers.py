"""Defense callbacks (regularizers, random precision) on real digits data, added to the Trainer only."""

from __future__ import annotations

import copy
import math
import re

import pytest
import pytorch_lightning as pl
import torch
from conftest import UserCNN, quiet_trainer, run_ddp_script
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_qsec import bit_widths, calibrate, quantize_model
from lightning_qsec.callbacks import QuantizationAwareTraining
from lightning_qsec.data import DigitsDataModule
from lightning_qsec.defenses import (
    GradientL1Regularization,
    KurtosisRegularization,
    LipschitzRegularization,
    RandomPrecisionTraining,
)
from lightning_qsec.defenses._regularizer import Coefficient, preserved_running_state, regularized_weights
from lightning_qsec.defenses.kurtosis import kurtosis
from lightning_qsec.defenses.lipschitz import orthogonality_penalty
from lightning_qsec.quant.amplification import amplification_profile, error_amplification, error_amplification_ratio
from lightning_qsec.quant.inspect import stat_scalers

EPOCHS = 2
BATCHES = 10  # training batches of 64 per epoch


def _weights(module: nn.Module) -> list[torch.Tensor]:
    return [w.detach() for _, w in regularized_weights(module)]


def _normal_init(module: nn.Module) -> None:
    # Kaiming-uniform (PyTorch's default) already has kurtosis 1.8; start bell-shaped instead.
    for _, w in regularized_weights(module):
        nn.init.normal_(w, std=0.1)


def _fit(callbacks, *, module=None, epochs=EPOCHS, calibrate_batches=10, qat=True, ckpt_path=None, **kwargs):
    if module is None:
        pl.seed_everything(0, verbose=False)
        module = UserCNN()
        _normal_init(module)
    front = [QuantizationAwareTraining(4, 4, calibrate_batches=calibrate_batches)] if qat else []
    kwargs.setdefault("limit_train_batches", BATCHES)
    kwargs.setdefault("limit_val_batches", 0)
    trainer = quiet_trainer(max_epochs=epochs, callbacks=[*front, *callbacks], **kwargs)
    trainer.fit(module, datamodule=DigitsDataModule(), ckpt_path=ckpt_path)
    return module, trainer


def _val_batch() -> tuple[torch.Tensor, torch.Tensor]:
    dm = DigitsDataModule()
    dm.setup()
    xs, ys = zip(*dm.val_dataloader())
    return torch.cat(xs), torch.cat(ys)


def _grad_l1(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    module.eval()
    grads = torch.autograd.grad(F.cross_entropy(module(x), y), [w for _, w in regularized_weights(module)])
    module.train()
    return float(sum(g.abs().sum() for g in grads))


def _accuracy(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    module.eval()
    with torch.no_grad():
        acc = float((module(x).argmax(1) == y).float().mean())
    module.train()
    return acc


@pytest.fixture(scope="module")
def twin():
    """QAT w4a4 without any defense: the unregularized twin of every regularized run."""
    module, _ = _fit([])
    return module


# -- each regularizer changes what its paper says it changes ---------------------------------------


def test_lipschitz_lowers_orthogonality_penalty(twin) -> None:
    module, trainer = _fit([LipschitzRegularization(beta=0.05)])
    reg, base = orthogonality_penalty(_weights(module)), orthogonality_penalty(_weights(twin))
    assert float(reg) < 0.5 * float(base)
    assert "qsec/reg/lipschitz" in trainer.callback_metrics
    assert trainer.callback_metrics["qsec/reg/lipschitz_coef"] == pytest.approx(0.05)


def test_kure_moves_kurtosis_toward_target(twin) -> None:
    module, trainer = _fit([KurtosisRegularization(lam=1.0, target=1.8)])
    reg = [abs(float(kurtosis(w)) - 1.8) for w in _weights(module)]
    base = [abs(float(kurtosis(w)) - 1.8) for w in _weights(twin)]
    assert sum(reg) < 0.5 * sum(base)
    assert all(r < b for r, b in zip(reg, base))
    assert {"qsec/reg/kurtosis", "qsec/reg/kurtosis_mean"} <= set(trainer.callback_metrics)


def test_gradient_l1_lowers_weight_gradient_norm_without_collapse(twin) -> None:
    # Off in epoch 0, on in epoch 1 (milestone schedule).
    module, trainer = _fit([GradientL1Regularization(lam=[(0, 0.0), (1, 0.003)])])
    x, y = _val_batch()
    assert _grad_l1(module, x, y) < 0.9 * _grad_l1(twin, x, y)
    # a lower gradient norm by learning, not by collapsing to a constant output (chance is 0.1)
    assert _accuracy(module, x, y) > max(0.3, _accuracy(twin, x, y) - 0.1)
    assert trainer.callback_metrics["qsec/reg/gradient_l1_coef"] == pytest.approx(0.003)


# -- mechanism: exact gradients, gradient accumulation ----------------------------------------------


class SGDCNN(UserCNN):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fixed_loader(n: int = 64, batch: int = 32) -> DataLoader:
    x, y = _val_batch()
    return DataLoader(TensorDataset(x[:n], y[:n]), batch_size=batch, shuffle=False)


NO_VAL = pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")


@NO_VAL
@pytest.mark.parametrize("accumulate", [1, 2])
def test_extra_gradient_is_exact_and_composes_with_accumulation(accumulate: int) -> None:
    """One SGD step of loss + beta/2 P(W) + lam ||dL/dW||_1, against the gradient computed by hand."""
    beta, lam, lr = 0.01, 0.05, 0.1
    pl.seed_everything(0, verbose=False)
    module = SGDCNN()
    start = copy.deepcopy(module)
    loader = _fixed_loader(batch=64 // accumulate)
    trainer = quiet_trainer(
        max_steps=1,
        accumulate_grad_batches=accumulate,
        callbacks=[LipschitzRegularization(beta=beta), GradientL1Regularization(lam=lam)],
    )
    trainer.fit(module, train_dataloaders=loader)

    params = list(start.parameters())
    total = [torch.zeros_like(p) for p in params]
    weights = [w for _, w in regularized_weights(start)]
    for x, y in loader:
        loss = F.cross_entropy(start(x), y)
        wg = torch.autograd.grad(loss, weights, create_graph=True)
        objective = loss + lam * sum(g.abs().sum() for g in wg)
        for t, g in zip(total, torch.autograd.grad(objective / accumulate, params)):
            t += g
    lip = torch.autograd.grad(beta / 2 * orthogonality_penalty(weights), weights)
    lip_by_param = {id(w): g for w, g in zip(weights, lip)}
    for (name, p_after), p0, g in zip(module.named_parameters(), params, total):
        expected = p0.detach() - lr * (g + lip_by_param.get(id(p0), 0.0))
        torch.testing.assert_close(p_after.detach(), expected, atol=2e-6, rtol=1e-4, msg=name)


@NO_VAL
@pytest.mark.filterwarnings("ignore:`training_step` returned `None`")
def test_skipped_step_gets_no_extra_gradient() -> None:
    class Skipping(SGDCNN):
        def training_step(self, batch, batch_idx):
            return None

    pl.seed_everything(0, verbose=False)
    module = Skipping()
    before = copy.deepcopy(module.state_dict())
    trainer = quiet_trainer(max_steps=2, callbacks=[LipschitzRegularization(beta=1.0), KurtosisRegularization(lam=1.0)])
    trainer.fit(module, train_dataloaders=_fixed_loader())
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key]), key


# -- random precision --------------------------------------------------------------------------------


class RecordingCNN(UserCNN):
    """Records the bit widths each training and validation step sees."""

    def __init__(self) -> None:
        super().__init__()
        self.train_precisions: list[tuple[int, int]] = []
        self.val_precisions: set[tuple[int, int]] = set()

    @staticmethod
    def _now(module: nn.Module) -> tuple[int, int]:
        widths = bit_widths(module)
        weights, acts = set(widths["weight"].values()), set(widths["act"].values())
        assert len(weights) == 1 and len(acts) == 1
        return weights.pop(), acts.pop()

    def training_step(self, batch, batch_idx):
        self.train_precisions.append(self._now(self))
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        self.val_precisions.add(self._now(self))
        return super().validation_step(batch, batch_idx)


def test_random_precision_visits_several_and_restores() -> None:
    pl.seed_everything(0, verbose=False)
    module = RecordingCNN()
    rpt = RandomPrecisionTraining(bit_widths=(4, 6, "w8a4"), seed=3)
    _, trainer = _fit([rpt], module=module, limit_val_batches=2, accumulate_grad_batches=2)
    seen = module.train_precisions
    assert len(seen) == EPOCHS * BATCHES
    assert set(seen) == {(4, 4), (6, 6), (8, 4)}
    assert all(seen[i] == seen[i + 1] for i in range(0, len(seen), 2))  # one precision per optimizer step
    assert sum(rpt.counts.values()) == trainer.global_step == len(seen) // 2
    assert module.val_precisions == {(4, 4)}  # validation at the configured precision
    assert RecordingCNN._now(module) == (4, 4)  # restored after fit
    assert "qsec/random_precision/weight_bit_width" in trainer.callback_metrics


def test_random_precision_sequence_is_seeded() -> None:
    draws = []
    for _ in range(2):
        rpt = RandomPrecisionTraining(seed=7)
        draws.append([int(torch.randint(5, (1,), generator=rpt.generator)) for _ in range(20)])
    assert draws[0] == draws[1]


def test_random_precision_needs_quantized_model() -> None:
    with pytest.raises(ValueError, match="no quantized layers"):
        _fit([RandomPrecisionTraining()], qat=False, epochs=1, limit_train_batches=1)


class BNCNN(RecordingCNN):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu1(self.bn(self.conv1(x))))
        x = self.relu2(self.conv2(x))
        x = F.max_pool2d(x, 2).flatten(1)
        return self.fc2(self.relu3(self.fc1(x)))


def test_switchable_bn_keeps_statistics_per_precision(tmp_path) -> None:
    pl.seed_everything(0, verbose=False)
    module = BNCNN()
    rpt = RandomPrecisionTraining(bit_widths=(4, 8), switchable_bn=True, seed=1)
    _, trainer = _fit([rpt], module=module, epochs=1, enable_checkpointing=False)
    counts = dict(rpt.counts)
    assert set(counts) == {"w4a4", "w8a8"}
    stats8 = rpt.bn_statistics["w8a8"]["bn"]
    assert int(module.bn.num_batches_tracked) == counts["w4a4"]  # the model's own set: w4a4 steps only
    assert int(stats8["num_batches_tracked"]) == counts["w8a8"]
    assert not torch.allclose(stats8["running_mean"], module.bn.running_mean)

    path = tmp_path / "rpt.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=True)["callbacks"]["RandomPrecisionTraining"]
    fresh = RandomPrecisionTraining(bit_widths=(4, 8), switchable_bn=True, seed=1)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.bn_statistics["w8a8"]["bn"]["running_mean"], stats8["running_mean"])
    assert torch.equal(fresh.generator.get_state(), rpt.generator.get_state())

    own = module.bn.running_mean.clone()
    module.eval()
    with rpt.switched(module, 8):
        assert torch.equal(module.bn.running_mean, stats8["running_mean"])
        assert RecordingCNN._now(module) == (8, 8)
    assert torch.equal(module.bn.running_mean, own) and RecordingCNN._now(module) == (4, 4)


def test_evaluation_hooks_use_each_precisions_own_batchnorm_statistics() -> None:
    from lightning_qsec import at_precision
    from lightning_qsec.callbacks import PrecisionSweep

    pl.seed_everything(0, verbose=False)
    module = BNCNN()
    rpt = RandomPrecisionTraining(bit_widths=(4, 8), switchable_bn=True, seed=1)
    sweep = PrecisionSweep([8])
    _, trainer = _fit([rpt, sweep], module=module, epochs=1, enable_checkpointing=False)
    trainer.test(module, datamodule=DigitsDataModule(), verbose=False)
    dm = DigitsDataModule()
    dm.setup("test")
    x, y = dm.test_dataset.tensors
    module.eval()
    with torch.no_grad():
        with rpt.switched(module, 8):
            own = float((module(x).argmax(1) == y).float().mean())
        with at_precision(module, weight_bit_width=8, act_bit_width=8):  # w8a8 with the w4a4 statistics
            shared = float((module(x).argmax(1) == y).float().mean())
    assert sweep.results["test"]["precisions"]["w8a8"]["accuracy"] == pytest.approx(own, abs=1e-6)
    assert own != shared


def test_switchable_bn_needs_configured_precision_in_bit_widths() -> None:
    pl.seed_everything(0, verbose=False)
    with pytest.raises(ValueError, match="switchable_bn=True .* one of bit_widths"):
        _fit([RandomPrecisionTraining(bit_widths=(6, 8), switchable_bn=True)], module=BNCNN(), epochs=1)


# -- together, statistics, resume ---------------------------------------------------------------------


def test_all_defenses_together_with_qat_and_accumulation() -> None:
    pl.seed_everything(0, verbose=False)
    module = RecordingCNN()
    callbacks = [
        LipschitzRegularization(beta=1e-3),
        KurtosisRegularization(lam=0.1),
        GradientL1Regularization(lam=0.01),
        RandomPrecisionTraining(bit_widths=(4, 8)),
    ]
    _, trainer = _fit(callbacks, module=module, epochs=1, accumulate_grad_batches=2)
    metrics = trainer.callback_metrics
    for key in ("lipschitz", "kurtosis", "gradient_l1"):
        assert math.isfinite(float(metrics[f"qsec/reg/{key}"]))
    assert trainer.global_step == BATCHES // 2
    assert RecordingCNN._now(module) == (4, 4)
    assert all(torch.isfinite(p).all() for p in module.parameters())
    # nothing was wrapped or changed on the user's module
    assert "forward" not in vars(module) and type(module).forward is UserCNN.forward


def test_extra_passes_do_not_consume_statistics() -> None:
    pl.seed_everything(0, verbose=False)
    module = BNCNN()
    callbacks = [GradientL1Regularization(lam=0.01), RandomPrecisionTraining(bit_widths=(4, 8))]
    _, trainer = _fit(callbacks, module=module, epochs=1, calibrate_batches=0)
    counters = {s.counter for _, s in stat_scalers(module)}
    assert counters == {trainer.global_step} == {BATCHES}  # one training forward per step, no more
    assert int(module.bn.num_batches_tracked) == BATCHES


def test_preserved_running_state_around_the_end_of_collection() -> None:
    pl.seed_everything(0, verbose=False)
    net = quantize_model(nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10)))
    scalers = [s for _, s in stat_scalers(net)]
    for s in scalers:
        s.collect_stats_steps = 2
    x = torch.rand(8, 1, 8, 8)
    net.train()
    for steps in (1, 1):  # inside collection, then exactly at its end (counter == collect_stats_steps)
        for _ in range(steps):
            net(x)
        before = [(s.counter, s.buffer.clone(), s.value.detach().clone()) for s in scalers]
        bn = net[2].running_mean.clone(), int(net[2].num_batches_tracked)
        with preserved_running_state(net):
            net(torch.rand(8, 1, 8, 8)).sum().backward()
        for s, (counter, buffer, value) in zip(scalers, before):
            assert s.counter == counter and torch.equal(s.buffer, buffer) and torch.equal(s.value.detach(), value)
        assert torch.equal(net[2].running_mean, bn[0]) and int(net[2].num_batches_tracked) == bn[1]


def test_resume_restores_random_precision_exactly(tmp_path) -> None:
    def run(epochs, ckpt_path=None, module=None):
        rpt = RandomPrecisionTraining(seed=5)
        module, trainer = _fit([rpt], module=module, epochs=epochs, ckpt_path=ckpt_path)
        return module, trainer, rpt

    pl.seed_everything(0, verbose=False)
    straight, _, rpt_straight = run(2, module=RecordingCNN())

    pl.seed_everything(0, verbose=False)
    first, trainer, _ = run(1, module=RecordingCNN())
    path = tmp_path / "epoch1.ckpt"
    trainer.save_checkpoint(path)
    pl.seed_everything(0, verbose=False)
    resumed, _, rpt_resumed = run(2, ckpt_path=path, module=RecordingCNN())

    assert first.train_precisions + resumed.train_precisions == straight.train_precisions
    assert rpt_resumed.counts == rpt_straight.counts
    assert torch.equal(rpt_resumed.generator.get_state(), rpt_straight.generator.get_state())


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_resume_restores_regularizer_settings_and_refuses_others(tmp_path) -> None:
    module, trainer = _fit([LipschitzRegularization(beta=[(0, 1e-3), (1, 2e-3)]), KurtosisRegularization(lam=0.5)], epochs=1)
    path = tmp_path / "reg.ckpt"
    trainer.save_checkpoint(path)
    states = torch.load(path, weights_only=True)["callbacks"]
    assert states["LipschitzRegularization"] == {"config": {"beta": [[0, 1e-3], [1, 2e-3]], "skip": []}}
    assert states["KurtosisRegularization"] == {"config": {"lam": 0.5, "skip": [], "target": 1.8}}
    _, resumed = _fit(
        [LipschitzRegularization(beta=[(0, 1e-3), (1, 2e-3)]), KurtosisRegularization(lam=0.5)],
        epochs=2,
        ckpt_path=path,
    )
    assert resumed.callback_metrics["qsec/reg/lipschitz_coef"] == pytest.approx(2e-3)  # schedule at epoch 1
    with pytest.raises(ValueError, match="KurtosisRegularization settings"):
        _fit([KurtosisRegularization(lam=0.1)], epochs=2, ckpt_path=path)


# -- error amplification -------------------------------------------------------------------------------


def test_error_amplification_definition() -> None:
    x = torch.rand(16, 1, 8, 8)
    assert error_amplification(nn.Flatten(), x, eps=0.05, perturbation="random") == pytest.approx(1.0, rel=1e-5)
    pl.seed_everything(0, verbose=False)
    net = quantize_model(
        nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)), weight_bit_width=8, act_bit_width=8
    )
    x, y = _val_batch()
    calibrate(net, [(x, y)], num_batches=1)
    net.train()
    counters = [s.counter for _, s in stat_scalers(net)]
    ratio = error_amplification_ratio(net, x[:64], eps=0.05, targets=y[:64])
    assert 0.5 < ratio < 2.0  # at 8 bits quantization barely changes the amplification
    assert net.training and [s.counter for _, s in stat_scalers(net)] == counters
    with pytest.raises(ValueError, match="no quantized layers"):
        error_amplification_ratio(nn.Flatten(), x, eps=0.1)


class _Reversed(nn.Module):
    """Two linear layers defined in the opposite order to the one the forward pass uses."""

    def __init__(self) -> None:
        super().__init__()
        self.last = nn.Linear(32, 10)
        self.first = nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(torch.relu(self.first(x.flatten(1))))


def test_amplification_profile_is_the_normalized_distance_at_every_layer() -> None:
    torch.manual_seed(0)
    net = _Reversed()
    x = torch.rand(16, 1, 8, 8)
    profile = amplification_profile(net, x, eps=0.05, perturbation="random", seed=3)
    assert list(profile) == ["input", "first", "last", "output"]  # forward order, not definition order
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).sign()
    adv = torch.clamp(x + 0.05 * noise, 0.0, 1.0)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        a, b = a.flatten(1), b.flatten(1)
        return float(((b - a).norm(dim=1) / a.norm(dim=1)).mean())

    with torch.no_grad():
        h, h_adv = net.first(x.flatten(1)), net.first(adv.flatten(1))
        expected = {"input": rel(x, adv), "first": rel(h, h_adv), "last": rel(net(x), net(adv))}
    expected["output"] = expected["last"]
    assert profile == pytest.approx(expected, rel=1e-5)
    assert profile["output"] / profile["input"] == pytest.approx(
        error_amplification(net, x, eps=0.05, perturbation="random", seed=3), rel=1e-5
    )


def test_amplification_profile_of_a_quantized_model_leaves_it_as_it_was() -> None:
    pl.seed_everything(0, verbose=False)
    net = quantize_model(
        nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)), weight_bit_width=4, act_bit_width=4
    )
    x, y = _val_batch()
    calibrate(net, [(x, y)], num_batches=1)
    net.train()
    counters = [s.counter for _, s in stat_scalers(net)]
    profile = amplification_profile(net, x[:64], eps=0.1, targets=y[:64])
    assert list(profile) == ["input", "1", "3", "output"]
    assert all(v > 0 for v in profile.values())
    assert profile["output"] / profile["input"] == pytest.approx(
        error_amplification(net, x[:64], eps=0.1, targets=y[:64]), rel=1e-5
    )
    assert net.training and all(p.requires_grad for p in net.parameters())
    assert [s.counter for _, s in stat_scalers(net)] == counters
    with pytest.raises(ValueError, match="eps must be > 0"):
        amplification_profile(net, x, eps=0.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"eps": 0.0}, "eps must be > 0"),
        ({"eps": -0.1}, "eps must be"),
        ({"eps": 2.0}, "eps must be"),
        ({"eps": 0.1, "perturbation": "pgd"}, "perturbation must be one of 'fgsm', 'random'"),
        ({"eps": 0.1, "clip_min": 1.0, "clip_max": 0.0}, "clip_min must be smaller"),
    ],
)
def test_error_amplification_bad_arguments(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        error_amplification(nn.Flatten(), torch.rand(4, 1, 8, 8), **kwargs)


def test_error_amplification_rejects_nan() -> None:
    x = torch.rand(4, 1, 8, 8)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        error_amplification(nn.Flatten(), x, eps=0.1)


# -- bad arguments ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: LipschitzRegularization(beta=-1.0), "beta must be a finite number >= 0"),
        (lambda: LipschitzRegularization(beta=float("nan")), "beta must be"),
        (lambda: LipschitzRegularization(beta="high"), "beta must be"),
        (lambda: LipschitzRegularization(beta=True), "beta must be"),
        (lambda: LipschitzRegularization(beta=[]), "beta must be"),
        (lambda: LipschitzRegularization(beta=[(1, 0.1)]), r"got epochs \[1\]"),
        (lambda: LipschitzRegularization(beta=[(0, 0.1), (0, 0.2)]), r"got epochs \[0, 0\]"),
        (lambda: LipschitzRegularization(beta=[(0, -0.1)]), "value -0.1"),
        (lambda: LipschitzRegularization(beta=[(0.5, 0.1)]), "epoch 0.5"),
        (lambda: LipschitzRegularization(beta=[0.1]), "not an \\(epoch, value\\) pair"),
        (lambda: LipschitzRegularization(beta=1e-3, skip="fc1"), "skip must be a sequence"),
        (lambda: KurtosisRegularization(lam=-0.5), "lam must be"),
        (lambda: KurtosisRegularization(lam=1.0, target=0.5), "target must be a finite number >= 1"),
        (lambda: KurtosisRegularization(lam=1.0, target=float("inf")), "target must be"),
        (lambda: GradientL1Regularization(lam=-1), "lam must be"),
        (lambda: GradientL1Regularization(lam=0.1, loss_fn="ce"), "loss_fn must be a callable"),
        (lambda: GradientL1Regularization(lam=0.1, batch_adapter=3), "batch_adapter must be a callable"),
        (lambda: RandomPrecisionTraining(bit_widths=()), "bit_widths must name at least one precision"),
        (lambda: RandomPrecisionTraining(bit_widths=(1, 8)), "bit_widths weight bit width must be an integer from 2 to 16"),
        (lambda: RandomPrecisionTraining(bit_widths=(4, 17)), "from 2 to 16"),
        (lambda: RandomPrecisionTraining(bit_widths=("w4x8",)), "is not a precision"),
        (lambda: RandomPrecisionTraining(switchable_bn="yes"), "switchable_bn must be True or False"),
        (lambda: RandomPrecisionTraining(seed=-1), "seed must be an integer >= 0"),
        (lambda: RandomPrecisionTraining(seed=1.5), "seed must be an integer >= 0"),
    ],
)
def test_bad_arguments(factory, match) -> None:
    with pytest.raises(ValueError, match=match):
        factory()


def test_bad_arguments_found_at_setup() -> None:
    with pytest.raises(ValueError, match="skip entry 'nope' matches no conv/linear layer"):
        _fit([LipschitzRegularization(beta=1e-3, skip=["nope"])], epochs=1, limit_train_batches=1)
    with pytest.raises(RuntimeError, match="more than one stateful callback of type `KurtosisRegularization`"):
        _fit([KurtosisRegularization(lam=1.0), KurtosisRegularization(lam=2.0)], epochs=1, limit_train_batches=1)

    class Manual(UserCNN):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

    with pytest.raises(ValueError, match="needs automatic optimization"):
        _fit([GradientL1Regularization(lam=0.1)], module=Manual(), epochs=1, limit_train_batches=1)


def test_coefficient_schedule() -> None:
    c = Coefficient([(0, 0.0), (2, 0.5), (4, 1.0)], "lam")
    assert [c.at(e) for e in range(6)] == [0.0, 0.0, 0.5, 0.5, 1.0, 1.0]
    assert Coefficient(0.25, "lam").to_state() == 0.25
    assert c.to_state() == [[0, 0.0], [2, 0.5], [4, 1.0]]


# -- DDP ----------------------------------------------------------------------------------------------------

_DDP_SCRIPT = '''
import hashlib, os, sys
os.environ.setdefault("PL_DISABLE_FORK", "1")
sys.path.insert(0, sys.argv[1])
import pytorch_lightning as pl
import torch
torch.set_num_threads(1)
from conftest import UserCNN
from lightning_qsec.callbacks import QuantizationAwareTraining
from lightning_qsec.data import DigitsDataModule
from lightning_qsec.defenses import (
    GradientL1Regularization, KurtosisRegularization, LipschitzRegularization, RandomPrecisionTraining,
)
from lightning_qsec.distributed import shutdown_distributed

pl.seed_everything(0, verbose=False)
module = UserCNN()
trainer = pl.Trainer(
    accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, limit_train_batches=4, limit_val_batches=0,
    accumulate_grad_batches=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
    enable_checkpointing=False,
    callbacks=[QuantizationAwareTraining(4, 4), LipschitzRegularization(beta=1e-3), KurtosisRegularization(lam=0.1),
               GradientL1Regularization(lam=0.05), RandomPrecisionTraining()],
)
trainer.fit(module, DigitsDataModule())
digest = hashlib.sha1(torch.cat([p.detach().flatten() for p in module.parameters()]).numpy().tobytes()).hexdigest()
print(f"RESULT rank={trainer.global_rank} step={trainer.global_step} params={digest} "
      f"gl1={float(trainer.callback_metrics['qsec/reg/gradient_l1']):.6f}", flush=True)
shutdown_distributed()
'''


def test_ddp_two_processes_keep_parameters_in_sync(tmp_path) -> None:
    """Gradient-L1's extra gradient differs per rank (its batch does) and must be all-reduced."""
    from pathlib import Path

    script = tmp_path / "ddp_defenses.py"
    script.write_text(_DDP_SCRIPT)
    tests_dir = Path(__file__).parent
    proc = run_ddp_script(script, str(tests_dir), cwd=tmp_path)
    tail = (proc.stdout + proc.stderr)[-3000:]
    assert proc.returncode == 0, tail
    # Both ranks share stdout, so their lines may interleave: match the records, not lines.
    records = re.findall(r"RESULT rank=(\d+) step=(\d+) params=([0-9a-f]+) gl1=([-0-9.e]+)", proc.stdout)
    results = [dict(zip(("rank", "step", "params", "gl1"), r)) for r in records]
    assert sorted(r["rank"] for r in results) == ["0", "1"], tail
    assert {r["step"] for r in results} == {"2"}
    assert results[0]["params"] == results[1]["params"]  # ranks in sync
    assert results[0]["gl1"] != results[1]["gl1"]  # ... although each rank's term differed


# -- the papers' claim, on a network where 4-bit PTQ hurts (slow: three 10-epoch fits) -------------


@pytest.mark.slow
def test_kure_and_gradient_l1_raise_4bit_ptq_accuracy_of_a_batchnorm_cnn() -> None:
    """KURE and gradient-L1 make float training robust to 4-bit weight PTQ (MNIST-5k, seed 0).

    ``benchmarks/regularizers.py --net batchnorm`` measures the same on 3 seeds.
    """
    from lightning_qsec.data import MNIST5kDataModule
    from lightning_qsec.models import ClassificationModule, MNISTBatchNormCNN

    dm = MNIST5kDataModule(seed=0)
    dm.setup()
    x, y = dm.test_dataset.tensors
    ptq: dict[str, dict[str, float]] = {}
    variants = {
        "twin": [],
        "kure": [KurtosisRegularization(lam=1.0)],
        "gl1": [GradientL1Regularization(lam=[(0, 0.0), (5, 0.01)])],
    }
    for name, callbacks in variants.items():
        pl.seed_everything(0, verbose=False)
        module = ClassificationModule(MNISTBatchNormCNN(), lr=1e-3)
        quiet_trainer(max_epochs=10, limit_val_batches=0, callbacks=callbacks).fit(module, dm)
        ptq[name] = {"float": _accuracy(module.net, x, y)}
        for w, a in ((4, 4), (4, 8)):
            quantized = quantize_model(copy.deepcopy(module.net), weight_bit_width=w, act_bit_width=a)
            calibrate(quantized, dm.train_dataloader(), num_batches=10)
            ptq[name][f"w{w}a{a}"] = _accuracy(quantized, x, y)
    assert ptq["twin"]["float"] - ptq["twin"]["w4a8"] > 0.02, ptq  # 4-bit PTQ hurts the unregularized twin
    for name in ("kure", "gl1"):
        for precision in ("w4a4", "w4a8"):
            assert ptq[name][precision] > ptq["twin"][precision], (name, precision, ptq)
