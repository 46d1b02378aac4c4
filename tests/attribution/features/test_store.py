import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from diffattr.attribution.features.store import FeatureStore
from diffattr.cli import main
from diffattr.errors import DiffattrError, StoreMismatchError


def settings(**kw):
    base = {"features": {"measure": "das", "proj_seed": 0}, "model_fingerprint": "abc"}
    base["features"].update(kw)
    return base


def test_create_write_reopen(tmp_path):
    s = FeatureStore.open(tmp_path / "s", settings(), 5, 3)
    assert s.missing_rows().tolist() == [0, 1, 2, 3, 4]
    s.write_rows(np.array([1, 3]), np.ones((2, 3)), error=np.array([0.5, 0.25]))
    again = FeatureStore.open(tmp_path / "s", settings(), 5, 3)
    assert again.missing_rows().tolist() == [0, 2, 4]
    assert again.column("error")[3] == pytest.approx(0.25)
    with pytest.raises(DiffattrError, match="incomplete"):
        FeatureStore.load(tmp_path / "s")


def test_other_settings_are_refused_naming_the_field(tmp_path):
    FeatureStore.open(tmp_path / "s", settings(), 5, 3)
    with pytest.raises(StoreMismatchError, match="features.proj_seed"):
        FeatureStore.open(tmp_path / "s", settings(proj_seed=1), 5, 3)
    with pytest.raises(StoreMismatchError, match="dim"):
        FeatureStore.open(tmp_path / "s", settings(), 5, 4)


def test_non_finite_rows_are_not_written(tmp_path):
    s = FeatureStore.open(tmp_path / "s", settings(), 2, 2)
    with pytest.raises(DiffattrError, match="non-finite"):
        s.write_rows(np.array([0]), np.array([[np.nan, 1.0]]))
    assert s.num_done == 0


def test_second_writer_is_told(tmp_path):
    s = FeatureStore.open(tmp_path / "s", settings(), 2, 2)
    with s.lock():
        code = (
            "import sys; from diffattr.attribution.features.store import FeatureStore as F\n"
            f"s = F.load({str(tmp_path / 's')!r}, require_complete=False)\n"
            "try:\n    s.lock().__enter__()\nexcept Exception as e:\n    print(e); sys.exit(3)\n"
        )
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 3 and "another process" in r.stdout


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("run") / "r"
    args = ["train", "--out", str(run), "--train-count", "24", "--val-count", "8"]
    assert main([*args, "--steps", "4", "--batch-size", "8", "--quiet"]) == 0
    return run


def featurize_cmd(run, store_root):
    return [
        sys.executable, "-m", "diffattr.cli", "featurize", str(run), "--method", "das",
        "--timesteps", "4", "--batch-size", "1", "--quiet", "--threads", "1",
    ]  # fmt: skip


def test_sigkill_then_resume_gives_identical_features(tiny_run, tmp_path):
    import shutil

    killed = tmp_path / "killed"
    shutil.copytree(tiny_run, killed)
    proc = subprocess.Popen(featurize_cmd(killed, None), env={**os.environ})
    store_dir = None
    deadline = time.time() + 120
    while time.time() < deadline:
        stores = list((killed / "features").glob("train-das-*/done.npy"))
        if stores:
            store_dir = stores[0].parent
            done = np.load(stores[0], mmap_mode="r")
            if 3 <= int(done.sum()) < done.size - 3:
                break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert store_dir is not None
    partial = int(np.load(store_dir / "done.npy").sum())
    assert 0 < partial < 24
    assert subprocess.run(featurize_cmd(killed, None)).returncode == 0

    clean = tmp_path / "clean"
    shutil.copytree(tiny_run, clean)
    assert subprocess.run(featurize_cmd(clean, None)).returncode == 0
    a = FeatureStore.load(store_dir)
    b = FeatureStore.load(next((clean / "features").glob("train-das-*")))
    assert np.array_equal(np.asarray(a.features), np.asarray(b.features))
    assert np.array_equal(a.column("error"), b.column("error"))
