# -*- test-case-name: tests.test_suppression -*-
"""
Bounce classification, pure: what kind of failure a delivery outcome is.

L{classify} maps an outcome's RFC 3463 enhanced status code, its SMTP reply
code and its diagnostic text to one L{BounceClass}. No I/O; the rules are
data, checked in this order (the first that matches decides):

 1. the configured patterns (C{[suppression.patterns]}: regular
    expressions on the diagnostic, per class), so an operator can correct
    any built-in rule for a provider's wording;
 2. enhanced codes that say one thing whatever the text (RFC 3463):
    C{X.1.1} bad destination mailbox, C{X.1.10} recipient with a null MX
    (RFC 7505), C{X.1.3} bad mailbox syntax, C{X.1.6} mailbox moved,
    C{5.2.1} mailbox disabled: invalid recipient; C{5.1.2} no such
    destination system: DNS; C{X.2.2} mailbox full;
    C{X.7.5} cryptographic failure, C{X.7.4} security features not
    supported, C{X.7.10}/C{X.7.11} encryption needed/required (RFC 5248):
    TLS; C{X.7.28} sending rate too high (Gmail), C{4.2.1} receiving at
    too high a rate (Gmail), C{X.5.3} too many recipients: rate limit;
 3. the texts providers use, which say more than a generic code: block
    lists and reputation (C{blocked}, C{spamhaus}, C{blacklist}...),
    rate limits (C{rate limit}, C{too many connections}, C{try again
    later}...), spam and policy (C{spam}, C{DMARC}...), content
    (C{virus}, C{content rejected}...), DNS (C{host not found}...), TLS,
    mailbox full (C{over quota}...) and unknown users (C{user unknown}...);
 4. the enhanced code's subject (RFC 3463 3.x): C{X.4.x} network and
    routing (DNS, no answer, no route: C{dns}), C{X.6.x} media and C{X.3.4} message too big
    (C{content}), C{X.7.x} security or policy (C{policy});
 5. anything else: C{other}.

A permanent (5xx) C{invalid-recipient} outcome is what suppression acts on
(L{relaynet.queue.suppression}); the class is in the C{bounced},
C{deferred} and C{expired} events (C{class}, docs/events.md).
"""

from __future__ import annotations

import enum
import re
from typing import Iterable, Mapping

from attrs import field, frozen


class BounceClass(str, enum.Enum):
    """The kinds of delivery failure (the C{class} field of events)."""

    INVALID_RECIPIENT = "invalid-recipient"
    MAILBOX_FULL = "mailbox-full"
    POLICY = "policy"
    REPUTATION = "reputation"
    DNS = "dns"
    TLS = "tls"
    CONTENT = "content"
    RATE_LIMIT = "rate-limit"
    OTHER = "other"

    def __str__(self) -> str:
        return self.value


#: Every class name, in the order of L{BounceClass}.
CLASSES: tuple[str, ...] = tuple(c.value for c in BounceClass)

_C = BounceClass

# Rule 2: (class digit or "", subject.detail) -> class. "" matches 4 and 5.
_EXACT: dict[tuple[str, str], BounceClass] = {
    ("", "1.1"): _C.INVALID_RECIPIENT,
    ("", "1.10"): _C.INVALID_RECIPIENT,
    ("", "1.3"): _C.INVALID_RECIPIENT,
    ("", "1.6"): _C.INVALID_RECIPIENT,
    ("5", "2.1"): _C.INVALID_RECIPIENT,
    ("5", "1.2"): _C.DNS,
    ("", "2.2"): _C.MAILBOX_FULL,
    ("", "7.4"): _C.TLS,
    ("", "7.5"): _C.TLS,
    ("", "7.10"): _C.TLS,
    ("", "7.11"): _C.TLS,
    ("", "7.28"): _C.RATE_LIMIT,
    ("4", "2.1"): _C.RATE_LIMIT,
    ("", "5.3"): _C.RATE_LIMIT,
}

# Rule 3: provider texts, most specific first.
_TEXTS: tuple[tuple[BounceClass, str], ...] = (
    (_C.REPUTATION, r"spamhaus|spamcop|barracuda|sorbs|\brbl\b|\bdnsbl\b|black ?list|block ?list"
                    r"|blocked|\blisted\b|reputation|banned|\bbl\.\w"),
    (_C.MAILBOX_FULL, r"mailbox (is )?full|over ?quota|quota exceeded|insufficient (system )?storage"
                      r"|mailbox size limit|out of storage"),
    (_C.INVALID_RECIPIENT, r"user unknown|unknown user|no such (user|mailbox|recipient|address)"
                           r"|does ?n[o']t exist|invalid (recipient|mailbox|address)"
                           r"|recipient (unknown|not found)|mailbox not found|account (is )?disabled"
                           r"|unrouteable address|not a valid (mailbox|recipient)"),
    (_C.RATE_LIMIT, r"rate.?limit|too many (connections|messages|recipients|mails?)|throttl"
                    r"|try again later|exceeded .*(rate|limit)|sending rate|temporarily deferred"
                    r"|too fast|slow down"),
    (_C.POLICY, r"\bspam\b|unsolicited|\bpolicy\b|dmarc|\bspf\b|dkim|not authori[sz]ed|relay (access )?denied"),
    (_C.CONTENT, r"virus|malware|content (rejected|filter)|message content|attachment|phishing"),
    (_C.TLS, r"\btls\b|starttls|certificate|handshake|\bssl\b"),
    (_C.DNS, r"host not found|name (or service )?not known|\bnxdomain\b|servfail|no mx|dns|"
             r"domain (not found|does not exist)|no address"),
)
_TEXT_RULES = tuple((cls, re.compile(rx, re.IGNORECASE)) for cls, rx in _TEXTS)

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})$")


@frozen
class Classifier:
    """
    L{classify} with configured patterns (rule 1) compiled once.

    @ivar patterns: C{(class, compiled regular expression)}, tried in order.
    """

    patterns: tuple[tuple[BounceClass, "re.Pattern[str]"], ...] = ()
    _memo: dict[tuple[str, int, str], BounceClass] = field(factory=dict, init=False, eq=False, repr=False)
    """
    Classes of outcomes already classified. Many failures share their
    words: a next hop known to be down defers all its mail with one
    diagnostic, and each classification tries up to eight expressions.
    Emptied when it holds L{MEMO_SIZE}.
    """

    MEMO_SIZE = 1024

    @classmethod
    def from_patterns(cls, patterns: Mapping[str, Iterable[str]]) -> "Classifier":
        """
        A classifier from C{{class name: [regular expression, ...]}}.

        @raise ValueError: an unknown class name or an invalid expression.
        """
        compiled = []
        for name, exprs in patterns.items():
            try:
                kind = BounceClass(name)
            except ValueError:
                raise ValueError(f"{name!r} is not a bounce class ({', '.join(CLASSES)})") from None
            for expr in exprs:
                try:
                    compiled.append((kind, re.compile(expr, re.IGNORECASE)))
                except re.error as e:
                    raise ValueError(f"{expr!r} is not a regular expression: {e}") from None
        return cls(tuple(compiled))

    def __call__(self, dsn: str, code: int = 0, text: str = "") -> BounceClass:
        """The class of an outcome: see L{classify}."""
        key = (dsn, code, text)
        kind = self._memo.get(key)
        if kind is None:
            kind = classify(dsn, code, text, self.patterns)
            if len(self._memo) >= self.MEMO_SIZE:
                self._memo.clear()
            self._memo[key] = kind
        return kind


def classify(
    dsn: str, code: int = 0, text: str = "",
    patterns: Iterable[tuple[BounceClass, "re.Pattern[str]"]] = (),
) -> BounceClass:
    """
    The class of a failure (see the module docstring for the rules).

    @param dsn: the RFC 3463 enhanced status code (C{"5.1.1"}), or C{""}.
    @param code: the SMTP reply code, or 0 when no server answered.
    @param text: the diagnostic (the reply's text, or relaynet's own words).
    @param patterns: configured C{(class, regex)} pairs, tried first.
    """
    text = text or ""
    for kind, rx in patterns:
        if rx.search(text):
            return kind
    m = _ENHANCED.match((dsn or "").strip())
    klass = m.group(1) if m else ""
    subject = f"{m.group(2)}.{m.group(3)}" if m else ""
    if m:
        hit = _EXACT.get((klass, subject)) or _EXACT.get(("", subject))
        if hit is not None:
            return hit
    for kind, rx in _TEXT_RULES:
        if rx.search(text):
            return kind
    if m:
        if m.group(2) == "4":
            return _C.DNS
        if m.group(2) == "6" or subject == "3.4":
            return _C.CONTENT
        if m.group(2) == "7":
            return _C.POLICY
    return _C.OTHER


def is_hard_invalid(status_permanent: bool, kind: BounceClass) -> bool:
    """Whether an outcome puts its recipient on the suppression list: permanent, and an invalid recipient."""
    return status_permanent and kind is BounceClass.INVALID_RECIPIENT
