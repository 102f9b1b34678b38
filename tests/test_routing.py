"""
Tests for L{relaynet.delivery.routing}: the order of next hops and the explanation of
a routing decision. Pure: no reactor, no I/O, an injected shuffle.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relaynet.config import NextHop, NodeConfig, parse_config
from relaynet.delivery.routing import order_hops
from relaynet.intake.policy import explain

TRUSTED = "127.0.0.1"
UNTRUSTED = "203.0.113.9"


def config(**extra: Any) -> NodeConfig:
    """A node with local domain C{example.org} (alice, bob, postmaster), trusting 127.0.0.0/8."""
    data: dict[str, Any] = {
        "node": {"name": "n", "hostname": "relay.test", "spool": "/nonexistent"},
        "local": {"mailroot": "/m", "domains": ["example.org"], "users": ["alice", "bob"],
                  "aliases": {"postmaster": "alice"}},
        "relay": {"trusted_networks": ["127.0.0.0/8"]},
    }
    data.update(extra)
    return parse_config(data, source="<test>")


ROUTES = config(
    route=[
        {"domains": ["partner.test"], "action": "relay",
         "next_hops": [{"endpoint": "tcp:192.0.2.3:25", "priority": 20},
                       {"endpoint": "tcp:192.0.2.1:25", "priority": 10},
                       {"endpoint": "tcp:192.0.2.2:25", "priority": 10}]},
        {"domains": ["*.sub.test"], "action": "relay", "next_hops": ["tcp:192.0.2.9:25"]},
        {"domains": ["blocked.test"], "action": "reject", "code": 550, "enhanced": "5.7.1",
         "text": "we do not talk to them"},
        {"domains": ["*"], "action": "relay", "next_hops": ["tcp:192.0.2.99:25"]},
    ]
)
NO_DEFAULT = config(route=[{"domains": ["partner.test"], "action": "relay", "next_hops": ["tcp:192.0.2.1:25"]}])


# -- order_hops --------------------------------------------------------------


def hops(*spec: tuple[str, int]) -> list[NextHop]:
    return [NextHop(endpoint=e, priority=p) for e, p in spec]


def test_order_by_priority() -> None:
    """Lower priorities come first, whatever the input order."""
    given_hops = hops(("c", 30), ("a", 10), ("b", 20))
    assert [h.endpoint for h in order_hops(given_hops, shuffle=lambda group: None)] == ["a", "b", "c"]


def test_equal_priorities_are_shuffled_per_group() -> None:
    """
    Hops of equal priority are shuffled as one group each (the injected
    shuffle sees each group in input order); groups stay in priority order.
    """
    seen: list[list[str]] = []

    def reverse(group: list[NextHop]) -> None:
        seen.append([h.endpoint for h in group])
        group.reverse()

    given_hops = hops(("b1", 20), ("a1", 10), ("b2", 20), ("a2", 10), ("c", 30), ("a3", 10))
    ordered = order_hops(given_hops, shuffle=reverse)
    assert [h.endpoint for h in ordered] == ["a3", "a2", "a1", "b2", "b1", "c"]
    assert seen == [["a1", "a2", "a3"], ["b1", "b2"], ["c"]]


def test_stable_without_shuffling() -> None:
    """With a shuffle that does nothing, equal priorities keep their input order."""
    given_hops = hops(("x", 5), ("y", 5), ("z", 5), ("w", 1))
    assert [h.endpoint for h in order_hops(given_hops, shuffle=lambda group: None)] == ["w", "x", "y", "z"]


def test_order_hops_leaves_its_input_alone() -> None:
    """The input sequence is not reordered."""
    given_hops = hops(("b", 2), ("a", 1))
    order_hops(given_hops, shuffle=lambda group: group.reverse())
    assert [h.endpoint for h in given_hops] == ["b", "a"]


def test_no_hops() -> None:
    """No hops, no order."""
    assert order_hops([]) == []


@given(
    spec=st.lists(st.tuples(st.text("abcdefgh", min_size=1, max_size=3), st.integers(0, 3)), max_size=12),
    seed=st.integers(0, 2**32 - 1),
)
def test_order_is_a_priority_sorted_permutation(spec: list[tuple[str, int]], seed: int) -> None:
    """
    Whatever the shuffle does: the result is a permutation of the input with
    non-decreasing priorities; without shuffling, it is the stable sort.
    """
    given_hops = hops(*spec)
    shuffled = order_hops(given_hops, shuffle=random.Random(seed).shuffle)
    assert sorted(shuffled, key=repr) == sorted(given_hops, key=repr)
    assert [h.priority for h in shuffled] == sorted(h.priority for h in given_hops)
    assert order_hops(given_hops, shuffle=lambda group: None) == sorted(given_hops, key=lambda h: h.priority)


# -- explain -----------------------------------------------------------------


def test_explain_local_domain() -> None:
    """A local domain is explained as such, with no rule and the local verdict."""
    ex = explain(ROUTES, "alice@example.org")
    assert (ex.accepted, ex.rule_index, ex.rule, ex.hops) == (True, None, None, ())
    assert ex.reply == "250 2.1.5 Ok"
    assert "example.org is a local domain" in ex.why


def test_explain_unknown_local_user() -> None:
    """An unknown user of a local domain is refused with 5.1.1, still as local."""
    ex = explain(ROUTES, "nobody@example.org", UNTRUSTED)
    assert not ex.accepted and ex.reply.startswith("550 5.1.1 ")
    assert ex.rule_index is None and "local domain" in ex.why


def test_explain_matching_rule() -> None:
    """
    A matching relay rule is named with its index and pattern, and its next
    hops are listed in priority order (equal priorities in config order).
    """
    ex = explain(ROUTES, "someone@partner.test", TRUSTED)
    assert ex.accepted and ex.reply == "250 2.1.5 Ok"
    assert ex.rule_index == 0 and ex.rule is ROUTES.routes[0]
    assert ex.why == "route[0] matches partner.test by pattern 'partner.test': action relay"
    assert [h.endpoint for h in ex.hops] == ["tcp:192.0.2.1:25", "tcp:192.0.2.2:25", "tcp:192.0.2.3:25"]


def test_explain_normalises_the_domain() -> None:
    """The domain is matched lower-cased and without a trailing dot."""
    ex = explain(ROUTES, "Someone@PARTNER.Test.", TRUSTED)
    assert ex.rule_index == 0 and ex.accepted
    assert ex.address == "Someone@PARTNER.Test."


def test_explain_reject_rule() -> None:
    """A reject rule gives its own code, enhanced code and text."""
    ex = explain(ROUTES, "x@blocked.test", TRUSTED)
    assert not ex.accepted and ex.rule_index == 2
    assert ex.reply == "550 5.7.1 <x@blocked.test>: we do not talk to them"
    assert "action reject" in ex.why and ex.hops == ()


def test_explain_relay_refused_for_untrusted_client() -> None:
    """
    An untrusted client may not relay: 554 5.7.1 Relay access denied, while
    the explanation still names the rule that matched.
    """
    ex = explain(ROUTES, "someone@partner.test", UNTRUSTED)
    assert not ex.accepted
    assert ex.reply == "554 5.7.1 <someone@partner.test>: Relay access denied"
    assert ex.rule_index == 0


@pytest.mark.parametrize(
    ("client", "reply"),
    [(TRUSTED, "550 5.1.2 "), (UNTRUSTED, "554 5.7.1 ")],
    ids=["trusted", "untrusted"],
)
def test_explain_no_rule(client: str, reply: str) -> None:
    """
    No rule matches: refused, 550 5.1.2 for a trusted client (no route) and
    554 5.7.1 for anyone else (no open relay); the explanation says so.
    """
    ex = explain(NO_DEFAULT, "x@elsewhere.test", client)
    assert not ex.accepted and ex.reply.startswith(reply)
    assert (ex.rule_index, ex.rule, ex.hops) == (None, None, ())
    assert ex.why == "no [[route]] rule matches elsewhere.test"


@pytest.mark.parametrize(
    ("domain", "index", "pattern"),
    [
        ("a.sub.test", 1, "*.sub.test"),
        ("deep.a.sub.test", 1, "*.sub.test"),
        ("sub.test", 3, "*"),
        ("notsub.test", 3, "*"),
        ("partner.test.evil", 3, "*"),
        ("x.partner.test", 3, "*"),
    ],
)
def test_explain_wildcards(domain: str, index: int, pattern: str) -> None:
    """
    C{*.domain} matches strict subdomains at any depth, not the domain itself
    nor a name that merely ends the same way; C{*} matches the rest; the
    first matching rule wins.
    """
    ex = explain(ROUTES, f"u@{domain}", TRUSTED)
    assert ex.rule_index == index
    assert f"by pattern {pattern!r}" in ex.why


def test_explain_address_without_domain() -> None:
    """An address without a domain matches no rule unless one is C{*}."""
    ex = explain(NO_DEFAULT, "someone", TRUSTED)
    assert not ex.accepted and ex.rule_index is None
    assert ex.why == "no [[route]] rule matches (no domain)"


@pytest.mark.parametrize("cfg", [ROUTES, NO_DEFAULT], ids=["with-default-route", "without"])
def test_explain_bare_postmaster(cfg: NodeConfig) -> None:
    """Bare <postmaster> is accepted for the first local domain, and explained as local."""
    ex = explain(cfg, "postmaster", UNTRUSTED)
    assert ex.accepted
    assert ex.rule_index is None and "local domain" in ex.why
