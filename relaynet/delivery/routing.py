# -*- test-case-name: tests.test_routing -*-
"""
The routing table, pure: where a recipient goes, as a value.

L{RoutingTable.route} matches a recipient once and returns a L{Route} (deliver
locally, relay to next hops, look up MX hosts) or a L{Refusal} (a C{reject}
rule, an unknown local user, no rule at all). The value is carried, not
re-parsed: intake decides relay permission with it (L{relaynet.intake.policy}),
the delivery attempt groups and delivers recipients by it, and the envelope
records its L{Route.name}, an identity that survives a reload reordering the
rules (a rule is named by its action and domain patterns, not by its index).

Order, for a recipient C{local@domain}:
 1. a local domain (C{[local].domains}): the user must exist (a user, an alias,
    or the catch-all), else C{550 5.1.1};
 2. otherwise the first C{[[route]]} rule whose pattern matches decides;
 3. no rule matches: a L{Refusal} C{550 5.1.2} marked C{unrouted}.

Next hops work like MX preferences: a lower C{priority} is tried first, hops of
equal priority share the load (their order is shuffled per attempt), and a
higher priority is the failover.
"""

from __future__ import annotations

import enum
import random
import re
from typing import Callable, Sequence

from attrs import frozen

from relaynet.config import LocalDelivery, NextHop, NodeConfig, RouteRule

_SAFE_USER = re.compile(r"[a-z0-9][a-z0-9._+=-]{0,63}\Z")
_MAX_ALIAS_DEPTH = 8


class RouteKind(enum.Enum):
    """What a route does with a recipient."""

    LOCAL = "local"
    RELAY = "relay"
    MX = "mx"
    LMTP = "lmtp"


@frozen
class Route:
    """
    Where an accepted recipient goes.

    @ivar kind: deliver locally, relay to the rule's next hops, or to the MX
        hosts of the recipient's domain.
    @ivar rule: the C{[[route]]} rule that matched (C{None} for a domain of
        C{[local].domains}).
    @ivar name: the route's identity, recorded in the envelope: C{"local"},
        or the rule's action and patterns (C{"relay:*.example.com"}).
    """

    kind: RouteKind
    rule: RouteRule | None = None
    name: str = "local"

    @property
    def ack(self) -> str:
        """The rule's acknowledgement mode (C{queued} or C{cut-through})."""
        return self.rule.ack if self.rule is not None else "queued"


LOCAL = Route(RouteKind.LOCAL)
"""The route of every recipient of a local domain."""


@frozen
class Refusal:
    """
    A recipient that cannot be routed, with the reply that says so.
    """

    code: int
    enhanced: str
    text: str
    unrouted: bool = False
    """No rule matched (as opposed to a rule or the local table refusing)."""

    @property
    def permanent(self) -> bool:
        """A 5xx refusal (bounce), not a 4xx one (retry)."""
        return self.code >= 500


def rule_name(rule: RouteRule) -> str:
    """The identity of a rule: its action and its domain patterns."""
    return f"{rule.action}:{','.join(rule.domains)}"


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


def split_address(address: str) -> tuple[str, str]:
    """
    C{(localpart, domain)} of an address, the domain lower-cased and without
    a trailing dot; C{(address, "")} when there is no C{@}.
    """
    localpart, at, domain = address.rpartition("@")
    if not at:
        return address, ""
    return localpart, domain.lower().rstrip(".")


class RoutingTable:
    """
    The routing decisions of one configuration. Pure and cheap to build:
    build one per configuration (a reload builds a new one).
    """

    def __init__(self, config: NodeConfig) -> None:
        """
        @param config: the node configuration whose C{[local]} domains and
            C{[[route]]} rules decide.
        """
        self.config = config

    def rule_for(self, domain: str) -> tuple[int, RouteRule] | None:
        """The first rule matching C{domain} (lower case), with its index."""
        for i, rule in enumerate(self.config.routes):
            if any(domain_matches(p, domain) for p in rule.domains):
                return i, rule
        return None

    def route(self, address: str) -> Route | Refusal:
        """
        Route one recipient.

        @param address: C{local@domain}, or a bare C{postmaster}.
        @return: a L{Route}, or a L{Refusal} (an unknown local user, a
            C{reject} rule, or no rule matching: C{unrouted}).
        """
        localpart, domain = split_address(address)
        local = self.config.local
        shown = f"{localpart}@{domain}" if domain else localpart
        if not domain:
            if localpart.lower() == "postmaster" and local.domains:
                domain = local.domains[0]
            else:
                return Refusal(550, "5.1.1", f"<{shown}>: Recipient address rejected: no domain")
        if domain in local.domains:
            return self._local(localpart, domain, shown)
        found = self.rule_for(domain)
        if found is None:
            return Refusal(
                550, "5.1.2", f"<{shown}>: Recipient address rejected: no route to domain", unrouted=True
            )
        rule = found[1]
        if rule.action == "reject":
            return Refusal(rule.code, rule.enhanced, f"<{shown}>: {rule.text}")
        if rule.action == "local":
            return self._local(localpart, domain, shown)
        kind = {"mx": RouteKind.MX, "lmtp": RouteKind.LMTP}.get(rule.action, RouteKind.RELAY)
        return Route(kind, rule, rule_name(rule))

    def _local(self, localpart: str, domain: str, shown: str) -> Route | Refusal:
        if resolve_local(self.config.local, localpart, domain):
            return LOCAL
        return Refusal(
            550, "5.1.1", f"<{shown}>: Recipient address rejected: User unknown in local recipient table"
        )


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
