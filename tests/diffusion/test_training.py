import numpy as np
import pytest
import torch

from diffattr.diffusion import training as training_mod
from diffattr.diffusion.presets import count_parameters, load_unet, model_fingerprint
from diffattr.diffusion.training import BatchStream, TrainConfig, initial_model, train
from diffattr.errors import CheckpointError, DataError


def cfg(**kw) -> TrainConfig:
    base = dict(steps=6, batch_size=8, checkpoint_every=3, warmup_steps=2)
    base.update(kw)
    return TrainConfig(**base)


def test_tiny_preset_size():
    model = initial_model(TrainConfig(), 8, 1)
    assert 300_000 <= count_parameters(model) <= 600_000


def test_cifar_preset_size():
    from diffattr.diffusion.presets import build_unet

    n = count_parameters(build_unet("cifar", 32, 3))
    assert abs(n - 35.7e6) < 0.1e6


def test_initial_weights_depend_only_on_seed():
    a = initial_model(cfg(seed=3), 8, 1)
    b = initial_model(cfg(seed=3), 8, 1)
    c = initial_model(cfg(seed=4), 8, 1)
    assert model_fingerprint(a) == model_fingerprint(b) != model_fingerprint(c)


def test_resume_equals_straight_through(tmp_path, small_set):
    straight = train(small_set, cfg(), tmp_path / "a", progress=False)
    train(small_set, cfg(), tmp_path / "b", progress=False, stop_after=3)
    assert not (tmp_path / "b" / "model").exists()
    resumed = train(small_set, cfg(), tmp_path / "b", progress=False)
    assert model_fingerprint(load_unet(straight)) == model_fingerprint(load_unet(resumed))


def test_resume_after_partial_step_without_checkpoint(tmp_path, small_set):
    """Stopping between checkpoints loses only the steps since the last one."""
    straight = train(small_set, cfg(), tmp_path / "a", progress=False)
    train(small_set, cfg(), tmp_path / "b", progress=False, stop_after=4)  # ckpt at 3 only
    resumed = train(small_set, cfg(), tmp_path / "b", progress=False)
    assert model_fingerprint(load_unet(straight)) == model_fingerprint(load_unet(resumed))


def test_finished_run_with_other_settings_is_refused(tmp_path, small_set):
    train(small_set, cfg(), tmp_path / "a", progress=False)
    with pytest.raises(CheckpointError, match="different config"):
        train(small_set, cfg(lr=1e-4), tmp_path / "a", progress=False)


def test_empty_subset_is_refused(tmp_path, small_set):
    with pytest.raises(DataError, match="empty"):
        train(small_set, cfg(), tmp_path, subset=np.array([], dtype=np.int64), progress=False)


def test_batch_stream_covers_each_item_once_per_epoch():
    s = BatchStream(10, 4, seed=1)
    seen = np.concatenate([s.batch(k)[0] for k in range(5)])  # 20 elements = 2 epochs
    visits = np.concatenate([s.batch(k)[1] for k in range(5)])
    for e in (0, 1):
        assert sorted(seen[visits == e].tolist()) == list(range(10))


def test_per_sample_stream_independent_of_other_samples(tmp_path, small_set, monkeypatch):
    """A sample's (t, noise) at visit n is the same whichever other samples are trained on."""
    calls: dict[str, dict[tuple[int, int], tuple[int, torch.Tensor]]] = {}
    original = training_mod.visit_noise

    def recording(tag):
        def wrapped(seed, sample_id, visit, shape, T):
            t, n = original(seed, sample_id, visit, shape, T)
            calls.setdefault(tag, {})[(sample_id, visit)] = (t, n)
            return t, n

        return wrapped

    monkeypatch.setattr(training_mod, "visit_noise", recording("a"))
    train(small_set, cfg(steps=4), tmp_path / "a", subset=np.arange(0, 16), progress=False)
    monkeypatch.setattr(training_mod, "visit_noise", recording("b"))
    train(small_set, cfg(steps=4), tmp_path / "b", subset=np.arange(8, 24), progress=False)
    shared = set(calls["a"]) & set(calls["b"])
    assert len(shared) >= 8
    for key in shared:
        ta, na = calls["a"][key]
        tb, nb = calls["b"][key]
        assert ta == tb and torch.equal(na, nb)


def test_presets_from_config_json_and_saved_model(tmp_path, small_set):
    import json

    from diffattr.diffusion.presets import build_unet, unet_config
    from diffattr.errors import ConfigError

    cfg_path = tmp_path / "unet.json"
    cfg_path.write_text(json.dumps(unet_config("tiny", 8, 1)))
    assert count_parameters(build_unet(str(cfg_path), 8, 1)) == count_parameters(
        build_unet("tiny", 8, 1)
    )
    with pytest.raises(ConfigError, match="unknown model preset"):
        build_unet("huge", 8, 1)
    # A saved model directory is a starting point: training continues from its weights.
    first = train(small_set, cfg(), tmp_path / "a", progress=False)
    start = initial_model(cfg(preset=str(first)), 8, 1)
    assert model_fingerprint(start) == model_fingerprint(load_unet(first))
    with pytest.raises(CheckpointError, match="images"):
        initial_model(cfg(preset=str(first)), 16, 1)
