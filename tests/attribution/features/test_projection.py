"""Random projections: determinism, chunk/batch invariance, scale (E[PPᵀ] = I) and JL behaviour."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from diffattr.attribution.features.projection import (
    DenseProjector,
    IdentityProjector,
    SparseProjector,
    make_projector,
)
from diffattr.errors import ConfigError

KINDS = ["gaussian", "rademacher", "countsketch", "sparse-jl"]
DENSE = ["gaussian", "rademacher"]
SRC = str(Path(__file__).resolve().parents[3] / "src")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls on a shared, busy machine spend ms per call syncing OpenMP threads; and
    MKL results can depend on the thread count, so the cross-process check pins it too."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _grads(batch: int, dim: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed))


def _small(kind: str, seed: int = 3, p: int = 1000, k: int = 96, **opts) -> object:
    if kind in DENSE:
        opts.setdefault("block_rows", 64)
    return make_projector(kind, p, k, seed=seed, **opts)


# -- identity and option errors --------------------------------------------------------------------


def test_identity_returns_input_as_float32() -> None:
    g = _grads(4, 50).double()
    for kind in ("identity", "none"):
        proj = make_projector(kind, 50, None)
        assert isinstance(proj, IdentityProjector)
        out = proj.project(g)
        assert out.dtype == torch.float32 and torch.equal(out, g.float())
        assert proj.output_dim == 50
        assert proj.describe()["kind"] == "identity"
    assert make_projector("identity", 50, 50).output_dim == 50


@pytest.mark.parametrize(
    ("args", "options", "match"),
    [
        (("svd", 100, 10), {}, "unknown projection kind"),
        (("gaussian", 100, 100), {}, "not smaller"),
        (("rademacher", 100, 200), {}, "not smaller"),
        (("countsketch", 100, 100), {}, "not smaller"),
        (("rademacher", 100, None), {}, "needs an output dimension"),
        (("identity", 100, 10), {}, "identity projection"),
        (("gaussian", 100, 10), {"nnz": 2}, "does not take"),
        (("countsketch", 100, 10), {"chunk_rows": 64}, "does not take"),
        (("rademacher", 100, 10), {"block_rows": 64, "chunk_rows": 100}, "multiple"),
        (("countsketch", 100, 10), {"nnz": 2}, "exactly one"),
        (("sparse-jl", 100, 4), {"nnz": 8}, "exceeds"),
        (("rademacher", 100, 0), {}, "output_dim"),
        (("rademacher", 100, 10, -1), {}, "seed"),
    ],
)
def test_make_projector_errors(args: tuple, options: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        make_projector(*args, **options)
    assert info.value.hint


def test_unknown_kind_lists_kinds() -> None:
    with pytest.raises(ConfigError) as info:
        make_projector("svd", 100, 10)
    for kind in KINDS + ["identity"]:
        assert kind in info.value.hint


def test_bad_gradients() -> None:
    proj = _small("rademacher")
    with pytest.raises(ConfigError, match="do not match"):
        proj.project(torch.zeros(2, 999))
    with pytest.raises(ConfigError, match="floating"):
        proj.project(torch.zeros(2, 1000, dtype=torch.int64))


# -- the matrix itself (project the identity to read P) ------------------------------------------


def _matrix(proj) -> torch.Tensor:
    return proj.project(torch.eye(proj.input_dim))


def test_rademacher_entries_are_signs() -> None:
    for p, k in ((300, 96), (100, 37)):  # 37: a block's bit count is not a multiple of 8
        P = _matrix(make_projector("rademacher", p, k, seed=1, block_rows=10))
        assert torch.equal(P.abs(), torch.full_like(P, 1 / math.sqrt(k)))
        assert abs((P > 0).float().mean().item() - 0.5) < 0.03


def test_gaussian_entries_moments() -> None:
    P = _matrix(make_projector("gaussian", 400, 256, seed=1)) * math.sqrt(256)
    assert abs(P.mean().item()) < 0.02 and abs(P.std().item() - 1) < 0.02


@pytest.mark.parametrize(("kind", "nnz"), [("countsketch", 1), ("sparse-jl", 4), ("sparse-jl", 3)])
def test_sparse_structure(kind: str, nnz: int) -> None:
    p, k = 2000, 50
    proj = make_projector(kind, p, k, seed=2, **({"nnz": nnz} if kind == "sparse-jl" else {}))
    P = _matrix(proj)
    nonzero = P != 0
    assert torch.equal(nonzero.sum(1), torch.full((p,), nnz))
    assert torch.equal(P[nonzero].abs(), torch.full((p * nnz,), 1 / math.sqrt(nnz)))
    bounds = [i * k // nnz for i in range(nnz + 1)]
    for i in range(nnz):  # one bucket in each of the nnz slices
        assert torch.equal(nonzero[:, bounds[i] : bounds[i + 1]].sum(1), torch.ones(p).long())
    # buckets roughly uniform, signs balanced
    assert nonzero.sum(0).min() > 0.5 * p * nnz / k
    assert abs((P > 0).sum().item() / (p * nnz) - 0.5) < 0.05


# -- determinism and invariance --------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_deterministic_and_seeded(kind: str) -> None:
    g = _grads(5, 1000)
    a = _small(kind, seed=3).project(g)
    b = _small(kind, seed=3).project(g)
    c = _small(kind, seed=4).project(g)
    assert a.dtype == torch.float32 and a.shape == (5, 96)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c, rtol=0.1, atol=0.1)


@pytest.mark.parametrize("kind", DENSE)
def test_dense_chunking_does_not_change_result(kind: str) -> None:
    g = _grads(6, 1000)  # 1000 = 15 full blocks of 64 + a partial one
    ref = _small(kind, chunk_rows=64).project(g)
    for opts in (
        {"chunk_rows": 256},
        {"chunk_rows": 64 * 40},
        {},
        {"chunk_rows": 128, "workers": 2},
        {"cache_bytes": 10**9},
    ):
        proj = _small(kind, **opts)
        assert torch.equal(proj.project(g), ref), opts
        assert torch.equal(proj.project(g), ref), opts  # again (cached when cache_bytes allows)


def test_dense_cache_only_within_budget() -> None:
    g = _grads(2, 1000)
    big = _small("rademacher", cache_bytes=1000 * 96 * 4)
    small = _small("rademacher", cache_bytes=1000 * 96 * 4 - 1)
    big.project(g)
    small.project(g)
    assert big._cache is not None and len(big._cache) == 16
    assert small._cache is None


@pytest.mark.parametrize("kind", ["countsketch", "sparse-jl"])
def test_sparse_chunking_does_not_change_result(kind: str) -> None:
    g = _grads(40, 1000)  # more than one pass of rows
    ref = _small(kind).project(g)
    for chunk in (1, 7, 100, 1000, 5000):
        assert torch.equal(_small(kind, chunk_size=chunk).project(g), ref), chunk


@pytest.mark.parametrize("kind", KINDS)
def test_batch_size_invariance_and_dtypes(kind: str) -> None:
    g = _grads(7, 1000)
    proj = _small(kind)
    full = proj.project(g)
    rows = torch.cat([proj.project(g[i : i + 1]) for i in range(len(g))])
    torch.testing.assert_close(rows, full, rtol=1e-5, atol=1e-5)
    if kind not in DENSE:  # rows are computed independently: exactly equal
        assert torch.equal(rows, full)
    torch.testing.assert_close(proj.project(g.double()), full, rtol=1e-5, atol=1e-5)
    half = proj.project(g.bfloat16())
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, proj.project(g.bfloat16().float()))
    # non-contiguous input, gradients that require grad, empty batch
    torch.testing.assert_close(proj.project(g.T.contiguous().T), full, rtol=1e-5, atol=1e-5)
    assert not proj.project(g.clone().requires_grad_(True)).requires_grad
    assert proj.project(g[:0]).shape == (0, 96)


def test_deterministic_across_processes(tmp_path: Path) -> None:
    code = textwrap.dedent(
        f"""
        import sys
        import numpy as np, torch
        sys.path.insert(0, {SRC!r})
        from diffattr.attribution.features.projection import make_projector
        torch.set_num_threads(1)
        g = torch.randn(5, 1000, generator=torch.Generator().manual_seed(0))
        for kind in {KINDS!r}:
            opts = {{"block_rows": 64}} if kind in ("gaussian", "rademacher") else {{}}
            proj = make_projector(kind, 1000, 96, seed=3, **opts)
            np.save(sys.argv[1] + "/" + kind + ".npy", proj.project(g).numpy())
        """
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, timeout=120)
    g = _grads(5, 1000)
    for kind in KINDS:
        other = np.load(tmp_path / f"{kind}.npy")
        assert np.array_equal(other, _small(kind).project(g).numpy()), kind


# -- describe -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_describe(kind: str) -> None:
    proj = _small(kind, seed=5)
    info = proj.describe()
    json.dumps(info)
    assert info["kind"] == kind and info["seed"] == 5
    assert info["input_dim"] == 1000 and info["output_dim"] == 96
    assert not {"chunk_rows", "chunk_size", "workers", "cache_bytes"} & set(info)
    if kind in DENSE:
        assert info["block_rows"] == 64
        assert _small(kind, seed=5, chunk_rows=128, workers=2).describe() == info
        other = _small(kind, seed=5, block_rows=32)
        assert other.describe() != info
        assert not torch.equal(other.project(_grads(2, 1000)), proj.project(_grads(2, 1000)))
    else:
        assert info["nnz"] == (1 if kind == "countsketch" else 4)
        assert _small(kind, seed=5, chunk_size=10).describe() == info
    assert repr(proj).startswith(type(proj).__name__)


def test_constructors_directly() -> None:
    dense = DenseProjector(300, 20, seed=1, kind="gaussian", block_rows=100)
    assert dense.describe()["rng_device"] == "cpu"
    sparse = SparseProjector(300, 20, seed=1, kind="sparse-jl", nnz=2)
    buckets, signs = sparse.tables()
    assert buckets.dtype == torch.int32 and buckets.shape == (300, 2)
    assert signs.dtype == torch.int8 and set(signs.unique().tolist()) == {-1, 1}
    with pytest.raises(ConfigError):
        DenseProjector(300, 20, seed=1, kind="countsketch")
    with pytest.raises(ConfigError):
        SparseProjector(300, 20, seed=1, kind="gaussian")


# -- Johnson-Lindenstrauss behaviour --------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_jl_norms_and_inner_products(kind: str) -> None:
    p, k = 5000, 2048
    x = _grads(20, p, seed=11)
    x[10:] *= torch.rand(10, p, generator=torch.Generator().manual_seed(1)) ** 4  # uneven mass
    proj = make_projector(kind, p, k, seed=7)
    y = proj.project(x)
    ratio = y.norm(dim=1) / x.norm(dim=1)
    assert (ratio - 1).abs().max() < 0.15
    assert 0.9 < (ratio**2).mean() < 1.1
    gram_x, gram_y = x @ x.T, y @ y.T
    norms = x.norm(dim=1)
    assert ((gram_y - gram_x).abs() / torch.outer(norms, norms)).max() < 0.15


@pytest.mark.parametrize("kind", KINDS)
def test_unbiased_over_seeds(kind: str) -> None:
    """E‖Pᵀx‖² = ‖x‖² and E⟨Pᵀa, Pᵀb⟩ = ⟨a, b⟩, averaged over 40 seeds at small k."""
    p, k = 300, 32
    x = _grads(2, p, seed=5)
    x[1] = 0.6 * x[0] + 0.8 * x[1]  # correlated pair: ⟨a, b⟩ ≈ 0.6‖a‖‖b‖
    sq, dots = [], []
    for seed in range(40):
        y = make_projector(kind, p, k, seed=seed).project(x)
        sq.append((y.norm(dim=1) ** 2 / x.norm(dim=1) ** 2).mean().item())
        dots.append((y[0] @ y[1]).item() / (x[0] @ x[1]).item())
    assert 0.9 < np.mean(sq) < 1.1
    assert 0.85 < np.mean(dots) < 1.15


if __name__ == "__main__":
    # Micro-benchmark (not a test): project 64 gradients of p = 600k to k = 1024.
    import time

    grads = _grads(64, 600_000)
    for name in KINDS:
        proj = make_projector(name, 600_000, 1024, seed=0)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            proj.project(grads)
            times.append(time.perf_counter() - t0)
        print(f"{name:12s} first {times[0]:.3f} s, best of next {min(times[1:]):.3f} s")


def test_trak_cuda_falls_back_on_cpu_without_loading_fast_jl(capsys):
    from diffattr.attribution.features.featurize import FeatureSettings, with_available_projector
    from diffattr.attribution.features.projection import trak_cuda_available

    assert not trak_cuda_available("cpu")
    settings = FeatureSettings(projector="trak-cuda", proj_dim=512)
    got = with_available_projector(settings, "cpu")
    assert got.projector == "rademacher" and got.proj_dim == 512
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "trak-cuda" in err and "rademacher" in err
    with pytest.raises(ConfigError, match="CUDA device"):
        make_projector("trak-cuda", 4096, 512, device="cpu")
    assert "fast_jl" not in sys.modules
