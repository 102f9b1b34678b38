"""
Egress pools (L{relaynet.delivery.egress}, C{[egress.NAME]} and a route's
C{source_pool}): the spreading by weight, addresses that cannot be bound,
the configuration; and real nodes on loopback, where the receiving node's
C{received} events name the address each connection came from.
"""

from __future__ import annotations

import smtplib
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from harness.nodeproc import NodeProcess, wait_for
from relaynet.config import ConfigError, describe, parse_config
from relaynet.delivery.egress import EgressPool


def test_spreading_follows_the_weights_in_every_window() -> None:
    """Weights 3 and 1: A A B A, again and again (smooth weighted round robin), every 4 connections."""
    pool = EgressPool("bulk", [("192.0.2.1", 3), ("192.0.2.2", 1)])
    picks = [pool.choose(0.0) for _ in range(12)]
    assert picks[:4] == ["192.0.2.1", "192.0.2.1", "192.0.2.2", "192.0.2.1"]
    for start in range(0, 12, 4):
        assert Counter(picks[start:start + 4]) == {"192.0.2.1": 3, "192.0.2.2": 1}


def test_an_unbindable_address_is_left_out_then_tried_again() -> None:
    """
    An address that could not be bound is not chosen for RETRY seconds;
    with every address out, the one that failed first is tried (mail never
    stops for a pool); a connection counts for its address.
    """
    pool = EgressPool("bulk", [("192.0.2.1", 1), ("192.0.2.2", 1)])
    pool.unavailable("192.0.2.1", 100.0)
    assert {pool.choose(101.0) for _ in range(4)} == {"192.0.2.2"}
    assert pool.down(101.0) == ["192.0.2.1"]
    pool.unavailable("192.0.2.2", 102.0)
    assert pool.choose(103.0) == "192.0.2.1"
    assert "192.0.2.1" in {pool.choose(100.0 + EgressPool.RETRY + 1) for _ in range(2)}
    pool.connected("192.0.2.2")
    assert pool.used == {"192.0.2.1": 0, "192.0.2.2": 1} and pool.down(103.0) == ["192.0.2.1"]


def test_configuration() -> None:
    """[egress.NAME] addresses (strings or tables with weights); route source_pool; errors name the key; check-config round trip."""
    data = {
        "egress": {"bulk": {"addresses": ["127.0.0.2", {"address": "127.0.0.3", "weight": 2}]}},
        "route": [{"domains": ["*"], "action": "relay", "next_hops": ["tcp:192.0.2.9:25"], "source_pool": "bulk"}],
    }
    config = parse_config(data)
    assert [(p.name, p.addresses) for p in config.egress] == [("bulk", (("127.0.0.2", 1), ("127.0.0.3", 2)))]
    assert config.routes[0].source_pool == "bulk"
    import tomllib

    again = parse_config(tomllib.loads(describe(config)))
    assert again.egress == config.egress and again.routes[0].source_pool == "bulk"
    for bad, key in [
        ({**data, "egress": {"bulk": {"addresses": ["not-an-ip"]}}}, "egress.bulk.addresses[0]"),
        ({**data, "egress": {"bulk": {"addresses": ["127.0.0.2", "127.0.0.2"]}}}, "egress.bulk.addresses[1]"),
        ({**data, "egress": {}}, "route[0].source_pool"),
        ({**data, "route": [{**data["route"][0], "source_address": "127.0.0.2"}]}, "route[0].source_pool"),
        ({**data, "route": [{"domains": ["*"], "action": "local", "source_pool": "bulk"}]}, "route[0].source_pool"),
    ]:
        with pytest.raises(ConfigError) as e:
            parse_config(bad)
        assert e.value.key == key, (key, e.value)


def _send(port: int, n: int) -> None:
    for i in range(n):
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            s.sendmail("app@sender.test", [f"u{i}@dest.test"], f"Subject: {i}\r\n\r\nbody {i}\r\n".encode())


@pytest.mark.slow
def test_connections_leave_from_the_pool_by_weight(tmp_path: Path) -> None:
    """
    A node whose route uses a pool of 127.0.0.2 (weight 2), 127.0.0.3
    (weight 1) and 192.0.2.77 (not an address of this host) relays 12
    messages, one connection each, to another node: the receiving node's
    received events show 8 connections from .2 and 4 from .3; 192.0.2.77
    could not be bound, gave one egress_unavailable event, and lost no mail.
    """
    receiver = NodeProcess(tmp_path / "receiver", config_toml="""
[node]
name = "{name}"
hostname = "receiver.test"
spool = "spool"
workers = 1
[[listener]]
endpoint = "tcp:{port}:interface=127.0.0.1"
[relay]
trusted_networks = ["127.0.0.0/8"]
[local]
domains = ["dest.test"]
catch_all = true
""", name="receiver")
    with receiver:
        sender = NodeProcess(tmp_path / "sender", config_toml=f"""
[node]
name = "{{name}}"
hostname = "sender.test"
spool = "spool"
workers = 1
[[listener]]
endpoint = "tcp:{{port}}:interface=127.0.0.1"
[outbound]
connection_reuse = false
[egress.bulk]
addresses = [{{ address = "127.0.0.2", weight = 2 }}, "127.0.0.3", "192.0.2.77"]
[[route]]
domains = ["dest.test"]
action = "relay"
next_hops = ["tcp:127.0.0.1:{receiver.port}"]
source_pool = "bulk"
""", name="sender")
        with sender:
            _send(sender.port, 12)

            def received() -> list[dict[str, Any]]:
                got = [e for e in receiver.events(strict=False) if e.get("event") == "received"]
                return got if len(got) >= 12 else []

            got = wait_for(received, 60, "12 messages at the receiver")
            by_source = Counter(e["client"] for e in got)
            assert by_source == {"127.0.0.2": 8, "127.0.0.3": 4}, by_source
            unavailable = [e for e in sender.events(strict=False) if e.get("event") == "egress_unavailable"]
            assert len(unavailable) == 1 and unavailable[0]["source"] == "192.0.2.77", unavailable
            # The receiver logs a message before its 250 reaches the sender, which logs
            # "sent" only then: wait for the last ones with a deadline.
            def sent() -> list[dict[str, Any]]:
                return [e for e in sender.events(strict=False) if e.get("event") == "sent"]

            wait_for(lambda: len(sent()) >= 12, 10, "12 sent events")
            assert len(sent()) == 12


def test_metrics_count_connections_per_pool_address() -> None:
    """relaynet_egress_connections_total{pool, source}: the pool's use, read from the outbound at scrape time."""
    from twisted.internet.task import Clock

    from relaynet.admin.metrics import NodeMetrics
    from tests.test_metrics import FakeQueue, FakeSessions

    pool = EgressPool("bulk", [("127.0.0.2", 2), ("127.0.0.3", 1)])
    for _ in range(3):
        pool.connected(pool.choose(0.0))

    class Outbound:
        def egress_use(self) -> dict[tuple[str, str], int]:
            return {(pool.name, a): n for a, n in pool.used.items()}

    class Queue:
        outbound = Outbound()
        fake = FakeQueue()

        def counts(self) -> dict[str, int]:
            return self.fake.counts()

        def totals(self) -> Any:
            return self.fake.totals()

    clock = Clock()
    metrics = NodeMetrics(Queue(), FakeSessions(), clock, name="unit", now=clock.seconds)  # type: ignore[arg-type]
    text = metrics.exposition().decode()
    assert 'relaynet_egress_connections_total{pool="bulk",source="127.0.0.2"} 2.0' in text, text
    assert 'relaynet_egress_connections_total{pool="bulk",source="127.0.0.3"} 1.0' in text


@pytest.mark.slow
def test_an_injection_token_names_the_pool(tmp_path: Path) -> None:
    """
    HTTP injection with a token made with --pool: its mail leaves from that
    pool's address (127.0.0.5), SMTP mail by the same route from the route's
    pool (127.0.0.4); the tokens file keeps the pool (relaynet api-token list).
    """
    import http.client
    import json
    import subprocess
    import sys

    from harness.nodeproc import free_port
    from relaynet.intake.http import read_tokens_file

    receiver = NodeProcess(tmp_path / "receiver", config_toml="""
[node]
name = "{name}"
hostname = "receiver.test"
spool = "spool"
workers = 1
[[listener]]
endpoint = "tcp:{port}:interface=127.0.0.1"
[relay]
trusted_networks = ["127.0.0.0/8"]
[local]
domains = ["dest.test"]
catch_all = true
""", name="receiver")
    tokens = tmp_path / "sender" / "tokens"
    tokens.parent.mkdir(parents=True)
    made = subprocess.run(
        [sys.executable, "-m", "relaynet.cli", "api-token", "add", str(tokens), "newsletter",
         "--domain", "app.test", "--pool", "news"], capture_output=True, text=True, timeout=60, check=True)
    token = made.stdout.strip()
    assert read_tokens_file(tokens)["newsletter"].pool == "news"
    http_port = free_port()
    with receiver:
        sender = NodeProcess(tmp_path / "sender", config_toml=f"""
[node]
name = "{{name}}"
hostname = "sender.test"
spool = "spool"
workers = 1
[[listener]]
endpoint = "tcp:{{port}}:interface=127.0.0.1"
[http_api]
endpoint = "tcp:{http_port}:interface=127.0.0.1"
tokens_file = "tokens"
[egress.transactional]
addresses = ["127.0.0.4"]
[egress.news]
addresses = ["127.0.0.5"]
[[route]]
domains = ["dest.test"]
action = "relay"
next_hops = ["tcp:127.0.0.1:{receiver.port}"]
source_pool = "transactional"
""", name="sender")
        with sender:
            wait_for(lambda: _connects(http_port), 20, "the HTTP API")
            conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=30)
            body = {"sender": "news@app.test", "recipients": ["reader@dest.test"],
                    "content": {"from": "news@app.test", "subject": "news", "text": "hello"}}
            conn.request("POST", "/api/v1/messages", body=json.dumps(body),
                         headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
            resp = conn.getresponse()
            assert resp.status == 201, resp.read()
            conn.close()
            with smtplib.SMTP("127.0.0.1", sender.port, timeout=30) as s:
                s.sendmail("app@app.test", ["buyer@dest.test"], b"Subject: receipt\r\n\r\nthanks\r\n")

            def received() -> dict[str, str]:
                got = {e["recipients"][0]: e["client"] for e in receiver.events(strict=False)
                       if e.get("event") == "received"}
                return got if len(got) >= 2 else {}

            got = wait_for(received, 60, "both messages at the receiver")
            assert got == {"reader@dest.test": "127.0.0.5", "buyer@dest.test": "127.0.0.4"}, got


def _connects(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False
