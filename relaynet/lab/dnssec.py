# -*- test-case-name: tests.test_lab_security -*-
"""
DNSSEC for labs (C{[dns] dnssec = true}), so that DANE (RFC 7672) can be
exercised on one machine: the lab's zones signed with NLnet Labs' ldns tools
(C{ldns-keygen}, C{ldns-signzone}), served by NSD, and validated by a private
Unbound whose trust anchors are the zones' own key-signing keys. The nodes
ask Unbound (C{[dns] servers} and C{[dns] dnssec_resolver}): its AD bit is
what they trust.

Everything runs in the foreground as children of C{python -m
relaynet.lab.dns} (L{DNSSECServers}), with private configurations in the
lab's C{dns/} directory: no privilege drop, no chroot, no control socket,
no syslog, nothing on port 53 and no query ever leaves loopback (the root
is a stub on NSD too). Debian's C{nsd}, C{unbound} and C{ldnsutils}
(C{make peers}).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Mapping, Sequence

ALGORITHM = "ECDSAP256SHA256"
TOOLS = ("ldns-keygen", "ldns-signzone", "nsd", "unbound")
START_TIMEOUT = 20.0


class DNSSECError(RuntimeError):
    """A tool is missing or failed."""


def missing_tools() -> list[str]:
    """The programs lab DNSSEC needs that are not installed."""
    return [t for t in TOOLS if shutil.which(t) is None]


def _run(argv: list[str], cwd: Path) -> str:
    done = subprocess.run(argv, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, timeout=60, check=False)
    if done.returncode != 0:
        raise DNSSECError(f"{' '.join(argv)}: {done.stderr.decode(errors='replace').strip()}")
    return done.stdout.decode()


def master_file(origin: str, lines: Sequence[str], ns_address: str) -> str:
    """A zone's master file: SOA, NS and the lab's record lines (relaynet.zones syntax is master-file syntax)."""
    head = [
        f"$ORIGIN {origin}.", "$TTL 300",
        f"@ IN SOA ns.{origin}. hostmaster.{origin}. 1 3600 600 86400 300",
        f"@ IN NS ns.{origin}.", f"ns.{origin}. IN A {ns_address}",
    ]
    return "\n".join(head + list(lines)) + "\n"


def sign(work: Path, origin: str, text: str) -> tuple[Path, str]:
    """
    Sign zone C{origin} (master file C{text}) with a new KSK and ZSK.

    @return: the signed zone file and the KSK's DS record (a trust anchor).
    """
    d = work / f"sign-{origin}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    # /dev/urandom: ldns-keygen's default, /dev/random, can block on a fresh VM.
    ksk = _run(["ldns-keygen", "-a", ALGORITHM, "-r", "/dev/urandom", "-k", origin], d).strip()
    zsk = _run(["ldns-keygen", "-a", ALGORITHM, "-r", "/dev/urandom", origin], d).strip()
    (d / "zone").write_text(text, encoding="utf-8")
    signed = d / "zone.signed"
    _run(["ldns-signzone", "-o", origin, "-f", str(signed), "zone", ksk, zsk], d)
    return signed, (d / f"{ksk}.ds").read_text(encoding="utf-8").strip()


def nsd_conf(work: Path, host: str, port: int, zones: Mapping[str, Path]) -> str:
    lines = [
        "server:", f"    ip-address: {host}", f"    port: {port}", '    username: ""', '    chroot: ""',
        f'    zonesdir: "{work}"', f'    pidfile: "{work / "nsd.pid"}"', f'    database: "{work / "nsd.db"}"',
        f'    zonelistfile: "{work / "zone.list"}"', f'    xfrdfile: "{work / "xfrd.state"}"',
        f'    xfrdir: "{work}"', f'    logfile: "{work / "nsd.log"}"', "    server-count: 1",
        "    hide-version: yes", "remote-control:", "    control-enable: no",
    ]
    for origin, path in zones.items():
        lines += ["zone:", f'    name: "{origin}"', f'    zonefile: "{path}"']
    return "\n".join(lines) + "\n"


def unbound_conf(work: Path, host: str, port: int, nsd_port: int, origins: Sequence[str]) -> str:
    lines = [
        "server:", f"    interface: {host}@{port}", f"    port: {port}", "    interface-automatic: no",
        f"    access-control: {host}/32 allow", "    do-ip6: no", "    do-not-query-localhost: no",
        '    chroot: ""', '    username: ""', f'    directory: "{work}"', f'    pidfile: "{work / "unbound.pid"}"',
        "    use-syslog: no", f'    logfile: "{work / "unbound.log"}"', "    num-threads: 1",
        "    so-reuseport: no", "    outgoing-range: 64", "    qname-minimisation: no",
        '    module-config: "validator iterator"', f'    trust-anchor-file: "{work / "anchors"}"',
        # Lab zones live under .test (RFC 6761): Unbound would answer them itself.
        *(f'    local-zone: "{z}" nodefault' for z in ("test.", "invalid.", "example.")),
        "    cache-max-ttl: 30", "    cache-max-negative-ttl: 5", "    hide-version: yes",
        "remote-control:", "    control-enable: no",
    ]
    for origin in [*origins, ""]:
        # The root too: a stub on NSD, so nothing ever asks the Internet.
        lines += ["stub-zone:", f'    name: "{origin}."', f"    stub-addr: {host}@{nsd_port}"]
    return "\n".join(lines) + "\n"


class DNSSECServers:
    """
    The lab's signed zones served by NSD and validated by Unbound: L{start}
    signs and starts both, L{stop} ends them.
    """

    def __init__(self, work: Path, spec: Mapping[str, Sequence[str]], host: str, port: int, nsd_port: int) -> None:
        self.work = work
        self.spec = spec
        self.host = host
        self.port = port
        self.nsd_port = nsd_port
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        """
        Sign every zone, start NSD and Unbound, and return once Unbound
        answers for the first zone with the AD bit set (bounded).

        @raise DNSSECError: a tool is missing, failed, or the resolver did not validate in time.
        """
        missing = missing_tools()
        if missing:
            raise DNSSECError(f"[dns] dnssec needs {', '.join(missing)} (Debian: nsd unbound ldnsutils; make peers)")
        self.work.mkdir(parents=True, exist_ok=True)
        signed, anchors = {}, []
        for origin, lines in self.spec.items():
            path, ds = sign(self.work, origin, master_file(origin, lines, self.host))
            signed[origin] = path
            anchors.append(ds)
        (self.work / "anchors").write_text("\n".join(anchors) + "\n", encoding="utf-8")
        (self.work / "nsd.conf").write_text(nsd_conf(self.work, self.host, self.nsd_port, signed), encoding="utf-8")
        (self.work / "unbound.conf").write_text(
            unbound_conf(self.work, self.host, self.port, self.nsd_port, list(signed)), encoding="utf-8")
        self.procs.append(subprocess.Popen(["nsd", "-d", "-c", str(self.work / "nsd.conf")],
                                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.STDOUT))
        self.procs.append(subprocess.Popen(["unbound", "-d", "-c", str(self.work / "unbound.conf")],
                                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.STDOUT))
        first = next(iter(self.spec))
        deadline = time.monotonic() + START_TIMEOUT
        while not validated(self.host, self.port, first):
            if time.monotonic() >= deadline or any(p.poll() is not None for p in self.procs):
                self.stop()
                raise DNSSECError(
                    f"Unbound on {self.host}:{self.port} did not answer {first} SOA validated (AD) in"
                    f" {START_TIMEOUT:g}s (logs: {self.work / 'unbound.log'}, {self.work / 'nsd.log'})")
            time.sleep(0.05)  # polling the resolver until it validates, bounded by the deadline

    def stop(self) -> None:
        """SIGTERM both, SIGKILL what is left after 5 s."""
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        self.procs = []


def validated(host: str, port: int, name: str, timeout: float = 0.5) -> bool:
    """Whether the resolver at C{host:port} answers C{name} SOA with the AD bit (a recursive query asking for it)."""
    from twisted.names import dns

    from relaynet.lab.dns import ask

    answer = ask(host, port, name, dns.SOA, timeout, ad=True)
    return answer is not None and bool(answer.authenticData) and answer.rCode == dns.OK and bool(answer.answers)
