# -*- test-case-name: tests.test_mtasts_delivery -*-
"""
MTA-STS (RFC 8461) end to end, through real processes, the path a user
takes: a relaynet node (C{twistd -n relaynet}) with C{mx} routes
(C{tls = "opportunistic"}) delivers to recipient domains that publish, in a
real NSD on loopback (L{harness.dns.NSDServer}), an MX record, an
C{_mta-sts} TXT record and the address of their policy host. The policies
are served over HTTPS by a small server in this process (a thread;
certificate from a test CA, the node's C{[tls] ca_file}); the exchangers are
relaynet nodes too, with STARTTLS certificates from that CA, from another
CA, or without TLS at all. Between the node and each exchanger sits a
counting TCP forwarder (L{TcpForwarder}), so a test can tell that the node
did not even connect.

What is read: the sending node's events (C{sent} with C{tls} ending in
C{(MTA-STS)}, C{deferred} with C{dsn} 4.7.5 and a C{diagnostic}, C{tried}),
the exchangers' Maildirs, the forwarders' connection counts, the policy
server's record of fetches and TLS server names, the sending node's policy
cache (C{<spool>/mta-sts/<domain>.json}) and its TLS reports (RFC 8460,
C{<spool>/tls-rpt/<day>/<domain>.json}, files only).

Domains (all exchangers at 127.0.0.1; one route per domain gives its
forwarder's port as C{mx_port}):

 - C{good.test}: enforce, pattern matches, certificate from the trusted CA.
 - C{mismatch.test}: enforce, the pattern names another host; the MX is the
   good exchanger (its certificate is valid for it), so only the policy
   keeps the mail away.
 - C{twomx.test}: enforce; the preferred MX is not in the policy, the
   second one is.
 - C{badcert.test}, C{wrongname.test}: enforce, pattern matches; the MX's
   certificate is from another CA / does not name the MX.
 - C{notls.test}: enforce, pattern matches, the MX offers no STARTTLS.
 - C{nosts.test} (no MTA-STS) and C{shared.test} (enforce): one exchanger
   endpoint, certificate from another CA.
 - C{webpki.test}: its policy host's certificate is from another CA.
 - C{testing.test}: mode testing, the MX's certificate is from another CA;
   C{testingplain.test}: mode testing, the MX offers no STARTTLS.
 - C{cache.test}: enforce, mismatch; its own sending node and policy
   server (stopped mid-test).
 - C{idchange.test}: enforce, mismatch, then a matching policy with a new
   TXT id (zone TTL 0, so that the node asks DNS each time), then mode none.

Nodes of their own (own spool, own policy server) check the cache across a
restart, C{[mta_sts] enabled} across reloads (SIGHUP), and routes with
C{tls = "none"} and C{"verify"} under enforce policies.

L{test_control_without_mta_sts} sends the deferred cases again through a
node with C{[mta_sts] enabled = false}: they are all delivered, so each
deferral is the policy's doing (and each test can fail).

The policy decisions themselves are unit-tested in C{tests/test_mtasts.py}
and C{tests/test_tlspolicy.py}; here the question is whether the node, as
configured by a user, applies them on the wire.
"""

from __future__ import annotations

import json
import signal
import smtplib
import socket
import ssl
import subprocess
import threading
import uuid
from collections.abc import Iterator
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self

import attrs
import pytest

from harness.dns import NSDServer, nsd_unavailable_reason, zone_text
from harness.forwarder import TcpForwarder
from harness.nodeproc import HOST, NodeProcess, relaynet_command, wait_for
from relaynet.smtp.tls import generate_ca, generate_cert

_NSD_REASON = nsd_unavailable_reason()

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(_NSD_REASON is not None, reason=str(_NSD_REASON)),
]

#: Bound on every wait for an event or a message.
TIMEOUT = 20.0

#: The domains whose exchanger is the good MX node (certificate from the trusted CA).
GOOD_MX_DOMAINS = (
    "good.test", "mismatch.test", "cache.test", "idchange.test", "wrongname.test", "twomx.test", "webpki.test",
    "verify.test",
)
#: ... of those, the MX names its certificate is valid for (not mx.wrongname.test).
GOOD_CERT_NAMES = tuple(f"mx.{d}" for d in GOOD_MX_DOMAINS if d != "wrongname.test") + (
    "legacy.twomx.test", "mx2.fallback.test",
)
#: ... the MX node whose certificate is from another CA.
BAD_MX_DOMAINS = ("badcert.test", "testing.test", "shared.test", "nosts.test")
#: ... the MX node without [tls] (no STARTTLS).
PLAIN_MX_DOMAINS = ("notls.test", "testingplain.test")
#: Two MX hosts: mx1 (127.0.0.2) is the MX node of BAD_MX_DOMAINS, mx2 (127.0.0.1) the good one.
FALLBACK = "fallback.test"
#: The second loopback address (mx1.fallback.test).
HOST2 = "127.0.0.2"
ALL_DOMAINS = GOOD_MX_DOMAINS + BAD_MX_DOMAINS + PLAIN_MX_DOMAINS + (FALLBACK,)
#: Domains routed through another domain's proxy (one exchanger endpoint for both).
SAME_ENDPOINT = {"nosts.test": "shared.test"}


def policy_text(mode: str, *mx: str, max_age: int = 86400) -> str:
    """An STSv1 policy body (RFC 8461 3.2), CRLF line ends."""
    lines = ["version: STSv1", f"mode: {mode}", *(f"mx: {m}" for m in mx), f"max_age: {max_age}"]
    return "\r\n".join(lines) + "\r\n"


#: The policies served at the start, by domain.
POLICIES = {
    "good.test": policy_text("enforce", "mx.good.test"),
    "mismatch.test": policy_text("enforce", "other.mismatch.test"),
    "badcert.test": policy_text("enforce", "mx.badcert.test"),
    "wrongname.test": policy_text("enforce", "mx.wrongname.test"),
    "shared.test": policy_text("enforce", "mx.shared.test"),
    "twomx.test": policy_text("enforce", "mx.twomx.test"),
    FALLBACK: policy_text("enforce", f"*.{FALLBACK}"),
    # Served with a certificate from another CA: never applied.
    "webpki.test": policy_text("enforce", "other.webpki.test"),
    "notls.test": policy_text("enforce", "*.notls.test"),
    "testing.test": policy_text("testing", "mx.testing.test"),
    "testingplain.test": policy_text("testing", "mx.testingplain.test"),
    "cache.test": policy_text("enforce", "other.cache.test"),
    "idchange.test": policy_text("enforce", "other.idchange.test"),
}


def domain_zone(domain: str, policy_id: str = "1", ttl: int = 300) -> str:
    """C{domain}'s zone: one MX at 127.0.0.1, the STS TXT record, the policy host."""
    return zone_text(domain, [
        "@ MX 10 mx",
        f"mx A {HOST}",
        f'_mta-sts TXT "v=STSv1; id={policy_id}"',
        f"mta-sts A {HOST}",
    ], ttl=ttl)


def zones() -> dict[str, str]:
    """
    Every domain's zone; idchange.test's with TTL 0 (its TXT record is
    changed mid-test); twomx.test with a preferred second MX the policy
    does not name; nosts.test and verify.test without MTA-STS; fallback.test
    with two MX hosts on two loopback addresses.
    """
    out = {d: domain_zone(d, ttl=0 if d == "idchange.test" else 300) for d in ALL_DOMAINS}
    out["twomx.test"] = zone_text("twomx.test", [
        "@ MX 10 legacy", "@ MX 20 mx", f"legacy A {HOST}", f"mx A {HOST}",
        '_mta-sts TXT "v=STSv1; id=1"', f"mta-sts A {HOST}",
    ])
    out["nosts.test"] = zone_text("nosts.test", ["@ MX 10 mx", f"mx A {HOST}"])
    out[FALLBACK] = zone_text(FALLBACK, [
        "@ MX 10 mx1", "@ MX 20 mx2", f"mx1 A {HOST2}", f"mx2 A {HOST}",
        '_mta-sts TXT "v=STSv1; id=1"', f"mta-sts A {HOST}",
    ])
    out["verify.test"] = zone_text("verify.test", ["@ MX 10 mx", f"mx A {HOST}"])
    return out


# -- the HTTPS policy server ---------------------------------------------------


class PolicyServer:
    """
    HTTPS on 127.0.0.1 (a thread of this process) serving
    C{/.well-known/mta-sts.txt} for the C{mta-sts.<domain>} named in the
    C{Host} header, from L{policies} (changeable while it runs); other names
    and paths get 404. L{fetches} lists the domains served, in order;
    L{server_names} the SNI names of the TLS handshakes.

    @param untrusted: C{(cert, key)} presented instead to the SNI names in
        C{untrusted_names}.
    """

    def __init__(
        self, cert: Path, key: Path, policies: dict[str, str],
        untrusted: tuple[Path, Path] | None = None, untrusted_names: tuple[str, ...] = (),
    ) -> None:
        self.policies = dict(policies)
        self.fetches: list[str] = []
        self.requests: list[str] = []
        self.server_names: list[str | None] = []
        self._lock = threading.Lock()
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.load_cert_chain(str(cert), str(key))
        other: ssl.SSLContext | None = None
        if untrusted is not None:
            other = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            other.load_cert_chain(str(untrusted[0]), str(untrusted[1]))

        def sni(sock: ssl.SSLObject, name: str | None, _: ssl.SSLContext) -> None:
            with self._lock:
                self.server_names.append(name)
            if other is not None and name in untrusted_names:
                sock.context = other

        self._context.sni_callback = sni
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    def count(self, domain: str) -> int:
        """How many times C{domain}'s policy was served."""
        with self._lock:
            return self.fetches.count(domain)

    def start(self) -> Self:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            timeout = 10

            def do_GET(self) -> None:
                host = (self.headers.get("Host") or "").lower()
                host = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
                domain = host.removeprefix("mta-sts.") if host.startswith("mta-sts.") else None
                with owner._lock:
                    owner.requests.append(f"{host}{self.path}")
                    text = owner.policies.get(domain or "") if self.path == "/.well-known/mta-sts.txt" else None
                    if text is not None:
                        owner.fetches.append(domain or "")
                if text is None:
                    self.send_error(404)
                    return
                body = text.encode("utf-8")
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer((HOST, 0), Handler)
        server.daemon_threads = True
        server.socket = self._context.wrap_socket(server.socket, server_side=True)
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="mta-sts policy server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the port (connections are refused after)."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        assert self._thread is not None
        self._thread.join(timeout=10)
        self._server = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# -- the nodes -----------------------------------------------------------------


def mx_config(domains: tuple[str, ...], tls: tuple[Path, Path] | None) -> str:
    """An exchanger: local delivery for C{domains}, STARTTLS with C{tls} (cert, key) if given."""
    text = f"""\
[node]
name = "{{name}}"
hostname = "{{name}}.exchangers.test"
spool = "spool"

[[listener]]
endpoint = "tcp:{{port}}:interface={HOST}"

[local]
domains = {json.dumps(list(domains))}
catch_all = true
"""
    if tls is not None:
        text += f'\n[tls]\ncert = "{tls[0]}"\nkey = "{tls[1]}"\n'
    return text


def sender_config(
    dns_port: int, policy_port: int, ca_file: Path, mx_ports: dict[str, int], mta_sts: bool = True,
    tls: str = "opportunistic", fetch_timeout: float = 10, tls_rpt: bool = False,
) -> str:
    """
    The sending node: every domain by MX (its exchanger's port per domain),
    DNS from NSD only, MTA-STS policies from C{policy_port}, trust
    C{ca_file}. A deferred message waits 10 minutes (tests retry with
    C{relaynet queue flush}).

    @param mta_sts: C{[mta_sts] enabled}.
    @param tls: the routes' C{tls}.
    @param fetch_timeout: C{[mta_sts] fetch_timeout}.
    @param tls_rpt: TLS reporting (RFC 8460) on: files only (C{send =
        "none"}), written every half second.
    """
    text = f"""\
[node]
name = "{{name}}"
hostname = "sender.src.test"
spool = "spool"

[[listener]]
endpoint = "tcp:{{port}}:interface={HOST}"

[local]
domains = ["src.test"]
catch_all = true

[queue]
minimal_backoff = 600
maximal_backoff = 1200

[outbound]
connect_timeout = 5

[dns]
servers = ["{HOST}:{dns_port}"]

[tls]
ca_file = "{ca_file}"

[mta_sts]
enabled = {"true" if mta_sts else "false"}
policy_port = {policy_port}
fetch_timeout = {fetch_timeout}
"""
    if tls_rpt:
        text += """
[tls_rpt]
enabled = true
organization_name = "relaynet tests"
contact_info = "tlsrpt@src.test"
send = "none"
flush_interval = 0.5
"""
    for domain, port in mx_ports.items():
        text += f"""
[[route]]
domains = ["{domain}"]
action = "mx"
mx_port = {port}
tls = "{tls}"
"""
    return text


@attrs.define
class World:
    """The module's CA, NSD, policy server, exchangers and sending node."""

    base: Path
    ca: Path
    ca_key: Path
    policy_cert: tuple[Path, Path]
    nsd: NSDServer
    policies: PolicyServer
    mx: dict[str, NodeProcess]
    proxies: dict[str, TcpForwarder]
    sender: NodeProcess
    #: In front of mx1.fallback.test ({HOST2}; mx2's is C{proxies[FALLBACK]}).
    fallback_first: TcpForwarder

    @property
    def mx_ports(self) -> dict[str, int]:
        """Each domain's route port: its own proxy's."""
        return {d: p.port for d, p in self.proxies.items()}

    def mx_for(self, domain: str) -> NodeProcess:
        """The exchanger node of C{domain} (of fallback.test: mx1's, the preferred)."""
        if domain == FALLBACK:
            return self.mx["bad"]
        for role, domains in (("good", GOOD_MX_DOMAINS), ("bad", BAD_MX_DOMAINS), ("plain", PLAIN_MX_DOMAINS)):
            if domain in domains:
                return self.mx[role]
        raise KeyError(domain)

    def restart_nsd(self, zones: dict[str, str]) -> None:
        """NSD again on the same port, with C{zones} changed."""
        self.nsd.stop()
        port = self.nsd.port
        self.nsd.zones.update(zones)
        self.nsd.start()
        assert self.nsd.port == port, "NSD came back on another port"


def describe(sender: NodeProcess, *others: NodeProcess) -> str:
    parts = ["--- sender events:", *(json.dumps(e) for e in sender.events(strict=False)),
             "--- sender log:", sender.log_tail(30)]
    for node in others:
        parts += [f"--- {node.dir.name} log:", node.log_tail(15)]
    return "\n".join(parts)


OUTCOMES = ("sent", "deferred", "bounced", "delivered", "expired")


def wait_outcome(node: NodeProcess, rcpt: str, *others: NodeProcess, count: int = 1) -> dict[str, Any]:
    """
    Poll (bounded) until C{node} logged C{count} delivery outcomes for
    C{rcpt} (sent, deferred, ...); @return: the C{count}th, whatever it is
    (the test then says which it must be).
    """
    def found() -> list[dict[str, Any]]:
        return [e for e in node.events(strict=False) if e.get("recipient") == rcpt and e["event"] in OUTCOMES]

    try:
        return wait_for(lambda: found()[count - 1:], TIMEOUT, f"{count} outcome(s) for {rcpt}")[0]
    except AssertionError as e:
        raise AssertionError(f"{e}\n{describe(node, *others)}") from None


def outcomes(node: NodeProcess, rcpt: str) -> list[str]:
    """The delivery events of C{rcpt} (C{received} left out), in order."""
    return [e["event"] for e in node.events(strict=False) if e.get("recipient") == rcpt and e["event"] != "received"]


def send(node: NodeProcess, *rcpts: str) -> str:
    """One message from C{s@src.test} to C{rcpts} through C{node}; @return: its token (in the Subject)."""
    tok = uuid.uuid4().hex[:16]
    msg = (
        f"From: <s@src.test>\r\nTo: {', '.join(f'<{r}>' for r in rcpts)}\r\nSubject: mta-sts {tok}\r\n"
        f"Message-ID: <{tok}@src.test>\r\nDate: {formatdate()}\r\n\r\nhello {tok}\r\n"
    ).encode()
    with smtplib.SMTP(HOST, node.port, local_hostname="client.src.test", timeout=30) as s:
        refused = s.sendmail("s@src.test", list(rcpts), msg)
    assert not refused, refused
    return tok


def flush(node: NodeProcess) -> None:
    """C{relaynet queue --config node.toml flush}: attempt every queued message now."""
    done = subprocess.run(
        [*relaynet_command(), "queue", "--config", str(node.config_path), "flush"],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert done.returncode == 0, (done.returncode, done.stdout, done.stderr)


def delivered(mx: NodeProcess, rcpt: str) -> list[bytes]:
    user, _, domain = rcpt.partition("@")
    return [p.read_bytes() for p in mx.maildir_new(user, domain)]


def cache_file(node: NodeProcess, domain: str) -> Path:
    return node.spool / "mta-sts" / f"{domain}.json"


def reported(
    node: NodeProcess, domain: str, policy_type: str, result_type: str | None, mx_host: str | None = None,
) -> dict[str, Any]:
    """
    Poll (bounded) C{node}'s TLS report of today for C{domain}
    (C{<spool>/tls-rpt/<day>/<domain>.json}, RFC 8460 4.4) until its policy of
    C{policy_type} counts a session with C{result_type} (at
    C{mx_host}, if given), or a successful one (C{result_type} C{None}).

    @return: that policy's entry (C{policy}, C{summary}, C{failure-details}).
    """
    def find() -> dict[str, Any]:
        """The entry, or C{{}} (not yet)."""
        for path in sorted(node.spool.glob(f"tls-rpt/*/{domain}.json"), reverse=True):
            try:
                report = json.loads(path.read_text())
            except ValueError:
                continue
            for entry in report.get("policies", []):
                if entry["policy"]["policy-type"] != policy_type:
                    continue
                if result_type is None:
                    if entry["summary"]["total-successful-session-count"] >= 1:
                        return dict(entry)
                    continue
                for detail in entry.get("failure-details", []):
                    if detail["result-type"] == result_type and mx_host in (None, detail.get("receiving-mx-hostname")):
                        return dict(entry)
        return {}

    try:
        return wait_for(find, TIMEOUT, f"a {policy_type} {result_type or 'success'} in the TLS report of {domain}")
    except AssertionError as e:
        found = [p.read_text() for p in node.spool.glob(f"tls-rpt/*/{domain}.json")]
        raise AssertionError(f"{e}\n{found}") from None


def make_cert(directory: Path, ca: tuple[Path, Path], names: list[str]) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    return generate_cert(directory, ca[0], ca[1], names)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("mtasts-e2e")
    ca = generate_ca(base / "ca", name=f"mta-sts test CA {uuid.uuid4().hex[:8]}")
    other_ca = generate_ca(base / "other-ca", name=f"another CA {uuid.uuid4().hex[:8]}")
    policy_cert = make_cert(base / "policy-cert", ca, [f"mta-sts.{d}" for d in ALL_DOMAINS])
    untrusted_policy_cert = make_cert(base / "policy-cert-other-ca", other_ca, ["mta-sts.webpki.test"])
    good_cert = make_cert(base / "mx-good-cert", ca, list(GOOD_CERT_NAMES))
    bad_cert = make_cert(base / "mx-bad-cert", other_ca, [f"mx.{d}" for d in BAD_MX_DOMAINS] + [f"mx1.{FALLBACK}"])
    started: list[NodeProcess] = []
    proxies: dict[str, TcpForwarder] = {}
    fallback_first: TcpForwarder | None = None
    with NSDServer(base / "nsd", zones()) as nsd, PolicyServer(
        *policy_cert, POLICIES, untrusted=untrusted_policy_cert, untrusted_names=("mta-sts.webpki.test",),
    ) as policies:
        try:
            mx = {}
            mx_nodes: list[tuple[str, tuple[str, ...], tuple[Path, Path] | None]] = [
                ("good", GOOD_MX_DOMAINS + (FALLBACK,), good_cert), ("bad", BAD_MX_DOMAINS + (FALLBACK,), bad_cert),
                ("plain", PLAIN_MX_DOMAINS, None),
            ]
            for role, local, tls in mx_nodes:
                node = NodeProcess(base / f"mx-{role}", config_toml=mx_config(local, tls), name=f"mx{role}")
                started.append(node)
                mx[role] = node.start()
            for domains, role in ((GOOD_MX_DOMAINS, "good"), (BAD_MX_DOMAINS, "bad"), (PLAIN_MX_DOMAINS, "plain")):
                for d in domains:
                    if d not in SAME_ENDPOINT:
                        proxies[d] = TcpForwarder(mx[role].port).start()
            for d, other in SAME_ENDPOINT.items():
                proxies[d] = proxies[other]
            # fallback.test: one port on two addresses (the route's mx_port).
            for _ in range(20):
                second = TcpForwarder(mx["good"].port)
                try:
                    first = TcpForwarder(mx["bad"].port, host=HOST2, port=second.port)
                except OSError:
                    second.stop()
                    continue
                proxies[FALLBACK] = second.start()
                fallback_first = first.start()
                break
            else:
                raise AssertionError(f"no port free on both {HOST} and {HOST2}")
            ports = {d: p.port for d, p in proxies.items()}
            sender = NodeProcess(
                base / "sender", config_toml=sender_config(nsd.port, policies.port, ca[0], ports, tls_rpt=True),
                name="sender",
            )
            started.append(sender)
            sender.start()
            yield World(base, ca[0], ca[1], policy_cert, nsd, policies, mx, proxies, sender, fallback_first)
        finally:
            for node in started:
                node.__exit__(None, None, None)
            for proxy in set(proxies.values()) | ({fallback_first} if fallback_first is not None else set()):
                proxy.stop()


# -- enforce -------------------------------------------------------------------


def test_enforce_matching_pattern_and_valid_certificate_delivers(world: World) -> None:
    """
    good.test publishes an enforce policy naming its MX, whose certificate
    the node trusts: the message is sent over TLS, the event says MTA-STS
    decided it, the exchanger has the message, and the policy is cached on
    disk with its TXT id.
    """
    rcpt = "user@good.test"
    mx = world.mx["good"]
    tok = send(world.sender, rcpt)
    sent = wait_outcome(world.sender, rcpt, mx)
    assert sent["event"] == "sent", sent
    assert sent["tls"].startswith("TLSv1.") and sent["tls"].endswith(" (MTA-STS)"), sent
    assert sent["relay"] == f"mx.good.test[{HOST}]:{world.proxies['good.test'].port}", sent
    (msg,) = wait_for(lambda: delivered(mx, rcpt), TIMEOUT, "the message at the MX")
    assert tok.encode() in msg
    cached = json.loads(cache_file(world.sender, "good.test").read_text())
    assert (cached["domain"], cached["id"]) == ("good.test", "1"), cached
    assert "mode: enforce" in cached["policy"] and "mx: mx.good.test" in cached["policy"], cached
    assert world.policies.count("good.test") == 1, world.policies.requests
    entry = reported(world.sender, "good.test", "sts", None)
    assert "mode: enforce" in entry["policy"]["policy-string"], entry


def test_enforce_pattern_mismatch_defers_without_connecting(world: World) -> None:
    """
    mismatch.test's enforce policy allows only other.mismatch.test: its one
    MX, mx.mismatch.test, is not used (deferred 4.7.5, the diagnostic names
    the host and the pattern), though that exchanger would have taken the
    message over TLS with a valid certificate (L{test_control_without_mta_sts}):
    not one connection reached it, and it has no message.
    """
    rcpt = "user@mismatch.test"
    mx, proxy = world.mx["good"], world.proxies["mismatch.test"]
    connections = proxy.count()
    send(world.sender, rcpt)
    deferred = wait_outcome(world.sender, rcpt, mx)
    assert (deferred["event"], deferred["dsn"]) == ("deferred", "4.7.5"), deferred
    diagnostic = deferred["diagnostic"]
    assert "MTA-STS" in diagnostic and "enforce" in diagnostic, deferred
    assert "mx.mismatch.test" in diagnostic and "other.mismatch.test" in diagnostic, deferred
    assert set(outcomes(world.sender, rcpt)) == {"deferred"}
    assert proxy.count() == connections
    assert delivered(mx, rcpt) == []
    reported(world.sender, "mismatch.test", "sts", "validation-failure", "mx.mismatch.test")


def test_enforce_skips_the_unlisted_mx_and_uses_the_listed_one(world: World) -> None:
    """
    twomx.test prefers legacy.twomx.test (MX 10), which its enforce policy
    does not list, over mx.twomx.test (MX 20), which it does. Both would
    accept the mail with a valid certificate; the node skips the first
    without connecting and delivers to the second under MTA-STS; the event
    lists the skipped host in C{tried} with 4.7.5.
    """
    rcpt = "user@twomx.test"
    mx, proxy = world.mx["good"], world.proxies["twomx.test"]
    connections = proxy.count()
    tok = send(world.sender, rcpt)
    sent = wait_outcome(world.sender, rcpt, mx)
    assert sent["event"] == "sent", sent
    assert sent["relay"] == f"mx.twomx.test[{HOST}]:{proxy.port}" and sent["tls"].endswith(" (MTA-STS)"), sent
    (tried,) = sent.get("tried") or [None]
    assert tried is not None and tried["relay"] == f"legacy.twomx.test[{HOST}]:{proxy.port}", sent
    assert tried["dsn"] == "4.7.5", sent
    assert proxy.count() == connections + 1
    (msg,) = wait_for(lambda: delivered(mx, rcpt), TIMEOUT, "the message at the MX")
    assert tok.encode() in msg


@pytest.mark.parametrize(("domain", "result_type"), [
    ("badcert.test", "certificate-not-trusted"), ("wrongname.test", "certificate-host-mismatch"),
])
def test_enforce_invalid_certificate_defers(world: World, domain: str, result_type: str) -> None:
    """
    Under enforce, an MX whose certificate does not validate is not
    delivered to: badcert.test's MX presents a certificate for its name from
    a CA the node does not trust; wrongname.test's MX one from the trusted
    CA that does not name mx.wrongname.test. The node connects, the
    handshake fails, the message is deferred 4.7.5 and nothing reaches the
    mailbox (no fallback to unverified TLS or clear text). The TLS report
    names the failure (RFC 8460 result types).
    """
    rcpt = f"user@{domain}"
    mx, proxy = world.mx_for(domain), world.proxies[domain]
    send(world.sender, rcpt)
    deferred = wait_outcome(world.sender, rcpt, mx)
    assert (deferred["event"], deferred["dsn"]) == ("deferred", "4.7.5"), deferred
    assert "TLS" in deferred["diagnostic"], deferred
    assert deferred["relay"] == f"mx.{domain}[{HOST}]:{proxy.port}", deferred
    assert proxy.count() >= 1
    assert set(outcomes(world.sender, rcpt)) == {"deferred"}
    assert delivered(mx, rcpt) == []
    reported(world.sender, domain, "sts", result_type, f"mx.{domain}")


def test_enforce_tries_the_next_mx_after_a_certificate_failure(world: World) -> None:
    """
    fallback.test's enforce policy lists both its MX hosts: mx1 (preferred,
    127.0.0.2) presents a certificate from an untrusted CA, mx2 a valid one.
    In one attempt the node fails the handshake with mx1 and delivers to
    mx2 under MTA-STS; the event lists mx1 in C{tried} with 4.7.5, and mx1's
    exchanger has nothing.
    """
    rcpt = f"user@{FALLBACK}"
    first, second = world.fallback_first, world.proxies[FALLBACK]
    tok = send(world.sender, rcpt)
    sent = wait_outcome(world.sender, rcpt, world.mx["good"], world.mx["bad"])
    assert sent["event"] == "sent", sent
    assert sent["relay"] == f"mx2.{FALLBACK}[{HOST}]:{second.port}" and sent["tls"].endswith(" (MTA-STS)"), sent
    (tried,) = sent.get("tried") or [None]
    assert tried is not None and tried["relay"] == f"mx1.{FALLBACK}[{HOST2}]:{first.port}", sent
    assert tried["dsn"] == "4.7.5" and "TLS" in tried["diagnostic"], sent
    assert first.count() >= 1
    (msg,) = wait_for(lambda: delivered(world.mx["good"], rcpt), TIMEOUT, "the message at mx2")
    assert tok.encode() in msg
    assert delivered(world.mx["bad"], rcpt) == []
    reported(world.sender, FALLBACK, "sts", "certificate-not-trusted", f"mx1.{FALLBACK}")
    reported(world.sender, FALLBACK, "sts", None)


def test_enforce_without_starttls_defers_never_clear_text(world: World) -> None:
    """
    notls.test's MX offers no STARTTLS: under enforce the node defers
    (4.7.5, "did not offer STARTTLS"), though the route's tls is
    opportunistic, which alone would send in clear text.
    """
    rcpt = "user@notls.test"
    mx, proxy = world.mx["plain"], world.proxies["notls.test"]
    send(world.sender, rcpt)
    deferred = wait_outcome(world.sender, rcpt, mx)
    assert (deferred["event"], deferred["dsn"]) == ("deferred", "4.7.5"), deferred
    assert "MTA-STS requires TLS" in deferred["diagnostic"], deferred
    assert "did not offer STARTTLS" in deferred["diagnostic"], deferred
    assert proxy.count() >= 1
    assert set(outcomes(world.sender, rcpt)) == {"deferred"}
    assert delivered(mx, rcpt) == []
    reported(world.sender, "notls.test", "sts", "starttls-not-supported", "mx.notls.test")


def test_enforce_does_not_reuse_another_domains_unverified_connection(world: World) -> None:
    """
    nosts.test (no MTA-STS) and shared.test (enforce) have exchangers at one
    endpoint, whose certificate is from an untrusted CA. A message to
    nosts.test goes over opportunistic TLS and leaves its connection open
    for reuse ([outbound] reuse_idle_time); a message to shared.test right
    after must not ride on it: deferred 4.7.5, not delivered. One message
    to both domains splits the same way.
    """
    mx, proxy = world.mx["bad"], world.proxies["shared.test"]
    assert world.proxies["nosts.test"] is proxy
    open_rcpt, strict_rcpt = "first@nosts.test", "first@shared.test"
    send(world.sender, open_rcpt)
    sent = wait_outcome(world.sender, open_rcpt, mx)
    assert sent["event"] == "sent" and "MTA-STS" not in sent["tls"], sent
    connections = proxy.count()
    send(world.sender, strict_rcpt)
    deferred = wait_outcome(world.sender, strict_rcpt, mx)
    assert (deferred["event"], deferred["dsn"]) == ("deferred", "4.7.5"), deferred
    assert proxy.count() == connections + 1, "no connection of its own for the enforce policy"
    assert delivered(mx, strict_rcpt) == []

    both = ["both@nosts.test", "both@shared.test"]
    send(world.sender, *both)
    assert wait_outcome(world.sender, both[0], mx)["event"] == "sent"
    last = wait_outcome(world.sender, both[1], mx)
    assert (last["event"], last["dsn"]) == ("deferred", "4.7.5"), last
    wait_for(lambda: delivered(mx, both[0]), TIMEOUT, "the message at the MX")
    assert delivered(mx, both[1]) == []


def test_policy_host_with_untrusted_certificate_is_no_policy(world: World) -> None:
    """
    webpki.test's policy host presents a certificate from a CA the node does
    not trust (RFC 8460 sts-webpki-invalid): its enforce policy (which
    names another MX) is not taken, the domain is treated as having none,
    and the message goes out with the route's opportunistic TLS. Nothing
    is cached; the TLS report says sts-webpki-invalid.
    """
    rcpt = "user@webpki.test"
    mx = world.mx["good"]
    tok = send(world.sender, rcpt)
    sent = wait_outcome(world.sender, rcpt, mx)
    assert sent["event"] == "sent" and "MTA-STS" not in sent["tls"], sent
    (msg,) = wait_for(lambda: delivered(mx, rcpt), TIMEOUT, "the message at the MX")
    assert tok.encode() in msg
    assert "mta-sts.webpki.test" in world.policies.server_names, world.policies.server_names
    assert world.policies.count("webpki.test") == 0, world.policies.requests
    assert not cache_file(world.sender, "webpki.test").exists()
    reported(world.sender, "webpki.test", "no-policy-found", "sts-webpki-invalid")


def test_policy_host_that_never_answers_costs_fetch_timeout_then_no_policy(world: World) -> None:
    """
    A node whose policy port accepts connections but never answers (the TLS
    handshake hangs) with C{[mta_sts] fetch_timeout = 1}: the fetch gives up
    after about a second, the domain is treated as having no policy
    (mismatch.test's enforce policy could not be had), and the message goes
    out with the route's opportunistic TLS.
    """
    rcpt = "slow@mismatch.test"
    mx = world.mx["good"]
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind((HOST, 0))
        silent.listen(16)
        sender = NodeProcess(
            world.base / "slow-policy-sender", name="slowpolicysender",
            config_toml=sender_config(
                world.nsd.port, silent.getsockname()[1], world.ca,
                {"mismatch.test": world.proxies["mismatch.test"].port}, fetch_timeout=1,
            ),
        )
        with sender:
            send(sender, rcpt)
            sent = wait_outcome(sender, rcpt, mx)
    assert sent["event"] == "sent" and "MTA-STS" not in sent["tls"], sent
    assert 0.9 <= sent["delay"] < 10, sent
    wait_for(lambda: delivered(mx, rcpt), TIMEOUT, "the message at the MX")


# -- testing -------------------------------------------------------------------


def test_testing_mode_without_starttls_delivers_and_reports(world: World) -> None:
    """
    testingplain.test's policy is in mode testing and its MX offers no
    STARTTLS: the message is delivered (in clear text, as the route's
    opportunistic TLS does without a policy), and the TLS report counts a
    starttls-not-supported session under the testing policy.
    """
    rcpt = "user@testingplain.test"
    mx = world.mx["plain"]
    tok = send(world.sender, rcpt)
    sent = wait_outcome(world.sender, rcpt, mx)
    assert sent["event"] == "sent" and not sent.get("tls"), sent
    (msg,) = wait_for(lambda: delivered(mx, rcpt), TIMEOUT, "the message at the MX")
    assert tok.encode() in msg
    entry = reported(world.sender, "testingplain.test", "sts", "starttls-not-supported", "mx.testingplain.test")
    assert "mode: testing" in entry["policy"]["policy-string"], entry


def test_testing_mode_delivers_and_reports_the_bad_certificate(world: World) -> None:
    """
    testing.test's policy is in mode testing, its MX's certificate from an
    untrusted CA: the message is delivered anyway (the route's opportunistic
    TLS; the event does not claim MTA-STS secured it), and the failure
    enforce would have refused is reported (RFC 8461 5): the node's TLS
    report for testing.test counts a certificate-not-trusted session with
    mx.testing.test under the testing policy.
    """
    rcpt = "user@testing.test"
    mx = world.mx["bad"]
    tok = send(world.sender, rcpt)
    sent = wait_outcome(world.sender, rcpt, mx)
    assert sent["event"] == "sent", sent
    assert sent["tls"].startswith("TLSv1.") and "(MTA-STS)" not in sent["tls"], sent
    (msg,) = wait_for(lambda: delivered(mx, rcpt), TIMEOUT, "the message at the MX")
    assert tok.encode() in msg
    assert world.policies.count("testing.test") == 1, world.policies.requests
    cached = json.loads(cache_file(world.sender, "testing.test").read_text())
    assert cached["id"] == "1" and "mode: testing" in cached["policy"], cached
    entry = reported(world.sender, "testing.test", "sts", "certificate-not-trusted", "mx.testing.test")
    assert "mode: testing" in entry["policy"]["policy-string"], entry
    assert entry["policy"]["mx-host"] == ["mx.testing.test"], entry


# -- the cache -----------------------------------------------------------------


def test_policy_cache_survives_a_restart(world: World) -> None:
    """
    A node fetches cache.test's enforce policy (pattern mismatch: deferred);
    then the policy server goes away and the node restarts on the same
    spool: a new message is deferred by the policy read from the cache file
    (without it, no policy could be had and opportunistic TLS would deliver
    it to the exchanger, which would accept it). No connection to the MX,
    nothing delivered.
    """
    base = world.base / "cache-case"
    proxy = world.proxies["cache.test"]
    connections = proxy.count()
    mx = world.mx["good"]
    with PolicyServer(*world.policy_cert, {"cache.test": POLICIES["cache.test"]}) as policies:
        sender = NodeProcess(
            base / "sender", name="cachesender",
            config_toml=sender_config(world.nsd.port, policies.port, world.ca, {"cache.test": proxy.port}),
        )
        with sender:
            send(sender, "first@cache.test")
            first = wait_outcome(sender, "first@cache.test", mx)
            assert (first["event"], first["dsn"]) == ("deferred", "4.7.5"), first
            assert "other.cache.test" in first["diagnostic"], first
            assert policies.count("cache.test") == 1, policies.requests
            assert json.loads(cache_file(sender, "cache.test").read_text())["id"] == "1"

            policies.stop()
            sender.restart()
            assert sender.starts == 2
            send(sender, "second@cache.test")
            second = wait_outcome(sender, "second@cache.test", mx)
            assert (second["event"], second["dsn"]) == ("deferred", "4.7.5"), second
            assert "other.cache.test" in second["diagnostic"], second
            assert "sent" not in outcomes(sender, "first@cache.test") + outcomes(sender, "second@cache.test")
            assert delivered(mx, "first@cache.test") == delivered(mx, "second@cache.test") == []
            assert policies.count("cache.test") == 1
            assert proxy.count() == connections


def test_new_txt_id_fetches_the_new_policy(world: World) -> None:
    """
    idchange.test: policy id 1 (enforce, mismatch) defers the message. The
    policy server then serves a matching policy, but the TXT id stays 1:
    after a flush the cached policy still applies (deferred again, no new
    fetch, no connection). Then the TXT id becomes 2: the next flush
    fetches the new policy and the message is sent under it; the cache
    holds id 2. Last, id 3 publishes mode none (with a pattern naming
    another host): the next message is sent, not under MTA-STS.
    """
    rcpt = "user@idchange.test"
    mx, proxy = world.mx["good"], world.proxies["idchange.test"]
    connections = proxy.count()
    send(world.sender, rcpt)
    first = wait_outcome(world.sender, rcpt, mx)
    assert (first["event"], first["dsn"]) == ("deferred", "4.7.5"), first
    assert "other.idchange.test" in first["diagnostic"], first
    assert world.policies.count("idchange.test") == 1

    world.policies.policies["idchange.test"] = policy_text("enforce", "mx.idchange.test")
    flush(world.sender)
    second = wait_outcome(world.sender, rcpt, mx, count=2)
    assert (second["event"], second["dsn"]) == ("deferred", "4.7.5"), second
    assert "other.idchange.test" in second["diagnostic"], second
    assert world.policies.count("idchange.test") == 1, world.policies.requests
    assert proxy.count() == connections
    assert delivered(mx, rcpt) == []

    world.restart_nsd({"idchange.test": domain_zone("idchange.test", policy_id="2", ttl=0)})
    flush(world.sender)
    sent = wait_outcome(world.sender, rcpt, mx, count=3)
    assert sent["event"] == "sent" and sent["tls"].endswith(" (MTA-STS)"), sent
    assert world.policies.count("idchange.test") == 2, world.policies.requests
    wait_for(lambda: delivered(mx, rcpt), TIMEOUT, "the message at the MX")
    cached = json.loads(cache_file(world.sender, "idchange.test").read_text())
    assert cached["id"] == "2" and "mx: mx.idchange.test" in cached["policy"], cached

    # RFC 8461 8.3, retiring MTA-STS: a "none" policy under a new id ends
    # the enforce one (its mx line, which names another host, is ignored).
    world.policies.policies["idchange.test"] = policy_text("none", "other.idchange.test")
    world.restart_nsd({"idchange.test": domain_zone("idchange.test", policy_id="3", ttl=0)})
    after = "after@idchange.test"
    send(world.sender, after)
    sent = wait_outcome(world.sender, after, mx)
    assert sent["event"] == "sent" and "MTA-STS" not in sent["tls"], sent
    assert world.policies.count("idchange.test") == 3, world.policies.requests
    cached = json.loads(cache_file(world.sender, "idchange.test").read_text())
    assert cached["id"] == "3" and "mode: none" in cached["policy"], cached


def test_reload_switches_mta_sts_off_and_on(world: World) -> None:
    """
    C{[mta_sts] enabled} follows a reload (SIGHUP): a node defers for
    mismatch.test's policy; reloaded with C{enabled = false} it delivers the
    next message there; reloaded with C{enabled = true} again it defers the
    one after, with the policy it cached on disk (no new fetch).
    """
    mx, proxy = world.mx["good"], world.proxies["mismatch.test"]
    with PolicyServer(*world.policy_cert, {"mismatch.test": POLICIES["mismatch.test"]}) as policies:
        sender = NodeProcess(
            world.base / "reload-sender", name="reloadsender",
            config_toml=sender_config(world.nsd.port, policies.port, world.ca, {"mismatch.test": proxy.port}),
        )
        with sender:
            config_path = sender.config_path
            assert config_path is not None

            def reload(enabled: bool, count: int) -> None:
                text = config_path.read_text()
                old, new = ("true", "false") if not enabled else ("false", "true")
                assert f"enabled = {old}" in text
                config_path.write_text(text.replace(f"enabled = {old}", f"enabled = {new}"))
                sender.signal(signal.SIGHUP)
                reloads = wait_for(
                    lambda: [e for e in sender.events(strict=False) if e["event"] == "reload"][count - 1:],
                    TIMEOUT, f"reload {count}",
                )
                assert reloads[0]["status"] == "reloaded", reloads

            send(sender, "before@mismatch.test")
            first = wait_outcome(sender, "before@mismatch.test", mx)
            assert (first["event"], first["dsn"]) == ("deferred", "4.7.5"), first

            reload(False, 1)
            send(sender, "off@mismatch.test")
            sent = wait_outcome(sender, "off@mismatch.test", mx)
            assert sent["event"] == "sent" and "MTA-STS" not in sent["tls"], sent
            wait_for(lambda: delivered(mx, "off@mismatch.test"), TIMEOUT, "the message at the MX")

            reload(True, 2)
            send(sender, "on@mismatch.test")
            last = wait_outcome(sender, "on@mismatch.test", mx)
            assert (last["event"], last["dsn"]) == ("deferred", "4.7.5"), last
            assert "other.mismatch.test" in last["diagnostic"], last
            assert delivered(mx, "on@mismatch.test") == delivered(mx, "before@mismatch.test") == []
            assert policies.count("mismatch.test") == 1, policies.requests


# -- the route's own tls ---------------------------------------------------------


@pytest.mark.parametrize("tls", ["none", "verify"])
def test_route_tls_setting_neither_weakens_nor_breaks_enforce(world: World, tls: str) -> None:
    """
    A node whose mx routes say C{tls = "none"} (the default) or C{"verify"}
    applies enforce policies the same: good.test is sent under MTA-STS
    (STARTTLS although the route says none; the certificate checked for
    mx.good.test, not for the route's endpoint address), notls.test is
    deferred 4.7.5 (never clear text), mismatch.test deferred without a
    connection.
    """
    domains = ["good.test", "notls.test", "mismatch.test"]
    mismatch = world.proxies["mismatch.test"]
    connections = mismatch.count()
    with PolicyServer(*world.policy_cert, {d: POLICIES[d] for d in domains}) as policies:
        sender = NodeProcess(
            world.base / f"tls-{tls}-sender", name=f"tls{tls}sender",
            config_toml=sender_config(
                world.nsd.port, policies.port, world.ca, {d: world.proxies[d].port for d in domains}, tls=tls,
            ),
        )
        with sender:
            for domain in domains:
                send(sender, f"route-{tls}@{domain}")
            sent = wait_outcome(sender, f"route-{tls}@good.test", world.mx["good"])
            assert sent["event"] == "sent" and sent["tls"].endswith(" (MTA-STS)"), sent
            for domain in ("notls.test", "mismatch.test"):
                deferred = wait_outcome(sender, f"route-{tls}@{domain}", world.mx_for(domain))
                assert (deferred["event"], deferred["dsn"]) == ("deferred", "4.7.5"), deferred
            wait_for(lambda: delivered(world.mx["good"], f"route-{tls}@good.test"), TIMEOUT, "the message at the MX")
            assert delivered(world.mx["plain"], f"route-{tls}@notls.test") == []
            assert delivered(world.mx["good"], f"route-{tls}@mismatch.test") == []
            assert mismatch.count() == connections


def test_verify_route_checks_the_mx_name(world: World) -> None:
    """
    Without MTA-STS, an mx route with C{tls = "verify"} checks the MX's
    certificate for the MX host name (the next hop's host, as Postfix's
    C{smtp_tls_security_level = verify} does): verify.test's MX has a
    certificate for mx.verify.test from the trusted CA, so the message is
    sent.
    """
    rcpt = "user@verify.test"
    sender = NodeProcess(
        world.base / "verify-sender", name="verifysender",
        config_toml=sender_config(
            world.nsd.port, world.policies.port, world.ca, {"verify.test": world.proxies["verify.test"].port},
            tls="verify",
        ),
    )
    with sender:
        send(sender, rcpt)
        sent = wait_outcome(sender, rcpt, world.mx["good"])
        assert sent["event"] == "sent", sent


# -- control -------------------------------------------------------------------


def test_control_without_mta_sts(world: World) -> None:
    """
    The same domains through a node with C{[mta_sts] enabled = false}: every
    message the tests above saw deferred is delivered (mismatched pattern,
    untrusted or misnamed certificate, no STARTTLS), fallback.test's to its
    preferred MX, the one with the untrusted certificate; and no policy is
    fetched or cached. So the exchangers would take the mail, and the
    deferrals are MTA-STS's doing.
    """
    domains = ["mismatch.test", "badcert.test", "wrongname.test", "notls.test", "shared.test", "cache.test", FALLBACK]
    fetched = len(world.policies.fetches)
    sender = NodeProcess(
        world.base / "control-sender", name="controlsender",
        config_toml=sender_config(
            world.nsd.port, world.policies.port, world.ca, {d: world.proxies[d].port for d in domains},
            mta_sts=False,
        ),
    )
    with sender:
        for domain in domains:
            send(sender, f"control@{domain}")
        for domain in domains:
            rcpt, mx = f"control@{domain}", world.mx_for(domain)
            sent = wait_outcome(sender, rcpt, mx)
            assert sent["event"] == "sent" and "MTA-STS" not in (sent.get("tls") or ""), sent
            wait_for(lambda: delivered(mx, rcpt), TIMEOUT, f"the message at {domain}'s MX")  # noqa: B023 (called here)
        assert not (sender.spool / "mta-sts").exists() or not list((sender.spool / "mta-sts").iterdir())
    assert len(world.policies.fetches) == fetched, world.policies.requests
