"""diffattr.diffusion.schedule: ᾱ as diffusers computes it, the three prediction targets, and
noise that depends only on its keys."""

import pytest
import torch
from diffusers import DDPMScheduler

from diffattr.diffusion.schedule import (
    ATTRIBUTION_NOISE_KEY,
    NoiseSchedule,
    keyed_noise,
    visit_noise,
)
from diffattr.errors import ConfigError


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}],
)
def test_alpha_bar_equals_diffusers(kwargs):
    ours = NoiseSchedule(**kwargs).alphas_cumprod()
    theirs = DDPMScheduler(
        num_train_timesteps=1000,
        **{"beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear", **kwargs},
    ).alphas_cumprod
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


def test_a_models_own_cosine_schedule_is_followed():
    config = {"_class_name": "DDIMScheduler", "beta_schedule": "squaredcos_cap_v2",
              "num_train_timesteps": 500, "prediction_type": "v_prediction"}  # fmt: skip
    s = NoiseSchedule.from_scheduler_config(config)
    assert s.num_train_timesteps == 500 and s.prediction_type == "v_prediction"
    want = DDPMScheduler.from_config({k: v for k, v in config.items() if k[0] != "_"})
    torch.testing.assert_close(s.alphas_cumprod(), want.alphas_cumprod)
    with pytest.raises(ConfigError, match="not a DDPM-type scheduler"):
        NoiseSchedule.from_scheduler_config({"_class_name": "KarrasVeScheduler"})
    with pytest.raises(ConfigError, match="unsupported beta schedule"):
        NoiseSchedule(beta_schedule="squaredcos_cap_v2")  # only with the model's own config


def test_targets_of_each_prediction_type():
    x0, eps, t = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4), torch.tensor([10, 900])
    ab = NoiseSchedule().alphas_cumprod()[t].view(-1, 1, 1, 1)
    xt = NoiseSchedule().add_noise(x0, eps, t)
    torch.testing.assert_close(xt, ab.sqrt() * x0 + (1 - ab).sqrt() * eps)
    assert torch.equal(NoiseSchedule().target(x0, eps, t), eps)
    assert torch.equal(NoiseSchedule(prediction_type="sample").target(x0, eps, t), x0)
    v = NoiseSchedule(prediction_type="v_prediction").target(x0, eps, t)
    torch.testing.assert_close(v, ab.sqrt() * eps - (1 - ab).sqrt() * x0)
    # x₀ is recovered from x_t and v exactly as diffusers does: x₀ = √ᾱ x_t − √(1−ᾱ) v
    torch.testing.assert_close(ab.sqrt() * xt - (1 - ab).sqrt() * v, x0, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="unsupported prediction type"):
        NoiseSchedule(prediction_type="flow")


def test_noise_depends_only_on_its_keys():
    a = keyed_noise(ATTRIBUTION_NOISE_KEY, 0, 5, 100, (3, 4))
    torch.randn(10)  # the global stream plays no part
    assert torch.equal(a, keyed_noise(ATTRIBUTION_NOISE_KEY, 0, 5, 100, (3, 4)))
    assert not torch.equal(a, keyed_noise(ATTRIBUTION_NOISE_KEY, 0, 5, 101, (3, 4)))
    t1, n1 = visit_noise(0, 7, 3, (2, 2), 1000)
    t2, n2 = visit_noise(0, 7, 3, (2, 2), 1000)
    assert t1 == t2 and torch.equal(n1, n2) and 0 <= t1 < 1000
    assert not torch.equal(n1, visit_noise(0, 7, 4, (2, 2), 1000)[1])
