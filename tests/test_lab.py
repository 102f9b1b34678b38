"""
Tests of C{relaynet lab}: the topology format and config generation, trace,
check and draw on made-up events and mailboxes (fast), and real labs of real
C{twistd} processes on loopback driven through the C{relaynet lab} command
(slow): chain3 and star with 200 messages each, chain3 under kill -9 of hop2,
and the netns mode where it can run.
"""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
import time
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable

import pytest

from relaynet.queue.bounce import RecipientReport, build_dsn
from relaynet.config import ConfigError
from relaynet.hints import command
from relaynet.lab import check, netns
from relaynet.lab.draw import render
from relaynet.lab.observe import EventIndex, LinkStat, link_stats, queue_counts, read_events, trace
from relaynet.lab.procs import descendants
from relaynet.lab.state import node_alive, pid_state
from relaynet.lab.tomlw import dumps
from relaynet.lab.topology import allocate, node_config, parse_topology, validate_node_config

ROOT = Path(__file__).resolve().parent.parent
TOPOLOGIES = ROOT / "topologies"
BIN = Path(sys.executable).parent


def relaynet(*args: str, timeout: float = 120.0, check_rc: bool = True,
             cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run C{relaynet ARGS} (this venv's) and return the finished process."""
    script = BIN / "relaynet"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "relaynet.cli"]
    res = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout,
                         stdin=subprocess.DEVNULL, cwd=cwd)
    if check_rc:
        assert res.returncode == 0, f"relaynet {' '.join(args)} -> {res.returncode}\n{res.stdout}\n{res.stderr}"
    return res


# -- topology format ---------------------------------------------------------


def _topo(text: str, source: str = "t.toml") -> Any:
    return parse_topology(tomllib.loads(text), source=source)


MINIMAL = """
[node.a]
[[node.a.route]]
domains = ["*"]
via = ["b"]
[node.b]
domains = ["b.test"]
users = ["u"]
"""


def _always_free(host: str, port: int) -> bool:
    return True


def _no_free_port(host: str) -> int:
    raise AssertionError("no port should be needed")


@pytest.mark.parametrize("path", sorted(TOPOLOGIES.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_topologies_generate_valid_node_configs(path: Path, tmp_path: Path) -> None:
    """Every shipped topology parses, and every generated node config passes the node's own parser."""
    from relaynet.lab.topology import load_topology

    from relaynet.lab.control import _make_files

    topo = load_topology(path)
    plans = allocate(topo, _always_free, _no_free_port)
    for name in topo.names:
        # The files the lab makes (certificates, password files, DKIM keys)
        # first, as 'lab up' does: the node's parser reads some of them.
        _make_files(topo, name, plans[name].address, [], tmp_path / name)
        data = node_config(topo, plans, name, tmp_path / name)
        assert tomllib.loads(dumps(data)) == data
        config = validate_node_config(topo, name, data, tmp_path / name)
        assert config.name == name
        assert config.spool == tmp_path / name / "spool"


def test_required_topologies_are_shipped() -> None:
    """chain3, star, intra-org and failover exist."""
    names = {p.stem for p in TOPOLOGIES.glob("*.toml")}
    assert {"chain3", "star", "intra-org", "failover"} <= names


@pytest.mark.parametrize(("text", "key", "problem"), [
    (MINIMAL + "colour = 1\n", "node.b.colour", "unknown key"),
    (MINIMAL.replace('via = ["b"]', 'via = ["c"]'), "node.a.route[0].via[0]", "no node named 'c'"),
    (MINIMAL.replace('via = ["b"]', 'via = ["a"]'), "node.a.route[0].via[0]", "relay to itself"),
    (MINIMAL + 'address = "10.1.2.3"\n', "node.b.address", "not a loopback address"),
    (MINIMAL + 'port = 70000\n', "node.b.port", "TCP port"),
    (MINIMAL.replace("[node.b]", '[node.b]\naddress = "127.0.0.9"').replace(
        "[node.a]", '[node.a]\naddress = "127.0.0.9"'), "node.b.address", "already node a's"),
    (MINIMAL + "[node.b.config.node]\nspool = \"/x\"\n", "node.b.config.node.spool", "set by the lab"),
    (MINIMAL.replace('domains = ["*"]\n', ""), "node.a.route[0].domains", "is required"),
    (MINIMAL + '[[node.b.listener]]\nmode = "submission"\n', "node.b.listener[0].mode", "needs TLS"),
    (MINIMAL + '[lab.traffic]\nfrom = "zz"\n', "lab.traffic.from[0]", "no node named"),
    ("[lab]\nname = \"x\"\n", "node", "at least one"),
    (MINIMAL.replace("[node.b]", "[node.B_2]"), "node.B_2", "lower-case"),
])
def test_topology_errors_name_file_and_key(text: str, key: str, problem: str) -> None:
    """Invalid topologies are refused with the file, the dotted key and the problem."""
    with pytest.raises(ConfigError) as e:
        _topo(text)
    assert e.value.source == "t.toml"
    assert e.value.key == key
    assert problem in e.value.problem


def test_generated_config_errors_name_the_node(tmp_path: Path) -> None:
    """A pass-through setting the node rejects is reported with the topology, the node and the node's key."""
    topo = _topo(MINIMAL + "[node.b.config.limits]\nmax_recipients = 5\n")
    plans = allocate(topo, _always_free, _no_free_port)
    data = node_config(topo, plans, "b", tmp_path / "b")
    with pytest.raises(ConfigError) as e:
        validate_node_config(topo, "b", data, tmp_path / "b")
    assert e.value.key == "limits.max_recipients"
    assert "t.toml (node b, generated" in e.value.source


def test_generated_config_routes_and_lab_settings(tmp_path: Path) -> None:
    """Routes name other nodes' endpoints; labs retry fast and trust loopback; raw config merges last."""
    topo = _topo(MINIMAL + "[node.a.config.queue]\nmaximal_backoff = 7\n"
                 "[[node.a.config.route]]\ndomains = [\"spam.test\"]\naction = \"reject\"\n")
    plans = allocate(topo, _always_free, _no_free_port)
    assert (plans["a"].address, plans["b"].address) == ("127.0.0.2", "127.0.0.3")
    a = node_config(topo, plans, "a", tmp_path / "a")
    assert a["listener"] == [{"endpoint": "tcp:2525:interface=127.0.0.2", "mode": "relay"}]
    assert a["route"][0]["next_hops"] == [{"endpoint": "tcp:127.0.0.3:2525", "priority": 10}]
    assert a["route"][0]["source_address"] == "127.0.0.2"
    assert a["route"][1] == {"domains": ["spam.test"], "action": "reject"}
    assert a["queue"] == {"minimal_backoff": 1, "maximal_backoff": 7, "delay_warning": 0}
    assert a["relay"]["trusted_networks"] == ["127.0.0.0/8"]


def test_allocate_skips_taken_addresses_and_busy_ports() -> None:
    """Explicit addresses are kept and skipped by allocation; a busy port falls back to a free one."""
    topo = _topo(MINIMAL.replace("[node.b]", '[node.b]\naddress = "127.0.0.2"'))
    plans = allocate(topo, lambda h, p: h != "127.0.0.3", lambda h: 40000)
    assert plans["b"].address == "127.0.0.2" and plans["b"].port == 2525
    assert plans["a"].address == "127.0.0.3" and plans["a"].port == 40000


def test_netns_plan_uses_one_subnet_per_link(tmp_path: Path) -> None:
    """In netns mode each link gets a /30 and next hops use the peer's end of the link."""
    topo = _topo(MINIMAL)
    plans = allocate(topo, _always_free, _no_free_port, netns=True)
    assert plans["a"].link_addresses == {"b": "198.18.0.1"}
    assert plans["b"].link_addresses == {"a": "198.18.0.2"}
    a = node_config(topo, plans, "a", tmp_path / "a", netns=True)
    assert a["route"][0]["next_hops"][0]["endpoint"] == "tcp:198.18.0.2:2525"
    validate_node_config(topo, "a", a, tmp_path / "a")


def test_toml_writer_round_trips() -> None:
    """Strings with quotes, backslashes and control characters, nested tables and arrays of tables survive."""
    data = {
        "a": 'quote " back \\ tab \t nl \n é',
        "n": 3, "f": 1.5, "b": True, "empty": [],
        "t": {"x": [1, 2], "weird key": "v", "sub": {"y": "z"}},
        "route": [{"domains": ["*"], "next_hops": [{"endpoint": "tcp:h:1", "priority": 10}]}],
    }
    assert tomllib.loads(dumps(data, "header\nline")) == data


# -- trace, links, check, draw on made-up data -------------------------------


def _ev(node: str, kind: str, t: float, qid: str, **kw: Any) -> dict[str, Any]:
    return {"time": t, "node": node, "_node": node, "event": kind, "queue_id": qid, **kw}


ENDPOINTS = {"127.0.0.3:2525": "b", "127.0.0.4:2525": "c", "127.0.0.2:2525": "a"}


def _chain_events() -> list[dict[str, Any]]:
    mid = "<m1@x>"
    return [
        _ev("a", "received", 1.0, "A1", message_id=mid, client="127.0.0.1", hops=1),
        _ev("a", "deferred", 1.1, "A1", relay="127.0.0.3:2525", delay=0.1, dsn="4.4.1",
            diagnostic="connection refused"),
        _ev("a", "sent", 2.0, "A1", relay="127.0.0.3:2525", delay=1.0, dsn="2.0.0",
            diagnostic="250 2.0.0 Ok: queued as B1"),
        _ev("b", "received", 1.95, "B1", message_id=mid, client="127.0.0.2", hops=2),
        _ev("b", "sent", 2.2, "B1", relay="127.0.0.4:2525", delay=0.25, dsn="2.0.0",
            diagnostic="250 2.0.0 Ok: queued as C1"),
        _ev("c", "received", 2.15, "C1", message_id=mid, client="127.0.0.3", hops=3),
        _ev("c", "delivered", 2.3, "C1", recipient="u@c.test", relay="local", delay=0.15, dsn="2.0.0"),
    ]


def test_trace_follows_queued_as_links_hop_by_hop() -> None:
    """The sent event's 'queued as' reply links each hop to the next; failed attempts are shown in order."""
    rows = trace(EventIndex(_chain_events(), ENDPOINTS), "<m1@x>")
    assert [(r.node, r.queue_id, r.next_hop, r.status) for r in rows] == [
        ("a", "A1", "b", "deferred 4.4.1"),
        ("a", "A1", "b", "sent 2.0.0"),
        ("b", "B1", "c", "sent 2.0.0"),
        ("c", "C1", "mailbox u@c.test", "delivered 2.0.0"),
    ]
    assert [r.depth for r in rows] == [0, 0, 1, 2]


def test_trace_follows_bounces_into_the_dsn() -> None:
    """A bounce shows the DSN it caused and where that went."""
    events = [
        _ev("a", "received", 1.0, "A1", message_id="<m2@x>", hops=1),
        _ev("a", "dsn", 1.2, "A2", recipient="s@a.test", original_queue_id="A1", action="failed"),
        _ev("a", "bounced", 1.2, "A1", relay="127.0.0.3:2525", dsn="5.1.1", diagnostic="550 5.1.1 unknown"),
        _ev("a", "delivered", 1.3, "A2", recipient="s@a.test", relay="local", dsn="2.0.0"),
    ]
    rows = trace(EventIndex(events, ENDPOINTS), "<m2@x>")
    assert [r.status for r in rows] == ["bounced 5.1.1", "dsn failed", "delivered 2.0.0"]
    assert rows[-1].dsn and rows[-1].arrival == 1.2


def test_trace_marks_a_hop_that_crashed_before_logging() -> None:
    """A copy received from a lab node with no matching sent event is attributed to that node (a duplicate)."""
    events = _chain_events() + [
        _ev("c", "received", 2.1, "C9", message_id="<m1@x>", client="127.0.0.3", hops=3),
        _ev("c", "delivered", 2.2, "C9", recipient="u@c.test", relay="local", dsn="2.0.0"),
    ]
    rows = trace(EventIndex(events, ENDPOINTS), "<m1@x>")
    unrecorded = [r for r in rows if r.status == "unrecorded"]
    assert len(unrecorded) == 1 and unrecorded[0].node == "b" and unrecorded[0].next_queue_id == "C9"
    assert sum(r.status.startswith("delivered") for r in rows) == 2


def test_link_stats_count_relays_and_failures() -> None:
    """Per direction: messages relayed, their median delay, failed attempts."""
    stats = link_stats(EventIndex(_chain_events(), ENDPOINTS))
    assert stats == [LinkStat("a", "b", 1, 1.0, 1), LinkStat("b", "c", 1, 0.25, 0)]


def _maildir_file(root: Path, domain: str, user: str, data: bytes) -> None:
    d = root / domain / user / "Maildir" / "new"
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{time.time_ns()}.{random.random()}").write_bytes(data)


def _copy(mid: str, to: str) -> bytes:
    return (f"Return-Path: <s@a.test>\r\nDelivered-To: {to}\r\nReceived: x\r\n"
            f"Message-ID: {mid}\r\nSubject: t\r\n\r\nbody\r\n").encode()


def test_check_counts_delivered_duplicated_bounced_in_flight_and_lost(tmp_path: Path) -> None:
    """Every acknowledged message is classified from the mailboxes and queues; nothing else counts."""
    root = tmp_path / "mail"
    _maildir_file(root, "c.test", "u", _copy("<ok@x>", "u@c.test"))
    _maildir_file(root, "c.test", "u", _copy("<dup@x>", "u@c.test"))
    _maildir_file(root, "c.test", "u", _copy("<dup@x>", "u@c.test"))
    _maildir_file(root, "c.test", "all", _copy("<alias@x>", "all@c.test"))
    dsn = build_dsn(
        reporting_mta="b.lab.test", sender="s@a.test",
        original_headers=b"From: s@a.test\r\nMessage-ID: <bounced@x>\r\nSubject: t\r\n",
        original_body=io.BytesIO(b"hello\r\n"),
        reports=[RecipientReport(address="nobody@c.test", action="failed", status="5.1.1",
                                 diagnostic="550 5.1.1 unknown")],
        arrival=1.0, queue_id="Q1", now=2.0,
    )
    _maildir_file(root, "a.test", "s", dsn)
    spool = tmp_path / "spool"
    (spool / "queue" / "new").mkdir(parents=True)
    env = b'{"version":1}'
    (spool / "queue" / "new" / "Q2").write_bytes(
        b"RELAYNET-QUEUE 1 ".ljust(48, b"0")[:47] + b"\n" + env + b"\n"
        + b"Received: x\r\nMessage-ID: <queued@x>\r\n\r\nbody\r\n")
    nodes = {"n": {"mailroot": str(root), "spool": str(spool)}}
    ev = check.collect(nodes)
    sent = [{"message_id": m, "recipients": [r], "start": 0.0} for m, r in [
        ("<ok@x>", "u@c.test"), ("<dup@x>", "u@c.test"), ("<bounced@x>", "nobody@c.test"),
        ("<queued@x>", "u@c.test"), ("<lost@x>", "u@c.test"), ("<alias@x>", "team@c.test"),
    ]]
    report = check.verify(sent, ev)
    assert report.messages == 6
    assert report.delivered_once == 2  # ok, and alias (delivered under another address)
    assert report.duplicated == [("<dup@x>", "u@c.test", 2)]
    assert report.bounced == 1
    assert report.in_flight == [("<queued@x>", "u@c.test")]
    assert report.lost == [("<lost@x>", "u@c.test")]
    assert not report.ok


def _queue_file(spool: Path, qid: str, mid: str, state: dict[str, str] | None) -> None:
    """Put a queued message (and its state file, recipient -> status) in C{spool}."""
    (spool / "queue" / "new").mkdir(parents=True, exist_ok=True)
    (spool / "queue" / "new" / qid).write_bytes(
        b"RELAYNET-QUEUE 1 ".ljust(48, b"0")[:47] + b"\n" + b'{"version":1}' + b"\n"
        + f"Received: x\r\nMessage-ID: {mid}\r\n\r\nbody\r\n".encode())
    if state is not None:
        (spool / "queue" / "state").mkdir(parents=True, exist_ok=True)
        (spool / "queue" / "state" / qid).write_text(json.dumps(
            {"version": 1, "held": False, "recipients": {a: {"status": st} for a, st in state.items()}}))


def _check_lab(tmp_path: Path, sent: list[str], stopped: set[str], monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake chain3 lab of nodes a and b (those in C{stopped} not running) with C{sent} acknowledged to u@c.test."""
    from relaynet.lab.state import Lab

    nodes = {n: {"address": "127.0.0.2", "ports": [2525], "config": "x", "events": str(tmp_path / n / "e"),
                 "spool": str(tmp_path / n / "spool"), "mailroot": str(tmp_path / n / "mail")} for n in "ab"}
    d = _fake_lab(tmp_path, "chain3", nodes)
    (d / "sent.jsonl").write_text("".join(
        json.dumps({"message_id": m, "recipients": ["u@c.test"], "start": 0.0}) + "\n" for m in sent))
    monkeypatch.setattr(Lab, "alive", lambda self, name: name not in stopped)
    return d


def _last_line(out: str) -> str:
    return out.strip().splitlines()[-1]


def test_check_last_line_and_exit_status_agree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """
    C{lab check}'s last line names every failing count, and it says OK
    exactly when the exit status is 0: duplicates fail (unless
    --allow-duplicates, which says so), and a clean run says how many were
    delivered exactly once and that nothing is lost or in flight.
    """
    from relaynet.cli import main

    d = _check_lab(tmp_path, ["<ok@x>", "<dup@x>"], set(), monkeypatch)
    mail = tmp_path / "b" / "mail"
    _maildir_file(mail, "c.test", "u", _copy("<ok@x>", "u@c.test"))
    _maildir_file(mail, "c.test", "u", _copy("<dup@x>", "u@c.test"))
    assert main(["lab", "check", "--dir", str(d)]) == 0
    assert _last_line(capsys.readouterr().out) == "OK: 2 delivered exactly once, nothing lost, nothing in flight"

    _maildir_file(mail, "c.test", "u", _copy("<dup@x>", "u@c.test"))
    assert main(["lab", "check", "--dir", str(d)]) == 1
    assert _last_line(capsys.readouterr().out) == "FAIL: 1 duplicated"
    assert main(["lab", "check", "--dir", str(d), "--allow-duplicates"]) == 0
    assert _last_line(capsys.readouterr().out) == \
        "OK: 1 delivered exactly once, 1 duplicated (allowed), nothing lost, nothing in flight"

    (d / "sent.jsonl").write_text((d / "sent.jsonl").read_text() + json.dumps(
        {"message_id": "<lost@x>", "recipients": ["u@c.test"], "start": 0.0}) + "\n")
    assert main(["lab", "check", "--dir", str(d), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert (report["ok"], report["verdict"]) == (False, "FAIL: 1 lost, 1 duplicated")


def test_check_counts_mail_held_by_a_stopped_node_as_in_flight(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """
    A message a stopped node still holds unfinished (read from its spool on
    disk) is in flight even when a copy was already delivered (it relayed
    it but died before recording that: it will send it again); the output
    names the node and the exact command that starts it, --wait says so
    too, and the exit status is 1. A queued message whose recipients are
    all final is not in flight.
    """
    from relaynet.cli import main

    d = _check_lab(tmp_path, ["<again@x>", "<done@x>"], {"a"}, monkeypatch)
    mail = tmp_path / "b" / "mail"
    # The stopped node has mail of its own too: its name must survive the scan.
    _maildir_file(tmp_path / "a" / "mail", "c.test", "u", _copy("<again@x>", "u@c.test"))
    _maildir_file(mail, "c.test", "u", _copy("<done@x>", "u@c.test"))
    spool = tmp_path / "a" / "spool"
    _queue_file(spool, "Q1", "<again@x>", {"u@c.test": "pending"})
    _queue_file(spool, "Q2", "<done@x>", {"u@c.test": "relayed"})
    start = command("lab", "up", TOPOLOGIES / "chain3.toml", "--dir", d)

    assert main(["lab", "check", "--dir", str(d)]) == 1
    out = capsys.readouterr().out
    assert _last_line(out) == "FAIL: 1 in flight (held by stopped a)"
    assert "<again@x> to u@c.test: queued at a (stopped); 1 copy already delivered" in out
    assert f"stopped: a holds 1 message(s); they move only once started: {start}" in out

    assert main(["lab", "check", "--dir", str(d), "--wait", "0.05", "--json"]) == 1
    cap = capsys.readouterr()
    assert "stopped node(s) hold mail: a (1 message(s)); it moves only once they are started: " + start in cap.err
    report = json.loads(cap.out)
    assert report["in_flight_ids"] == [{"message_id": "<again@x>", "recipient": "u@c.test",
                                        "nodes": ["a"], "copies": 1}]
    assert (report["delivered_once"], report["stopped_nodes"], report["start_command"]) == (1, {"a": 1}, start)


def test_draw_writes_well_formed_svg_with_labels() -> None:
    """The picture is valid XML with one circle per node, one line per link and count/latency labels."""
    nodes = {n: {"address": f"127.0.0.{i + 2}", "ports": [2525], "role": "relay",
                 "neighbours": [m] if m else []}
             for i, (n, m) in enumerate([("a", "b"), ("b", "c"), ("c", None)])}
    links = [{"a": "a", "b": "b", "up": True}, {"a": "b", "b": "c", "up": False}]
    for layout in ("layers", "circle"):
        svg = render("lab <t>", nodes, links, [LinkStat("a", "b", 200, 0.052, 3)], ["a"], layout,
                     alive={"a": True, "b": True, "c": False})
        root = ET.fromstring(svg)
        ns = "{http://www.w3.org/2000/svg}"
        assert len(root.findall(f"{ns}circle")) == 3
        assert len(root.findall(f"{ns}line")) == 2
        texts = [t.text for t in root.iter(f"{ns}text")]
        assert "200 msg, p50 52 ms" in texts and "3 failed attempts" in texts and "cut" in texts


def _shipped_picture(path: Path, cut: bool) -> str:
    """A shipped topology drawn with traffic (and failures) on every link, both ways."""
    from relaynet.lab.topology import load_topology

    topo = load_topology(path)
    plans = allocate(topo, _always_free, _no_free_port)
    nodes = {n.name: {"address": plans[n.name].address, "ports": list(plans[n.name].ports),
                      "role": topo.role(n.name), "neighbours": n.neighbours()} for n in topo.nodes}
    links = [{"a": a, "b": b, "up": not (cut and i == 0)} for i, (a, b) in enumerate(topo.links())]
    stats = [s for a, b in topo.links() for s in (LinkStat(a, b, 1234, 0.052, 17), LinkStat(b, a, 7, 12.5))]
    return render(f"lab {topo.name}: {topo.description}", nodes, links, stats, list(topo.traffic.entry),
                  topo.layout, alive={n: n != topo.names[-1] for n in nodes})


@pytest.mark.parametrize("cut", [False, True], ids=["links-up", "first-link-cut"])
@pytest.mark.parametrize("path", sorted(TOPOLOGIES.glob("*.toml")), ids=lambda p: p.name)
def test_draw_keeps_lines_off_labels(path: Path, cut: bool) -> None:
    """
    In every shipped topology's picture no link line runs through any text
    (a node's name, address and role; a link's counts), edge labels stand
    clear of their own line, and no two texts overlap.
    """
    from relaynet.lab.draw import segment_hits_box, text_box

    root = ET.fromstring(_shipped_picture(path, cut))
    ns = "{http://www.w3.org/2000/svg}"
    lines = [((float(ln.get("x1", 0)), float(ln.get("y1", 0))), (float(ln.get("x2", 0)), float(ln.get("y2", 0))),
              (ln.get("data-a"), ln.get("data-b"))) for ln in root.iter(f"{ns}line")]
    texts = []
    for t in root.iter(f"{ns}text"):
        if t.get("class") == "title":
            continue
        size = float(t.get("font-size", 11))
        box = text_box(float(t.get("x", 0)), float(t.get("y", 0)), t.text or "", size,
                       t.get("text-anchor", "start"))
        texts.append((t.text, box, t.get("class"), (t.get("data-a"), t.get("data-b"))))
    assert lines and len(texts) > len(lines)
    for text, box, cls, link in texts:
        for p, q, ends in lines:
            assert not segment_hits_box(p, q, box), f"{path.name}: link {ends} runs through {text!r}"
            if cls == "label" and ends == link:
                # Offset from its own line by a few pixels, not touching it.
                assert not segment_hits_box(p, q, box.grown(3)), f"{text!r} sits on its line {ends}"
    for i, (text, box, _, _) in enumerate(texts):
        for other, obox, _, _ in texts[i + 1:]:
            assert not box.overlaps(obox), f"{path.name}: {text!r} overlaps {other!r}"


# -- real labs ---------------------------------------------------------------


def _status(labdir: Path) -> dict[str, Any]:
    return json.loads(relaynet("lab", "status", "--dir", str(labdir), "--json").stdout)  # type: ignore[no-any-return]


def _pids(labdir: Path) -> dict[str, tuple[int, str]]:
    return {n["name"]: (n["pid"], n["dirs"]["config"]) for n in _status(labdir)["nodes"]}


@pytest.fixture
def lab_dirs(tmp_path: Path) -> Any:
    """Lab directories that are brought down (bounded) whatever the test did."""
    made: list[Path] = []

    def make(name: str) -> Path:
        d = tmp_path / name
        made.append(d)
        return d

    yield make
    for d in made:
        if (d / "lab.json").exists():
            relaynet("lab", "down", "--dir", str(d), check_rc=False)


def _run_lab(topology: str, labdir: Path, count: int, path: Callable[[dict[str, Any]], list[str]]) -> None:
    t0 = time.monotonic()
    up = relaynet("lab", "up", str(TOPOLOGIES / topology), "--dir", str(labdir))
    print(f"{topology}: lab up in {time.monotonic() - t0:.2f}s\n{up.stdout}")
    pids = _pids(labdir)
    assert all(node_alive(pid, cfg) for pid, cfg in pids.values()), pids

    again = relaynet("lab", "up", str(TOPOLOGIES / topology), "--dir", str(labdir))
    assert "reattached" in again.stdout
    assert _pids(labdir) == pids

    sent = relaynet("lab", "send", "--dir", str(labdir), "-n", str(count), "--json")
    summary = json.loads(sent.stdout)
    assert summary["accepted"] == count, summary

    checked = relaynet("lab", "check", "--dir", str(labdir), "--wait", "60", "--json", check_rc=False)
    report = json.loads(checked.stdout)
    assert checked.returncode == 0, report
    assert (report["messages"], report["delivered_once"], report["lost"], report["duplicated"]) == \
        (count, count, 0, 0), report

    last = json.loads((labdir / "sent.jsonl").read_text().splitlines()[-1])
    hops = path(last)
    tr = json.loads(relaynet("lab", "trace", "--dir", str(labdir), "--json").stdout)
    assert tr["message_id"] == last["message_id"]
    assert [(h["node"], h["status"].split()[0]) for h in tr["hops"]] == \
        [(n, "sent") for n in hops[:-1]] + [(hops[-1], "delivered")]
    assert tr["hops"][-1]["next_hop"].startswith("mailbox ")
    for a, b in zip(tr["hops"], tr["hops"][1:]):
        assert a["next_queue_id"] == b["queue_id"] and a["next_hop"] == b["node"]

    status = _status(labdir)
    assert sum(n["delivered"] for n in status["nodes"]) == count
    for n in status["nodes"]:
        assert n["running"] and n["queue"]["active"] == n["queue"]["deferred"] == 0
        assert n["smtp"] == [f"{n['address']}:{p}" for p in n["ports"]]
        assert Path(n["dirs"]["spool"]).is_dir()
    assert len({n["address"] for n in status["nodes"]}) == len(status["nodes"])

    relaynet("lab", "draw", "--dir", str(labdir))
    ET.parse(labdir / "topology.svg")

    relaynet("lab", "down", "--dir", str(labdir))
    assert not any(node_alive(pid, cfg) for pid, cfg in pids.values())
    assert all(not n["running"] for n in _status(labdir)["nodes"])


@pytest.mark.slow
def test_chain3_delivers_200_exactly_once(lab_dirs: Any) -> None:
    """chain3 as real processes: 200 messages, all delivered once, traced over every hop; down stops all."""
    _run_lab("chain3.toml", lab_dirs("chain3"), 200, lambda rec: ["client", "hop1", "hop2", "hop3"])


@pytest.mark.slow
def test_star_delivers_200_exactly_once(lab_dirs: Any) -> None:
    """star: 200 messages from the spokes to other spokes through the hub, all delivered once."""
    def path(rec: dict[str, Any]) -> list[str]:
        # Submitted to a spoke, for a user of another spoke's domain (spokeN.test).
        dest = rec["recipients"][0].split("@")[1].split(".")[0]
        assert dest != rec["node"]
        return [rec["node"], "hub", dest]

    _run_lab("star.toml", lab_dirs("star"), 200, path)


@pytest.mark.slow
def test_up_refuses_another_topology_in_the_same_dir(lab_dirs: Any) -> None:
    """A lab directory holds one topology's lab: another topology is refused; bad topologies are refused with the key."""
    labdir = lab_dirs("refuse")
    relaynet("lab", "up", str(TOPOLOGIES / "chain3.toml"), "--dir", str(labdir))
    other = relaynet("lab", "up", str(TOPOLOGIES / "star.toml"), "--dir", str(labdir), check_rc=False)
    assert other.returncode == 1 and "holds lab 'chain3'" in other.stderr
    bad = labdir.parent / "bad.toml"
    bad.write_text(MINIMAL.replace('via = ["b"]', 'via = ["nowhere"]'))
    res = relaynet("lab", "up", str(bad), "--dir", str(labdir.parent / "bad"), check_rc=False)
    assert res.returncode == 1 and "bad.toml: node.a.route[0].via[0]: no node named 'nowhere'" in res.stderr


@pytest.mark.slow
def test_chain3_chaos_kill9_hop2_loses_nothing(lab_dirs: Any) -> None:
    """Under load, hop2 is kill -9ed and restarted at random for 10 s: lab check finds nothing lost."""
    labdir = lab_dirs("chaos")
    relaynet("lab", "up", str(TOPOLOGIES / "chain3.toml"), "--dir", str(labdir))
    res = relaynet("lab", "chaos", "--dir", str(labdir), "--target", "hop2", "--duration", "10",
                   "--interval", "0.2", "0.5", "--down", "0.2", "0.8", "--send", "400", "--rate", "40",
                   "--seed", "7", timeout=90)
    print(res.stdout, res.stderr)
    log = [json.loads(line) for line in (labdir / "chaos.jsonl").read_text().splitlines()]
    kills = [a for a in log if a["action"] == "kill -9"]
    assert len(kills) >= 2 and {a["node"] for a in kills} == {"hop2"}
    assert sum(a["action"] == "restart" for a in log) == len(kills)
    checked = relaynet("lab", "check", "--dir", str(labdir), "--wait", "60", "--json", check_rc=False)
    report = json.loads(checked.stdout)
    print(report)
    assert report["messages"] >= 300
    assert report["lost"] == 0 and report["in_flight"] == 0, report
    assert report["delivered_once"] + len(report["duplicated_ids"]) == report["recipients"]
    relaynet("lab", "down", "--dir", str(labdir))


def _until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    """Wait (bounded) until C{cond()} holds, checking every 50 ms; fail naming C{what}."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.slow
def test_chain3_check_counts_mail_of_a_stopped_node_until_it_is_started(lab_dirs: Any) -> None:
    """
    hop3 is killed, 5 messages pile up at hop2, then hop2 is killed too:
    C{lab check} counts them in flight at the stopped hop2 (its spool, read
    from disk), exits 1 with that in its last line and prints the command
    that starts it; after that command, C{lab check --wait} finds all 5
    delivered exactly once and exits 0.
    """
    import os
    import signal

    labdir = lab_dirs("chain3")
    relaynet("lab", "up", str(TOPOLOGIES / "chain3.toml"), "--dir", str(labdir))
    nodes = {n["name"]: n for n in _status(labdir)["nodes"]}
    queues = {name: Path(n["dirs"]["spool"]) / "queue" / "new" for name, n in nodes.items()}

    def queued(name: str) -> int:
        return len(os.listdir(queues[name])) if queues[name].exists() else 0

    def kill(name: str) -> None:
        # Gone, not just dead: a zombie not yet reaped (the orphan's reaper
        # may be slow) still owns its admin socket's lock, and a restart fails.
        os.kill(nodes[name]["pid"], signal.SIGKILL)
        _until(lambda: pid_state(nodes[name]["pid"]) is None, 30, f"{name} to die and be reaped")

    kill("hop3")
    assert json.loads(relaynet("lab", "send", "--dir", str(labdir), "-n", "5", "--json").stdout)["accepted"] == 5
    _until(lambda: queued("hop2") == 5 and queued("client") == queued("hop1") == 0, 60, "5 messages at hop2")
    kill("hop2")

    res = relaynet("lab", "check", "--dir", str(labdir), check_rc=False)
    assert res.returncode == 1, res.stdout + res.stderr
    assert _last_line(res.stdout) == "FAIL: 5 in flight (held by stopped hop2)", res.stdout
    start = command("lab", "up", TOPOLOGIES / "chain3.toml", "--dir", labdir)
    assert f"stopped: hop2 holds 5 message(s); they move only once started: {start}" in res.stdout

    res = relaynet("lab", "check", "--dir", str(labdir), "--wait", "0.2", check_rc=False)
    assert res.returncode == 1 and f"it moves only once they are started: {start}" in res.stderr, res.stderr
    again = subprocess.run(start, shell=True, capture_output=True, text=True, timeout=120,
                           stdin=subprocess.DEVNULL)
    assert again.returncode == 0, again.stderr
    res = relaynet("lab", "check", "--dir", str(labdir), "--wait", "60", check_rc=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert _last_line(res.stdout) == "OK: 5 delivered exactly once, nothing lost, nothing in flight"
    relaynet("lab", "down", "--dir", str(labdir))


@pytest.mark.slow
def test_trace_shows_a_relay_whose_sender_died_before_recording_it(lab_dirs: Any) -> None:
    """
    The real path of C{lab trace}'s "unrecorded" row: client relays a
    message to hop1, hop1 accepts it and relays it on, and client cannot
    record hop1's 250 (its commit process is stopped, so the removal never
    completes and no C{sent} event is written) when it is killed with
    C{kill -9}, commit process and all. C{lab trace} then shows the hop
    from client to hop1 as unrecorded, with the reason and what follows;
    after C{lab up} restarts client, it sends the message again, marked,
    hop1 recognises it (a C{duplicate} event naming client's transfer),
    C{lab check} finds it delivered exactly once, and the trace is whole.
    """
    import os
    import signal

    labdir = lab_dirs("unrecorded")
    relaynet("lab", "up", str(TOPOLOGIES / "chain3.toml"), "--dir", str(labdir))
    nodes = {n["name"]: n for n in _status(labdir)["nodes"]}
    spools = {name: Path(n["dirs"]["spool"]) for name, n in nodes.items()}

    def events(name: str) -> list[dict[str, Any]]:
        return read_events(spools[name] / "events.jsonl")

    client = nodes["client"]["pid"]
    os.kill(nodes["hop1"]["pid"], signal.SIGSTOP)  # client's relay waits for hop1's greeting
    try:
        sent = json.loads(relaynet("lab", "send", "--dir", str(labdir), "-n", "1", "--json").stdout)
        assert sent["accepted"] == 1, sent
        (queued,) = os.listdir(spools["client"] / "queue" / "new")
        committers = [p for p in descendants([client])
                      if b"committer.py" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert len(committers) == 1, committers
        os.kill(committers[0], signal.SIGSTOP)  # client can relay, not remove
    finally:
        os.kill(nodes["hop1"]["pid"], signal.SIGCONT)
    mid = json.loads((labdir / "sent.jsonl").read_text().splitlines()[-1])["message_id"]
    _until(lambda: any(e["event"] == "delivered" and e["queue_id"] in
                       {r["queue_id"] for r in events("hop3") if r.get("message_id") == mid}
                       for e in events("hop3")), 60, "the message delivered by hop3")
    assert os.listdir(spools["client"] / "queue" / "new") == [queued]
    assert not [e for e in events("client") if e["event"] == "sent"]
    os.kill(committers[0], signal.SIGKILL)
    os.kill(client, signal.SIGKILL)
    _until(lambda: pid_state(client) is None, 30, "client to die and be reaped")

    tr = json.loads(relaynet("lab", "trace", "--dir", str(labdir), "--json").stdout)
    assert tr["message_id"] == mid
    (lost,) = [h for h in tr["hops"] if h["status"] == "unrecorded"]
    (at_hop1,) = [h for h in tr["hops"] if h["node"] == "hop1"]
    assert (lost["node"], lost["next_hop"], lost["next_queue_id"]) == ("client", "hop1", at_hop1["queue_id"])
    assert "crashed before recording it: it sends it again" in lost["detail"]
    # client's own row: the message is still in its queue, no outcome yet.
    assert [(h["node"], h["status"].split()[0]) for h in tr["hops"] if h is not lost] == \
        [("client", "queued"), ("hop1", "sent"), ("hop2", "sent"), ("hop3", "delivered")]
    text = relaynet("lab", "trace", "--dir", str(labdir)).stdout
    print(text)
    assert "unrecorded: relayed to hop1 but no outcome logged" in text, text

    relaynet("lab", "up", str(TOPOLOGIES / "chain3.toml"), "--dir", str(labdir))
    res = relaynet("lab", "check", "--dir", str(labdir), "--wait", "60", check_rc=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert _last_line(res.stdout) == "OK: 1 delivered exactly once, nothing lost, nothing in flight"
    (dup,) = [e for e in events("hop1") if e["event"] == "duplicate"]
    assert dup["origin"] == f"client/{queued}" and dup["queue_id"] == at_hop1["queue_id"]
    tr = json.loads(relaynet("lab", "trace", "--dir", str(labdir), "--json").stdout)
    assert [(h["node"], h["status"].split()[0]) for h in tr["hops"]] == \
        [("client", "sent"), ("hop1", "sent"), ("hop2", "sent"), ("hop3", "delivered")]
    assert tr["hops"][0]["next_queue_id"] == at_hop1["queue_id"]
    relaynet("lab", "down", "--dir", str(labdir))


@pytest.mark.slow
@pytest.mark.skipif(netns.unavailable_reason() is not None, reason=str(netns.unavailable_reason()))
def test_netns_chain3_survives_cut_links(lab_dirs: Any) -> None:
    """--netns: one namespace per node; links cut and restored while sending; nothing lost; down removes them."""
    labdir = lab_dirs("netns")
    up = relaynet("lab", "up", str(TOPOLOGIES / "chain3.toml"), "--dir", str(labdir), "--netns")
    status = _status(labdir)
    spaces = [n["netns"] for n in status["nodes"]]
    assert all(spaces) and set(spaces) <= netns.existing(), up.stdout
    relaynet("lab", "chaos", "--dir", str(labdir), "--links", "--duration", "6", "--interval", "0.5", "1",
             "--down", "0.5", "1.5", "--send", "150", "--rate", "30", "--seed", "3", timeout=90)
    log = [json.loads(line) for line in (labdir / "chaos.jsonl").read_text().splitlines()]
    assert any(a["action"] == "cut" for a in log)
    assert all(lk["up"] for lk in _status(labdir)["links"])
    report = json.loads(relaynet("lab", "check", "--dir", str(labdir), "--wait", "60", "--json",
                                 check_rc=False).stdout)
    assert report["messages"] >= 100 and report["lost"] == 0 and report["in_flight"] == 0, report
    tr = json.loads(relaynet("lab", "trace", "--dir", str(labdir), "--json").stdout)
    assert [h["node"] for h in tr["hops"] if not h["status"].startswith("deferred")] == \
        ["client", "hop1", "hop2", "hop3"]
    relaynet("lab", "down", "--dir", str(labdir))
    assert not set(spaces) & netns.existing()


def test_netns_refusal_is_explained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where namespaces cannot be made, lab up --netns says why instead of starting anything."""
    from relaynet.lab import control
    from relaynet.lab.state import LabError

    monkeypatch.setattr(netns, "unavailable_reason", lambda: "network namespaces need root")
    with pytest.raises(LabError, match="--netns is not available here: network namespaces need root"):
        control.up(TOPOLOGIES / "chain3.toml", tmp_path / "lab", use_netns=True)
    assert not (tmp_path / "lab" / "lab.json").exists()



# -- issue 17: commands that work as printed, a stopped lab, several labs -----


def test_printed_program_is_the_one_that_ran(tmp_path: Path) -> None:
    """
    Hints name relaynet the way it was started: C{relaynet} only when PATH
    finds that same script, else its path (relative under the current
    directory), else C{python -m relaynet.cli}.
    """
    from relaynet.hints import command, program

    script = tmp_path / ".venv" / "bin" / "relaynet"
    script.parent.mkdir(parents=True)
    script.write_text("#!/bin/sh\n")
    python = str(tmp_path / ".venv" / "bin" / "python")
    assert program(".venv/bin/relaynet", python, tmp_path, lambda name: None) == ".venv/bin/relaynet"
    assert program(str(tmp_path / "relaynet" / "demo.py"), python, tmp_path,
                   lambda name: None) == ".venv/bin/relaynet"
    assert program(".venv/bin/relaynet", python, tmp_path, lambda name: str(script)) == "relaynet"
    assert program(".venv/bin/relaynet", python, tmp_path, lambda name: "/usr/bin/relaynet") == \
        ".venv/bin/relaynet"
    assert program("x", python, tmp_path / "elsewhere", lambda name: None) == str(script)
    assert program("x", "/nowhere/python", tmp_path, lambda name: None) == "/nowhere/python -m relaynet.cli"
    assert command("lab", "up", Path("/abs/with space.toml")).endswith("lab up '/abs/with space.toml'")


@pytest.mark.slow
def test_every_command_the_demo_prints_runs_as_printed(tmp_path: Path) -> None:
    """
    Every C{$ ...} line that the demo and the lab commands print (steps and
    hints) runs when pasted into a shell in the same directory; the last,
    C{lab down --clean}, leaves no lab behind.
    """
    demo = subprocess.run([sys.executable, "-m", "relaynet.demo", "-n", "5", "--keep"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    try:
        assert demo.returncode == 0, demo.stdout + demo.stderr
        printed = [ln.split("$ ", 1)[1] for ln in demo.stdout.splitlines() if ln.lstrip().startswith("$ ")]
        commands = list(dict.fromkeys(printed))
        assert any(" lab up " in c for c in commands) and any(" lab down " in c for c in commands)
        assert not any(c.startswith("relaynet ") for c in commands), commands  # not on PATH here
        downs = [c for c in commands if " lab down " in c]
        for c in [c for c in commands if c not in downs] + downs:
            res = subprocess.run(c, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                                 stdin=subprocess.DEVNULL)
            assert res.returncode == 0 and "Traceback" not in res.stderr, f"$ {c}\n{res.stdout}{res.stderr}"
        assert not (tmp_path / "var" / "lab" / "chain3").exists()
    finally:
        if (tmp_path / "var" / "lab" / "chain3" / "lab.json").exists():
            relaynet("lab", "down", "--dir", str(tmp_path / "var" / "lab" / "chain3"), check_rc=False)


@pytest.mark.slow
def test_stopped_lab_says_how_to_start_it_and_comes_back_in_either_mode(lab_dirs: Any) -> None:
    """
    C{lab send} to a stopped lab says, in one line, that it is down and the
    command that starts it; that command works and says every node was down
    (not "partly"); a stopped lab can come back with or without --netns.
    """
    labdir = lab_dirs("chain3")
    relaynet("lab", "up", str(TOPOLOGIES / "chain3.toml"), "--dir", str(labdir))
    relaynet("lab", "down", "--dir", str(labdir))
    res = relaynet("lab", "send", "--dir", str(labdir), "-n", "3", check_rc=False)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and len(lines) == 1, res.stderr
    assert lines[0].startswith("relaynet lab: lab chain3 is down: start it with: "), lines
    again = subprocess.run(lines[0].split("start it with: ", 1)[1], shell=True, capture_output=True,
                           text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert again.returncode == 0, again.stderr
    assert "was down: started every node again" in again.stdout and "partly" not in again.stdout
    relaynet("lab", "down", "--dir", str(labdir))
    if netns.unavailable_reason() is None:
        up = relaynet("lab", "up", str(TOPOLOGIES / "chain3.toml"), "--dir", str(labdir), "--netns")
        assert all(n["netns"] and n["running"] for n in _status(labdir)["nodes"]), up.stdout + up.stderr
        relaynet("lab", "down", "--dir", str(labdir))
        relaynet("lab", "up", str(TOPOLOGIES / "chain3.toml"), "--dir", str(labdir))
        assert all(not n["netns"] and n["running"] for n in _status(labdir)["nodes"])
        relaynet("lab", "down", "--dir", str(labdir))


def _fake_lab(base: Path, name: str, nodes: dict[str, dict[str, Any]]) -> Path:
    from relaynet.lab.state import Lab

    lab = Lab(base / "var" / "lab" / name)
    lab.data = {"name": name, "topology": str(TOPOLOGIES / f"{name}.toml"), "nodes": nodes}
    lab.save()
    return lab.dir


def test_several_labs_pick_the_running_one_or_name_both_ways(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """
    With several labs under ./var/lab and no --dir, commands use the one
    running; with none (or two) running they name --lab and --dir.
    """
    from relaynet.lab import control
    from relaynet.lab.state import Lab, LabError

    monkeypatch.chdir(tmp_path)
    rec = {"address": "127.0.0.2", "ports": [2525], "config": "x", "events": "e", "spool": "s"}
    _fake_lab(tmp_path, "chain3", {"a": dict(rec)})
    _fake_lab(tmp_path, "star", {"b": dict(rec)})
    with pytest.raises(LabError, match=r"several labs .*chain3, star; none running.*--lab NAME.*--dir DIR"):
        control.open_lab(None)
    monkeypatch.setattr(Lab, "alive", lambda self, name: self.name == "star")
    said: list[str] = []
    assert control.open_lab(None, say=said.append).name == "star"
    assert said and "star" in said[0]


def test_send_names_the_port_it_submits_to(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """C{lab send --port submission} says it submits to the submission port, not the relay port."""
    from relaynet.cli import main
    from relaynet.lab import cli as labcli
    from relaynet.lab.state import Lab
    from relaynet.lab.traffic import SendSummary

    rec = {"address": "127.0.0.2", "ports": [2525, 2587], "modes": ["relay", "submission"], "config": "x",
           "events": str(tmp_path / "e"), "spool": "s"}
    d = _fake_lab(tmp_path, "intra-org", {"eng": dict(rec), "sales": {**rec, "ports": [2525],
                                                                       "modes": ["relay"]}})
    used: list[int] = []

    def fake_send(lab: Any, params: Any, progress: bool, port_mode: str = "relay", **kw: Any) -> SendSummary:
        used.append(labcli._port_index(lab, params["entry"], port_mode))
        return SendSummary(run="r", requested=1, accepted=1)

    monkeypatch.setattr(Lab, "alive", lambda self, name: True)
    monkeypatch.setattr(labcli, "run_send", fake_send)
    assert main(["lab", "send", "--dir", str(d), "--from", "eng", "--port", "submission", "--to", "x@y.test",
                 "-n", "1", "--no-progress"]) == 0
    assert "eng (127.0.0.2:2587)" in capsys.readouterr().err and used == [1]
    assert main(["lab", "send", "--dir", str(d), "--from", "eng", "--from", "sales", "--port", "submission",
                 "--to", "x@y.test", "-n", "1"]) == 1
    assert "node sales has no submission listener" in capsys.readouterr().err


def test_check_reads_a_stopped_power_fs_node_from_its_backing_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """
    A --power-fs lab that is down has its queues in NAME/spool.backing (the
    powerfs is unmounted, the spool directory empty): lab check and lab
    status read them there, so held mail is in flight, not lost.
    """
    from relaynet.cli import main

    d = _check_lab(tmp_path, ["<held@x>"], {"a"}, monkeypatch)
    state = json.loads((d / "lab.json").read_text())
    backing = tmp_path / "a" / "spool.backing"
    state["nodes"]["a"]["powerfs"] = {"backing": str(backing), "mount": state["nodes"]["a"]["spool"],
                                      "control": "x", "log": "x", "pid": None}
    (d / "lab.json").write_text(json.dumps(state))
    (tmp_path / "a" / "spool").mkdir(parents=True)
    _queue_file(backing, "Q1", "<held@x>", {"u@c.test": "deferred"})
    assert main(["lab", "check", "--dir", str(d)]) == 1
    assert _last_line(capsys.readouterr().out) == "FAIL: 1 in flight (held by stopped a)"


FAKE_NODE = """
import subprocess, sys, time
helper = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdin=subprocess.PIPE)
print(helper.pid, flush=True)
time.sleep(60)
"""

# A commit process's way out: it ignores SIGTERM, ends at the end of its
# input (its node is gone), and cleans up for a moment first.
FAKE_HELPER = """
import signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
sys.stdin.buffer.read()
time.sleep(0.3)
open(sys.argv[1], "w").close()
"""


def test_stopping_a_node_waits_for_its_helper_processes(tmp_path: Path) -> None:
    """
    C{lab down} (L{procs.stop}) returns once the node's helper processes
    (its commit processes) are gone too, not only its own: one that was
    still cleaning up made C{lab down --clean} fail with C{ENOENT} in the
    directory it was removing.
    """
    from relaynet.lab import procs

    config = str(tmp_path / "node.toml")
    done = tmp_path / "helper-done"
    helper_code = FAKE_HELPER.replace("sys.argv[1]", repr(str(done)))
    node = subprocess.Popen([sys.executable, "-c", FAKE_NODE, helper_code, "--config", config],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert node.stdout is not None
        helper = int(node.stdout.readline())
        rec = {"name": "n1", "config": config, "pid": node.pid, "dir": str(tmp_path)}
        assert node_alive(node.pid, config)
        assert procs.stop(rec) == "stopped"
        assert done.exists()  # the helper had finished ...
        assert pid_state(helper) in (None, "Z", "X")  # ... and is gone
    finally:
        node.kill()
        node.wait(10)


def test_check_reads_every_shard_queue_of_a_node_with_workers(tmp_path: Path) -> None:
    """
    A node with workers keeps a queue per shard (queue/, queue.1/, ...): a
    message queued in any of them is in flight, not lost (the soak's drain
    used to read queue/ alone and called a message deferred in queue.1 lost).
    """
    spool = tmp_path / "spool"
    for shard, mid in (("queue", "<zero@x>"), ("queue.1", "<one@x>"), ("queue.12", "<twelve@x>")):
        (spool / shard / "new").mkdir(parents=True)
        (spool / shard / "new" / "Q").write_bytes(
            b"RELAYNET-QUEUE 1 ".ljust(48, b"0")[:47] + b"\n" + b'{"version":1}' + b"\n"
            + f"Received: x\r\nMessage-ID: {mid}\r\n\r\nbody\r\n".encode())
    (spool / "queue.1.lock").write_bytes(b"")  # a shard's lock file is no queue
    (tmp_path / "mail").mkdir()
    ev = check.collect({"n": {"mailroot": str(tmp_path / "mail"), "spool": str(spool)}})
    mids = ("<zero@x>", "<one@x>", "<twelve@x>")
    sent = [{"message_id": m, "recipients": ["u@c.test"], "start": 0.0} for m in mids]
    report = check.verify(sent, ev)
    assert sorted(report.in_flight) == sorted((m, "u@c.test") for m in mids)
    assert report.lost == []
    assert queue_counts(spool)["active"] == 3  # lab status counts every shard too
