# -*- test-case-name: tests.test_zones -*-
"""
DNS zones written as a few lines each, answered by L{twisted.names}: the
authoritative server of a lab (C{relaynet lab up} serves a topology's
C{[dns.zones]}), and the in-process resolver of tests.

A zone is its origin and a list of records, one per line, in the order of a
master file (RFC 1035 5.1) without its punctuation::

    "@ MX 10 mx1"                 # @ is the origin; relative names get it appended
    "@ MX 20 mx2.example.net."    # a trailing dot: absolute
    "mx1 300 A 127.0.0.5"         # an optional TTL (default: the zone's)
    "mx1 AAAA ::1"
    "null.test. MX 0 ."           # a null MX (RFC 7505)
    "www CNAME mx1"
    "_mta-sts TXT v=STSv1; id=1"  # the rest of the line is the text
    "_25._tcp.mx1 TLSA 3 1 1 <hex>"

Each zone gets an SOA (and NS) record of its own; a name under the origin
without records is NXDOMAIN, a name with other records only is an empty
answer (NODATA), as a real authoritative server answers.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Iterable, Mapping, Sequence

from twisted.names import authority, dns, resolve

DEFAULT_TTL = 300

TLSA = 52
"""The TLSA record type (RFC 6698), which L{twisted.names.dns} has no class for."""


class ZoneError(ValueError):
    """A record line that cannot be understood; the message names it."""


class Record_TLSA(dns.UnknownRecord):
    """A TLSA record: usage, selector, matching type and the association data."""

    TYPE = TLSA  # type: ignore[assignment]  # None in UnknownRecord (Twisted 26.10)

    def __init__(self, usage: int, selector: int, matching: int, data: bytes, ttl: int | None = None) -> None:
        super().__init__(bytes([usage, selector, matching]) + data, ttl)  # type: ignore[no-untyped-call]
        self.usage, self.selector, self.matching, self.association = usage, selector, matching, data


class Zone(authority.FileAuthority):
    """
    One zone in memory, answered by Twisted's authority logic (NXDOMAIN,
    NODATA with the SOA, CNAMEs, additional address records).
    """

    def __init__(self, origin: str, lines: Sequence[str], default_ttl: int = DEFAULT_TTL) -> None:
        self._origin = origin.rstrip(".").lower()
        self._lines = list(lines)
        self._default_ttl = default_ttl
        super().__init__(origin)  # type: ignore[no-untyped-call]  # unannotated in Twisted 26.10

    def loadFile(self, filename: Any) -> None:  # noqa: N802 - Twisted's name
        origin = self._origin
        ttl = self._default_ttl
        soa = dns.Record_SOA(
            mname=b"ns." + origin.encode(), rname=b"hostmaster." + origin.encode(), serial=1,
            refresh=3600, retry=600, expire=ttl, minimum=ttl, ttl=ttl,
        )
        self.soa = (origin.encode(), soa)  # type: ignore[assignment]  # typed None in Twisted 26.10
        records: dict[bytes, list[Any]] = {
            origin.encode().lower(): [soa, dns.Record_NS(b"ns." + origin.encode(), ttl=ttl)],
        }
        self.records = records  # type: ignore[assignment]  # typed None in Twisted 26.10
        for number, line in enumerate(self._lines, 1):
            try:
                name, record = parse_record(line, origin, ttl)
            except ZoneError as e:
                raise ZoneError(f"zone {origin}, record {number} ({line!r}): {e}") from None
            records.setdefault(name.encode().lower(), []).append(record)

    @property
    def origin(self) -> str:
        return self._origin


def _absolute(name: str, origin: str) -> str:
    """C{name} made absolute (no trailing dot in the result, lower case)."""
    if name == "@":
        return origin
    if name.endswith("."):
        return name[:-1].lower()
    return f"{name}.{origin}".lower() if origin else name.lower()


_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')


def parse_record(line: str, origin: str, default_ttl: int = DEFAULT_TTL) -> tuple[str, Any]:
    """
    One record line: C{NAME [TTL] [IN] TYPE DATA...}.

    @return: the absolute owner name and a L{twisted.names.dns} record.
    @raise ZoneError: the line is not a record we know.
    """
    parts = line.split()
    if len(parts) < 3:
        raise ZoneError("expected NAME [TTL] TYPE DATA")
    name = _absolute(parts[0], origin)
    rest = parts[1:]
    ttl = default_ttl
    if rest[0].isdigit():
        ttl = int(rest[0])
        rest = rest[1:]
    if len(rest) > 2 and rest[0].upper() == "IN":
        rest = rest[1:]  # the class, as a zone file may give it
    if len(rest) < 2:
        raise ZoneError("expected TYPE DATA after the name")
    kind, data = rest[0].upper(), rest[1:]

    def target(word: str) -> bytes:
        return b"" if word == "." else _absolute(word, origin).encode()

    try:
        if kind == "A":
            return name, dns.Record_A(str(ipaddress.IPv4Address(data[0])), ttl=ttl)
        if kind == "AAAA":
            return name, dns.Record_AAAA(str(ipaddress.IPv6Address(data[0])), ttl=ttl)
        if kind == "MX":
            return name, dns.Record_MX(int(data[0]), target(data[1]), ttl=ttl)
        if kind == "CNAME":
            return name, dns.Record_CNAME(target(data[0]), ttl=ttl)
        if kind == "NS":
            return name, dns.Record_NS(target(data[0]), ttl=ttl)
        if kind == "TXT":
            text = line.split(rest[0], 1)[1].strip()
            if text.startswith('"'):
                # One or more quoted character-strings (RFC 1035 5.1), as
                # a zone file has them: a DKIM record's are joined by the
                # reader, so the record is their concatenation.
                strings = _QUOTED.findall(text)
                if _QUOTED.sub("", text).strip():
                    raise ValueError(f"not a sequence of quoted strings: {text}")
                raw = "".join(s.replace('\\"', '"').replace("\\\\", "\\") for s in strings).encode("utf-8")
            else:
                raw = text.encode("utf-8")
            return name, dns.Record_TXT(*[raw[i:i + 255] for i in range(0, len(raw), 255)] or [b""], ttl=ttl)
        if kind == "TLSA":
            return name, Record_TLSA(int(data[0]), int(data[1]), int(data[2]), bytes.fromhex("".join(data[3:])), ttl)
    except (ValueError, IndexError) as e:
        raise ZoneError(f"bad {kind} data: {e}") from None
    raise ZoneError(f"record type {kind} is not supported (A, AAAA, MX, CNAME, NS, TXT, TLSA)")


def zones(spec: Mapping[str, Iterable[str]], default_ttl: int = DEFAULT_TTL) -> list[Zone]:
    """One L{Zone} per origin of C{spec} (origin -> record lines)."""
    return [Zone(origin, list(lines), default_ttl) for origin, lines in spec.items()]


def resolver(spec: Mapping[str, Iterable[str]] | Sequence[Zone]) -> Any:
    """
    An in-process L{twisted.names} resolver answering from zones, as the
    lab's server would over the network (a name outside every zone fails
    with L{twisted.names.error.DomainError}).
    """
    found = zones(spec) if isinstance(spec, Mapping) else list(spec)
    return resolve.ResolverChain(found)


__all__ = ["DEFAULT_TTL", "Record_TLSA", "TLSA", "Zone", "ZoneError", "parse_record", "resolver", "zones"]
