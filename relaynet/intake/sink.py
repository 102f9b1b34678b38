# -*- test-case-name: tests.test_sink -*-
"""
A test sink's answers (C{[sink]}, issue 14 item 6): a node that plays a
receiving provider in a lab answers each recipient as its rules say:
accepted, a temporary or permanent failure, a throttling C{421} that ends
the session, after a delay, for the first N times or always. Shaping,
retries, bounce classes and suppression can then be watched working.

    [sink]
    rules = [
      { match = "gone*@*",  reply = "550 5.1.1 No such user" },
      { match = "full*@*",  reply = "452 4.2.2 Mailbox full", times = 2 },
      { match = "busy*@*",  reply = "421 4.7.0 Too many connections, slow down", times = 1 },
      { match = "slow*@*",  delay = 2.0 },
      { match = "*",        reply = "accept" },
    ]

The first rule whose C{match} (a shell pattern, case-insensitive) fits
the recipient decides; no rule: accepted. C{times = N}: the reply for the
first N times this recipient is seen (per node run), accepted after. A
C{421} reply closes the session after it (RFC 5321 3.8). Accepted mail is
queued and delivered as usual (a sink node's local domains: catch-all
mailboxes), so C{lab check} counts it.

Pure: L{SinkRules.decide} counts what it saw and returns a L{SinkAnswer}.
"""

from __future__ import annotations

import fnmatch
from typing import Sequence

from attrs import frozen

from relaynet.config import SinkRule


@frozen
class SinkAnswer:
    """What to answer one RCPT: C{code} C{None} means accept (after C{delay} seconds)."""

    code: int | None = None
    enhanced: str = ""
    text: str = ""
    delay: float = 0.0

    @property
    def closes(self) -> bool:
        """A 421 ends the session."""
        return self.code == 421


class SinkRules:
    """The rules of a sink, and how many times each recipient was seen."""

    def __init__(self, rules: Sequence[SinkRule]) -> None:
        self.rules = tuple(rules)
        self.seen: dict[str, int] = {}

    def decide(self, address: str) -> SinkAnswer:
        """The answer to C{RCPT TO:<address>}."""
        addr = address.lower()
        for rule in self.rules:
            if fnmatch.fnmatchcase(addr, rule.match.lower()):
                n = self.seen[addr] = self.seen.get(addr, 0) + 1
                if rule.code is None or (rule.times and n > rule.times):
                    return SinkAnswer(delay=rule.delay)
                return SinkAnswer(rule.code, rule.enhanced, rule.text, rule.delay)
        return SinkAnswer()


__all__ = ["SinkAnswer", "SinkRules"]
