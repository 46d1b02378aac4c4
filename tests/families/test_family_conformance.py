"""Every registered model family through the family interface, on one tiny run each: what it
loads (model, training set, noise process, targets), which methods it serves and refuses (as
its ``provides`` says), an attributor that scores, and what workers and benchmarks need."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from diffattr.attribution.methods import METHODS, get_method
from diffattr.cli import main
from diffattr.errors import ConfigError
from diffattr.families import REGISTRY, Family, family_of, get_family
from diffattr.run import RunDir

pytest.importorskip("transformers")
pytest.importorskip("peft")

Q = ["--quiet", "--threads", "1"]


def _digits_run(root: Path) -> Path:
    run = root / "pixel"
    assert main(["train", "--data", "digits", "--train-count", "12", "--val-count", "4",
                 "--steps", "2", "--batch-size", "4", "--out", str(run), *Q]) == 0  # fmt: skip
    return run


def _text2image_run(root: Path) -> Path:
    from test_imported_text2image import captioned_folder

    run = root / "t2i"
    data = captioned_folder(root / "t2i-images", 12)
    assert main(["finetune", "--base", "tiny", "--data", str(data), "--resolution", "16",
                 "--val-count", "4", "--steps", "2", "--batch-size", "4", "--lora-rank", "2",
                 "--out", str(run), *Q]) == 0  # fmt: skip
    return run


def _imported_run(root: Path) -> Path:
    from test_imported import tiny_pipeline

    run = root / "diffusers"
    model = tiny_pipeline(root / "ddpm", "v_prediction", "linear")
    assert main(["import", str(model), "--data", "digits", "--train-count", "12",
                 "--val-count", "4", "--out", str(run), *Q]) == 0  # fmt: skip
    return run


def _imported_text2image_run(root: Path) -> Path:
    from test_imported_text2image import captioned_folder

    from diffattr.text2image.pipeline import write_tiny_pipeline

    run = root / "sd"
    pipeline = write_tiny_pipeline(root / "sd-pipeline", seed=0, sample_size=8)
    data = captioned_folder(root / "sd-images", 12)
    assert main(["import", str(pipeline), "--data", str(data), "--val-count", "4",
                 "--out", str(run), *Q]) == 0  # fmt: skip
    return run


MAKERS = {
    "unconditional": _digits_run,
    "text2image": _text2image_run,
    "diffusers": _imported_run,
    "diffusers-text2image": _imported_text2image_run,
}


#: training images of each tiny run: a capped built-in (12), or 12 images less 4 held out
NUM_TRAIN = {"unconditional": 12, "text2image": 8, "diffusers": 12, "diffusers-text2image": 8}


def test_every_registered_family_is_covered():
    assert set(MAKERS) == set(REGISTRY)


@pytest.fixture(scope="module", params=sorted(MAKERS))
def family_run(request, tmp_path_factory) -> tuple[Family, RunDir]:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))  # the sibling tests' tiny-model helpers
    root = tmp_path_factory.mktemp(request.param)
    run = RunDir(MAKERS[request.param](root))
    gen = ["generate", str(run.path), "--num", "2", "--steps", "2", *Q]
    if request.param.endswith("text2image"):
        gen += ["--prompt", "a red square"]
    assert main(gen) == 0
    return get_family(request.param), run


def test_loads_what_the_engine_needs(family_run):
    family, run = family_run
    assert family_of(run) is family and family.name == run.family
    model = family.model(run)
    assert isinstance(model, torch.nn.Module) and any(p.numel() for p in model.parameters())
    train = family.train_set(run)
    n = NUM_TRAIN[family.name]
    assert len(train) == n and len(np.unique(train.ids.numpy())) == n
    schedule = family.schedule(run)
    x0 = train.images[:2]
    noise = torch.randn_like(x0)
    t = torch.tensor([0, schedule.num_train_timesteps - 1])
    assert schedule.add_noise(x0, noise, t).shape == x0.shape
    assert schedule.target(x0, noise, t).shape == x0.shape
    for spec, count in (("samples", 2), ("val", 4)):
        name, targets, ids = family.targets(run, spec)
        assert len(ids) == count and name == spec
    _, pictures, _ = family.images(run, "samples")
    assert pictures.dim() == 4 and pictures.shape[0] == 2
    json.dumps(family.job_data(run))  # what a worker receives is plain data
    assert isinstance(family.benchmark_fields(run), dict)


#: options a method cannot be built without
NEEDS_OPTIONS = {"combine": {"methods": "das+ekfac"}, "ensemble": {"base": "das", "models": "m"}}


def test_serves_exactly_the_methods_it_provides_for(family_run):
    family, _ = family_run
    for name in METHODS:
        method = get_method(name, **NEEDS_OPTIONS.get(name, {}))
        needs = method.requirements()
        if needs <= family.provides:
            family.check_method(method)
        else:
            with pytest.raises(ConfigError) as err:
                family.check_method(method)
            assert sorted(needs - family.provides)[0] in str(err.value)
            assert err.value.hint.startswith("use ")


def test_its_attributor_scores_every_target_against_every_training_image(family_run):
    family, run = family_run
    bound = family.open(run)
    att = bound.attributor("das", settings=None, progress=False)
    _, targets, ids = bound.targets("samples")
    assert bound.model is bound.model and att.model is bound.model  # loaded once
    scores = att.score(targets, ids)
    assert scores.values.shape == (2, NUM_TRAIN[family.name])
    assert np.isfinite(scores.values).all()
    assert set(scores.train_ids.tolist()) == set(family.train_set(run).ids.tolist())
