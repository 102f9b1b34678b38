# -*- test-case-name: tests.test_policy -*-
"""
Pure intake decisions: may this client send to this recipient, and where does
the recipient go. No I/O; called by the intake at RCPT time.

Order, for a recipient C{local@domain}:
 1. a local domain (C{[local].domains}): the user must exist (a user, an alias,
    or the catch-all), else C{550 5.1.1};
 2. otherwise the first matching C{[[route]]} rule decides: C{reject} with its
    code; C{local} like 1; C{relay} only for trusted networks (C{554 5.7.1}
    "Relay access denied" for everyone else: never an open relay);
 3. no rule matches: C{554 5.7.1} for an untrusted client, C{550 5.1.2} for a
    trusted one (accepting it would only lose it later).
"""

from __future__ import annotations

import ipaddress
import re

from attrs import frozen

from relaynet.config import LocalDelivery, NodeConfig, RouteRule

_SAFE_USER = re.compile(r"[a-z0-9][a-z0-9._+=-]{0,63}\Z")
_MAX_ALIAS_DEPTH = 8


@frozen
class Verdict:
    """
    The answer to one RCPT.

    @ivar route: C{"local"} or C{"relay:N"} (index of the route rule) when
        accepted.
    """

    accepted: bool
    code: int
    enhanced: str
    text: str
    route: str = ""

    @classmethod
    def accept(cls, route: str) -> "Verdict":
        return cls(True, 250, "2.1.5", "Ok", route)

    @classmethod
    def refuse(cls, code: int, enhanced: str, text: str) -> "Verdict":
        return cls(False, code, enhanced, text)


def domain_matches(pattern: str, domain: str) -> bool:
    """
    Match a routing pattern: C{"*"}, C{"*.sub.example"} (strict subdomains) or an
    exact domain. Both sides are lower-case.
    """
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return domain.endswith(pattern[1:])
    return domain == pattern


def resolve_local(local: LocalDelivery, localpart: str, domain: str) -> list[tuple[str, str]]:
    """
    Expand a local recipient into mailboxes, following aliases.

    @return: C{(domain, user)} pairs (empty when the address is unknown).
    """
    seen: set[str] = set()
    out: list[tuple[str, str]] = []

    def expand(user: str, dom: str, depth: int) -> None:
        key = f"{user}@{dom}"
        if key in seen or depth > _MAX_ALIAS_DEPTH:
            return
        seen.add(key)
        targets = local.aliases.get(key) or local.aliases.get(user)
        if targets is not None:
            for t in targets:
                tuser, _, tdom = t.partition("@")
                tdom = tdom or dom
                if tdom in local.domains:
                    expand(tuser, tdom, depth + 1)
            return
        if not _SAFE_USER.match(user):
            return
        if local.catch_all or user in local.users or key in local.users:
            if (dom, user) not in out:
                out.append((dom, user))

    expand(localpart.lower(), domain.lower(), 0)
    return out


def is_trusted(config: NodeConfig, client_ip: str) -> bool:
    """C{True} when C{client_ip} is inside a trusted network."""
    try:
        ip = ipaddress.ip_address(client_ip.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in config.trusted_networks)


def find_route(routes: tuple[RouteRule, ...], domain: str) -> int | None:
    """Index of the first rule matching C{domain}, or C{None}."""
    for i, rule in enumerate(routes):
        if any(domain_matches(p, domain) for p in rule.domains):
            return i
    return None


def check_recipient(
    config: NodeConfig, localpart: str, domain: str, client_ip: str, authenticated: bool = False
) -> Verdict:
    """
    Decide one RCPT.

    @param localpart: the recipient's local part.
    @param domain: its domain, lower case (C{""} for C{<postmaster>}).
    @param client_ip: the client's address, for relay permission.
    @param authenticated: the client has authenticated (AUTH).
    """
    address = f"{localpart}@{domain}" if domain else localpart
    local = config.local
    if not domain:
        if localpart.lower() == "postmaster" and local.domains:
            domain = local.domains[0]
        else:
            return Verdict.refuse(550, "5.1.1", f"<{address}>: Recipient address rejected: no domain")
    if domain in local.domains:
        return _local_verdict(local, localpart, domain, address)
    index = find_route(config.routes, domain)
    if index is None:
        if authenticated or is_trusted(config, client_ip):
            return Verdict.refuse(
                550, "5.1.2", f"<{address}>: Recipient address rejected: no route to domain"
            )
        return Verdict.refuse(554, "5.7.1", f"<{address}>: Relay access denied")
    rule = config.routes[index]
    if rule.action == "reject":
        return Verdict.refuse(rule.code, rule.enhanced, f"<{address}>: {rule.text}")
    if rule.action == "local":
        return _local_verdict(local, localpart, domain, address)
    if not (
        authenticated or is_trusted(config, client_ip)
        or any(domain_matches(p, domain) for p in config.relay_domains)
    ):
        return Verdict.refuse(554, "5.7.1", f"<{address}>: Relay access denied")
    return Verdict.accept(f"relay:{index}")


def _local_verdict(local: LocalDelivery, localpart: str, domain: str, address: str) -> Verdict:
    if resolve_local(local, localpart, domain):
        return Verdict.accept("local")
    return Verdict.refuse(
        550, "5.1.1", f"<{address}>: Recipient address rejected: User unknown in local recipient table"
    )
