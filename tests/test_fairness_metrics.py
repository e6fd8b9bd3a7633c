"""Group-fairness metrics: equal to fairlearn (single process and 2-process DDP), forward on a batch, and bad input."""

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


# --------------------------------------------------------------------------- forward on one batch

ALL = [*BINARY, "group_accuracy", "qid"]


def _metric(name: str, num_groups: int = 3) -> Metric:
    cls = {"group_accuracy": GroupAccuracy, "qid": QuantizationInducedDisparity}.get(name) or BINARY[name][1]
    return cls(num_groups=num_groups)


def _args(name: str, data: dict[str, torch.Tensor], idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
    preds = (data["float"][idx], data["quant"][idx]) if name == "qid" else (data["float"][idx],)
    return (*preds, data["target"][idx], data["groups"][idx])


def _functional(name: str, data: dict[str, torch.Tensor], idx: torch.Tensor) -> dict[str, float]:
    """The stateless value on ``data[idx]``, as a dict of floats."""
    args = _args(name, data, idx)
    if name == "group_accuracy":
        by_group = group_accuracy(*args, num_groups=3)
        out = {f"group_{g}": float(by_group[g]) for g in range(3)}
        return {**out, "worst_group_accuracy": float(worst_group_accuracy(*args, num_groups=3))}
    fn = quantization_induced_disparity if name == "qid" else BINARY[name][0]
    return {name: float(fn(*args, num_groups=3))}


def _reference(name: str, data: dict[str, torch.Tensor]) -> dict[str, float]:
    """fairlearn's value on all of ``data``, as a dict of floats."""
    preds, t, g = np_labels(data["float"]), data["target"].numpy(), data["groups"].numpy()
    if name == "group_accuracy":
        by_group, worst, _ = fairlearn_group_accuracy(preds, t, g)
        return {**{f"group_{i}": float(by_group[i]) for i in range(3)}, "worst_group_accuracy": worst}
    if name == "qid":
        return {name: reference_qid(preds, np_labels(data["quant"]), t, g)[0]}
    return {name: fairlearn_reference(name, preds, t, g)}


def _as_dict(name: str, value) -> dict[str, torch.Tensor]:
    return value if isinstance(value, dict) else {name: value}


@pytest.mark.parametrize("name", ALL)
def test_forward_on_a_batch_without_a_group_gives_nan_and_keeps_accumulating(name: str) -> None:
    pytest.importorskip("fairlearn")
    data = make_data(5, n=400)
    groups, target = data["groups"], data["target"]
    idx = torch.arange(400)
    missing = idx[(idx >= 100) & (idx < 200) & (groups != 2)]  # group 2 absent
    first2 = 200 + int((groups[200:300] == 2).nonzero()[0])
    single = idx[(idx >= 200) & (idx < 300) & ((groups != 2) | (idx == first2))]
    assert int((groups[single] == 2).sum()) == 1  # group 2 has a single member
    no_pos = idx[(idx >= 300) & ((groups != 1) | (target == 0))]  # group 1 without positive targets
    metric = _metric(name)
    metric.update(*_args(name, data, idx[:100]))
    for batch in (missing, single):
        value = _as_dict(name, metric(*_args(name, data, batch)))
        assert set(value) == set(_functional(name, data, idx[:100]))
        assert all(torch.isnan(v) for v in value.values()), (name, value)
    assert metric._to_sync and not metric._is_synced  # torchmetrics' own forward left _to_sync False here
    value = _as_dict(name, metric(*_args(name, data, no_pos)))
    if name.startswith("equal"):  # no TPR for group 1
        assert all(torch.isnan(v) for v in value.values())
    else:  # a well-defined batch: its own value, not the accumulated one
        for key, expected in _functional(name, data, no_pos).items():
            close(value[key], expected)
    used = torch.cat([idx[:100], missing, single, no_pos])
    assert torch.equal(metric.total if hasattr(metric, "total") else metric.pos + metric.neg,
                       torch.bincount(groups[used], minlength=3))
    everything = {k: v[used] for k, v in data.items()}
    accumulated = _as_dict(name, metric.compute())
    for key, expected in _reference(name, everything).items():
        close(accumulated[key], expected)
    for key, expected in _functional(name, data, used).items():
        close(accumulated[key], expected)


def test_forward_on_a_good_batch_is_its_own_value_and_update_errors_keep_the_state() -> None:
    data = make_data(6, n=300)
    idx = torch.arange(300)
    metric = DemographicParityDifference(num_groups=3)
    metric.update(*_args("demographic_parity_difference", data, idx[:150]))
    value = metric(*_args("demographic_parity_difference", data, idx[150:]))
    close(value, _functional("demographic_parity_difference", data, idx[150:])["demographic_parity_difference"])
    assert metric._forward_cache is value  # what Lightning logs for on_step
    before = metric.selected.clone(), metric.total.clone()
    with pytest.raises(ValueError, match="outside 0..2"):
        metric(data["float"][:4], data["target"][:4], torch.tensor([0, 1, 3, 1]))
    assert torch.equal(metric.selected, before[0]) and torch.equal(metric.total, before[1])
    close(metric.compute(), _functional("demographic_parity_difference", data, idx)["demographic_parity_difference"])


def test_group_drops_error_leaves_the_states_unchanged() -> None:
    target = torch.tensor([1, 0, 1, 0])
    metric = QuantizationInducedDisparity(num_groups=2)
    metric.update(target, target, target, torch.tensor([0, 0, 0, 0]))
    for _ in range(2):  # the second call would find synced states if the first had left them so
        with pytest.raises(ValueError, match=r"group label\(s\) \[1\] have no samples"):
            metric.group_drops()
        assert not metric._is_synced and metric.total.tolist() == [4, 0]
    metric.update(target, 1 - target, target, torch.tensor([1, 1, 1, 1]))
    np.testing.assert_allclose(metric.group_drops().numpy(), [0.0, 1.0])


@pytest.mark.parametrize(
    ("fn", "extra"),
    [(demographic_parity_difference, 0), (demographic_parity_ratio, 0), (selection_rate, 0),
     (equalized_odds_difference, 0), (equal_opportunity_difference, 0), (group_accuracy, 0),
     (worst_group_accuracy, 0), (quantization_induced_disparity, 1), (group_accuracy_drop, 1)],
)
def test_functional_num_groups_is_checked(fn, extra: int) -> None:
    target = torch.tensor([1, 0, 1, 0])
    args = (target,) * (2 + extra) + (torch.tensor([0, 0, 1, 1]),)
    for bad in (0, 2.5, -1, True):
        with pytest.raises(ValueError, match=r"`num_groups` must be an integer >= 1"):
            fn(*args, num_groups=bad)
    assert torch.isfinite(fn(*args, num_groups=2)).all()


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
    for i, (start, stop) in enumerate(shards[rank]):
        batch = torch.arange(start, stop)
        for name, metric in metrics.items():
            if rank == 0 and i == 0:  # forward on the batch without group 2 (nan), then group 2 by update
                without = data["groups"][batch] != 2
                assert all(torch.isnan(v) for v in _as_dict(name, metric(*_args(name, data, batch[without]))).values())
                metric.update(*_args(name, data, batch[~without]))
            else:
                metric.update(*_args(name, data, batch))
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
        data, shards = payload["data"], payload["shards"]
        results = _ddp_results(data, shards)
        # dist_sync_on_step: forward's batch value sums the batch counts of both ranks
        on_step = DemographicParityDifference(num_groups=3, dist_sync_on_step=True)
        first = [torch.arange(*shard[0]) for shard in shards]
        results["on_step"] = on_step(*_args("demographic_parity_difference", data, first[rank]))
        both = _args("demographic_parity_difference", data, torch.cat(first))
        results["on_step_expected"] = demographic_parity_difference(*both)
        # group_drops raising on the synced states (group 2 absent on both ranks) leaves them unsynced
        qid = QuantizationInducedDisparity(num_groups=3)
        local = first[rank][data["groups"][first[rank]] != 2]
        qid.update(*_args("qid", data, local))
        with pytest.raises(ValueError, match=r"group label\(s\) \[2\] have no samples"):
            qid.group_drops()
        assert not qid._is_synced and torch.equal(qid.total, torch.bincount(data["groups"][local], minlength=3))
        torch.save(results, Path(tmp_dir) / f"rank{rank}.pt")
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
        close(results.pop("on_step"), results.pop("on_step_expected").item())
        assert set(results) == set(expected)
        for name, value in expected.items():
            close(results[name], value)
            assert torch.equal(results[name], single[name]), (rank, name)
    local0 = _ddp_results(data, [shards[0]])  # the shard alone differs: the sync really happened
    assert any(not torch.equal(local0[k], single[k]) for k in single)
