# -*- test-case-name: tests.test_hopstate -*-
"""
The hop-state cache (Postfix's dead-host state): a next hop that cannot be
connected to is marked down for C{[outbound] hop_down_time}; meanwhile its
mail is deferred without a connection attempt ("delivery temporarily
suspended"), failover skips it, one probe is made when the down time ends,
and the first session that gets through reopens it and flushes the mail it
deferred. In-process (L{relaynet.testing.network}), on one simulated clock.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import pytest

from relaynet.queue.retry import RetryPolicy
from relaynet.testing.network import NetNode, Network

DOWN = 60.0
BACKOFF = {"minimal_backoff": 300, "maximal_backoff": 4000, "lifetime": 86400}


def message(tag: str) -> bytes:
    return (
        f"From: <sender@src.test>\r\nTo: <user@dest.test>\r\nSubject: {tag}\r\n"
        f"Message-ID: <{tag}@client.test>\r\n\r\nbody {tag}\r\n"
    ).encode("ascii")


def count_connects(net: Network) -> Counter[str]:
    """Count every connection attempt (made or refused) per address."""
    counts: Counter[str] = Counter()
    real = net._connect

    def connect(origin: NetNode, host: str, port: int, factory: Any, connector: Any) -> None:
        counts[host] += 1
        real(origin, host, port, factory, connector)

    net._connect = connect  # type: ignore[method-assign]
    return counts


def relay_node(net: Network, hops: Sequence[tuple[str, int]], **tables: Any) -> NetNode:
    route = {
        "domains": ["dest.test"], "action": "relay",
        "next_hops": [{"endpoint": net.endpoint(n), "priority": p} for n, p in hops],
    }
    tables.setdefault("queue", BACKOFF)
    tables.setdefault("outbound", {"hop_down_time": DOWN})
    return net.add_node("hop1", routes=[route], **tables)


def send(node: NetNode, tag: str) -> None:
    replies = node.submit("sender@src.test", ["user@dest.test"], message(tag))
    assert replies[-2][0] == 250 or any(code == 250 and "queued" in text for code, text in replies), replies


def test_down_hop_defers_without_connecting() -> None:
    """
    The first message tries hop2 (refused) and puts it down; the next 50 are
    deferred at once, without a connection attempt, with 4.4.1 "delivery
    temporarily suspended: connect to ...: Connection refused". One
    C{hop_down} event names the first failure.
    """
    net = Network()
    connects = count_connects(net)
    hop1 = relay_node(net, [("hop2", 10)])
    addr = net.address_of("hop2")
    send(hop1, "first")
    net.run()
    assert connects[addr] == 1
    (first,) = hop1.events_named("deferred")
    assert first["dsn"] == "4.4.1" and "refused" in first["diagnostic"].lower(), first
    (down,) = hop1.events_named("hop_down")
    assert down["relay"] == f"{addr}:25" and "refused" in down["diagnostic"].lower()
    for i in range(50):
        send(hop1, f"m{i}")
    net.run()
    assert connects[addr] == 1, "no connection attempt while the hop is down"
    deferred = hop1.events_named("deferred")
    assert len(deferred) == 51
    for e in deferred[1:]:
        assert e["dsn"] == "4.4.1"
        assert e["diagnostic"].startswith(f"delivery temporarily suspended: connect to {addr}:25"), e
        assert "refused" in e["diagnostic"].lower()
    states = hop1.runner.outbound.hop_states()
    assert [s["state"] for s in states] == ["down"] and states[0]["suspended"] == 50


def test_a_restart_keeps_the_retry_times_of_mail_deferred_for_a_down_hop() -> None:
    """
    Mail deferred for a hop known down (no state written) leaves its retry
    time as a due-time hint: after a restart (kill -9) with the hop still
    down, none of it is due at once and deferred again; each is attempted
    at the retry time its deferral gave it (the minimal backoff, give or
    take its jitter), as Postfix's deferred queue keeps it. Without the
    hints, all 20 were deferred again at the restart.
    """
    low, high = (BACKOFF["minimal_backoff"] * (1 + k * RetryPolicy().jitter) for k in (-1, 1))
    net = Network()
    connects = count_connects(net)
    hop1 = relay_node(net, [("hop2", 10)])
    addr = net.address_of("hop2")
    send(hop1, "first")
    net.run()
    for i in range(20):
        send(hop1, f"m{i}")
    net.run()
    assert len(hop1.events_named("deferred")) == 21 and connects[addr] == 1
    net.advance(10)
    hop1.stop()
    before = len(hop1.events_named("deferred"))
    hop1.start()
    net.run()
    net.advance(low - 11, step=1)
    assert hop1.events_named("deferred")[before:] == [], "mail deferred again before its retry time"
    assert connects[addr] == 1
    assert len(hop1.queued()) == 21
    net.advance(high - low + 2, step=1)
    again = hop1.events_named("deferred")[before:]
    assert {e["queue_id"] for e in again} == set(hop1.queued()), again  # each tried again
    assert connects[addr] >= 2  # a probe at the retry time (the rest suspended behind one)


def test_failover_skips_a_down_hop() -> None:
    """
    With hop2 (priority 10) down and hop3 (20) up, every message goes to
    hop3; only the first one tries hop2, the others skip it without a
    connection attempt and are not deferred.
    """
    net = Network()
    connects = count_connects(net)
    hop1 = relay_node(net, [("hop2", 10), ("hop3", 20)])
    hop3 = net.add_node("hop3", local_domains=["dest.test"])
    for i in range(20):
        send(hop1, f"f{i}")
    net.run()
    assert len(hop3.mailboxes.delivered("user@dest.test")) == 20
    assert connects[net.address_of("hop2")] == 1
    assert not hop1.events_named("deferred") and hop1.queued() == []
    assert len(hop1.events_named("sent")) == 20


def test_probe_after_down_time_doubles_while_failing() -> None:
    """
    When the down time ends, one deferred message is flushed as the probe
    (one connection attempt); while it keeps failing the down time doubles
    (60, 120, 240 ...), capped at 10 x hop_down_time.
    """
    net = Network()
    connects = count_connects(net)
    hop1 = relay_node(net, [("hop2", 10)])
    addr = net.address_of("hop2")
    for i in range(10):
        send(hop1, f"p{i}")
    net.run()
    assert connects[addr] == 1
    start = net.reactor.seconds()
    net.advance(DOWN + 1)
    assert connects[addr] == 2, "one probe when the down time ends"
    net.advance(2 * DOWN)
    assert connects[addr] == 3, "the next probe after twice the down time"
    net.advance(4 * DOWN - 2)
    assert connects[addr] == 3
    net.advance(3)
    assert connects[addr] == 4
    hop = hop1.runner.outbound.hop(f"tcp:{addr}:25")
    for _ in range(10):
        hop.probing = True
        hop.failed("x")
    assert hop.interval == 10 * DOWN
    assert start < net.reactor.seconds()


def test_reopen_on_first_success_flushes_deferred_mail() -> None:
    """
    hop2 is down while 30 messages arrive; it comes up. At the end of the
    down time the probe gets through: the hop reopens at once (C{hop_up})
    and the deferred messages are delivered within seconds, not at their
    own retry (300 s later).
    """
    net = Network()
    connects = count_connects(net)
    hop1 = relay_node(net, [("hop2", 10)])
    for i in range(30):
        send(hop1, f"r{i}")
    net.run()
    t0 = net.reactor.seconds()
    hop2 = net.add_node("hop2", local_domains=["dest.test"])
    took = net.run_until(lambda: len(hop2.mailboxes.delivered("user@dest.test")) == 30, limit=200)
    assert took <= DOWN + 5, took
    assert hop1.queued() == []
    (up,) = hop1.events_named("hop_up")
    assert up["flushed"] == 30 and up["relay"] == f"{hop2.address}:25"
    assert up["time"] - t0 <= DOWN + 1
    assert [s["state"] for s in hop1.runner.outbound.hop_states()] == ["up"]
    # Up again: new mail connects normally.
    before = connects[hop2.address]
    send(hop1, "after")
    net.run()
    assert len(hop2.mailboxes.delivered("user@dest.test")) == 31
    assert connects[hop2.address] >= before


def test_new_mail_after_down_time_is_the_probe() -> None:
    """
    A message arriving after the down time (before the timer's probe) is
    itself the probe: a single connection attempt; when it succeeds the hop
    is up and the earlier deferred message is flushed.
    """
    net = Network()
    connects = count_connects(net)
    hop1 = relay_node(net, [("hop2", 10)], outbound={"hop_down_time": DOWN})
    send(hop1, "early")
    net.run()
    hop = hop1.runner.outbound.hop(net.endpoint("hop2"))
    hop._cancel()  # no timer probe: the next message is the probe
    net.advance(DOWN + 1)
    hop2 = net.add_node("hop2", local_domains=["dest.test"])
    send(hop1, "late")
    net.run_until(lambda: len(hop2.mailboxes.delivered("user@dest.test")) == 2, limit=10)
    assert hop1.events_named("hop_up") and hop1.queued() == []


def test_greeting_421_puts_the_hop_down() -> None:
    """A greeting refusing the session (421) marks the hop down as a refused connection does."""
    from relaynet.delivery.client import HopPool, HopState, RelayClient

    class Reactor:
        def seconds(self) -> float:
            return 100.0

        def callLater(self, *a: Any, **kw: Any) -> Any:
            class Call:
                def active(self) -> bool:
                    return False
            return Call()

    state = HopState("x:25", Reactor(), DOWN)
    pool = HopPool.__new__(HopPool)
    pool.name, pool.hop, pool.clients, pool._starting, pool._idle = "x:25", state, set(), set(), {}
    pool.queue, pool._initial, pool._connecting = __import__("collections").deque(), 1, 0
    client = RelayClient.__new__(RelayClient)
    client.greeting_refused, client._sent = True, 0
    client.session_error = (421, "4.3.2", "greeting: 421 4.3.2 busy")
    pool.disconnected(client)
    assert state.down and "421" in state.diagnostic


def test_hop_down_time_zero_turns_it_off() -> None:
    """C{hop_down_time = 0}: every message tries the hop (the old behaviour)."""
    net = Network()
    connects = count_connects(net)
    hop1 = relay_node(net, [("hop2", 10)], outbound={"hop_down_time": 0})
    for i in range(5):
        send(hop1, f"z{i}")
    net.run()
    assert connects[net.address_of("hop2")] == 5
    assert not hop1.events_named("hop_down")


def relay_to(port: int, backoff: int, extra: str = "") -> str:
    """Node config: all mail relayed to 127.0.0.1:C{port}, retried after C{backoff} seconds."""
    return f"""
[[route]]
domains = ["*"]
action = "relay"
next_hops = ["tcp:127.0.0.1:{port}"]

[queue]
minimal_backoff = {backoff}
maximal_backoff = {backoff}
delay_warning = 0
{extra}"""


def events_named(node: Any, name: str) -> list[dict[str, Any]]:
    """A real node's events called C{name}, from its events.jsonl."""
    return [e for e in node.events(strict=False) if e.get("event") == name]


@pytest.mark.slow
def test_real_node_delivers_once_its_next_hop_comes_up(tmp_path: Path) -> None:
    """
    A twistd node whose next hop is a closed port defers five messages (the
    first tried, the others suspended); then an smtp-sink starts on that
    port: the mail reaches it within seconds (the probe after the down time,
    then the flush), not after its backoff of an hour.
    """
    import smtplib

    from harness.nodeproc import HOST, NodeProcess, wait_for
    from harness.peers import SMTP_SINK, SmtpSink, allow_postfix_search, free_port, missing_binaries

    if missing_binaries([SMTP_SINK]):
        pytest.skip("smtp-sink (Debian's postfix) is not installed")
    port = free_port(HOST)
    route = relay_to(port, 3600, "\n[outbound]\nhop_down_time = 1\n")
    with NodeProcess(tmp_path / "node", extra_toml=route, name="hopdown") as node:
        with smtplib.SMTP(HOST, node.port, timeout=30) as s:
            for i in range(5):
                assert not s.sendmail("s@src.test", [f"r{i}@remote.test"], f"Subject: down {i}\r\n\r\nhi\r\n")

        def events(name: str) -> list[dict[str, Any]]:
            return events_named(node, name)

        wait_for(lambda: len(events("deferred")) >= 5, 30, "five deferred events")
        deferred = events("deferred")
        assert sum(e["diagnostic"].startswith("delivery temporarily suspended: ") for e in deferred) >= 4
        assert len(events("hop_down")) == 1
        time.sleep(3)  # a failed probe or two: the down time doubles
        with SmtpSink(allow_postfix_search(tmp_path) / "sink", port=port) as sink:
            took = sink.wait_received(5, timeout=60)
            assert took < 30, took
        wait_for(lambda: len(events("hop_up")) == 1, 30, "a hop_up event")


@pytest.mark.slow
def test_real_node_restarted_with_its_next_hop_still_down_leaves_waiting_mail_alone(tmp_path: Path) -> None:
    """
    A twistd node whose next hop is a closed port defers 50 messages (one
    tried, the rest suspended, no state written) and leaves each one's
    retry time as its queue file's modification time: C{os.stat} sees it
    about the minimal backoff ahead. Killed (-9) and started again with the
    hop still down, it recovers the 50 and defers none of them again before
    that time: a new message, sent once the queue is recovered, is the only
    one deferred (the recovered ones, had they been due, would have been
    attempted first, from the reactor turn after their recovery). Before,
    every one was due at once after a restart and deferred again.
    """
    import smtplib

    from harness.nodeproc import HOST, RECOVERED, NodeProcess, wait_for
    from harness.peers import free_port

    port = free_port(HOST)
    backoff = 600
    with NodeProcess(tmp_path / "node", extra_toml=relay_to(port, backoff), name="hopdown") as node:
        with smtplib.SMTP(HOST, node.port, timeout=30) as s:
            for i in range(50):
                assert not s.sendmail("s@src.test", [f"r{i}@remote.test"], f"Subject: down {i}\r\n\r\nhi\r\n")

        def deferred() -> list[dict[str, Any]]:
            return events_named(node, "deferred")

        wait_for(lambda: len(deferred()) >= 50, 30, "fifty deferred events")

        def hinted() -> int:
            soon = time.time() + backoff / 2
            return sum(p.stat().st_mtime > soon for p in node.queue_files("new"))

        wait_for(lambda: hinted() >= 49, 30, "the suspended messages' retry times on their queue files")
        before = len(deferred())
        node.kill9()
        mark = len(node.log_text())
        node.start()
        with smtplib.SMTP(HOST, node.port, timeout=30) as s:
            assert not s.sendmail("s@src.test", ["new@remote.test"], b"Subject: new\r\n\r\nhi\r\n")
        wait_for(lambda: RECOVERED.search(node.log_text()[mark:]), 60, "the queue recovered")
        with smtplib.SMTP(HOST, node.port, timeout=30) as s:
            assert not s.sendmail("s@src.test", ["last@remote.test"], b"Subject: last\r\n\r\nhi\r\n")
        wait_for(lambda: any(e["recipient"] == "last@remote.test" for e in deferred()[before:]), 30,
                 "the last message deferred")
        again = [e["recipient"] for e in deferred()[before:]]
        assert sorted(again) == ["last@remote.test", "new@remote.test"], again
