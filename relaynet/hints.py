# -*- test-case-name: tests.test_lab,tests.test_cli -*-
"""
Commands printed for the user to paste: the demo's C{$ ...} lines, the
C{next:} hints of C{lab up}, the advice in error messages.

A hint is only useful if it runs when pasted as printed, in the directory
the user is in. After C{make demo} the C{relaynet} script lives in
C{.venv/bin/} and is not on C{PATH}, so the program is named the way it was
started: C{relaynet} when that finds the same script on C{PATH}, else the
script's path (relative to the current directory when under it), else
C{PYTHON -m relaynet.cli}. Paths in hints are shortened the same way.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import Callable


def _absolute(path: str | Path, cwd: Path) -> Path:
    # Not resolve(): a venv's python is a symlink, and its bin/ is what counts.
    return Path(os.path.normpath(cwd / path))


def shown_path(path: str | Path, cwd: Path | None = None) -> str:
    """
    C{path} as a shell word that works from C{cwd}: relative when it lies
    under C{cwd}, else absolute; quoted when needed.
    """
    here = Path.cwd() if cwd is None else cwd
    full = _absolute(path, here)
    try:
        rel = full.relative_to(here)
    except ValueError:
        return shlex.quote(str(full))
    text = str(rel)
    if text == ".":
        return "."
    return shlex.quote(text)


def program(argv0: str | None = None, executable: str | None = None, cwd: Path | None = None,
            which: Callable[[str], str | None] = shutil.which) -> str:
    """
    The C{relaynet} command as it can be typed here (see the module docstring).

    @param argv0: how this process was started (default C{sys.argv[0]}).
    @param executable: its Python (default C{sys.executable}).
    @param cwd: the directory hints are for (default the current one).
    @param which: looks a command up on C{PATH}.
    """
    argv0 = sys.argv[0] if argv0 is None else argv0
    executable = sys.executable if executable is None else executable
    here = Path.cwd() if cwd is None else cwd
    candidates = []
    if argv0 and Path(argv0).name == "relaynet":
        candidates.append(_absolute(argv0, here))
    if executable:
        candidates.append(_absolute(executable, here).parent / "relaynet")
    for script in candidates:
        if not script.is_file():
            continue
        found = which("relaynet")
        if found and _absolute(found, here) == script:
            return "relaynet"
        shown = shown_path(script, here)
        return shown if "/" in shown else "./" + shown
    return f"{shlex.quote(executable or 'python3')} -m relaynet.cli"


def command(*args: str | Path) -> str:
    """
    A C{relaynet} command line to print: the program as L{program} names it,
    then C{args}, paths among them (L{Path} values) shortened and every
    word quoted for the shell.
    """
    words = [shown_path(a) if isinstance(a, Path) else shlex.quote(a) for a in args]
    return " ".join([program(), *words])
