"""``--config FILE``: option defaults from TOML or JSON, flags override, clear errors."""

from __future__ import annotations

import json

import pytest

from diffattr.cli import build_parser, main
from diffattr.config import chosen_command, parse_args
from diffattr.errors import ConfigError


def _args(argv):
    return parse_args(build_parser(), argv)


@pytest.fixture
def toml(tmp_path):
    def write(text: str, name: str = "diffattr.toml"):
        path = tmp_path / name
        path.write_text(text)
        return str(path)

    return write


def test_toml_top_level_and_command_table_flags_override(toml):
    cfg = toml(
        """
        threads = 1
        sampler = "ddpm"          # only generate has --sampler: ignored by train
        [train]
        steps = 7
        batch-size = 4            # dashes ...
        checkpoint_every = 3      # ... or underscores
        out = "runs/from-config"  # a required option may come from the file
        """
    )
    a = _args(["train", "--config", cfg, "--steps", "9"])
    assert (a.steps, a.batch_size, a.checkpoint_every, a.out, a.threads) == (
        9,
        4,
        3,
        "runs/from-config",
        1,
    )
    a = _args(["generate", "run", f"--config={cfg}"])
    assert a.sampler == "ddpm" and a.threads == 1 and a.steps == 50  # [train] is not applied


def test_values_are_checked_like_flags(toml):
    cfg = toml(
        """
        [score]
        method = ["das", "dtrak"]   # a list joins into the comma-separated form
        quiet = true
        timestep-strategy = "first"
        relative-lambda = 0.5
        lambda = 2                  # the flag's name, though its dest is `lam`
        """
    )
    a = _args(["score", "run", "--config", cfg])
    assert a.method == "das,dtrak" and a.quiet is True and a.timestep_strategy == "first"
    assert a.relative_lambda == 0.5 and a.lam == 2.0 and isinstance(a.lam, float)
    assert _args(["score", "run", "--config", cfg, "--method", "trak"]).method == "trak"


def test_nested_lds_commands_from_json(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(
        json.dumps(
            {
                "lds": {"threads": 2, "build": {"subsets": 4, "independent": True}},
                "lds.eval": {"timesteps": [10, 100], "bootstrap": 50},
            }
        )
    )
    a = _args(["lds", "build", "run", "--out", "bench", "--config", str(cfg)])
    assert (a.subsets, a.independent, a.threads) == (4, True, 2)
    a = _args(["lds", "eval", "bench", "--config", str(cfg), "--bootstrap", "7"])
    assert (a.timesteps, a.bootstrap, a.threads) == ("10,100", 7, 2)


def test_toml_nested_table_and_later_files_win(toml):
    first = toml("[lds.build]\nsubsets = 4\nfraction = 0.25\n", "a.toml")
    second = toml("[lds.build]\nsubsets = 6\n", "b.toml")
    a = _args(["lds", "build", "run", "--out", "b", "--config", first, "--config", second])
    assert (a.subsets, a.fraction) == (6, 0.25)


def test_chosen_command_skips_option_values():
    parser = build_parser()
    assert chosen_command(parser, ["lds", "--threads", "2", "build", "run"])[0] == ("lds", "build")
    assert chosen_command(parser, ["score", "--method", "train", "run"])[0] == ("score",)
    assert chosen_command(parser, ["--help"])[0] == ()


@pytest.mark.parametrize(
    "text,argv,needle",
    [
        ("stepz = 3", ["train"], "unknown key 'stepz' at the top level"),
        ("[train]\nsampler = 'ddim'", ["train"], "unknown key 'sampler' in [train]"),
        ("[score]\nmethd = 'das'", ["train"], "unknown key 'methd' in [score]"),  # other table
        ("[trian]\nsteps = 1", ["train"], "unknown table [trian]"),
        ("[score]\nrun = 'x'", ["score", "x"], "'run' in [score] is a positional argument"),
        ("[train]\nsteps = 'many'", ["train"], "steps = 'many': expected an integer"),
        ("[train]\nsteps = 2.5", ["train"], "steps = 2.5: expected an integer"),
        ("[generate]\nsampler = 'euler'", ["generate", "r"], "choose from ddim, ddpm"),
        ("[score]\nquiet = 1", ["score", "r"], "quiet = 1: expected true or false"),
        ("steps = ", ["train"], "is not valid TOML"),
    ],
)
def test_config_errors_are_one_line(toml, capsys, text, argv, needle):
    cfg = toml(text)
    assert main([*argv, "--config", cfg, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    first = err.splitlines()[0]
    assert needle in first and cfg in first


def test_missing_file_and_typo_hint(tmp_path, toml, capsys):
    assert main(["train", "--config", str(tmp_path / "nope.toml")]) == 2
    assert "nope.toml does not exist" in capsys.readouterr().err
    assert main(["train", "--config", toml("[train]\nstep = 3")]) == 2
    assert "hint: did you mean 'steps'?" in capsys.readouterr().err


def test_debug_raises_config_errors(toml):
    with pytest.raises(ConfigError):
        main(["train", "--config", toml("stepz = 1"), "--debug"])


@pytest.mark.parametrize("argv", [["train", "--help"], ["lds", "build", "--help"]])
def test_help_lists_config(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    assert "--config FILE" in capsys.readouterr().out
