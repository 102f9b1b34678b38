# -*- test-case-name: tests.test_cli -*-
"""
The first hour with relaynet: every C{relaynet} subcommand and C{twistd
relaynet}, given broken input, answers with one clear line on stderr and a
non-zero exit status, never a traceback; a closed stdout ends a command
quietly, as it does C{cat}.

Each case runs the venv's real executables in a subprocess (loopback only,
bounded timeouts).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from harness.nodeproc import TWISTD, NodeProcess, free_port, relaynet_command
from relaynet.cli import SIGPIPE_STATUS

TIMEOUT = 60.0

BAD_ENDPOINT = "[[listener]]\nendpoint = 'tpc:2601'\n"
BAD_HOP = "[[route]]\ndomains = ['*']\naction = 'relay'\nnext_hops = ['tcp:127.0.0.1:99999']\n"


def run(args: list[str], cwd: Path, stdin: Any = subprocess.DEVNULL,
        close_stdin: bool = False, stdout: Any = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    """
    Run a command in its own session (no controlling terminal), bounded.

    @param close_stdin: start it with file descriptor 0 closed.
    """
    return subprocess.run(
        args, cwd=cwd, stdin=None if close_stdin else stdin, stdout=stdout,
        stderr=subprocess.PIPE, text=True, timeout=TIMEOUT, start_new_session=True,
        preexec_fn=(lambda: os.close(0)) if close_stdin else None,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )


def assert_one_line(result: subprocess.CompletedProcess[str], *words: str) -> None:
    """A non-zero exit, exactly one line on stderr naming C{words}, no traceback."""
    err = result.stderr
    assert result.returncode != 0, (result.returncode, err)
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0], (word, lines[0])


def files(tmp_path: Path) -> dict[str, str]:
    """Broken inputs on disk: a bad listener, a bad next hop, a directory for a file."""
    (tmp_path / "badendpoint.toml").write_text(BAD_ENDPOINT)
    (tmp_path / "badhop.toml").write_text(BAD_HOP)
    (tmp_path / "ok.toml").write_text(f"[node]\nspool = '{tmp_path / 'spool'}'\n")
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")
    return {
        "badendpoint": str(tmp_path / "badendpoint.toml"),
        "badhop": str(tmp_path / "badhop.toml"),
        "ok": str(tmp_path / "ok.toml"),
        "missing": str(tmp_path / "missing.toml"),
        "unreadable": str(tmp_path / "adir"),  # read as a file: EISDIR, even for root
        "afile": str(tmp_path / "afile"),
    }


RELAYNET_CASES: list[Any] = [
    # (id, arguments, words expected in the line, options)
    ("check-config bad endpoint", ["check-config", "{badendpoint}"], ["listener[0].endpoint", "tpc"], {}),
    ("check-config bad next hop", ["check-config", "{badhop}"], ["route[0].next_hops[0]", "99999"], {}),
    ("check-config missing file", ["check-config", "{missing}"], ["missing.toml"], {}),
    ("check-config unreadable file", ["check-config", "{unreadable}"], ["cannot read"], {}),
    ("route bad endpoint", ["route", "{badendpoint}", "a@b.example"], ["listener[0].endpoint"], {}),
    ("route missing file", ["route", "{missing}", "a@b.example"], ["missing.toml"], {}),
    ("route bad --client", ["route", "{ok}", "a@b.example", "--client", "nope"], ["--client"], {}),
    ("route no address", ["route", "{ok}"], ["address"], {}),
    ("unknown command", ["frobnicate"], ["frobnicate"], {}),
    ("queue node not running", ["queue", "--config", "{ok}", "list"], ["is the node running"], {}),
    ("queue bad option value", ["queue", "--config", "{ok}", "list", "--limit", "abc"], ["--limit"], {}),
    ("queue bad config", ["queue", "--config", "{badendpoint}", "list"], ["listener[0].endpoint"], {}),
    ("queue missing config", ["queue", "--config", "{missing}", "summary"], ["missing.toml"], {}),
    ("queue hold without ids", ["queue", "--admin", "unix:{afile}", "hold"], ["hold"], {}),
    ("queue bad admin endpoint", ["queue", "--admin", "bogus:1", "list"], ["bogus"], {}),
    ("gen-cert bad --days", ["gen-cert", "--days", "abc", "x"], ["--days"], {}),
    ("gen-cert directory is a file", ["gen-cert", "--dir", "{afile}/certs", "x"], ["certs"], {}),
    ("passwd closed stdin", ["passwd", "{missing}.pw", "u"], ["--password-stdin"], {"close_stdin": True}),
    ("passwd no terminal", ["passwd", "{missing}.pw", "u"], ["--password-stdin"], {}),
    ("passwd --password-stdin closed stdin", ["passwd", "{missing}.pw", "u", "--password-stdin"],
     ["stdin"], {"close_stdin": True}),
    ("passwd empty password", ["passwd", "{missing}.pw", "u", "--password-stdin"], ["empty"], {}),
    ("passwd no such directory", ["passwd", "{afile}/pw", "u", "--password-stdin"], ["pw"],
     {"input": "secret\n"}),
    ("version extra argument", ["version", "--bogus"], ["--bogus"], {}),
    pytest.param(["bench", "--no-such-option"], ["--no-such-option"], {}, id="bench bad option"),
    ("lab up missing topology", ["lab", "up", "{missing}"], ["missing.toml"], {}),
    ("lab up bad topology", ["lab", "up", "{badendpoint}"], ["badendpoint.toml"], {}),
    ("lab status no lab", ["lab", "status"], ["lab"], {}),
    ("lab send no lab", ["lab", "send", "-n", "1"], ["lab"], {}),
    ("lab send bad -n", ["lab", "send", "-n", "abc"], ["-n"], {}),
    ("lab trace no lab", ["lab", "trace", "--last"], ["lab"], {}),
    ("lab check no lab", ["lab", "check"], ["lab"], {}),
    ("lab chaos no lab", ["lab", "chaos", "--duration", "1"], ["lab"], {}),
    ("lab draw no lab", ["lab", "draw"], ["lab"], {}),
    ("lab down no lab", ["lab", "down"], ["lab"], {}),
]


@pytest.mark.parametrize(
    ("args", "words", "options"),
    [
        case if hasattr(case, "marks") else pytest.param(*case[1:], id=case[0])
        for case in RELAYNET_CASES
    ],
)
def test_relaynet_broken_input(tmp_path: Path, args: list[str], words: list[str],
                               options: dict[str, Any]) -> None:
    """
    Every C{relaynet} subcommand given broken input (bad endpoint, missing or
    unreadable file, bad option value, closed stdin, no node running) exits
    non-zero with one line on stderr saying what is wrong, and no traceback.
    """
    names = files(tmp_path)
    argv = [a.format(**names) for a in args]
    kw: dict[str, Any] = {"close_stdin": bool(options.get("close_stdin"))}
    if "input" in options:
        kw["stdin"] = None
        result = subprocess.run(
            [*relaynet_command(), *argv], cwd=tmp_path, input=options["input"],
            capture_output=True, text=True, timeout=TIMEOUT, start_new_session=True,
        )
    else:
        result = run([*relaynet_command(), *argv], tmp_path, **kw)
    assert_one_line(result, *words)


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["check-config"], id="check-config"),
        pytest.param(["route", "{ok}", "a@localhost", "b@example.org"], id="route"),
        pytest.param(["version"], id="version"),
        pytest.param(["--help"], id="help"),
        pytest.param(["queue", "--help"], id="queue help"),
        pytest.param(["lab", "--help"], id="lab help"),
    ],
)
def test_closed_stdout_ends_quietly(tmp_path: Path, args: list[str]) -> None:
    """
    A command whose stdout is closed by its reader (C{| head -1}) ends
    quietly, as C{cat} does: nothing on stderr, no traceback, exit status
    128 + SIGPIPE (C{--help}: argparse drops the failed write and exits 0).
    """
    names = files(tmp_path)
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first write
    try:
        result = run([*relaynet_command(), *(a.format(**names) for a in args)], tmp_path, stdout=write)
    finally:
        os.close(write)
    assert result.stderr == "", result.stderr
    if "--help" in args:
        # argparse's help printer drops a failed write itself, then exits 0.
        assert result.returncode in (0, SIGPIPE_STATUS)
    else:
        assert result.returncode == SIGPIPE_STATUS


def twistd(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """C{twistd -n --pidfile= relaynet ARGS} in C{tmp_path}, bounded."""
    return run([str(TWISTD), "-n", "--pidfile=", "relaynet", *args], tmp_path)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        pytest.param(["--listen", "bogus:1"], ["--listen", "bogus"], id="bad --listen"),
        pytest.param(["--listen", "tcp:99999:interface=127.0.0.1"], ["99999"], id="--listen port range"),
        pytest.param(["--config", "{badendpoint}"], ["listener[0].endpoint"], id="bad endpoint"),
        pytest.param(["--config", "{missing}"], ["missing.toml"], id="missing config"),
        pytest.param(["--config", "{unreadable}"], ["cannot read"], id="unreadable config"),
        pytest.param(["--bogus"], ["bogus"], id="bad option"),
    ],
)
def test_twistd_broken_input(tmp_path: Path, args: list[str], words: list[str]) -> None:
    """
    C{twistd relaynet} given a bad endpoint, a missing or unreadable config
    file exits non-zero with one line on stderr, no traceback, no usage dump.
    """
    names = files(tmp_path)
    result = twistd(tmp_path, *(a.format(**names) for a in args))
    assert_one_line(result, *words)
    assert "Traceback" not in result.stdout


@pytest.mark.slow
def test_port_in_use(tmp_path: Path) -> None:
    """
    A second node told to listen where a first one does exits with status 1
    and one line on stderr ("127.0.0.1:PORT is already in use"), no
    traceback.
    """
    port = free_port()
    with NodeProcess(tmp_path / "a", port=port, name="first"):
        spool = tmp_path / "b" / "spool"
        (tmp_path / "b").mkdir()
        result = twistd(tmp_path / "b", "--listen", f"tcp:{port}:interface=127.0.0.1", "--spool", str(spool))
    assert result.returncode == 1
    assert_one_line(result, f"127.0.0.1:{port} is already in use")
    assert "Traceback" not in result.stdout


@pytest.mark.slow
def test_spool_in_use(tmp_path: Path) -> None:
    """
    A second node on the spool of a running one exits with status 1 and one
    line on stderr naming the spool and the pid that holds it, before it
    listens or touches the queue; no traceback.
    """
    with NodeProcess(tmp_path / "a", name="first") as first:
        (tmp_path / "b").mkdir()
        result = twistd(tmp_path / "b", "--listen", f"tcp:{free_port()}:interface=127.0.0.1",
                        "--spool", str(first.spool))
        assert first.running()
    assert result.returncode == 1
    assert_one_line(result, f"spool {first.spool} is in use by pid {first.pid}")
    assert "Traceback" not in result.stdout


def test_a_queue_command_does_not_load_the_lab(tmp_path: Path) -> None:
    """
    C{relaynet queue ...} does not import the lab's soak, control and DNS
    code, nor the suppression module (they were 0.25 s of its 0.4 s
    start-up): C{relaynet lab soak}'s arguments are parsed without them.
    C{relaynet --help} still names C{lab}.
    """
    probe = (
        "import sys\n"
        "from relaynet.cli import build_parser\n"
        "build_parser().parse_args(['queue', 'summary'])\n"
        "assert 'relaynet.lab.soak' not in sys.modules, 'lab loaded'\n"
        "assert 'relaynet.queue.suppression' not in sys.modules, 'suppression loaded'\n"
        "full = build_parser().parse_args(['lab', 'soak', 'x.toml', '--minutes', '1'])\n"
        "assert full.minutes == 1.0 and 'relaynet.lab.soak' not in sys.modules\n"
    )
    done = run([sys.executable, "-c", probe], tmp_path)
    assert done.returncode == 0, done.stderr
    short = run([*relaynet_command(), "--help"], tmp_path)
    assert short.returncode == 0 and "run and drive lab topologies" in short.stdout
