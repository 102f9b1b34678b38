"""
Real DNS servers on loopback, for tests: NSD (NLnet Labs' authoritative
server, Debian's C{nsd}) with a private configuration, and relaynet's own
lab zones (L{relaynet.zones}) served by L{twisted.names} in a child process.

L{NSD} is a context manager taking C{{origin: zone-file text}}: it writes
the zone files and an C{nsd.conf} into its own directory (zonesdir, pidfile,
database, xfrd state, log: all there), with C{username: ""} (no privilege
drop), no chroot and no remote control, and runs C{nsd -d -c CONF} in the
foreground on a free UDP and TCP port of C{127.0.0.1}. It returns once the
server answers a query (polled with a deadline) and stops it (SIGTERM, then
SIGKILL, bounded) on exit. Nothing here touches port 53, the system NSD or
the machine's resolver.

L{ZoneServer} does the same for a L{relaynet.zones} spec
(C{python -m harness.dns --zones FILE --port N}), so that an independent
client (C{drill}) can check what the lab's server answers.

L{query} asks one question over UDP with a plain socket and gives the
decoded answer (L{twisted.names.dns} as a codec only: no reactor).

Part of the test harness (not shipped).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Self

from twisted.names import dns

NSD = "nsd"
DRILL = "drill"
HOST = "127.0.0.1"
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0

#: DNS response codes by name (RFC 1035 4.1.1, RFC 2136).
RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}


class DNSUnavailable(RuntimeError):
    """The server cannot run here (binary missing); the message says why."""


def nsd_binary() -> str | None:
    """The path of C{nsd} (also looked for in C{/usr/sbin}, outside a non-root PATH)."""
    return shutil.which(NSD) or shutil.which(NSD, path="/usr/sbin:/usr/local/sbin")


def nsd_unavailable_reason() -> str | None:
    """C{None} if NSD can run here, else why not (for C{pytest.mark.skipif})."""
    if nsd_binary() is None:
        return "nsd is not installed (Debian package nsd; 'make peers' installs it)"
    return None


def drill_binary() -> str | None:
    """The path of C{drill} (Debian package C{ldnsutils}), or C{None}."""
    return shutil.which(DRILL)


def _check_loopback(host: str) -> None:
    if host == "::1" or (host.startswith("127.") and host.count(".") == 3):
        return
    raise ValueError(f"only literal loopback addresses are allowed, not {host!r}")


def free_dns_port(host: str = HOST, attempts: int = 50) -> int:
    """
    A port free for both UDP and TCP on C{host} now (a DNS server needs both).

    @raise AssertionError: if none was found in C{attempts} tries.
    """
    _check_loopback(host)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(attempts):
        with socket.socket(family, socket.SOCK_STREAM) as tcp:
            tcp.bind((host, 0))
            port = tcp.getsockname()[1]
            with socket.socket(family, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind((host, port))
                except OSError:
                    continue
                return int(port)
    raise AssertionError(f"no port free for UDP and TCP on {host} in {attempts} tries")


def query(
    port: int, name: str, qtype: int = dns.A, host: str = HOST, timeout: float = 1.0,
) -> dns.Message | None:
    """
    Ask C{host:port} one question over UDP, recursion not desired.

    @param timeout: seconds to wait for the answer (a bound, not a sleep).
    @return: the decoded answer, or C{None} if none came in time (or the
        port is closed).
    """
    _check_loopback(host)
    msg_id = random.randrange(1, 0xFFFF)
    question = dns.Message(id=msg_id, recDes=0)
    question.queries = [dns.Query(name, qtype, dns.IN)]
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    deadline = time.monotonic() + timeout
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.sendto(question.toStr(), (host, port))
        except OSError:
            return None
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            s.settimeout(left)
            try:
                data, _ = s.recvfrom(65535)
            except (TimeoutError, ConnectionRefusedError):
                return None
            answer = dns.Message()
            try:
                answer.fromStr(data)
            except (EOFError, ValueError, IndexError, struct.error):
                continue  # not a DNS message: wait for ours
            if answer.id == msg_id and answer.answer:
                return answer


def rcode(answer: dns.Message | None) -> str:
    """The response code of C{answer} by name (C{"none"}: no answer came)."""
    if answer is None:
        return "none"
    return RCODES.get(answer.rCode, str(answer.rCode))


def zone_text(origin: str, records: Iterable[str], ttl: int = 300) -> str:
    """
    A master file (RFC 1035 5.1) for C{origin}: C{$ORIGIN}, C{$TTL}, an SOA
    and an NS record (C{ns.ORIGIN} at 127.0.0.1), then C{records}, one per line.
    """
    origin = origin.rstrip(".")
    lines = [
        f"$ORIGIN {origin}.",
        f"$TTL {ttl}",
        f"@ SOA ns.{origin}. hostmaster.{origin}. 1 3600 600 86400 {ttl}",
        f"@ NS ns.{origin}.",
        f"ns.{origin}. A 127.0.0.1",
    ]
    return "\n".join(lines + list(records)) + "\n"


def _wait_ready(proc: subprocess.Popen[bytes], port: int, host: str, probe: str,
                timeout: float, what: str, log: Any) -> None:
    """Poll until C{proc} answers a query for C{probe}; raise (with C{log()}) if it exits or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before answering:\n{log()}")
        # Any answer will do (a zone that failed to load answers SERVFAIL):
        # the server is up. Each probe waits at most 0.2 s for its answer.
        if query(port, probe, dns.SOA, host=host, timeout=0.2) is not None:
            return
        if time.monotonic() >= deadline:
            raise RuntimeError(f"{what} did not answer on {host}:{port} within {timeout:.0f}s:\n{log()}")


def _children(pid: int) -> set[int]:
    """The live descendants of C{pid} (Linux C{/proc}; empty elsewhere)."""
    found: set[int] = set()
    todo = [pid]
    for _ in range(1000):
        if not todo:
            break
        parent = todo.pop()
        try:
            text = Path(f"/proc/{parent}/task/{parent}/children").read_text()
        except OSError:
            continue
        kids = {int(k) for k in text.split()} - found
        found |= kids
        todo += kids
    return found


def _gone(pid: int) -> bool:
    """C{True} once C{pid} has exited (a zombie waiting for its reaper counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] == "Z"


def _stop(proc: subprocess.Popen[bytes] | None, timeout: float = STOP_TIMEOUT) -> None:
    """
    SIGTERM C{proc}, then SIGKILL, each wait bounded; then wait (bounded)
    until its child processes (NSD's server and xfrd processes) are gone too.
    """
    if proc is None or proc.poll() is not None:
        return
    kids = _children(proc.pid)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)
    deadline = time.monotonic() + timeout
    while True:
        alive = [k for k in kids if not _gone(k)]
        if not alive:
            return
        if time.monotonic() >= deadline:
            for k in alive:
                try:
                    os.kill(k, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            return
        time.sleep(0.02)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text("utf-8", "replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no output)"


class NSDServer:
    """
    NSD serving C{zones} on C{host:port}, from directory C{base_dir}.

    @ivar port: the UDP and TCP port it answers on.
    @ivar dir: its directory (config, zone files, pidfile, database, log).
    """

    def __init__(
        self,
        base_dir: Path | str,
        zones: Mapping[str, str],
        *,
        host: str = HOST,
        port: int | None = None,
        start_timeout: float = START_TIMEOUT,
    ) -> None:
        """
        @param zones: origin (no trailing dot needed) -> master file text
            (L{zone_text} makes one).
        @param port: a fixed port; by default a free one (another is chosen
            if NSD cannot bind it).
        """
        _check_loopback(host)
        assert zones, "NSD needs at least one zone"
        self.dir = Path(base_dir).absolute()
        self.zones = {origin.rstrip(".").lower(): text for origin, text in zones.items()}
        self.host = host
        self._auto_port = port is None
        self.port = port if port is not None else free_dns_port(host)
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"<NSDServer {self.host}:{self.port}>"

    @property
    def conf_path(self) -> Path:
        return self.dir / "nsd.conf"

    @property
    def log_path(self) -> Path:
        return self.dir / "nsd.log"

    def config_text(self) -> str:
        """The private C{nsd.conf}: every path in L{dir}, no privileges dropped, no control socket."""
        d = self.dir
        lines = [
            "server:",
            f'    ip-address: {self.host}',
            f"    port: {self.port}",
            '    username: ""',
            '    chroot: ""',
            f'    zonesdir: "{d}"',
            f'    pidfile: "{d / "nsd.pid"}"',
            f'    database: "{d / "nsd.db"}"',
            f'    zonelistfile: "{d / "zone.list"}"',
            f'    xfrdfile: "{d / "xfrd.state"}"',
            f'    xfrdir: "{d}"',
            f'    logfile: "{self.log_path}"',
            "    server-count: 1",
            "    verbosity: 1",
            "    hide-version: yes",
            "    hide-identity: yes",
            "remote-control:",
            "    control-enable: no",
        ]
        for origin in self.zones:
            lines += ["zone:", f'    name: "{origin}"', f'    zonefile: "{origin}.zone"']
        return "\n".join(lines) + "\n"

    def log_tail(self, lines: int = 30) -> str:
        return f"--- {self.log_path}:\n{_tail(self.log_path, lines)}\n--- stderr:\n{_tail(self.dir / 'stderr.txt', lines)}"

    def start(self) -> Self:
        """
        Write the files, start C{nsd -d -c nsd.conf}, wait until it answers.

        @raise DNSUnavailable: C{nsd} is not installed.
        @raise RuntimeError: it exits or does not answer in time.
        """
        binary = nsd_binary()
        if binary is None:
            raise DNSUnavailable(str(nsd_unavailable_reason()))
        self.dir.mkdir(parents=True, exist_ok=True)
        for origin, text in self.zones.items():
            (self.dir / f"{origin}.zone").write_text(text, encoding="utf-8")
        for attempt in range(3):
            for stale in ("nsd.db", "xfrd.state", "zone.list", "nsd.pid"):
                (self.dir / stale).unlink(missing_ok=True)
            self.conf_path.write_text(self.config_text(), encoding="utf-8")
            with open(self.dir / "stderr.txt", "ab") as err:
                self.proc = subprocess.Popen(
                    [binary, "-d", "-c", str(self.conf_path)], cwd=self.dir,
                    stdin=subprocess.DEVNULL, stdout=err, stderr=subprocess.STDOUT,
                )
            try:
                _wait_ready(self.proc, self.port, self.host, next(iter(self.zones)),
                            self.start_timeout, f"nsd on port {self.port}", self.log_tail)
                return self
            except RuntimeError:
                _stop(self.proc)
                bind_failed = "bind" in self.log_tail().lower()
                if not (self._auto_port and bind_failed and attempt < 2):
                    raise
                self.port = free_dns_port(self.host)
        raise AssertionError("unreachable")

    def stop(self) -> None:
        """Stop NSD (bounded); safe to call more than once."""
        _stop(self.proc)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class ZoneServer:
    """
    relaynet's lab zones (L{relaynet.zones}: C{{origin: [record lines]}})
    served by C{twisted.names.server.DNSServerFactory} over UDP in a child
    process (C{python -m harness.dns}), on C{host:port}.
    """

    def __init__(self, base_dir: Path | str, spec: Mapping[str, Iterable[str]], *,
                 host: str = HOST, start_timeout: float = START_TIMEOUT) -> None:
        _check_loopback(host)
        self.dir = Path(base_dir).absolute()
        self.spec = {origin: list(lines) for origin, lines in spec.items()}
        self.host = host
        self.port = free_dns_port(host)
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None

    def log_tail(self) -> str:
        return _tail(self.dir / "zoneserver.txt")

    def start(self) -> Self:
        self.dir.mkdir(parents=True, exist_ok=True)
        spec_path = self.dir / "zones.json"
        spec_path.write_text(json.dumps(self.spec), encoding="utf-8")
        root = Path(__file__).absolute().parent.parent
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(root)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        with open(self.dir / "zoneserver.txt", "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "harness.dns", "--zones", str(spec_path),
                 "--host", self.host, "--port", str(self.port)],
                cwd=self.dir, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
            )
        try:
            _wait_ready(self.proc, self.port, self.host, next(iter(self.spec)),
                        self.start_timeout, "the twisted.names zone server", self.log_tail)
        except RuntimeError:
            _stop(self.proc)
            raise
        return self

    def stop(self) -> None:
        _stop(self.proc)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _serve_zones(argv: list[str]) -> int:
    """C{python -m harness.dns --zones FILE --host H --port N}: serve until SIGTERM."""
    import argparse

    from twisted.internet import reactor
    from twisted.names import server

    from relaynet import zones

    parser = argparse.ArgumentParser(prog="python -m harness.dns")
    parser.add_argument("--zones", required=True, help="JSON: {origin: [record lines]}")
    parser.add_argument("--host", default=HOST)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    _check_loopback(args.host)
    spec = json.loads(Path(args.zones).read_text(encoding="utf-8"))
    factory = server.DNSServerFactory(authorities=zones.zones(spec))
    reactor.listenUDP(args.port, dns.DNSDatagramProtocol(factory), interface=args.host)  # type: ignore[attr-defined]
    print(f"serving {sorted(spec)} on {args.host}:{args.port}", flush=True)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(_serve_zones(sys.argv[1:]))


__all__ = [
    "RCODES",
    "DNSUnavailable",
    "NSDServer",
    "ZoneServer",
    "drill_binary",
    "free_dns_port",
    "nsd_binary",
    "nsd_unavailable_reason",
    "query",
    "rcode",
    "zone_text",
]
