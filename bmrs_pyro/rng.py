"""Every random state a training run draws from, captured and restored as one dict.

``fit`` draws from torch's global generator (Pyro samples through it, on CPU and CUDA), a
``torch.Generator`` of its own for the order of the minibatches, and -- through user code or
libraries -- Python's ``random`` and NumPy's legacy global generator. :func:`capture_rng` takes
all of them at an epoch boundary; a checkpoint stores the result, and :func:`restore_rng` puts
them back so the resumed epochs draw exactly the numbers the uninterrupted run would have drawn.
"""

from __future__ import annotations

import random
from typing import Any, Optional

import numpy as np
import torch

__all__ = ["capture_rng", "restore_rng"]


def _cuda_ready() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def capture_rng(generator: Optional[torch.Generator] = None) -> dict:
    """The states of torch (CPU and every initialised CUDA device), NumPy, Python and ``generator``."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "cuda": [s.cpu() for s in torch.cuda.get_rng_state_all()] if _cuda_ready() else None,
        "data_order": generator.get_state() if generator is not None else None,
    }
    return state


def restore_rng(state: dict, generator: Optional[torch.Generator] = None) -> None:
    """Put back the states of :func:`capture_rng` (``generator`` gets the saved data order).

    Raises ValueError for a dict that is not a captured state.
    """
    if not isinstance(state, dict) or "torch" not in state:
        raise ValueError("not a random state captured by bmrs_pyro.rng.capture_rng")
    torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
    if state.get("numpy") is not None:
        np.random.set_state(state["numpy"])
    if state.get("python") is not None:
        py = state["python"]
        random.setstate((py[0], tuple(py[1]), py[2]) if isinstance(py, (list, tuple)) else py)
    if state.get("cuda") is not None and torch.cuda.is_available():
        saved = state["cuda"]
        for i in range(min(len(saved), torch.cuda.device_count())):
            torch.cuda.set_rng_state(torch.as_tensor(saved[i], dtype=torch.uint8).cpu(), i)
    if generator is not None and state.get("data_order") is not None:
        generator.set_state(torch.as_tensor(state["data_order"], dtype=torch.uint8).cpu())
