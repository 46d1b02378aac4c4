"""Embedding cosine: τ(x, zᵢ) = cos(e(x), e(zᵢ)) for an image encoder e.

No pretrained image model (CLIP, DINO) ships offline here, so the default encoder is a small
in-domain one: a convolutional *denoising autoencoder* trained on the training set itself
(input x + σ·n, target x, MSE), seeded so that the same data and settings give the same
weights, and cached on disk keyed by the training set's fingerprint and the settings. Results
say so (``"embedding": "in-domain autoencoder trained on the training set"``). Any callable
mapping images (N×C×H×W in [-1, 1]) to vectors (N×D) can replace it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffattr.errors import ConfigError, DataError
from diffattr.fsio import atomic_write, atomic_write_json, read_json
from diffattr.seeding import derive_seed, generator

#: Key namespace of the encoder's random streams (init, batches, input noise).
EMBEDDING_KEY = 0x454D4231
IN_DOMAIN_LABEL = "in-domain autoencoder trained on the training set"
FORMAT_VERSION = 1

_MEMO: dict[str, nn.Module] = {}


@dataclass(frozen=True)
class EncoderSettings:
    """Everything that determines the in-domain encoder besides the training images:
    ``dim``: embedding size; ``width``: channels of the first convolution; ``steps``: training
    steps of the denoising autoencoder; ``train_batch``: its batch size; ``lr``: its learning
    rate; ``noise``: standard deviation of the noise it learns to remove; ``seed``: its seed."""

    dim: int = 32
    width: int = 16
    steps: int = 300
    train_batch: int = 64
    lr: float = 2e-3
    noise: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("dim", "width", "steps", "train_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"embedding option {name} must be a positive integer")
        if self.lr <= 0 or self.noise < 0:
            raise ConfigError("embedding options lr must be > 0 and noise >= 0")

    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:10]


class ConvEncoder(nn.Module):
    """C×H×W → D: three 3×3 convolutions (one strided), 4×4 average pooling, a linear map."""

    def __init__(self, channels: int, dim: int, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(2 * width * 16, dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvDecoder(nn.Module):
    """D → C×H×W: a linear map to 4×4, bilinear upsampling to H×W, three convolutions."""

    def __init__(self, channels: int, dim: int, width: int, size: tuple[int, int]) -> None:
        super().__init__()
        self.width, self.size = width, size
        self.fc = nn.Linear(dim, 2 * width * 16)
        self.net = nn.Sequential(
            nn.Conv2d(2 * width, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, channels, 3, padding=1),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.fc(z).view(-1, 2 * self.width, 4, 4)
        return self.net(F.interpolate(h, size=self.size, mode="bilinear", align_corners=False))


def images_fingerprint(images: torch.Tensor, ids: np.ndarray | None) -> str:
    """sha256 of the training images (float32) and ids: names the encoder cache."""
    h = hashlib.sha256(b"diffattr-embedding-train\0")
    h.update(repr(tuple(images.shape)).encode())
    h.update(np.ascontiguousarray(images.detach().cpu().numpy(), dtype="<f4").tobytes())
    if ids is not None:
        h.update(np.ascontiguousarray(np.asarray(ids), dtype="<i8").tobytes())
    return h.hexdigest()


def train_encoder(
    images: torch.Tensor, settings: EncoderSettings, progress: bool = False
) -> ConvEncoder:
    """Train the denoising autoencoder on ``images``; return its encoder (eval mode).

    Deterministic: initial weights from a generator keyed by (seed, EMBEDDING_KEY), batch
    indices and input noise of step s keyed by (seed, EMBEDDING_KEY, s).
    """
    if images.dim() != 4:
        raise DataError(f"images must be N×C×H×W, got shape {tuple(images.shape)}")
    n, c, h, w = images.shape
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(settings.seed, EMBEDDING_KEY))
        encoder = ConvEncoder(c, settings.dim, settings.width)
        decoder = ConvDecoder(c, settings.dim, settings.width, (h, w))
    params = list(encoder.parameters()) + list(decoder.parameters())
    optimizer = torch.optim.Adam(params, lr=settings.lr)
    images = images.detach().float().cpu()
    from tqdm.auto import tqdm

    for step in tqdm(range(settings.steps), desc="train encoder", disable=not progress):
        g = generator(settings.seed, EMBEDDING_KEY, step)
        idx = torch.randint(n, (min(settings.train_batch, n),), generator=g)
        x = images[idx]
        noisy = x + settings.noise * torch.randn(x.shape, generator=g)
        loss = F.mse_loss(decoder(encoder(noisy)), x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return encoder.eval()


def load_or_train_encoder(
    images: torch.Tensor,
    ids: np.ndarray | None,
    settings: EncoderSettings,
    cache_dir: str | Path | None = None,
    progress: bool = False,
) -> tuple[ConvEncoder, Path | None]:
    """The in-domain encoder for these training images: from the cache, else trained (and
    cached in ``cache_dir/embedding-<data>-<settings>/`` when ``cache_dir`` is given)."""
    fp = images_fingerprint(images, ids)
    name = f"embedding-{fp[:12]}-{settings.key()}"
    _, c, _, _ = images.shape
    path = Path(cache_dir) / name if cache_dir is not None else None
    meta = {
        "format_version": FORMAT_VERSION,
        "data_fingerprint": fp,
        "settings": asdict(settings),
        "shape": list(images.shape[1:]),
        "label": IN_DOMAIN_LABEL,
    }
    if path is not None and (path / "meta.json").is_file():
        have = read_json(path / "meta.json")
        if have == meta:
            encoder = ConvEncoder(c, settings.dim, settings.width)
            encoder.load_state_dict(torch.load(path / "encoder.pt", weights_only=True))
            return encoder.eval(), path
    if path is None and name in _MEMO:
        return _MEMO[name], None  # type: ignore[return-value]
    encoder = train_encoder(images, settings, progress)
    if path is None:
        _MEMO[name] = encoder
        return encoder, None
    path.mkdir(parents=True, exist_ok=True)
    state = encoder.state_dict()
    atomic_write(path / "encoder.pt", lambda f: torch.save(state, f))
    atomic_write_json(path / "meta.json", meta)  # written last: marks the cache as complete
    return encoder, path


@torch.no_grad()
def embed(
    encoder: Callable[[torch.Tensor], Any], images: torch.Tensor, batch_size: int = 256
) -> np.ndarray:
    """(N, D) float64 embeddings of ``images`` (batched; any tensor/array output is flattened)."""
    out = []
    for s in range(0, images.shape[0], batch_size):
        e = encoder(images[s : s + batch_size])
        e = e.detach().cpu().numpy() if isinstance(e, torch.Tensor) else np.asarray(e)
        if e.shape[0] != min(batch_size, images.shape[0] - s):
            raise ConfigError(
                f"the encoder returned {e.shape[0]} vectors for "
                f"{min(batch_size, images.shape[0] - s)} images",
                hint="an encoder maps N×C×H×W images to an N×D array",
            )
        out.append(e.reshape(e.shape[0], -1).astype(np.float64))
    emb = np.concatenate(out)
    if not np.isfinite(emb).all():
        raise ConfigError("the encoder returned non-finite embeddings")
    return emb


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-30)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-30)
    return a @ b.T


def embedding_scores(
    train_images: torch.Tensor,
    target_images: torch.Tensor,
    encoder: Callable[[torch.Tensor], Any] | None = None,
    train_ids: np.ndarray | None = None,
    cache_dir: str | Path | None = None,
    settings: EncoderSettings | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, dict[str, Any]]:
    """(T, N) cosines of embeddings, and a description of the encoder used."""
    if encoder is not None:
        if not callable(encoder):
            raise ConfigError("embedding-cos: encoder must be a callable (images → vectors)")
        meta: dict[str, Any] = {"embedding": f"user encoder {getattr(encoder, '__name__', '')}"}
        fn = encoder
    else:
        settings = settings or EncoderSettings()
        enc, path = load_or_train_encoder(train_images, train_ids, settings, cache_dir, progress)
        meta = {"embedding": IN_DOMAIN_LABEL, "encoder_settings": asdict(settings)}
        if path is not None:
            meta["encoder_cache"] = str(path)
        fn = enc
    a = embed(fn, target_images.float())
    b = embed(fn, train_images.float())
    if a.shape[1] != b.shape[1]:
        raise ConfigError("the encoder returned vectors of different sizes for targets and train")
    return cosine(a, b), meta
