"""
Forwarding between real C{twistd -n relaynet} nodes on loopback: the slow
tier, a few tests that prove the real path end to end (processes, TCP,
Maildir spools and mailboxes, C{events.jsonl}, the command line).

Each test builds its own small network of node processes, sends with
smtplib to the first node and follows the message by its Maildir files and
by every node's C{events.jsonl}: a chain of three hops, a next hop down
then up, failover by priority, a routing loop stopped by the hop limit,
and the C{relaynet route} / C{check-config} commands (including a next hop
on the node's own listener).

Everything else about forwarding runs in-process, in milliseconds and with
the real retry policy on a simulated clock, in C{tests/test_network.py}
(L{relaynet.testing.network}): RFC 3464 bounces from the last hop, the null
sender, load sharing between equal priorities, connection reuse,
cut-through acknowledgement, expiry (4.4.7) -- all moved from here -- and
the exact retry times, nodes killed and restarted, attempts that raise,
and C{mx} routes.

Every wait polls for its effect with a deadline; queue backoffs are shortened
to 0.5-1 s so that retries happen within the test.
"""

from __future__ import annotations

import email
import email.message
import email.policy
import json
import smtplib
import socket
import subprocess
import uuid
from email.utils import formatdate
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import pytest

from harness.nodeproc import HOST, TWISTD, NodeProcess, free_port, relaynet_command, wait_for

pytestmark = pytest.mark.slow

#: Bound on every wait for a delivery, a DSN or an event.
TIMEOUT = 20.0
CLIENT_HELO = "client.test"


# -- configuration -----------------------------------------------------------


def _toml(value: Any) -> str:
    """A TOML literal for a string, int, bool or list of them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(value)


def hop(port: int, priority: int | None = None) -> str | tuple[str, int]:
    """A next hop on 127.0.0.1:PORT, optionally with a priority."""
    endpoint = f"tcp:{HOST}:{port}"
    return endpoint if priority is None else (endpoint, priority)


def route(domains: Sequence[str], hops: Sequence[str | tuple[str, int]], **extra: Any) -> str:
    """A C{[[route]]} table relaying C{domains} to C{hops}."""
    rendered = []
    for h in hops:
        if isinstance(h, tuple):
            rendered.append(f"{{ endpoint = {_toml(h[0])}, priority = {h[1]} }}")
        else:
            rendered.append(_toml(h))
    lines = [
        "[[route]]",
        f"domains = {_toml(list(domains))}",
        f"action = {_toml(extra.pop('action', 'relay'))}",
        f"next_hops = [{', '.join(rendered)}]",
    ]
    lines += [f"{k} = {_toml(v)}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


def node_toml(
    name: str,
    port: int,
    *,
    local: Sequence[str] = (),
    catch_all: bool = True,
    users: Sequence[str] = (),
    routes: Iterable[str] = (),
    limits: dict[str, Any] | None = None,
    queue: dict[str, Any] | None = None,
    outbound: dict[str, Any] | None = None,
) -> str:
    """
    A node config: host name C{NAME.test}, one listener on 127.0.0.1:PORT,
    short retry backoffs, the given local domains and routes.
    """
    q = {"minimal_backoff": 0.5, "maximal_backoff": 1}
    q.update(queue or {})
    o = {"connect_timeout": 5}
    o.update(outbound or {})
    parts = [
        "[node]",
        f"name = {_toml(name)}",
        f"hostname = {_toml(name + '.test')}",
        'spool = "spool"',
        "",
        "[[listener]]",
        f"endpoint = {_toml(f'tcp:{port}:interface={HOST}')}",
        "",
        "[local]",
        f"domains = {_toml(list(local))}",
        f"catch_all = {_toml(catch_all)}",
        f"users = {_toml(list(users))}",
        "",
    ]
    for title, table in (("limits", limits or {}), ("queue", q), ("outbound", o)):
        parts.append(f"[{title}]")
        parts += [f"{k} = {_toml(v)}" for k, v in table.items()]
        parts.append("")
    parts += list(routes)
    return "\n".join(parts)


def distinct_ports(n: int) -> list[int]:
    """C{n} different free loopback ports."""
    ports: list[int] = []
    for _ in range(50 * n):
        p = free_port()
        if p not in ports:
            ports.append(p)
        if len(ports) == n:
            return ports
    raise AssertionError(f"could not find {n} distinct free ports")


class Net:
    """
    The node processes of one test, each in C{base/<name>}; stopped at the
    end of the test.
    """

    def __init__(self, base: Path) -> None:
        self.base = base
        self.nodes: dict[str, NodeProcess] = {}

    def add(self, name: str, port: int, **kw: Any) -> NodeProcess:
        """Write C{name}'s config (see L{node_toml}); the node is not started."""
        text = node_toml(name, port, **kw)
        node = NodeProcess(self.base / name, config_toml=text, port=port, name=name)
        self.nodes[name] = node
        return node

    def __getitem__(self, name: str) -> NodeProcess:
        return self.nodes[name]

    def close(self) -> None:
        for node in self.nodes.values():
            node.__exit__(None, None, None)

    def describe(self) -> str:
        """Every node's events and log tail, for assertion messages."""
        out = []
        for name, node in self.nodes.items():
            out.append(f"--- {name} events:")
            out += [json.dumps(e) for e in node.events()]
            out.append(f"--- {name} log tail:\n{node.log_tail(15)}")
        return "\n".join(out)


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Net]:
    n = Net(tmp_path)
    try:
        yield n
    finally:
        n.close()


@pytest.fixture
def dead_port() -> Iterator[int]:
    """A port bound on 127.0.0.1 but not listening: connections are refused."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind((HOST, 0))
        yield s.getsockname()[1]
    finally:
        s.close()


# -- messages ----------------------------------------------------------------


def token() -> str:
    return uuid.uuid4().hex[:16]


def make_message(tok: str, sender: str, rcpt: str, body: bytes | None = None) -> tuple[bytes, str]:
    """An RFC 5322 message with CRLF line ends; @return: (bytes, Message-ID)."""
    mid = f"<{tok}@{CLIENT_HELO}>"
    head = (
        f"From: <{sender or 'mailer-daemon@client.test'}>\r\n"
        f"To: <{rcpt}>\r\n"
        f"Subject: forwarding test {tok}\r\n"
        f"Message-ID: {mid}\r\n"
        f"Date: {formatdate(localtime=True)}\r\n"
        "\r\n"
    ).encode()
    if body is None:
        body = (
            f"token {tok}\r\n"
            ".a line starting with a dot\r\n"
            "..two dots\r\n"
            ".\r\n"
            "\tindented, trailing blanks   \r\n"
            "last line\r\n"
        ).encode()
    return head + body, mid


def open_session(port: int) -> smtplib.SMTP:
    s = smtplib.SMTP(HOST, port, local_hostname=CLIENT_HELO, timeout=30)
    code, resp = s.ehlo()
    assert code == 250, (code, resp)
    return s


def transaction(s: smtplib.SMTP, sender: str, rcpts: Sequence[str], msg: bytes) -> tuple[int, bytes]:
    """MAIL, RCPTs, DATA on an open session; @return: the reply to the final dot."""
    code, resp = s.mail(sender)
    assert code == 250, (code, resp)
    for r in rcpts:
        code, resp = s.rcpt(r)
        assert code == 250, (r, code, resp)
    return s.data(msg)


def send(port: int, sender: str, rcpts: Sequence[str], msg: bytes) -> tuple[int, bytes]:
    """One transaction in its own session; @return: the reply to the final dot."""
    with open_session(port) as s:
        return transaction(s, sender, rcpts, msg)


# -- observation -------------------------------------------------------------


def events(node: NodeProcess, event: str | None = None, **match: Any) -> list[dict[str, Any]]:
    """C{node}'s events named C{event} whose fields equal C{match}."""
    return [
        e for e in node.events()
        if (event is None or e["event"] == event)
        and all(e.get(k) == v for k, v in match.items())
    ]


def wait_event(node: NodeProcess, event: str, net: Net | None = None,
               timeout: float = TIMEOUT, **match: Any) -> dict[str, Any]:
    """Poll until C{node} has logged a matching event; @return: the first one."""
    try:
        return wait_for(lambda: events(node, event, **match), timeout,
                        f"{event} {match} at {node.dir.name}")[0]
    except AssertionError as e:
        raise AssertionError(f"{e}\n{net.describe() if net else ''}") from None


def mail_files(node: NodeProcess) -> list[Path]:
    """Every file in every Maildir C{new/} under C{node}'s mailroot."""
    return sorted(node.mailroot.glob("*/*/Maildir/new/*"))


def wait_mail(node: NodeProcess, user: str, domain: str, count: int = 1,
              net: Net | None = None, timeout: float = TIMEOUT) -> list[Path]:
    """Poll until C{user@domain} at C{node} has C{count} files; @return: them."""
    try:
        return wait_for(lambda: len(node.maildir_new(user, domain)) >= count and
                        node.maildir_new(user, domain), timeout,
                        f"{count} message(s) for {user}@{domain} at {node.dir.name}")
    except AssertionError as e:
        raise AssertionError(f"{e}\n{net.describe() if net else ''}") from None


def header_fields(data: bytes) -> tuple[list[tuple[str, str]], bytes]:
    """
    Read the header fields at the top of C{data} until the first field that is
    not a trace field this relay writes (Return-Path, Delivered-To, a relaynet
    Received).

    @return: C{[(name, unfolded value)]} and the bytes after them.
    """
    fields = []
    pos = 0
    for _ in range(1000):
        end = data.index(b"\n", pos)
        while data[end + 1:end + 2] in (b" ", b"\t"):
            end = data.index(b"\n", end + 1)
        raw = data[pos:end].rstrip(b"\r")
        name, _, value = raw.partition(b":")
        value_s = b" ".join(v.strip() for v in value.split(b"\n")).decode()
        lname = name.decode("ascii", "replace").lower()
        if lname in ("return-path", "delivered-to") or (
            lname == "received" and "(relaynet)" in value_s
        ):
            fields.append((name.decode(), value_s))
            pos = end + 1
            continue
        break
    return fields, data[pos:]


def header_section(data: bytes) -> bytes:
    """The header section of a delivered message (Maildir copies have LF lines)."""
    return data.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0]


def parse_dsn(data: bytes) -> tuple[email.message.EmailMessage, list[email.message.Message],
                                    email.message.Message]:
    """
    Parse a delivered DSN with C{email.policy.default}.

    @return: the message, its per-recipient status blocks and its returned
        message part.
    """
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report", msg.get_content_type()
    assert msg.get_param("report-type") == "delivery-status", msg["Content-Type"]
    parts = list(msg.iter_parts())
    status = [p for p in parts if p.get_content_type() == "message/delivery-status"]
    assert len(status) == 1, [p.get_content_type() for p in parts]
    blocks = status[0].get_payload()
    assert isinstance(blocks, list) and blocks, blocks
    per_rcpt = [b for b in blocks if b.get("Final-Recipient")]
    returned = [p for p in parts
                if p.get_content_type() in ("message/rfc822", "text/rfc822-headers")]
    assert len(returned) == 1, [p.get_content_type() for p in parts]
    return msg, per_rcpt, returned[0]


def returned_message_id(part: email.message.Message) -> str | None:
    if part.get_content_type() == "message/rfc822":
        inner = part.get_payload(0)
        return str(inner["Message-ID"]).strip() if inner["Message-ID"] else None
    headers = email.message_from_bytes(part.get_payload(decode=True) or b"",
                                       policy=email.policy.default)
    return str(headers["Message-ID"]).strip() if headers["Message-ID"] else None


def assert_failed_report(block: email.message.Message, rcpt: str, status: str) -> None:
    kind, _, addr = str(block["Final-Recipient"]).partition(";")
    assert kind.strip().lower() == "rfc822", block["Final-Recipient"]
    assert addr.strip().lower() == rcpt, block["Final-Recipient"]
    assert str(block["Action"]).strip().lower() == "failed", block["Action"]
    assert str(block["Status"]).strip() == status, block["Status"]


def queue_empty(node: NodeProcess) -> bool:
    return not node.queue_files("new")


# -- a chain of three hops ---------------------------------------------------


def chain(net: Net, *, start_hop2: bool = True) -> tuple[NodeProcess, NodeProcess, NodeProcess]:
    """
    hop1 -> hop2 -> hop3 for dest.test. hop1 delivers src.test locally (the
    senders live there) and hop2 routes src.test back to hop1, so bounces
    reach them.
    """
    p1, p2, p3 = distinct_ports(3)
    hop1 = net.add("hop1", p1, local=["src.test"],
                   routes=[route(["dest.test"], [hop(p2)])])
    hop2 = net.add("hop2", p2, routes=[route(["dest.test"], [hop(p3)]),
                                       route(["src.test"], [hop(p1)])])
    hop3 = net.add("hop3", p3, local=["dest.test"])
    hop3.start()
    if start_hop2:
        hop2.start()
    hop1.start()
    return hop1, hop2, hop3


def test_chain_of_three_hops(net: Net) -> None:
    """
    A message sent to hop1 lands in hop3's Maildir with one relaynet Received
    header per hop, newest on top, and the message itself byte-identical;
    every node logs receiving it and passing it on.
    """
    hop1, hop2, hop3 = chain(net)
    tok = token()
    msg, mid = make_message(tok, "sender@src.test", "user@dest.test")
    code, resp = send(hop1.port, "sender@src.test", ["user@dest.test"], msg)
    assert code == 250, resp

    (path,) = wait_mail(hop3, "user", "dest.test", net=net)
    data = path.read_bytes()
    fields, rest = header_fields(data)
    assert [n for n, _ in fields] == ["Return-Path", "Delivered-To", "Received", "Received", "Received"], fields
    assert fields[0][1] == "<sender@src.test>"
    assert fields[1][1] == "user@dest.test"
    received = [v for n, v in fields if n == "Received"]
    assert received[0].startswith("from hop2.test ([127.0.0.1])") and " by hop3.test (relaynet) " in received[0], received
    assert received[1].startswith("from hop1.test ([127.0.0.1])") and " by hop2.test (relaynet) " in received[1], received
    assert received[2].startswith(f"from {CLIENT_HELO} ([127.0.0.1])") and " by hop1.test (relaynet) " in received[2], received
    assert rest == msg.replace(b"\r\n", b"\n"), "message altered on the way (the Maildir copy has LF lines)"
    assert header_section(data).count(b"(relaynet)") == 3

    for node, nxt, hops in ((hop1, hop2, 1), (hop2, hop3, 2)):
        rec = wait_event(node, "received", net, message_id=mid)
        assert rec["recipients"] == ["user@dest.test"] and rec["hops"] == hops, rec
        sent = wait_event(node, "sent", net, queue_id=rec["queue_id"])
        assert sent["relay"] == f"{HOST}:{nxt.port}" and sent["dsn"].startswith("2."), sent
        assert sent["recipient"] == "user@dest.test"
    rec = wait_event(hop3, "received", net, message_id=mid)
    assert rec["hops"] == 3
    delivered = wait_event(hop3, "delivered", net, queue_id=rec["queue_id"])
    assert delivered["recipient"] == "user@dest.test" and delivered["relay"] == "local"
    for node in (hop1, hop2, hop3):
        assert not events(node, "deferred") and not events(node, "bounced"), net.describe()
        wait_for(lambda: queue_empty(node), TIMEOUT, f"{node.dir.name} queue empty")


def test_next_hop_down_then_up(net: Net) -> None:
    """
    With hop2 down the message is deferred at hop1 (4.4.1); once hop2 starts it
    is delivered by hop1's own retry, once, with no bounce.
    """
    hop1, hop2, hop3 = chain(net, start_hop2=False)
    tok = token()
    msg, mid = make_message(tok, "sender@src.test", "user@dest.test")
    code, resp = send(hop1.port, "sender@src.test", ["user@dest.test"], msg)
    assert code == 250, resp
    deferred = wait_event(hop1, "deferred", net, recipient="user@dest.test")
    assert deferred["dsn"] == "4.4.1", deferred
    assert hop3.maildir_new("user", "dest.test") == []

    hop2.start()
    (path,) = wait_mail(hop3, "user", "dest.test", net=net)
    assert path.read_bytes().endswith(msg.replace(b"\r\n", b"\n"))
    wait_event(hop1, "sent", net, recipient="user@dest.test")
    wait_for(lambda: queue_empty(hop1), TIMEOUT, "hop1 queue empty")
    assert len(hop3.maildir_new("user", "dest.test")) == 1
    assert not events(hop1, "dsn") and not events(hop1, "bounced"), net.describe()
    assert hop1.maildir_new("sender", "src.test") == []


# -- several next hops -------------------------------------------------------


def test_failover_by_priority(net: Net, dead_port: int) -> None:
    """
    Next hops 10 (refusing connections), 20 and 30: every message goes through
    the priority-20 node, none through the priority-30 one.
    """
    p1, p2, p3 = distinct_ports(3)
    hop1 = net.add("hop1", p1, routes=[route(
        ["dest.test"], [hop(p3, 30), hop(dead_port, 10), hop(p2, 20)])])
    hop2 = net.add("hop2", p2, local=["dest.test"])
    hop3 = net.add("hop3", p3, local=["dest.test"])
    for n in (hop2, hop3, hop1):
        n.start()
    mids = []
    with open_session(hop1.port) as s:
        for _ in range(3):
            msg, mid = make_message(token(), "sender@src.test", "user@dest.test")
            mids.append(mid)
            code, resp = transaction(s, "sender@src.test", ["user@dest.test"], msg)
            assert code == 250, resp
    files = wait_mail(hop2, "user", "dest.test", count=3, net=net)
    assert len(files) == 3
    for f in files:
        received = [v for n, v in header_fields(f.read_bytes())[0] if n == "Received"]
        assert " by hop2.test (relaynet) " in received[0] and len(received) == 2, received
    sent = wait_for(lambda: len(events(hop1, "sent")) == 3 and events(hop1, "sent"),
                    TIMEOUT, "3 sent events at hop1")
    assert {e["relay"] for e in sent} == {f"{HOST}:{p2}"}, sent
    assert sorted(e["message_id"] for e in events(hop2, "received")) == sorted(mids)
    assert events(hop3, "received") == [] and mail_files(hop3) == []


# -- loops -------------------------------------------------------------------


def test_routing_loop_is_stopped_by_the_hop_limit(net: Net) -> None:
    """
    nodeA and nodeB route dest.test to each other with max_hops = 5: the
    sixth intake refuses the message with 554 5.4.6, the node before it
    bounces, the sender (local on nodeA) gets the DSN, and the traffic stops.
    """
    pa, pb = distinct_ports(2)
    limits = {"max_hops": 5}
    a = net.add("nodea", pa, local=["src.test"], limits=limits,
                routes=[route(["dest.test"], [hop(pb)])])
    b = net.add("nodeb", pb, limits=limits,
                routes=[route(["dest.test"], [hop(pa)]), route(["src.test"], [hop(pa)])])
    b.start()
    a.start()
    msg, mid = make_message(token(), "sender@src.test", "user@dest.test")
    code, resp = send(a.port, "sender@src.test", ["user@dest.test"], msg)
    assert code == 250, resp

    (path,) = wait_mail(a, "sender", "src.test", net=net)
    _, blocks, returned = parse_dsn(path.read_bytes())
    assert len(blocks) == 1
    assert_failed_report(blocks[0], "user@dest.test", "5.4.6")
    assert returned_message_id(returned) == mid
    assert "554" in str(blocks[0]["Diagnostic-Code"]), blocks[0]["Diagnostic-Code"]

    # Intakes: A(1) B(2) A(3) B(4) A(5); B refuses the sixth, A bounces.
    wait_for(lambda: queue_empty(a) and queue_empty(b), TIMEOUT, "both queues empty")
    hops_a = sorted(e["hops"] for e in events(a, "received"))
    hops_b = sorted(e["hops"] for e in events(b, "received"))
    assert hops_a == [1, 3, 5] and hops_b == [2, 4], (hops_a, hops_b, net.describe())
    (bounced,) = events(a, "bounced")
    assert bounced["dsn"] == "5.4.6" and bounced["recipient"] == "user@dest.test", bounced
    assert events(b, "bounced") == [] and events(b, "dsn") == []
    assert len(events(a, "sent")) == 2 and len(events(b, "sent")) == 2
    assert len(events(a, "dsn")) == 1 and len(mail_files(a)) == 1 and mail_files(b) == []


# -- the command line --------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*relaynet_command(), *args], capture_output=True, text=True, timeout=60)


def test_route_command(tmp_path: Path) -> None:
    """C{relaynet route} explains the decision; exit 0 if routable, 1 if not."""
    (port,) = distinct_ports(1)
    cfg = tmp_path / "node.toml"
    cfg.write_text(node_toml("hop1", port, local=["src.test"], routes=[
        route(["dest.test", "*.dest.test"], [hop(4001, 20), hop(4000, 10)])]))
    r = run_cli("route", str(cfg), "user@mx.dest.test")
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert "accepted" in r.stdout and "route[0]" in r.stdout, r.stdout
    lines = r.stdout.splitlines()
    hops = [line.strip() for line in lines if "next hop" in line]
    assert hops == [f"next hop: tcp:{HOST}:4000 (priority 10)",
                    f"next hop: tcp:{HOST}:4001 (priority 20)"], r.stdout

    r = run_cli("route", str(cfg), "sender@src.test")
    assert r.returncode == 0 and "local domain" in r.stdout, (r.stdout, r.stderr)

    r = run_cli("route", str(cfg), "user@nowhere.test")
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "refused" in r.stdout and "5.1.2" in r.stdout, r.stdout

    r = run_cli("route", str(cfg), "user@dest.test", "user@nowhere.test")
    assert r.returncode == 1, (r.stdout, r.stderr)

    # From a client outside trusted_networks: said so, and relaying is refused.
    r = run_cli("route", str(cfg), "--client", "192.0.2.9", "user@dest.test")
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "client 192.0.2.9 is outside trusted_networks" in r.stdout, r.stdout
    assert "554 5.7.1" in r.stdout, r.stdout
    r = run_cli("route", str(cfg), "--client", "127.0.0.1", "user@dest.test")
    assert "outside trusted_networks" not in r.stdout, r.stdout


@pytest.mark.parametrize("spelling", [
    "tcp:127.0.0.1:{port}",
    "tcp:host=127.0.0.1:port={port}",
    "tcp:localhost:{port}",
], ids=["positional", "keywords", "localhost"])
def test_next_hop_on_own_listener_is_rejected(tmp_path: Path, spelling: str) -> None:
    """
    A route to the node's own listener is a mail loop: check-config and twistd
    refuse it, naming the next hop.
    """
    (port,) = distinct_ports(1)
    cfg = tmp_path / "loop.toml"
    cfg.write_text(node_toml("hop1", port, routes=[route(["dest.test"], [spelling.format(port=port)])]))
    r = run_cli("check-config", str(cfg))
    assert r.returncode != 0, r.stdout
    assert "route[0].next_hops[0]" in r.stderr, r.stderr

    p = subprocess.run(
        [str(TWISTD), "-n", "--pidfile=", f"--logfile={tmp_path / 'twistd.log'}",
         "relaynet", "--config", str(cfg)],
        cwd=tmp_path, capture_output=True, text=True, timeout=30,
    )
    log = tmp_path / "twistd.log"
    output = p.stdout + p.stderr + (log.read_text() if log.exists() else "")
    assert p.returncode != 0, output
    assert "route[0].next_hops[0]" in output, output

    ok = tmp_path / "ok.toml"
    ok.write_text(node_toml("hop1", port, routes=[
        route(["dest.test"], [hop(port + 1, 10), spelling.format(port=port)])]))
    r = run_cli("check-config", str(ok))
    assert r.returncode != 0 and "route[0].next_hops[1]" in r.stderr, (r.stdout, r.stderr)
    ok.write_text(node_toml("hop1", port, routes=[route(["dest.test"], [hop(port + 1)])]))
    r = run_cli("check-config", str(ok))
    assert r.returncode == 0, r.stderr


def test_check_config_prints_the_forwarding_settings(tmp_path: Path) -> None:
    """
    The effective configuration printed by check-config keeps the forwarding
    settings: loaded again, it has the same routes (ack, concurrency, ...),
    [queue], [outbound] and [dns] as the file it came from.
    """
    from relaynet.config import load_config

    (port,) = distinct_ports(1)
    cfg = tmp_path / "node.toml"
    cfg.write_text(node_toml(
        "hop1", port, local=["src.test"],
        routes=[route(["dest.test"], [hop(4000, 10), hop(4001, 20)], ack="cut-through",
                      concurrency=3, source_address="127.0.0.1")],
        queue={"lifetime": 7200, "delay_warning": 600},
        outbound={"connection_reuse": False, "reuse_idle_time": 0.5},
    ) + '\n[dns]\nservers = ["127.0.0.1:5353"]\n')
    r = run_cli("check-config", str(cfg))
    assert r.returncode == 0, r.stderr
    printed = tmp_path / "printed.toml"
    printed.write_text(r.stdout)
    before, after = load_config(cfg), load_config(printed)
    assert after.routes == before.routes, r.stdout
    assert after.queue == before.queue, r.stdout
    assert after.outbound == before.outbound, r.stdout
    assert after.dns_servers == before.dns_servers, r.stdout
