"""
Shared pytest configuration.
"""

from __future__ import annotations

from typing import Any

_LARGE = 4096


def _first_difference(a: Any, b: Any) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _size(value: Any) -> int:
    if isinstance(value, (str, bytes)):
        return len(value)
    if isinstance(value, (list, tuple)):
        return sum(_size(v) for v in value) + len(value)
    return 0


def pytest_assertrepr_compare(config: Any, op: str, left: Any, right: Any) -> list[str] | None:
    """
    Explain a failed comparison of large strings, bytes or lists of them
    briefly. pytest's own explanation runs difflib over both sides, which is
    quadratic: with CI set (no truncation) the expected failures of the
    twisted.mail baselines on 200 KB messages took minutes each.
    """
    if op != "==" or _size(left) + _size(right) < _LARGE:
        return None
    lines = [f"{type(left).__name__} (size {_size(left)}) == {type(right).__name__} (size {_size(right)})"]
    while isinstance(left, (list, tuple)) and isinstance(right, (list, tuple)):
        i = _first_difference(left, right)
        lines.append(f"first differing item: [{i}] (lengths {len(left)} and {len(right)})")
        if i >= len(left) or i >= len(right):
            return lines
        left, right = left[i], right[i]
    if isinstance(left, (str, bytes)) and type(left) is type(right):
        i = _first_difference(left, right)
        lines += [
            f"first difference at offset {i} (lengths {len(left)} and {len(right)}):",
            f"  left:  {left[max(0, i - 40):i + 40]!r}",
            f"  right: {right[max(0, i - 40):i + 40]!r}",
        ]
    return lines
