"""The one place where known-harmless third-party warnings are filtered, narrowly."""

from __future__ import annotations

import warnings


def filter_known_warnings() -> None:
    """Silence warnings measured to be harmless on this stack (see README, "Warnings")."""
    # brevitas.graph imports an optional CUDA kernel package; its absence changes nothing on CPU.
    warnings.filterwarnings("ignore", message="fast_hadamard_transform package not found")
    # brevitas 0.13 imports its own deprecated brevitas.fx shim internally.
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"brevitas\.")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"brevitas\.")
    # torch 2.13 with Lightning 2.6: LeafSpec deprecation inside Lightning's own pytree use.
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=DeprecationWarning)
