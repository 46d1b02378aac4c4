"""attribution.methods.options: every method's options typed (from its declaration or its
function's signature), every given option checked, and `diffattr methods` listing them."""

from __future__ import annotations

import pytest

from diffattr.attribution.methods import METHODS, get_method
from diffattr.attribution.methods.options import REQUIRED, Option, typed
from diffattr.errors import ConfigError


def test_annotations_give_kinds_and_choices():
    assert typed("eta", 1e-3, "float") == Option("eta", 1e-3, float, False)
    assert typed("k", None, "int | None") == Option("k", None, int, True)
    lit = typed("query", "loss", "Literal['loss', 'das', 'dtrak']")
    assert lit.kind is str and lit.choices == ("loss", "das", "dtrak")
    assert typed("models", REQUIRED, "Any").kind is None  # any value: a Python object


@pytest.mark.parametrize(
    "name,options,needle",
    [
        ("das", {"residual": "signd"}, "'residual' must be one of error, signed, raw, none"),
        ("das", {"leverage": 1}, "'leverage' must be true or false, got 1"),
        ("random", {"seed": 1.5}, "'seed' must be an integer"),
        ("abu", {"eta": "big"}, "'eta' must be a number"),
        ("ekfac", {"strategy": "kfacc"}, "one of ekfac, kfac, diagonal, identity"),
        ("mucs", {"timesteps": True}, "'timesteps' must be an integer"),
    ],
)
def test_a_value_of_the_wrong_kind_is_refused_naming_method_and_option(name, options, needle):
    with pytest.raises(ConfigError, match=needle) as info:
        get_method(name, **options)
    assert f"method {name!r}" in str(info.value) and f"diffattr methods {name}" in info.value.hint


def test_values_of_the_right_kind_pass():
    get_method("abu", eta=1)  # an integer is a number
    get_method("ekfac", fisher=True)  # `fisher=true` on the command line parses as a bool
    get_method("mucs", timesteps=None)
    get_method("embedding-cos", encoder=lambda x: x, dim=8)


def test_every_method_describes_every_option_it_accepts():
    for name, cls in METHODS.items():
        specs = cls.option_specs()
        assert len({o.name for o in specs}) == len(specs), name
        for o in specs:
            assert o.describe() and o.default_text(), (name, o)
            if o.default not in (None, REQUIRED) and o.kind is not None:
                o.check(name, o.default)  # every default fits its own kind


def test_every_option_of_every_method_says_what_it_does():
    undocumented = [
        f"{name}[{o.name}]" for name, cls in METHODS.items() for o in cls.option_specs()
        if not o.help
    ]  # fmt: skip
    assert not undocumented, f"options without help text: {undocumented}"


def test_help_is_read_from_the_implementing_functions_docstring():
    from diffattr.attribution.methods.options import documented_options, options_of_function

    def fn(inputs, eta: float = 0.1, steps: int = 1):
        """Scores. Options: ``eta``: the step size; ``steps``: how many. More text."""

    assert documented_options(fn.__doc__) == {"eta": "the step size", "steps": "how many"}
    assert [o.help for o in options_of_function(fn, 1)] == ["the step size", "how many"]


def test_the_listing_shows_help(capsys):
    from diffattr.cli import main

    main(["methods", "das"])
    assert "divide by 1 − hᵢ" in capsys.readouterr().out
