"""
Tests for L{relaynet.admin.metrics} (the Prometheus registry, next-hop health, the
status history) and the node's log observer (L{relaynet.tap}).

Unit tests feed events to L{NodeMetrics} over fake queue and sessions views
(L{relaynet.admin.views}) and parse the exposition with C{prometheus_client}'s
own parser; the adapters of a node's parts to those views
(L{relaynet.admin.adapters}) are tested over fakes too. The slow test runs a
real node (JSON log format) with messages delivered locally, deferred to a
dead next hop, refused, held and deleted, scrapes C{/metrics} over the admin
socket and checks every family against those actions.
"""

from __future__ import annotations

import io
import json
import smtplib
import socket
from pathlib import Path
from typing import Any

import pytest
from attrs import define, field
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, LogPublisher, textFileLogObserver

from relaynet.config import LogSettings
from relaynet.events import EventLog
from relaynet.admin.adapters import IntakeSessions
from relaynet.admin.metrics import FAILING_AFTER, HopHealth, NodeMetrics
from relaynet.admin.views import QueueTotals
from relaynet.admin.queuecli import AdminClient
from relaynet.tap import NodeLogObserver

from harness.nodeproc import HOST, NodeProcess, RawClient, wait_for


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, keyed by C{(name, sorted labels)}."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    """One sample's value (0 when the series does not exist)."""
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


# -- fakes ----------------------------------------------------------------


@define
class FakeQueue:
    """A L{QueueStats}: counts by state and totals, as a test sets them."""

    states: dict[str, int] = field(factory=lambda: {"incoming": 0, "active": 0, "deferred": 0, "hold": 0})
    now: QueueTotals = field(factory=QueueTotals)

    def counts(self) -> dict[str, int]:
        return dict(self.states)

    def totals(self) -> QueueTotals:
        return self.now


@define
class FakeSessions:
    """A L{SessionsView}: open sessions by (mode, TLS), as a test sets them."""

    open: dict[tuple[str, bool], int] = field(factory=dict)

    def count(self) -> int:
        return sum(self.open.values())

    def by_mode_and_tls(self) -> dict[tuple[str, bool], int]:
        return dict(self.open)


def make(**kw: Any) -> tuple[NodeMetrics, FakeQueue, FakeSessions, Clock]:
    queue, sessions, clock = FakeQueue(), FakeSessions(), Clock()
    clock.advance(1000)
    return NodeMetrics(queue, sessions, clock, name="unit", now=clock.seconds, **kw), queue, sessions, clock


# -- unit tests -----------------------------------------------------------


def test_events_become_counters_and_histograms() -> None:
    """Received, reject and delivery events land in their families with the right labels."""
    m, _, _, _ = make()
    m.observe({"event": "received", "size": 300, "protocol": "ESMTPS", "tls": "TLSv1.3 TLS_AES_256_GCM_SHA384",
               "ack_delay": 0.004})
    m.observe({"event": "received", "size": 200, "protocol": "ESMTP", "ack_delay": 0.2})
    m.observe({"event": "reject", "stage": "RCPT", "code": 554, "dsn": "5.7.1"})
    m.observe({"event": "reject", "stage": "DATA", "code": 552, "dsn": "5.3.4"})
    m.observe({"event": "sent", "relay": "10.0.0.2:25", "recipient": "a@Example.ORG", "delay": 2.5,
               "duration": 0.75, "tls": "TLSv1.2 ECDHE",
               "tried": [{"relay": "10.0.0.9:25", "dsn": "4.4.1", "diagnostic": "refused"}]})
    m.observe({"event": "delivered", "relay": "local", "recipient": "b@localhost", "delay": 0.01})
    m.observe({"event": "deferred", "relay": "10.0.0.3:25", "recipient": "c@dead.test", "delay": 1,
               "diagnostic": "connection refused"})
    m.observe({"event": "bounced", "relay": "10.0.0.2:25", "recipient": "d@example.org", "delay": 3})
    m.observe({"event": "expired", "recipient": "e@dead.test", "delay": 432001})
    m.observe({"event": "dsn", "action": "failed"})
    for kind in ("hold", "release", "deleted", "deleted"):
        m.observe({"event": kind})
    m.observe({"event": "reload", "status": "reloaded"})
    m.observe({"event": "reload", "status": "refused"})
    m.commit_batch(3)
    m.commit_batch(1)
    text = m.exposition().decode()
    assert value(text, "relaynet_messages_received_total", protocol="ESMTPS") == 1
    assert value(text, "relaynet_messages_received_total", protocol="ESMTP") == 1
    assert value(text, "relaynet_received_bytes_total") == 500
    assert value(text, "relaynet_smtp_refusals_total", stage="RCPT", dsn="5.7.1") == 1
    assert value(text, "relaynet_smtp_refusals_total", stage="DATA", dsn="5.3.4") == 1
    assert value(text, "relaynet_delivery_attempts_total", result="sent", next_hop="10.0.0.2:25") == 1
    assert value(text, "relaynet_delivery_attempts_total", result="bounced", next_hop="10.0.0.2:25") == 1
    assert value(text, "relaynet_delivery_attempts_total", result="delivered", next_hop="local") == 1
    assert value(text, "relaynet_delivery_attempts_total", result="deferred", next_hop="10.0.0.3:25") == 1
    assert value(text, "relaynet_delivery_attempts_total", result="expired", next_hop="none") == 1
    assert value(text, "relaynet_domain_deliveries_total", domain="example.org", result="sent") == 1
    assert value(text, "relaynet_domain_deliveries_total", domain="example.org", result="bounced") == 1
    assert value(text, "relaynet_domain_deliveries_total", domain="dead.test", result="deferred") == 1
    assert value(text, "relaynet_tls_messages_total", direction="in", version="TLSv1.3") == 1
    assert value(text, "relaynet_tls_messages_total", direction="in", version="none") == 1
    assert value(text, "relaynet_tls_messages_total", direction="out", version="TLSv1.2") == 1
    assert value(text, "relaynet_dsn_total", action="failed") == 1
    assert value(text, "relaynet_admin_actions_total", action="deleted") == 2
    assert value(text, "relaynet_config_reloads_total", result="refused") == 1
    assert value(text, "relaynet_intake_ack_seconds_count") == 2
    assert value(text, "relaynet_intake_ack_seconds_bucket", le="0.005") == 1
    assert value(text, "relaynet_intake_ack_seconds_bucket", le="0.25") == 2
    # Residence: every final outcome; the deferral is not one.
    assert value(text, "relaynet_queue_residence_seconds_count", result="sent") == 1
    assert value(text, "relaynet_queue_residence_seconds_count", result="expired") == 1
    assert value(text, "relaynet_queue_residence_seconds_count", result="deferred") == 0
    assert value(text, "relaynet_hop_delivery_seconds_sum", next_hop="10.0.0.2:25") == 0.75
    # A failover's earlier hop counts as a deferral there.
    assert value(text, "relaynet_delivery_attempts_total", result="deferred", next_hop="10.0.0.9:25") == 1
    assert value(text, "relaynet_spool_commit_batch_size_sum") == 4
    assert value(text, "relaynet_spool_commit_batch_size_count") == 2
    assert value(text, "relaynet_build_info", node="unit", version=__import__("relaynet").__version__) == 1


def test_present_state_is_read_at_scrape_time() -> None:
    """Queue depth, size, recipients, oldest age and open sessions are what the views say now."""
    m, queue, sessions, clock = make()
    queue.states.update(deferred=2, hold=1)
    queue.now = QueueTotals(
        size=150, recipients={"pending": 2, "deferred": 1}, oldest_arrival=clock.seconds() - 90
    )
    sessions.open = {("relay", False): 1, ("relay", True): 1, ("submission", True): 1}
    text = m.exposition().decode()
    assert value(text, "relaynet_queue_messages", state="deferred") == 2
    assert value(text, "relaynet_queue_messages", state="hold") == 1
    assert value(text, "relaynet_queue_bytes") == 150
    assert value(text, "relaynet_queue_oldest_seconds") == 90
    assert value(text, "relaynet_queue_recipients", status="pending") == 2
    assert value(text, "relaynet_queue_recipients", status="deferred") == 1
    assert value(text, "relaynet_smtp_sessions", mode="relay", tls="no") == 1
    assert value(text, "relaynet_smtp_sessions", mode="relay", tls="yes") == 1
    assert value(text, "relaynet_smtp_sessions", mode="submission", tls="yes") == 1
    queue.states["deferred"] = 0
    queue.now = QueueTotals()
    sessions.open = {}
    text = m.exposition().decode()
    assert value(text, "relaynet_queue_messages", state="deferred") == 0
    assert value(text, "relaynet_queue_bytes") == 0 and value(text, "relaynet_queue_oldest_seconds") == 0
    assert ("relaynet_smtp_sessions", (("mode", "relay"), ("tls", "no"))) not in samples(text)


def test_sessions_gauge_is_zero_not_absent_for_configured_modes() -> None:
    """
    With no session open, C{relaynet_smtp_sessions} still has a series at 0
    for each configured listener mode (both TLS states for relay and
    submission, TLS only for submissions), read at scrape time so a reload
    that changes the listeners shows; open sessions add to them.
    """
    modes = ["relay", "submissions"]
    m, _, sessions, _ = make(listener_modes=lambda: modes)
    got = {k: v for k, v in samples(m.exposition().decode()).items() if k[0] == "relaynet_smtp_sessions"}
    assert got == {
        ("relaynet_smtp_sessions", (("mode", "relay"), ("tls", "no"))): 0,
        ("relaynet_smtp_sessions", (("mode", "relay"), ("tls", "yes"))): 0,
        ("relaynet_smtp_sessions", (("mode", "submissions"), ("tls", "yes"))): 0,
    }
    sessions.open = {("relay", True): 2}
    modes.append("submission")
    text = m.exposition().decode()
    assert value(text, "relaynet_smtp_sessions", mode="relay", tls="yes") == 2
    assert ("relaynet_smtp_sessions", (("mode", "submission"), ("tls", "no"))) in samples(text)
    assert value(text, "relaynet_smtp_sessions", mode="submission", tls="no") == 0


# -- the adapters of a node's parts (relaynet.admin.adapters) ---------------


@define
class FakeListener:
    mode: str = "relay"


@define(eq=False)
class FakeSession:
    listener: FakeListener = field(factory=FakeListener)
    tls_info: tuple[str, str] | None = None


def test_intake_sessions_follow_the_live_set() -> None:
    """L{IntakeSessions} counts the set it was given as sessions join and leave it."""
    live: set[FakeSession] = set()
    view = IntakeSessions(live)
    assert view.count() == 0 and view.by_mode_and_tls() == {}
    live |= {FakeSession(), FakeSession(tls_info=("TLSv1.3", "X")),
             FakeSession(FakeListener("submission"), ("TLSv1.3", "X")), FakeSession()}
    assert view.count() == 4
    assert view.by_mode_and_tls() == {("relay", False): 2, ("relay", True): 1, ("submission", True): 1}


def test_domain_labels_are_bounded() -> None:
    """Past the limit of distinct domains, outcomes are counted under C{other}."""
    m, _, _, _ = make(domain_labels=2)
    for d in ("a.test", "b.test", "c.test", "a.test", "d.test"):
        m.observe({"event": "deferred", "recipient": f"u@{d}", "relay": "h:25"})
    text = m.exposition().decode()
    assert value(text, "relaynet_domain_deliveries_total", domain="a.test", result="deferred") == 2
    assert value(text, "relaynet_domain_deliveries_total", domain="b.test", result="deferred") == 1
    assert value(text, "relaynet_domain_deliveries_total", domain="other", result="deferred") == 2


def test_hop_health_states() -> None:
    """unknown until tried; up after a success or a bounce; deferring; failing after FAILING_AFTER deferrals."""
    h = HopHealth("h:25")
    assert h.state == "unknown"
    h.record("sent", 1.0, None)
    assert h.state == "up" and h.last_success == 1.0
    for i in range(FAILING_AFTER - 1):
        h.record("deferred", 2.0 + i, "421 busy")
        assert h.state == "deferring"
    h.record("deferred", 10.0, "connection refused")
    assert h.state == "failing" and h.last_error == "connection refused" and h.last_failure == 10.0
    h.record("bounced", 11.0, "550 no such user")
    assert h.state == "up" and h.consecutive_deferrals == 0 and h.bounced == 1
    assert h.to_json()["deferred"] == FAILING_AFTER


def test_hop_health_from_events_and_configured_hops() -> None:
    """Events name hops by C{relay}; configured hops never named are listed as unknown."""
    m, _, _, _ = make()
    for _ in range(FAILING_AFTER):
        m.observe({"event": "deferred", "relay": "127.0.0.1:9", "recipient": "a@x", "time": 5.0,
                   "diagnostic": "refused"})
    hops = {h.name: h for h in m.hop_health(["127.0.0.1:9", "10.9.9.9:25"])}
    assert hops["127.0.0.1:9"].state == "failing"
    assert hops["10.9.9.9:25"].state == "unknown"
    text = m.exposition().decode()
    assert value(text, "relaynet_next_hop_up", next_hop="127.0.0.1:9") == 0
    assert value(text, "relaynet_next_hop_consecutive_deferrals", next_hop="127.0.0.1:9") == FAILING_AFTER


def test_history_samples_depth_and_throughput() -> None:
    """One sample per interval with the queue depth and the events counted in it; bounded length."""
    m, queue, _, clock = make(history_interval=10, history_span=30)
    m.history.start()
    try:
        queue.states["deferred"] = 4
        m.observe({"event": "received", "size": 1})
        m.observe({"event": "received", "size": 1})
        m.observe({"event": "delivered", "relay": "local", "recipient": "a@localhost"})
        m.observe({"event": "deferred", "relay": "h:1", "recipient": "a@x"})
        clock.advance(10)
        assert len(m.history.samples) == 1
        s = m.history.samples[0]
        assert (s.depth, s.deferred, s.received, s.delivered, s.deferrals, s.interval) == (4, 4, 2, 1, 1, 10)
        m.observe({"event": "bounced", "relay": "h:1", "recipient": "a@x"})
        clock.advance(4)
        live = m.history.points()[-1]
        assert live.bounced == 1 and live.interval == 4 and live.received == 0
        for _ in range(5):
            clock.advance(10)
        assert len(m.history.samples) == 3  # span / interval
    finally:
        m.history.stop()
    assert not clock.getDelayedCalls()


def test_registry_is_per_node() -> None:
    """Two nodes in one process have separate registries (never the global one)."""
    a, _, _, _ = make()
    b, _, _, _ = make()
    a.observe({"event": "received", "size": 10, "protocol": "ESMTP"})
    assert value(a.exposition().decode(), "relaynet_messages_received_total", protocol="ESMTP") == 1
    assert value(b.exposition().decode(), "relaynet_messages_received_total", protocol="ESMTP") == 0


# -- the log observer -------------------------------------------------------


def _logged(settings: LogSettings, emit: Any) -> tuple[str, NodeLogObserver]:
    out = io.StringIO()
    observer = NodeLogObserver(out, settings)
    publisher = LogPublisher(observer)
    emit(Logger(namespace="relaynet.test", observer=publisher))
    return out.getvalue(), observer


def test_json_log_lines_carry_fields() -> None:
    """JSON format: one object a line with time, level, namespace, the text and the event's fields."""
    text, _ = _logged(LogSettings(format="json"), lambda log: log.info(
        "{event} queue_id={queue_id}", event="received", queue_id="ABC", size=12,
    ))
    lines = text.splitlines()
    assert len(lines) == 1
    rec = json.loads(lines[0])
    assert rec["level"] == "info" and rec["namespace"] == "relaynet.test"
    assert rec["text"] == "received queue_id=ABC"
    assert rec["queue_id"] == "ABC" and rec["size"] == 12 and rec["event"] == "received"


def test_json_log_failure_has_traceback() -> None:
    """A logged failure keeps its traceback in the JSON line."""
    def emit(log: Logger) -> None:
        try:
            1 / 0
        except ZeroDivisionError:
            log.failure("it broke")

    text, _ = _logged(LogSettings(format="json"), emit)
    rec = json.loads(text)
    assert rec["level"] == "critical" and "ZeroDivisionError" in rec["traceback"]


def test_log_level_filters_and_reconfigures() -> None:
    """Events below the level are dropped; configure() changes format and level at once."""
    out = io.StringIO()
    observer = NodeLogObserver(out, LogSettings(format="text", level="warn"))
    log = Logger(namespace="t", observer=LogPublisher(observer))
    log.info("quiet {x}", x=1)
    log.warn("loud {x}", x=2)
    assert "quiet" not in out.getvalue() and "loud 2" in out.getvalue()
    observer.configure(LogSettings(format="json", level="debug"))
    log.debug("now {x}", x=3)
    assert json.loads(out.getvalue().splitlines()[-1])["x"] == 3
    assert observer.level is LogLevel.debug


def test_event_lines_read_as_twisted_would_write_them() -> None:
    """
    A per-message event goes to the text log through a fast path (its line is
    prebuilt); the line is exactly what Twisted's classic formatter makes of
    the same event, time stamp included.
    """
    out = io.StringIO()
    observer = NodeLogObserver(out, LogSettings(format="text"))
    generic: list[dict[str, Any]] = []
    observer._text = generic.append  # the generic formatter must not be needed
    events = EventLog(None, "n1")
    seen: list[dict[str, Any]] = []
    publisher = LogPublisher(observer, seen.append)
    events.log = Logger(namespace="relaynet.events.EventLog", observer=publisher)
    events.emit("received", queue_id="ABC", recipients=["a@b.test"], size=12, note="two\nlines")
    events.emit("relayed", queue_id="ABC", delay=0.25)
    twisted_text = io.StringIO()
    classic = textFileLogObserver(twisted_text)
    for event in seen:
        classic({k: v for k, v in event.items() if k != "log_line"})
    assert generic == []
    assert out.getvalue() == twisted_text.getvalue()
    assert "received queue_id=ABC recipients=['a@b.test'] size=12 note=two\n\tlines" in out.getvalue()


# -- a real node --------------------------------------------------------------


NODE_TOML = """\
[node]
name = "metrics"
hostname = "metrics.test"
spool = "spool"

[[listener]]
endpoint = "tcp:{port}:interface=127.0.0.1"

[local]
domains = ["localhost"]
catch_all = true

[[route]]
domains = ["dead.test"]
action = "relay"
next_hops = ["tcp:127.0.0.1:DEAD"]

[[route]]
domains = ["spam.test"]
action = "reject"
text = "Not here"

[queue]
minimal_backoff = 3600
maximal_backoff = 7200
delay_warning = 0

[outbound]
connect_timeout = 5

[log]
format = "json"
"""

SECRET = "body-secret-7f3a"


@pytest.fixture
def dead_port() -> Any:
    """A loopback port bound but not listening: connections to it are refused."""
    s = socket.socket()
    s.bind((HOST, 0))
    yield s.getsockname()[1]
    s.close()


@pytest.mark.slow
def test_scraped_metrics_match_actions(tmp_path: Path, dead_port: int) -> None:
    """
    Send 3 local and 4 dead-hop messages and one refused recipient, hold one
    and delete one deferred message, keep one session open; the scrape shows
    exactly that (and, before any session, 0 sessions for the relay
    listener rather than no series). The JSON log has one parseable object per line and never
    the message body.
    """
    with NodeProcess(tmp_path, NODE_TOML.replace("DEAD", str(dead_port)), name="metrics") as node:
        client = AdminClient(node.config.admin_endpoint)
        idle = samples(client.get_text("/metrics"))
        # No session yet: the relay listener's series exist, at 0.
        assert idle[("relaynet_smtp_sessions", (("mode", "relay"), ("tls", "no")))] == 0
        assert idle[("relaynet_smtp_sessions", (("mode", "relay"), ("tls", "yes")))] == 0
        ids = []
        with smtplib.SMTP(HOST, node.port, timeout=30) as s:
            for i in range(3):
                s.sendmail("a@example.org", [f"u{i}@localhost"], f"Subject: l{i}\r\n\r\n{SECRET}\r\n")
            for i in range(4):
                s.sendmail("a@example.org", [f"u{i}@dead.test"], f"Subject: d{i}\r\n\r\n{SECRET}\r\n")
            s.mail("a@example.org")
            assert s.rcpt("x@spam.test")[0] == 550
            s.rset()

        def deferred() -> list[dict[str, Any]]:
            return [e for e in node.events() if e["event"] == "deferred"]

        wait_for(lambda: len(deferred()) == 4, 20, "four deferrals")
        wait_for(lambda: sum(e["event"] == "delivered" for e in node.events()) == 3, 20, "three deliveries")
        ids = [e["queue_id"] for e in deferred()]
        client.request("POST", f"/api/queue/{ids[0]}/hold", {})
        client.request("POST", f"/api/queue/{ids[1]}/delete", {})
        raw = RawClient(node.port)
        try:
            def scraped() -> str | None:
                text = client.get_text("/metrics")
                return text if value(text, "relaynet_smtp_sessions", mode="relay", tls="no") == 1 else None

            text = wait_for(scraped, 10, "one open session in the scrape")
        finally:
            raw.close()
        hop = f"127.0.0.1:{dead_port}"
        assert sum(v for (n, _), v in samples(text).items() if n == "relaynet_messages_received_total") == 7
        assert value(text, "relaynet_messages_received_total", protocol="ESMTP") == 7
        assert value(text, "relaynet_smtp_refusals_total", stage="RCPT", dsn="5.7.1") == 1
        assert value(text, "relaynet_delivery_attempts_total", result="delivered", next_hop="local") == 3
        assert value(text, "relaynet_delivery_attempts_total", result="deferred", next_hop=hop) == 4
        assert value(text, "relaynet_domain_deliveries_total", domain="dead.test", result="deferred") == 4
        assert value(text, "relaynet_queue_messages", state="deferred") == 2
        assert value(text, "relaynet_queue_messages", state="hold") == 1
        assert value(text, "relaynet_queue_recipients", status="deferred") == 3
        assert value(text, "relaynet_admin_actions_total", action="hold") == 1
        assert value(text, "relaynet_admin_actions_total", action="deleted") == 1
        assert value(text, "relaynet_intake_ack_seconds_count") == 7
        assert value(text, "relaynet_spool_commit_batch_size_sum") == 7
        assert value(text, "relaynet_queue_residence_seconds_count", result="delivered") == 3
        assert value(text, "relaynet_tls_messages_total", direction="in", version="none") == 7
        assert value(text, "relaynet_next_hop_up", next_hop=hop) == 0
        assert value(text, "relaynet_next_hop_consecutive_deferrals", next_hop=hop) == 4
        assert value(text, "relaynet_build_info", node="metrics", version=__import__("relaynet").__version__) == 1
    log = node.log_path.read_text("utf-8")
    records = [json.loads(line) for line in log.splitlines() if line.strip()]
    received = [r for r in records if r.get("event") == "received"]
    assert len(received) == 7 and all(r["queue_id"] and r["level"] == "info" for r in received)
    assert SECRET not in log
