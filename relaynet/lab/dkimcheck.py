# -*- test-case-name: tests.test_lab_dkim -*-
"""
C{lab check}'s DKIM part: every message delivered at the last hop after
leaving by a signing node carries signatures that verify, with the keys the
lab's DNS server publishes (looked up there, as a receiver would).

 - A delivered copy with C{DKIM-Signature} fields: each is verified
   (dkimpy, keys from the lab's DNS server); one that fails is a failure.
 - A delivered copy without one, whose Received trace shows it went
   through a signing node (C{by <its host name>}) and was delivered by
   another node, and whose From: domain is one the node signs for, is a
   failure too: it left unsigned.
 - Everything else (mail that never passed a signing node, DSNs) is not
   DKIM's business here.

The signing nodes and their domains come from their configs (C{[dkim]}
keys, C{[dkim.signing_table]}).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import dkim as dkimpy
from dkim.util import parse_tag_value
from attrs import define, field

from relaynet.delivery.dkim import from_domain
from relaynet.lab.check import _REPORT, HEADER_LIMIT, mailbox_files
from relaynet.lab.dns import txt

_RECEIVED_BY = re.compile(rb"^received:(?:[^\r\n]|\r?\n[ \t])*?\bby[ \t]+([^\s;()]+)", re.IGNORECASE | re.MULTILINE)


@define
class Signer:
    """A signing node of the lab: its host name, and the domains it signs for."""

    node: str
    hostname: str
    domains: frozenset[str]
    patterns: tuple[tuple[str, str], ...] = ()

    def signs_for(self, domain: str) -> bool:
        """Whether mail from C{domain} gets this node's signature."""
        if domain in self.domains:
            return True
        for pattern, _ in self.patterns:
            if pattern == domain or pattern == "*" or (pattern.startswith("*.") and domain.endswith(pattern[1:])):
                return True
        return False


@define
class DKIMReport:
    """
    What C{lab check} found about DKIM.

    @ivar verified: delivered copies whose every signature verified.
    @ivar signatures: (d=, s=, a=) -> how many verified.
    @ivar failed: C{(file, why)} of copies with a signature that did not verify.
    @ivar unsigned: C{(file, why)} of copies that left a signing node unsigned.
    """

    verified: int = 0
    signatures: dict[tuple[str, str, str], int] = field(factory=dict)
    failed: list[tuple[str, str]] = field(factory=list)
    unsigned: list[tuple[str, str]] = field(factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.unsigned

    def lines(self, show: int = 10) -> list[str]:
        """The report's DKIM lines."""
        sigs = ", ".join(f"d={d} s={s} {a}: {n}" for (d, s, a), n in sorted(self.signatures.items()))
        out = [f"DKIM verified:           {self.verified} delivered copies" + (f" ({sigs})" if sigs else "")]
        for title, items in (("DKIM failed", self.failed), ("left a signing node unsigned", self.unsigned)):
            if items:
                out.append(f"{title}: {len(items)}")
                out += [f"  {path}: {why}" for path, why in items[:show]]
                if len(items) > show:
                    out.append(f"  ... and {len(items) - show} more")
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "verified": self.verified,
            "signatures": [{"d": d, "s": s, "a": a, "verified": n} for (d, s, a), n in sorted(self.signatures.items())],
            "failed": [{"file": p, "why": w} for p, w in self.failed],
            "unsigned": [{"file": p, "why": w} for p, w in self.unsigned],
        }


def signers(configs: Mapping[str, Any]) -> list[Signer]:
    """The signing nodes among C{configs} (node name -> L{relaynet.config.NodeConfig})."""
    out = []
    for name, config in configs.items():
        if config.dkim.keys and (config.dkim.sign or any(r.dkim for r in config.routes)):
            out.append(Signer(
                name, config.hostname.lower(), frozenset(k.domain for k in config.dkim.keys),
                tuple(config.dkim.signing_table),
            ))
    return out


class Verifier:
    """Checks delivered copies against the keys in the lab's DNS (answers cached)."""

    def __init__(self, dns_host: str, dns_port: int, signing: list[Signer]) -> None:
        self.dns = (dns_host, dns_port)
        self.signing = signing
        self.report = DKIMReport()
        self._cache: dict[bytes, bytes] = {}

    def _lookup(self, name: bytes, timeout: int = 5) -> bytes:
        if name not in self._cache:
            records = txt(self.dns[0], self.dns[1], name.decode("ascii").rstrip("."), timeout=2.0)
            self._cache[name] = records[0] if records else b""
        return self._cache[name]

    def check_file(self, path: Path, delivered_by: str) -> None:
        """Add one delivered copy (not a DSN) at node C{delivered_by} to the report."""
        try:
            data = path.read_bytes()
        except OSError:
            return
        end = data.find(b"\r\n\r\n")
        if end < 0:
            end = data.find(b"\n\n")
        head = data if end < 0 else data[:end + 2]
        fields = _signature_fields(head)
        if fields:
            bad = []
            for i, value in enumerate(fields):
                v = dkimpy.DKIM(data)
                try:
                    ok = bool(v.verify(idx=i, dnsfunc=self._lookup))
                    why = "signature did not verify"
                except dkimpy.DKIMException as e:
                    ok, why = False, str(e)
                try:
                    tags = {k.decode(): val.decode() for k, val in parse_tag_value(value).items()}
                except Exception:  # a field dkimpy cannot parse: already a failure above
                    tags = {}
                d, sel, a = tags.get("d", "?"), tags.get("s", "?"), tags.get("a", "?")
                if ok:
                    self.report.signatures[(d, sel, a)] = self.report.signatures.get((d, sel, a), 0) + 1
                else:
                    bad.append(f"d={d} s={sel}: {why}")
            if bad:
                self.report.failed.append((str(path), "; ".join(bad)))
            else:
                self.report.verified += 1
            return
        by = {h.decode("ascii", "replace").lower().rstrip(".") for h in _RECEIVED_BY.findall(head)}
        domain, _ = from_domain(head if head.endswith(b"\r\n") else head.replace(b"\n", b"\r\n"))
        for s in self.signing:
            if s.hostname in by and s.node != delivered_by and domain is not None and s.signs_for(domain):
                self.report.unsigned.append((str(path), f"from {domain}, relayed by {s.node}, no DKIM-Signature"))
                return


def _signature_fields(head: bytes) -> list[bytes]:
    """The value of each DKIM-Signature field of a header section, unfolded, in order."""
    out, cur = [], None
    for line in head.replace(b"\r\n", b"\n").split(b"\n"):
        if line[:1] in (b" ", b"\t") and cur is not None:
            cur += line
            continue
        if cur is not None:
            out.append(cur)
            cur = None
        if line.lower().startswith(b"dkim-signature:"):
            cur = line.split(b":", 1)[1]
    if cur is not None:
        out.append(cur)
    return out


def check_lab(nodes: Mapping[str, Mapping[str, Any]], dns: Mapping[str, Any] | None) -> DKIMReport | None:
    """
    Check every delivered copy in the lab's Maildirs; C{None} when no node
    signs (or the lab has no DNS server to publish keys).

    @param nodes: node name -> its lab record (C{config}, C{mailroot}).
    @param dns: the lab's DNS server record (C{address}, C{port}).
    """
    from relaynet.config import ConfigError, load_config

    configs = {}
    for name, rec in nodes.items():
        try:
            configs[name] = load_config(rec["config"])
        except (ConfigError, KeyError):
            continue
    signing = signers(configs)
    if not signing or dns is None:
        return None
    verifier = Verifier(dns["address"], int(dns["port"]), signing)
    for name, rec in nodes.items():
        for path in mailbox_files(rec):
            try:
                with open(path, "rb") as f:
                    head = f.read(HEADER_LIMIT)
            except OSError:
                continue
            if not _REPORT.search(head):  # a DSN is not DKIM's business here
                verifier.check_file(path, name)
    return verifier.report
