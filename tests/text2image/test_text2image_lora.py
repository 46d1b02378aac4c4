"""LoRA fine-tuning: only the adapters learn, the base weights stay, resumption is exact."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from diffattr.attribution.features.featurize import FeatureSettings, gradient_computer
from diffattr.diffusion.training import checkpoints
from diffattr.errors import CheckpointError, ConfigError
from diffattr.text2image.latents import encode_dataset, load_latents
from diffattr.text2image.lora import LORA_PARAMS, LoraSpec, attach_lora, lora_state
from diffattr.text2image.training import LoraTrainConfig, base_unet, finetune, load_finetuned


def config(base, **kw) -> LoraTrainConfig:
    from diffattr.text2image.pipeline import read_schedule

    kw = {"steps": 12, "batch_size": 4, "lr": 1e-2, "resolution": 16, "checkpoint_every": 6, **kw}
    return LoraTrainConfig(preset=str(base), schedule=read_schedule(base), **kw)


@pytest.fixture(scope="module")
def latents(components, captioned, tmp_path_factory):
    return encode_dataset(captioned, components, tmp_path_factory.mktemp("lat"))


def test_latent_cache_roundtrip(components, captioned, tmp_path):
    a = encode_dataset(captioned, components, tmp_path)
    [path] = list(tmp_path.glob("*.npz"))
    b = load_latents(path)
    assert torch.equal(a.images, b.images) and torch.equal(a.conditioning, b.conditioning)
    assert a.images.shape == (12, 4, 8, 8) and b.captions == captioned.captions
    # same caption, same embedding; other caption, other embedding
    assert torch.equal(a.conditioning[0], a.conditioning[4])
    assert not torch.equal(a.conditioning[0], a.conditioning[1])
    again = captioned.subset(np.arange(12))
    again.captions = ["x"] * 12
    assert not torch.equal(encode_dataset(again, components, tmp_path).conditioning, a.conditioning)


def test_only_lora_learns_and_base_is_untouched(tiny_pipeline, latents, tmp_path):
    cfg = config(tiny_pipeline)
    fresh = base_unet(cfg)
    base_before = {k: v.clone() for k, v in fresh.state_dict().items() if "lora_" not in k}
    trainable = [n for n, p in fresh.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # one backward pass: gradients reach the adapters only
    fresh.train()
    out = fresh(latents.images[:2], torch.tensor([10, 500]), latents.conditioning[:2]).sample
    out.pow(2).mean().backward()
    with_grad = {n for n, p in fresh.named_parameters() if p.grad is not None}
    assert with_grad == set(trainable)
    model_dir = finetune(latents, cfg, tmp_path / "ft", progress=False)
    tuned = load_finetuned(cfg, model_dir)
    for k, v in tuned.state_dict().items():
        if "lora_" not in k:
            assert torch.equal(v, base_before[k]), k
    moved = [n for n, v in lora_state(tuned).items() if not torch.equal(v, lora_state(fresh)[n])]
    assert len(moved) == len(trainable)  # every adapter weight changed


def test_lora_gradients_are_lora_only_and_match_autograd(tiny_pipeline, latents, tmp_path):
    unet = load_finetuned(
        config(tiny_pipeline), finetune(latents, config(tiny_pipeline), tmp_path, progress=False)
    )
    settings = FeatureSettings(measure="das", timesteps=2, params=LORA_PARAMS)
    schedule = config(tiny_pipeline).schedule
    gc = gradient_computer(unet, settings, schedule, latents.shape)
    n_lora = sum(v.numel() for v in lora_state(unet).values())
    assert gc.dim == n_lora and set(gc.params) == set(lora_state(unet))
    g, err, _ = gc.compute(latents.images[:2], latents.ids[:2].numpy(), latents.conditioning[:2])
    assert g.shape == (2, n_lora) and torch.isfinite(err).all()
    # the conditioning is used: other captions give other features
    g_other, _, _ = gc.compute(
        latents.images[:2], latents.ids[:2].numpy(), latents.conditioning[[1, 0]]
    )
    assert not torch.allclose(g, g_other)
    # one pair by plain autograd, against the vmapped row (unnormalised computer)
    raw = gradient_computer(unet, replace(settings, normalize=False), schedule, latents.shape)
    rows, xt, t, noise, ab = next(raw.pairs(latents.images[:1], latents.ids[:1].numpy()))
    vm, _, _ = raw.flat_grads(xt[:1], t[:1], noise[:1], ab[:1], latents.conditioning[:1])
    unet.zero_grad()
    params = dict(unet.named_parameters())
    for n in raw.params:
        params[n].requires_grad_(True)
    unet(xt[:1], t[:1], latents.conditioning[:1]).sample.mean().backward()
    direct = torch.cat([params[n].grad.reshape(-1) for n in raw.params])
    torch.testing.assert_close(vm[0], direct, rtol=1e-4, atol=1e-7)


def test_resume_gives_the_uninterrupted_weights(tiny_pipeline, latents, tmp_path):
    cfg = config(tiny_pipeline)
    whole = load_finetuned(cfg, finetune(latents, cfg, tmp_path / "a", progress=False))
    finetune(latents, cfg, tmp_path / "b", progress=False, stop_after=7)
    assert [s for s, _ in checkpoints(tmp_path / "b")] == [6]
    resumed = load_finetuned(cfg, finetune(latents, cfg, tmp_path / "b", progress=False))
    for k, v in lora_state(whole).items():
        assert torch.equal(v, lora_state(resumed)[k]), k
    # a subset and another seed give other adapters; the same seed the same initialisation
    other = load_finetuned(cfg, finetune(latents, cfg, tmp_path / "c", np.arange(6), False))
    assert any(not torch.equal(v, lora_state(other)[k]) for k, v in lora_state(whole).items())


def test_lora_options_are_checked(tiny_pipeline):
    with pytest.raises(ConfigError, match="lora-rank"):
        config(tiny_pipeline, lora_rank=0).validate()
    unet = base_unet(config(tiny_pipeline))
    with pytest.raises(ConfigError, match="LoRA"):
        attach_lora(unet, LoraSpec(2, None, ("no_such_module",)), 0)
    with pytest.raises(CheckpointError, match="no text-to-image pipeline"):
        base_unet(config("/nonexistent/pipeline"))
