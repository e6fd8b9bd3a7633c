"""Base of the metrics whose states are sum-reduced count tensors (private).

torchmetrics' ``forward`` computes the batch value through ``compute()`` after swapping
the accumulated states for the batch's: when ``update()`` rejects a batch or ``compute()``
raises on it (a group missing from it, say), the accumulated states are lost.
:class:`CountStateMetric` replaces ``forward``: it adds the batch exactly like
``update()`` and computes the batch value from the batch's counts, ``nan`` where that
batch alone leaves the value undefined; ``compute()`` keeps its clear errors.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.distributed import gather_all_tensors
from torchmetrics.utilities.exceptions import TorchMetricsUserError

__all__ = ["CountStateMetric"]


class CountStateMetric(Metric):
    """A metric whose states are all sum-reduced count tensors.

    A subclass's ``update`` checks its arguments and adds its counts with :meth:`_add`;
    :meth:`_value` computes the result from the states (passed as keyword arguments
    named like them) and raises a ``ValueError`` or returns ``nan`` where it is
    undefined; :meth:`_undefined` is the ``nan`` result that ``forward`` returns then.
    """

    def _add(self, *counts: Tensor) -> None:
        """Add one batch's counts, one per state in the order the states were added.

        Each count goes to its state's device, so a metric kept on the CPU takes CUDA inputs.
        """
        for state, count in zip(self._states().values(), counts, strict=True):
            state += count.to(state.device)

    def _value(self, **states: Tensor) -> Any:
        raise NotImplementedError

    def _undefined(self) -> Any:
        """The result of a batch whose value is undefined: a ``nan`` scalar."""
        return torch.full((), torch.nan, device=self.device)

    def _states(self) -> dict[str, Tensor]:
        return {name: getattr(self, name) for name in self._defaults}

    def compute(self) -> Any:
        """The value over all batches and processes; where it is undefined, ``nan`` or a ``ValueError`` saying why."""
        return self._value(**self._states())

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Add one batch like :meth:`update` and return the value on this batch alone (``nan`` if undefined there).

        With ``dist_sync_on_step=True`` the batch counts of all processes are summed first.
        """
        if self._is_synced:
            raise TorchMetricsUserError(
                "The Metric shouldn't be synced when performing ``forward``. HINT: Did you forget to call ``unsync`` ?."
            )
        before = {name: state.clone() for name, state in self._states().items()}
        self.update(*args, **kwargs)
        batch = {name: state - before[name] for name, state in self._states().items()}
        if self.dist_sync_on_step and self.distributed_available_fn():
            gather = self.dist_sync_fn or gather_all_tensors
            batch = {name: torch.stack(gather(count, group=self.process_group)).sum(0) for name, count in batch.items()}
        try:
            self._forward_cache = self._value(**batch)
        except ValueError:
            self._forward_cache = self._undefined()
        return self._forward_cache
