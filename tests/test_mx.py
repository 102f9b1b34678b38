"""
L{relaynet.delivery.mx}: where mail for a domain goes by DNS, answered
in-process by L{relaynet.zones} (Twisted's authority logic: NXDOMAIN,
NODATA, CNAMEs). The same lookups against real DNS servers on loopback, by
real nodes, are in C{tests/test_mx_dns.py}.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail
from twisted.names import error

from relaynet import zones
from relaynet.delivery.mx import MXAnswer, MXLookup, NEGATIVE_TTL

ZONES = {
    "dest.test": [
        "@ MX 20 mx2", "@ MX 10 mx1", "@ MX 10 mx1b",
        "mx1 A 192.0.2.1", "mx1 AAAA 2001:db8::1", "mx1b A 192.0.2.11", "mx2 A 192.0.2.2",
    ],
    "null.test": ["@ MX 0 ."],
    "bare.test": ["@ A 192.0.2.7", "@ AAAA 2001:db8::7"],
    "empty.test": ["www A 192.0.2.9"],
    "noaddr.test": ["@ MX 10 gone"],
    "backup.test": ["@ MX 10 primary", "@ MX 20 me", "@ MX 30 third",
                    "primary A 192.0.2.21", "me A 127.0.0.9", "third A 192.0.2.23"],
    "loop.test": ["@ MX 10 me", "@ MX 20 other", "me A 127.0.0.9", "other A 192.0.2.31"],
    "named.test": ["@ MX 10 relay.example.", "@ MX 20 x", "x A 192.0.2.40"],
    "alias.test": ["@ MX 10 mail", "mail CNAME real", "real A 192.0.2.50"],
    "many.test": [f"@ MX {10 * i} m{i}" for i in range(1, 5)]
                 + [f"m{i} A 192.0.2.{60 + 2 * i}" for i in range(1, 5)]
                 + [f"m{i} A 192.0.2.{61 + 2 * i}" for i in range(1, 5)],
}


class Counting:
    """Counts lookups on the way to a resolver."""

    def __init__(self, resolver: Any) -> None:
        self.resolver = resolver
        self.queries: list[tuple[str, str]] = []

    def __getattr__(self, name: str) -> Any:
        def lookup(qname: str, *a: Any) -> Any:
            self.queries.append((name, qname))
            return getattr(self.resolver, name)(qname, *a)
        return lookup


def lookup(domain: str, preference: str = "ipv4", port: int = 25, resolver: Any = None,
           shuffle: Any = lambda items: None, clock: Any = lambda: 0.0, **kw: Any) -> MXAnswer:
    mx = MXLookup(resolver or zones.resolver(ZONES), clock, preference=lambda: preference,
                  shuffle=shuffle, choose=lambda: True, **kw)
    out: list[Any] = []
    mx.lookup(domain, port).addBoth(out.append)
    (answer,) = out
    assert isinstance(answer, MXAnswer), answer
    return answer


def addresses(answer: MXAnswer) -> list[str]:
    return [a for _, a, _ in answer.hops(25)]


def test_preference_order_and_families() -> None:
    """Lowest preference first; IPv4 before IPv6 with ipv4, the other way with ipv6."""
    answer = lookup("dest.test")
    assert [e.name for e in answer.exchangers] == ["mx1.dest.test", "mx1b.dest.test", "mx2.dest.test"]
    assert addresses(answer) == ["192.0.2.1", "2001:db8::1", "192.0.2.11", "192.0.2.2"]
    assert addresses(lookup("dest.test", "ipv6"))[:2] == ["2001:db8::1", "192.0.2.1"]
    # "any": a random choice per exchanger (here: choose() says IPv6).
    assert addresses(lookup("dest.test", "any"))[:2] == ["2001:db8::1", "192.0.2.1"]


def test_equal_preferences_are_shuffled() -> None:
    """Equal preferences go through the shuffle; other preferences keep their order."""
    seen: list[list[Any]] = []

    def reverse(items: list[Any]) -> None:
        seen.append(list(items))
        items.reverse()

    answer = lookup("dest.test", shuffle=reverse)
    assert [e.name for e in answer.exchangers] == ["mx1b.dest.test", "mx1.dest.test", "mx2.dest.test"]
    assert [(10, "mx1.dest.test"), (10, "mx1b.dest.test")] in seen


def test_address_limit_and_endpoints() -> None:
    """At most mx_address_limit addresses, as endpoints at the route's port."""
    answer = lookup("many.test")
    hops = answer.hops(2525, address_limit=5)
    assert [a for _, a, _ in hops] == ["192.0.2.62", "192.0.2.63", "192.0.2.64", "192.0.2.65", "192.0.2.66"]
    assert hops[0][2].endpoint == "tcp:192.0.2.62:2525"
    assert lookup("dest.test", "ipv6").hops(25)[0][2].endpoint == "tcp:2001\\:db8\\:\\:1:25"


@pytest.mark.parametrize(("domain", "status", "dsn"), [
    ("null.test", "bounced", "5.1.10"),
    ("nx.dest.test", "bounced", "5.1.2"),
    ("empty.test", "bounced", "5.1.2"),
    ("noaddr.test", "bounced", "5.4.4"),
    ("loop.test", "bounced", "5.4.6"),
])
def test_nowhere_to_go(domain: str, status: str, dsn: str) -> None:
    answer = lookup(domain, own_endpoints=lambda: [("127.0.0.9", 25)])
    assert answer.failure is not None and answer.failure[:2] == (status, dsn), answer
    assert answer.exchangers == ()


def test_implicit_mx() -> None:
    answer = lookup("bare.test")
    assert answer.implicit and [e.name for e in answer.exchangers] == ["bare.test"]
    assert addresses(answer) == ["192.0.2.7", "2001:db8::7"]


def test_cname_to_the_exchanger() -> None:
    assert addresses(lookup("alias.test")) == ["192.0.2.50"]


def test_backup_mx_uses_only_better_exchangers() -> None:
    """This node is the preference-20 MX: only the preference-10 one is tried."""
    answer = lookup("backup.test", own_endpoints=lambda: [("127.0.0.9", 25)])
    assert [e.name for e in answer.exchangers] == ["primary.backup.test"]
    # Listening on another port: the same address is not this node.
    answer = lookup("backup.test", own_endpoints=lambda: [("127.0.0.9", 2525)])
    assert len(answer.exchangers) == 3
    # Listening on every address: any loopback exchanger is this node.
    answer = lookup("backup.test", own_endpoints=lambda: [("0.0.0.0", 25)])
    assert [e.name for e in answer.exchangers] == ["primary.backup.test"]


def test_self_by_host_name() -> None:
    answer = lookup("named.test", own_names=lambda: ["Relay.Example."])
    assert answer.failure is not None and answer.failure[1] == "5.4.6"


class Failing:
    """A resolver whose every lookup fails with C{exc}."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def __getattr__(self, name: str) -> Any:
        return lambda *a: fail(self.exc)


@pytest.mark.parametrize("exc", [
    error.DNSServerError("SERVFAIL"), error.DNSQueryTimeoutError("timeout"), error.DNSQueryRefusedError("refused"),
])
def test_server_failure_and_timeout_defer(exc: Exception) -> None:
    answer = lookup("dest.test", resolver=Failing(exc))
    assert answer.failure is not None and answer.failure[:2] == ("deferred", "4.4.3"), answer


def test_an_exchanger_whose_address_lookup_fails_is_skipped() -> None:
    """mx1's A/AAAA lookups fail (SERVFAIL): mx2 is used; if all fail, deferred."""
    real = zones.resolver(ZONES)

    class Partial:
        def __getattr__(self, name: str) -> Any:
            def lookup(qname: str, *a: Any) -> Deferred[Any]:
                if qname.startswith("mx1") and name != "lookupMailExchange":
                    return fail(error.DNSServerError(qname))
                result: Deferred[Any] = getattr(real, name)(qname, *a)
                return result
            return lookup

    answer = lookup("dest.test", resolver=Partial())
    assert addresses(answer) == ["192.0.2.2"] and any("try again" in n for n in answer.notes)


def test_answers_are_cached_for_their_ttl() -> None:
    """A second lookup within the TTL asks nothing; after it, the server again."""
    now = [0.0]
    counting = Counting(zones.resolver({"t.test": ["@ 60 MX 10 mx", "mx 60 A 192.0.2.1"]}))
    mx = MXLookup(counting, lambda: now[0], preference=lambda: "ipv4")
    mx.lookup("t.test")
    first = len(counting.queries)
    assert first == 3  # MX, A, AAAA
    now[0] = 59.0
    mx.lookup("t.test")
    assert len(counting.queries) == first
    now[0] = 61.0
    mx.lookup("t.test")
    # All three again: the empty AAAA answer (NODATA) was kept as long as the
    # SOA record in its authority section says (its TTL, 60 s, here).
    assert len(counting.queries) == 2 * first
    # Negative answers are kept NEGATIVE_TTL at most.
    mx.lookup("nx.t.test")
    n = len(counting.queries)
    now[0] += NEGATIVE_TTL - 1
    mx.lookup("nx.t.test")
    assert len(counting.queries) == n
    now[0] += 2
    mx.lookup("nx.t.test")
    assert len(counting.queries) == n + 1


def test_zone_errors_name_the_record() -> None:
    with pytest.raises(zones.ZoneError, match=r"zone x\.test, record 1 .*bad A data"):
        zones.zones({"x.test": ["@ A 300.1.1.1"]})
    with pytest.raises(zones.ZoneError, match="SRV is not supported"):
        zones.zones({"x.test": ["@ SRV 1 2 3 x"]})
