"""A method's options, typed: what ``das[residual=signed;leverage=true]`` may say.

Every method describes its options as :class:`Option` objects (name, kind, default, choices),
declared on the class (``Method.declared_options``) or read from the signature of the function
that computes it (``DelegatingMethod``: its keyword parameters, their annotations and
defaults, and each one's help from the function's docstring, written ````name``: what it
does;``). From them come the check of every given option (an unknown one, a value of the
wrong kind or outside its choices is refused naming the method and the option), the listing of
``diffattr methods``, and the options saved with the scores.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Any

from diffattr.errors import ConfigError

#: The default of an option without one (the method must be given it, or its context gives it).
REQUIRED = inspect.Parameter.empty

_KINDS: dict[str, type] = {"bool": bool, "int": int, "float": float, "str": str}


@dataclass(frozen=True)
class Option:
    """One option: ``kind`` bool, int, float or str (None: any value, e.g. a Python object or a
    list), ``optional`` whether None is a value, ``choices`` the allowed strings, ``help``
    what it does (``diffattr methods`` shows it)."""

    name: str
    default: Any = None
    kind: type | None = None
    optional: bool = True
    choices: tuple[str, ...] = ()
    help: str = ""

    def check(self, method: str, value: Any) -> None:
        """A :class:`ConfigError` naming ``method`` and the option unless ``value`` fits."""
        if value is None and self.optional or self.kind is None:
            return
        if self.kind is str and isinstance(value, bool):  # `fisher=true` parses as a bool
            value = str(value).lower()
        ok = {
            bool: isinstance(value, bool),
            int: isinstance(value, int) and not isinstance(value, bool),
            float: isinstance(value, int | float) and not isinstance(value, bool),
            str: isinstance(value, str),
        }.get(self.kind, True)
        if self.choices and ok:
            ok = value in self.choices
        if not ok:
            kinds = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
            want = f"one of {', '.join(self.choices)}" if self.choices else kinds[self.kind]
            raise ConfigError(
                f"method {method!r}: option {self.name!r} must be {want}, got {value!r}",
                hint=f"`diffattr methods {method}` lists its options",
            )

    def describe(self) -> str:
        """The kind as the listing shows it: ``bool``, ``float or none``, ``error|signed``, …"""
        if self.choices:
            text = "|".join(self.choices)
        else:
            text = {bool: "true/false", None: "any"}.get(self.kind) or self.kind.__name__
        return f"{text} or none" if self.optional and self.kind is not None else text

    def default_text(self) -> str:
        """The default as the listing shows it."""
        if self.default is REQUIRED:
            return "(required)"
        if self.default is None:
            return "unset"
        return str(self.default).lower() if isinstance(self.default, bool) else str(self.default)


def typed(name: str, default: Any, annotation: Any, help: str = "") -> Option:
    """The option ``name`` typed by its annotation written as text: ``float``, ``int | None``,
    ``str``, ``Literal['a', 'b']`` (a string among choices), anything else any value."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    parts = [p.strip() for p in str(text).split("|")]
    optional = "None" in parts or default is None
    kinds = [p for p in parts if p != "None"]
    if len(kinds) == 1 and kinds[0] in _KINDS:
        return Option(name, default, _KINDS[kinds[0]], optional, help=help)
    match = re.fullmatch(r"Literal\[(.*)\]", kinds[0]) if len(kinds) == 1 else None
    if match:
        choices = tuple(c.strip().strip("'\"") for c in match.group(1).split(","))
        return Option(name, default, str, optional, choices, help)
    return Option(name, default, help=help)


def documented_options(doc: str | None) -> dict[str, str]:
    """Option name → help, from a docstring's ````name``: what it does;`` phrases (up to the
    next ``;`` or the end of the sentence)."""
    text = " ".join((doc or "").split())
    found: dict[str, str] = {}
    for m in re.finditer(r"``(\w+)``: (.+?)(?:;|\.(?: |$)|$)", text):
        found.setdefault(m.group(1), m.group(2).strip())
    return found


def options_of_function(fn: Any, skip: int) -> tuple[Option, ...]:
    """The options of a method computed by ``fn(inputs, *fixed, **options)``: its parameters
    after the first ``skip``, typed by their annotations, with their defaults."""
    params = list(inspect.signature(fn).parameters.values())[skip:]
    helps = documented_options(fn.__doc__)
    return tuple(typed(p.name, p.default, p.annotation, helps.get(p.name, "")) for p in params)


def options_table(options: tuple[Option, ...]) -> list[tuple[str, str, str, str]]:
    """(name, kind, default, help) rows for a listing."""
    return [(o.name, o.describe(), o.default_text(), o.help) for o in options]
