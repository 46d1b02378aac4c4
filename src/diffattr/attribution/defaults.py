"""The attribution a user gets without options, and where each choice is measured.

Kept free of heavy imports so that the command line can show these values in ``--help``.

- Method ``das`` (``diffattr score``'s default): the best single kernel method on both LDS
  benchmarks at every K (``benchmarks/README.md``, "LDS").
- ``DEFAULT_TIMESTEPS`` K = 32: the knee of LDS against CPU cost (``benchmarks/README.md``,
  "Cost"): DAS gains ≈ 0.07 val LDS from K = 10 to 32 for ≈ 1.3× the time, and another
  ≈ 0.08 from 32 to 100 for ≈ 2.8×.
- λ: each method's ``default_ridge`` (``effective-dim:200``, ``attribution/kernel/ridge.py``).
"""

from __future__ import annotations

#: Timesteps per feature by default (``FeatureSettings.timesteps``, ``--timesteps``).
DEFAULT_TIMESTEPS = 32
