"""Save and restore the collection state of activation-scale statistics.

Brevitas learns activation scales that start from running statistics gathered over the
first ``collect_stats_steps`` training forward passes. That state (a step counter, a
running buffer and the true ``value``) is not fully in the state_dict: while collection
runs the state_dict holds the buffer in place of the value, and ``load_state_dict``
ends collection. :func:`statistics_state` and :func:`load_statistics_state` carry it
exactly, so a resumed run matches an uninterrupted one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_qsec.quant.inspect import stat_scalers

__all__ = ["statistics_state", "load_statistics_state", "reset_statistics"]


def statistics_state(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per scaler: ``counter``, ``collect_stats_steps``, ``momentum``, ``buffer`` and ``value``."""
    return {
        name: {
            "counter": int(s.counter),
            "collect_stats_steps": int(s.collect_stats_steps),
            "momentum": None if s.momentum is None else float(s.momentum),
            "buffer": s.buffer.detach().cpu().clone(),
            "value": s.value.detach().cpu().clone(),
        }
        for name, s in stat_scalers(model)
    }


def load_statistics_state(model: nn.Module, state: dict[str, dict[str, Any]]) -> None:
    """Restore what :func:`statistics_state` saved; scaler names must match."""
    scalers = dict(stat_scalers(model))
    if set(scalers) != set(state):
        raise ValueError(
            "activation-statistics state does not fit this model: "
            f"missing {sorted(set(scalers) - set(state))}, unexpected {sorted(set(state) - set(scalers))}"
        )
    with torch.no_grad():
        for name, saved in state.items():
            s = scalers[name]
            s.counter = int(saved["counter"])
            s.collect_stats_steps = int(saved["collect_stats_steps"])
            s.momentum = saved["momentum"]
            s.buffer.copy_(saved["buffer"])
            s.value.copy_(saved["value"])


def reset_statistics(model: nn.Module) -> None:
    """Forget collected statistics, so that the next collection starts from scratch."""
    with torch.no_grad():
        for _, s in stat_scalers(model):
            s.counter = 0
            s.buffer.fill_(1.0)
            s.value.fill_(1.0)
