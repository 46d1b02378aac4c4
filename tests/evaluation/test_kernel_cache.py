"""diffattr.evaluation.kernel_cache: a benchmark's kernel in Gram form, saved and reloaded,
given to methods as ScoreInputs fields; a kernel method scored from it equals the primal one."""

from __future__ import annotations

import numpy as np
import torch

from diffattr.attribution.inputs import ScoreInputs
from diffattr.attribution.kernel import Kernel, dual_gram, inner_products
from diffattr.attribution.methods import get_method
from diffattr.evaluation.kernel_cache import KernelCache, cache_inputs


def _cache(rng, n=12, t=3, k=5) -> tuple[KernelCache, np.ndarray, np.ndarray]:
    phi, tphi = rng.standard_normal((n, k)), rng.standard_normal((t, k))
    cache = KernelCache(
        dual_gram(phi), inner_products(tphi, phi), (tphi**2).sum(1),
        rng.random(n) + 0.5, rng.standard_normal(n), k, {"features": {"measure": "das"}},
    )  # fmt: skip
    return cache, phi, tphi


def test_round_trip_and_gram_fields(tmp_path):
    cache, phi, _ = _cache(np.random.default_rng(0))
    cache.save(tmp_path / "c.npz")
    back = KernelCache.load(tmp_path / "c.npz")
    np.testing.assert_allclose(back.gram, cache.gram, rtol=1e-6)
    assert back.dim == 5 and back.meta == cache.meta
    fields = back.gram_fields()
    np.testing.assert_allclose(fields["train_sqnorm"], (phi**2).sum(1), rtol=1e-5)
    assert fields["feature_dim"] == 5 and fields["target_inner"] is back.inner
    assert back.scale() > 0 and np.isfinite(back.scale())


def test_das_from_the_cache_equals_das_from_features():
    cache, phi, tphi = _cache(np.random.default_rng(1))
    images = torch.zeros(12, 1, 2, 2)
    inputs = cache_inputs(cache, images, torch.zeros(3, 1, 2, 2))
    assert isinstance(inputs, ScoreInputs) and inputs.num_train == 12
    das = get_method("das")
    [gram_form] = das.score_grid(inputs, [1.0])  # absolute λ = 1
    primal = ScoreInputs.of(
        train_features=phi, target_features=tphi, kernel=Kernel.fit(phi, 1.0),
        train_error=cache.error, num_train=12, num_targets=3,
    )  # fmt: skip
    np.testing.assert_allclose(gram_form, das.score(primal), rtol=1e-6, atol=1e-9)
