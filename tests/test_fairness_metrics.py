"""Group-fairness metrics: equal to fairlearn (single process and 2-process DDP), and bad input."""

from __future__ import annotations

import doctest
import importlib
import os
import socket
import time
import warnings
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchmetrics import Metric

from lightning_qsec.metrics import (
    DemographicParityDifference,
    DemographicParityRatio,
    EqualizedOddsDifference,
    EqualOpportunityDifference,
    GroupAccuracy,
    QuantizationInducedDisparity,
)
from lightning_qsec.metrics.functional import (
    demographic_parity_difference,
    demographic_parity_ratio,
    equal_opportunity_difference,
    equalized_odds_difference,
    group_accuracy,
    group_accuracy_drop,
    quantization_induced_disparity,
    selection_rate,
    worst_group_accuracy,
)

SEEDS = [0, 1, 2, 3]
TOL = 1e-6
BINARY = {
    "demographic_parity_difference": (demographic_parity_difference, DemographicParityDifference),
    "demographic_parity_ratio": (demographic_parity_ratio, DemographicParityRatio),
    "equalized_odds_difference": (equalized_odds_difference, EqualizedOddsDifference),
    "equal_opportunity_difference": (equal_opportunity_difference, EqualOpportunityDifference),
}


# --------------------------------------------------------------------------- data and references


def make_data(seed: int, n: int = 600, num_groups: int = 3, num_classes: int = 2) -> dict[str, torch.Tensor]:
    """Targets, groups and two sets of logits (float, quantized) whose quality and bias depend on the group."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, num_classes, (n,), generator=g)
    groups = torch.randint(0, num_groups, (n,), generator=g)
    out = {"target": target, "groups": groups}
    for name, boost in (("float", 1.5), ("quant", 0.9)):
        logits = torch.randn(n, num_classes, generator=g)
        logits[torch.arange(n), target] += boost * (1.0 - 0.25 * groups)  # later groups are served worse
        logits[:, -1] += 0.3 * groups  # and selected more often
        out[name] = logits
    return out


def fairlearn_reference(name: str, preds: np.ndarray, target: np.ndarray, groups: np.ndarray) -> float:
    fm = pytest.importorskip("fairlearn.metrics")
    return float(getattr(fm, name)(target, preds, sensitive_features=groups, method="between_groups"))


def fairlearn_group_accuracy(preds: np.ndarray, target: np.ndarray, groups: np.ndarray):
    fm = pytest.importorskip("fairlearn.metrics")
    from sklearn.metrics import accuracy_score

    frame = fm.MetricFrame(metrics=accuracy_score, y_true=target, y_pred=preds, sensitive_features=groups)
    return frame.by_group.to_numpy(), float(frame.group_min()), float(frame.overall)


def reference_qid(float_preds, quant_preds, target, groups) -> tuple[float, np.ndarray]:
    """Worst group accuracy drop minus overall drop, from fairlearn's per-group accuracies."""
    by_f, _, all_f = fairlearn_group_accuracy(float_preds, target, groups)
    by_q, _, all_q = fairlearn_group_accuracy(quant_preds, target, groups)
    drops = by_f - by_q
    return float(drops.max() - (all_f - all_q)), drops


def np_labels(x: torch.Tensor) -> np.ndarray:
    return x.argmax(1).numpy()


def batches(n: int, seed: int) -> list[slice]:
    """Uneven batch boundaries, including an empty batch."""
    rng = np.random.default_rng(seed)
    cuts = sorted(rng.choice(np.arange(1, n), size=4, replace=False).tolist())
    pts = [0, cuts[0], cuts[0], *cuts[1:], n]
    return [slice(a, b) for a, b in zip(pts[:-1], pts[1:])]


def close(actual: torch.Tensor, expected: float) -> None:
    assert actual.ndim == 0 and actual.is_floating_point()
    assert actual.item() == pytest.approx(expected, abs=TOL)


# --------------------------------------------------------------------------- equality with fairlearn


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", list(BINARY))
def test_binary_metrics_match_fairlearn(seed: int, name: str) -> None:
    d = make_data(seed)
    expected = fairlearn_reference(name, np_labels(d["float"]), d["target"].numpy(), d["groups"].numpy())
    assert 0 < expected < 1
    fn, cls = BINARY[name]
    # logits, probabilities and labels give the same value
    for preds in (d["float"], d["float"].softmax(1), d["float"].argmax(1)):
        close(fn(preds, d["target"], d["groups"]), expected)
    close(fn(d["float"], d["target"], d["groups"], num_groups=3), expected)
    metric = cls(num_groups=3)
    for s in batches(len(d["target"]), seed):
        metric.update(d["float"][s], d["target"][s], d["groups"][s])
    close(metric.compute(), expected)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("num_classes", [2, 4])
def test_group_accuracy_matches_fairlearn(seed: int, num_classes: int) -> None:
    d = make_data(seed, num_classes=num_classes)
    by_group, worst, _ = fairlearn_group_accuracy(np_labels(d["float"]), d["target"].numpy(), d["groups"].numpy())
    acc = group_accuracy(d["float"], d["target"], d["groups"])
    assert acc.shape == (3,)
    np.testing.assert_allclose(acc.numpy(), by_group, atol=TOL)
    close(worst_group_accuracy(d["float"], d["target"], d["groups"]), worst)
    metric = GroupAccuracy(num_groups=3)
    for s in batches(len(d["target"]), seed):
        metric.update(d["float"][s], d["target"][s], d["groups"][s])
    out = metric.compute()
    assert list(out) == ["group_0", "group_1", "group_2", "worst_group_accuracy"]
    for g in range(3):
        close(out[f"group_{g}"], by_group[g])
    close(out["worst_group_accuracy"], worst)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("num_classes", [2, 4])
def test_quantization_induced_disparity_matches_fairlearn_accuracies(seed: int, num_classes: int) -> None:
    d = make_data(seed, num_classes=num_classes)
    t, g = d["target"], d["groups"]
    expected, drops = reference_qid(np_labels(d["float"]), np_labels(d["quant"]), t.numpy(), g.numpy())
    assert expected > 0
    close(quantization_induced_disparity(d["float"], d["quant"], t, g), expected)
    close(quantization_induced_disparity(d["float"].argmax(1), d["quant"].softmax(1), t, g), expected)
    np.testing.assert_allclose(group_accuracy_drop(d["float"], d["quant"], t, g).numpy(), drops, atol=TOL)
    metric = QuantizationInducedDisparity(num_groups=3)
    for s in batches(len(t), seed):
        metric.update(d["float"][s], d["quant"][s], t[s], g[s])
    close(metric.compute(), expected)
    np.testing.assert_allclose(metric.group_drops().numpy(), drops, atol=TOL)


def test_quantization_induced_disparity_is_zero_when_groups_lose_alike() -> None:
    target = torch.tensor([1, 1, 0, 0, 1, 1, 0, 0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    quant = torch.tensor([0, 1, 0, 0, 0, 1, 0, 0])  # each group loses one of four
    assert quantization_induced_disparity(target, quant, target, groups).item() == pytest.approx(0.0)


def test_selection_rate_and_ratio_edge_cases() -> None:
    target = torch.tensor([1, 0, 1, 0])
    groups = torch.tensor([0, 0, 1, 1])
    none = torch.zeros(4, dtype=torch.long)
    assert torch.isnan(demographic_parity_ratio(none, target, groups))  # 0 / 0, as fairlearn
    assert demographic_parity_difference(none, target, groups).item() == 0.0
    np.testing.assert_allclose(selection_rate(torch.tensor([1, 1, 0, 1]), target, groups).numpy(), [1.0, 0.5])


def test_metric_attributes_and_reset() -> None:
    for cls in (GroupAccuracy, DemographicParityDifference, DemographicParityRatio, EqualizedOddsDifference,
                EqualOpportunityDifference, QuantizationInducedDisparity):
        assert cls.is_differentiable is False and cls.full_state_update is False
    assert GroupAccuracy.higher_is_better and DemographicParityRatio.higher_is_better
    assert not DemographicParityDifference.higher_is_better and not QuantizationInducedDisparity.higher_is_better
    metric = EqualizedOddsDifference(num_groups=4)
    assert metric.true_pos.shape == (4,) and metric.true_pos.dtype == torch.long
    metric.update(torch.tensor([1, 0]), torch.tensor([1, 0]), torch.tensor([0, 3]))
    metric.reset()
    assert metric.num_groups == 4 and int(metric.pos.sum()) == 0


@pytest.mark.parametrize(
    "module_name",
    [
        "group_accuracy", "demographic_parity", "equalized_odds", "quantization_induced_disparity",
        "functional.group_accuracy", "functional.demographic_parity", "functional.equalized_odds",
        "functional.quantization_induced_disparity",
    ],
)
def test_docstring_examples(module_name: str) -> None:
    module = importlib.import_module(f"lightning_qsec.metrics.{module_name}")
    result = doctest.testmod(module, raise_on_error=False, verbose=False)
    assert result.attempted > 0 and result.failed == 0


# --------------------------------------------------------------------------- bad input


def test_single_member_group_is_an_error() -> None:
    target = torch.tensor([1, 0, 1, 0, 1])
    groups = torch.tensor([0, 0, 1, 1, 2])  # group 2 has one sample
    match = r"group\(s\) \[2\] have a single sample.*\[2, 2, 1\]"
    for fn, _ in BINARY.values():
        with pytest.raises(ValueError, match=match):
            fn(target, target, groups)
    with pytest.raises(ValueError, match=match):
        group_accuracy(target, target, groups)
    with pytest.raises(ValueError, match=match):
        quantization_induced_disparity(target, target, target, groups)
    metric = DemographicParityDifference(num_groups=3)
    metric.update(target, target, groups)  # update accepts it: a later batch may add members
    with pytest.raises(ValueError, match=r"DemographicParityDifference: group\(s\) \[2\] have a single sample"):
        metric.compute()
    metric.update(target[-1:], target[-1:], groups[-1:])
    metric.compute()


def test_group_missing_is_an_error() -> None:
    target = torch.tensor([1, 0, 1, 0])
    with pytest.raises(ValueError, match=r"group label\(s\) \[1\] have no samples"):
        demographic_parity_difference(target, target, torch.tensor([0, 0, 2, 2]))  # labels 0 and 2: 1 missing
    metric = GroupAccuracy(num_groups=3)
    metric.update(target, target, torch.tensor([0, 0, 1, 1]))
    with pytest.raises(ValueError, match=r"GroupAccuracy: group label\(s\) \[2\] have no samples.*num_groups"):
        metric.compute()
    with pytest.raises(ValueError, match=r"have no samples"):
        equal_opportunity_difference(target, target, torch.tensor([0, 0, 1, 1]), num_groups=3)


def test_group_label_out_of_range_is_an_error() -> None:
    target = torch.tensor([1, 0, 1, 0])
    metric = EqualizedOddsDifference(num_groups=2)
    with pytest.raises(ValueError, match=r"`groups` has label 2, outside 0..1 for num_groups=2"):
        metric.update(target, target, torch.tensor([0, 1, 2, 1]))
    with pytest.raises(ValueError, match=r"`groups` has label -1"):
        group_accuracy(target, target, torch.tensor([0, -1, 1, 1]))
    with pytest.raises(ValueError, match=r"`groups` must be integer group labels"):
        group_accuracy(target, target, torch.tensor([0.0, 1.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match=r"`groups` must be integer group labels"):
        group_accuracy(target, target, torch.tensor([[0, 1, 1, 0]]))
    with pytest.raises(TypeError, match=r"`groups` must be a torch.Tensor"):
        group_accuracy(target, target, [0, 1, 1, 0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`target` has N=4.*`groups` has N=3"):
        demographic_parity_ratio(target, target, torch.tensor([0, 1, 1]))
    for bad in (0, -1, 2.0, True, None):
        with pytest.raises(ValueError, match=r"`num_groups` must be an integer >= 1"):
            GroupAccuracy(num_groups=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", list(BINARY))
def test_binary_only_metrics_reject_multiclass(name: str) -> None:
    fn, cls = BINARY[name]
    groups = torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match=r"binary classification only: `target` must hold 0.*found values \[0, 1, 2\]"):
        fn(torch.tensor([1, 0, 1, 0]), torch.tensor([1, 0, 2, 0]), groups)
    with pytest.raises(ValueError, match=r"binary classification only: `preds` must hold 0"):
        fn(torch.tensor([1, 3, 1, 0]), torch.tensor([1, 0, 1, 0]), groups)
    with pytest.raises(ValueError, match=r"binary classification only: `preds`.*shape \(N, 2\).*\(4, 3\)"):
        cls(num_groups=2).update(torch.zeros(4, 3), torch.tensor([1, 0, 1, 0]), groups)
    with pytest.raises(ValueError, match=r"binary classification only: `target`"):
        cls(num_groups=2).update(torch.tensor([1, 0, 1, 0]), torch.tensor([-1, 0, 1, 0]), groups)


def test_group_without_positives_is_an_error_for_rate_metrics() -> None:
    preds = torch.tensor([1, 0, 1, 0])
    target = torch.tensor([1, 0, 0, 0])  # group 1 has no positive target
    groups = torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match=r"group\(s\) \[1\] have no samples with target 1.*fairlearn"):
        equal_opportunity_difference(preds, target, groups)
    with pytest.raises(ValueError, match=r"EqualizedOddsDifference: group\(s\) \[1\] have no samples with target 1"):
        metric = EqualizedOddsDifference(num_groups=2)
        metric.update(preds, target, groups)
        metric.compute()
    with pytest.raises(ValueError, match=r"no samples with target 0"):
        equalized_odds_difference(preds, torch.tensor([1, 0, 1, 1]), groups)
    equal_opportunity_difference(preds, torch.tensor([1, 0, 1, 1]), groups)  # negatives are not needed


def test_empty_inputs_are_an_error() -> None:
    empty = torch.zeros(0, dtype=torch.long)
    for fn, _ in BINARY.values():
        with pytest.raises(ValueError, match=r"empty \(N=0\)"):
            fn(empty, empty, empty)
    with pytest.raises(ValueError, match=r"empty \(N=0\)"):
        quantization_induced_disparity(torch.zeros(0, 2), empty, empty, empty)
    metric = QuantizationInducedDisparity(num_groups=2)
    metric.update(empty, empty, empty, empty)
    with pytest.raises(ValueError, match=r"no samples were seen"):
        metric.compute()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchmetrics warns that compute comes before update
        with pytest.raises(ValueError, match=r"GroupAccuracy: no samples were seen"):
            GroupAccuracy(num_groups=2).compute()


def test_quantization_induced_disparity_input_errors() -> None:
    t, g = torch.tensor([0, 1, 0, 1]), torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match=r"same number of classes C"):
        quantization_induced_disparity(torch.zeros(4, 2), torch.zeros(4, 3), t, g)
    with pytest.raises(ValueError, match=r"`quant_preds`.*integer dtype"):
        quantization_induced_disparity(t, torch.tensor([0.0, 1.0, 0.0, 1.0]), t, g)
    with pytest.raises(ValueError, match=r"`preds` has N=4.*`target` has N=3"):
        QuantizationInducedDisparity(num_groups=2).update(t, t, t[:3], g)
    with pytest.raises(ValueError, match=r"N=3"):
        quantization_induced_disparity(t, t[:3], t, g)


# --------------------------------------------------------------------------- DDP

WORLD_SIZE = 2
DDP_TIMEOUT_S = 90.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ddp_results(data: dict[str, torch.Tensor], shards: list[list[tuple[int, int]]]) -> dict[str, torch.Tensor]:
    rank = dist.get_rank() if dist.is_initialized() else 0
    metrics: dict[str, Metric] = {name: cls(num_groups=3) for name, (_, cls) in BINARY.items()}
    metrics["group_accuracy"] = GroupAccuracy(num_groups=3)
    metrics["qid"] = QuantizationInducedDisparity(num_groups=3)
    for start, stop in shards[rank]:
        s = slice(start, stop)
        for name, metric in metrics.items():
            if name == "qid":
                metric.update(data["float"][s], data["quant"][s], data["target"][s], data["groups"][s])
            else:
                metric.update(data["float"][s], data["target"][s], data["groups"][s])
    out: dict[str, torch.Tensor] = {}
    for name, metric in metrics.items():
        value = metric.compute()
        if isinstance(value, dict):
            out.update({f"group_accuracy/{k}": v for k, v in value.items()})
        else:
            out[name] = value
    return out


def _ddp_worker(rank: int, port: int, tmp_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=timedelta(seconds=60))
    try:
        payload = torch.load(Path(tmp_dir) / "data.pt", weights_only=True)
        torch.save(_ddp_results(payload["data"], payload["shards"]), Path(tmp_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_match_fairlearn(tmp_path: Path) -> None:
    pytest.importorskip("fairlearn")
    data = make_data(11, n=430)
    n = len(data["target"])
    # Uneven shards: rank 0 gets 61 samples in two batches, rank 1 the rest in three (one empty).
    shards = [[(0, 25), (25, 61)], [(61, 200), (200, 200), (200, n)]]
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

    preds, quant = np_labels(data["float"]), np_labels(data["quant"])
    t, g = data["target"].numpy(), data["groups"].numpy()
    expected = {name: fairlearn_reference(name, preds, t, g) for name in BINARY}
    by_group, worst, _ = fairlearn_group_accuracy(preds, t, g)
    expected.update({f"group_accuracy/group_{i}": float(by_group[i]) for i in range(3)})
    expected["group_accuracy/worst_group_accuracy"] = worst
    expected["qid"] = reference_qid(preds, quant, t, g)[0]
    single = _ddp_results(data, [[(0, n)]])
    for rank in range(WORLD_SIZE):
        results = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert set(results) == set(expected)
        for name, value in expected.items():
            close(results[name], value)
            assert torch.equal(results[name], single[name]), (rank, name)
    local0 = _ddp_results(data, [shards[0]])  # the shard alone differs: the sync really happened
    assert any(not torch.equal(local0[k], single[k]) for k in single)
