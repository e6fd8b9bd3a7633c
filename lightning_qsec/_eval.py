"""Run a model in eval mode inside any Lightning hook, restoring every module's mode."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["eval_mode"]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode and restore each submodule's own train/eval flag on exit.

    Eval mode freezes BatchNorm running statistics and Brevitas activation statistics,
    so evaluation forward passes never consume them.
    """
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, training in flags.items():
            module.train(training)
