# -*- test-case-name: tests.test_control -*-
"""
Text helpers shared by the admin API (L{relaynet.admin.api}) and its command
line client (L{relaynet.admin.queuecli}): reading an age, writing ages and
sizes for people.

Standard library only: C{relaynet queue} imports this module, and must start
without twisted.web or a reactor.
"""

from __future__ import annotations

import re

_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_age(text: str) -> float:
    """
    An age: seconds, or a number with C{s}, C{m}, C{h} or C{d}.

    @return: the age in seconds.
    @raise ValueError: C{text} is not an age.
    """
    m = _AGE.match(text)
    if not m:
        raise ValueError(f"{text!r} is not an age (e.g. 90, 90s, 5m, 2h, 1d)")
    return float(m.group(1)) * _UNITS[m.group(2)]


def human_age(seconds: float) -> str:
    """C{3725} -> C{1h02m}: the two largest units, negative ages as C{0s}."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def human_size(n: int) -> str:
    """C{1234} -> C{1.2K}, like C{ls -h}."""
    size = float(n)
    for unit in ("", "K", "M", "G"):
        if size < 1024 or unit == "G":
            return f"{int(size)}" if unit == "" else f"{size:.1f}{unit}"
        size /= 1024
    return str(n)
