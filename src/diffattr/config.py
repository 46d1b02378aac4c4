"""Option defaults from a config file: ``diffattr COMMAND --config FILE``.

The file is TOML (``tomllib``; on Python 3.10 the ``tomli`` package if installed) or JSON.
It holds options by their long name, with dashes or underscores, at the top level or in a
table named after the subcommand; nested commands use nested tables (TOML ``[lds.build]``,
JSON ``{"lds": {"build": {...}}}``; a key ``"lds.build"`` works too)::

    threads = 2                 # every command that has --threads
    [train]
    data = "digits"
    steps = 2000
    [score]
    method = "das,dtrak"        # or a list: ["das", "dtrak"]
    [lds.eval]
    timesteps = [10, 100]

Precedence: flags on the command line > the command's table > enclosing tables > top level
> built-in defaults. Several ``--config`` files are read in order, later ones winning.
A key must name an option of some command in its table's scope (so typos are caught even in
tables of other commands); it applies to the chosen command only if that command has the
option. Values are checked like flags (type, choices); ``true``/``false`` for switches.
Positional arguments (the run directory) stay on the command line. Relative paths in the
file are taken relative to the working directory, as on the command line.
"""

from __future__ import annotations

import argparse
import difflib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from diffattr.errors import ConfigError

OPTION = "--config"
HELP = "read option defaults from a TOML or JSON file (flags override it; repeatable)"
SKIP = {"help", "config"}


def add_config_option(p: argparse.ArgumentParser) -> None:
    """Add ``--config FILE`` to ``p`` (idempotent)."""
    if OPTION not in p._option_string_actions:
        p.add_argument(OPTION, action="append", metavar="FILE", default=None, help=HELP)


def _subcommands(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The sub-parsers of ``p`` by name (argparse internals: its ``_SubParsersAction``)."""
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _all_parsers(p: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    yield path, p
    for name, sub in _subcommands(p).items():
        yield from _all_parsers(sub, (*path, name))


def ensure_config_option(root: argparse.ArgumentParser) -> None:
    """Give every parser (nested commands such as ``lds build`` included) ``--config``."""
    for _, p in _all_parsers(root):
        add_config_option(p)


def config_files(argv: Sequence[str]) -> list[str]:
    """The ``--config FILE`` / ``--config=FILE`` values in ``argv`` (before any ``--``)."""
    out = []
    it = iter(argv)
    for tok in it:
        if tok == "--":
            break
        if tok == OPTION:
            value = next(it, None)
            if value is None or value.startswith("-"):
                return out  # argparse reports the missing value
            out.append(value)
        elif tok.startswith(OPTION + "="):
            out.append(tok[len(OPTION) + 1 :])
    return out


def chosen_command(
    root: argparse.ArgumentParser, argv: Sequence[str]
) -> tuple[tuple[str, ...], argparse.ArgumentParser]:
    """(command path, its parser) that ``argv`` selects, e.g. (("lds", "build"), parser).

    Walks the tokens like argparse does: options that take a value skip it.
    """
    path: tuple[str, ...] = ()
    p = root
    tokens = list(argv)
    i = 0
    while True:
        subs = _subcommands(p)
        if not subs:
            break
        found = None
        while i < len(tokens):
            tok = tokens[i]
            i += 1
            if tok == "--":
                i = len(tokens)
                break
            if tok.startswith("-") and len(tok) > 1:
                action = p._option_string_actions.get(tok.split("=", 1)[0])
                if action is not None and "=" not in tok and action.nargs != 0:
                    i += 1
                continue
            if tok in subs:
                found = tok
                break
        if found is None:
            break
        path, p = (*path, found), subs[found]
    return path, p


def load_file(path: str | Path) -> dict[str, Any]:
    """The mapping a TOML or JSON config file holds."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror or exc}") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"config file {path} is not valid JSON: {exc}") from None
    else:
        toml = _toml()
        try:
            data = toml.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, toml.TOMLDecodeError) as exc:
            raise ConfigError(
                f"config file {path} is not valid TOML: {exc}",
                hint="config files are TOML (any extension) or JSON (.json)",
            ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a table of options, not {_kind(data)}")
    return data


def _toml():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise ConfigError(
                "TOML config files need Python 3.11 or the tomli package",
                hint="pip install tomli, or write the config as .json",
            ) from None
    return tomllib


def _kind(v: Any) -> str:
    return {dict: "a table", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(v), type(v).__name__
    )


def _option_names(p: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Optional actions of ``p`` by every name a config key may use (long flags, dest)."""
    names: dict[str, argparse.Action] = {}
    for action in p._actions:
        if not action.option_strings or action.dest in SKIP or action.dest is argparse.SUPPRESS:
            continue
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        for s in action.option_strings:
            if s.startswith("--"):
                names[_norm(s[2:])] = action
        names.setdefault(_norm(action.dest), action)
    return names


def _positional_names(p: argparse.ArgumentParser) -> set[str]:
    return {
        _norm(a.dest)
        for a in p._actions
        if not a.option_strings and not isinstance(a, argparse._SubParsersAction)
    }


def _norm(key: str) -> str:
    return key.replace("-", "_")


def _scope(prefix: tuple[str, ...], root: argparse.ArgumentParser):
    """Parsers of the commands under ``prefix`` (leaf commands and the prefix itself)."""
    node = root
    for name in prefix:
        node = _subcommands(node)[name]
    return list(_all_parsers(node, prefix))


def _table_name(path: tuple[str, ...]) -> str:
    return "at the top level" if not path else "in [" + ".".join(path) + "]"


def _layers(
    data: dict[str, Any], root: argparse.ArgumentParser, file: str
) -> list[tuple[tuple[str, ...], dict[str, Any]]]:
    """Flatten the file into (table path, options) layers, validating every key."""
    layers: list[tuple[tuple[str, ...], dict[str, Any]]] = []

    def walk(prefix: tuple[str, ...], table: dict[str, Any]) -> None:
        options: dict[str, Any] = {}
        node = root
        for name in prefix:
            node = _subcommands(node)[name]
        subs = _subcommands(node)
        scope = _scope(prefix, root)
        for key, value in table.items():
            parts = tuple(key.replace(" ", ".").split(".")) if isinstance(key, str) else (key,)
            if isinstance(value, dict):
                target = node
                for part in parts:
                    target_subs = _subcommands(target)
                    if part not in target_subs:
                        known = ", ".join(sorted(subs)) or "none"
                        table = ".".join((*prefix, *map(str, parts)))
                        raise ConfigError(
                            f"config {file}: unknown table [{table}] (commands here: {known})"
                        )
                    target = target_subs[part]
                walk((*prefix, *parts), value)
                continue
            norm = _norm(str(key))
            if not any(norm in _option_names(p) for _, p in scope):
                where = _table_name(prefix)
                if any(norm in _positional_names(p) for _, p in scope):
                    raise ConfigError(
                        f"config {file}: {key!r} {where} is a positional argument; "
                        "give it on the command line"
                    )
                known = sorted({n for _, p in scope for n in _option_names(p)})
                close = difflib.get_close_matches(norm, known, n=1)
                owner = f"`diffattr {' '.join(prefix)}`" if prefix else "any command"
                raise ConfigError(
                    f"config {file}: unknown key {key!r} {where} (not an option of {owner})",
                    hint=f"did you mean {close[0].replace('_', '-')!r}?" if close else None,
                )
            options[norm] = value
        layers.append((prefix, options))

    walk((), data)
    return layers


def _convert(action: argparse.Action, value: Any, key: str, file: str) -> Any:
    """``value`` checked and converted like the flag would be."""

    def bad(why: str) -> ConfigError:
        return ConfigError(f"config {file}: {key} = {value!r}: {why}")

    if action.nargs == 0:  # store_true / store_false / store_const
        if not isinstance(value, bool):
            raise bad("expected true or false")
        return action.const if value else action.default  # true: as if the flag were given
    if value is None:
        return None
    many = action.nargs in ("*", "+") or isinstance(action.nargs, int)
    if isinstance(value, list):
        if many:
            return [_convert_one(action, v, bad) for v in value]
        if any(isinstance(v, (list, dict)) for v in value):
            raise bad("expected a value or a flat list")
        value = ",".join(str(v).lower() if isinstance(v, bool) else str(v) for v in value)
    elif isinstance(value, dict):
        raise bad("expected a value, not a table")
    out = _convert_one(action, value, bad)
    return [out] if many else out


def _convert_one(action: argparse.Action, value: Any, bad) -> Any:
    if isinstance(value, bool):
        raise bad("expected a value, not true/false (that is for switches)")
    text = value if isinstance(value, str) else str(value)
    if action.type is None or action.type is str:
        out: Any = text
    else:
        try:
            out = action.type(text)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
            plain = {int: "expected an integer", float: "expected a number"}
            raise bad(plain.get(action.type) or f"invalid value ({exc})") from None
    if action.choices is not None and out not in action.choices:
        raise bad("choose from " + ", ".join(map(str, action.choices)))
    return out


def apply_config(root: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """Read the ``--config`` files named in ``argv`` and make their values the defaults of the
    chosen command's parser. Returns the files read. Raises :class:`ConfigError`."""
    ensure_config_option(root)
    files = config_files(argv)
    if not files:
        return []
    path, parser = chosen_command(root, argv)
    names = _option_names(parser)
    values: dict[str, Any] = {}
    for file in files:
        layers = _layers(load_file(file), root, file)
        # Less specific tables first, so the command's own table wins.
        for prefix, options in sorted(layers, key=lambda layer: len(layer[0])):
            if path[: len(prefix)] != prefix:
                continue
            for key, value in options.items():
                action = names.get(key)
                if action is not None:
                    values[action.dest] = _convert(action, value, key, file)
    if values:
        parser.set_defaults(**values)
        for action in parser._actions:
            if action.required and action.option_strings and action.dest in values:
                action.required = False  # given by the file; a flag still overrides it
    return files


def parse_args(root: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """``root.parse_args(argv)`` with ``--config`` files applied first."""
    apply_config(root, argv)
    return root.parse_args(list(argv))
