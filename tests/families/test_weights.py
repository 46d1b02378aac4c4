"""families.weights: a family is a modality holding a weights source — what methods may use is
the modality's offer as far as the weights allow, and imported weights need the settings
given at import to retrain."""

from __future__ import annotations

import pytest

from diffattr.attribution.methods import CHECKPOINTS, MODEL_INPUTS, TRAJECTORIES, get_method
from diffattr.errors import ConfigError
from diffattr.families import get_family
from diffattr.families.imported import ImportedUNet
from diffattr.families.pixel import PixelFamily, TrainedUNet
from diffattr.families.text2image import FinetunedLora, TextToImageFamily
from diffattr.families.weights import ImportedWeights
from diffattr.run import RunDir


def test_the_registered_families_are_two_modalities_on_two_weight_sources():
    pixel, imported = get_family("unconditional"), get_family("diffusers")
    t2i, imported_t2i = get_family("text2image"), get_family("diffusers-text2image")
    assert type(pixel) is type(imported) is PixelFamily  # no subclass per weight source
    assert type(t2i) is type(imported_t2i) is TextToImageFamily
    assert isinstance(pixel.weights, TrainedUNet) and isinstance(imported.weights, ImportedUNet)
    assert isinstance(t2i.weights, FinetunedLora)
    assert isinstance(imported_t2i.weights, ImportedWeights)


def test_what_a_family_provides_is_the_modality_offer_the_weights_allow():
    pixel, imported = get_family("unconditional"), get_family("diffusers")
    assert {CHECKPOINTS, TRAJECTORIES} <= pixel.provides
    assert not {CHECKPOINTS, TRAJECTORIES} & imported.provides  # no training history
    assert MODEL_INPUTS in imported.provides and MODEL_INPUTS in get_family("text2image").provides
    with pytest.raises(ConfigError, match="tracin is not available for diffusers runs"):
        imported.check_method(get_method("tracin"))
    pixel.check_method(get_method("tracin"))


def test_imported_weights_without_training_settings_say_how_to_add_them(tmp_path):
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.update("family", "diffusers")
    run.update("source", {"scheduler_config": {"num_train_timesteps": 1000}})
    family = get_family("diffusers")
    with pytest.raises(ConfigError, match="imported without training settings") as err:
        family.train_config(run)
    assert "--train-config" in err.value.hint and "diffattr train" in err.value.hint
    with pytest.raises(ConfigError, match="LoRA adapters"):
        get_family("diffusers-text2image").train_config(run)
    assert family.weights.scheduler_config(run) == {"num_train_timesteps": 1000}
