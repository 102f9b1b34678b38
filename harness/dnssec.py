"""
DNSSEC on loopback, for tests: zones signed here with NLnet Labs' ldns tools
(Debian's C{ldnsutils}: C{ldns-keygen}, C{ldns-signzone}) and a private
validating resolver, NLnet Labs' Unbound (Debian's C{unbound}), that trusts
them.

L{sign_zone} makes a key-signing key and a zone-signing key
(C{ECDSAP256SHA256}, algorithm 13), signs a master file and gives the signed
text with the KSK's DS record, the trust anchor a resolver needs. Signature
inception and expiration dates can be given, to make a zone whose
signatures have expired (a validator finds it bogus).

L{UnboundServer} is a context manager in the manner of
L{harness.dns.NSDServer}: its own directory (config, pidfile, log, trust
anchors), C{username: ""} and C{chroot: ""}, no remote control, C{unbound -d
-c CONF} in the foreground on a free UDP and TCP port of C{127.0.0.1}; it
returns once the resolver answers (polled with a deadline) and stops it
(SIGTERM, then SIGKILL, bounded) on exit. Each zone it should know is a
C{stub-zone} pointing at a loopback server (NSD); the root zone is a stub
pointing there too, so a name outside the test zones gets REFUSED from NSD
and never reaches the Internet; no root hints, no automatic root trust
anchor. C{.test} is a default local zone of Unbound (RFC 6761) and is
switched off (C{local-zone: "test." nodefault}). Nothing here touches port
53, C{/etc/unbound} or the system service.

Part of the test harness (not shipped).
"""

from __future__ import annotations

import random
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Self

from attrs import frozen
from twisted.names import dns

from harness.dns import (
    HOST,
    START_TIMEOUT,
    DNSUnavailable,
    _check_loopback,
    _stop,
    _tail,
    free_dns_port,
    nsd_unavailable_reason,
)

UNBOUND = "unbound"
LDNS_KEYGEN = "ldns-keygen"
LDNS_SIGNZONE = "ldns-signzone"
ALGORITHM = "ECDSAP256SHA256"
_SBIN = "/usr/sbin:/usr/local/sbin:/usr/bin:/usr/local/bin"


def _binary(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=_SBIN)


def unavailable_reason() -> str | None:
    """
    C{None} if zones can be signed, served by NSD and validated by Unbound
    here, else why not (for C{pytest.mark.skipif}).
    """
    missing = [
        f"{name} (Debian package {package})"
        for name, package in ((UNBOUND, "unbound"), (LDNS_KEYGEN, "ldnsutils"), (LDNS_SIGNZONE, "ldnsutils"))
        if _binary(name) is None
    ]
    nsd = nsd_unavailable_reason()
    if missing:
        return f"not installed: {', '.join(missing)}; 'make peers' installs them"
    return nsd


@frozen
class SignedZone:
    """
    A zone signed by L{sign_zone}.

    @ivar origin: its name, without the trailing dot.
    @ivar text: the signed master file (for L{harness.dns.NSDServer}).
    @ivar ds: the DS record of its key-signing key, one line of master-file
        text (a trust anchor for Unbound's C{trust-anchor-file}).
    @ivar dnskey: the DNSKEY record of the key-signing key, one line.
    """

    origin: str
    text: str
    ds: str
    dnskey: str


def _run(argv: list[str], cwd: Path) -> str:
    done = subprocess.run(argv, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, timeout=30, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with {done.returncode}: {done.stderr.decode(errors='replace')}")
    return done.stdout.decode()


def sign_zone(
    work_dir: Path | str,
    origin: str,
    text: str,
    *,
    inception: str | None = None,
    expiration: str | None = None,
) -> SignedZone:
    """
    Sign the master file C{text} of C{origin} with a new KSK and ZSK
    (C{ldns-keygen -a ECDSAP256SHA256}, C{-k} for the KSK; C{ldns-signzone}).

    @param work_dir: where the keys and files are written (a directory per
        zone is made in it).
    @param inception: C{YYYYMMDD[hhmmss]} (C{ldns-signzone -i}); default now.
    @param expiration: C{YYYYMMDD[hhmmss]} (C{ldns-signzone -e}); default in
        four weeks. A date in the past makes the zone bogus for a validator.
    @raise DNSUnavailable: the ldns tools are not installed.
    @raise RuntimeError: a tool failed (its stderr is in the message).
    """
    keygen, signzone = _binary(LDNS_KEYGEN), _binary(LDNS_SIGNZONE)
    if keygen is None or signzone is None:
        raise DNSUnavailable("ldns-keygen/ldns-signzone are not installed (Debian package ldnsutils)")
    origin = origin.rstrip(".").lower()
    d = Path(work_dir).absolute() / f"sign-{origin}"
    d.mkdir(parents=True, exist_ok=True)
    # /dev/urandom: ldns-keygen's default, /dev/random, may block on a fresh VM.
    ksk = _run([keygen, "-a", ALGORITHM, "-r", "/dev/urandom", "-k", origin], d).strip()
    zsk = _run([keygen, "-a", ALGORITHM, "-r", "/dev/urandom", origin], d).strip()
    unsigned = d / f"{origin}.zone"
    unsigned.write_text(text, encoding="utf-8")
    signed = d / f"{origin}.zone.signed"
    argv = [signzone, "-o", origin, "-f", str(signed)]
    if inception is not None:
        argv += ["-i", inception]
    if expiration is not None:
        argv += ["-e", expiration]
    _run(argv + [str(unsigned), ksk, zsk], d)
    return SignedZone(
        origin=origin,
        text=signed.read_text(encoding="utf-8"),
        ds=(d / f"{ksk}.ds").read_text(encoding="utf-8").strip(),
        dnskey=(d / f"{ksk}.key").read_text(encoding="utf-8").strip(),
    )


def query(
    port: int,
    name: str,
    qtype: int = dns.A,
    host: str = HOST,
    timeout: float = 1.0,
    authentic_data: bool = True,
    recursion: bool = True,
) -> dns.Message | None:
    """
    Ask C{host:port} one question over UDP (recursion desired, AD set in the
    query as RFC 6840 section 5.7 allows), with a plain socket.

    Unlike L{harness.dns.query}, any answer counts, an empty one included
    (NODATA, NXDOMAIN, SERVFAIL).

    @return: the decoded answer, or C{None} if none came within C{timeout}.
    """
    _check_loopback(host)
    msg_id = random.randrange(1, 0xFFFF)
    question = dns.Message(id=msg_id, recDes=int(recursion))
    question.authenticData = int(authentic_data)
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
                continue
            if answer.id == msg_id:
                return answer


class UnboundServer:
    """
    A private validating Unbound on C{host:port} that knows the zones of
    C{stubs} (origin -> port of their authoritative server on C{host}) and
    trusts C{trust_anchors} (DS or DNSKEY lines).

    @ivar port: the UDP and TCP port it answers on.
    @ivar dir: its directory (config, trust anchors, pidfile, log).
    """

    def __init__(
        self,
        base_dir: Path | str,
        stubs: Mapping[str, int],
        trust_anchors: Iterable[str],
        *,
        root_port: int | None = None,
        host: str = HOST,
        start_timeout: float = START_TIMEOUT,
        probe: str | None = None,
    ) -> None:
        """
        @param root_port: where the root stub points (default: the first
            stub's port): a server that answers REFUSED for the root.
        @param probe: a name to ask while waiting for the resolver to start
            (default: the first stub's origin).
        """
        _check_loopback(host)
        assert stubs, "Unbound needs at least one stub zone"
        self.dir = Path(base_dir).absolute()
        self.stubs = {origin.rstrip(".").lower(): port for origin, port in stubs.items()}
        self.trust_anchors = list(trust_anchors)
        self.root_port = root_port if root_port is not None else next(iter(self.stubs.values()))
        self.host = host
        self.port = free_dns_port(host)
        self.start_timeout = start_timeout
        self.probe = probe or next(iter(self.stubs))
        self.proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"<UnboundServer {self.host}:{self.port}>"

    @property
    def conf_path(self) -> Path:
        return self.dir / "unbound.conf"

    @property
    def log_path(self) -> Path:
        return self.dir / "unbound.log"

    @property
    def anchors_path(self) -> Path:
        return self.dir / "trust-anchors.txt"

    def config_text(self) -> str:
        """The private C{unbound.conf}: every path in L{dir}, validator and iterator, stubs only."""
        d = self.dir
        lines = [
            "server:",
            f"    interface: {self.host}@{self.port}",
            "    interface-automatic: no",
            f"    port: {self.port}",
            f"    access-control: {self.host}/32 allow" if ":" not in self.host else f"    access-control: {self.host}/128 allow",
            "    do-ip6: no" if ":" not in self.host else "    do-ip4: no",
            "    do-not-query-localhost: no",
            '    chroot: ""',
            '    username: ""',
            f'    directory: "{d}"',
            f'    pidfile: "{d / "unbound.pid"}"',
            "    use-syslog: no",
            f'    logfile: "{self.log_path}"',
            "    log-servfail: yes",
            "    val-log-level: 2",
            "    verbosity: 1",
            "    num-threads: 1",
            "    so-reuseport: no",
            "    outgoing-range: 64",
            "    qname-minimisation: no",
            '    module-config: "validator iterator"',
            f'    trust-anchor-file: "{self.anchors_path}"',
            # The test zones live under .test, one of Unbound's default
            # local zones (RFC 6761): without this it answers NXDOMAIN itself.
            '    local-zone: "test." nodefault',
            # Answers are short-lived, so a test that changes nothing sees
            # the zone as served; no prefetch, no serving of expired data.
            "    cache-max-ttl: 30",
            "    cache-max-negative-ttl: 5",
            "    serve-expired: no",
            "    hide-version: yes",
            "    hide-identity: yes",
            "remote-control:",
            "    control-enable: no",
        ]
        for origin, port in self.stubs.items():
            lines += ["stub-zone:", f'    name: "{origin}."', f"    stub-addr: {self.host}@{port}"]
        # The root is a stub too, on loopback: nothing is ever sent to the
        # Internet's root servers (and there are no root hints to prime).
        lines += ["stub-zone:", '    name: "."', f"    stub-addr: {self.host}@{self.root_port}"]
        return "\n".join(lines) + "\n"

    def log_tail(self, lines: int = 40) -> str:
        return f"--- {self.log_path}:\n{_tail(self.log_path, lines)}\n--- stderr:\n{_tail(self.dir / 'stderr.txt', lines)}"

    def start(self) -> Self:
        """
        Write the files, start C{unbound -d -c unbound.conf}, wait until it answers.

        @raise DNSUnavailable: C{unbound} is not installed.
        @raise RuntimeError: it exits or does not answer in time.
        """
        binary = _binary(UNBOUND)
        if binary is None:
            raise DNSUnavailable("unbound is not installed (Debian package unbound; 'make peers' installs it)")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.anchors_path.write_text("\n".join(self.trust_anchors) + "\n", encoding="utf-8")
        for attempt in range(3):
            (self.dir / "unbound.pid").unlink(missing_ok=True)
            self.conf_path.write_text(self.config_text(), encoding="utf-8")
            with open(self.dir / "stderr.txt", "ab") as err:
                self.proc = subprocess.Popen(
                    [binary, "-d", "-c", str(self.conf_path)], cwd=self.dir,
                    stdin=subprocess.DEVNULL, stdout=err, stderr=subprocess.STDOUT,
                )
            try:
                self._wait_ready()
                return self
            except RuntimeError:
                _stop(self.proc)
                bind_failed = "bind" in self.log_tail().lower() or "address already in use" in self.log_tail().lower()
                if not (bind_failed and attempt < 2):
                    raise
                self.port = free_dns_port(self.host)
        raise AssertionError("unreachable")

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"unbound exited with {self.proc.returncode} before answering:\n{self.log_tail()}")
            # Any answer will do; each probe waits at most 0.2 s.
            if query(self.port, self.probe, dns.SOA, host=self.host, timeout=0.2) is not None:
                return
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"unbound did not answer on {self.host}:{self.port} within {self.start_timeout:.0f}s:\n{self.log_tail()}"
                )

    def stop(self) -> None:
        """Stop Unbound (bounded); safe to call more than once."""
        _stop(self.proc)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


__all__ = [
    "SignedZone",
    "UnboundServer",
    "query",
    "sign_zone",
    "unavailable_reason",
]
