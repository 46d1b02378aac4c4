"""Executors: options, and Ray (a local 2-CPU runtime started once for the module) giving the
same results and the same feature stores as the in-process executor, retrying lost workers."""

from __future__ import annotations

import argparse
import contextlib
import io
import operator
import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from diffattr.attribution.features.store import FeatureStore
from diffattr.cli import main
from diffattr.errors import ConfigError
from diffattr.parallel import (
    InProcessExecutor,
    LocalProcessExecutor,
    RayExecutor,
    add_executor_args,
    executor_from_args,
    make_executor,
)

TRAIN = ["--train-count", "24", "--val-count", "8", "--batch-size", "8", "--steps", "4"]
# batch size 4 and 2 shards: the shards start at batch boundaries, so every batch holds the same
# rows as in one process and the store must be bit-identical
FEATURIZE = ["--timesteps", "4", "--batch-size", "4", "--quiet", "--threads", "1"]


def run_main(*args) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, err.getvalue()


def store_arrays(run: Path) -> dict[str, np.ndarray]:
    store = FeatureStore.load(next((run / "features").glob("train-das-*")))
    return {
        "features": np.asarray(store.features),
        "error": store.column("error"),
        "residual": store.column("residual"),
        "done": np.asarray(store.done),
    }


def assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    for name in a:
        assert np.array_equal(a[name], b[name]), f"{name} differs"


def fresh_run(src: Path, dst: Path) -> Path:
    import shutil

    dst.mkdir(parents=True)
    for part in ("run.json", "train.json", "model"):
        if (src / part).is_dir():
            shutil.copytree(src / part, dst / part)
        elif (src / part).is_file():
            shutil.copy2(src / part, dst / part)
    return dst


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("parallel") / "run"
    assert main(["train", "--out", str(run), *TRAIN, "--quiet", "--threads", "1"]) == 0
    return run


@pytest.fixture(scope="module")
def reference(trained, tmp_path_factory) -> dict[str, np.ndarray]:
    """The store the in-process executor makes (one thread, like every worker)."""
    run = fresh_run(trained, tmp_path_factory.mktemp("inprocess") / "run")
    assert run_main("featurize", run, *FEATURIZE)[0] == 0
    return store_arrays(run)


@pytest.fixture(scope="module")
def ray_runtime():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    # this module's helpers travel by value (workers cannot import the test modules)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield ray
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    ray.shutdown()


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_executor_args(p)
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(list(argv))


def test_executor_options():
    assert isinstance(make_executor("inprocess"), InProcessExecutor)
    local = executor_from_args(_args("--workers", "3"))
    assert isinstance(local, LocalProcessExecutor) and local.parallelism == 3
    ray_ex = executor_from_args(
        _args("--executor", "ray", "--workers", "2", "--ray-gpus-per-task", "0.5")
    )
    assert isinstance(ray_ex, RayExecutor) and ray_ex.gpus_per_task == 0.5
    assert ray_ex.parallelism == 2
    with pytest.raises(ConfigError, match="unknown executor"):
        make_executor("dask")
    with pytest.raises(ConfigError, match="--ray-address needs --executor ray"):
        executor_from_args(_args("--ray-address", "auto"))
    with pytest.raises(ConfigError, match="--workers"):
        executor_from_args(_args("--executor", "ray", "--workers", "0"))
    with pytest.raises(ConfigError, match="ray-cpus-per-task"):
        RayExecutor(cpus_per_task=0)


def test_ray_results_in_order_and_errors_as_themselves(ray_runtime):
    with RayExecutor(progress=False) as ex:
        assert list(ex.map(operator.neg, range(7))) == [0, -1, -2, -3, -4, -5, -6]
        with pytest.raises(ConfigError, match="bad job") as info:
            list(ex.map(_raise, [1]))
    assert info.value.hint == "the hint survives"
    assert ray_runtime.is_initialized()  # a runtime the executor did not start is left running


def _raise(_job):
    raise ConfigError("bad job", hint="the hint survives")


def _die_once(job: tuple[str, int]) -> tuple[int, int]:
    """Kill this worker the first time (as a crash would); return (value, pid) afterwards."""
    marker, value = job
    if not os.path.exists(marker):
        Path(marker).write_text("died")
        os._exit(1)
    import torch

    return value, torch.get_num_threads()


def test_ray_retries_a_job_whose_worker_died(ray_runtime, tmp_path):
    with RayExecutor(progress=False, cpus_per_task=1) as ex:
        out = list(ex.map(_die_once, [(str(tmp_path / "marker"), 5)]))
    assert out == [(5, 1)]  # redone on a fresh worker, limited to one thread


def test_ray_featurize_equals_inprocess(ray_runtime, trained, reference, tmp_path):
    run = fresh_run(trained, tmp_path / "run")
    code, err = run_main("featurize", run, *FEATURIZE, "--executor", "ray", "--workers", "2")
    assert code == 0, err
    assert_same(store_arrays(run), reference)
    assert ray_runtime.is_initialized()


def _shard_dying_midway(job):
    """Compute the first batch of the shard, claim the next rows, then die holding them."""
    from diffattr.attribution.features.shards import featurize_shard
    from diffattr.attribution.features.store import RowClaims

    marker = Path(job.run) / f"died-{job.rows[0]}"
    if job.rows[0] == 0 and not marker.exists():
        featurize_shard(replace(job, rows=job.rows[:4]))
        store = next((Path(job.run) / "features").glob("train-das-*"))
        claims = RowClaims(store / "claims")
        for r in job.rows[4:8]:
            claims.try_claim(r)
        marker.write_text("died")
        os._exit(1)
    return featurize_shard(job)


def test_ray_redoes_the_rows_a_dead_worker_left(ray_runtime, trained, reference, tmp_path):
    from diffattr.attribution.features.shards import ShardJob, shard_rows
    from diffattr.attribution.features.store import RowClaims
    from diffattr.families import load_for_worker

    run = fresh_run(trained, tmp_path / "run")
    assert run_main("featurize", run, *FEATURIZE, "--rows", "0:4")[0] == 0  # creates the store
    settings = FeatureStore.load(next((run / "features").glob("train-das-*")), False).settings
    template = ShardJob(str(run), "das", settings["features"], (), load_for_worker, batch_size=4)
    jobs = [replace(template, rows=tuple(p.tolist())) for p in shard_rows(np.arange(24), 2, 4)]
    with RayExecutor(progress=False) as ex:
        assert list(ex.map(_shard_dying_midway, jobs)) == [12, 12]
    assert (run / "died-0").exists()  # the first worker did die
    assert_same(store_arrays(run), reference)
    store = next((run / "features").glob("train-das-*"))
    assert not RowClaims(store / "claims").active()


@pytest.mark.parametrize("n,k", [(300, 20), (12, 40)])  # primal and dual kernels
def test_ray_scoring_tiles_equal_inprocess(ray_runtime, tmp_path, n, k):
    from diffattr.attribution.kernel import Kernel, inner_products

    rng = np.random.default_rng(0)
    store = np.lib.format.open_memmap(tmp_path / "features.npy", "w+", np.float32, (n, k))
    store[:] = rng.standard_normal((n, k))
    store.flush()
    targets = rng.standard_normal((5, k))
    local = Kernel.fit(store, block=64)
    assert local.form == ("primal" if n > k else "dual")
    with RayExecutor(progress=False) as ex:
        remote = Kernel.fit(store, block=64)
        remote.executor = ex
        np.testing.assert_allclose(remote.cross(targets), local.cross(targets), rtol=1e-12)
        by_jobs = inner_products(targets, store, 64, executor=ex)
    np.testing.assert_allclose(by_jobs, targets @ np.asarray(store, np.float64).T, rtol=1e-12)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features.npy"]  # scratch removed


def test_ray_score_command_equals_inprocess(ray_runtime, trained, tmp_path):
    scores = {}
    for name, extra in (("inprocess", []), ("ray", ["--executor", "ray", "--workers", "2"])):
        run = fresh_run(trained, tmp_path / name)
        args = ("score", run, "--method", "das", "--targets", "val", *FEATURIZE, *extra)
        code, err = run_main(*args)
        assert code == 0, err
        scores[name] = np.load(next((run / "scores").glob("das-val*")) / "scores.npy")
    np.testing.assert_allclose(scores["ray"], scores["inprocess"], rtol=1e-10, atol=1e-12)


def test_run_pending_hands_workers_only_unfinished_jobs(capsys):
    ran: list[int] = []
    ex = InProcessExecutor(progress=False)
    assert ex.run_pending(ran.append, [0, 1, 2, 3], lambda j: j % 2 == 0, "build") == 2
    assert ran == [1, 3]
    assert "build: 2 of 4 already done" in capsys.readouterr().err
    assert ex.run_pending(ran.append, [0, 2], lambda j: True, "build") == 0 and ran == [1, 3]
