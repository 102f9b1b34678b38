"""
Interoperability of a real C{twistd -n relaynet} node with real Postfix
software on loopback: a private Postfix instance upstream and downstream of the
node (L{relaynet.peers.PostfixInstance}), and Postfix's C{smtp-sink} as the
next hop, for volume and for dot-stuffing at the client's chunk boundaries
(trap 16). The recipes of docs/interop.md (Postfix upstream, downstream,
both, swaks) run here from the document's own blocks, so it cannot drift.

Tests skip, with the reason, only when the peers cannot run here (binaries
missing, not root).
"""

from __future__ import annotations

import email
import email.policy
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from harness.peers import (
    SMTP_SINK,
    PostfixInstance,
    SmtpSink,
    allow_postfix_search,
    missing_binaries,
    postfix_unavailable_reason,
    relayhost_for,
)
from harness.nodeproc import HOST, NodeProcess, wait_for

try:
    from test_forwarding import (
        TIMEOUT, Net, assert_failed_report, distinct_ports, events, header_fields,
        hop, make_message, open_session, parse_dsn, returned_message_id, route, send,
        token, transaction, wait_event, wait_mail,
    )
except ImportError:  # tests/ became a package
    from tests.test_forwarding import (  # type: ignore[no-redef]
        TIMEOUT, Net, assert_failed_report, distinct_ports, events, header_fields,
        hop, make_message, open_session, parse_dsn, returned_message_id, route, send,
        token, transaction, wait_event, wait_mail,
    )

pytestmark = pytest.mark.slow

_POSTFIX_REASON = postfix_unavailable_reason()
requires_postfix = pytest.mark.skipif(_POSTFIX_REASON is not None, reason=str(_POSTFIX_REASON))
_SINK_MISSING = missing_binaries([SMTP_SINK])
requires_sink = pytest.mark.skipif(
    bool(_SINK_MISSING), reason=f"smtp-sink not installed ({', '.join(_SINK_MISSING)})"
)

#: Postfix retries and hands over in seconds; give it more room than a node.
POSTFIX_TIMEOUT = 60.0


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Net]:
    n = Net(tmp_path / "nodes")
    try:
        yield n
    finally:
        n.close()


@pytest.fixture
def peer_dir() -> Iterator[Path]:
    """
    A directory the C{postfix} user can reach (see allow_postfix_search).

    It is not under pytest's C{tmp_path}: every pytest session that starts
    sets C{/tmp/pytest-of-USER} back to mode 0700, so a session running
    beside this one would lock the Postfix daemons out half-way.
    """
    d = Path(tempfile.mkdtemp(prefix="relaynet-interop-"))
    try:
        yield allow_postfix_search(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def first_header_field(data: bytes) -> bytes:
    """The first header field of C{data} (CRLF or, as in a Maildir copy, LF lines), unfolded."""
    data = data.replace(b"\r\n", b"\n")
    end = data.index(b"\n")
    for _ in range(100):
        if data[end + 1:end + 2] not in (b" ", b"\t"):
            break
        end = data.index(b"\n", end + 1)
    return b" ".join(part.strip() for part in data[:end].split(b"\n"))


# -- Postfix upstream --------------------------------------------------------


@requires_postfix
def test_postfix_upstream(net: Net, peer_dir: Path) -> None:
    """
    smtplib -> Postfix (relayhost = the node) -> relaynet -> Maildir: the
    message arrives with Postfix's Received header under the node's own.
    """
    port, pf_port = distinct_ports(2)
    node = net.add("relay", port, local=["dest.test"])
    node.start()
    pf = PostfixInstance(peer_dir / "postfix", port=pf_port, mode="relay",
                         relayhost=relayhost_for(HOST, node.port))
    with pf:
        msg, mid = make_message(token(), "sender@client.test", "user@dest.test")
        code, resp = send(pf.port, "sender@client.test", ["user@dest.test"], msg)
        assert code == 250, resp
        try:
            (path,) = wait_mail(node, "user", "dest.test", net=net, timeout=POSTFIX_TIMEOUT)
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- postfix log:\n{pf.log_tail()}") from None
        pf.wait_queue_empty(timeout=POSTFIX_TIMEOUT)
    data = path.read_bytes()
    fields, rest = header_fields(data)
    (ours,) = [v for n, v in fields if n == "Received"]
    assert ours.startswith(f"from {pf.myhostname} ([127.0.0.1])"), ours
    assert " by relay.test (relaynet) " in ours, ours
    # Next comes Postfix's own trace field.
    assert rest.startswith(b"Received: "), rest[:200]
    first_field = first_header_field(rest)
    assert f"by {pf.myhostname} (Postfix)".encode() in first_field, first_field
    parsed = email.message_from_bytes(rest, policy=email.policy.default)
    assert parsed["Message-ID"] == mid
    lf = msg.replace(b"\r\n", b"\n")  # the Maildir copy has LF lines
    assert rest.split(b"\n\n", 1)[1] == lf.split(b"\n\n", 1)[1], "body altered"
    rec = wait_event(node, "received", net, message_id=mid)
    assert rec["helo"] == pf.myhostname and rec["hops"] == 2, rec


# -- Postfix downstream ------------------------------------------------------


@requires_postfix
def test_postfix_downstream(net: Net, peer_dir: Path) -> None:
    """
    relaynet -> Postfix (delivering pf.test into its Maildir): the message
    arrives; a domain Postfix will not relay for is refused at RCPT (554
    5.7.1), and the node bounces it to the sender.
    """
    port, pf_port = distinct_ports(2)
    pf = PostfixInstance(
        peer_dir / "postfix", port=pf_port, mode="local", local_domains=["pf.test"],
        # No relaying for anyone, even from mynetworks: unknown domains are
        # refused at RCPT.
        main_cf={"smtpd_relay_restrictions": "reject_unauth_destination"},
    )
    node = net.add("relay", port, local=["src.test"],
                   routes=[route(["pf.test", "other.test"], [hop(pf.port)])])
    with pf:
        node.start()
        msg, mid = make_message(token(), "sender@src.test", "user@pf.test")
        code, resp = send(node.port, "sender@src.test", ["user@pf.test"], msg)
        assert code == 250, resp
        sent = wait_event(node, "sent", net, recipient="user@pf.test")
        assert sent["relay"] == f"{HOST}:{pf.port}", sent
        try:
            wait_for(pf.delivered_count, POSTFIX_TIMEOUT, "delivery by Postfix")
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- postfix log:\n{pf.log_tail()}") from None
        (path,) = [p for sub in ("new", "cur") for p in sorted((pf.maildir / sub).glob("*"))]
        # Postfix stores LF line ends.
        data = path.read_bytes().replace(b"\n", b"\r\n")
        head, _, body = data.partition(b"\r\n\r\n")
        assert f"by {pf.myhostname} (Postfix)".encode() in head, head
        assert b"by relay.test (relaynet)" in head, head
        assert body == msg.split(b"\r\n\r\n", 1)[1], "body altered"
        assert email.message_from_bytes(data, policy=email.policy.default)["Message-ID"] == mid

        msg2, mid2 = make_message(token(), "sender@src.test", "user@other.test")
        code, resp = send(node.port, "sender@src.test", ["user@other.test"], msg2)
        assert code == 250, resp
        bounced = wait_event(node, "bounced", net, recipient="user@other.test")
        assert bounced["dsn"] == "5.7.1" and bounced["diagnostic"].startswith("554"), bounced
        (dsn_path,) = wait_mail(node, "sender", "src.test", net=net)
        assert pf.delivered_count() == 1
    _, blocks, returned = parse_dsn(dsn_path.read_bytes())
    assert len(blocks) == 1
    assert_failed_report(blocks[0], "user@other.test", "5.7.1")
    assert "Relay access denied" in str(blocks[0]["Diagnostic-Code"]), blocks[0]["Diagnostic-Code"]
    assert returned_message_id(returned) == mid2


# -- smtp-sink downstream ----------------------------------------------------


def sink_node(net: Net, sink: SmtpSink) -> NodeProcess:
    (port,) = distinct_ports(1)
    node = net.add("relay", port, routes=[route(["sink.test"], [hop(sink.port)])])
    node.start()
    return node


@requires_sink
def test_fifty_messages_to_smtp_sink(net: Net, tmp_path: Path) -> None:
    """50 messages relayed to smtp-sink: it counts exactly 50."""
    with SmtpSink(tmp_path / "sink") as sink:
        node = sink_node(net, sink)
        with open_session(node.port) as s:
            for i in range(50):
                msg, _ = make_message(token(), "sender@src.test", f"user{i}@sink.test")
                code, resp = transaction(s, "sender@src.test", [f"user{i}@sink.test"], msg)
                assert code == 250, resp
        sink.wait_received(50, timeout=TIMEOUT)
        sent = wait_for(lambda: len(events(node, "sent")) == 50 and events(node, "sent"),
                        TIMEOUT, "50 sent events")
        assert {e["recipient"] for e in sent} == {f"user{i}@sink.test" for i in range(50)}
        assert sink.received() == 50
        assert not events(node, "deferred") and not events(node, "bounced")


CHUNK = 16 * 1024


def dotty_body(pad: int) -> bytes:
    """
    A body whose first line is C{.}, with C{.}, C{..} and C{.x} lines spread
    through it, and runs of 3-octet C{.} lines straddling the 16 KiB and
    32 KiB points; C{pad} shifts everything after the fourth line by one octet
    at a time.
    """
    filler = b"abcdefghijklmnopqrstuvwxyz0123456789 filler text line\r\n"  # 55 octets
    core = b""
    for target in (CHUNK, 2 * CHUNK):
        for n in range(1000):
            if len(core) >= target - 600:
                break
            core += filler if n % 9 else b".x\r\n"
        core += b".\r\n" * 400
        core += b"..\r\n.x\r\n...\r\n"
    core += b"..\r\n.x\r\n.\r\n"
    return b".\r\n..\r\n.x\r\n" + b"x" * pad + b"\r\n" + core


def strip_sink_dump(dump: bytes) -> tuple[bytes, bytes]:
    """
    Split an smtp-sink dump (LF line ends, its own X- and Received fields
    first) into the node's Received field and the rest.
    """
    lines = dump.split(b"\n")
    i = 0
    while lines[i].startswith(b"X-"):
        i += 1
    assert lines[i].startswith(b"Received: ") and b"(smtp-sink)" in dump, dump[:400]
    i += 1
    while lines[i].startswith(b"\t"):
        i += 1
    assert lines[i].startswith(b"Received: "), lines[i]
    start = i
    i += 1
    while lines[i].startswith(b"\t"):
        i += 1
    return b"\n".join(lines[start:i]) + b"\n", b"\n".join(lines[i:])


@requires_sink
def test_dot_stuffing_to_smtp_sink(net: Net, tmp_path: Path) -> None:
    """
    Bodies with C{.}, C{..} and C{.x} lines on the first line, throughout,
    and around the 16 KiB points where the node's client reads the queue file
    in chunks arrive at smtp-sink unchanged (trap 16). Three variants shift
    the lines by one octet each, so that one of them has a C{.} line starting
    exactly at a chunk boundary, one a CR ending a chunk before "\\n.", one a
    LF ending it.
    """
    with SmtpSink(tmp_path / "sink", dump=True) as sink:
        node = sink_node(net, sink)
        originals = {}
        with open_session(node.port) as s:
            for pad in range(3):
                tok = token()
                msg, _ = make_message(tok, "sender@src.test", "user@sink.test", dotty_body(pad))
                originals[tok] = msg
                code, resp = transaction(s, "sender@src.test", ["user@sink.test"], msg)
                assert code == 250, resp
            # A message whose very first line (no header section) is a dot line.
            tok = token()
            bare = f".x {tok}\r\n..\r\n.\r\nno headers at all\r\n".encode()
            originals[tok] = bare
            code, resp = transaction(s, "sender@src.test", ["user@sink.test"], bare)
            assert code == 250, resp
        sink.wait_received(len(originals), timeout=TIMEOUT)
        wait_for(lambda: len(events(node, "sent")) == len(originals), TIMEOUT, "all sent")

        def dumps() -> list[bytes]:
            out = [p.read_bytes() for p in sink.dumped()]
            return out if len(out) == len(originals) and all(
                d.endswith(b"\n\n") for d in out) else []

        dumped = wait_for(dumps, TIMEOUT, "complete dump files")
    at_boundary = set()
    matched = set()
    for dump in dumped:
        received, rest = strip_sink_dump(dump)
        tok = next((t for t in originals if t.encode() in rest), None)
        assert tok is not None, rest[:300]
        original = originals[tok]
        # smtp-sink writes LF line ends and one empty line after the data.
        assert rest == original.replace(b"\r\n", b"\n") + b"\n", f"message {tok} altered"
        matched.add(tok)
        # The queue file the node's client read: its Received field + the message.
        stored = received.replace(b"\n", b"\r\n") + original
        for boundary in (CHUNK, 2 * CHUNK):
            if boundary < len(stored):
                at_boundary.add((boundary, stored[boundary - 2:boundary + 1]))
    assert matched == set(originals)
    # Every alignment of a ".\r\n" line against both boundaries was exercised.
    for boundary in (CHUNK, 2 * CHUNK):
        seen = {piece for b, piece in at_boundary if b == boundary}
        assert seen == {b"\r\n.", b"\n.\r", b".\r\n"}, (boundary, seen)


# -- the recipes of docs/interop.md ------------------------------------------
#
# Each test below sets up one recipe with the blocks docs/interop.md prints
# (read from the file, port numbers and the transport file's path changed),
# so the document cannot drift from what works.

DOC = Path(__file__).resolve().parent.parent / "docs" / "interop.md"
VENV_BIN = Path(sys.executable).parent
_RECIPE = re.compile(r"^<!-- recipe: (\S+) -->\n```[a-z]*\n(.*?)^```$", re.MULTILINE | re.DOTALL)
#: The ports the document uses, in order: relay listener, submission, Postfix.
DOC_PORTS = (2525, 2587, 10025)

#: Every recipe the tests below run; the document has exactly these.
TESTED_RECIPES = {
    "upstream-relayhost.main.cf", "upstream-transport.main.cf",
    "upstream-transport.transport", "upstream.node.toml",
    "downstream.master.cf", "downstream.main.cf", "downstream.node.toml",
    "both.edge.main.cf", "both.store.master.cf", "both.node.toml",
    "swaks.setup.sh", "swaks.node.toml", "swaks.commands.sh",
}


def doc_recipes() -> dict[str, str]:
    """The blocks of docs/interop.md marked C{<!-- recipe: NAME -->}, by name."""
    found: dict[str, str] = {}
    for m in _RECIPE.finditer(DOC.read_text(encoding="utf-8")):
        assert m.group(1) not in found, f"recipe {m.group(1)} twice in {DOC}"
        found[m.group(1)] = m.group(2)
    return found


def recipe(name: str, ports: dict[int, int]) -> str:
    """
    The recipe C{name} with the document's ports (C{:2525}, ...) replaced by
    C{ports}; each port of C{ports} must occur in it.
    """
    text = doc_recipes()[name]
    for port in ports:
        assert f":{port}" in text, f"recipe {name} does not mention port {port}"
    return re.sub(
        r"(?<=:)(" + "|".join(str(p) for p in DOC_PORTS) + r")\b",
        lambda m: str(ports.get(int(m.group(1)), m.group(1))), text,
    )


def main_cf(text: str) -> dict[str, str]:
    """C{main.cf} lines (C{name = value}) as a dict."""
    settings = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, sep, value = line.partition("=")
            assert sep, f"not a main.cf line: {line!r}"
            settings[name.strip()] = value.strip()
    return settings


def assert_master_cf_line(pf: PostfixInstance, line: str) -> None:
    """The recipe's C{master.cf} line is the smtpd line the instance runs."""
    ours = [" ".join(row.split()) for row in pf.master_cf_text().splitlines()]
    assert " ".join(line.split()) in ours, (line, ours)


def recipe_node(net: Net, name: str, ports: dict[int, int]) -> NodeProcess:
    """A node running the config recipe C{name}, in C{net}; started."""
    node = NodeProcess(net.base / "relay", config_toml=recipe(name, ports),
                       port=ports[2525], name="relay")
    net.nodes["relay"] = node
    return node.start()


def test_every_recipe_is_tested() -> None:
    """docs/interop.md holds exactly the recipes the tests below run."""
    assert set(doc_recipes()) == TESTED_RECIPES


@requires_postfix
@pytest.mark.parametrize("variant", ["relayhost", "transport"])
def test_recipe_postfix_upstream(net: Net, peer_dir: Path, variant: str) -> None:
    """
    docs/interop.md, Postfix upstream: with the recipe's C{relayhost} line,
    or its transport map, a message Postfix accepts for alice@example.org
    lands in the Maildir of the recipe's relaynet node.
    """
    port, pf_port = distinct_ports(2)
    ports = {2525: port}
    node = recipe_node(net, "upstream.node.toml", ports)
    settings = main_cf(recipe(f"upstream-{variant}.main.cf",
                               ports if variant == "relayhost" else {}))
    if variant == "relayhost":
        pf = PostfixInstance(peer_dir / "postfix", port=pf_port, mode="relay",
                             relayhost=settings["relayhost"], main_cf=settings)
    else:
        table = peer_dir / "transport"
        table.write_text(recipe("upstream-transport.transport", ports))
        table.chmod(0o644)
        settings["transport_maps"] = settings["transport_maps"].replace(
            "/etc/postfix/transport", str(table))
        assert str(table) in settings["transport_maps"]
        pf = PostfixInstance(peer_dir / "postfix", port=pf_port, mode="local", main_cf=settings)
    with pf:
        msg, mid = make_message(token(), "bob@example.com", "alice@example.org")
        code, resp = send(pf.port, "bob@example.com", ["alice@example.org"], msg)
        assert code == 250, resp
        try:
            (path,) = wait_mail(node, "alice", "example.org", net=net, timeout=POSTFIX_TIMEOUT)
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- postfix log:\n{pf.log_tail()}") from None
    parsed = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    assert parsed["Message-ID"] == mid
    assert f"by {pf.myhostname} (Postfix)" in str(parsed.get_all("Received")), parsed


@requires_postfix
def test_recipe_postfix_downstream(net: Net, peer_dir: Path) -> None:
    """
    docs/interop.md, Postfix downstream: the recipe's node relays
    bob@example.net to a Postfix smtpd on the recipe's C{master.cf} line,
    which delivers it.
    """
    port, pf_port = distinct_ports(2)
    ports = {2525: port, 10025: pf_port}
    pf = PostfixInstance(peer_dir / "postfix", port=pf_port, mode="local",
                         local_domains=["example.net"],
                         main_cf=main_cf(recipe("downstream.main.cf", {})))
    assert_master_cf_line(pf, recipe("downstream.master.cf", {10025: pf_port}))
    with pf:
        node = recipe_node(net, "downstream.node.toml", ports)
        msg, mid = make_message(token(), "alice@example.org", "bob@example.net")
        code, resp = send(node.port, "alice@example.org", ["bob@example.net"], msg)
        assert code == 250, resp
        wait_event(node, "sent", net, recipient="bob@example.net")
        try:
            wait_for(pf.delivered_count, POSTFIX_TIMEOUT, "delivery by Postfix")
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- postfix log:\n{pf.log_tail()}") from None
        (path,) = [p for sub in ("new", "cur") for p in (pf.maildir / sub).glob("*")]
        data = path.read_bytes()
    assert email.message_from_bytes(data, policy=email.policy.default)["Message-ID"] == mid
    assert b"by relay.example.org (relaynet)" in data, data[:600]


@requires_postfix
def test_recipe_postfix_both(net: Net, peer_dir: Path) -> None:
    """
    docs/interop.md, both: edge Postfix (the recipe's C{relayhost}) ->
    the recipe's node -> mail store Postfix (the recipe's C{master.cf} line):
    bob@example.net reaches the store, alice@example.org the node's Maildir.
    """
    port, edge_port, store_port = distinct_ports(3)
    ports = {2525: port, 10025: store_port}
    edge_cf = main_cf(recipe("both.edge.main.cf", {2525: port}))
    edge = PostfixInstance(peer_dir / "edge", port=edge_port, mode="relay",
                           relayhost=edge_cf["relayhost"], main_cf=edge_cf)
    store = PostfixInstance(peer_dir / "store", port=store_port, mode="local",
                            local_domains=["example.net"])
    assert_master_cf_line(store, recipe("both.store.master.cf", {10025: store_port}))
    with store, edge:
        node = recipe_node(net, "both.node.toml", ports)
        msg, mid = make_message(token(), "carol@example.com", "bob@example.net")
        code, resp = send(edge.port, "carol@example.com", ["bob@example.net"], msg)
        assert code == 250, resp
        msg2, mid2 = make_message(token(), "carol@example.com", "alice@example.org")
        code, resp = send(edge.port, "carol@example.com", ["alice@example.org"], msg2)
        assert code == 250, resp
        try:
            wait_for(store.delivered_count, POSTFIX_TIMEOUT, "delivery by the store")
            (local,) = wait_mail(node, "alice", "example.org", net=net, timeout=POSTFIX_TIMEOUT)
        except AssertionError as e:
            raise AssertionError(
                f"{e}\n--- edge log:\n{edge.log_tail()}\n--- store log:\n{store.log_tail()}"
            ) from None
        (path,) = [p for sub in ("new", "cur") for p in (store.maildir / sub).glob("*")]
        data = path.read_bytes()
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    assert parsed["Message-ID"] == mid
    received = str(parsed.get_all("Received"))
    for hop_name in (f"by {store.myhostname} (Postfix)", "by relay.example.org (relaynet)",
                     f"by {edge.myhostname} (Postfix)"):
        assert hop_name in received, (hop_name, received)
    assert email.message_from_bytes(local.read_bytes())["Message-ID"] == mid2


def _swaks_missing() -> str | None:
    """Why the swaks recipes cannot run here (swaks, or Net::SSLeay for --tls), or L{None}."""
    if shutil.which("swaks") is None:
        return "swaks not installed (make peers)"
    if subprocess.run(["perl", "-MNet::SSLeay", "-e1"], capture_output=True, check=False).returncode:
        return "Net::SSLeay missing: swaks --tls needs it (make peers: libnet-ssleay-perl)"
    return None


_SWAKS_MISSING = _swaks_missing()


@pytest.mark.skipif(_SWAKS_MISSING is not None, reason=str(_SWAKS_MISSING))
def test_recipe_swaks(net: Net) -> None:
    """
    docs/interop.md, swaks: after the recipe's setup commands (certificate,
    password file), each swaks one-liner (plain, STARTTLS, AUTH on
    submission) exits 0 and its message lands in alice's Maildir.
    """
    port, sub_port = distinct_ports(2)
    ports = {2525: port, 2587: sub_port}
    home = net.base / "relay"
    home.mkdir(parents=True)
    setup = recipe("swaks.setup.sh", {}).replace(".venv/bin/", f"{VENV_BIN}/")
    assert setup.count(f"{VENV_BIN}/relaynet") == 2, setup
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", setup], cwd=home, timeout=120,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    node = recipe_node(net, "swaks.node.toml", ports)
    commands = recipe("swaks.commands.sh", ports).splitlines()
    assert len(commands) == 3 and any("--auth" in c for c in commands), commands
    for n, line in enumerate(commands, 1):
        argv = shlex.split(line)
        assert argv[0] == "swaks", line
        result = subprocess.run(argv, timeout=120, stdin=subprocess.DEVNULL,
                                capture_output=True, text=True, check=False)
        assert result.returncode == 0, f"{line}\n{result.stdout}\n{result.stderr}"
        if "--tls" in argv:
            assert "STARTTLS" in result.stdout and "<~ " in result.stdout, result.stdout
        wait_mail(node, "alice", "example.org", count=n, net=net)
