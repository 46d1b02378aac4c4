from pathlib import Path

import numpy as np
import pytest
import torch

from diffattr.attribution.features.store import release_pages
from diffattr.attribution.kernel import (
    TILE_BYTES,
    Kernel,
    inner_products,
    kernel_dtype,
    read_tiles,
    tile_products,
    tile_rows,
)
from diffattr.attribution.methods import ScoreInputs, get_method
from diffattr.errors import ConfigError, NumericalError


def rng_features(n, k, seed=0):
    return np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)


@pytest.mark.parametrize("n,k", [(20, 50), (60, 12)])
def test_primal_equals_dual(n, k):
    phi, tgt = rng_features(n, k), rng_features(3, k, 1)
    p = Kernel.fit(phi, lam=0.5, form="primal", block=7)
    d = Kernel.fit(phi, lam=0.5, form="dual", block=7)
    np.testing.assert_allclose(p.cross(tgt), d.cross(tgt), rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(p.leverage(), d.leverage(), rtol=1e-8, atol=1e-10)


def test_cross_matches_direct_solve():
    phi, tgt = rng_features(15, 40), rng_features(4, 40, 2)
    lam = 0.3
    G = phi.astype(np.float64).T @ phi + lam * np.eye(40)
    direct = tgt @ np.linalg.solve(G, phi.astype(np.float64).T)
    np.testing.assert_allclose(Kernel.fit(phi, lam=lam).cross(tgt), direct, rtol=1e-8)


def test_relative_lambda_is_invariant_to_form():
    phi = rng_features(10, 30)
    assert Kernel.fit(phi, form="primal").lam == pytest.approx(Kernel.fit(phi, form="dual").lam)


def test_singular_kernel_suggests_lambda():
    phi = np.zeros((5, 8), np.float32)
    phi[:, 0] = 1.0
    with pytest.raises(NumericalError, match="not positive definite") as info:
        Kernel.fit(phi, lam=1e-300, form="dual")
    assert "increase λ" in info.value.hint


def das_inputs(phi, tgt, lam, residual=None, error=None):
    return ScoreInputs.of(
        train_features=phi,
        target_features=tgt,
        kernel=Kernel.fit(phi, lam=lam),
        train_error=error if error is not None else np.ones(len(phi)),
        train_residual=residual if residual is not None else np.ones(len(phi)),
        num_train=len(phi),
        num_targets=len(tgt),
    )


def test_das_equals_direct_formula():
    phi, tgt = rng_features(12, 30), rng_features(3, 30, 5)
    err = np.random.default_rng(1).uniform(0.5, 2.0, 12)
    lam = 0.2
    G = phi.astype(np.float64).T @ phi + lam * np.eye(30)
    direct = (tgt @ np.linalg.solve(G, phi.astype(np.float64).T)) * (err / err.mean())
    scores = get_method("das").score(das_inputs(phi, tgt, lam, error=err))
    np.testing.assert_allclose(scores, direct, rtol=1e-8)
    sq = get_method("das", squared=True).score(das_inputs(phi, tgt, lam, error=err))
    np.testing.assert_allclose(sq, direct**2, rtol=1e-8)


def test_das_with_leverage_is_the_leave_one_out_newton_step():
    """Ridge regression y ≈ Φθ: DAS(raw residual, leverage) = φ(x)ᵀ(θ₋ᵢ − θ), refit exactly."""
    rng = np.random.default_rng(3)
    n, k, lam = 25, 8, 0.7
    phi = rng.standard_normal((n, k))
    y = phi @ rng.standard_normal(k) + 0.3 * rng.standard_normal(n)
    tgt = rng.standard_normal((2, k))

    def fit(rows):
        return np.linalg.solve(phi[rows].T @ phi[rows] + lam * np.eye(k), phi[rows].T @ y[rows])

    theta = fit(np.arange(n))
    residual = phi @ theta - y  # prediction − target
    loo = np.stack([tgt @ (fit(np.setdiff1d(np.arange(n), [i])) - theta) for i in range(n)], axis=1)
    scores = get_method("das", residual="raw", leverage=True).score(
        das_inputs(phi, tgt, lam, residual=residual)
    )
    np.testing.assert_allclose(scores, loo, rtol=1e-7, atol=1e-10)


def test_baselines():
    phi, tgt = rng_features(6, 10), rng_features(2, 10, 1)
    inputs = ScoreInputs.of(
        train_features=phi,
        target_features=tgt,
        train_images=torch.from_numpy(phi.reshape(6, 1, 2, 5)),
        target_images=torch.from_numpy(tgt.reshape(2, 1, 2, 5)),
        num_train=6,
        num_targets=2,
    )
    dot = tgt.astype(np.float64) @ phi.T
    np.testing.assert_allclose(get_method("grad-dot").score(inputs), dot, rtol=1e-6)
    np.testing.assert_allclose(get_method("pixel-dot").score(inputs), dot, rtol=1e-6)
    norms = np.linalg.norm(tgt, axis=1)[:, None] * np.linalg.norm(phi, axis=1)[None]
    np.testing.assert_allclose(get_method("grad-cos").score(inputs), dot / norms, rtol=1e-5)
    np.testing.assert_allclose(get_method("pixel-cos").score(inputs), dot / norms, rtol=1e-5)
    r1 = get_method("random", seed=1).score(inputs)
    assert r1.shape == (2, 6) and np.array_equal(r1, get_method("random", seed=1).score(inputs))
    with pytest.raises(ConfigError):
        get_method("magic")


@pytest.mark.parametrize("form", ["primal", "dual"])
def test_float32_kernel_agrees_with_float64(form):
    rng = np.random.default_rng(3)
    phi, tgt = rng.standard_normal((60, 40)), rng.standard_normal((5, 40))
    exact = Kernel.fit(phi, lam=0.5, form=form, dtype="float64")
    single = Kernel.fit(phi, lam=0.5, form=form, dtype="float32", block=7)
    assert exact.dtype == np.float64 and single.dtype == np.float32
    got, want = single.cross(tgt), exact.cross(tgt)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())


def test_kernel_precision_and_tiles_follow_the_size():
    assert kernel_dtype(1024) == np.float64  # 8 MiB
    assert kernel_dtype(32768) == np.float32  # 8.6 GB in float64
    assert kernel_dtype(32768, "float64") == np.float64
    with pytest.raises(ConfigError):
        kernel_dtype(10, "float16")
    assert tile_rows(32768) * 32768 * 8 <= TILE_BYTES < (tile_rows(32768) + 1) * 32768 * 8
    assert tile_rows(10**12) == 1


def _rss_file_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
    pytest.skip("no RssFile in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_streaming_a_memmap_keeps_its_pages_out_of_the_resident_set(tmp_path):
    n, k = 2048, 4096  # 32 MiB of float32
    path = tmp_path / "features.npy"
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, k))
    arr[:] = 1.0
    arr.flush()
    release_pages(arr)
    del arr
    features = np.load(path, mmap_mode="r")
    before = _rss_file_bytes()
    total = sum(float(tile.sum()) for _, tile in read_tiles(features, block=128))  # 2 MiB tiles
    assert total == n * k
    assert _rss_file_bytes() - before < 8 << 20
    assert float(np.asarray(features).sum()) == n * k  # control: a plain read stays resident
    assert _rss_file_bytes() - before > 24 << 20


@pytest.mark.parametrize("targets", [1, 40])
def test_products_with_a_float32_store_are_the_float64_products(tmp_path, targets, monkeypatch):
    """Few targets: the tile is converted in cache-sized blocks (and an index's kernel keeps
    the store mapped); the products equal converting the whole store, to float64 rounding."""
    monkeypatch.setattr("diffattr.attribution.kernel.CONVERT_BLOCK", (3, 50))  # ragged blocks
    rng = np.random.default_rng(0)
    phi = rng.standard_normal((37, 130)).astype(np.float32)
    np.save(tmp_path / "f.npy", phi)
    mapped = np.load(tmp_path / "f.npy", mmap_mode="r")
    t = rng.standard_normal((targets, 130))
    want = t @ phi.astype(np.float64).T
    for release in (True, False):
        got = inner_products(t, mapped, block=8, release=release)
        assert got.dtype == np.float64
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(tile_products(t, phi[:5]), want[:, :5], rtol=1e-12, atol=1e-12)
    tiles = [tile for _, tile in read_tiles(mapped, 8, np.float32, release=False)]
    assert all(isinstance(tile, np.memmap) for tile in tiles)  # not copied
    kept = Kernel.fit(mapped, lam=1.0)
    kept.keep_mapped = True
    np.testing.assert_allclose(kept.cross(t), Kernel.fit(phi, lam=1.0).cross(t), rtol=1e-10)


def test_cholesky_is_taken_in_place():
    from diffattr.attribution.kernel import _factor_in_place

    a = np.random.default_rng(0).standard_normal((50, 8))
    gram = a @ a.T + np.eye(50)
    want = np.linalg.cholesky(gram)
    factor = _factor_in_place(gram)
    assert np.shares_memory(factor, gram)  # no second n×n matrix
    np.testing.assert_allclose(np.tril(factor), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("syrk_elements", [None, 33])  # 33: 3 rows per syrk call (k = 11)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_primal_gram_is_the_full_symmetric_product(dtype, syrk_elements, monkeypatch):
    from diffattr.attribution.kernel import primal_gram

    if syrk_elements:  # a tile split into several syrk updates (OpenBLAS's crash at large k)
        monkeypatch.setattr("diffattr.attribution.kernel.SYRK_MAX_ELEMENTS", syrk_elements)
    phi = np.random.default_rng(4).standard_normal((37, 11)).astype(np.float32)
    got = primal_gram(phi, block=5, dtype=dtype)
    assert got.dtype == dtype and np.array_equal(got, got.T)
    want = phi.astype(np.float64).T @ phi.astype(np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-5 if dtype == np.float32 else 1e-12)


def test_large_matrices_are_factorised_with_one_blas_thread(monkeypatch):
    """OpenBLAS's threaded Cholesky crashes on a 4 GiB matrix: from LARGE_MATRIX_BYTES on,
    factor and solves run with one BLAS thread, and give the same kernel."""
    from threadpoolctl import threadpool_info

    from diffattr.attribution.kernel import blas_threads_for

    phi = np.random.default_rng(5).standard_normal((30, 12))
    t = np.random.default_rng(6).standard_normal((2, 12))
    want = Kernel.fit(phi, lam=0.5).cross(t)
    monkeypatch.setattr("diffattr.attribution.kernel.LARGE_MATRIX_BYTES", 64)
    with blas_threads_for(np.zeros(8)):  # 64 bytes: limited
        assert all(i["num_threads"] == 1 for i in threadpool_info() if i["user_api"] == "blas")
    np.testing.assert_allclose(Kernel.fit(phi, lam=0.5).cross(t), want, rtol=1e-12)
