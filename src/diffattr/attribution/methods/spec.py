"""Method lists on the command line: ``das,dtrak,das[residual=none;leverage=true]``."""

from __future__ import annotations

import re
from typing import Any

from diffattr.errors import ConfigError

_ITEM = re.compile(r"^([a-z][a-z0-9-]*)(?:\[(.*)\])?$")


def _value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def split_top_level(text: str, sep: str) -> list[str]:
    """``text`` split at each ``sep`` outside brackets (``a[x;y];b`` → ``a[x;y]``, ``b``)."""
    items, depth, current = [], 0, ""
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == sep and depth == 0:
            items.append(current)
            current = ""
        else:
            current += ch
    items.append(current)
    return items


def parse_method_list(text: str) -> list[tuple[str, dict[str, Any]]]:
    """Split a comma-separated method list; options in brackets, ``;``-separated (a value may
    hold a bracketed method of its own: ``combine[methods=das+ekfac[normalize=true]]``)."""
    items = split_top_level(text, ",")
    out = []
    for item in (i.strip() for i in items):
        m = _ITEM.match(item)
        if not m:
            raise ConfigError(
                f"cannot parse method {item!r}",
                hint="write NAME or NAME[key=value;key=value], e.g. das[residual=none]",
            )
        options: dict[str, Any] = {}
        for pair in filter(None, split_top_level(m.group(2) or "", ";")):
            key, sep, value = pair.partition("=")
            if not sep:
                raise ConfigError(f"method option {pair!r} in {item!r} needs key=value")
            options[key.strip().replace("-", "_")] = _value(value.strip())
        out.append((m.group(1), options))
    return out


def method_label(name: str, options: dict[str, Any]) -> str:
    """``das`` or ``das[residual=none]``: how a configured method is named in tables."""
    if not options:
        return name
    return f"{name}[{';'.join(f'{k}={v}' for k, v in sorted(options.items()))}]"
