# -*- test-case-name: tests.test_mx -*-
"""
Where mail for a domain goes by DNS (RFC 5321 section 5, RFC 7505), as
Postfix's SMTP client decides it.

 - MX records are looked up with an MX query (never ANY: RFC 8482 servers
   answer those minimally), sorted by preference, equal preferences shuffled.
 - Each exchanger's A and AAAA records are looked up (address family order
   from C{[outbound] address_preference}: C{ipv4}, C{ipv6} or C{any}, a random
   choice per exchanger as Postfix's C{smtp_address_preference = any}); the
   other family is the fallback. At most C{mx_address_limit} addresses in
   all (Postfix's C{smtp_mx_address_limit}).
 - No MX record: the domain itself is the exchanger (implicit MX). A null MX
   (a single C{MX 0 .}) bounces at once, 5.1.10. The domain does not exist
   (NXDOMAIN): 5.1.2. A server failure or a timeout: deferred, 4.4.3.
 - An exchanger that is this node (its host name, or an address and port it
   listens on) ends the list: only the exchangers preferred over it are
   used, as Postfix does for a backup MX; if there are none, the mail loops
   back to this node: 5.4.6.
 - Answers are cached for their TTL (negative answers for
   L{NEGATIVE_TTL} at most).

L{MXLookup.lookup} gives an L{MXAnswer}: the exchangers with their addresses
in the order to try, or why there is nowhere to go.
"""

from __future__ import annotations

import ipaddress
import random
import socket
from typing import Any, Callable, Iterable

from attrs import frozen
from twisted.internet import defer
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.names import dns, error

from relaynet.config import NextHop, NodeConfig

NEGATIVE_TTL = 300.0
"""The longest time a "no such name" or "no such record" answer is kept."""

DNS_TIMEOUT = (1.0, 3.0, 6.0)
"""
Seconds to wait for each try of a query (Twisted's own default, 1+3+11+45 s,
holds an attempt a minute on a dead server; Postfix's resolver gives up
after about 10 s).
"""

_NOT_FOUND = (error.DNSNameError, error.AuthoritativeDomainError)


@frozen
class Exchanger:
    """One mail exchanger: its name, MX preference and addresses in the order to try."""

    name: str
    preference: int
    addresses: tuple[str, ...]


@frozen
class MXAnswer:
    """
    Where mail for C{domain} goes.

    @ivar exchangers: in the order to try (loops cut off), with addresses.
    @ivar implicit: the domain had no MX record; its own address records are used.
    @ivar failure: C{(status, dsn, text)} (status C{"bounced"} or
        C{"deferred"}) when there is nowhere to go; then C{exchangers} is empty.
    @ivar notes: lookups that failed on the way (an exchanger without an
        address, a transient error for one of them), for C{relaynet route}.
    """

    domain: str
    exchangers: tuple[Exchanger, ...] = ()
    implicit: bool = False
    failure: tuple[str, str, str] | None = None
    notes: tuple[str, ...] = ()

    def hops(self, port: int, address_limit: int = 0) -> list[tuple[Exchanger, str, NextHop]]:
        """
        The addresses to try, in order, at most C{address_limit} (0: all),
        each with its exchanger and a L{NextHop} for the SMTP client.
        """
        out: list[tuple[Exchanger, str, NextHop]] = []
        for ex in self.exchangers:
            for address in ex.addresses:
                if address_limit and len(out) >= address_limit:
                    return out
                literal = address.replace(":", "\\:")
                out.append((ex, address, NextHop(endpoint=f"tcp:{literal}:{port}", priority=ex.preference)))
        return out


def relay_name(exchanger: Exchanger, address: str, port: int) -> str:
    """How Postfix names a relay in its log: C{mx.example.com[192.0.2.1]:25}."""
    return f"{exchanger.name}[{address}]:{port}"


@frozen
class _Cached:
    expires: float
    value: Any


class MXLookup:
    """
    MX and address lookups through an L{twisted.names} resolver, with a
    TTL cache.

    @param resolver: an L{IResolver} (C{lookupMailExchange},
        C{lookupAddress}, C{lookupIPV6Address}).
    @param clock: seconds (the reactor's).
    @param own_names: this node's host names (lower case, no trailing dot).
    @param own_endpoints: the C{(address, port)} pairs it listens on; an
        unspecified address (C{0.0.0.0}, C{::}) stands for every loopback
        address.
    @param preference: C{"ipv4"}, C{"ipv6"} or C{"any"}.
    @param shuffle: shuffles exchangers of equal preference in place (tests
        inject a fixed order).
    """

    def __init__(
        self,
        resolver: Any,
        clock: Callable[[], float],
        own_names: Callable[[], Iterable[str]] = tuple,
        own_endpoints: Callable[[], Iterable[tuple[str, int]]] = tuple,
        preference: Callable[[], str] = lambda: "any",
        shuffle: Callable[[list[Any]], None] = random.shuffle,
        choose: Callable[[], bool] = lambda: random.random() < 0.5,
        timeout: tuple[float, ...] = DNS_TIMEOUT,
    ) -> None:
        self.resolver = resolver
        self.clock = clock
        self.own_names = own_names
        self.own_endpoints = own_endpoints
        self.preference = preference
        self.shuffle = shuffle
        self.choose = choose
        self.timeout = timeout
        self._cache: dict[tuple[str, int], _Cached] = {}

    @classmethod
    def for_config(
        cls, resolver: Any, clock: Callable[[], float], config: Callable[[], NodeConfig],
        shuffle: Callable[[list[Any]], None] = random.shuffle,
    ) -> "MXLookup":
        """
        The lookup a node makes: itself is its C{hostname} and the addresses
        of its listeners, its address preference is C{[outbound]}'s, all read
        from C{config()} (the configuration in force) at each lookup.
        """
        return cls(
            resolver, clock,
            own_names=lambda: [config().hostname],
            own_endpoints=lambda: config().listen_addresses,
            preference=lambda: config().outbound.address_preference,
            shuffle=shuffle,
        )

    # -- cached queries ------------------------------------------------------

    @inlineCallbacks
    def _query(self, name: str, qtype: int) -> Any:
        """
        The records of C{qtype} at C{name}: a list of payloads (empty: no
        data), or raises L{error.DNSNameError} (cached too) or a transient error.
        """
        key = (name.lower(), qtype)
        now = self.clock()
        hit = self._cache.get(key)
        if hit is not None and hit.expires > now:
            if isinstance(hit.value, BaseException):
                raise hit.value
            return hit.value
        method = {dns.MX: "lookupMailExchange", dns.A: "lookupAddress", dns.AAAA: "lookupIPV6Address"}[qtype]
        try:
            answers, authority, _ = yield getattr(self.resolver, method)(name, self.timeout)
        except _NOT_FOUND as e:
            self._cache[key] = _Cached(now + NEGATIVE_TTL, e)
            raise
        records = [a for a in answers if a.type == qtype]
        if records:
            ttl = min(a.ttl for a in records)
        else:
            # NODATA: kept as the zone's SOA says (RFC 2308 section 5).
            ttl = min([NEGATIVE_TTL] + [
                min(a.ttl, a.payload.minimum) for a in authority if a.type == dns.SOA
            ])
        value = [a.payload for a in records]
        if ttl > 0:
            self._cache[key] = _Cached(now + min(ttl, 86400), value)
        return value

    # -- the lookup ----------------------------------------------------------

    @inlineCallbacks
    def lookup(self, domain: str, port: int = 25) -> Any:
        """
        An L{MXAnswer} for C{domain} (never fails).

        @param port: the SMTP port the exchangers will be tried on (an
            exchanger whose address and C{port} this node listens on is this node).
        """
        domain = domain.rstrip(".").lower()
        try:
            records = yield self._query(domain, dns.MX)
        except _NOT_FOUND:
            return MXAnswer(domain, failure=(
                "bounced", "5.1.2",
                f"Host or domain name not found. Name service error for name={domain} type=MX: Host not found",
            ))
        except Exception as e:
            return MXAnswer(domain, failure=(
                "deferred", "4.4.3",
                f"Host or domain name not found. Name service error for name={domain} type=MX:"
                f" Host not found, try again ({_why(e)})",
            ))
        mxs = [(int(r.preference), str(r.name).rstrip(".").lower()) for r in records]
        if any(name == "" for _, name in mxs):
            # RFC 7505: "MX 0 ." says the domain accepts no mail.
            return MXAnswer(domain, failure=(
                "bounced", "5.1.10", f"Domain {domain} does not accept mail (nullMX)",
            ))
        implicit = not mxs
        if implicit:
            mxs = [(0, domain)]
        ordered = self._ordered(mxs)
        found = yield self._addresses([name for _, name in ordered])
        exchangers, notes, transient, missing = [], [], False, 0
        for (pref, name), (addresses, problem) in zip(ordered, found):
            if problem == "transient":
                transient = True
                notes.append(f"{name}: address lookup failed, try again")
            elif not addresses:
                missing += 1
                notes.append(f"{name}: no A or AAAA record")
            exchangers.append(Exchanger(name, pref, tuple(addresses)))
        exchangers, loop_pref = self._cut_loop(exchangers, port)
        if loop_pref is not None:
            notes.append(f"this node is an exchanger of {domain} at preference {loop_pref}:"
                         " only exchangers preferred over it are used")
        if loop_pref is not None and not exchangers:
            return MXAnswer(domain, implicit=implicit, notes=tuple(notes), failure=(
                "bounced", "5.4.6", f"mail for {domain} loops back to myself",
            ))
        usable = tuple(ex for ex in exchangers if ex.addresses)
        if not usable:
            if transient:
                failure = ("deferred", "4.4.3",
                           f"Host or domain name not found: no address for the mail exchangers of {domain}, try again")
            elif implicit:
                failure = ("bounced", "5.1.2",
                           f"Host or domain name not found: {domain} has no MX and no address record")
            else:
                failure = ("bounced", "5.4.4",
                           f"Host not found: no mail exchanger of {domain} has an address")
            return MXAnswer(domain, implicit=implicit, notes=tuple(notes), failure=failure)
        return MXAnswer(domain, usable, implicit, notes=tuple(notes))

    def _ordered(self, mxs: list[tuple[int, str]]) -> list[tuple[int, str]]:
        """By preference; equal preferences in random order (RFC 5321 5.1)."""
        out: list[tuple[int, str]] = []
        for pref in sorted({p for p, _ in mxs}):
            same = sorted({n for p, n in mxs if p == pref})
            group = [(pref, n) for n in same]
            self.shuffle(group)
            out += group
        return out

    @inlineCallbacks
    def _addresses(self, names: list[str]) -> Any:
        """Per name: (addresses in family order, None | "transient")."""
        from twisted.internet.defer import gatherResults

        def one(name: str) -> Deferred[Any]:
            return gatherResults(
                [self._family(name, dns.A), self._family(name, dns.AAAA)], consumeErrors=True
            ).addCallback(lambda pair: self._merge(pair[0], pair[1]))

        result = yield gatherResults([one(n) for n in names], consumeErrors=True)
        return result

    @inlineCallbacks
    def _family(self, name: str, qtype: int) -> Any:
        try:
            records = yield self._query(name, qtype)
        except _NOT_FOUND:
            return ([], None)
        except Exception:
            return ([], "transient")
        if qtype == dns.A:
            return ([r.dottedQuad() for r in records], None)
        return ([socket.inet_ntop(socket.AF_INET6, r.address) for r in records], None)

    def _merge(self, v4: tuple[list[str], str | None], v6: tuple[list[str], str | None]) -> tuple[list[str], str | None]:
        preference = self.preference()
        six_first = preference == "ipv6" or (preference == "any" and self.choose())
        first, second = (v6, v4) if six_first else (v4, v6)
        addresses = first[0] + second[0]
        problem = "transient" if not addresses and "transient" in (v4[1], v6[1]) else None
        return addresses, problem

    def _is_self(self, ex: Exchanger, port: int) -> bool:
        if ex.name in {n.rstrip(".").lower() for n in self.own_names()}:
            return True
        for address, listening in set(self.own_endpoints()):
            if listening != port:
                continue
            if address in ("0.0.0.0", "::", ""):
                if any(_is_local(a) for a in ex.addresses):
                    return True
            elif address in ex.addresses:
                return True
        return False

    def _cut_loop(self, exchangers: list[Exchanger], port: int) -> tuple[list[Exchanger], int | None]:
        """
        Drop this node and every exchanger not preferred over it (RFC 5321
        5.1); @return: what is left, and the preference at which this node
        was found (None: it is not an exchanger).
        """
        for ex in exchangers:
            if self._is_self(ex, port):
                return [e for e in exchangers if e.preference < ex.preference], ex.preference
        return exchangers, None


_LOCAL: dict[str, bool] = {}


def _is_local(address: str) -> bool:
    """
    C{address} is one of this host's (loopback, or an interface's): a
    listener on every address (C{0.0.0.0}, C{::}) answers there. Tested by
    binding a throwaway socket to it (no packet is sent), remembered.
    """
    known = _LOCAL.get(address)
    if known is None:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if ip.is_loopback:
            known = True
        else:
            family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
            try:
                with socket.socket(family, socket.SOCK_DGRAM) as s:
                    s.bind((address, 0))
                known = True
            except OSError:
                known = False
        if len(_LOCAL) < 4096:
            _LOCAL[address] = known
    return known


def _why(e: BaseException) -> str:
    # After its last retry Twisted's client.Resolver fails with
    # defer.TimeoutError, the base class of DNSQueryTimeoutError.
    if isinstance(e, defer.TimeoutError):
        return "timeout"
    if isinstance(e, error.DNSServerError):
        return "server failure"
    if isinstance(e, error.DNSQueryRefusedError):
        return "refused"
    return type(e).__name__


__all__ = ["Exchanger", "MXAnswer", "MXLookup", "NEGATIVE_TTL", "relay_name"]
