"""Seeded random projections of per-sample gradients: φ = Pᵀg, P ∈ ℝ^{p×k}, E[PPᵀ] = I.

P is never materialised whole (p × k × 4 bytes would be terabytes for a 36M-parameter model).
Its entries are a pure function of ``describe()`` (kind, seed, dims and the kind-specific fields
listed there), so features computed in different processes, with different batch sizes or chunk
sizes, share one matrix.

Dense kinds ("gaussian": N(0, 1)/√k, "rademacher": ±1/√k) define P by fixed row blocks of
``block_rows`` input coordinates; block ``b`` is drawn from ``generator(seed, b, code)``.
``chunk_rows`` only decides how many blocks are generated at once (and, with ``workers``,
in parallel) and never changes the result: outputs are accumulated block by block in float32,
in block order, so any chunking gives bit-identical results.

Sparse kinds ("countsketch": one ±1 entry per input coordinate; "sparse-jl": ``nnz`` entries
±1/√nnz per coordinate, one in each of ``nnz`` equal slices of [0, k)) store a bucket table
(int32) and signs (int8), generated in fixed blocks of ``hash_block`` coordinates and cached
after the first call.

Reproducibility: the matrix is identical in every process. On CPU, sparse outputs are
bit-identical across runs, processes, chunk sizes and batch sizes (each row is computed on its own).
Dense outputs are bit-identical across runs, processes and chunk sizes for the same batch size and
BLAS thread count; MKL may pick another summation order for another batch size or thread count,
which changes the last bits (~1e-6 relative). Dense matrices generated on a CUDA device
(``device="cuda"``) are a different (recorded) stream and are only reproducible on the same GPU
model; sparse tables are always generated on CPU, but CUDA ``index_add_`` sums with atomics, so
sparse outputs on CUDA may differ in the last bits.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

from diffattr.errors import ConfigError
from diffattr.seeding import generator

__all__ = [
    "DEFAULT_BLOCK_ROWS",
    "DEFAULT_HASH_BLOCK",
    "KINDS",
    "DenseProjector",
    "IdentityProjector",
    "PassThroughProjector",
    "Projector",
    "SparseProjector",
    "TrakCudaProjector",
    "make_projector",
    "trak_cuda_available",
]

#: Version of the generation scheme; bump when the matrix a given ``describe()`` denotes changes.
SCHEME_VERSION = 1

#: Third key of every projection stream: ``generator(seed, block, code)``. Large values keep these
#: streams apart from the small-integer namespaces used elsewhere (``diffusion.schedule``).
_STREAM_CODES = {
    "gaussian": 0x50524A01,
    "rademacher": 0x50524A02,
    "countsketch": 0x50524A03,
    "sparse-jl": 0x50524A04,
}

DEFAULT_BLOCK_ROWS = 1024
DEFAULT_HASH_BLOCK = 1 << 16
DEFAULT_SPARSE_JL_NNZ = 4
#: Automatic dense chunk: the blocks generated at once take at most this many bytes.
_AUTO_CHUNK_BYTES = 256 * 2**20
#: Automatic sparse chunk: the float32 temporary (rows × chunk × nnz) takes at most this many bytes.
_SPARSE_TEMP_BYTES = 16 * 2**20
#: Sparse projection handles at most this many bytes of output rows per pass (8 to 32 rows).
_SPARSE_OUT_BYTES = 2**20

KINDS = ("identity", "none", "gaussian", "rademacher", "countsketch", "sparse-jl", "trak-cuda")
#: traker's CUDA kernels project to multiples of this dimension.
TRAK_CUDA_MULTIPLE = 512


def trak_cuda_available(device: str | torch.device) -> bool:
    """Whether ``trak-cuda`` can run: a CUDA device and traker's ``fast_jl`` extension installed.

    Looks the extension up without importing it (CPU runs never load it)."""
    import importlib.util

    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return False
    return (
        importlib.util.find_spec("fast_jl") is not None
        and importlib.util.find_spec("trak") is not None
    )


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(
            f"projection option {name}={value!r} is invalid",
            hint=f"{name} must be an integer >= {minimum}",
        )
    return int(value)


class Projector(ABC):
    """Maps a batch of gradients (B, p) to features (B, k) in float32 on the input's device."""

    input_dim: int
    output_dim: int

    @abstractmethod
    def project(self, grads: torch.Tensor) -> torch.Tensor:
        """(B, input_dim) floating tensor -> (B, output_dim) float32 tensor on ``grads.device``.

        Not differentiable (runs under ``torch.no_grad``)."""

    @abstractmethod
    def describe(self) -> dict[str, object]:
        """Every setting that changes outputs (kind, seed, dims, ...) and nothing else."""

    def _check_grads(self, grads: torch.Tensor) -> None:
        if not isinstance(grads, torch.Tensor):
            raise ConfigError(f"gradients must be a torch.Tensor, got {type(grads).__name__}")
        if grads.ndim != 2 or grads.shape[1] != self.input_dim:
            raise ConfigError(
                f"gradients of shape {tuple(grads.shape)} do not match the projector's input "
                f"dimension {self.input_dim}",
                hint="expected (batch, input_dim); the projector must be built for the same "
                "parameter set as the gradients",
            )
        if not grads.is_floating_point():
            raise ConfigError(f"gradients must be a floating tensor, got dtype {grads.dtype}")

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.describe().items())
        return f"{type(self).__name__}({fields})"


class IdentityProjector(Projector):
    """No projection: returns the gradients as float32 (k == p; float32 input is not copied)."""

    def __init__(self, input_dim: int) -> None:
        self.input_dim = _check_int("input_dim", input_dim, 1)
        self.output_dim = self.input_dim

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        self._check_grads(grads)
        return grads.detach().to(torch.float32)

    def describe(self) -> dict[str, object]:
        return {
            "kind": "identity",
            "seed": None,
            "input_dim": self.input_dim,
            "output_dim": self.output_dim,
        }


class PassThroughProjector(IdentityProjector):
    """Features already projected upstream (``logra``: by the gradient computer, per layer):
    passed through as float32, described by the upstream projection's settings."""

    def __init__(self, dim: int, description: dict[str, object]) -> None:
        super().__init__(dim)
        self.description = dict(description)

    def describe(self) -> dict[str, object]:
        return {**self.description, "input_dim": self.input_dim, "output_dim": self.output_dim}


class DenseProjector(Projector):
    """Dense Gaussian (N(0,1)/√k) or Rademacher (±1/√k) projection, generated block by block.

    Args:
        input_dim, output_dim: p and k.
        seed: non-negative integer.
        kind: "rademacher" (default, ~10x cheaper to generate) or "gaussian".
        block_rows: rows of P per random stream; part of the matrix's identity.
        chunk_rows: rows generated at once (a multiple of ``block_rows``); None picks the largest
            multiple whose blocks fit in ~256 MB. Does not change the result.
        device: where P is generated ("cpu" by default). A CUDA generator is a different stream,
            so this is recorded in ``describe()`` as ``rng_device``. Blocks are moved to the
            gradients' device for the product.
        cache_bytes: keep the whole generated P (on the gradients' device) when p·k·4 bytes fit
            in this budget; 0 (default) never caches.
        workers: CPU threads generating the blocks of the next chunk while the current one is
            multiplied (each block has its own stream, so results do not depend on this; two
            chunks are then held at once).
            Default 1: on few cores the generator threads fight the BLAS threads and lose;
            on many-core machines 2-8 can speed up "gaussian", whose generation dominates.
    """

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        seed: int,
        kind: str = "rademacher",
        block_rows: int = DEFAULT_BLOCK_ROWS,
        chunk_rows: int | None = None,
        device: str | torch.device = "cpu",
        cache_bytes: int = 0,
        workers: int = 1,
    ) -> None:
        if kind not in ("gaussian", "rademacher"):
            raise ConfigError(
                f"unknown dense projection kind {kind!r}", hint="use 'gaussian' or 'rademacher'"
            )
        self.kind = kind
        self.input_dim = _check_int("input_dim", input_dim, 1)
        self.output_dim = _check_int("output_dim", output_dim, 1)
        self.seed = _check_int("seed", seed, 0)
        self.block_rows = _check_int("block_rows", block_rows, 1)
        self.rng_device = torch.device(device)
        self.cache_bytes = _check_int("cache_bytes", cache_bytes, 0)
        block_bytes = self.block_rows * self.output_dim * 4
        if chunk_rows is None:
            chunk_blocks = max(1, _AUTO_CHUNK_BYTES // block_bytes)
        else:
            chunk_rows = _check_int("chunk_rows", chunk_rows, 1)
            if chunk_rows % self.block_rows:
                raise ConfigError(
                    f"chunk_rows={chunk_rows} is not a multiple of block_rows={self.block_rows}",
                    hint="pick chunk_rows = n * block_rows, or leave it unset",
                )
            chunk_blocks = chunk_rows // self.block_rows
        self.num_blocks = -(-self.input_dim // self.block_rows)
        self.chunk_blocks = min(chunk_blocks, self.num_blocks)
        self.chunk_rows = self.chunk_blocks * self.block_rows
        self.workers = _check_int("workers", workers, 1)
        if self.rng_device.type != "cpu":
            self.workers = 1
        self._code = _STREAM_CODES[kind]
        self._scale = 1.0 / math.sqrt(self.output_dim)
        self._cache: list[torch.Tensor] | None = None
        if kind == "rademacher":
            bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
            self._sign_table = (bits.to(torch.float32) * 2 - 1) * self._scale  # (256, 8)

    def describe(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "seed": self.seed,
            "input_dim": self.input_dim,
            "output_dim": self.output_dim,
            "block_rows": self.block_rows,
            "rng_device": self.rng_device.type,
            "scheme": SCHEME_VERSION,
        }

    # -- generation ---------------------------------------------------------------------------

    def _block_range(self, b: int) -> tuple[int, int]:
        start = b * self.block_rows
        return start, min(start + self.block_rows, self.input_dim)

    def _fill_block(self, b: int, out: torch.Tensor) -> torch.Tensor:
        """Write block ``b`` (rows × k, contiguous) into the front of ``out``; return that view."""
        start, stop = self._block_range(b)
        block = out[: stop - start]
        g = generator(self.seed, b, self._code, device=self.rng_device)
        if self.kind == "gaussian":
            block.normal_(0.0, self._scale, generator=g)
            return block
        n = block.numel()
        words = torch.empty(-(-n // 64), dtype=torch.int64, device=self.rng_device)
        words.random_(-(2**63), None, generator=g)  # full 64-bit range: 64 signs per draw
        idx = words.view(torch.uint8)[: -(-n // 8)].to(torch.int32)
        table = self._sign_table.to(self.rng_device)
        if n % 8 == 0:
            torch.index_select(table, 0, idx, out=block.view(-1, 8))
        else:
            block.view(-1).copy_(table.index_select(0, idx).view(-1)[:n])
        return block

    def _new_slot(self) -> torch.Tensor:
        return torch.empty(self.block_rows, self.output_dim, device=self.rng_device)

    def _generated_blocks(self) -> Iterator[torch.Tensor]:
        """Blocks 0..num_blocks-1 in order, ``chunk_blocks`` generated at a time.

        A yielded tensor is only valid until the next one is requested (slots are reused).
        With workers > 1, the next chunk is generated in background threads while the current
        one is consumed (two sets of slots).
        """
        chunks = [
            range(c, min(c + self.chunk_blocks, self.num_blocks))
            for c in range(0, self.num_blocks, self.chunk_blocks)
        ]
        if self.workers == 1:
            slots = [self._new_slot() for _ in range(self.chunk_blocks)]
            for chunk in chunks:
                views = [self._fill_block(b, slots[i]) for i, b in enumerate(chunk)]
                yield from views
            return
        slot_sets = [[self._new_slot() for _ in range(self.chunk_blocks)] for _ in range(2)]
        with ThreadPoolExecutor(max_workers=self.workers) as pool:

            def submit(ci: int) -> list:
                slots = slot_sets[ci % 2]
                return [
                    pool.submit(self._fill_block, b, slots[i]) for i, b in enumerate(chunks[ci])
                ]

            pending = submit(0)
            for ci in range(len(chunks)):
                views = [f.result() for f in pending]
                if ci + 1 < len(chunks):
                    pending = submit(ci + 1)
                yield from views

    def _blocks(self, device: torch.device) -> Iterator[torch.Tensor]:
        if self._cache is not None and self._cache[0].device == device:
            yield from self._cache
            return
        want_cache = self.input_dim * self.output_dim * 4 <= self.cache_bytes
        cache: list[torch.Tensor] = []
        for block in self._generated_blocks():
            block = block.to(device)
            if want_cache:
                # Each block is its own allocation, exactly as in the uncached path.
                block = block.clone() if block.device == self.rng_device else block
                cache.append(block)
            yield block
        if want_cache:
            self._cache = cache

    # -- projection -----------------------------------------------------------------------------

    @torch.no_grad()
    def project(self, grads: torch.Tensor) -> torch.Tensor:
        self._check_grads(grads)
        out = torch.zeros(grads.shape[0], self.output_dim, dtype=torch.float32, device=grads.device)
        if grads.shape[0] == 0:
            return out
        for b, block in enumerate(self._blocks(grads.device)):
            start, stop = self._block_range(b)
            out.addmm_(grads[:, start:stop].to(torch.float32), block)
        return out


class SparseProjector(Projector):
    """CountSketch (``nnz`` = 1, entries ±1) or sparse JL (``nnz`` = s, entries ±1/√s).

    Sparse JL splits [0, k) into s slices [i·k//s, (i+1)·k//s) and gives each input coordinate
    one uniformly random bucket in every slice (so its s buckets are distinct) with independent
    random signs; the diagonal of PPᵀ is exactly 1 and off-diagonal entries have mean 0.

    Args:
        chunk_size: input coordinates processed per step (bounds the rows × chunk × nnz float32
            temporary, rows ≤ 32); None picks ~16 MB. Does not change the result.
        device: accepted for API symmetry; tables are always generated on CPU and copied to the
            gradients' device on first use.
    """

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        seed: int,
        kind: str = "countsketch",
        nnz: int | None = None,
        chunk_size: int | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        if kind not in ("countsketch", "sparse-jl"):
            raise ConfigError(
                f"unknown sparse projection kind {kind!r}", hint="use 'countsketch' or 'sparse-jl'"
            )
        self.kind = kind
        self.input_dim = _check_int("input_dim", input_dim, 1)
        self.output_dim = _check_int("output_dim", output_dim, 1)
        self.seed = _check_int("seed", seed, 0)
        if kind == "countsketch":
            if nnz not in (None, 1):
                raise ConfigError(
                    f"countsketch has exactly one nonzero per coordinate, got nnz={nnz}",
                    hint="use kind='sparse-jl' for nnz > 1",
                )
            nnz = 1
        elif nnz is None:
            nnz = DEFAULT_SPARSE_JL_NNZ
        self.nnz = _check_int("nnz", nnz, 1)
        if self.nnz > self.output_dim:
            raise ConfigError(
                f"nnz={self.nnz} exceeds output_dim={self.output_dim}",
                hint="each coordinate needs nnz distinct buckets; lower nnz",
            )
        self.chunk_size = None if chunk_size is None else _check_int("chunk_size", chunk_size, 1)
        self.device = torch.device(device)
        self.hash_block = DEFAULT_HASH_BLOCK
        self._code = _STREAM_CODES[kind]
        self._scale = 1.0 / math.sqrt(self.nnz)
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def describe(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "seed": self.seed,
            "input_dim": self.input_dim,
            "output_dim": self.output_dim,
            "nnz": self.nnz,
            "hash_block": self.hash_block,
            "scheme": SCHEME_VERSION,
        }

    def _build_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Buckets (p, nnz) int32 and signs (p, nnz) int8, built on CPU block by block."""
        p, k, s = self.input_dim, self.output_dim, self.nnz
        buckets = torch.empty(p, s, dtype=torch.int32)
        signs = torch.empty(p, s, dtype=torch.int8)
        bounds = [i * k // s for i in range(s + 1)]
        for b, start in enumerate(range(0, p, self.hash_block)):
            stop = min(start + self.hash_block, p)
            g = generator(self.seed, b, self._code)
            for i in range(s):
                buckets[start:stop, i] = torch.randint(
                    bounds[i], bounds[i + 1], (stop - start,), generator=g, dtype=torch.int64
                ).to(torch.int32)
            bits = torch.randint(0, 2, (stop - start, s), generator=g, dtype=torch.int8)
            signs[start:stop] = bits * 2 - 1
        return buckets, signs

    def tables(self, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(buckets int32 (p, nnz), signs int8 (p, nnz)) on ``device``, built once and cached."""
        device = torch.device(device)
        cpu = torch.device("cpu")
        if cpu not in self._tables:
            self._tables[cpu] = self._build_tables()
        if device not in self._tables:
            self._tables[device] = tuple(t.to(device) for t in self._tables[cpu])
        return self._tables[device]

    @torch.no_grad()
    def project(self, grads: torch.Tensor) -> torch.Tensor:
        self._check_grads(grads)
        batch, k, s = grads.shape[0], self.output_dim, self.nnz
        out = torch.zeros(batch, k, dtype=torch.float32, device=grads.device)
        if batch == 0:
            return out
        buckets, signs = self.tables(grads.device)
        # Rows are independent, so the batch is processed a few rows at a time: their output
        # rows stay in cache while every input coordinate is scattered into them (with all rows
        # at once, each chunk would stream the whole (B, k) output through memory).
        rows = max(8, min(32, _SPARSE_OUT_BYTES // (4 * k)))
        chunk = self.chunk_size or max(1024, _SPARSE_TEMP_BYTES // (min(rows, batch) * s * 4))
        for r0 in range(0, batch, rows):
            grads_rows, out_rows = grads[r0 : r0 + rows], out[r0 : r0 + rows]
            n = grads_rows.shape[0]
            for start in range(0, self.input_dim, chunk):
                stop = min(start + chunk, self.input_dim)
                idx = buckets[start:stop].reshape(-1).to(torch.int64)
                vals = signs[start:stop].to(torch.float32)
                if s > 1:
                    vals = vals * self._scale
                g = grads_rows[:, start:stop].to(torch.float32)
                src = (g.unsqueeze(-1) * vals).reshape(n, -1)  # coordinate-major, like idx
                # CPU index_add_ adds in index order: each output entry sums its coordinates in
                # ascending order whatever the chunking, so results are bit-identical.
                out_rows.index_add_(1, idx, src)
        return out


class TrakCudaProjector(Projector):
    """MadryLab traker's CUDA Rademacher projector (``fast_jl``), scaled by 1/√k.

    The matrix is traker's (its own seeded stream, reproducible on one GPU model), not the
    ``rademacher`` kind's; ``output_dim`` must be a multiple of 512. Needs a CUDA device.
    """

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        seed: int = 0,
        device: str | torch.device = "cuda",
        max_batch_size: int = 32,
    ) -> None:
        self.input_dim = _check_int("input_dim", input_dim, 1)
        self.output_dim = _check_int("output_dim", output_dim, 1)
        self.seed = _check_int("seed", seed, 0)
        if self.output_dim % TRAK_CUDA_MULTIPLE:
            raise ConfigError(
                f"--projector trak-cuda needs --proj-dim a multiple of {TRAK_CUDA_MULTIPLE}, "
                f"got {self.output_dim}"
            )
        if not trak_cuda_available(device):
            raise ConfigError(
                "--projector trak-cuda needs a CUDA device and traker's fast_jl extension",
                hint="pip install 'diffattr[trak-cuda]' on a GPU machine, or use --projector "
                "rademacher",
            )
        from trak.projectors import CudaProjector, ProjectionType

        self.device = torch.device(device)
        self._impl = CudaProjector(
            self.input_dim,
            self.output_dim,
            self.seed,
            ProjectionType.rademacher,
            self.device,
            max_batch_size,
        )

    @torch.no_grad()
    def project(self, grads: torch.Tensor) -> torch.Tensor:
        self._check_grads(grads)
        g = grads.detach().to(self.device, torch.float32).contiguous()
        out = self._impl.project(g, model_id=0).to(torch.float32)
        return out.mul_(1.0 / math.sqrt(self.output_dim)).to(grads.device)

    def describe(self) -> dict[str, object]:
        return {
            "kind": "trak-cuda",
            "seed": self.seed,
            "input_dim": self.input_dim,
            "output_dim": self.output_dim,
            "matrix": "traker fast_jl rademacher / sqrt(k)",
        }


def make_projector(
    kind: str,
    input_dim: int,
    output_dim: int | None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    **options: object,
) -> Projector:
    """Build a projector by name.

    ``kind``: "identity"/"none" (no projection, ``output_dim`` None or == input_dim),
    "gaussian", "rademacher" (options: block_rows, chunk_rows, cache_bytes, workers),
    "countsketch" (options: chunk_size), "sparse-jl" (options: nnz, chunk_size), "trak-cuda"
    (traker's CUDA kernel; option: max_batch_size).
    """
    if kind not in KINDS:
        raise ConfigError(
            f"unknown projection kind {kind!r}", hint=f"choose one of: {', '.join(KINDS)}"
        )
    input_dim = _check_int("input_dim", input_dim, 1)
    allowed = {
        "gaussian": {"block_rows", "chunk_rows", "cache_bytes", "workers"},
        "rademacher": {"block_rows", "chunk_rows", "cache_bytes", "workers"},
        "countsketch": {"chunk_size", "nnz"},
        "sparse-jl": {"chunk_size", "nnz"},
        "trak-cuda": {"max_batch_size"},
    }.get(kind, set())
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ConfigError(
            f"projection kind {kind!r} does not take option(s) {', '.join(unknown)}",
            hint=f"options for {kind!r}: {', '.join(sorted(allowed)) or 'none'}",
        )
    if kind in ("identity", "none"):
        if output_dim is not None and output_dim != input_dim:
            raise ConfigError(
                f"identity projection keeps all {input_dim} dimensions, "
                f"got output_dim={output_dim}",
                hint="leave output_dim unset, or pick a random projection kind to reduce it",
            )
        return IdentityProjector(input_dim)
    if output_dim is None:
        raise ConfigError(
            f"projection kind {kind!r} needs an output dimension",
            hint="set output_dim (e.g. 2048–32768), or use kind='identity' to keep full gradients",
        )
    output_dim = _check_int("output_dim", output_dim, 1)
    if output_dim >= input_dim:
        raise ConfigError(
            f"output_dim={output_dim} is not smaller than the gradient dimension {input_dim}",
            hint="a random projection only makes sense for output_dim < input_dim; "
            "use kind='identity' to keep full gradients",
        )
    if kind == "trak-cuda":
        return TrakCudaProjector(input_dim, output_dim, seed, device=device, **options)
    if kind in ("gaussian", "rademacher"):
        return DenseProjector(input_dim, output_dim, seed, kind=kind, device=device, **options)
    return SparseProjector(input_dim, output_dim, seed, kind=kind, device=device, **options)
