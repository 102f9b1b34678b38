"""
Tests for L{relaynet.delivery.attempt}: one delivery attempt over fake
stages (an outbound agent answering per next hop, in-memory mailboxes, a
fake MX resolver), no reactor.
"""

from __future__ import annotations

import io
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed


from relaynet import zones
from relaynet.config import NodeConfig, parse_config
from relaynet.delivery.attempt import Delivery
from relaynet.delivery.client import DeliveryResult
from relaynet.delivery.mailbox import LocalResult
from relaynet.delivery.routing import RoutingTable
from relaynet.queue.core import Outcome
from relaynet.queue.spool import BoundedReader, Envelope, QueueEntry, QueueState, Recipient
from relaynet.queue.states import OutcomeEvent, RecipientStatus


def config() -> NodeConfig:
    return parse_config({
        "local": {"domains": ["here.test"], "users": ["alice"]},
        "route": [
            {"domains": ["pair.test"], "action": "relay",
             "next_hops": [{"endpoint": "tcp:192.0.2.1:25", "priority": 10},
                           {"endpoint": "tcp:192.0.2.2:25", "priority": 20}]},
            {"domains": ["*.mx.test", "mx.test"], "action": "mx", "mx_port": 2525},
            {"domains": ["gone.test"], "action": "reject", "code": 550, "enhanced": "5.7.1", "text": "no"},
        ],
    }, source="<test>")


class _Entry(QueueEntry):
    def open_message(self, skip: int = 0) -> BoundedReader:
        return BoundedReader(io.BytesIO(b"x"), 1)  # type: ignore[arg-type]


def entry(*rcpts: str) -> QueueEntry:
    env = Envelope("Q1", "s@src.test", tuple(Recipient(r) for r in rcpts), 0.0)
    return _Entry(env, QueueState(), "/nonexistent", 0)


class Hops:
    """An outbound agent: each endpoint answers every recipient with one code."""

    def __init__(self, broken: str = "", **codes: int) -> None:
        self.codes = {f"tcp:{k.replace('_', '.')}:25": v for k, v in codes.items()}
        self.tried: list[tuple[str, list[str]]] = []
        self.broken = broken

    def deliver(self, endpoint: str, entry: QueueEntry, recipients: list[Recipient],
                concurrency: int = 20, source_address: str | None = None,
                tls_policy: str = "none") -> Deferred[list[DeliveryResult]]:
        self.tried.append((endpoint, [r.address for r in recipients]))
        if endpoint == self.broken:
            raise RuntimeError("outbound agent broke")
        code = self.codes.get(endpoint, 421)
        enhanced = {250: "2.0.0", 421: "4.4.1", 550: "5.1.1"}[code]
        return succeed([DeliveryResult(r.address, code, enhanced, "said so", endpoint) for r in recipients])


class Boxes:
    def __init__(self) -> None:
        self.got: list[str] = []

    def deliver(self, entry: QueueEntry, addresses: list[str]) -> Deferred[list[LocalResult]]:
        self.got += addresses
        return succeed([LocalResult(a, ok=True) for a in addresses])


class BrokenResolver:
    """A resolver that raises for every lookup."""

    def lookupMailExchange(self, name: str, timeout: Any = None) -> Deferred[Any]:
        raise RuntimeError("resolver broke")


def attempt(hops: Hops, resolver: Any = None, boxes: Boxes | None = None, *rcpts: str) -> list[Outcome]:
    table = RoutingTable(config())
    d = Delivery(lambda: table, hops, boxes or Boxes(), lambda: resolver, shuffle=lambda h: None)
    out: list[Any] = []
    d.attempt(entry(*rcpts), [Recipient(r) for r in rcpts]).addBoth(out.append)
    [result] = out
    assert isinstance(result, list), result
    return result


def test_failover_to_the_next_priority() -> None:
    """A transient failure at the first hop moves the recipient on; the event lists the hop tried first."""
    hops = Hops(**{"192_0_2_1": 421, "192_0_2_2": 250})
    [o] = attempt(hops, None, None, "u@pair.test")
    assert (o.status, o.event, o.remote) == (RecipientStatus.RELAYED, OutcomeEvent.SENT, "tcp:192.0.2.2:25")
    assert [t[0] for t in o.tried] == ["tcp:192.0.2.1:25"]
    assert [e for e, _ in hops.tried] == ["tcp:192.0.2.1:25", "tcp:192.0.2.2:25"]


def test_permanent_failure_does_not_fail_over() -> None:
    """A 5xx is final at the first hop: no other hop is tried."""
    hops = Hops(**{"192_0_2_1": 550, "192_0_2_2": 250})
    [o] = attempt(hops, None, None, "u@pair.test")
    assert o.status is RecipientStatus.BOUNCED and len(hops.tried) == 1


def test_every_hop_down_defers_naming_the_last() -> None:
    """All hops fail transiently: deferred, the last hop in relay, the others in tried."""
    [o] = attempt(Hops(), None, None, "u@pair.test")
    assert o.status is RecipientStatus.DEFERRED and o.remote == "tcp:192.0.2.2:25"
    assert [t[0] for t in o.tried] == ["tcp:192.0.2.1:25"]


def test_local_relay_and_refused_in_one_attempt() -> None:
    """Recipients are grouped by route: local to the mailboxes, relayed to hops, a reject rule bounces."""
    boxes = Boxes()
    out = attempt(Hops(**{"192_0_2_1": 250}), None, boxes, "alice@here.test", "u@pair.test", "x@gone.test")
    by = {o.address: o for o in out}
    assert by["alice@here.test"].status is RecipientStatus.DELIVERED and boxes.got == ["alice@here.test"]
    assert by["u@pair.test"].status is RecipientStatus.RELAYED
    assert (by["x@gone.test"].status, by["x@gone.test"].dsn) == (RecipientStatus.BOUNCED, "5.7.1")


def test_mx_by_preference_with_port() -> None:
    """MX hosts are tried by preference, at the route's port."""
    resolver = zones.resolver({"mx.test": ["@ MX 20 b", "@ MX 10 a", "a A 192.0.2.10", "b A 192.0.2.20"]})
    hops = Hops()
    [o] = attempt(hops, resolver, None, "u@mx.test")
    assert [e for e, _ in hops.tried] == ["tcp:192.0.2.10:2525", "tcp:192.0.2.20:2525"]
    assert o.status is RecipientStatus.DEFERRED
    # Events and DSNs name the exchanger and its address, as Postfix's relay= does.
    assert o.remote == "b.mx.test[192.0.2.20]:2525" and o.tried[0][0] == "a.mx.test[192.0.2.10]:2525"


def test_null_mx_and_nxdomain_bounce() -> None:
    """A null MX bounces 5.1.10, a domain that does not exist 5.1.2; nothing is connected."""
    resolver = zones.resolver({"mx.test": ["@ MX 0 ."]})
    hops = Hops()
    out = attempt(hops, resolver, None, "u@mx.test", "v@no.mx.test")
    assert {(o.address, o.status, o.dsn) for o in out} == {
        ("u@mx.test", RecipientStatus.BOUNCED, "5.1.10"), ("v@no.mx.test", RecipientStatus.BOUNCED, "5.1.2"),
    }
    assert hops.tried == []


def test_exception_in_one_group_defers_that_group_only() -> None:
    """
    An exception inside one route's group (here the outbound agent) defers
    that group's recipients (4.3.0, naming the error); the other groups of
    the message are delivered.
    """
    boxes = Boxes()
    out = attempt(Hops(broken="tcp:192.0.2.1:25"), None, boxes, "u@pair.test", "alice@here.test")
    by = {o.address: o for o in out}
    assert (by["u@pair.test"].status, by["u@pair.test"].dsn) == (RecipientStatus.DEFERRED, "4.3.0")
    assert "outbound agent broke" in by["u@pair.test"].diagnostic
    assert by["alice@here.test"].status is RecipientStatus.DELIVERED


def test_resolver_failure_defers_4_4_3() -> None:
    """A resolver that fails (or raises) defers the domain's recipients with 4.4.3."""
    resolver = BrokenResolver()
    [o] = attempt(Hops(), resolver, None, "u@mx.test")
    assert (o.status, o.dsn) == (RecipientStatus.DEFERRED, "4.4.3")
