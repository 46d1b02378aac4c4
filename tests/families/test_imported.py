"""A diffusers model diffattr did not train: import, its own noise process, any image as a
target, retraining with --train-config; tiny pipelines built with diffusers' own classes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from diffattr.cli import main
from diffattr.data import load_builtin, save_png
from diffattr.families import family_of
from diffattr.run import RunDir

DATA = ["--data", "digits", "--train-count", "24", "--val-count", "8"]


def tiny_pipeline(path: Path, prediction: str, schedule: str, safe: bool = True) -> Path:
    """A random 8×8 one-channel ``DDPMPipeline`` saved with ``save_pretrained``."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
    )  # fmt: skip
    scheduler = DDPMScheduler(
        num_train_timesteps=200, beta_schedule=schedule, prediction_type=prediction
    )
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(path, safe_serialization=safe)
    return path


def import_run(tmp_path: Path, prediction="epsilon", schedule="linear", *extra) -> Path:
    model = tiny_pipeline(tmp_path / f"model-{prediction}-{schedule}", prediction, schedule)
    run = tmp_path / f"run-{prediction}-{schedule}"
    assert main(["import", str(model), *DATA, "--out", str(run), "--quiet", *extra]) == 0
    return run


CASES = [
    ("epsilon", "linear"),
    ("v_prediction", "scaled_linear"),
    ("sample", "squaredcos_cap_v2"),
    ("v_prediction", "squaredcos_cap_v2"),
]


@pytest.mark.parametrize("prediction,schedule", CASES)
def test_the_model_s_own_process_is_followed_exactly(tmp_path, prediction, schedule):
    from diffusers import DDPMScheduler

    from diffattr.attribution.features.gradients import GradientComputer, TimestepSpec
    from diffattr.attribution.features.measure import make_measure
    from diffattr.diffusion.schedule import ATTRIBUTION_NOISE_KEY, keyed_noise

    run = RunDir(import_run(tmp_path, prediction, schedule))
    family = family_of(run)
    schedule_ = family.schedule(run)
    folder = tmp_path / f"model-{prediction}-{schedule}" / "scheduler"
    scheduler = DDPMScheduler.from_pretrained(folder)
    assert torch.equal(schedule_.alphas_cumprod(), scheduler.alphas_cumprod)
    assert schedule_.num_train_timesteps == 200 and schedule_.prediction_type == prediction

    model = family.model(run)
    x0 = load_builtin("digits").images[:3]
    computer = GradientComputer(
        model, make_measure("loss"), schedule_, TimestepSpec(2), normalize=False
    )
    for rows, xt, t, target, ab in computer.pairs(x0, np.arange(3)):
        noise = torch.stack([
            keyed_noise(ATTRIBUTION_NOISE_KEY, 0, int(r), int(tt), (1, 8, 8))
            for r, tt in zip(rows, t, strict=True)
        ])  # fmt: skip
        x = x0[rows]
        assert torch.allclose(xt, scheduler.add_noise(x, noise, t), atol=1e-6)
        want = {
            "epsilon": noise,
            "v_prediction": scheduler.get_velocity(x, noise, t),
            "sample": x,
        }[prediction]
        assert torch.allclose(target, want, atol=1e-6)
        grads, _, _ = computer.flat_grads(xt, t, target, ab)
        for i in range(xt.shape[0]):
            model.zero_grad()
            xi = scheduler.add_noise(x[i : i + 1], noise[i : i + 1], t[i : i + 1])
            out = model(xi, t[i : i + 1])
            ((out.sample - want[i : i + 1]) ** 2).mean().backward()
            by_hand = torch.cat([p.grad.flatten() for p in model.parameters()])
            assert torch.allclose(grads[i], by_hand, rtol=1e-4, atol=1e-6)


def test_attribute_report_and_generate_like_the_pipeline(tmp_path):
    from diffusers import DDPMPipeline

    from diffattr.attribution.scores import Scores
    from diffattr.diffusion.sampling import load_samples

    run = import_run(tmp_path, "v_prediction", "scaled_linear")
    assert main(["generate", str(run), "--num", "2", "--steps", "4", "--seed", "5", "--quiet"]) == 0
    samples = load_samples(run / "samples" / "samples.npz")
    pipe = DDPMPipeline.from_pretrained(tmp_path / "model-v_prediction-scaled_linear")
    for image, seed in zip(samples.images, samples.seeds, strict=True):
        direct = pipe(
            batch_size=1, generator=torch.Generator().manual_seed(int(seed)),
            num_inference_steps=4, output_type="np",
        ).images[0]  # fmt: skip
        assert torch.equal(image, torch.from_numpy(direct).permute(2, 0, 1) * 2 - 1)
    common = ["--timesteps", "3", "--quiet"]
    assert main(["featurize", str(run), "--method", "das,trak", *common]) == 0
    assert main(["score", str(run), "--method", "das,trak,dtrak,pixel-cos", *common]) == 0
    for method in ("das", "trak", "dtrak", "pixel-cos"):
        s = Scores.load(run / "scores" / f"{method}-samples")
        assert s.values.shape == (2, 24) and np.isfinite(s.values).all()
    assert main(["report", str(run), "--quiet"]) == 0
    assert (run / "report.html").read_text().count("<img") > 2
    # methods that need what an imported model does not have are refused, with the reason
    assert main(["score", str(run), "--method", "tracin", "--quiet"]) == 2


def test_score_a_folder_of_images_without_seeds(tmp_path, capsys):
    from diffattr.attribution.scores import Scores

    run = import_run(tmp_path)
    folder = tmp_path / "mine" / "nested"
    for i, image in enumerate(load_builtin("digits").images[1000:1003]):
        save_png(image, folder / f"{i}.png")
    argv = ["score", str(run), "--targets", str(tmp_path / "mine"), "--timesteps", "2"]
    assert main([*argv, "--method", "das,pixel-cos", "--quiet"]) == 0
    s = Scores.load(run / "scores" / "das-mine")
    assert s.values.shape == (3, 24) and np.isfinite(s.values).all()
    out = tmp_path / "mine.html"
    assert main(["report", str(run), "--targets", str(tmp_path / "mine"), "--out", str(out),
                 "--quiet"]) == 0  # fmt: skip
    assert out.read_text().count("<section class='target'") == 3  # shown like generated ones
    capsys.readouterr()
    assert main([*argv, "--method", "journey-trak", "--quiet"]) == 2
    assert "journey-trak" in capsys.readouterr().err


def test_pickle_weights_are_refused_unless_allowed(tmp_path, capsys):
    model = tiny_pipeline(tmp_path / "pickled", "epsilon", "linear", safe=False)
    argv = ["import", str(model), *DATA, "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "r1")]) == 2
    err = capsys.readouterr().err
    assert "diffusion_pytorch_model.bin" in err and "pickle" in err
    assert not (tmp_path / "r1" / "run.json").exists()
    assert main([*argv, "--out", str(tmp_path / "r2"), "--allow-pickle"]) == 0
    assert family_of(RunDir(tmp_path / "r2")).model(RunDir(tmp_path / "r2")) is not None


def test_lds_needs_the_training_settings(tmp_path, capsys):
    run = import_run(tmp_path)
    bench = ["--subsets", "2", "--seeds", "0", "--num-val", "2", "--num-gen", "2"]
    argv = ["lds", "build", str(run), "--out", str(tmp_path / "b0"), *bench, "--quiet"]
    assert main([*argv, "--measure-timesteps", "2"]) == 2
    assert "without training settings" in capsys.readouterr().err
    config = tmp_path / "train.json"
    config.write_text(json.dumps({"steps": 3, "batch_size": 8, "checkpoint_every": 3}))
    model = tmp_path / "model-epsilon-linear"
    run2 = tmp_path / "with-config"
    assert main(["import", str(model), *DATA, "--out", str(run2), "--train-config", str(config),
                 "--quiet"]) == 0  # fmt: skip
    out = tmp_path / "b1"
    argv = ["lds", "build", str(run2), "--out", str(out), *bench, "--measure-timesteps", "2"]
    assert main([*argv, "--quiet"]) == 0
    assert np.load(out / "ground_truth.npz")["F_t"].shape == (1, 2, 4, 2)
    assert main(["generate", str(run2), "--num", "2", "--steps", "3", "--quiet"]) == 0
    cf = ["counterfactual", str(run2), "--method", "das", "--k", "2", "--num-targets", "2",
          "--timesteps", "2", "--out", str(tmp_path / "cf"), "--quiet"]  # fmt: skip
    assert main(cf) == 0  # retrains without the top 2, regenerates with the pipeline
    rows = json.loads((tmp_path / "cf" / "results.json").read_text())
    assert {r["method"] for r in rows} == {"random", "das", "none"}
    # the k = 0 retraining is the reference; it is not the imported model (trained elsewhere)
    assert all(np.isfinite(r["pixel_l2"]).all() for r in rows)


def test_what_import_cannot_follow_is_refused_with_the_reason(tmp_path, capsys):
    sd = tmp_path / "sd"
    sd.mkdir()
    index = {"_class_name": "StableDiffusionPipeline", "vae": ["diffusers", "AutoencoderKL"]}
    (sd / "model_index.json").write_text(json.dumps(index))
    assert main(["import", str(sd), *DATA, "--out", str(tmp_path / "r"), "--quiet"]) == 2
    assert "no unet, vae, text_encoder, tokenizer/" in capsys.readouterr().err
    model = tiny_pipeline(tmp_path / "m", "epsilon", "linear")
    config = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
    config["_class_name"] = "FlowMatchEulerDiscreteScheduler"
    (model / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    assert main(["import", str(model), *DATA, "--out", str(tmp_path / "r2"), "--quiet"]) == 2
    assert "not a DDPM-type scheduler" in capsys.readouterr().err
    unet_only = model / "unet"
    assert main(["import", str(unet_only), *DATA, "--out", str(tmp_path / "r3"), "--quiet"]) == 2
    assert "--scheduler" in capsys.readouterr().err
    assert not any((tmp_path / r).exists() for r in ("r", "r2", "r3"))


def test_data_of_another_size_names_the_option_that_fixes_it(tmp_path, capsys):
    model = tiny_pipeline(tmp_path / "m", "epsilon", "linear")
    argv = ["import", str(model), *DATA, "--size", "12", "--out", str(tmp_path / "r"), "--quiet"]
    assert main(argv) == 2
    assert "--size 8" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_ekfac_serves_an_imported_v_prediction_model(tmp_path, capsys):
    """EK-FAC's task noises and targets through the model's own process: its training loss
    gradient equals one written by hand from the scheduler's add_noise / get_velocity; and
    `score --method ekfac` and DAS + EK-FAC run on the imported run."""
    pytest.importorskip("kronfluence")
    from diffusers import DDPMScheduler
    from kronfluence.task import Task

    from diffattr.attribution.features.gradients import TimestepSpec
    from diffattr.attribution.methods.influence import _Items, _make_task

    run = RunDir(import_run(tmp_path, "v_prediction", "scaled_linear"))
    family = family_of(run)
    schedule, model = family.schedule(run), family.model(run)
    folder = tmp_path / "model-v_prediction-scaled_linear" / "scheduler"
    scheduler = DDPMScheduler.from_pretrained(folder)
    x0 = load_builtin("digits").images[:2]
    items = _Items(x0, np.arange(2), TimestepSpec(2), schedule, noise_seed=0)
    batch = torch.utils.data.default_collate([items[i] for i in range(len(items))])
    task = _make_task(Task, "loss", "empirical", 0, schedule)
    model.zero_grad()
    task.compute_train_loss(batch, model).backward()
    ours = torch.cat([p.grad.flatten() for p in model.parameters()])
    _, x, t, noise, _, _ = batch
    model.zero_grad()
    out = model(scheduler.add_noise(x, noise, t), t).sample
    ((out - scheduler.get_velocity(x, noise, t)) ** 2).flatten(1).mean(1).sum().backward()
    by_hand = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert torch.allclose(ours, by_hand, rtol=1e-4, atol=1e-7)

    assert main(["generate", str(run.path), "--num", "2", "--steps", "3", "--quiet"]) == 0
    for method in ("ekfac", "combine[methods=das+ekfac]"):
        assert main(["score", str(run.path), "--method", method, "--timesteps", "2",
                     "--quiet", "--threads", "1"]) == 0, capsys.readouterr().err  # fmt: skip
    saved = [p.name for p in (run.path / "scores").iterdir()]
    assert "ekfac-samples" in saved and any(n.startswith("combine") for n in saved), saved
