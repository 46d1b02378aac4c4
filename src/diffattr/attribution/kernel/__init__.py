"""The regularised Gram kernel G = ΦᵀΦ + λI and the products φ(x)ᵀG⁻¹φᵢ, streamed from disk.

Two exact forms of the same quantity (push-through identity):

    primal:  φ(x)ᵀ (ΦᵀΦ + λI)⁻¹ Φᵀ      a k×k Cholesky solve   (used when N ≥ k)
    dual:    φ(x)ᵀ Φᵀ (ΦΦᵀ + λI)⁻¹      an N×N Cholesky solve  (used when N < k)

Leverages hᵢ = φᵢᵀG⁻¹φᵢ come from the same factorisation; in the dual form
hᵢ = [ΦΦᵀ(ΦΦᵀ+λI)⁻¹]ᵢᵢ = 1 − λ[(ΦΦᵀ+λI)⁻¹]ᵢᵢ.

Memory: Φ stays where it is (a memmap of the feature store) and is read in row tiles of about
``TILE_BYTES``; the only resident matrix is the m×m Gram (m = min(N, k)), factorised in place.
It is float64 while it fits in ``MAX_FLOAT64_KERNEL_BYTES`` and float32 above that (k = 32768:
4.3 GB instead of 8.6 GB); products with it are taken in the same precision.

λ follows a :class:`~diffattr.attribution.kernel.ridge.Ridge` rule read from the Gram before it is
factorised (default: the effective-dimension rule, df(λ) = min(200, min(N, k) / 2)); the spectrum of
ΦᵀΦ and ΦΦᵀ is the same, so the rule gives one λ whichever form is used.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.linalg
import scipy.linalg.blas

from diffattr.attribution.features.store import release_pages
from diffattr.attribution.kernel.ridge import DEFAULT_RIDGE, Ridge
from diffattr.errors import ConfigError, NumericalError

#: Bytes of training features read from the store per tile (rows = TILE_BYTES / (8 k)).
TILE_BYTES = 256 << 20
#: Largest Gram matrix kept in float64; a larger one is float32.
MAX_FLOAT64_KERNEL_BYTES = 2 << 30
#: Most elements (rows × k) of one syrk update: OpenBLAS 0.3.30's threaded ssyrk crashes
#: (SIGSEGV) at k = 32768 from 768 rows per call on, and runs at 512; 2²³ keeps a margin
#: (256 rows at k = 32768) and costs nothing measurable (each call still does 2·rows·k²/2 flops).
SYRK_MAX_ELEMENTS = 1 << 23
#: Matrices this large are factorised and solved with one BLAS thread (:func:`blas_threads_for`).
LARGE_MATRIX_BYTES = 1 << 32
#: Up to this many targets, :func:`tile_products` converts a float32 tile to the product's
#: precision in cache-sized blocks (rows × columns) instead of copying the whole tile: a query
#: of one image then reads the store at about 4× the speed, with the same float64 products.
FEW_TARGETS = 32
CONVERT_BLOCK = (8, 32768)


def tile_rows(dim: int, tile_bytes: int = TILE_BYTES) -> int:
    """Rows of a ``dim``-wide float64 tile that fit in ``tile_bytes`` (at least 1)."""
    return max(1, tile_bytes // (8 * max(1, dim)))


def kernel_dtype(size: int, dtype: str = "auto") -> np.dtype:
    """Precision of a size×size Gram: float64 up to MAX_FLOAT64_KERNEL_BYTES, else float32."""
    if dtype == "auto":
        return np.dtype(np.float64 if 8 * size * size <= MAX_FLOAT64_KERNEL_BYTES else np.float32)
    if dtype not in ("float32", "float64"):
        raise ConfigError(f"unknown kernel precision {dtype!r}", hint="use auto, float32, float64")
    return np.dtype(dtype)


def _blocks(n: int, block: int):
    for s in range(0, n, block):
        yield slice(s, min(n, s + block))


def read_tiles(
    features: np.ndarray,
    block: int | None = None,
    dtype: np.dtype | type = np.float64,
    release: bool = True,
) -> Iterator[tuple[slice, np.ndarray]]:
    """(rows, Φ[rows]) tile by tile: an in-memory copy, the mapped pages released after each.

    Streaming an N×k memmap thus holds one tile (about TILE_BYTES) in memory, not the store.
    ``release=False`` (an index answering queries): the pages stay mapped — the next pass
    finds them without faulting them in again — and a tile already in ``dtype`` is not copied.
    """
    n, k = features.shape
    for sl in _blocks(n, block or tile_rows(k)):
        if not release and features.dtype == dtype:
            yield sl, features[sl]
            continue
        tile = np.array(features[sl], dtype=dtype, copy=True)
        if release:
            release_pages(features)
        yield sl, tile


def gram_scale(features: np.ndarray, block: int | None = None) -> float:
    """‖Φ‖²_F / min(N, k): the mean non-zero eigenvalue of ΦᵀΦ."""
    n, k = features.shape
    total = 0.0
    for _, f in read_tiles(features, block):
        total += float(np.einsum("ij,ij->", f, f))
    return total / min(n, k)


def blas_threads_for(matrix: np.ndarray) -> Any:
    """A context in which BLAS/LAPACK may use its threads on ``matrix``: one thread for a
    matrix of 4 GiB or more (OpenBLAS 0.3.30's threaded Cholesky crashes with SIGSEGV on a
    32768² float32 matrix, 2³² bytes; 24576² runs), else no limit."""
    if matrix.nbytes < LARGE_MATRIX_BYTES:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1, user_api="blas")


def _factor_in_place(gram: np.ndarray) -> np.ndarray:
    """Lower Cholesky factor of the symmetric ``gram``, overwriting it.

    LAPACK works in place only on Fortran-ordered input; a C-ordered symmetric matrix is its
    own transpose, so ``gram.T`` is that input (without it scipy makes a full copy: 2× memory).
    """
    with blas_threads_for(gram):
        return scipy.linalg.cho_factor(gram.T, lower=True, overwrite_a=True)[0]


def primal_gram(
    features: np.ndarray, block: int | None = None, dtype: np.dtype | type = np.float64
) -> np.ndarray:
    """ΦᵀΦ (k×k), accumulated tile by tile in place with BLAS syrk (no k×k temporary).

    BLAS fills one triangle (the lower one of the Fortran view ``gram.T``); the other is
    mirrored from it band by band at the end.
    """
    k = features.shape[1]
    gram = np.zeros((k, k), dtype=dtype)
    lower = gram.T  # Fortran-ordered view: BLAS updates it in place
    syrk = scipy.linalg.blas.get_blas_funcs("syrk", dtype=gram.dtype)
    rows_per_update = max(1, SYRK_MAX_ELEMENTS // k)
    for _, tile in read_tiles(features, block, dtype):
        for r in range(0, tile.shape[0], rows_per_update):
            f = tile[r : r + rows_per_update]
            out = syrk(1.0, f.T, beta=1.0, c=lower, trans=0, lower=1, overwrite_c=1)
            if not np.shares_memory(out, gram):  # the wrapper had to copy: keep its result
                lower[...] = out
    step = tile_rows(k)
    for i0 in range(0, k, step):  # mirror the lower triangle, one band of rows at a time
        i1 = min(k, i0 + step)
        lower[:i0, i0:i1] = lower[i0:i1, :i0].T
        d = lower[i0:i1, i0:i1]
        d[...] = np.tril(d) + np.tril(d, -1).T
    return gram


def dual_gram(
    features: np.ndarray, block: int | None = None, dtype: np.dtype | type = np.float64
) -> np.ndarray:
    """ΦΦᵀ (N×N), from tiles of Φ (each pair of tiles read once per outer tile)."""
    n = features.shape[0]
    gram = np.zeros((n, n), dtype=dtype)
    block = block or tile_rows(features.shape[1])
    for si, fi in read_tiles(features, block, dtype):
        for sj in _blocks(n, block):
            if sj.start < si.start:
                continue
            fj = np.array(features[sj], dtype=dtype, copy=True)
            release_pages(features)
            gram[si, sj] = fi @ fj.T
            gram[sj, si] = gram[si, sj].T
    return gram


def inner_products(
    targets: np.ndarray,
    features: np.ndarray,
    block: int | None = None,
    dtype=np.float64,
    executor: Any = None,
    release: bool = True,
) -> np.ndarray:
    """(T, N) matrix φ(x)ᵀφᵢ, streamed over tiles of Φ (``release``: as :func:`read_tiles`).

    ``executor`` (:mod:`diffattr.parallel`): the tiles become its jobs when Φ is a
    memory-mapped ``.npy`` (a feature store): each worker maps the store and a copy of the
    targets written once next to it, and returns its (T × tile) block. The same products as
    in process, so the same values.
    """
    t = np.asarray(targets, dtype=dtype)
    filename = getattr(features, "filename", None)
    if executor is not None and filename is not None and str(filename).endswith(".npy"):
        return _inner_products_by_jobs(t, str(filename), features.shape, block, executor)
    out = np.empty((t.shape[0], features.shape[0]), dtype=dtype)
    keep = tile_precision(len(t), features.dtype, dtype)
    for sl, f in read_tiles(features, block, keep, release):
        out[:, sl] = tile_products(t, f)
    return out


def tile_precision(num_targets: int, store_dtype: np.dtype, dtype: np.dtype | type) -> Any:
    """The precision a store tile is read in: the store's own for up to :data:`FEW_TARGETS`
    targets (:func:`tile_products` converts it block by block), else the products'."""
    return store_dtype if num_targets <= FEW_TARGETS else dtype


def tile_products(a: np.ndarray, tile: np.ndarray) -> np.ndarray:
    """A·tileᵀ in A's precision. A tile of another precision (a float32 store's) is converted
    in blocks of :data:`CONVERT_BLOCK` that stay in cache, each block's products added up —
    the same products as converting the whole tile first, without writing and reading a
    float64 copy of it (for one target, that copy costs about 4× the products)."""
    a = np.asarray(a)
    if tile.dtype == a.dtype:
        return a @ tile.T
    rows, cols = CONVERT_BLOCK
    out = np.zeros((a.shape[0], tile.shape[0]), dtype=a.dtype)
    buf = np.empty((rows, cols), dtype=a.dtype)
    for r in range(0, tile.shape[0], rows):
        r1 = min(tile.shape[0], r + rows)
        for c in range(0, tile.shape[1], cols):
            c1 = min(tile.shape[1], c + cols)
            block = buf[: r1 - r, : c1 - c]
            np.copyto(block, tile[r:r1, c:c1])
            out[:, r:r1] += a[:, c:c1] @ block.T
    return out


def product_tile(job: tuple[str, str, int, int]) -> tuple[int, int, np.ndarray]:
    """One scoring job: A Φ[start:stop]ᵀ, with Φ and A mapped from their ``.npy`` files (the
    tile kept in the store's precision for few targets, as in :func:`inner_products`)."""
    features_path, a_path, start, stop = job
    a = np.load(a_path, mmap_mode="r")
    features = np.load(features_path, mmap_mode="r")
    tile = np.array(features[start:stop], dtype=tile_precision(len(a), features.dtype, a.dtype))
    release_pages(features)
    return start, stop, tile_products(np.asarray(a), tile)


def _inner_products_by_jobs(
    t: np.ndarray, features_path: str, shape: tuple[int, int], block: int | None, executor: Any
) -> np.ndarray:
    n, k = shape
    scratch = Path(tempfile.mkdtemp(prefix=".scoring-", dir=Path(features_path).parent))
    try:
        a_path = scratch / "targets.npy"
        np.save(a_path, t)
        jobs = [(features_path, str(a_path), sl.start, sl.stop)
                for sl in _blocks(n, block or tile_rows(k))]  # fmt: skip
        out = np.empty((t.shape[0], n), dtype=t.dtype)
        for start, stop, part in executor.map(product_tile, jobs, desc="score tiles"):
            out[:, start:stop] = part
        return out
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def row_norms(features: np.ndarray, block: int | None = None) -> np.ndarray:
    """‖φᵢ‖ for every row (float64), streamed over tiles."""
    out = np.empty(features.shape[0], dtype=np.float64)
    for sl, f in read_tiles(features, block):
        out[sl] = np.sqrt(np.einsum("ij,ij->i", f, f))
    return out


@dataclass
class Kernel:
    """A factorised kernel over training features Φ (kept as a reference, e.g. a memmap)."""

    features: np.ndarray
    lam: float
    form: str
    factor: np.ndarray
    block: int = 4096
    #: Runs the training-tile products of :meth:`cross` as jobs (:mod:`diffattr.parallel`).
    executor: Any = field(default=None, repr=False, compare=False)
    #: Keep Φ's pages mapped between calls of :meth:`cross` (an index answering queries: a
    #: query then does not fault the store in again; the pages are the OS's file cache).
    keep_mapped: bool = field(default=False, compare=False)

    @property
    def dtype(self) -> np.dtype:
        """Precision of the factorised Gram and of the products taken with it."""
        return self.factor.dtype

    @classmethod
    def fit(
        cls,
        features: np.ndarray,
        lam: float | Ridge | None = None,
        form: str = "auto",
        block: int | None = None,
        dtype: str = "auto",
    ) -> Kernel:
        """Factorise G (primal) or ΦΦᵀ + λI (dual); ``lam`` absolute or a :class:`Ridge` rule
        (default :data:`DEFAULT_RIDGE`), resolved on the Gram.

        ``block``: training rows per tile (default: about TILE_BYTES); ``dtype``: the Gram's
        precision (``auto``: see :func:`kernel_dtype`).
        """
        n, k = features.shape
        block = block or tile_rows(k)
        if form == "auto":
            form = "dual" if n < k else "primal"
        if form not in ("primal", "dual"):
            raise ConfigError(f"unknown kernel form {form!r}", hint="use auto, primal or dual")
        lam = DEFAULT_RIDGE if lam is None else lam
        if not isinstance(lam, Ridge) and not lam > 0:
            raise ConfigError(f"λ must be positive, got {lam}")
        dt = kernel_dtype(k if form == "primal" else n, dtype)
        if form == "primal":
            gram = primal_gram(features, block, dt)
        else:
            gram = dual_gram(features, block, dt)
        if isinstance(lam, Ridge):
            lam = lam.resolve(gram, min(n, k))
        diag = float(np.mean(np.diag(gram)))
        gram[np.diag_indices_from(gram)] += lam
        try:  # in place: the Gram is the one large resident matrix
            factor = _factor_in_place(gram)
        except (np.linalg.LinAlgError, ValueError) as exc:
            suggested = max(10 * lam, 1e-3 * diag)
            scale = diag * gram.shape[0] / min(n, k)  # mean non-zero eigenvalue of ΦᵀΦ
            relative = f" or --relative-lambda {suggested / scale:.3g}" if scale > 0 else ""
            raise NumericalError(
                f"the kernel G = ΦᵀΦ + λI with λ={lam:.3g} is singular to working precision "
                f"(not positive definite: {exc})",
                hint=f"increase λ, e.g. --lambda {suggested:.3g}{relative}",
            ) from exc
        return cls(features, float(lam), form, factor, block)

    @classmethod
    def from_gram(cls, gram: np.ndarray, lam: float) -> Kernel:
        """Dual-form kernel from a precomputed ΦΦᵀ (N×N); use :meth:`solve_inner` with it."""
        k = np.array(gram, dtype=np.float64, copy=True)
        k[np.diag_indices_from(k)] += lam
        try:
            factor = _factor_in_place(k)
        except (np.linalg.LinAlgError, ValueError) as exc:
            raise NumericalError(
                f"the kernel with λ={lam:.3g} is not positive definite ({exc})",
                hint=f"increase λ, e.g. to {10 * lam:.3g}",
            ) from exc
        return cls(np.empty((k.shape[0], 0)), float(lam), "dual", factor)

    def solve_inner(self, inner: np.ndarray) -> np.ndarray:
        """Dual form from precomputed φ(x)ᵀΦᵀ (T×N): φ(x)ᵀΦᵀ(ΦΦᵀ + λI)⁻¹."""
        if self.form != "dual":
            raise ConfigError("solve_inner needs the dual form")
        return self._solve(np.asarray(inner, dtype=np.float64).T).T

    def _solve(self, rhs: np.ndarray) -> np.ndarray:
        rhs = np.asarray(rhs, dtype=self.dtype)
        with blas_threads_for(self.factor):
            return scipy.linalg.cho_solve((self.factor, True), rhs, check_finite=False)

    def cross(self, targets: np.ndarray) -> np.ndarray:
        """(T, N) matrix of φ(x)ᵀ G⁻¹ φᵢ for target features ``targets`` (T, k)."""
        dt = self.dtype
        t = np.asarray(targets, dtype=dt)
        if self.form == "primal":
            y = self._solve(t.T)  # (k, T) = G⁻¹ φ(x)
            out = self._inner(y.T)
            return out.astype(np.float64, copy=False)
        inner = self._inner(t)  # φ(x)ᵀΦᵀ
        return self._solve(inner.T).T.astype(np.float64, copy=False)

    def _inner(self, a: np.ndarray) -> np.ndarray:
        release = not self.keep_mapped
        return inner_products(a, self.features, self.block, a.dtype, self.executor, release)

    def leverage(self) -> np.ndarray:
        """hᵢ = φᵢᵀ G⁻¹ φᵢ ∈ [0, 1) for every training row."""
        n = self.features.shape[0]
        if self.form == "dual":
            inv_l = scipy.linalg.solve_triangular(self.factor, np.eye(n), lower=True)
            diag_inv = np.einsum("ij,ij->j", inv_l, inv_l)
            return 1.0 - self.lam * diag_inv
        h = np.empty(n, dtype=np.float64)
        for sl, f in read_tiles(self.features, self.block):
            h[sl] = np.einsum("ij,ji->i", f, self._solve(f.T))
        return h
