"""Captioned training data in latent space: VAE latents and caption embeddings, cached.

Attribution and fine-tuning of a latent pipeline never see pixels: a training image x becomes
z₀ = s · mean(E(x)) (the VAE encoder's posterior mean times the scaling factor s, deterministic)
and its caption c becomes the text encoder's hidden states h(c). Both are computed once and
cached in ``RUN/latents/<key>.npz``; the key hashes the images, ids, captions, VAE and text
encoder, so a changed input never reuses a stale cache.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diffattr.data import ImageDataset
from diffattr.diffusion.presets import model_fingerprint
from diffattr.errors import DataError
from diffattr.fsio import atomic_write_npz
from diffattr.text2image.pipeline import Components, encode_prompts


@dataclass
class LatentSet:
    """Latents z₀ (N, c, h, w) with ids, captions and caption embeddings (N, L, D).

    Quacks like an :class:`~diffattr.data.ImageDataset` where the engine needs it (``images``,
    ``ids``, ``fingerprint()``, ``len``) and adds ``conditioning``, which the gradient
    computation hands to the UNet with each sample. ``sources``: the encoded images' files
    (as the dataset names them), when known.
    """

    images: torch.Tensor
    ids: torch.Tensor
    captions: list[str]
    conditioning: torch.Tensor
    name: str = "latents"
    sources: list[str] | None = None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        _, c, h, w = self.images.shape
        return int(c), int(h), int(w)

    def subset(self, positions: np.ndarray) -> LatentSet:
        idx = torch.as_tensor(np.asarray(positions, dtype=np.int64))
        return LatentSet(
            self.images[idx],
            self.ids[idx],
            [self.captions[int(i)] for i in idx],
            self.conditioning[idx],
            self.name,
            None if self.sources is None else [self.sources[int(i)] for i in idx],
        )

    def fingerprint(self) -> str:
        """sha256 of latents, ids and caption embeddings."""
        h = hashlib.sha256(b"diffattr-latentset-v1\0")
        for t in (self.images, self.ids, self.conditioning):
            h.update(str(tuple(t.shape)).encode())
            h.update(np.ascontiguousarray(t.detach().cpu().numpy()).tobytes())
        return h.hexdigest()


def require_captions(dataset: ImageDataset) -> list[str]:
    if dataset.captions is None:
        raise DataError(
            f"dataset {dataset.name!r} has no captions",
            hint="text-to-image runs need captions: an image folder with captions.txt "
            "(path<TAB>caption) or captions.json, or an .npz with a 'captions' array",
        )
    return list(dataset.captions)


@torch.no_grad()
def encode_images(components: Components, images: torch.Tensor, batch_size: int = 16):
    """z₀ = s · mean(E(x)) for images in [-1, 1] (N, 3, H, W) → (N, c, H/f, W/f) float32."""
    vae = components.vae
    if images.shape[1] != vae.config.in_channels:
        if images.shape[1] == 1 and vae.config.in_channels == 3:
            images = images.expand(-1, 3, -1, -1)
        else:
            raise DataError(
                f"images have {images.shape[1]} channels, the VAE takes {vae.config.in_channels}"
            )
    out = [
        vae.encode(images[s : s + batch_size]).latent_dist.mean * components.scaling_factor
        for s in range(0, images.shape[0], batch_size)
    ]
    return torch.cat(out).float()


@torch.no_grad()
def decode_latents(components: Components, latents: torch.Tensor, batch_size: int = 16):
    """x = D(z₀ / s) clamped to [-1, 1]."""
    out = [
        components.vae.decode(latents[s : s + batch_size] / components.scaling_factor).sample
        for s in range(0, latents.shape[0], batch_size)
    ]
    return torch.cat(out).float().clamp(-1, 1)


def cache_key(dataset: ImageDataset, components: Components) -> str:
    h = hashlib.sha256(b"diffattr-latent-cache-v1\0")
    h.update(dataset.fingerprint().encode())
    h.update("\0".join(require_captions(dataset)).encode())
    h.update(model_fingerprint(components.vae).encode())
    h.update(model_fingerprint(components.text_encoder).encode())
    h.update(str(components.tokenizer.model_max_length).encode())
    return h.hexdigest()[:16]


def encode_dataset(
    dataset: ImageDataset, components: Components, cache_dir: str | Path | None = None
) -> LatentSet:
    """The dataset's :class:`LatentSet`, from ``cache_dir`` when encoded before.

    Identical captions are encoded once (embeddings stored per distinct caption).
    """
    captions = require_captions(dataset)
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"{cache_key(dataset, components)}.npz"
        if path.is_file():
            return _with_sources(load_latents(path, dataset.name), dataset)
    latents = encode_images(components, dataset.images)
    distinct, inverse = np.unique(np.asarray(captions, dtype=np.str_), return_inverse=True)
    emb = encode_prompts(components, [str(c) for c in distinct])
    if path is not None:
        atomic_write_npz(
            path,
            latents=latents.numpy(),
            ids=dataset.ids.numpy(),
            captions=np.asarray(captions, dtype=np.str_),
            distinct=emb.numpy(),
            inverse=inverse.astype(np.int64),
        )
    lat = LatentSet(latents, dataset.ids.clone(), captions, emb[torch.as_tensor(inverse)])
    return _with_sources(lat, dataset)


def _with_sources(lat: LatentSet, dataset: ImageDataset) -> LatentSet:
    """``lat`` naming its images as ``dataset`` does (the cache key covers the images, not
    their file names)."""
    lat.sources = getattr(dataset, "sources", None)
    return lat


def load_latents(path: str | Path, name: str = "latents") -> LatentSet:
    """A :class:`LatentSet` written by :func:`encode_dataset`."""
    try:
        with np.load(path, allow_pickle=False) as z:
            inverse = torch.from_numpy(z["inverse"])
            return LatentSet(
                torch.from_numpy(z["latents"]),
                torch.from_numpy(z["ids"]),
                [str(c) for c in z["captions"].tolist()],
                torch.from_numpy(z["distinct"])[inverse],
                name,
            )
    except (OSError, KeyError, ValueError) as exc:
        raise DataError(
            f"cannot read latent cache {path}: {exc}", hint="delete it to re-encode"
        ) from exc
