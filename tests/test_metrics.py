"""Tests for lightning_qsec.metrics and lightning_qsec.metrics.functional."""

from __future__ import annotations

import doctest
import importlib
import math
import os
import socket
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchmetrics import Metric

import lightning_qsec.metrics as metrics_pkg
from lightning_qsec.metrics import AttackSuccessRate, CleanAccuracy, QuantizationDisagreement, RobustAccuracy
from lightning_qsec.metrics.functional import (
    attack_success_rate,
    clean_accuracy,
    quantization_disagreement,
    robust_accuracy,
)

NUM_CLASSES = 5
SEEDS = [0, 1, 2, 3]


# --------------------------------------------------------------------------- references


def _np_ratio(num: int, den: int) -> float:
    return float("nan") if den == 0 else num / den


def ref_disagreement(ref: np.ndarray, quant: np.ndarray) -> float:
    return _np_ratio(int(np.sum(ref != quant)), len(ref))


def ref_robust_accuracy(adv: np.ndarray, target: np.ndarray) -> float:
    return _np_ratio(int(np.sum(adv == target)), len(target))


def ref_asr(clean: np.ndarray, adv: np.ndarray, target: np.ndarray, attack_target: Any = None) -> float:
    num = den = 0
    for i in range(len(target)):
        if attack_target is None:
            if clean[i] == target[i]:
                den += 1
                num += int(adv[i] != target[i])
        else:
            goal = attack_target if np.isscalar(attack_target) else attack_target[i]
            if target[i] != goal:
                den += 1
                num += int(adv[i] == goal)
    return _np_ratio(num, den)


def make_data(seed: int, n: int = 200) -> dict[str, torch.Tensor]:
    """Random logits for four prediction sets, correlated with the target so every rate is non-trivial."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    out: dict[str, torch.Tensor] = {"target": target}
    for name, boost in (("ref", 2.0), ("quant", 1.5), ("clean", 2.0), ("adv", 0.5)):
        logits = torch.randn(n, NUM_CLASSES, generator=g)
        logits[torch.arange(n), target] += boost
        out[name] = logits
    out["per_sample_goal"] = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    return out


def labels(x: torch.Tensor) -> np.ndarray:
    return x.argmax(1).numpy()


def assert_close(actual: torch.Tensor, expected: float) -> None:
    assert actual.ndim == 0 and actual.is_floating_point()
    if math.isnan(expected):
        assert torch.isnan(actual), f"expected nan, got {actual}"
    else:
        assert actual.item() == pytest.approx(expected, abs=1e-6)


def split_points(n: int, seed: int) -> list[int]:
    """Uneven batch boundaries, including an empty batch."""
    rng = np.random.default_rng(seed)
    cuts = sorted(rng.choice(np.arange(1, n), size=4, replace=False).tolist())
    return [0, cuts[0], cuts[0], *cuts[1:], n]


def batches(n: int, seed: int) -> list[slice]:
    pts = split_points(n, seed)
    return [slice(a, b) for a, b in zip(pts[:-1], pts[1:])]


# --------------------------------------------------------------------------- reference checks


@pytest.mark.parametrize("seed", SEEDS)
def test_disagreement_matches_reference(seed: int) -> None:
    d = make_data(seed)
    expected = ref_disagreement(labels(d["ref"]), labels(d["quant"]))
    assert 0 < expected < 1
    assert_close(quantization_disagreement(d["ref"], d["quant"]), expected)
    metric = QuantizationDisagreement()
    for s in batches(len(d["target"]), seed):
        metric.update(d["ref"][s], d["quant"][s])
    assert_close(metric.compute(), expected)
    assert metric.total.item() == len(d["target"])


@pytest.mark.parametrize("seed", SEEDS)
def test_robust_accuracy_matches_reference(seed: int) -> None:
    d = make_data(seed)
    expected = ref_robust_accuracy(labels(d["adv"]), d["target"].numpy())
    assert 0 < expected < 1
    assert_close(robust_accuracy(d["adv"], d["target"]), expected)
    metric = RobustAccuracy()
    for s in batches(len(d["target"]), seed):
        metric.update(d["adv"][s], d["target"][s])
    assert_close(metric.compute(), expected)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("goal_kind", [None, "int", "tensor0d", "per_sample"])
def test_attack_success_rate_matches_reference(seed: int, goal_kind: str | None) -> None:
    d = make_data(seed)
    clean, adv, target = d["clean"], d["adv"], d["target"]
    goal: Any
    np_goal: Any
    if goal_kind is None:
        goal = np_goal = None
    elif goal_kind == "int":
        goal = np_goal = seed % NUM_CLASSES
    elif goal_kind == "tensor0d":
        goal, np_goal = torch.tensor(seed % NUM_CLASSES), seed % NUM_CLASSES
    else:
        goal, np_goal = d["per_sample_goal"], d["per_sample_goal"].numpy()
    expected = ref_asr(labels(clean), labels(adv), target.numpy(), np_goal)
    assert 0 < expected < 1
    assert_close(attack_success_rate(clean, adv, target, attack_target=goal), expected)

    metric = AttackSuccessRate(targeted=goal is not None)
    for s in batches(len(target), seed):
        batch_goal = goal[s] if goal_kind == "per_sample" else goal
        metric.update(clean[s], adv[s], target[s], batch_goal)
    assert_close(metric.compute(), expected)


def test_forward_returns_batch_value_and_accumulates() -> None:
    d = make_data(7)
    metric = RobustAccuracy()
    halves = [slice(0, 80), slice(80, 200)]
    for s in halves:
        batch_value = metric(d["adv"][s], d["target"][s])
        assert_close(batch_value, ref_robust_accuracy(labels(d["adv"][s]), d["target"][s].numpy()))
    assert_close(metric.compute(), ref_robust_accuracy(labels(d["adv"]), d["target"].numpy()))
    metric.reset()
    assert metric.total.item() == 0 and metric.correct.item() == 0


def test_reset_keeps_targeted_flag() -> None:
    metric = AttackSuccessRate(targeted=True)
    metric.update(torch.tensor([0, 1]), torch.tensor([0, 0]), torch.tensor([0, 1]), attack_target=0)
    assert_close(metric.compute(), 1.0)
    metric.reset()
    assert metric.targeted is True
    assert metric.attempts.item() == 0


# --------------------------------------------------------------------------- logits vs indices


@pytest.mark.parametrize("seed", SEEDS[:2])
def test_logits_and_indices_agree(seed: int) -> None:
    d = make_data(seed)
    probs = {k: d[k].softmax(dim=1) for k in ("ref", "quant", "clean", "adv")}
    idx = {k: d[k].argmax(dim=1) for k in ("ref", "quant", "clean", "adv")}
    t = d["target"]
    for a in (d, probs, idx):
        for b in (d, probs, idx):
            assert torch.equal(
                quantization_disagreement(a["ref"], b["quant"]),
                quantization_disagreement(idx["ref"], idx["quant"]),
            )
            assert torch.equal(
                attack_success_rate(a["clean"], b["adv"], t), attack_success_rate(idx["clean"], idx["adv"], t)
            )
        assert torch.equal(robust_accuracy(a["adv"], t), robust_accuracy(idx["adv"], t))


def test_other_integer_dtypes_accepted() -> None:
    ref = torch.tensor([0, 1, 2, 3], dtype=torch.uint8)
    quant = torch.tensor([0, 1, 2, 0], dtype=torch.int32)
    assert_close(quantization_disagreement(ref, quant), 0.25)
    assert_close(robust_accuracy(quant, ref.to(torch.int16)), 0.75)


# --------------------------------------------------------------------------- errors


def test_preds_shape_errors_name_the_argument() -> None:
    good = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match=r"`reference_preds`.*\(N,\).*\(N, C\).*shape \(3, 2, 1\)"):
        quantization_disagreement(torch.zeros(3, 2, 1), good)
    with pytest.raises(ValueError, match=r"`quantized_preds`.*integer dtype"):
        quantization_disagreement(good, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match=r"`adv_preds`.*\(N,\).*\(N, C\)"):
        robust_accuracy(torch.tensor(1), torch.tensor([1]))
    with pytest.raises(ValueError, match=r"`clean_preds`.*C >= 2"):
        attack_success_rate(torch.zeros(3, 0), good, good)
    with pytest.raises(ValueError, match=r"`adv_preds`"):
        attack_success_rate(good, torch.tensor([True, False, True]), good)
    with pytest.raises(TypeError, match=r"`reference_preds` must be a torch.Tensor"):
        quantization_disagreement([0, 1, 2], good)  # type: ignore[arg-type]


def test_target_errors() -> None:
    preds = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match=r"`target` must be integer class indices of shape \(N,\)"):
        robust_accuracy(preds, torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"`target`.*torch.float32"):
        robust_accuracy(preds, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match=r"`target`"):
        attack_success_rate(preds, preds, torch.tensor([[0, 1, 2]]))


def test_length_and_class_mismatch_errors() -> None:
    match = r"same number of samples.*`reference_preds` has N=3.*`quantized_preds` has N=2"
    with pytest.raises(ValueError, match=match):
        quantization_disagreement(torch.tensor([0, 1, 2]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"`adv_preds` has N=2.*`target` has N=3"):
        robust_accuracy(torch.zeros(2, 4), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"`target` has N=3"):
        attack_success_rate(torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"same number of classes C.*C=4.*C=5"):
        quantization_disagreement(torch.zeros(2, 4), torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"same number of classes C"):
        attack_success_rate(torch.zeros(2, 4), torch.zeros(2, 5), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"`attack_target` has N=2"):
        x = torch.tensor([0, 1, 2])
        attack_success_rate(x, x, x, attack_target=torch.tensor([0, 1]))


def test_attack_target_errors() -> None:
    x = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match=r"`attack_target` is required"):
        AttackSuccessRate(targeted=True).update(x, x, x)
    with pytest.raises(ValueError, match=r"`attack_target` was given.*targeted=True"):
        AttackSuccessRate().update(x, x, x, attack_target=1)
    for bad in (1.0, True, torch.tensor(1.0), torch.tensor([[0, 1, 2]]), "1"):
        with pytest.raises(ValueError, match=r"`attack_target` must be"):
            attack_success_rate(x, x, x, attack_target=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`targeted` must be a bool"):
        AttackSuccessRate(targeted="yes")  # type: ignore[arg-type]


def test_metric_attributes() -> None:
    for cls, better in ((QuantizationDisagreement, False), (RobustAccuracy, True), (AttackSuccessRate, False)):
        assert cls.is_differentiable is False
        assert cls.higher_is_better is better
        assert cls.full_state_update is False
    assert {"AttackSuccessRate", "QuantizationDisagreement", "RobustAccuracy"} <= set(metrics_pkg.__all__)


def test_single_score_column_is_rejected() -> None:
    # A binary model with one logit: argmax over one column would always say class 0.
    logits = torch.tensor([[3.0], [-2.0], [4.0], [-1.0]])
    y = torch.tensor([1, 0, 1, 0])
    hint = r"C >= 2.*shape \(4, 1\).*single score column.*`\({} > 0\)\.long\(\)`.*two-column logits"
    calls = {
        "adv_preds": [lambda: robust_accuracy(logits, y), lambda: RobustAccuracy().update(logits, y)],
        "preds": [lambda: clean_accuracy(logits, y), lambda: CleanAccuracy().update(logits, y)],
        "reference_preds": [
            lambda: quantization_disagreement(logits, -logits),
            lambda: QuantizationDisagreement().update(logits, -logits),
        ],
        "clean_preds": [
            lambda: attack_success_rate(logits, -logits, y),
            lambda: AttackSuccessRate().update(logits, -logits, y),
        ],
    }
    for name, fns in calls.items():
        for fn in fns:
            with pytest.raises(ValueError, match=rf"`{name}`.*" + hint.format(name)):
                fn()
    # The labels the message suggests give the right values.
    labels_ = (logits[:, 0] > 0).long()
    assert_close(robust_accuracy(labels_, y), 1.0)
    assert_close(quantization_disagreement(labels_, (-logits[:, 0] > 0).long()), 1.0)
    assert_close(robust_accuracy(torch.cat([-logits, logits], dim=1), y), 1.0)  # two columns
    no_hint = r"C >= 2, got shape \(3, 0\) and dtype torch.float32$"  # no binary hint when C = 0
    with pytest.raises(ValueError, match=no_hint):
        robust_accuracy(torch.zeros(3, 0), torch.tensor([0, 1, 2]))


STATEFUL_CASES = {
    # metric factory, args of one batch, functional twin on that batch
    "robust_accuracy": (RobustAccuracy, lambda d, s: (d["adv"][s], d["target"][s]), robust_accuracy),
    "clean_accuracy": (CleanAccuracy, lambda d, s: (d["clean"][s], d["target"][s]), clean_accuracy),
    "disagreement": (QuantizationDisagreement, lambda d, s: (d["ref"][s], d["quant"][s]), quantization_disagreement),
    "asr": (AttackSuccessRate, lambda d, s: (d["clean"][s], d["adv"][s], d["target"][s]), attack_success_rate),
}


@pytest.mark.parametrize("name", list(STATEFUL_CASES))
def test_rejected_forward_batch_keeps_the_counts(name: str) -> None:
    cls, args, functional = STATEFUL_CASES[name]
    d = make_data(5)
    bad = (torch.tensor([0.5, 1.0]), *(a[:2] for a in args(d, slice(0, 2))[1:]))  # float 1-D preds: rejected
    metric = cls(compute_on_cpu=True)
    first = metric(*args(d, slice(0, 90)))
    assert torch.equal(first, functional(*args(d, slice(0, 90))))
    counts = {k: v.clone() for k, v in metric.metric_state.items()}
    assert all(v.item() > 0 for v in counts.values())
    with pytest.raises(ValueError, match="integer dtype"):
        metric(*bad)
    assert {k: v.item() for k, v in metric.metric_state.items()} == {k: v.item() for k, v in counts.items()}
    assert metric.compute_on_cpu is True
    second = metric(*args(d, slice(90, 200)))
    assert torch.equal(second, functional(*args(d, slice(90, 200))))
    assert torch.equal(metric.compute(), functional(*args(d, slice(0, 200))))
    assert not torch.equal(first, second)  # the batch values are the batches' own
    assert torch.isnan(metric(*args(d, slice(0, 0))))  # an empty batch: nan, counts unchanged
    assert torch.equal(metric.compute(), functional(*args(d, slice(0, 200))))


def test_forward_batch_without_attempts_is_nan_and_accumulates() -> None:
    target = torch.tensor([0, 1, 2])
    metric = AttackSuccessRate()
    assert torch.isnan(metric(torch.tensor([1, 2, 0]), target, target))  # nothing correct on clean input
    assert_close(metric(target, torch.tensor([1, 1, 0]), target), 2 / 3)
    assert (metric.successes.item(), metric.attempts.item()) == (2, 3)
    assert_close(metric.compute(), 2 / 3)


def test_attack_target_accepts_numpy_integers() -> None:
    d = make_data(3)
    clean, adv, target = d["clean"], d["adv"], d["target"]
    expected = ref_asr(labels(clean), labels(adv), target.numpy(), 2)
    assert 0 < expected < 1
    for goal in (np.int64(2), np.int32(2), np.uint8(2)):
        assert_close(attack_success_rate(clean, adv, target, attack_target=goal), expected)  # type: ignore[arg-type]
        metric = AttackSuccessRate(targeted=True)
        metric.update(clean, adv, target, attack_target=goal)  # type: ignore[arg-type]
        assert_close(metric.compute(), expected)
    for bad in (np.bool_(True), np.float64(2.0)):
        with pytest.raises(ValueError, match=r"`attack_target` must be an integer"):
            attack_success_rate(clean, adv, target, attack_target=bad)  # type: ignore[arg-type]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", list(STATEFUL_CASES))
def test_cpu_metric_takes_cuda_predictions(name: str) -> None:
    cls, args, functional = STATEFUL_CASES[name]
    d = make_data(6)
    cuda = {k: v.cuda() for k, v in d.items()}
    metric = cls()  # states stay on the CPU
    batch_value = metric(*args(cuda, slice(0, 120)))
    metric.update(*args(cuda, slice(120, 200)))
    assert all(v.device.type == "cpu" for v in metric.metric_state.values())
    assert batch_value.item() == pytest.approx(functional(*args(d, slice(0, 120))).item(), nan_ok=True)
    assert torch.equal(metric.compute(), functional(*args(d, slice(0, 200))))


# --------------------------------------------------------------------------- empty denominators


def test_empty_denominator_is_nan() -> None:
    # Untargeted: nothing classified correctly on clean input.
    target = torch.tensor([0, 1, 2])
    clean = torch.tensor([1, 2, 0])
    assert torch.isnan(attack_success_rate(clean, target, target))
    metric = AttackSuccessRate()
    metric.update(clean, target, target)
    assert torch.isnan(metric.compute())
    assert metric.attempts.item() == 0
    # A later batch with eligible samples makes it finite again.
    metric.update(target, clean, target)
    assert_close(metric.compute(), 1.0)

    # Targeted: every sample already belongs to the target class.
    same = torch.tensor([2, 2, 2])
    assert torch.isnan(attack_success_rate(same, same, same, attack_target=2))

    # Empty inputs, and no update at all.
    empty = torch.zeros(0, dtype=torch.long)
    assert torch.isnan(quantization_disagreement(empty, empty))
    assert torch.isnan(robust_accuracy(torch.zeros(0, 3), empty))
    assert torch.isnan(attack_success_rate(empty, empty, empty))
    with pytest.warns(UserWarning, match="before the ``update`` method"):
        assert torch.isnan(QuantizationDisagreement().compute())


# --------------------------------------------------------------------------- doctests


@pytest.mark.parametrize(
    "module_name",
    [
        "disagreement",
        "robust_accuracy",
        "attack_success_rate",
        "functional.disagreement",
        "functional.robust_accuracy",
        "functional.attack_success_rate",
    ],
)
def test_docstring_examples(module_name: str) -> None:
    # importlib: the functional package re-exports functions under the submodules' names.
    module = importlib.import_module(f"lightning_qsec.metrics.{module_name}")
    result = doctest.testmod(module, raise_on_error=False, verbose=False)
    assert result.attempted > 0
    assert result.failed == 0


# --------------------------------------------------------------------------- DDP

WORLD_SIZE = 2
DDP_TIMEOUT_S = 90.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ddp_results(data: dict[str, torch.Tensor], shards: list[list[tuple[int, int]]]) -> dict[str, torch.Tensor]:
    """Update every metric with the given shards (one list of ``(start, stop)`` batches per rank)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    metrics: dict[str, Metric] = {
        "disagreement": QuantizationDisagreement(),
        "robust_accuracy": RobustAccuracy(),
        "asr": AttackSuccessRate(),
        "asr_targeted": AttackSuccessRate(targeted=True),
    }
    for start, stop in shards[rank]:
        s = slice(start, stop)
        metrics["disagreement"].update(data["ref"][s], data["quant"][s])
        metrics["robust_accuracy"].update(data["adv"][s], data["target"][s])
        metrics["asr"].update(data["clean"][s], data["adv"][s], data["target"][s])
        metrics["asr_targeted"].update(
            data["clean"][s], data["adv"][s], data["target"][s], data["per_sample_goal"][s]
        )
    return {name: m.compute() for name, m in metrics.items()}


def _ddp_worker(rank: int, port: int, tmp_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=timedelta(seconds=60))
    try:
        payload = torch.load(Path(tmp_dir) / "data.pt", weights_only=True)
        results = _ddp_results(payload["data"], payload["shards"])
        torch.save(results, Path(tmp_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_compute_matches_single_process(tmp_path: Path) -> None:
    data = make_data(11, n=230)
    n = len(data["target"])
    # Uneven shards: rank 0 gets 37 samples in two batches, rank 1 the rest in three (one empty).
    shards = [[(0, 20), (20, 37)], [(37, 100), (100, 100), (100, n)]]
    torch.save({"data": data, "shards": shards}, tmp_path / "data.pt")

    ctx = mp.start_processes(
        _ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + DDP_TIMEOUT_S
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"DDP workers did not finish within {DDP_TIMEOUT_S:.0f} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)

    expected = {
        "disagreement": ref_disagreement(labels(data["ref"]), labels(data["quant"])),
        "robust_accuracy": ref_robust_accuracy(labels(data["adv"]), data["target"].numpy()),
        "asr": ref_asr(labels(data["clean"]), labels(data["adv"]), data["target"].numpy()),
        "asr_targeted": ref_asr(
            labels(data["clean"]), labels(data["adv"]), data["target"].numpy(), data["per_sample_goal"].numpy()
        ),
    }
    single = _ddp_results(data, [[(0, n)]])
    for rank in range(WORLD_SIZE):
        results = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert set(results) == set(expected)
        for name, value in expected.items():
            assert_close(results[name], value)
            assert torch.equal(results[name], single[name]), (rank, name)
    # The shards alone would give other values: the sync really happened.
    local0 = _ddp_results(data, [shards[0]])
    assert any(not torch.equal(local0[k], single[k]) for k in single)
