"""
The shell commands that README.md prints work when pasted, as printed, into a
fresh shell in the checkout after C{make demo} (issue 17, friction 1).

Every line of README's code blocks is one command. For each, the executable
must resolve the way a fresh shell resolves it: a path such as
C{.venv/bin/relaynet} relative to the checkout, a bare name on C{PATH}
B{without} the virtualenv's C{bin/} (nothing activates it for the reader);
C{make} targets must exist (C{make -n}); relaynet's and twistd's
subcommands must exist as printed (the command is run with C{--help}
appended, after cutting it at the first placeholder such as C{ID} or C{D});
files named in the command (C{topologies/chain3.toml}) must exist.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
VENV_BIN = Path(sys.executable).parent

#: Seconds allowed for one C{--help} or C{make -n}.
TIMEOUT = 60.0

#: Placeholders README uses for values the reader supplies.
PLACEHOLDER = re.compile(r"^[A-Z][A-Z_-]*(\.\.\.)?$")


def code_lines(text: str) -> list[str]:
    """
    The lines of the indented (4-space) and fenced (C{sh}, C{shell},
    C{console}, C{bash}) code blocks of a Markdown text, without the
    indentation; blank lines dropped.
    """
    lines: list[str] = []
    fence: str | None = None
    previous_blank = True
    in_indented = False
    for line in text.splitlines():
        if fence is not None:
            if line.startswith("```"):
                fence = None
            elif fence in ("sh", "shell", "console", "bash") and line.strip():
                lines.append(line.strip().removeprefix("$ "))
            continue
        if line.startswith("```"):
            fence = line[3:].strip()
            continue
        if line.startswith("    ") and (previous_blank or in_indented):
            in_indented = True
            lines.append(line[4:])
        elif line.strip():
            in_indented = False
        previous_blank = not line.strip()
    return [line for line in lines if line.strip()]


def fresh_path() -> str:
    """C{PATH} as a fresh shell has it: without the virtualenv's C{bin/}."""
    parts = os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin").split(os.pathsep)
    venv = os.path.realpath(VENV_BIN)
    return os.pathsep.join(p for p in parts if p and os.path.realpath(p) != venv)


def fresh_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = fresh_path()
    return env


def resolve(executable: str) -> str | None:
    """Where a fresh shell in the checkout finds C{executable}, or L{None}."""
    if "/" in executable:
        path = ROOT / executable
        return str(path) if path.is_file() and os.access(path, os.X_OK) else None
    return shutil.which(executable, path=fresh_path())


def help_command(argv: list[str]) -> list[str]:
    """
    C{argv} cut before its first placeholder (and before the option that
    takes it), with C{--help} appended; unchanged if it already asks for help.
    """
    if "--help" in argv or "-h" in argv:
        return argv
    for i, token in enumerate(argv):
        if PLACEHOLDER.match(token):
            cut = i - 1 if i > 1 and argv[i - 1].startswith("-") else i
            return argv[:cut] + ["--help"]
    return argv + ["--help"]


COMMANDS = code_lines(README.read_text(encoding="utf-8"))


def test_readme_has_commands() -> None:
    """README's code blocks are found: the relaynet, twistd and make commands."""
    names = {shlex.split(c, comments=True)[0] for c in COMMANDS}
    assert {".venv/bin/relaynet", ".venv/bin/twistd", "make"} <= names, names


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_works_as_printed(command: str) -> None:
    """
    The README command C{command} names an executable a fresh shell in the
    checkout finds, and subcommands, make targets and files that exist.
    """
    argv = shlex.split(command, comments=True)
    assert argv, f"empty command line in README: {command!r}"
    where = resolve(argv[0])
    if where is None and argv[0] == "swaks":
        pytest.skip("swaks is not installed (make peers)")
    assert where is not None, (
        f"README prints {command!r}, but {argv[0]!r} is not found from the checkout "
        f"in a fresh shell (PATH without {VENV_BIN})"
    )
    for token in argv[1:]:
        if "/" in token and token.endswith(".toml"):
            assert (ROOT / token).is_file(), f"{command!r}: {token} does not exist"
    name = os.path.basename(argv[0])
    if name == "make":
        result = subprocess.run(
            [where, "-n", *argv[1:]], cwd=ROOT, env=fresh_env(), timeout=TIMEOUT,
            stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False,
        )
        assert result.returncode == 0, f"{command!r}: make -n says:\n{result.stderr}"
        return
    if name not in ("relaynet", "twistd"):
        return
    help_argv = help_command(argv)
    result = subprocess.run(
        [where, *help_argv[1:]], cwd=ROOT, env=fresh_env(), timeout=TIMEOUT,
        stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0 and result.stdout.startswith("Usage:" if name == "twistd" else "usage:"), (
        f"{command!r}: {shlex.join(help_argv)} exited {result.returncode}:\n"
        f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    )
