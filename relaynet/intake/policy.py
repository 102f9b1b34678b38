# -*- test-case-name: tests.test_policy -*-
"""
Relay permission, pure: may this client send to this recipient. No I/O;
called by the intake at RCPT time.

Where a recipient goes is the routing table's decision
(L{relaynet.delivery.routing.RoutingTable}); this module adds who may use a
route: local delivery is open to everyone, a C{relay} or C{mx} route only to
trusted networks, authenticated clients, and domains of C{relay_domains}
(C{554 5.7.1} "Relay access denied" for everyone else: never an open relay).
A recipient that no rule routes is refused C{554 5.7.1} to an untrusted
client and C{550 5.1.2} to a trusted one (accepting it would only lose it
later). Queued mail is never re-checked here: relay permission is settled
at acceptance.
"""

from __future__ import annotations

import ipaddress

from attrs import frozen

from relaynet.config import NextHop, NodeConfig, RouteRule
from relaynet.delivery.routing import (
    Refusal,
    Route,
    RouteKind,
    RoutingTable,
    domain_matches,
    order_hops,
    split_address,
)


@frozen
class Verdict:
    """
    The answer to one RCPT.

    @ivar route: where the recipient goes, when accepted.
    """

    accepted: bool
    code: int
    enhanced: str
    text: str
    route: Route | None = None

    @classmethod
    def accept(cls, route: Route) -> "Verdict":
        """Accept a recipient for C{route}."""
        return cls(True, 250, "2.1.5", "Ok", route)

    @classmethod
    def refuse(cls, code: int, enhanced: str, text: str) -> "Verdict":
        """Refuse a recipient with this reply."""
        return cls(False, code, enhanced, text)


def is_trusted(config: NodeConfig, client_ip: str) -> bool:
    """C{True} when C{client_ip} is inside a trusted network."""
    try:
        ip = ipaddress.ip_address(client_ip.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in config.trusted_networks)


def check_recipient(
    config: NodeConfig, localpart: str, domain: str, client_ip: str, authenticated: bool = False,
    table: RoutingTable | None = None,
) -> Verdict:
    """
    Decide one RCPT.

    @param localpart: the recipient's local part.
    @param domain: its domain, lower case (C{""} for C{<postmaster>}).
    @param client_ip: the client's address, for relay permission.
    @param authenticated: the client has authenticated (AUTH).
    @param table: the routing table of C{config} (built when not given).
    """
    address = f"{localpart}@{domain}" if domain else localpart
    decision = (table or RoutingTable(config)).route(address)
    if isinstance(decision, Refusal):
        if decision.unrouted and not (authenticated or is_trusted(config, client_ip)):
            return Verdict.refuse(554, "5.7.1", f"<{address}>: Relay access denied")
        return Verdict.refuse(decision.code, decision.enhanced, decision.text)
    # Local and LMTP routes are final destinations (this node's or its mail
    # store's domains, as Postfix's virtual_mailbox_domains): anyone may send
    # there. Relay and MX routes need relay permission.
    if decision.kind not in (RouteKind.LOCAL, RouteKind.LMTP) and not (
        authenticated or is_trusted(config, client_ip)
        or any(domain_matches(p, domain) for p in config.relay_domains)
    ):
        return Verdict.refuse(554, "5.7.1", f"<{address}>: Relay access denied")
    return Verdict.accept(decision)


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
    localpart, domain = split_address(address)
    table = RoutingTable(config)
    verdict = check_recipient(config, localpart, domain, client_ip, table=table)
    if not domain and localpart.lower() == "postmaster" and config.local.domains:
        domain = config.local.domains[0]
    reply = f"{verdict.code} {verdict.enhanced} {verdict.text}"
    if domain in config.local.domains:
        return Explanation(address, verdict.accepted, reply, None, None,
                           f"{domain} is a local domain ([local].domains)")
    found = table.rule_for(domain)
    if found is None:
        return Explanation(address, verdict.accepted, reply, None, None,
                           f"no [[route]] rule matches {domain or '(no domain)'}")
    index, rule = found
    pattern = next(p for p in rule.domains if domain_matches(p, domain))
    return Explanation(
        address, verdict.accepted, reply, index, rule,
        f"route[{index}] matches {domain} by pattern {pattern!r}: action {rule.action}",
        tuple(order_hops(rule.next_hops, shuffle=lambda _: None)),
    )
