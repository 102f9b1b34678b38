# -*- test-case-name: tests.test_routing -*-
"""
Routing, pure: which rule takes a recipient, and in which order to try the
next hops of a relay route.

Next hops work like MX preferences: a lower C{priority} is tried first, hops of
equal priority share the load (their order is shuffled per attempt), and a
higher priority is the failover.
"""

from __future__ import annotations

import random
from typing import Callable, Sequence

from attrs import frozen

from relaynet.config import NextHop, NodeConfig, RouteRule
from relaynet.intake.policy import check_recipient, find_route


def order_hops(
    hops: Sequence[NextHop], shuffle: Callable[[list[NextHop]], None] = random.shuffle
) -> list[NextHop]:
    """
    The order in which to try C{hops}: by ascending priority, equal priorities
    in a shuffled order.

    @param shuffle: shuffles a list in place; injected by tests.
    """
    out: list[NextHop] = []
    for prio in sorted({h.priority for h in hops}):
        group = [h for h in hops if h.priority == prio]
        shuffle(group)
        out.extend(group)
    return out


@frozen
class Explanation:
    """What C{relaynet route} prints: the decision and why."""

    address: str
    accepted: bool
    reply: str
    rule_index: int | None
    rule: RouteRule | None
    why: str
    hops: tuple[NextHop, ...] = ()


def explain(config: NodeConfig, address: str, client_ip: str = "127.0.0.1") -> Explanation:
    """
    Explain how C{address} would be routed for a client at C{client_ip}.
    """
    localpart, _, domain = address.rpartition("@")
    if not localpart:
        localpart, domain = address, ""
    domain = domain.lower().rstrip(".")
    verdict = check_recipient(config, localpart, domain, client_ip)
    if not domain and localpart.lower() == "postmaster" and config.local.domains:
        domain = config.local.domains[0]
    reply = f"{verdict.code} {verdict.enhanced} {verdict.text}"
    if domain in config.local.domains:
        return Explanation(address, verdict.accepted, reply, None, None,
                           f"{domain} is a local domain ([local].domains)")
    index = find_route(config.routes, domain)
    if index is None:
        return Explanation(address, verdict.accepted, reply, None, None,
                           f"no [[route]] rule matches {domain or '(no domain)'}")
    rule = config.routes[index]
    pattern = next(p for p in rule.domains if _match(p, domain))
    return Explanation(
        address, verdict.accepted, reply, index, rule,
        f"route[{index}] matches {domain} by pattern {pattern!r}: action {rule.action}",
        tuple(order_hops(rule.next_hops, shuffle=lambda _: None)),
    )


def _match(pattern: str, domain: str) -> bool:
    from relaynet.intake.policy import domain_matches

    return domain_matches(pattern, domain)
