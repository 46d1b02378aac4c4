"""AbU and MUCS (attribution by unlearning the target): a training image used as the target
ranks first; scores are deterministic, independent of the loss-pass batch size and exactly 0
without unlearning; options are checked; both run through `diffattr score` on a digits run and
on an imported v-prediction DDPMPipeline; families that cannot serve them refuse them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from diffattr.attribution.inputs import ScoreInputs
from diffattr.attribution.methods import TRAINING_LOSS, get_method
from diffattr.attribution.methods.unlearning import sigma_timesteps, uniform_timesteps
from diffattr.cli import main
from diffattr.diffusion.schedule import NoiseSchedule
from diffattr.errors import ConfigError
from diffattr.families import get_family

#: Small settings: seconds per call on one thread (η and lr suited to N = 8).
ABU = {"eta": 1e-5, "timesteps": 16, "draws": 128, "fisher_draws": 4}
MUCS = {"lr": 3e-3, "timesteps": 8, "max_steps": 8, "retain_batch": 8, "forget_batch": 8}


@pytest.fixture(scope="module")
def trained(digits):
    """8 digit images and a small UNet fitted to them for a few seconds (an untrained
    network's gradients are much the same for every image)."""
    from diffusers import UNet2DModel

    from diffattr.attribution.methods.unlearning import pair_losses

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = digits.subset(np.arange(8))
        torch.manual_seed(0)
        model = UNet2DModel(
            sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
            block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8,
        )  # fmt: skip
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(0)
        for _ in range(200):
            t = torch.randint(1000, (8,), generator=g)
            loss = pair_losses(
                model, NoiseSchedule(), data.images, torch.randn(8, 1, 8, 8, generator=g), t
            )
            opt.zero_grad()
            loss.mean().backward()
            opt.step()
        return data, model.eval()
    finally:
        torch.set_num_threads(old)


def score(trained, method: str, targets: torch.Tensor, batch_size: int = 8, **options):
    data, model = trained
    inputs = ScoreInputs.of(
        train_images=data.images, target_images=targets, num_train=len(data),
        num_targets=len(targets), train_ids=data.ids.numpy(), target_ids=np.arange(len(targets)),
        model=model, schedule=NoiseSchedule(), batch_size=batch_size,
    )  # fmt: skip
    m = get_method(method, **options)
    return m.score(inputs), m.score_meta


@pytest.mark.parametrize("method,options", [("abu", ABU), ("mucs", MUCS)])
def test_a_training_image_as_target_ranks_first(trained, method, options):
    data, _ = trained
    values, meta = score(trained, method, data.images, **options)
    assert values.shape == (8, 8) and np.isfinite(values).all()
    assert values.argmax(axis=1).tolist() == list(range(8))
    assert meta["target_loss_ratio"]["min"] > 1  # the target was unlearned


@pytest.mark.parametrize("method,options", [("abu", ABU), ("mucs", MUCS)])
def test_deterministic_and_independent_of_the_batch_size(trained, digits, method, options):
    targets = digits.images[100:102]
    a, _ = score(trained, method, targets, **options)
    b, _ = score(trained, method, targets, **options)
    assert np.array_equal(a, b)
    other, _ = score(trained, method, targets, batch_size=3, **options)
    np.testing.assert_allclose(other, a, rtol=0, atol=1e-4 * np.abs(a).max())
    assert not np.array_equal(score(trained, method, targets, seed=1, **options)[0], a)
    alone, _ = score(trained, method, targets[1:], **options)  # other targets do not matter
    assert np.array_equal(alone[0], a[1])


@pytest.mark.parametrize(
    "method,options",
    [("abu", {**ABU, "eta": 0.0}), ("abu", {**ABU, "steps": 0}),
     ("mucs", {**MUCS, "max_steps": 0}), ("mucs", {**MUCS, "lr": 0.0})],
)  # fmt: skip
def test_no_unlearning_gives_exactly_zero(trained, digits, method, options):
    values, _ = score(trained, method, digits.images[100:102], **options)
    assert values.shape == (2, 8) and np.all(values == 0.0)


def test_v_and_x0_prediction_models_are_scored_on_their_own_targets(trained, digits):
    """The loss is taken against NoiseSchedule.target: an x₀-prediction schedule gives other
    scores than ε-prediction on the same weights (no ε-only shortcut)."""
    data, model = trained
    eps, _ = score(trained, "abu", digits.images[100:101], **ABU)
    inputs = ScoreInputs.of(
        train_images=data.images, target_images=digits.images[100:101], num_train=len(data),
        num_targets=1, model=model, schedule=NoiseSchedule(prediction_type="sample"),
    )  # fmt: skip
    x0 = get_method("abu", **ABU).score(inputs)
    assert np.isfinite(x0).all() and not np.allclose(x0, eps)


def test_the_fisher_is_the_mean_squared_per_sample_gradient(trained):
    """diagonal_fisher (batched per-sample gradients) against one backward pass per draw."""
    from diffattr.attribution.methods.unlearning import ABU_FISHER_KEY, diagonal_fisher, pair_losses
    from diffattr.seeding import generator

    data, model = trained
    schedule, names = NoiseSchedule(prediction_type="v_prediction"), ["conv_in.weight"]
    names += [n for n, _ in model.named_parameters() if n.startswith("conv_out")]
    images, ids = data.images[:3], data.ids.numpy()[:3]
    got = diagonal_fisher(model, schedule, images, ids, names, draws=2, seed=5)
    params = dict(model.named_parameters())
    want = {n: torch.zeros_like(params[n], dtype=torch.float64) for n in names}
    for row, sid in enumerate(ids.tolist()):
        for r in range(2):
            g = generator(ABU_FISHER_KEY, 5, sid, r)
            t = torch.randint(1000, (1,), generator=g)
            eps = torch.randn((1, 1, 8, 8), generator=g)
            loss = pair_losses(model, schedule, images[row : row + 1], eps, t).sum()
            grads = torch.autograd.grad(loss, [params[n] for n in names])
            for n, grad in zip(names, grads, strict=True):
                want[n] += grad.double().pow(2) / 6
    for n in names:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-12)


def test_an_option_the_method_does_not_take_is_refused_with_those_it_does():
    with pytest.raises(ConfigError) as info:
        get_method("abu", lr=1e-3)
    assert "method 'abu' has no option 'lr'" in str(info.value)
    for name in ("eta", "steps", "draws", "damping", "fisher_draws", "timesteps", "seed"):
        assert name in info.value.hint
    with pytest.raises(ConfigError) as info:
        get_method("mucs", eta=1.0)
    assert "'eta'" in str(info.value) and "max_steps" in info.value.hint
    bad = ScoreInputs.of(
        train_images=torch.zeros(2, 1, 8, 8), target_images=torch.zeros(1, 1, 8, 8),
        model=torch.nn.Identity(),
    )  # fmt: skip
    with pytest.raises(ConfigError, match="abu eta must be ≥ 0"):
        get_method("abu", eta=-1.0).score(bad)
    with pytest.raises(ConfigError, match="mucs tol"):
        get_method("mucs", tol=1.0).score(bad)


def test_families_that_cannot_serve_them_refuse_them():
    for name in ("unconditional", "diffusers"):
        assert TRAINING_LOSS in get_family(name).provides
    for method in ("abu", "mucs"):
        with pytest.raises(ConfigError) as info:
            get_family("text2image").check_method(get_method(method))
        assert f"{method} is not available for text2image runs (it needs training-loss)" in str(
            info.value
        )


def test_timestep_grids():
    assert uniform_timesteps(20, 1000).tolist() == list(range(0, 1000, 50))
    assert uniform_timesteps(50, 20).tolist() == list(range(20))
    ts = sigma_timesteps(NoiseSchedule(), 100)
    assert ts[0] == 999 and len(ts) == 100 and np.all(np.diff(ts) <= 0)
    ab = NoiseSchedule().alphas_cumprod().double()
    assert abs(float(((1 - ab[ts[-1]]) / ab[ts[-1]]).sqrt()) - 0.3) < 0.01


# ---------------------------------------------------------------------------- the command line

FAST = "abu[draws=8;fisher_draws=1],mucs[forget_batch=4;max_steps=2;retain_batch=4]"
COMMON = ["--quiet", "--threads", "1"]


def check_scores(run: Path, targets: str, shape: tuple[int, int]) -> None:
    for label in FAST.replace("],", "]\n").splitlines():
        d = run / "scores" / f"{label}-{targets}"
        s = np.load(d / "scores.npy")
        assert s.shape == shape and np.isfinite(s).all(), label
        meta = json.loads((d / "meta.json").read_text())
        assert meta["method"] == label.partition("[")[0] and "timesteps" in meta


def test_score_abu_and_mucs_on_a_digits_run(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--train-count", "12", "--val-count", "4",
                 "--steps", "4", "--batch-size", "4", *COMMON]) == 0  # fmt: skip
    assert main(["generate", str(run), "--num", "2", "--steps", "3", *COMMON]) == 0
    assert main(["score", str(run), "--method", FAST, "--timesteps", "2", *COMMON]) == 0
    check_scores(run, "samples", (2, 12))


def tiny_v_pipeline(path: Path) -> Path:
    """A random 8×8 one-channel v-prediction ``DDPMPipeline`` saved by diffusers."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(1)
    unet = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
    )  # fmt: skip
    scheduler = DDPMScheduler(num_train_timesteps=100, prediction_type="v_prediction")
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(path, safe_serialization=True)
    return path


def test_score_abu_and_mucs_on_an_imported_v_prediction_pipeline(tmp_path):
    model = tiny_v_pipeline(tmp_path / "pipeline")
    run = tmp_path / "run"
    data = ["--data", "digits", "--train-count", "10", "--val-count", "3"]
    assert main(["import", str(model), *data, "--out", str(run), *COMMON]) == 0
    assert main(["score", str(run), "--method", FAST, "--targets", "val", "--timesteps", "2",
                 *COMMON]) == 0  # fmt: skip
    check_scores(run, "val", (3, 10))
