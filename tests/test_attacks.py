"""lightning_qsec.attacks on a real small model: a CNN trained on digits, quantized w4a4."""

from __future__ import annotations

import copy
import itertools
import math
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_qsec import calibrate, quantize_model
from lightning_qsec.attacks import FloatView, apgd, diva, fgsm, float_quant_transfer, pgd, transfer_attack
from lightning_qsec.attacks.apgd import apgd_checkpoints
from lightning_qsec.data import DigitsDataModule
from lightning_qsec.metrics.functional import attack_success_rate, robust_accuracy
from lightning_qsec.models import DigitsCNN
from lightning_qsec.quant.statistics import statistics_state

N_EVAL = 200


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: on a shared 2-core machine two threads run these small ops ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(_one_thread):
    """A DigitsCNN trained for ~1 s in plain torch; its float copy; the w4a4 calibrated model; test data."""
    torch.manual_seed(0)
    dm = DigitsDataModule(batch_size=64, seed=0)
    dm.setup()
    net = DigitsCNN()
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(12):
        for x, y in dm.train_dataloader():
            optimizer.zero_grad()
            F.cross_entropy(net(x), y).backward()
            optimizer.step()
    float_net = copy.deepcopy(net).eval()
    untrained_float = DigitsCNN()
    untrained_float.load_state_dict(net.state_dict())
    quant = quantize_model(net, weight_bit_width=4, act_bit_width=4)
    calibrate(quant, dm.train_dataloader(), num_batches=10)
    quant.eval()
    xs, ys = zip(*dm.test_dataloader())
    x, y = torch.cat(xs)[:N_EVAL], torch.cat(ys)[:N_EVAL]
    with torch.no_grad():
        assert robust_accuracy(quant(x), y) > 0.85
        assert robust_accuracy(float_net(x), y) > 0.85
    return {"float": float_net, "quant": quant, "x": x, "y": y, "float_state": untrained_float.state_dict()}


def _acc(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(robust_accuracy(model(x), y))


def _all_attacks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str = "linf"):
    alpha = eps / 4 if eps > 0 else 0.01
    out = {
        "pgd": pgd(model, x, y, eps=eps, alpha=alpha, steps=5, norm=norm, generator=_gen()),
        "apgd": apgd(model, x, y, eps=eps, steps=5, norm=norm),
        "diva": diva(model, model, x, y, eps=eps, alpha=alpha, steps=5, norm=norm),
    }
    if norm == "linf":
        out["fgsm"] = fgsm(model, x, y, eps=eps)
    return out


def test_eps_zero_changes_nothing(setup):
    x, y = setup["x"], setup["y"]
    for norm in ("linf", "l2"):
        for name, adv in _all_attacks(setup["quant"], x, y, 0.0, norm).items():
            assert torch.equal(adv, x), (name, norm)


@pytest.mark.parametrize(("norm", "eps"), [("linf", 0.1), ("l2", 1.0)])
def test_perturbation_stays_in_ball_and_domain(setup, norm, eps):
    x, y = setup["x"], setup["y"]
    for name, adv in _all_attacks(setup["quant"], x, y, eps, norm).items():
        assert adv.shape == x.shape and adv.dtype == x.dtype and adv.device == x.device, name
        assert not adv.requires_grad, name
        delta = (adv - x).flatten(1)
        size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
        assert float(size.max()) <= eps * (1 + 1e-5) + 1e-6, (name, float(size.max()))
        assert float(size.max()) > 0.5 * eps, name  # the attack did move
        assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0, name


def test_robust_accuracy_falls_with_eps_and_pgd_beats_fgsm(setup):
    q, x, y = setup["quant"], setup["x"], setup["y"]
    rows = []
    for eps in (0.0, 0.05, 0.1, 0.2):
        acc_fgsm = _acc(q, fgsm(q, x, y, eps=eps), y)
        acc_pgd = _acc(q, pgd(q, x, y, eps=eps, alpha=max(eps, 1e-3) / 4, steps=10, generator=_gen()), y)
        rows.append((eps, acc_fgsm, acc_pgd))
    print("\nw4a4 digits robust accuracy (eps, FGSM, PGD-10):", rows)
    for (_, f0, p0), (_, f1, p1) in itertools.pairwise(rows):
        assert f1 <= f0 and p1 <= p0
    for eps, acc_fgsm, acc_pgd in rows:
        assert acc_pgd <= acc_fgsm, eps
    assert rows[-1][2] < 0.2 < rows[0][2]


def test_targeted_pgd_hits_the_target(setup):
    q, x, y = setup["quant"], setup["x"], setup["y"]
    goal = (y + 1) % 10
    adv = pgd(q, x, goal, eps=0.3, alpha=0.03, steps=20, targeted=True, generator=_gen())
    untargeted = pgd(q, x, y, eps=0.3, alpha=0.03, steps=20, generator=_gen())
    with torch.no_grad():
        clean = q(x)
        rate = float(attack_success_rate(clean, q(adv), y, attack_target=goal))
        by_chance = float(attack_success_rate(clean, q(untargeted), y, attack_target=goal))
    print(f"\nPGD-20 eps=0.3 reaching class y+1: targeted {rate:.3f}, untargeted {by_chance:.3f}")
    assert rate >= 0.5
    assert rate >= by_chance + 0.3


def test_apgd_is_at_least_as_strong_as_pgd(setup):
    q, x, y = setup["quant"], setup["x"], setup["y"]
    for norm, eps in (("linf", 0.1), ("l2", 1.0)):
        acc_pgd = _acc(q, pgd(q, x, y, eps=eps, alpha=eps / 4, steps=20, norm=norm, generator=_gen()), y)
        acc_apgd = _acc(q, apgd(q, x, y, eps=eps, steps=20, norm=norm, seed=0), y)
        print(f"\n{norm} eps={eps}: PGD-20 {acc_pgd:.3f}, APGD-CE-20 {acc_apgd:.3f}")
        assert acc_apgd <= acc_pgd + 0.01


def test_apgd_checkpoints_follow_the_paper():
    assert apgd_checkpoints(100) == [0, 22, 41, 57, 70, 80, 87, 93, 99]
    assert apgd_checkpoints(1)[0] == 0


def _evasion_rate(float_model: nn.Module, quant: nn.Module, adv: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of samples where the float model is right and the quantized one wrong."""
    with torch.no_grad():
        right = float_model(adv).argmax(1) == y
        wrong = quant(adv).argmax(1) != y
    return float((right & wrong).float().mean())


def test_diva_fools_quantized_but_not_float_more_than_pgd(setup):
    q, fl, x, y = setup["quant"], setup["float"], setup["x"], setup["y"]
    eps = 0.1
    adv_pgd = pgd(q, x, y, eps=eps, alpha=eps / 4, steps=20, generator=_gen())
    adv_diva = diva(q, q, x, y, eps=eps, alpha=eps / 10, steps=20)
    adv_twin = diva(fl, q, x, y, eps=eps, alpha=eps / 10, steps=20)  # a separate float model
    rate_pgd = _evasion_rate(FloatView(q), q, adv_pgd, y)
    rate_diva = _evasion_rate(FloatView(q), q, adv_diva, y)
    rate_twin = _evasion_rate(fl, q, adv_twin, y)
    print(f"\neps={eps} float right & quant wrong: PGD-20 {rate_pgd:.3f}, DIVA-20 {rate_diva:.3f} (float twin {rate_twin:.3f})")
    assert rate_diva >= rate_pgd
    assert rate_diva >= 0.15
    assert abs(rate_twin - rate_diva) <= 0.02  # float_mode(q) is the float model


def _bn_model(float_state_source: dict | None = None) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 16, 32),
        nn.Dropout(0.5),
        nn.ReLU(),
        nn.Linear(32, 10),
    )


def _snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "stats": statistics_state(model),
        "training": {n: m.training for n, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grad": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
    }


def _assert_same(before: dict, after: dict) -> None:
    assert before["training"] == after["training"]
    assert before["requires_grad"] == after["requires_grad"]
    for name, grad in before["grad"].items():
        other = after["grad"][name]
        assert (grad is None and other is None) or torch.equal(grad, other), name
    assert before["state"].keys() == after["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(value, after["state"][key]), key
    for name, stats in before["stats"].items():
        for field, value in stats.items():
            other = after["stats"][name][field]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, (name, field)


def test_modes_grads_and_statistics_are_restored(setup):
    """A model still collecting Brevitas statistics, with BatchNorm, in train mode: attacks touch nothing."""
    x, y = setup["x"][:64], setup["y"][:64]
    model = quantize_model(_bn_model(), weight_bit_width=4, act_bit_width=4)  # not calibrated: collecting
    model.train()
    model[6].eval()  # mixed flags are restored one by one
    model[0].bias.requires_grad_(False)
    model[5].weight.grad = torch.full_like(model[5].weight, 0.5)
    before = _snapshot(model)
    assert before["stats"] and all(s["counter"] == 0 for s in before["stats"].values())

    _all_attacks(model, x, y, 0.1)
    _all_attacks(model, x, y, 1.0, "l2")
    diva(FloatView(model), model, x, y, eps=0.1, alpha=0.02, steps=3)
    float_quant_transfer(model, x, y, attack="pgd", eps=0.1, alpha=0.02, steps=3)
    with torch.inference_mode():
        pgd(model, x, y, eps=0.1, alpha=0.02, steps=3)
    _assert_same(before, _snapshot(model))

    # the check is sensitive: one train-mode forward consumes statistics and BN running stats
    model(x)
    after_train_forward = _snapshot(model)
    with pytest.raises(AssertionError):
        _assert_same(before, after_train_forward)


def test_attacks_work_inside_inference_mode(setup):
    q, x, y = setup["quant"], setup["x"][:64], setup["y"][:64]
    expected = _all_attacks(q, x, y, 0.1)
    with torch.inference_mode():
        xi, yi = x.clone(), y.clone()  # inference tensors, as in a validation step
        assert xi.is_inference()
        got = _all_attacks(q, xi, yi, 0.1)
        both = float_quant_transfer(q, xi, yi, attack="fgsm", eps=0.1)
    for name in expected:
        assert not got[name].is_inference(), name
        assert torch.equal(got[name], expected[name]), name
    assert 0.0 <= both.quant_to_float.target_robust_accuracy <= 1.0
    with torch.no_grad():  # also under no_grad
        assert torch.equal(fgsm(q, x, y, eps=0.1), expected["fgsm"])


def test_attacks_are_deterministic(setup):
    q, x, y = setup["quant"], setup["x"][:64], setup["y"][:64]
    a = pgd(q, x, y, eps=0.1, alpha=0.02, steps=3, generator=_gen(7))
    b = pgd(q, x, y, eps=0.1, alpha=0.02, steps=3, generator=_gen(7))
    c = pgd(q, x, y, eps=0.1, alpha=0.02, steps=3, generator=_gen(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(3)
    d = pgd(q, x, y, eps=0.1, alpha=0.02, steps=3)
    torch.manual_seed(3)
    assert torch.equal(d, pgd(q, x, y, eps=0.1, alpha=0.02, steps=3))
    assert torch.equal(apgd(q, x, y, eps=0.1, steps=5, seed=1), apgd(q, x, y, eps=0.1, steps=5, seed=1))
    assert torch.equal(
        diva(q, q, x, y, eps=0.1, alpha=0.02, steps=3, random_start=True, generator=_gen(2)),
        diva(q, q, x, y, eps=0.1, alpha=0.02, steps=3, random_start=True, generator=_gen(2)),
    )


class _CountingModel(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.model(x)


def test_one_forward_per_step(setup):
    """PGD costs one forward (and one backward) per step, nothing more."""
    counting = _CountingModel(setup["quant"])
    x, y = setup["x"][:32], setup["y"][:32]
    pgd(counting, x, y, eps=0.1, alpha=0.02, steps=7)
    assert counting.calls == 7
    counting.calls = 0
    fgsm(counting, x, y, eps=0.1)
    assert counting.calls == 1
    counting.calls = 0
    apgd(counting, x, y, eps=0.1, steps=7)
    assert counting.calls <= 1 + 1 + 7  # clean check, start point, one per step


def _diva_same_module(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return diva(model, model, x, y, eps=0.1, alpha=0.01, steps=1)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda m, x, y: pgd(m, x, y, eps=-0.1, alpha=0.01, steps=1), r"eps must be a finite number in \[0, 1\]"),
        (lambda m, x, y: pgd(m, x, y, eps=float("nan"), alpha=0.01, steps=1), "eps"),
        (lambda m, x, y: pgd(m, x, y, eps=1.5, alpha=0.01, steps=1), "eps.*input domain"),
        (lambda m, x, y: pgd(m, x, y, eps=100.0, alpha=0.01, steps=1, norm="l2"), "eps.*norm='l2'"),
        (lambda m, x, y: fgsm(m, x, y, eps=-1), "eps"),
        (lambda m, x, y: apgd(m, x, y, eps=2.0), "eps"),
        (lambda m, x, y: pgd(m, x, y, eps=0.1, alpha=0.01, steps=0), "steps must be an integer >= 1"),
        (lambda m, x, y: pgd(m, x, y, eps=0.1, alpha=0.01, steps=2.0), "steps"),
        (lambda m, x, y: apgd(m, x, y, eps=0.1, steps=0), "steps"),
        (lambda m, x, y: pgd(m, x, y, eps=0.1, alpha=0.0, steps=1), "alpha must be a finite number > 0"),
        (lambda m, x, y: pgd(m, x, y, eps=0.1, alpha=-1, steps=1), "alpha"),
        (lambda m, x, y: pgd(m, x, y, eps=0.1, alpha=0.01, steps=1, norm="l1"), "norm must be one of 'linf', 'l2'"),
        (lambda m, x, y: apgd(m, x, y, eps=0.1, norm="L2"), "norm"),
        (lambda m, x, y: apgd(m, x, y, eps=0.1, n_restarts=0), "n_restarts"),
        (lambda m, x, y: apgd(m, x, y, eps=0.1, rho=1.5), "rho"),
        (lambda m, x, y: diva(m, m, x, y, eps=0.1, alpha=0.01, steps=1, c=-1.0), "c must be"),
        (lambda m, x, y: diva(m, m, x, y, eps=0.1, alpha=0.01, steps=1, loss="kl"), "loss must be"),
        (lambda m, x, y: pgd(m, x, y, eps=0.1, alpha=0.01, steps=1, clip_min=1.0, clip_max=0.0), "clip_min"),
        (lambda m, x, y: _diva_same_module(nn.Flatten(), x, y), "no quantized"),
        (lambda m, x, y: fgsm(m, x * float("nan"), y, eps=0.1), "inputs contain NaN"),
        (lambda m, x, y: fgsm(m, x + 2.0, y, eps=0.1), r"inputs must lie in the input domain"),
        (lambda m, x, y: fgsm(m, x, y[:-1], eps=0.1), "same number of samples"),
        (lambda m, x, y: fgsm(m, x, y.float(), eps=0.1), "targets must be integer class indices"),
        (lambda m, x, y: fgsm(m, (x * 16).long(), y, eps=0.1), "inputs must be a floating-point tensor"),
        (lambda m, x, y: fgsm(m, x, y + 10, eps=0.1), r"targets must be class indices in \[0, 10\)"),
        (lambda m, x, y: fgsm(nn.Identity(), x, y, eps=0.1), r"logits of shape \(N, C\)"),
        (lambda m, x, y: transfer_attack(m, m, x, y, attack="cw"), "attack must be one of"),
    ],
)
def test_bad_arguments_get_clear_errors(setup, call, match):
    with pytest.raises(ValueError, match=match):
        call(setup["quant"], setup["x"][:8], setup["y"][:8])


def test_dtype_and_empty_batches():
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).double()
    x, y = torch.rand(6, 1, 8, 8, dtype=torch.float64), torch.arange(6)
    for adv in (
        fgsm(net, x, y, eps=0.1),
        pgd(net, x, y, eps=0.1, alpha=0.02, steps=2, generator=_gen()),
        apgd(net, x, y, eps=0.1, steps=2),
        diva(copy.deepcopy(net), net, x, y, eps=0.1, alpha=0.02, steps=2),
    ):
        assert adv.dtype == torch.float64 and adv.shape == x.shape
    for targets in (y.int(), y.to(torch.uint8)):  # any integer class indices, as with int64
        assert torch.equal(pgd(net, x, targets, eps=0.1, alpha=0.02, steps=2, generator=_gen()),
                           pgd(net, x, y, eps=0.1, alpha=0.02, steps=2, generator=_gen()))
        assert torch.equal(fgsm(net, x, targets, eps=0.1), fgsm(net, x, y, eps=0.1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # inputs that require grad are checked without a warning
        fgsm(net, x.clone().requires_grad_(True), y, eps=0.1)
    empty_x, empty_y = x[:0], y[:0]
    assert pgd(net, empty_x, empty_y, eps=0.1, alpha=0.02, steps=2).shape == empty_x.shape
    assert apgd(net, empty_x, empty_y, eps=0.1, steps=2).shape == empty_x.shape


def test_generator_must_be_a_generator(setup):
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        pgd(setup["quant"], setup["x"][:8], setup["y"][:8], eps=0.1, alpha=0.01, steps=1, generator=0)


def test_model_that_masks_gradients_warns(setup):
    class Detached(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x.detach())

    x, y = setup["x"][:8], setup["y"][:8]
    with pytest.warns(RuntimeWarning, match="gradient masking"):
        adv = pgd(Detached(setup["quant"]), x, y, eps=0.1, alpha=0.01, steps=2, random_start=False)
    assert torch.equal(adv, x)


def test_transfer_between_float_and_quantized(setup):
    q, fl, x, y = setup["quant"], setup["float"], setup["x"], setup["y"]
    both = float_quant_transfer(q, x, y, attack="pgd", eps=0.1, alpha=0.025, steps=10, generator=_gen())
    again = float_quant_transfer(q, x, y, attack="pgd", eps=0.1, alpha=0.025, steps=10, generator=_gen())
    assert both.float_to_quant.as_dict() == again.float_to_quant.as_dict()
    twin = transfer_attack(fl, q, x, y, attack="pgd", eps=0.1, alpha=0.025, steps=10, generator=_gen())
    for label, result in (("float->quant", both.float_to_quant), ("quant->float", both.quant_to_float), ("twin", twin)):
        numbers = result.as_dict()
        print(f"\n{label}: " + ", ".join(f"{k}={v:.3f}" for k, v in numbers.items() if k != "num_samples"))
        assert numbers["num_samples"] == N_EVAL
        for key, value in numbers.items():
            if key != "num_samples":
                assert 0.0 <= value <= 1.0 and not math.isnan(value), key
        assert result.adversarial.shape == x.shape
        # white-box on the source is at least as strong as the transfer to the target
        assert result.source_robust_accuracy <= result.target_robust_accuracy + 0.05
    assert both.float_to_quant.source_clean_accuracy == pytest.approx(_acc(fl, x, y))


def test_pgd_matches_an_independent_reference(setup):
    """torchattacks.PGD when installed (an optional dev dependency), else a textbook loop."""
    q, x, y = setup["quant"], setup["x"], setup["y"]
    torchattacks = pytest.importorskip("torchattacks")
    for eps in (0.05, 0.1, 0.2):
        alpha, steps = eps / 4, 10
        ours = _acc(q, pgd(q, x, y, eps=eps, alpha=alpha, steps=steps, random_start=False), y)
        theirs = _acc(q, torchattacks.PGD(q, eps=eps, alpha=alpha, steps=steps, random_start=False)(x, y), y)
        print(f"\neps={eps}: robust accuracy ours {ours:.3f}, torchattacks {theirs:.3f}")
        assert ours <= theirs + 0.01


def _madry_reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float, steps: int):
    """The textbook L-infinity PGD loop (Madry et al. 2018), written independently of ours."""
    model.eval()
    delta = torch.zeros_like(x, requires_grad=True)
    for _ in range(steps):
        loss = nn.CrossEntropyLoss()(model(x + delta), y)
        loss.backward()
        with torch.no_grad():
            delta += alpha * delta.grad.sign()
            delta.clamp_(-eps, eps)
            delta.copy_((x + delta).clamp(0, 1) - x)
        delta.grad.zero_()
    model.zero_grad(set_to_none=True)
    return (x + delta).detach()


def test_pgd_matches_textbook_loop(setup):
    q, x, y = setup["quant"], setup["x"], setup["y"]
    model = copy.deepcopy(q)  # the textbook loop writes parameter .grad
    for eps in (0.05, 0.1):
        ours = _acc(q, pgd(q, x, y, eps=eps, alpha=eps / 4, steps=10, random_start=False), y)
        ref = _acc(q, _madry_reference(model, x, y, eps, eps / 4, 10), y)
        print(f"\neps={eps}: robust accuracy ours {ours:.3f}, textbook loop {ref:.3f}")
        assert ours <= ref + 0.01
