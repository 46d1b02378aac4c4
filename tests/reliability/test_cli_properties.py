"""Property-based: whatever options or config file a user gives, no traceback reaches them —
the CLI exits 0 or 2 (an ``error:`` line, or argparse's usage message).

Nothing trains for real: ``train`` runs with the training loop replaced by a stub, ``score``
with the attributor's scoring replaced by zeros; everything before them (parsing, config
files, validation, data loading, model loading, method options) is the real code.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from reliability_helpers import copy_run, run_main

PROPERTY = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    max_size=12,
)
ints = st.one_of(st.integers(-3, 40), st.sampled_from([0, -1, 10**6, 2**63])).map(str)
floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32), st.sampled_from([0.0, -1.0, 1e-300])
).map(repr)


def list_of(element) -> st.SearchStrategy[str]:
    return st.lists(element, min_size=1, max_size=4).map(",".join)


METHOD_NAMES = ["das", "dtrak", "trak", "pixel-cos", "random", "grad-cos", "journey-trak", "x"]
OPTION_TEXT = st.builds(
    lambda name, opts: name + (f"[{opts}]" if opts else ""),
    st.sampled_from(METHOD_NAMES),
    st.one_of(
        st.none(),
        st.sampled_from(["residual=none", "leverage=true", "seed=-1", "k=", "=", "[", "x=1;y"]),
        text,
    ),
)
METHOD = st.lists(OPTION_TEXT, min_size=1, max_size=3).map(",".join)
JUNK = ["--nope", "-x", "--", "extra", "--quiet"]


def choice(*values: str) -> st.SearchStrategy[str]:
    return st.sampled_from(values)


def options(spec: dict[str, st.SearchStrategy]) -> st.SearchStrategy[list[str]]:
    """A random subset of the options in ``spec`` with values of the right type (mostly valid,
    some out of range); now and then one value is arbitrary text or a junk token is added."""

    @st.composite
    def build(draw):
        chosen = draw(st.lists(st.sampled_from(sorted(spec)), unique=True, max_size=len(spec)))
        values = {flag: draw(spec[flag]) for flag in chosen}
        if chosen and draw(st.integers(0, 3)) == 0:
            values[draw(st.sampled_from(chosen))] = draw(text)
        argv = []
        for flag, value in values.items():
            argv.append(flag if value is True else f"{flag}={value}")  # "=": values like -inf
        if draw(st.integers(0, 5)) == 0:
            argv.append(draw(st.sampled_from(JUNK)))
        return argv

    return build()


TRAIN = {
    "--data": choice("digits", "digits4", "nothing.npz", "./none", ""),
    "--size": st.integers(-2, 12).map(str),
    "--mismatch": choice("error", "resize"),
    "--val-count": ints,
    "--train-count": ints,
    "--split-seed": ints,
    "--preset": choice("tiny", "cifar", "nope", "/", "."),
    "--steps": ints,
    "--batch-size": ints,
    "--lr": floats,
    "--ema-decay": floats,
    "--seed": ints,
    "--checkpoint-every": ints,
    "--threads": st.integers(-2, 2).map(str),
}

SCORE = {
    "--method": METHOD,
    "--targets": choice("samples", "val", "nothing.npz", "", "."),
    "--k": ints,
    "--lambda": floats,
    "--relative-lambda": floats,
    "--timesteps": ints,
    "--timestep-strategy": choice("uniform", "first", "random"),
    "--noise-seed": ints,
    "--params": choice("conv_out", "(", "zzz", ""),
    "--projector": choice("auto", "identity", "gaussian", "countsketch"),
    "--proj-dim": ints,
    "--proj-seed": ints,
    "--batch-size": ints,
}

LDS_EVAL = {
    "--run": choice("", "nothing", "."),
    "--method": METHOD,
    "--timesteps": list_of(ints),
    "--lambdas": list_of(floats),
    "--bootstrap": ints,
    "--measure-timesteps": ints,
    "--seed-index": list_of(ints),
    "--projector": choice("auto", "identity"),
}


def check(argv: list) -> int:
    code, _, err = run_main(*argv)  # any exception here would be a traceback for the user
    assert code in (0, 2), (argv, code, err)
    event(f"exit {code}: " + (err.splitlines()[-1][:60] if err.startswith("usage:") else err[:24]))
    assert "Traceback" not in err
    if code == 2 and err and not err.startswith("usage:"):
        assert err.startswith("error: "), err
    return code


@pytest.fixture
def no_training(monkeypatch):
    """Replace the training loop (``train`` is imported by the command at call time)."""
    import diffattr.diffusion.training as training

    def fake_train(dataset, config, out_dir, **kw):
        config.validate()
        return Path(out_dir) / "model"

    monkeypatch.setattr(training, "train", fake_train)


@pytest.fixture
def no_scoring(monkeypatch):
    from diffattr.attribution.attributor import Attributor, as_images
    from diffattr.attribution.scores import Scores

    def fake_score(self, targets, target_ids=None, screen=None):
        images, ids = as_images(targets, target_ids)
        n = len(self.train)
        return Scores(np.zeros((len(ids), n)), self.train.ids.numpy(), ids, self.method.name)

    monkeypatch.setattr(Attributor, "score", fake_score)


@PROPERTY
@given(argv=options(TRAIN))
def test_train_options_never_crash(tmp_path, no_training, argv):
    out = tempfile.mkdtemp(dir=tmp_path)
    check(["train", "--out", f"{out}/run", *argv])


@PROPERTY
@given(argv=options(SCORE))
def test_score_options_never_crash(tiny_run, tmp_path, no_scoring, argv):
    run = tmp_path / "run"
    if not run.exists():
        copy_run(tiny_run, run, parts=("run.json", "train.json", "model", "samples"))
    check(["score", run, *argv, "--threads", "1"])


@PROPERTY
@given(argv=options(LDS_EVAL), bench=st.sampled_from(["missing", "empty", "garbage"]))
def test_lds_eval_options_never_crash(tmp_path, argv, bench):
    path = tmp_path / bench
    if bench != "missing" and not path.exists():
        path.mkdir()
        if bench == "garbage":
            for name in ("ground_truth.npz", "targets.npz", "subsets.npy", "lds.json"):
                (path / name).write_bytes(b"\x00garbage")
    check(["lds", "eval", path, *argv, "--quiet"])


# ------------------------------------------------------------------------------ config files

SCALAR = st.one_of(st.integers(-3, 10**6), st.floats(width=32), text, st.booleans())
VALUE = st.one_of(SCALAR, st.lists(SCALAR, max_size=3))
KEYS = st.one_of(st.sampled_from([k[2:] for k in TRAIN] + ["threads", "quiet", "out"]), text)
TABLE = st.dictionaries(KEYS, VALUE, max_size=5)
CONFIG = st.dictionaries(
    st.one_of(KEYS, st.sampled_from(["train", "score", "lds", "nope"])),
    st.one_of(VALUE, TABLE),
    max_size=6,
)


def toml_key(key: str) -> str:
    bare = key and all(c.isascii() and (c.isalnum() or c in "-_") for c in key)
    return key if bare else json.dumps(key, ensure_ascii=False)


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return "{" + ", ".join(f"{toml_key(k)} = {toml_value(x)}" for k, x in v.items()) + "}"


def to_toml(data: dict) -> str:
    top = [f"{toml_key(k)} = {toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    tables = [
        f"[{toml_key(k)}]\n" + "".join(f"{toml_key(a)} = {toml_value(b)}\n" for a, b in v.items())
        for k, v in data.items()
        if isinstance(v, dict)
    ]
    return "\n".join(top) + "\n" + "\n".join(tables)


@PROPERTY
@given(
    content=st.one_of(CONFIG.map(to_toml), CONFIG.map(json.dumps), text),
    suffix=st.sampled_from([".toml", ".json", ".cfg"]),
)
def test_config_files_never_crash(tmp_path, no_training, content, suffix):
    out = Path(tempfile.mkdtemp(dir=tmp_path))
    cfg = out / f"c{suffix}"
    cfg.write_text(content, encoding="utf-8")
    check(["train", "--out", out / "run", "--config", cfg, "--steps", "2"])
