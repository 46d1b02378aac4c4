"""Deterministic random streams keyed by integers.

Every random draw in diffattr comes from a generator whose seed is derived from a tuple of
integers (for example ``(run_seed, sample_id, visit)``), never from a shared global stream.
So a sample's noise does not depend on which other samples share its batch or process.
"""

from __future__ import annotations

import numpy as np
import torch


def derive_seed(*keys: int) -> int:
    """Map a tuple of non-negative integers to a 63-bit seed (NumPy ``SeedSequence`` hashing)."""
    if any(int(k) < 0 for k in keys):
        raise ValueError(f"seed keys must be non-negative, got {keys}")
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def generator(*keys: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A fresh ``torch.Generator`` seeded by :func:`derive_seed` of ``keys``."""
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(*keys))
    return g
