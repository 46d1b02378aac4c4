"""TracInCP / GAS against explicit per-checkpoint gradient dot products and cosines."""

import json

import numpy as np
import pytest
import torch

from diffattr.attribution.attributor import Attributor
from diffattr.attribution.features.featurize import FeatureSettings
from diffattr.attribution.features.gradients import GradientComputer, TimestepSpec
from diffattr.attribution.features.measure import make_measure
from diffattr.attribution.kernel.ridge import Ridge
from diffattr.attribution.methods import ScoreInputs, get_method
from diffattr.attribution.methods.tracin import resolve_checkpoints, tracin_scores
from diffattr.diffusion.presets import build_unet
from diffattr.diffusion.schedule import NoiseSchedule
from diffattr.errors import ConfigError

NAMES = ["conv_out.weight", "conv_out.bias"]
SETTINGS = FeatureSettings(timesteps=2, params="^conv_out", projector="identity")


def checkpoints():
    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        out.append(build_unet("tiny", 8, 1).eval())
    return out


def explicit(models, train, targets, lrs, kind):
    total = 0.0
    for m, eta in zip(models, lrs, strict=True):
        gc = GradientComputer(
            m, make_measure("loss"), NoiseSchedule(), TimestepSpec(2), param_names=NAMES
        )
        phi = gc.compute(train.images, train.ids.numpy())[0].double().numpy()
        tphi = gc.compute(targets, np.arange(len(targets)))[0].double().numpy()
        if kind == "cos":
            phi = phi / np.linalg.norm(phi, axis=1, keepdims=True)
            tphi = tphi / np.linalg.norm(tphi, axis=1, keepdims=True)
        total = total + eta * tphi @ phi.T
    return total


@pytest.fixture
def data(digits):
    return digits.subset(np.arange(12)), digits.images[100:103]


def test_tracin_and_gas_equal_explicit(data, tmp_path):
    train, targets = data
    models = checkpoints()
    lrs = [0.5, 2.0]
    for kind in ("dot", "cos"):
        got = tracin_scores(
            models, train, targets, SETTINGS, tmp_path, kind=kind, learning_rates=lrs
        )
        np.testing.assert_allclose(got, explicit(models, train, targets, lrs, kind), rtol=1e-5)
    # one store per checkpoint and role, reused by the second kind
    assert len(list(tmp_path.glob("train-loss-*-ckpt*"))) == 2
    with pytest.raises(ConfigError, match="learning rates"):
        tracin_scores(models, train, targets, SETTINGS, tmp_path, learning_rates=[1.0])


def test_registered_methods_and_run_directory(data, tmp_path):
    train, targets = data
    models = checkpoints()
    run = tmp_path / "run"
    for step, m in zip((500, 1000), models, strict=True):
        d = run / "checkpoints" / f"step-{step:07d}"
        m.save_pretrained(d / "ema")
        (d / "state.json").write_text(json.dumps({"step": step}))
    assert [label for label, _ in resolve_checkpoints(run)] == ["step-500", "step-1000"]

    inputs = ScoreInputs.of(
        train_images=train.images,
        target_images=targets,
        train_ids=train.ids.numpy(),
        target_ids=np.arange(3),
        settings=SETTINGS,
        store_dir=tmp_path / "f",
        schedule=NoiseSchedule(),
    )
    gas = get_method("gas", checkpoints=str(run))
    np.testing.assert_allclose(
        gas.score(inputs), explicit(models, train, targets, [1, 1], "cos"), rtol=1e-5
    )
    assert gas.score_meta["checkpoints"] == ["step-500", "step-1000"]
    with pytest.raises(ConfigError, match="needs checkpoints"):
        get_method("tracin").score(inputs)

    att = Attributor(
        models[0], train, tmp_path / "f", method="tracin", settings=SETTINGS, progress=False,
        checkpoints=models,
    )  # fmt: skip
    scores = att.score(targets)
    np.testing.assert_allclose(
        scores.values, explicit(models, train, targets, [1, 1], "dot"), rtol=1e-5
    )
    scores.save(tmp_path / "out")  # options with models are JSON-safe in the meta


def test_checkpoints_default_to_the_run_and_gas_takes_no_lambda(data, tmp_path):
    train, targets = data
    models = checkpoints()
    run = tmp_path / "run"
    for step, m in zip((1, 2), models, strict=True):
        m.save_pretrained(run / "checkpoints" / f"step-{step:07d}" / "ema")
        (run / "checkpoints" / f"step-{step:07d}" / "state.json").write_text("{}")
    gas = get_method("gas")
    options = gas.options_from({"run_dir": str(run), "noise_seed": 3}, {})
    assert options == {"checkpoints": str(run)}
    att = Attributor(
        models[1], train, tmp_path / "f", method="gas", settings=SETTINGS, progress=False,
        **options,
    )  # fmt: skip
    got = att.method.score_grid(
        att.inputs(targets, targets, np.arange(3)), [Ridge("relative", 0.1), None]
    )
    assert len(got) == 1  # no λ
    np.testing.assert_allclose(got[0], explicit(models, train, targets, [1, 1], "cos"), 1e-5)
