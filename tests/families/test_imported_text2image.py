"""A text-to-image pipeline diffattr did not fine-tune: import with LoRA adapters saved as
diffusers' training scripts save them, or without; its own noise process (v-prediction,
squaredcos_cap_v2); captioned images as targets; retraining with --train-config."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from diffattr.cli import main
from diffattr.data import save_png
from diffattr.families import family_of
from diffattr.run import RunDir
from diffattr.text2image.pipeline import write_tiny_pipeline

COLOURS = {"red": (1, -1, -1), "green": (-1, 1, -1), "blue": (-1, -1, 1)}
LORA_FILE = "pytorch_lora_weights.safetensors"


def captioned_folder(path: Path, n: int, seed: int = 0) -> Path:
    """n 16×16 RGB images (a coloured square somewhere) with captions.txt naming the colour."""
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        name = list(COLOURS)[i % len(COLOURS)]
        image = -np.ones((3, 16, 16), np.float32)
        y, x = rng.integers(0, 8, 2)
        image[:, y : y + 8, x : x + 8] = np.asarray(COLOURS[name], np.float32)[:, None, None]
        save_png(torch.from_numpy(image), path / f"{i:02d}.png")
        lines.append(f"{i:02d}.png\ta {name} square")
    (path / "captions.txt").write_text("\n".join(lines) + "\n")
    return path


def lora_like_a_training_script(pipeline: Path, out: Path, text_encoder: bool = False):
    """LoRA adapters on the pipeline's UNet, saved as diffusers' LoRA training scripts save
    them (``save_lora_weights`` of the peft state dict in diffusers' format); the adapted UNet.
    """
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(1)
    unet = UNet2DConditionModel.from_pretrained(pipeline / "unet")
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    unet.add_adapter(config)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # a trained adapter changes the output
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    extra = {}
    if text_encoder:
        extra["text_encoder_lora_layers"] = {
            "text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 32)
        }
    StableDiffusionPipeline.save_lora_weights(
        out, unet_lora_layers=layers, unet_lora_adapter_metadata=config.to_dict(), **extra
    )
    return unet.eval()


def with_scheduler(pipeline: Path, **changes) -> Path:
    cfg_path = pipeline / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(changes)
    cfg_path.write_text(json.dumps(cfg))
    return pipeline


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """A tiny pipeline, its LoRA weights, 16 captioned images, an imported run with
    --train-config, and the adapted UNet as its trainer left it."""
    root = tmp_path_factory.mktemp("import-t2i")
    pipeline = write_tiny_pipeline(root / "pipeline", seed=0, sample_size=8)
    unet = lora_like_a_training_script(pipeline, root / "lora")
    data = captioned_folder(root / "images", 16)
    config = root / "train.json"
    config.write_text(json.dumps({"steps": 4, "batch_size": 4, "lr": 1e-3}))
    run = root / "run"
    argv = ["import", str(pipeline), "--lora", str(root / "lora"), "--data", str(data),
            "--val-count", "4", "--out", str(run), "--train-config", str(config)]  # fmt: skip
    argv.append("--quiet")
    assert main(argv) == 0
    return root, run, unet


def test_the_imported_adapters_are_the_trained_ones(imported):
    root, run, trained = imported
    run_ = RunDir(run)
    family = family_of(run_)
    model = family.model(run_)
    x, h = torch.randn(2, 4, 8, 8), torch.randn(2, 16, 32)
    with torch.no_grad():
        assert torch.equal(model(x, 10, h).sample, trained(x, 10, h).sample)
    manifest = run_.manifest()
    assert manifest["source"]["lora"] == str((root / "lora" / LORA_FILE).resolve())
    assert manifest["source"]["resolution"] == 16  # the UNet's 8 latent cells × the VAE's 2
    # retraining fine-tunes adapters of the imported ones' shape
    assert (manifest["train"]["lora_rank"], manifest["train"]["lora_alpha"]) == (2, 4.0)


def test_attribute_generate_report_and_lds(imported, tmp_path):
    from diffattr.attribution.scores import Scores

    root, run, _ = imported
    assert main(["generate", str(run), "--num", "3", "--steps", "4", "--quiet"]) == 0
    common = ["--timesteps", "3", "--quiet"]
    assert main(["score", str(run), "--method", "das,trak,dtrak,pixel-cos,ekfac", *common]) == 0
    for method in ("das", "trak", "dtrak", "pixel-cos", "ekfac"):  # ekfac: LoRA layers
        s = Scores.load(run / "scores" / f"{method}-samples")
        assert s.values.shape == (3, 12) and np.isfinite(s.values).all()
    meta = json.loads(next((run / "features").glob("train-das-*/meta.json")).read_text())
    assert meta["settings"]["features"]["params"] == r"\.lora_[AB]\."  # the adapters only
    # captioned images without seeds, given as a folder
    mine = captioned_folder(tmp_path / "mine", 2, seed=5)
    assert main(["score", str(run), "--method", "das", "--targets", str(mine), *common]) == 0
    assert Scores.load(run / "scores" / "das-mine").values.shape == (2, 12)
    assert main(["report", str(run), "--quiet"]) == 0
    assert (run / "report.html").read_text().count("<img") > 2
    bench = tmp_path / "bench"
    assert main(["lds", "build", str(run), "--out", str(bench), "--subsets", "2", "--seeds",
                 "0", "--num-val", "1", "--num-gen", "1", "--measure-timesteps", "2",
                 "--executor", "inprocess", "--quiet"]) == 0  # fmt: skip
    assert np.load(bench / "ground_truth.npz")["F_t"].shape == (1, 2, 2, 2)
    cf = tmp_path / "cf"
    assert main(["counterfactual", str(run), "--out", str(cf), "--method", "das", "--k", "2",
                 "--num-targets", "2", "--executor", "inprocess", "--timesteps", "2",
                 "--quiet"]) == 0  # fmt: skip
    rows = {r["method"]: r for r in json.loads((cf / "results.json").read_text())}
    assert set(rows) == {"das", "random", "none"}
    assert min(rows["das"]["pixel_l2"]) > 0  # removing training images changed the images


@pytest.mark.parametrize("prediction,schedule", [("v_prediction", "squaredcos_cap_v2"),
                                                 ("sample", "scaled_linear")])  # fmt: skip
def test_the_pipeline_s_own_process_is_followed_exactly(tmp_path, prediction, schedule):
    """ᾱ_t is the scheduler's; the per-sample loss gradient of the UNet's weights is the one
    written by hand from the scheduler's own add_noise and get_velocity."""
    from diffusers import DDPMScheduler

    from diffattr.attribution.features.gradients import GradientComputer, TimestepSpec
    from diffattr.attribution.features.measure import make_measure
    from diffattr.diffusion.schedule import ATTRIBUTION_NOISE_KEY, keyed_noise

    pipeline = with_scheduler(
        write_tiny_pipeline(tmp_path / "pipe", sample_size=4),
        prediction_type=prediction, beta_schedule=schedule, num_train_timesteps=300,
    )  # fmt: skip
    data = captioned_folder(tmp_path / "images", 10)
    run = tmp_path / "run"
    argv = ["import", str(pipeline), "--data", str(data), "--val-count", "2", "--out", str(run)]
    assert main([*argv, "--quiet"]) == 0
    run_ = RunDir(run)
    family = family_of(run_)
    sched = family.schedule(run_)
    scheduler = DDPMScheduler.from_pretrained(pipeline / "scheduler")
    assert torch.equal(sched.alphas_cumprod(), scheduler.alphas_cumprod)
    assert (sched.num_train_timesteps, sched.prediction_type) == (300, prediction)
    assert RunDir(run).manifest()["source"]["resolution"] == 8

    model, train = family.model(run_), family.train_set(run_)
    z0, cond = train.images[:2], train.conditioning[:2]
    computer = GradientComputer(model, make_measure("loss"), sched, TimestepSpec(2),
                                normalize=False, strategy="vmap")  # fmt: skip
    params = [p for _, p in model.named_parameters()]  # no adapters: all of the UNet's weights
    ids = train.ids[:2].numpy()
    for rows, xt, t, target, ab in computer.pairs(z0, ids):
        noise = torch.stack([
            keyed_noise(ATTRIBUTION_NOISE_KEY, 0, int(ids[r]), int(tt), tuple(z0.shape[1:]))
            for r, tt in zip(rows, t, strict=True)
        ])  # fmt: skip
        z = z0[rows]
        assert torch.allclose(xt, scheduler.add_noise(z, noise, t), atol=1e-6)
        want = scheduler.get_velocity(z, noise, t) if prediction == "v_prediction" else z
        assert torch.allclose(target, want, atol=1e-6)
        grads, _, _ = computer.flat_grads(xt, t, target, ab, cond[rows])
        for i in range(xt.shape[0]):
            for p in params:
                p.requires_grad_(True)
                p.grad = None
            zi = scheduler.add_noise(z[i : i + 1], noise[i : i + 1], t[i : i + 1])
            out = model(zi, t[i : i + 1], cond[rows][i : i + 1]).sample
            ((out - want[i : i + 1]) ** 2).mean().backward()
            by_hand = torch.cat([p.grad.flatten() for p in params])
            assert torch.allclose(grads[i], by_hand, rtol=1e-4, atol=1e-6)
    # features default to all of the UNet's weights when there are no adapters
    assert main(["score", str(run), "--method", "das", "--targets", "val", "--timesteps", "2",
                 "--quiet"]) == 0  # fmt: skip
    meta = json.loads(next((run / "features").glob("train-das-*/meta.json")).read_text())
    assert meta["settings"]["features"]["params"] is None
    # and such a pipeline can be fine-tuned: the LoRA loss is against its own target
    out = tmp_path / "ft"
    assert main(["finetune", "--base", str(pipeline), "--data", str(data), "--resolution", "8",
                 "--val-count", "2", "--steps", "2", "--batch-size", "4", "--out", str(out),
                 "--quiet"]) == 0  # fmt: skip
    assert RunDir(out).manifest()["train"]["schedule"]["prediction_type"] == prediction


def test_what_cannot_be_imported_is_refused_with_the_reason(tmp_path, capsys):
    pipeline = write_tiny_pipeline(tmp_path / "pipe", sample_size=8)
    data = captioned_folder(tmp_path / "images", 8)
    base = ["import", str(pipeline), "--data", str(data), "--val-count", "2", "--quiet"]

    # LoRA weights saved as a pickle: refused unless allowed
    lora_like_a_training_script(pipeline, tmp_path / "lora")
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "lora" / LORA_FILE)
    (tmp_path / "pickled").mkdir()
    torch.save(weights, tmp_path / "pickled" / "pytorch_lora_weights.bin")
    argv = [*base, "--lora", str(tmp_path / "pickled")]
    assert main([*argv, "--out", str(tmp_path / "r1")]) == 2
    err = capsys.readouterr().err
    assert "pytorch_lora_weights.bin" in err and "pickle" in err
    assert main([*argv, "--out", str(tmp_path / "r2"), "--allow-pickle"]) == 0

    # adapters of the text encoder as well: caption embeddings would not be the model's
    lora_like_a_training_script(pipeline, tmp_path / "both", text_encoder=True)
    assert main([*base, "--lora", str(tmp_path / "both"), "--out", str(tmp_path / "r3")]) == 2
    assert "also adapts the text encoder" in capsys.readouterr().err

    # retraining settings without adapters to retrain
    config = tmp_path / "train.json"
    config.write_text(json.dumps({"steps": 2}))
    argv = [*base, "--train-config", str(config), "--out", str(tmp_path / "r4")]
    assert main(argv) == 2
    assert "this pipeline has none" in capsys.readouterr().err
    # images without captions
    bare = tmp_path / "bare"
    for png in sorted(data.glob("*.png")):
        (bare / png.name).parent.mkdir(exist_ok=True)
        (bare / png.name).write_bytes(png.read_bytes())
    argv = ["import", str(pipeline), "--data", str(bare), "--val-count", "2", "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "r5")]) == 2
    assert "no captions" in capsys.readouterr().err
    assert not any((tmp_path / r).exists() for r in ("r1", "r3", "r4", "r5"))

    # weights changed after the import: the run refuses to attribute another model
    run = tmp_path / "r6"
    assert main([*base, "--out", str(run)]) == 0
    weights = pipeline / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    assert main(["score", str(run), "--method", "das", "--targets", "val", "--quiet"]) == 2
    assert "changed since" in capsys.readouterr().err
