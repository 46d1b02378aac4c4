"""The latent text-to-image family: LoRA adapters fine-tuned on a text-to-image pipeline.

A text-to-image run (``"family": "text2image"``, made by ``diffattr finetune``) holds LoRA
weights in ``RUN/model/lora.safetensors`` on top of a base pipeline folder (``train.preset``: a
local Stable Diffusion snapshot, or ``RUN/base`` for ``--base tiny``), the cached latents and
caption embeddings of its data in ``RUN/latents/``, and the usual ``samples/``, ``features/``,
``scores/``. Attribution works in latent space: training samples are (z₀, h(caption)), targets
are (final latent, h(prompt)); features are gradients of the engine's measures of the
conditional UNet output with respect to the LoRA parameters only (the default ``params``).

Retraining (LDS, counterfactual) fine-tunes LoRA on a subset: every retrained model starts from
the same base weights and seeded LoRA initialisation and sees the same per-sample noise, so
subset models differ only through their data; regeneration replays each seed's prompt.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffattr.attribution.methods import MODEL_INPUTS
from diffattr.errors import DiffattrError
from diffattr.families import Family, given_images, is_samples_file, samples_path
from diffattr.families.weights import Weights
from diffattr.run import TEXT2IMAGE, RunDir
from diffattr.text2image.latents import LatentSet, encode_dataset
from diffattr.text2image.lora import LORA_PARAMS
from diffattr.text2image.pipeline import Components, encode_prompts, load_components


def components(run: RunDir, unet: bool = False) -> Components:
    """The run's base pipeline (without its UNet unless asked: encoding only)."""
    from diffattr.families import family_of

    return family_of(run).components(run, unet)


def latents_path(run: RunDir, comps: Components | None = None) -> Path:
    """The cache file of the run's training latents (encoded now if missing)."""
    from diffattr.text2image.latents import cache_key

    comps = comps or components(run)
    train_set, _ = run.data_spec().load()
    path = run.path / "latents" / f"{cache_key(train_set, comps)}.npz"
    if not path.is_file():
        encode_dataset(train_set, comps, run.path / "latents")
    return path


def train_latents(run: RunDir, comps: Components | None = None) -> LatentSet:
    """The run's training set in latent space (cached in ``RUN/latents``)."""
    from diffattr.text2image.latents import load_latents

    return load_latents(latents_path(run, comps), "train")


class FinetunedLora(Weights):
    """LoRA adapters fine-tuned by ``diffattr finetune`` (``RUN/model/lora.safetensors``) on
    the base pipeline named in the run's training settings."""

    def base(self, run: RunDir, family: Any) -> Path:
        """The base pipeline folder."""
        return Path(family.train_config(run).preset)

    def resolution(self, run: RunDir, family: Any) -> int:
        """The side of the run's images in pixels."""
        return int(family.train_config(run).resolution)

    def components(self, run: RunDir, family: Any, unet: bool) -> Components:
        return load_components(family.base(run), unet=unet)

    def model(self, run: RunDir, family: Any) -> torch.nn.Module:
        if not (run.model_dir / "lora.safetensors").is_file():
            raise DiffattrError(
                f"{run.path} has no fine-tuned LoRA weights (model/lora.safetensors)",
                hint=f"finish the fine-tuning: rerun `diffattr finetune ... --out {run.path}`",
            )
        return family.load_trained(family.train_config(run), run.model_dir)

    def adapted(self, run: RunDir) -> bool:
        """Whether the model has LoRA adapters (features default to their parameters)."""
        return True


class TextToImageFamily(Family):
    """Latent text-to-image diffusion: the conditional UNet of a pipeline on latents with
    caption embeddings, with LoRA adapters fine-tuned by diffattr (:class:`FinetunedLora`) or
    a user's imported pipeline
    (:class:`~diffattr.families.imported_text2image.ImportedPipeline`)."""

    # EK-FAC (kronfluence) calls the conditional UNet on (x_t, t, caption embedding) itself,
    # its tracked layers the run's --params (the LoRA layers of a run with adapters)
    modality_provides = frozenset({MODEL_INPUTS})
    retrains, train_command = "the model's LoRA adapters", "diffattr finetune"

    def __init__(self, name: str = TEXT2IMAGE, weights: Weights | None = None) -> None:
        super().__init__(name, weights or FinetunedLora())

    def config_from_dict(self, data: dict[str, Any]) -> Any:
        from diffattr.text2image.training import LoraTrainConfig

        return LoraTrainConfig.from_dict(data)

    def schedule_from_config(self, config: dict[str, Any]) -> Any:
        from diffattr.text2image.pipeline import schedule_from_config

        return schedule_from_config(config)

    def base(self, run: RunDir) -> Path:
        """The base pipeline folder."""
        return self.weights.base(run, self)

    def resolution(self, run: RunDir) -> int:
        """The side of the run's images in pixels."""
        return self.weights.resolution(run, self)

    def components(self, run: RunDir, unet: bool = False) -> Components:
        """The base pipeline's parts (without its UNet unless asked: encoding only)."""
        return self.weights.components(run, self, unet)

    def model(self, run: RunDir) -> torch.nn.Module:
        """The base UNet with the run's LoRA adapters (an imported pipeline's UNet, with its
        adapters when it has some)."""
        return self.weights.model(run, self)

    def train_set(self, run: RunDir) -> Any:
        return train_latents(run)

    def feature_settings(self, run: RunDir, settings: Any) -> Any:
        """The LoRA parameters by default when the model has adapters, else all of the
        UNet's (or those ``--params`` selects)."""
        if settings.params is None and self.weights.adapted(run):
            return replace(settings, params=LORA_PARAMS)
        return settings

    def targets(self, run: RunDir, spec: str) -> tuple[str, Any, np.ndarray]:
        """Latents with caption embeddings: ``samples`` (final latents and prompts), ``val``
        (encoded held-out images and captions), a samples ``.npz``, or captioned images a
        user gives (an image folder with ``captions.txt``/``captions.json``, or an ``.npz``
        with ``captions``: encoded as the training images are)."""
        from diffattr.text2image.sampling import load_text_samples

        comps = components(run)
        if spec == "val":
            _, val = run.data_spec().load()
            lat = encode_dataset(val, comps, run.path / "latents")
            lat.name = "val"
            return "val", lat, val.ids.numpy()
        path = Path(spec)
        if spec != "samples" and not is_samples_file(path):
            given = given_images(run, path)
            lat = encode_dataset(given, comps, run.path / "latents")
            lat.name = path.stem
            return path.stem, lat, given.ids.numpy()
        path = samples_path(run, spec)
        s = load_text_samples(path)
        name = "samples" if spec == "samples" else path.stem
        ids = torch.arange(len(s), dtype=torch.int64)
        targets = LatentSet(
            s.latents.float(), ids, list(s.prompts), encode_prompts(comps, s.prompts), "targets"
        )
        return name, targets, ids.numpy()

    def generate(self, run: RunDir, seeds: np.ndarray, out: Path, **options: Any) -> Path:
        """Options: ``prompts`` (cycled over the seeds; default: the run's distinct training
        captions), ``num_steps``, ``guidance_scale``, ``progress``; DDIM only."""
        from diffattr.diffusion.presets import model_fingerprint
        from diffattr.errors import ConfigError
        from diffattr.text2image.sampling import generate, save_text_samples

        if options.get("sampler", "ddim") != "ddim" or options.get("trajectory"):
            raise ConfigError("text-to-image runs sample with DDIM only (no --trajectory)")
        prompts = list(options.get("prompts") or [])
        if not prompts:
            train_set, _ = run.data_spec().load()
            prompts = sorted(set(train_set.captions or []))
        if not prompts:
            raise ConfigError("no prompts", hint="pass --prompt TEXT or --prompts FILE")
        unet = self.model(run)
        result = generate(
            components(run), unet, [prompts[i % len(prompts)] for i in range(len(seeds))],
            seeds, self.resolution(run), num_steps=options["num_steps"],
            guidance_scale=options.get("guidance_scale", 1.0),
            progress=options.get("progress", True),
        )  # fmt: skip
        return save_text_samples(result, out, model_fingerprint(unet))

    # ------------------------------------------------------------------ retraining
    def job_data(self, run: RunDir) -> dict[str, Any]:
        """The run's cached latents: what a worker fine-tunes on."""
        return {"latents": str(latents_path(run))}

    def retrain_data(self, run: RunDir, samples_path: Path) -> dict[str, Any]:
        """The latents, and the prompt of every seed and the guidance scale."""
        from diffattr.text2image.sampling import load_text_samples

        s = load_text_samples(samples_path)
        prompts = zip(s.samples.seeds, s.prompts, strict=True)
        return {
            **self.job_data(run),
            "prompts": {str(int(seed)): p for seed, p in prompts},
            "guidance_scale": s.guidance_scale,
        }

    def retrain_set(self, data: dict[str, Any]) -> Any:
        from diffattr.text2image.latents import load_latents

        return load_latents(data["latents"])

    def train_model(
        self, dataset: Any, config: Any, out_dir: Path, subset: np.ndarray, device: str = "cpu"
    ) -> Path:
        from diffattr.text2image.training import finetune

        return finetune(dataset, config, out_dir, subset=subset, progress=False)

    def load_trained(self, config: Any, model_dir: Path) -> torch.nn.Module:
        """A model ``diffattr finetune`` wrote (a folder), or LoRA weights as diffusers saves
        them (a file: an imported run's own adapters, read as its import accepted them), on
        the base pipeline's UNet."""
        from diffattr.text2image.lora import load_adapted_unet
        from diffattr.text2image.training import load_finetuned

        if Path(model_dir).is_file():
            return load_adapted_unet(Path(config.preset), Path(model_dir), allow_pickle=True)
        return load_finetuned(config, model_dir)

    def regenerate(
        self,
        model: torch.nn.Module,
        data: dict[str, Any],
        config: Any,
        seeds: list[int],
        sampler: str,
        num_steps: int,
    ) -> np.ndarray:
        from diffattr.text2image.sampling import generate

        comps = load_components(config.preset, unet=False)
        out = []
        for seed in seeds:
            result = generate(
                comps, model, [data["prompts"][str(seed)]], [seed], config.resolution,
                num_steps=num_steps, guidance_scale=float(data["guidance_scale"]),
                batch_size=1, progress=False,
            )  # fmt: skip
            out.append(result.samples.images[0].numpy().astype(np.float32))
        return np.stack(out)

    def benchmark_fields(self, run: RunDir) -> dict[str, Any]:
        return self.job_data(run)

    def benchmark_train_set(self, manifest: dict[str, Any]) -> Any:
        from diffattr.text2image.latents import load_latents

        return load_latents(manifest["latents"])

    def lds_targets(
        self, run: RunDir, val_set: Any, num_val: int, seeds: np.ndarray, progress: bool = True
    ) -> dict[str, np.ndarray]:
        """Held-out captioned images (encoded latents, caption embeddings), then images
        generated from the distinct training captions in turn (final latents, prompt
        embeddings), with their prompts."""
        from diffattr.text2image.sampling import generate

        comps = components(run)
        val = encode_dataset(val_set.subset(np.arange(num_val)), comps) if num_val else None
        train_set, _ = run.data_spec().load()
        captions = sorted(set(train_set.captions or [""]))
        prompts = [captions[i % len(captions)] for i in range(len(seeds))]
        parts_z, parts_h = [], []
        if val is not None:
            parts_z.append(val.images)
            parts_h.append(val.conditioning)
        if len(seeds):
            gen = generate(
                comps, self.model(run), prompts, seeds, self.resolution(run),
                progress=progress,
            )  # fmt: skip
            parts_z.append(gen.latents)
            parts_h.append(encode_prompts(comps, prompts))
        return {
            "images": torch.cat(parts_z).numpy().astype(np.float32),
            "conditioning": torch.cat(parts_h).numpy().astype(np.float32),
            "prompts": np.asarray([*(val.captions if val is not None else []), *prompts], np.str_),
        }
