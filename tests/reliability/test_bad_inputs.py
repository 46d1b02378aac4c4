"""Bad inputs: one clear ``error:`` line naming the culprit, exit code 2, no traceback, and
nothing left behind that was not there before."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from reliability_helpers import (
    QUIET,
    TRAIN_ARGS,
    assert_clean_error,
    copy_run,
    run_cli,
    run_main,
    snapshot,
)

from diffattr.diffusion.presets import build_unet


def png(path: Path, size=(8, 8), mode="L", value=128) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, 0, 0)).save(path)
    return path


def image_folder(root: Path, n: int = 6) -> Path:
    for i in range(n):
        png(root / f"img{i:02d}.png", value=20 * i)
    return root


def train_fails(tmp_path: Path, *args: str, needles=()):
    """``train`` with ``args`` must fail cleanly and leave ``tmp_path`` as it was."""
    before = snapshot(tmp_path)
    out = tmp_path / "out" / "run"
    code, _, err = run_main("train", "--out", out, *args, "--steps", "2", *QUIET)
    assert_clean_error(code, err, *needles)
    assert snapshot(tmp_path) == before, "stray output"
    return err


# ------------------------------------------------------------------------------ images


def test_corrupt_image_file_is_named(tmp_path):
    data = image_folder(tmp_path / "imgs")
    (data / "img03.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    train_fails(tmp_path, "--data", data, "--val-count", "2", needles=["img03.png"])


def test_truncated_image_file_is_named(tmp_path):
    data = image_folder(tmp_path / "imgs")
    png(data / "img04.png", size=(8, 8), value=77)
    raw = (data / "img04.png").read_bytes()
    (data / "img04.png").write_bytes(raw[: len(raw) // 2])
    train_fails(tmp_path, "--data", data, "--val-count", "2", needles=["img04.png"])


def test_mixed_image_sizes_name_both_files(tmp_path):
    data = image_folder(tmp_path / "imgs")
    png(data / "img05.png", size=(9, 8))
    err = train_fails(tmp_path, "--data", data, "--val-count", "2", needles=["img05.png"])
    assert "img00.png" in err and "--mismatch resize" in err


def test_mixed_channel_counts(tmp_path):
    """Gray and colour images mixed become RGB (documented); a 2-channel array is refused."""
    from diffattr.data import load_image_folder

    data = image_folder(tmp_path / "imgs")
    png(data / "img05.png", mode="RGB")
    assert load_image_folder(data).shape == (3, 8, 8)
    bad = tmp_path / "two.npz"
    np.savez(bad, images=np.zeros((6, 2, 8, 8), dtype=np.uint8))
    train_fails(tmp_path, "--data", bad, "--val-count", "2", needles=["two.npz", "channels"])


def test_target_images_of_other_channel_count_are_refused(tiny_run, tmp_path):
    from diffattr.diffusion.sampling import load_samples

    s = load_samples(tiny_run / "samples" / "samples.npz")
    rgb = tmp_path / "rgb.npz"
    np.savez(
        rgb,
        images=s.images.repeat(1, 3, 1, 1).numpy(),
        seeds=s.seeds,
        initial_noise=s.initial_noise.repeat(1, 3, 1, 1).numpy(),
    )
    run = copy_run(tiny_run, tmp_path / "run")
    before = snapshot(tmp_path)
    code, _, err = run_main("score", run, "--method", "pixel-cos", "--targets", rgb, *QUIET)
    assert_clean_error(code, err, "target images are (3, 8, 8)")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "make,args,needle",
    [
        (lambda d: d.mkdir(), [], "contains no images"),
        (lambda d: np.savez(d, images=np.zeros((0, 8, 8))), [], "empty"),
        (image_folder, ["--train-count", "0"], "train_count"),
        (image_folder, ["--val-count", "6"], "no training images"),
    ],
    ids=["empty-folder", "empty-npz", "empty-subset", "nothing-left-to-train"],
)
def test_empty_dataset_or_subset(tmp_path, make, args, needle):
    data = tmp_path / ("data.npz" if "npz" in str(make) else "imgs")
    if make is image_folder:
        image_folder(data)
    else:
        make(data if data.suffix else data)
    if data.suffix == "" and not data.exists():
        data.mkdir()
    extra = [] if "--val-count" in args else ["--val-count", "2"]
    train_fails(tmp_path, "--data", data, *extra, *args, needles=[needle])


def test_empty_lds_subsets_leave_no_benchmark(tiny_run, tmp_path):
    before = snapshot(tmp_path)
    code, _, err = run_main(
        "lds", "build", tiny_run, "--out", tmp_path / "bench", "--subsets", "2",
        "--fraction", "0.01", "--seeds", "0", "--executor", "inprocess", *QUIET,
    )  # fmt: skip
    assert_clean_error(code, err, "empty subsets")
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------------ models


def save_model(path: Path, size: int, seed: int = 0, channels=None) -> Path:
    """A tiny UNet for size² images; ``channels``: other block widths (another architecture)."""
    from diffusers import UNet2DModel

    from diffattr.diffusion.presets import unet_config

    torch.manual_seed(seed)
    if channels is None:
        model = build_unet("tiny", size, 1)
    else:
        model = UNet2DModel.from_config(
            {**unet_config("tiny", size, 1), "block_out_channels": channels}
        )
    model.save_pretrained(path)
    return path


def test_preset_for_other_image_size(tmp_path):
    other = save_model(tmp_path / "m16", 16)
    train_fails(tmp_path, "--preset", other, *TRAIN_ARGS, needles=["m16", "16²"])


def test_run_whose_model_was_swapped_for_another_architecture(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    shutil.rmtree(run / "model")
    save_model(run / "model", 16)
    before = snapshot(tmp_path)
    code, _, err = run_main("featurize", run, "--timesteps", "2", *QUIET)
    assert_clean_error(code, err, str(run / "model"), "16²")
    assert snapshot(tmp_path) == before


def test_model_config_that_does_not_match_its_weights(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    cfg = json.loads((run / "model" / "config.json").read_text())
    cfg["block_out_channels"] = [16, 24]
    (run / "model" / "config.json").write_text(json.dumps(cfg))
    before = snapshot(tmp_path)
    code, _, err = run_main("featurize", run, "--timesteps", "2", *QUIET)
    assert_clean_error(code, err, str(run / "model"))
    assert snapshot(tmp_path) == before


def test_checkpoint_of_other_architecture_refuses_to_resume(tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--out", out, *TRAIN_ARGS, "--steps", "4", "--checkpoint-every", "2", *QUIET]
    assert run_main(*argv)[0] == 0
    shutil.rmtree(out / "checkpoints" / "step-0000004")  # as if killed after step 2
    shutil.rmtree(out / "model")
    (out / "train.json").unlink()
    ckpt = out / "checkpoints" / "step-0000002" / "model"
    shutil.rmtree(ckpt)
    save_model(ckpt, 8, channels=(16, 24))
    before = snapshot(tmp_path)
    code, _, err = run_main(*argv)
    assert_clean_error(code, err, "step-0000002")
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------------ stores


def test_store_made_with_another_model(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    assert run_main("featurize", run, "--timesteps", "2", *QUIET)[0] == 0
    shutil.rmtree(run / "model")
    save_model(run / "model", 8, seed=1)
    before = snapshot(tmp_path)
    code, _, err = run_main("featurize", run, "--timesteps", "2", *QUIET)
    assert_clean_error(code, err, "feature store", "model_fingerprint")
    assert snapshot(tmp_path) == before


def test_damaged_store_file_is_named(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    assert run_main("featurize", run, "--timesteps", "2", *QUIET)[0] == 0
    features = next((run / "features").glob("train-*/features.npy"))
    features.write_bytes(features.read_bytes()[:200])
    code, _, err = run_main("featurize", run, "--timesteps", "2", *QUIET)
    assert_clean_error(code, err, "features.npy")


def test_scores_that_do_not_match_the_run(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run", parts=("run.json", "train.json", "model", "samples"))
    assert run_main("score", run, "--method", "pixel-cos", *QUIET)[0] == 0
    d = run / "scores" / "pixel-cos-samples"
    np.save(d / "scores.npy", np.zeros((3, 7), dtype=np.float32))  # 7 ≠ 24 training ids
    before = snapshot(tmp_path)
    code, _, err = run_main("report", run, "--method", "pixel-cos", *QUIET)
    assert_clean_error(code, err, "scores.npy", "(3, 7)")
    assert snapshot(tmp_path) == before
    np.save(d / "scores.npy", np.zeros((3, 24), dtype=np.float32))
    np.save(d / "train_ids.npy", np.arange(100, 124))
    before = snapshot(tmp_path)
    code, _, err = run_main("report", run, "--method", "pixel-cos", *QUIET)
    assert_clean_error(code, err, "scores.npy", "training")
    assert snapshot(tmp_path) == before


def test_journey_trak_needs_recorded_seeds(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    targets = tmp_path / "plain.npz"
    np.savez(targets, images=np.zeros((2, 1, 8, 8), dtype=np.float32))
    before = snapshot(tmp_path)
    code, _, err = run_main("score", run, "--method", "journey-trak", "--targets", targets, *QUIET)
    assert_clean_error(code, err, "plain.npz", "seeds")
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------------ non-finite


def nan_model_run(tiny_run: Path, tmp_path: Path) -> Path:
    from diffattr.diffusion.presets import load_unet

    run = copy_run(tiny_run, tmp_path / "run")
    model = load_unet(run / "model")
    with torch.no_grad():
        model.conv_out.bias.fill_(float("nan"))
    shutil.rmtree(run / "model")
    model.save_pretrained(run / "model")
    return run


def test_nonfinite_gradients_stop_naming_the_sample(tiny_run, tmp_path):
    run = nan_model_run(tiny_run, tmp_path)
    before = snapshot(tmp_path)
    code, _, err = run_main("featurize", run, "--timesteps", "2", "--rows", "0:4", *QUIET)
    assert_clean_error(code, err, "non-finite", "sample id")
    assert "--on-nonfinite skip" in err
    assert snapshot(tmp_path) == before  # the empty store it had made is gone


def test_nonfinite_gradients_can_be_skipped(tiny_run, tmp_path):
    from diffattr.attribution.features.store import FeatureStore

    run = nan_model_run(tiny_run, tmp_path)
    code, _, err = run_main(
        "featurize", run, "--timesteps", "2", "--rows", "0:4", "--on-nonfinite", "skip", *QUIET
    )
    assert code == 0, err
    assert err.startswith("warning: skipped 4 sample(s)") and "sample ids" in err
    store = FeatureStore.load(next((run / "features").glob("train-*")), require_complete=False)
    assert store.skipped_rows().tolist() == [0, 1, 2, 3] and store.num_done == 4
    assert not np.asarray(store.features[:4]).any()


# ------------------------------------------------------------------------------ disk and dirs


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs (needs root and CAP_SYS_ADMIN)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_while_training(small_disk):
    """A real full disk (tmpfs): the error names the checkpoint; no partial files remain."""
    out = small_disk / "run"
    r = run_cli("train", "--out", out, *TRAIN_ARGS, "--steps", "2", *QUIET)
    assert_clean_error(r.returncode, r.stderr, "disk full", str(out / "checkpoints"))
    assert list(small_disk.iterdir()) == []


def test_disk_full_while_creating_a_store(tiny_run, small_disk):
    run = copy_run(tiny_run, small_disk / "run")
    before = snapshot(small_disk)
    code, _, err = run_main("featurize", run, "--timesteps", "2", "--projector", "identity", *QUIET)
    assert_clean_error(code, err, "disk full", str(run / "features"))
    assert snapshot(small_disk) == before


def test_disk_full_in_atomic_write_leaves_no_temp(tmp_path, monkeypatch):
    """Simulated ENOSPC (os.fsync fails) in every atomic writer: StorageError, no temp file."""
    from diffattr.errors import StorageError
    from diffattr.fsio import atomic_directory, atomic_write_json

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(StorageError, match=r"disk full while writing .*x\.json"):
        atomic_write_json(tmp_path / "x.json", {"a": 1})
    with (
        pytest.raises(StorageError, match=r"disk full while writing .*ckpt"),
        atomic_directory(tmp_path / "ckpt") as d,
    ):
        (d / "f").write_bytes(b"123")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_unwritable_output_directory(tmp_path):
    """Read-only output: a read-only tmpfs as root (chmod does not stop root), else chmod."""
    ro = tmp_path / "ro"
    ro.mkdir()
    mounted = False
    if os.geteuid() == 0:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)])
        if r.returncode != 0:
            pytest.skip("running as root and cannot mount a read-only tmpfs")
        mounted = True
    else:
        ro.chmod(0o500)
    try:
        code, _, err = run_main("train", "--out", ro / "run", *TRAIN_ARGS, "--steps", "2", *QUIET)
        assert_clean_error(code, err, str(ro / "run"))
        assert list(ro.iterdir()) == []
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(ro)], check=False)
        else:
            ro.chmod(0o700)


def test_output_path_through_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    before = snapshot(tmp_path)
    code, _, err = run_main("train", "--out", tmp_path / "file" / "run", *TRAIN_ARGS, *QUIET)
    assert_clean_error(code, err, str(tmp_path / "file" / "run"))
    assert snapshot(tmp_path) == before


def test_subprocess_cli_reports_without_traceback(tmp_path):
    """The installed entry point behaves like main(): one line, exit 2 (corrupt image)."""
    data = image_folder(tmp_path / "imgs")
    (data / "img01.png").write_bytes(b"garbage")
    r = run_cli("train", "--out", tmp_path / "run", "--data", data, "--val-count", "2", *QUIET)
    assert_clean_error(r.returncode, r.stderr, "img01.png")
    assert not (tmp_path / "run").exists()


def test_skipped_samples_score_zero_and_are_named(tmp_path, monkeypatch, capsys):
    """A sample whose features come out non-finite: skipped, scored 0, named in warnings."""
    from diffattr.attribution.attributor import Attributor
    from diffattr.attribution.features.featurize import FeatureSettings
    from diffattr.attribution.features.gradients import GradientComputer
    from diffattr.data import load_builtin
    from diffattr.errors import NumericalError

    train = load_builtin("digits").subset(np.arange(12))
    compute = GradientComputer.compute

    def poisoned(self, x0, ids, cond=None, out=None):
        g, e, r = compute(self, x0, ids, cond, out)
        g[torch.as_tensor(np.asarray(ids) == 5)] = float("nan")
        return g, e, r

    monkeypatch.setattr(GradientComputer, "compute", poisoned)
    torch.manual_seed(0)
    model = build_unet("tiny", 8, 1)
    kw = {"settings": FeatureSettings(timesteps=2), "batch_size": 4, "progress": False}
    with pytest.raises(NumericalError, match=r"sample id 5 \(row 5\)"):
        Attributor(model, train, tmp_path / "stop", **kw).featurize()
    att = Attributor(model, train, tmp_path / "skip", on_nonfinite="skip", **kw)
    assert att.featurize().skipped_rows().tolist() == [5]
    assert "sample ids 5)" in capsys.readouterr().err
    scores = att.score(train.images[:3])
    assert not scores.values[:, 5].any() and np.all(np.delete(scores.values, 5, axis=1) != 0)
    assert scores.meta["skipped_train_ids"] == [5]
    assert "ids 5" in capsys.readouterr().err


def test_one_bad_sample_in_a_batch_is_skipped_alone(tiny_model, tmp_path):
    """Overflowing gradients of one image (an exception inside the batch) skip only it."""
    from diffattr.attribution.features.featurize import FeatureSettings, featurize
    from diffattr.data import load_builtin
    from diffattr.diffusion.schedule import NoiseSchedule

    images = load_builtin("digits").images[:6].clone()
    images[2] = 1e30  # passed straight to featurize (datasets refuse such images)
    store = featurize(
        tiny_model, images, np.arange(6), tmp_path / "s", FeatureSettings(timesteps=2,
        projector="identity"), NoiseSchedule(), "fp", batch_size=6, progress=False,
        on_nonfinite="skip",
    )  # fmt: skip
    assert store.skipped_rows().tolist() == [2] and store.is_complete()
    assert np.isfinite(np.asarray(store.features)).all()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_device_without_a_gpu_is_one_line(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    code, _, err = run_main("featurize", run, "--device", "cuda", *QUIET)
    assert_clean_error(code, err, "--device cuda", "no CUDA device")
    assert "hint: use --device cpu" in err
    assert not (run / "features").exists()
    ray_args = ["--executor", "ray", "--ray-cpus-per-task", "0"]
    code, _, err = run_main("featurize", run, *ray_args, *QUIET)
    assert_clean_error(code, err, "--ray-cpus-per-task")
    code, _, err = run_main("train", "--out", tmp_path / "r", *TRAIN_ARGS, "--device", "cuda")
    assert_clean_error(code, err, "no CUDA device")
    assert not (tmp_path / "r").exists()
    code, _, err = run_main("lds", "build", run, "--out", tmp_path / "b", "--device", "cuda:0")
    assert_clean_error(code, err, "no CUDA device")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    "method, needle",
    [
        ("das[residul=none]", "method 'das' has no option 'residul'"),
        ("tracin[foo=1]", "method 'tracin' has no option 'foo'"),
        ("ekfac[pairng=items]", "method 'ekfac' has no option 'pairng'"),
        ("trak[seed=1]", "method 'trak' has no option 'seed'"),
    ],
)
def test_unknown_method_option_is_named(tiny_run, method, needle):
    """A misspelt method option is an error naming it (not ignored, not a traceback)."""
    code, _, err = run_main("score", tiny_run, "--method", method, "--targets", "val", *QUIET)
    assert code == 2, err
    assert needle in err and "Traceback" not in err


def test_method_options_match_what_each_method_reads():
    from diffattr.attribution.methods import METHODS, get_method
    from diffattr.errors import ConfigError

    assert {"pairing", "query", "strategy", "damping", "fisher"} <= METHODS[
        "ekfac"
    ].accepted_options()
    assert METHODS["tracin"].accepted_options() == {"checkpoints", "learning_rates", "measure"}
    assert {"base", "models"} <= METHODS["ensemble"].accepted_options()
    assert {"encoder", "cache_dir", "dim"} <= METHODS["embedding-cos"].accepted_options()
    get_method("das", residual="none", leverage=True, squared=False)
    get_method("ekfac", pairing="items")
    with pytest.raises(ConfigError, match="has no option 'k'") as info:
        get_method("pixel-cos", k=3)
    assert info.value.hint == "it takes no options"
