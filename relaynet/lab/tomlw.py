# -*- test-case-name: tests.test_lab -*-
"""
A small TOML writer for the node configs the lab generates.

It writes what L{tomllib} reads back to the same value: tables, arrays of
tables, inline tables inside arrays, strings, integers, floats and booleans.
Dates and times are not supported (node configs have none).
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+\Z")


def _key(name: str) -> str:
    return name if _BARE_KEY.match(name) else _string(name)


def _string(value: str) -> str:
    out = ['"']
    for ch in value:
        code = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _is_table_array(value: Any) -> bool:
    return (
        isinstance(value, (list, tuple)) and len(value) > 0
        and all(isinstance(v, Mapping) for v in value)
    )


def _emit(lines: list[str], path: list[str], table: Mapping[str, Any]) -> None:
    for k, v in table.items():
        if not isinstance(v, Mapping) and not _is_table_array(v):
            lines.append(f"{_key(k)} = {_value(v)}")
    for k, v in table.items():
        if isinstance(v, Mapping):
            sub = [*path, _key(k)]
            lines.append("")
            lines.append(f"[{'.'.join(sub)}]")
            _emit(lines, sub, v)
        elif _is_table_array(v):
            sub = [*path, _key(k)]
            for item in v:
                lines.append("")
                lines.append(f"[[{'.'.join(sub)}]]")
                _emit(lines, sub, item)


def dumps(data: Mapping[str, Any], header: str = "") -> str:
    """
    Render C{data} as a TOML document.

    @param data: nested mappings, lists and scalars.
    @param header: comment lines put first (without C{#}).
    @return: the document, ending with a newline.
    @raise TypeError: for a value TOML cannot hold here (e.g. L{None}).
    """
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    _emit(lines, [], data)
    text = "\n".join(lines).lstrip("\n")
    return text + "\n"
