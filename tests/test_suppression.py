"""
Bounce classification (L{relaynet.queue.classify}) and the suppression list
(L{relaynet.queue.suppression}): the pure classifier, the store on disk, a
bounce in an in-process network suppressing its recipient, the admin API and
C{relaynet suppress} against a node process, and the metrics.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
from twisted.internet.defer import Deferred

from relaynet.config import ConfigError, TableReader
from relaynet.queue.classify import CLASSES, BounceClass, Classifier, classify
from relaynet.queue.suppression import (
    BOUNCE_CLASSES, Suppression, classifier_for, SuppressionList, SuppressionSettings, describe_suppression, export_csv, export_jsonl,
    parse_import, parse_suppression, read_file,
)
from relaynet.testing.network import NetNode, Network

C = BounceClass


# -- the classifier ---------------------------------------------------------------

CASES: list[tuple[str, int, str, BounceClass]] = [
    # invalid recipient
    ("5.1.1", 550, "5.1.1 <x@y.test>: Recipient address rejected: User unknown in local recipient table",
     C.INVALID_RECIPIENT),
    ("5.1.10", 0, "Domain y.test does not accept mail (nullMX)", C.INVALID_RECIPIENT),
    ("5.1.1", 550, "The email account that you tried to reach does not exist. blocked", C.INVALID_RECIPIENT),
    ("5.2.1", 550, "The email account that you tried to reach is disabled.", C.INVALID_RECIPIENT),
    ("5.0.0", 550, "No such user here", C.INVALID_RECIPIENT),
    ("", 550, "user unknown", C.INVALID_RECIPIENT),
    # mailbox full
    ("5.2.2", 552, "Mailbox full", C.MAILBOX_FULL),
    ("4.2.2", 452, "The email account that you tried to reach is over quota, try again later", C.MAILBOX_FULL),
    ("4.0.0", 452, "insufficient system storage", C.MAILBOX_FULL),
    # policy / spam
    ("5.7.1", 550, "Message rejected as spam by Content Filtering.", C.POLICY),
    ("5.7.26", 550, "Unauthenticated email from x.test is not accepted due to domain's DMARC policy",
     C.POLICY),
    ("5.7.1", 554, "Relay access denied", C.POLICY),
    ("5.7.0", 550, "Refused", C.POLICY),
    # reputation
    ("5.7.1", 554, "Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org", C.REPUTATION),
    ("5.7.606", 550, "Access denied, banned sending IP [192.0.2.1]", C.REPUTATION),
    ("", 554, "Your IP is listed on a blocklist", C.REPUTATION),
    ("4.7.0", 421, "Our system has detected an unusual rate of mail; IP reputation", C.REPUTATION),
    # DNS / network
    ("4.4.3", 0, "DNS lookup of dest.test failed: SERVFAIL", C.DNS),
    ("5.1.2", 0, "Domain nowhere.test does not exist", C.DNS),
    ("4.4.1", 0, "delivery temporarily suspended: connection refused", C.DNS),
    ("", 0, "Host not found", C.DNS),
    # TLS
    ("4.7.5", 0, "TLS with mx.x.test (127.0.0.1:25) failed (DANE): certificate mismatch", C.TLS),
    ("4.7.4", 0, "TLS is required, but was not offered by 127.0.0.1:25", C.TLS),
    ("", 454, "STARTTLS not available", C.TLS),
    # content
    ("5.6.3", 554, "8-bit message not sent", C.CONTENT),
    ("5.3.4", 552, "message size 900000 exceeds the limit 100 of hop", C.CONTENT),
    ("5.7.1", 554, "Virus found in the message", C.CONTENT),
    # rate limit
    ("4.7.28", 421, "Our system has detected an unusual rate of unsolicited mail", C.RATE_LIMIT),
    ("4.2.1", 450, "The user you are trying to contact is receiving mail at a rate that prevents", C.RATE_LIMIT),
    ("4.7.0", 421, "Too many connections from your IP, try again later", C.RATE_LIMIT),
    ("4.5.3", 452, "Error: too many recipients", C.RATE_LIMIT),
    ("", 450, "Rate limit exceeded", C.RATE_LIMIT),
    # other
    ("4.3.0", 0, "internal error: the attempt gave no outcome for this recipient", C.OTHER),
    ("5.0.0", 0, "message returned by the administrator", C.OTHER),
    ("", 0, "", C.OTHER),
]


@pytest.mark.parametrize(("dsn", "code", "text", "expected"), CASES,
                         ids=[f"{e.value}:{d or '-'}:{t[:24]}" for d, _, t, e in CASES])
def test_classify(dsn: str, code: int, text: str, expected: BounceClass) -> None:
    """Each failure gets its class from the enhanced code, the provider's text, then the code's subject."""
    assert classify(dsn, code, text) is expected


def test_every_class_has_a_case() -> None:
    """The table covers every class; the configuration knows the same classes."""
    assert {e.value for *_, e in CASES} == set(CLASSES)
    assert BOUNCE_CLASSES == CLASSES


def test_configured_patterns_come_first() -> None:
    """A configured pattern overrides even a code that otherwise decides (5.1.1)."""
    c = Classifier.from_patterns({"reputation": [r"listed at rbl\.example"], "rate-limit": ["slow please"]})
    assert c("5.1.1", 550, "user unknown; listed at rbl.example") is C.REPUTATION
    assert c("5.1.1", 550, "user unknown") is C.INVALID_RECIPIENT
    assert c("4.0.0", 451, "SLOW PLEASE") is C.RATE_LIMIT
    with pytest.raises(ValueError, match="not a bounce class"):
        Classifier.from_patterns({"nonsense": ["x"]})
    with pytest.raises(ValueError, match="not a regular expression"):
        Classifier.from_patterns({"dns": ["("]})


def test_a_classifier_remembers_classes_within_a_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    A classifier classifies one outcome's words once (a next hop known down
    defers all its mail with one diagnostic): the same class, from its
    memory, which is emptied when full, so it stays bounded.
    """
    import relaynet.queue.classify as module

    calls: list[str] = []

    def counting(dsn: str, code: int = 0, text: str = "", patterns: Any = ()) -> BounceClass:
        calls.append(text)
        return classify(dsn, code, text, patterns)

    monkeypatch.setattr(module, "classify", counting)
    c = Classifier.from_patterns({"rate-limit": ["slow please"]})
    down = "delivery temporarily suspended: connect to 192.0.2.1:25 failed: Connection refused"
    assert [c("4.4.1", 0, down) for _ in range(3)] == [classify("4.4.1", 0, down)] * 3
    assert c("4.0.0", 451, "slow please") is C.RATE_LIMIT
    assert calls == [down, "slow please"]
    for i in range(Classifier.MEMO_SIZE + 10):
        c("5.1.1", 550, f"user {i} unknown")
    assert len(c._memo) <= Classifier.MEMO_SIZE
    assert c == Classifier.from_patterns({"rate-limit": ["slow please"]})  # the memory is not compared


# -- the [suppression] table -------------------------------------------------------------


def test_settings_defaults_and_parsing() -> None:
    """No table: the defaults; a table is read, checked and described as TOML that reads back the same."""
    assert parse_suppression(TableReader("f.toml", "suppression", {})) == SuppressionSettings()
    data = {"enabled": False, "expiry_days": 30, "classes": ["invalid-recipient", "mailbox-full"],
            "patterns": {"reputation": ["listed at x"], "dns": ["nope"]}}
    s = parse_suppression(TableReader("f.toml", "suppression", data))
    assert s == SuppressionSettings(False, 30.0, ("invalid-recipient", "mailbox-full"),
                                    (("reputation", "listed at x"), ("dns", "nope")))
    assert classifier_for(s)("5.1.1", 550, "listed at x") is C.REPUTATION
    import tomllib
    text = "\n".join(describe_suppression(s))
    assert parse_suppression(TableReader("f.toml", "suppression", tomllib.loads(text)["suppression"])) == s
    for bad, key in (({"classes": ["x"]}, "suppression.classes[0]"), ({"expiry_days": -1}, "suppression.expiry_days"),
                     ({"patterns": {"dns": ["("]}}, "suppression.patterns.dns[0]"),
                     ({"patterns": {"bad": []}}, "suppression.patterns.bad"), ({"oops": 1}, "suppression.oops")):
        with pytest.raises(ConfigError) as e:
            parse_suppression(TableReader("f.toml", "suppression", bad))
        assert key in str(e.value)


# -- the store -----------------------------------------------------------------------


class Clock:
    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_store_persists_and_reloads(tmp_path: Path) -> None:
    """Adds and removes reach the file; a new list over it has the same entries (case-insensitive)."""
    clock = Clock()
    path = tmp_path / "suppression.jsonl"
    s = SuppressionList(path, now=clock)
    s.load_now()
    e = s.add("Bad@Example.TEST", reason="5.1.1 user unknown", source="bounce")
    assert e.address == "bad@example.test" and e.expires == clock.t + 365 * 86400
    s.add("gone@example.test", expires_days=0)
    s.add("other@example.test", kind="mailbox-full")
    assert s.remove("<GONE@example.test>") and not s.remove("never@example.test")
    assert s.is_suppressed("bad@EXAMPLE.test") and not s.is_suppressed("gone@example.test")
    assert s.flushed().called
    again = SuppressionList(path, now=clock)
    assert again.load_now() == 2
    assert again.get("bad@example.test") == e
    assert [x.address for x in again.entries()] == ["bad@example.test", "other@example.test"]
    assert again.counts() == {"bounce": 1, "admin": 1, "import": 0}


def test_store_expiry(tmp_path: Path) -> None:
    """An entry stops suppressing when it expires; 0 days: for ever; expired entries go at compaction."""
    clock = Clock()
    path = tmp_path / "s.jsonl"
    s = SuppressionList(path, now=clock, expiry_days=10)
    s.add("a@x.test")
    s.add("b@x.test", expires_days=0)
    s.add("c@x.test", expires_days=1)
    clock.t += 2 * 86400
    assert not s.is_suppressed("c@x.test") and s.is_suppressed("a@x.test")
    clock.t += 9 * 86400
    assert [e.address for e in s.entries()] == ["b@x.test"]
    assert s.get("b@x.test") is not None and s.get("b@x.test").expires is None  # type: ignore[union-attr]
    assert s.compact().called
    entries, lines = read_file(path)
    assert list(entries) == ["b@x.test"] and lines == 1


def test_store_compacts(tmp_path: Path) -> None:
    """Churn beyond the slack rewrites the file with the live entries only; the list reads back the same."""
    path = tmp_path / "s.jsonl"
    s = SuppressionList(path, now=Clock(), compact_slack=10)
    for i in range(30):
        s.add(f"u{i % 3}@x.test", reason=str(i))
    s.remove("u2@x.test")
    _, lines = read_file(path)
    assert lines <= 2 + 10 + 1
    again = SuppressionList(path, now=Clock())
    again.load_now()
    assert {e.address: e.reason for e in again.entries()} == {"u0@x.test": "27", "u1@x.test": "28"}


def test_store_writes_in_order_off_the_caller(tmp_path: Path) -> None:
    """
    Writes run through C{run_in_thread} one at a time, in order; changes made
    while one runs go in the next; C{flushed} fires when all are written.
    """
    path = tmp_path / "s.jsonl"
    jobs: list[tuple[Callable[[], Any], Deferred[Any]]] = []

    def later(work: Callable[[], Any]) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        jobs.append((work, d))
        return d

    def run_one() -> None:
        work, d = jobs.pop(0)
        d.callback(work())

    s = SuppressionList(path, now=Clock(), run_in_thread=later)
    s.add("a@x.test")
    s.add("b@x.test")
    done = s.flushed()
    assert len(jobs) == 1 and not path.exists() and s.is_suppressed("b@x.test")
    run_one()  # a; b waited for it
    assert len(jobs) == 1 and not done.called and list(read_file(path)[0]) == ["a@x.test"]
    run_one()  # b
    assert not jobs and getattr(done, "called")  # (getattr: mypy narrowed done.called to False above)
    s.add("c@x.test")
    s.remove("a@x.test")
    s.add("d@x.test")
    assert len(jobs) == 1
    run_one()
    run_one()  # the remove and d, together
    assert not jobs
    assert sorted(read_file(path)[0]) == ["b@x.test", "c@x.test", "d@x.test"]


def test_store_load_keeps_changes_made_while_loading(tmp_path: Path) -> None:
    """Entries added or removed while the file is read win over the file's."""
    path = tmp_path / "s.jsonl"
    first = SuppressionList(path, now=Clock())
    first.add("old@x.test")
    first.add("keep@x.test")
    jobs: list[tuple[Callable[[], Any], Deferred[Any]]] = []

    def later(work: Callable[[], Any]) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        jobs.append((work, d))
        return d

    s = SuppressionList(path, now=Clock(), run_in_thread=later)
    loaded = s.load()
    s.add("new@x.test")
    s.remove("old@x.test")
    work, d = jobs.pop(0)
    d.callback(work())
    assert loaded.called
    assert [e.address for e in s.entries()] == ["keep@x.test", "new@x.test"]
    while jobs:
        work, d = jobs.pop(0)
        d.callback(work())
    assert sorted(read_file(path)[0]) == ["keep@x.test", "new@x.test"]


def test_store_skips_a_torn_line(tmp_path: Path) -> None:
    """A line cut short by a crash (or garbage) is skipped, the rest read."""
    path = tmp_path / "s.jsonl"
    s = SuppressionList(path, now=Clock())
    s.add("a@x.test")
    with path.open("a") as f:
        f.write('{"v":1,"op":"add","address":"b@x')
    entries, lines = read_file(path)
    assert list(entries) == ["a@x.test"] and lines == 2


def test_import_formats() -> None:
    """Imports read JSON lines, CSV with a header, or one address per line; errors name the line."""
    now = 1000.0
    jl = '{"address":"A@x.test","reason":"r"}\n# comment\n\n{"address":"b@x.test","expires":null,"class":"policy"}\n'
    got = list(parse_import(jl, now, 5000.0))
    assert got == [Suppression("a@x.test", "r", "invalid-recipient", now, 5000.0, "import"),
                   Suppression("b@x.test", "", "policy", now, None, "import")]
    csv_text = "address,reason,expires\nc@x.test,\"a, b\",\nd@x.test,,7000\n"
    assert [(e.address, e.reason, e.expires) for e in parse_import(csv_text, now, 5000.0)] == [
        ("c@x.test", "a, b", 5000.0), ("d@x.test", "", 7000.0)]
    assert [e.address for e in parse_import("e@x.test\nf@x.test\n", now, None)] == ["e@x.test", "f@x.test"]
    with pytest.raises(ValueError, match="line 2"):
        list(parse_import("g@x.test\nnot an address\n", now, None))
    with pytest.raises(ValueError, match="unknown column"):
        list(parse_import("address,colour\n", now, None))
    entries = [e.to_json() for e in parse_import(jl, now, 5000.0)]
    assert list(parse_import(export_jsonl(entries), 0, None)) == list(parse_import(jl, now, 5000.0))
    back = list(parse_import(export_csv(entries), 0, None))
    assert [e.to_json() for e in back] == entries


# -- through the in-process network ---------------------------------------------------------


def _wire(node: NetNode) -> None:
    """The node's intake reads its runner's suppression list, as RelayNode wires them."""
    node.intake.suppression = node.runner.suppression


def test_hard_bounce_suppresses_the_recipient() -> None:
    """
    The next hop answers 550 5.1.1 for one recipient: its bounced event has
    class invalid-recipient, the address is suppressed (source bounce), a
    second message to it is refused at RCPT with 550 5.1.1 and a suppressed
    event, and the other recipients of both messages are delivered.
    """
    net = Network()
    edge = net.add_node("edge", local_domains=["src.test"],
                        routes=[{"domains": ["dest.test"], "action": "relay", "next_hops": [net.endpoint("mx")]}],
                        suppression={"enabled": True})
    mx = net.add_node("mx", local_domains=["dest.test"], users=["known", "other"])
    _wire(edge)
    replies = edge.submit("sender@src.test", ["known@dest.test", "Unknown@dest.test"], b"Subject: 1\r\n\r\nx\r\n")
    assert [c for c, _ in replies][-3:] == [354, 250, 221], replies
    net.run()
    (bounced,) = edge.events_named("bounced")
    assert bounced["recipient"] == "Unknown@dest.test" and bounced["class"] == "invalid-recipient"
    entry = edge.runner.suppression.get("unknown@dest.test")
    assert entry is not None and entry.source == "bounce" and entry.kind == "invalid-recipient"
    assert entry.reason.startswith("5.1.1 ")
    (added,) = edge.events_named("suppression_added")
    assert added["recipient"] == "unknown@dest.test"

    replies = edge.submit("sender@src.test", ["unknown@dest.test", "other@dest.test"], b"Subject: 2\r\n\r\ny\r\n")
    net.run()
    refused = [(c, t) for c, t in replies if c == 550]
    assert len(refused) == 1 and refused[0][1].startswith("5.1.1 <unknown@dest.test>: recipient suppressed")
    (sup,) = edge.events_named("suppressed")
    assert sup["recipient"] == "unknown@dest.test" and sup["dsn"] == "5.1.1" and sup["class"] == "invalid-recipient"
    assert sorted(m.mailbox for m in mx.mailboxes.mail) == ["known@dest.test", "other@dest.test"]
    assert len(edge.events_named("bounced")) == 1
    # Only the suppressed address: the known one was never added.
    assert [e.address for e in edge.runner.suppression.entries()] == ["unknown@dest.test"]


def test_deferral_has_a_class_and_suppresses_nothing() -> None:
    """A transient failure (the next hop is down) is classified and suppresses nobody."""
    net = Network()
    edge = net.add_node("edge", routes=[{"domains": ["dest.test"], "action": "relay",
                                         "next_hops": [net.endpoint("nobody")]}])
    _wire(edge)
    edge.submit("sender@src.test", ["a@dest.test"], b"Subject: 1\r\n\r\nx\r\n")
    net.run()
    (deferred,) = edge.events_named("deferred")
    assert deferred["class"] == "dns", deferred
    assert len(edge.runner.suppression) == 0


def test_suppression_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    """With [suppression] enabled = false nothing is added by bounces and nothing is refused."""
    off = SuppressionSettings(enabled=False)
    monkeypatch.setattr("relaynet.runner.suppression_settings", lambda config: off)
    monkeypatch.setattr("relaynet.intake.server.suppression_settings", lambda config: off)
    net = Network()
    edge = net.add_node("edge", routes=[{"domains": ["dest.test"], "action": "relay",
                                         "next_hops": [net.endpoint("mx")]}])
    net.add_node("mx", local_domains=["dest.test"], users=["known"])
    _wire(edge)
    edge.runner.suppression.add("known@dest.test")
    replies = edge.submit("s@src.test", ["known@dest.test", "unknown@dest.test"], b"Subject: 1\r\n\r\nx\r\n")
    net.run()
    assert not [c for c, _ in replies if c == 550], replies
    (bounced,) = edge.events_named("bounced")
    assert bounced["class"] == "invalid-recipient" and not edge.events_named("suppression_added")
    assert not edge.runner.suppression.is_suppressed("unknown@dest.test")


# -- the admin API and relaynet suppress against a node process ----------------------------


def suppress(node: Any, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """C{relaynet suppress --config NODE ARGS}."""
    from harness.nodeproc import relaynet_command

    return subprocess.run([*relaynet_command(), "suppress", "--config", str(node.config_path), *args],
                          capture_output=True, text=True, timeout=60, input=stdin)


def test_suppress_command_against_a_node(tmp_path: Path) -> None:
    """
    list, add, remove, import and export through the admin API of a running
    node; changes apply at once and reach C{<spool>/suppression.jsonl};
    errors are one line with a non-zero exit; the list's size is a metric.
    """
    import smtplib

    from harness.nodeproc import HOST, NodeProcess

    with NodeProcess(tmp_path / "node", name="suppress") as node:
        r = suppress(node, "list")
        assert r.returncode == 0 and "empty" in r.stdout, r
        r = suppress(node, "add", "Bad@Example.test", "--reason", "complained", "--expires", "0")
        assert r.returncode == 0 and "bad@example.test suppressed, expires never" in r.stdout, r
        r = suppress(node, "list", "--json")
        listed = json.loads(r.stdout)
        assert listed["count"] == 1 and listed["entries"][0]["reason"] == "complained"
        assert listed["entries"][0]["source"] == "admin" and listed["entries"][0]["expires"] is None

        imports = tmp_path / "in.csv"
        imports.write_text("address,reason\none@example.test,old list\ntwo@example.test,\n")
        r = suppress(node, "import", str(imports))
        assert r.returncode == 0 and "2 address(es) imported" in r.stdout, r
        r = suppress(node, "import", "-", stdin='{"address":"three@example.test","class":"policy"}\n')
        assert r.returncode == 0, r
        r = suppress(node, "list")
        assert [line.split()[0] for line in r.stdout.splitlines()[1:-1]] == [
            "bad@example.test", "one@example.test", "three@example.test", "two@example.test"]

        r = suppress(node, "remove", "one@example.test")
        assert r.returncode == 0 and "one@example.test removed" in r.stdout, r
        r = suppress(node, "remove", "one@example.test")
        assert r.returncode == 1 and r.stderr.strip() == "relaynet: one@example.test is not suppressed", r
        bad = tmp_path / "bad.csv"
        bad.write_text("address\nnot an address\n")
        r = suppress(node, "import", str(bad))
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "line 2" in r.stderr, r
        r = suppress(node, "add", "x@example.test", "--expires", "soon")
        assert r.returncode == 2, r

        out = tmp_path / "out.jsonl"
        r = suppress(node, "export", str(out), "--format", "jsonl")
        assert r.returncode == 0, r
        exported = [json.loads(line) for line in out.read_text().splitlines()]
        assert [e["address"] for e in exported] == ["bad@example.test", "three@example.test", "two@example.test"]
        r = suppress(node, "export")
        assert r.stdout.splitlines()[0] == "address,reason,class,time,expires,source"
        assert len(r.stdout.splitlines()) == 4

        entries, _ = read_file(node.spool / "suppression.jsonl")
        assert sorted(entries) == ["bad@example.test", "three@example.test", "two@example.test"]
        metrics = _metrics(node)
        assert "relaynet_suppression_entries" in metrics

    node_dead = suppress(node, "list")
    assert node_dead.returncode == 3 and len(node_dead.stderr.strip().splitlines()) == 1


def _metrics(node: Any) -> str:
    from relaynet.admin.queuecli import AdminClient

    return AdminClient(node.config.admin_endpoint).get_text("/metrics")


# -- metrics and the status page ------------------------------------------------------------


def test_bounce_metrics_and_list_health() -> None:
    """
    Bounces count by class, per sending domain and per destination domain
    (bounded label sets: later domains are "other"); refusals of suppressed
    recipients and additions by bounces count; the status page shows the
    list health with bounce rates.
    """
    from prometheus_client.parser import text_string_to_metric_families
    from twisted.internet.task import Clock as TClock

    from relaynet.admin.api import _health_section
    from relaynet.admin.metrics import NodeMetrics

    class Queue:
        def counts(self) -> dict[str, int]:
            return {"incoming": 0, "active": 0, "deferred": 0, "hold": 0}

        def totals(self) -> Any:
            from relaynet.admin.views import QueueTotals
            return QueueTotals()

    class Sessions:
        def count(self) -> int:
            return 0

        def by_mode_and_tls(self) -> dict[tuple[str, bool], int]:
            return {}

    m = NodeMetrics(Queue(), Sessions(), TClock(), domain_labels=2, suppression=lambda: {"bounce": 3, "admin": 1})
    for sender, rcpt, kind, klass in [
        ("a@shop.test", "x@gmail.test", "sent", None),
        ("a@shop.test", "y@gmail.test", "bounced", "invalid-recipient"),
        ("a@shop.test", "z@yahoo.test", "bounced", "reputation"),
        ("b@news.test", "z@yahoo.test", "expired", "dns"),
        ("c@third.test", "w@third.test", "bounced", "policy"),
        ("a@shop.test", "q@gmail.test", "deferred", "rate-limit"),
    ]:
        m.observe({"event": kind, "sender": sender, "recipient": rcpt, "class": klass, "relay": "mx:25"})
    m.observe({"event": "suppressed", "stage": "RCPT", "recipient": "y@gmail.test", "class": "invalid-recipient"})
    m.observe({"event": "suppression_added", "recipient": "y@gmail.test", "class": "invalid-recipient"})
    got = {}
    for family in text_string_to_metric_families(m.exposition().decode()):
        for s in family.samples:
            got[(s.name, tuple(sorted(s.labels.items())))] = s.value
    assert got[("relaynet_sender_domain_bounces_total", (("class", "invalid-recipient"), ("domain", "shop.test")))] == 1
    assert got[("relaynet_sender_domain_bounces_total", (("class", "dns"), ("domain", "news.test")))] == 1
    assert got[("relaynet_sender_domain_bounces_total", (("class", "policy"), ("domain", "other")))] == 1
    assert got[("relaynet_destination_bounces_total", (("class", "reputation"), ("domain", "yahoo.test")))] == 1
    assert got[("relaynet_destination_bounces_total", (("class", "policy"), ("domain", "other")))] == 1
    assert got[("relaynet_sender_domain_deliveries_total", (("domain", "shop.test"), ("result", "sent")))] == 1
    assert got[("relaynet_failures_total", (("class", "rate-limit"), ("result", "deferred")))] == 1
    assert got[("relaynet_suppressed_recipients_total", (("stage", "RCPT"),))] == 1
    assert got[("relaynet_suppression_added_total", (("class", "invalid-recipient"),))] == 1
    assert got[("relaynet_suppression_entries", (("source", "bounce"),))] == 3

    shop = {h.domain: h for h in m.health.top("sender")}["shop.test"]
    assert (shop.delivered, shop.bounced, round(shop.bounce_rate, 3)) == (1, 2, 0.667)
    assert shop.classes == {"invalid-recipient": 1, "reputation": 1}
    assert [h.domain for h in m.health.top("destination")] == ["yahoo.test", "gmail.test", "other"]
    html = _health_section(m.health, {"bounce": 3, "admin": 1})
    assert "List health" in html and "shop.test" in html and "66.7%" in html
    assert "suppression list: 4 address(es) (admin 1, bounce 3)" in html


def test_admin_api_suppression(tmp_path: Path) -> None:
    """
    The admin API over a runner's list, in process: add (checked fields),
    show, list, import (each entry checked, naming its index), remove; the
    list is on disk when the answer comes.
    """
    from twisted.web.test.requesthelper import DummyRequest

    from relaynet.admin.api import AdminAPI, AdminViews

    sup = SuppressionList(tmp_path / "s.jsonl", now=Clock())

    class Views:
        queue = type("Q", (), {"suppression": sup})()

    api = AdminAPI(AdminViews(queue=Views.queue, sessions=None, node=None, metrics=None))  # type: ignore[arg-type]

    def call(method: str, path: str, body: Any = None) -> tuple[int, Any]:
        req = DummyRequest([p.encode() for p in path.split("/")])
        req.method = method.encode()
        if body is not None:
            import io
            req.requestHeaders.setRawHeaders(b"content-type", [b"application/json"])
            req.content = io.BytesIO(json.dumps(body).encode())  # type: ignore[attr-defined]
        api.render(req)  # type: ignore[arg-type]
        return req.responseCode or 200, json.loads(b"".join(req.written))

    assert call("POST", "suppression", {"address": "A@x.test", "reason": "r", "expires_days": 2})[0] == 200
    assert read_file(tmp_path / "s.jsonl")[0]["a@x.test"].reason == "r"
    code, e = call("GET", "suppression/a%40X.test")
    assert code == 200 and e["address"] == "a@x.test" and e["source"] == "admin"
    assert call("POST", "suppression", {"address": "nope"}) == (400, {"error": "address: must be an address, local@domain"})
    assert call("POST", "suppression", {"address": "b@x.test", "class": "bad"})[0] == 400
    assert call("POST", "suppression", {"address": "b@x.test", "expires_days": -1})[0] == 400
    code, r = call("POST", "suppression/import", {"entries": [{"address": "b@x.test"}, {"address": 3}]})
    assert code == 400 and r["error"].startswith("entries[1]:")
    assert call("POST", "suppression/import", {"entries": [{"address": "b@x.test"}, {"address": "c@x.test"}]}) == (
        200, {"imported": 2, "count": 3})
    code, listed = call("GET", "suppression")
    assert [e["address"] for e in listed["entries"]] == ["a@x.test", "b@x.test", "c@x.test"]
    assert listed["by_source"] == {"bounce": 0, "admin": 1, "import": 2}
    assert call("DELETE", "suppression/b@x.test") == (200, {"address": "b@x.test", "removed": True})
    assert call("DELETE", "suppression/b@x.test")[0] == 404
    assert call("PUT", "suppression")[0] == 405
    assert call("GET", "suppression/a/b")[0] == 404
    assert sorted(read_file(tmp_path / "s.jsonl")[0]) == ["a@x.test", "c@x.test"]


def test_store_shared_by_processes(tmp_path: Path) -> None:
    """
    Two lists over one file (the workers of a node): each sees the other's
    adds and removes after a refresh; a rewrite by one (a new file) keeps
    every process's entries and the other reads it whole; a line being
    written (no newline yet) waits for the next refresh.
    """
    path = tmp_path / "s.jsonl"
    clock = Clock()
    a = SuppressionList(path, now=clock)
    b = SuppressionList(path, now=clock)
    assert a.load().called and b.load().called
    a.add("x@w.test", reason="from a")
    clock.t += 1
    b.add("y@w.test")
    assert b.refresh().result == 2 and b.get("x@w.test").reason == "from a"  # type: ignore[union-attr]
    clock.t += 1
    b.remove("x@w.test")
    a.refresh()
    assert [e.address for e in a.entries()] == ["y@w.test"]
    clock.t += 1
    a.add("z@w.test")
    inode = path.stat().st_ino
    assert a.compact().called
    assert path.stat().st_ino != inode
    clock.t += 1
    b.add("v@w.test")  # appended to the new file, under the lock
    b.refresh()
    a.refresh()
    assert [e.address for e in a.entries()] == [e.address for e in b.entries()] == ["v@w.test", "y@w.test", "z@w.test"]
    with path.open("ab") as f:
        f.write(b'{"v":1,"op":"add","address":"half@w.test"')
    a.refresh()
    assert not a.is_suppressed("half@w.test")
    with path.open("ab") as f:
        f.write(b',"time":1}\n')
    a.refresh()
    assert a.is_suppressed("half@w.test")


def test_worker_runner_refreshes_the_shared_list(tmp_path: Path) -> None:
    """
    A worker's runner (a config with a shard) reads the shared file every
    SUPPRESSION_REFRESH seconds, so another worker's entries refuse mail
    here too; the loop stops with the runner. A node without workers
    starts no loop.
    """
    import attrs
    from twisted.internet.task import Clock as TClock

    from relaynet.config import parse_config
    from relaynet.events import EventLog
    from relaynet.runner import SUPPRESSION_REFRESH, QueueRunner
    from relaynet.testing import ManualThreadPool
    from relaynet.testing.spool import MemorySpool

    reactor = TClock()
    config = parse_config({"node": {"name": "w", "spool": str(tmp_path)}, "admin": {"enabled": False}})
    path = tmp_path / "suppression.jsonl"
    other = SuppressionList(path)
    runners = []
    for shard in (None, 1):
        runner = QueueRunner(attrs.evolve(config, shard=shard), MemorySpool(), EventLog(None, "w"), reactor,
                             ManualThreadPool(immediate=True),  # type: ignore[arg-type]
                             suppression=SuppressionList(path))
        runner.startService()
        runners.append(runner)
    single, worker = runners
    assert len(reactor.getDelayedCalls()) == 1
    other.add("late@x.test")
    reactor.advance(SUPPRESSION_REFRESH)
    assert worker.suppression.is_suppressed("late@x.test")
    assert not single.suppression.is_suppressed("late@x.test")
    for runner in runners:
        runner.stopService()
    assert reactor.getDelayedCalls() == []


@pytest.mark.slow
def test_node_refuses_a_suppressed_recipient(tmp_path: Path) -> None:
    """
    A real node: an address added with relaynet suppress is refused at RCPT
    (550 5.1.1, a suppressed event in the event log) at once; the other
    recipient of the transaction is accepted and delivered; the status page
    shows the list health.
    """
    import smtplib

    from harness.nodeproc import HOST, NodeProcess, wait_for
    from relaynet.admin.queuecli import AdminClient

    with NodeProcess(tmp_path / "node", name="refuse", extra_toml="[suppression]\nenabled = true\n") as node:
        assert suppress(node, "add", "gone@localhost").returncode == 0
        with smtplib.SMTP(HOST, node.port, timeout=30) as s:
            s.ehlo("client.test")
            s.mail("sender@client.test")
            code, text = s.rcpt("Gone@localhost")
            assert code == 550 and text.startswith(b"5.1.1 <Gone@localhost>: recipient suppressed"), text
            assert s.rcpt("here@localhost")[0] == 250
            s.data(b"Subject: x\r\n\r\nbody\r\n")
        wait_for(lambda: node.maildir_new("here"), 20, "the delivery to here@localhost")
        (event,) = [e for e in node.events() if e["event"] == "suppressed"]
        assert event["recipient"] == "Gone@localhost" and event["source"] == "admin"
        page = AdminClient(node.config.admin_endpoint).get_text("/")
        assert "List health" in page and "localhost" in page
