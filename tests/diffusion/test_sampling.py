import numpy as np
import pytest
import torch

from diffattr.diffusion.sampling import load_samples, sample, save_samples
from diffattr.errors import ConfigError, DataError


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_generation_is_bit_identical(tiny_model, sampler):
    a = sample(tiny_model, [5, 6, 7], sampler=sampler, num_steps=5, progress=False)
    b = sample(tiny_model, [5, 6, 7], sampler=sampler, num_steps=5, progress=False)
    assert torch.equal(a.images, b.images)
    assert a.images.shape == (3, 1, 8, 8)


def test_initial_noise_depends_only_on_seed(tiny_model):
    a = sample(tiny_model, [1, 2, 3], num_steps=3, progress=False, batch_size=3)
    b = sample(tiny_model, [3], num_steps=3, progress=False)
    assert torch.equal(a.initial_noise[2], b.initial_noise[0])
    assert torch.allclose(a.images[2], b.images[0], atol=1e-5)


def test_trajectory_reproduces_image(tiny_model):
    s = sample(tiny_model, [0, 1], num_steps=4, record_trajectory=True, progress=False)
    assert s.trajectory.shape == (4, 2, 1, 8, 8)
    assert torch.equal(s.trajectory[0], s.initial_noise)


def test_save_and_load_round_trip(tmp_path, tiny_model):
    s = sample(tiny_model, np.array([3, 4]), num_steps=3, progress=False)
    save_samples(s, tmp_path)
    back = load_samples(tmp_path / "samples.npz")
    assert torch.equal(back.images, s.images) and list(back.seeds) == [3, 4]
    assert (tmp_path / "grid.png").is_file() and len(list((tmp_path / "images").iterdir())) == 2


def test_missing_seeds_is_a_clear_error(tmp_path):
    np.savez(tmp_path / "x.npz", images=np.zeros((2, 1, 8, 8), np.float32))
    with pytest.raises(DataError, match="seeds"):
        load_samples(tmp_path / "x.npz")


def test_bad_sampler(tiny_model):
    with pytest.raises(ConfigError):
        sample(tiny_model, [0], sampler="euler", progress=False)
