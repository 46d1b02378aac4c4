"""Method lists as the command line writes them, and the labels tables use."""

import pytest

from diffattr.attribution.methods.spec import method_label, parse_method_list, split_top_level
from diffattr.errors import ConfigError


def test_options_are_typed_and_nested_methods_stay_whole():
    parsed = parse_method_list(
        "das, das[residual=none;leverage=true;relative-lambda=1e-3;k=8],"
        "combine[methods=das+ekfac[normalize=false]]"
    )
    assert parsed == [
        ("das", {}),
        ("das", {"residual": "none", "leverage": True, "relative_lambda": 1e-3, "k": 8}),
        ("combine", {"methods": "das+ekfac[normalize=false]"}),
    ]


def test_split_top_level_ignores_separators_inside_brackets():
    assert split_top_level("a[x;y];b", ";") == ["a[x;y]", "b"]
    assert split_top_level("a[b[c,d],e],f", ",") == ["a[b[c,d],e]", "f"]


def test_labels_round_trip_through_the_parser():
    for name, options in [("das", {}), ("abu", {"eta": 0.001, "steps": 5})]:
        label = method_label(name, options)
        assert parse_method_list(label) == [(name, options)]
    assert method_label("abu", {"steps": 5, "eta": 0.001}) == "abu[eta=0.001;steps=5]"  # sorted


@pytest.mark.parametrize(
    "text,message",
    [("DAS", "cannot parse method 'DAS'"), ("das[residual]", "needs key=value"),
     ("das[x=1", "cannot parse method")],
)  # fmt: skip
def test_malformed_lists_say_what_is_wrong(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_method_list(text)
