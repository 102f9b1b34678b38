"""
L{relaynet.delivery.mtasts}: MTA-STS (RFC 8461).

 - Pure: the TXT record and policy parsers, MX pattern matching, what a
   policy asks of an MX host, the cache file format.
 - The manager (TXT lookup, cache, fetch decisions of RFC 8461 3.3 and 5.1)
   with an in-process DNS zone (L{relaynet.zones}), a fake fetcher and a
   L{Clock}: everything fires synchronously.
 - The HTTPS fetch for real: a L{twisted.web} server on 127.0.0.1 with
   certificates from lab CAs (L{relaynet.smtp.tls.generate_ca}), the
   policy host's name resolved by the in-process zone, the port overridden.
   These are trial test cases (Deferred-returning, the dirty-reactor check
   on), with an injected clock for timeouts and expiry.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import (
    Deferred,
    fail,
    gatherResults,
    inlineCallbacks,
    maybeDeferred,
    succeed,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.names import error
from twisted.protocols.policies import WrappingFactory
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from relaynet import zones
from relaynet.delivery import mtasts
from relaynet.delivery.mtasts import (
    FETCH_ERROR,
    MAX_AGE_LIMIT,
    MTASTS,
    POLICY_INVALID,
    VALIDATION_FAILURE,
    WEBPKI_INVALID,
    CachedPolicy,
    FetchError,
    Policy,
    PolicyCache,
    PolicyError,
    PolicyState,
    host_requirement,
    parse_policy,
    parse_sts_txt,
)
from relaynet.smtp.tls import generate_ca, generate_cert, server_options

# Twisted hands pyOpenSSL X509/PKey objects to it (deprecated there, not our doing).
pytestmark = pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning")

ENFORCE = "version: STSv1\r\nmode: enforce\r\nmx: mx1.example.test\r\nmx: *.mail.example.test\r\nmax_age: 86400\r\n"
TESTING = "version: STSv1\nmode: testing\nmx: mx2.example.test\nmax_age: 86400\n"


def result_of(d: Deferred[Any]) -> Any:
    """The result of a Deferred that has fired (the pure parts fire at once)."""
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    return out[0]


def run_now(work: Callable[[], Any]) -> Deferred[Any]:
    """A run_in_thread that runs in this thread (the pure and manager tests)."""
    return maybeDeferred(work)


# -- TXT record (RFC 8461 3.1) -------------------------------------------------


@pytest.mark.parametrize("records, expected", [
    (["v=STSv1; id=20160831085700Z;"], "20160831085700Z"),
    (["v=STSv1; id=abc"], "abc"),
    (["v=STSv1;id=abc"], "abc"),
    (["v=STSv1;  id=abc ;  "], "abc"),
    (["v=STSv1 ;\tid=abc; ext=x.y"], "abc"),
    (["google-site-verification=xyz", "v=STSv1; id=7"], "7"),
    (["v=spf1 -all", "v=STSv1; id=7", "other"], "7"),
])
def test_sts_txt_valid(records: list[str], expected: str) -> None:
    """One C{v=STSv1} record (others ignored), white space around C{;} allowed: its id."""
    assert parse_sts_txt(records) == expected


@pytest.mark.parametrize("records", [
    [],
    ["v=spf1 -all"],
    ["v=STSv1; id=1", "v=STSv1; id=2"],  # two records: no policy
    ["v=STSv1; id=1", "v=STSv1; id=1"],
    ["v=STSv2; id=1"],
    ["v=STSv10; id=1"],
    ["V=STSv1; id=1"],  # %s: case-sensitive
    [" v=STSv1; id=1"],  # must begin with v=STSv1
    ["v=STSv1"],  # no id
    ["v=STSv1;"],
    ["v=STSv1; ext=1"],
    ["v=STSv1; id="],
    ["v=STSv1; id=" + "a" * 33],  # 1*32
    ["v=STSv1; id=a-b"],
    ["v=STSv1; id=1;; x=2"],
    ["v=STSv1; id=1; x"],
    ["v=STSv1; id=1; x=a b"],
    ["v=STSv1; id=1; id=2"],
])
def test_sts_txt_invalid(records: list[str]) -> None:
    """Not exactly one valid C{v=STSv1} record: no live policy."""
    assert parse_sts_txt(records) is None


# -- policy (RFC 8461 3.2) ------------------------------------------------------


def test_policy_crlf() -> None:
    """CRLF lines: mode, max_age and the patterns (lower case), the text kept."""
    policy = parse_policy(ENFORCE)
    assert policy == Policy("enforce", 86400, ("mx1.example.test", "*.mail.example.test"), ENFORCE)


def test_policy_lf_unknown_keys_blank_lines() -> None:
    """LF lines, unknown keys ignored, a final line without a terminator, blank lines tolerated."""
    text = "version: STSv1\nfoo: bar\nmode:testing\n\nmx: MX2.Example.Test.\nmax_age:   0   \nx_y.z-1: 1"
    policy = parse_policy(text)
    assert (policy.mode, policy.max_age, policy.mx) == ("testing", 0, ("mx2.example.test",))


def test_policy_mode_none_needs_no_mx() -> None:
    """Mode C{none} with no C{mx} line is valid."""
    assert parse_policy("version: STSv1\nmode: none\nmax_age: 31557600\n").mx == ()


@pytest.mark.parametrize("text, message", [
    ("mode: enforce\nmx: a.test\nmax_age: 1\n", "no version"),
    ("version: STSv2\nmode: enforce\nmx: a.test\nmax_age: 1\n", "not STSv1"),
    ("version: stsv1\nmode: enforce\nmx: a.test\nmax_age: 1\n", "not STSv1"),
    ("version: STSv1\nmx: a.test\nmax_age: 1\n", "no mode"),
    ("version: STSv1\nmode: Enforce\nmx: a.test\nmax_age: 1\n", "not enforce, testing or none"),
    ("version: STSv1\nmode: reject\nmx: a.test\nmax_age: 1\n", "not enforce, testing or none"),
    ("version: STSv1\nmode: enforce\nmx: a.test\n", "no max_age"),
    ("version: STSv1\nmode: enforce\nmx: a.test\nmax_age: -1\n", "not a number"),
    ("version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 1d\n", "not a number"),
    ("version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 12345678901\n", "not a number"),
    (f"version: STSv1\nmode: enforce\nmx: a.test\nmax_age: {MAX_AGE_LIMIT + 1}\n", "over 31557600"),
    ("version: STSv1\nmode: enforce\nmax_age: 1\n", "no mx pattern"),
    ("version: STSv1\nmode: testing\nmax_age: 1\n", "no mx pattern"),
    ("version: STSv1\nmode: enforce\nmx: mx*.a.test\nmax_age: 1\n", "bad mx pattern"),
    ("version: STSv1\nmode: enforce\nmx: *.*.a.test\nmax_age: 1\n", "bad mx pattern"),
    ("version: STSv1\nmode: enforce\nmx: a..test\nmax_age: 1\n", "bad mx pattern"),
    ("version: STSv1\nmode: enforce\nmx: *\nmax_age: 1\n", "bad mx pattern"),
    ("version: STSv1\nmode: enforce\nmode: none\nmx: a.test\nmax_age: 1\n", "mode given twice"),
    ("version: STSv1\nmode enforce\nmx: a.test\nmax_age: 1\n", "expected 'key: value'"),
    (" version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 1\n", "expected 'key: value'"),
    ("version: STSv1\nmode: enforce\nmx:\nmax_age: 1\n", "bad value for mx"),
    ("<html>\n<body>policy</body>\n", "expected 'key: value'"),
])
def test_policy_errors(text: str, message: str) -> None:
    """Each way a policy is invalid raises L{PolicyError} saying why."""
    with pytest.raises(PolicyError, match=message):
        parse_policy(text)


def test_policy_max_age_limit_accepted() -> None:
    """C{max_age} 31557600 is the largest valid value."""
    assert parse_policy(f"version: STSv1\nmode: none\nmax_age: {MAX_AGE_LIMIT}").max_age == MAX_AGE_LIMIT


# -- MX patterns (RFC 8461 4.1) -------------------------------------------------


@pytest.mark.parametrize("host, expected", [
    ("mx1.example.test", True),
    ("MX1.Example.TEST", True),
    ("mx1.example.test.", True),
    ("mx10.example.test", False),
    ("x.mx1.example.test", False),
    ("a.mail.example.test", True),
    ("A.MAIL.example.test.", True),
    ("mail.example.test", False),  # the wildcard needs one label
    ("a.b.mail.example.test", False),  # and only one
    (".mail.example.test", False),
    ("amail.example.test", False),
])
def test_pattern_matching(host: str, expected: bool) -> None:
    """Exact names, and C{*.} standing for exactly one left-most label; case and trailing dot ignored."""
    assert parse_policy(ENFORCE).matches(host) is expected


def test_pattern_with_trailing_dot() -> None:
    """A pattern written with a trailing dot matches as without."""
    policy = parse_policy("version: STSv1\nmode: enforce\nmx: *.Example.Test.\nmax_age: 1\n")
    assert policy.matches("mx.example.test") and not policy.matches("example.test")


# -- the same, by property -------------------------------------------------------

_labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
_names = st.lists(_labels, min_size=1, max_size=4).map(".".join)
_ws = st.sampled_from(["", " ", "\t", "  "])


@settings(max_examples=200, deadline=None)
@given(
    policy_id=st.from_regex(r"[A-Za-z0-9]{1,32}", fullmatch=True),
    spaces=st.lists(_ws, min_size=4, max_size=4),
    ext=st.lists(st.tuples(
        st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}", fullmatch=True).filter(lambda n: n != "id"),
        st.from_regex(r"[\x21-\x3a\x3c\x3e-\x7e]{1,20}", fullmatch=True),
    ), max_size=3),
    final=st.booleans(),
    others=st.lists(st.text(max_size=20).filter(lambda t: not t.startswith("v=STSv1")), max_size=3),
)
def test_sts_txt_property(
    policy_id: str, spaces: list[str], ext: list[tuple[str, str]], final: bool, others: list[str],
) -> None:
    """Any record the ABNF allows gives its id, among any records that are not STS ones."""
    fields = [f"id={policy_id}"] + [f"{n}={v}" for n, v in ext]
    delim = f"{spaces[0]};{spaces[1]}"
    record = "v=STSv1" + "".join(delim + f for f in fields) + (f"{spaces[2]};{spaces[3]}" if final else "")
    assert parse_sts_txt([*others, record]) == policy_id
    assert parse_sts_txt([*others, record, record]) is None


@settings(max_examples=200, deadline=None)
@given(
    mode=st.sampled_from(["enforce", "testing", "none"]),
    max_age=st.integers(0, MAX_AGE_LIMIT),
    patterns=st.lists(st.tuples(st.booleans(), _names), min_size=1, max_size=4),
    eol=st.sampled_from(["\n", "\r\n"]),
    order=st.randoms(use_true_random=False),
)
def test_policy_property(mode: str, max_age: int, patterns: list[tuple[bool, str]], eol: str, order: Any) -> None:
    """Any valid policy, its lines in any order with either line end, parses to its values."""
    mx = [("*." if wild else "") + name for wild, name in patterns]
    lines = ["version: STSv1", f"mode: {mode}", f"max_age: {max_age}"] + [f"mx: {m}" for m in mx]
    order.shuffle(lines)
    policy = parse_policy(eol.join(lines) + eol)
    in_order = tuple(line[4:] for line in lines if line.startswith("mx: "))
    assert (policy.mode, policy.max_age, policy.mx) == (mode, max_age, in_order)


@settings(max_examples=200, deadline=None)
@given(label=_labels, extra=_labels, suffix=_names, upper=st.booleans(), dot=st.booleans())
def test_wildcard_property(label: str, extra: str, suffix: str, upper: bool, dot: bool) -> None:
    """C{*.suffix} matches one label before the suffix, in any case, with or without a final dot; never two, never none."""
    policy = Policy("enforce", 1, (f"*.{suffix}",))
    host = f"{label}.{suffix}" + ("." if dot else "")
    assert policy.matches(host.upper() if upper else host)
    assert not policy.matches(f"{extra}.{label}.{suffix}")
    assert not policy.matches(suffix)


# -- what a policy asks of an MX host (RFC 8461 5) --------------------------------


def test_requirement_enforce_match() -> None:
    """Enforce, matched: usable, STARTTLS required, certificate checked for the MX name."""
    req = host_requirement(parse_policy(ENFORCE), "X.Mail.Example.Test.")
    assert (req.usable, req.verify_name, req.require_tls, req.report_only, req.failure) == (
        True, "x.mail.example.test", True, False, None)


def test_requirement_enforce_mismatch() -> None:
    """Enforce, no pattern matched: the host is not used."""
    req = host_requirement(parse_policy(ENFORCE), "mx.elsewhere.test")
    assert (req.usable, req.failure) == (False, VALIDATION_FAILURE)
    assert "matches no MTA-STS pattern" in req.reason


def test_requirement_testing() -> None:
    """Testing: always usable, checks made for the report only, a mismatch noted."""
    policy = parse_policy(TESTING)
    ok = host_requirement(policy, "mx2.example.test")
    bad = host_requirement(policy, "mx9.example.test")
    assert (ok.usable, ok.verify_name, ok.require_tls, ok.report_only, ok.failure) == (
        True, "mx2.example.test", False, True, None)
    assert (bad.usable, bad.report_only, bad.failure) == (True, True, VALIDATION_FAILURE)


@pytest.mark.parametrize("policy", [None, parse_policy("version: STSv1\nmode: none\nmax_age: 1\n")])
def test_requirement_no_policy(policy: Policy | None) -> None:
    """No policy, or mode none: nothing is asked."""
    req = host_requirement(policy, "anything.test")
    assert (req.usable, req.verify_name, req.require_tls, req.report_only, req.failure) == (
        True, None, False, False, None)


# -- the cache file -------------------------------------------------------------


def test_cache_file_round_trip(tmp_path: Path) -> None:
    """A stored entry reads back equal; the file is JSON, written atomically (no temporary file left)."""
    cache = PolicyCache(tmp_path / "mta-sts", run_now)
    entry = CachedPolicy("example.test", "abc", parse_policy(ENFORCE), 100.0, 86500.0)
    assert result_of(cache.store(entry)) is None
    assert sorted(p.name for p in (tmp_path / "mta-sts").iterdir()) == ["example.test.json"]
    raw = json.loads((tmp_path / "mta-sts" / "example.test.json").read_text())
    assert raw == {"format": 1, "domain": "example.test", "id": "abc", "policy": ENFORCE,
                   "fetched": 100.0, "expires": 86500.0}
    assert result_of(PolicyCache(tmp_path / "mta-sts", run_now).load("example.test")) == entry
    assert result_of(cache.load("other.test")) is None


@pytest.mark.parametrize("content", [b"not json", b'{"format": 2}', b"{}", json.dumps({
    "format": 1, "domain": "example.test", "id": "a", "policy": "garbage", "fetched": 0, "expires": 9,
}).encode(), json.dumps({
    "format": 1, "domain": "other.test", "id": "a", "policy": ENFORCE, "fetched": 0, "expires": 9,
}).encode()])
def test_cache_bad_file_ignored(tmp_path: Path, content: bytes) -> None:
    """A cache file that does not parse (or is for another domain) counts as no cache."""
    (tmp_path / "example.test.json").write_bytes(content)
    assert result_of(PolicyCache(tmp_path, run_now).load("example.test")) is None


def test_cache_writes_in_order(tmp_path: Path) -> None:
    """Writes for one domain run one after the other, in the order asked, whatever the threads do."""
    pending: list[tuple[Callable[[], Any], Deferred[Any]]] = []

    def later(work: Callable[[], Any]) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        pending.append((work, d))
        return d

    cache = PolicyCache(tmp_path, later)
    first = CachedPolicy("example.test", "one", parse_policy(ENFORCE), 0.0, 1.0)
    second = CachedPolicy("example.test", "two", parse_policy(TESTING), 0.0, 1.0)
    d1, d2 = cache.store(first), cache.store(second)
    assert len(pending) == 1, "the second write started before the first ended"
    work, d = pending.pop()
    d.callback(work())
    assert result_of(d1) is None and len(pending) == 1
    work, d = pending.pop()
    d.callback(work())
    assert result_of(d2) is None
    assert result_of(PolicyCache(tmp_path, run_now).load("example.test")).policy_id == "two"


def test_cache_write_failure_reported(tmp_path: Path) -> None:
    """A write that fails fails its Deferred and leaves no temporary file."""
    (tmp_path / "mta-sts").write_text("a file where the directory should be")
    cache = PolicyCache(tmp_path / "mta-sts", run_now)
    d = cache.store(CachedPolicy("example.test", "one", parse_policy(ENFORCE), 0.0, 1.0))
    failure = result_of(d)
    assert failure.check(OSError)


# -- the manager, with a fake fetcher ---------------------------------------------


class Zones:
    """An in-process DNS whose zones a test can change."""

    def __init__(self, spec: dict[str, list[str]]) -> None:
        self.set(spec)
        self.txt_queries = 0

    def set(self, spec: dict[str, list[str]]) -> None:
        self.resolver = zones.resolver(spec)

    def lookupText(self, name: str, timeout: Any = None) -> Deferred[Any]:
        self.txt_queries += 1
        return self.resolver.lookupText(name, timeout)  # type: ignore[no-any-return]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.resolver, name)


def zone(txt: str | None = "v=STSv1; id=one", *extra: str) -> dict[str, list[str]]:
    """The example.test zone: the C{_mta-sts} TXT (if any), the policy host at 127.0.0.1."""
    lines = ["@ MX 10 mx1", "mx1 A 127.0.0.1", "mta-sts A 127.0.0.1", *extra]
    if txt is not None:
        lines.append(f"_mta-sts 300 TXT {txt}")
    return {"example.test": lines}


class FakeFetcher:
    """Answers fetches from C{answers} (a policy text, a L{FetchError} or a Deferred) and counts them."""

    def __init__(self, answer: Any = ENFORCE) -> None:
        self.answer = answer
        self.calls: list[str] = []

    def fetch(self, domain: str) -> Deferred[Policy]:
        self.calls.append(domain)
        answer = self.answer
        if isinstance(answer, Deferred):
            return answer
        if isinstance(answer, FetchError):
            return fail(answer)
        return succeed(parse_policy(answer))


def manager(tmp_path: Path, dns: Any, fetcher: Any, clock: Clock, **kw: Any) -> MTASTS:
    return MTASTS(dns, tmp_path / "mta-sts", clock, clock=clock, run_in_thread=run_now, fetcher=fetcher, **kw)


def state_of(sts: MTASTS, domain: str = "example.test") -> PolicyState:
    state = result_of(sts.policy_for(domain))
    assert isinstance(state, PolicyState), state
    return state


def test_no_txt_no_policy(tmp_path: Path) -> None:
    """No TXT record and nothing cached: no policy, nothing fetched."""
    fetcher, clock = FakeFetcher(), Clock()
    state = state_of(manager(tmp_path, Zones(zone(None)), fetcher, clock))
    assert (state.policy, state.source, state.failure, fetcher.calls) == (None, "none", None, [])


def test_unknown_domain_no_policy(tmp_path: Path) -> None:
    """A domain outside every zone (a lookup error) and an invalid name: no policy, nothing fetched."""
    fetcher, clock = FakeFetcher(), Clock()
    sts = manager(tmp_path, Zones(zone()), fetcher, clock)
    assert state_of(sts, "nowhere.invalid").source == "none"
    assert state_of(sts, "bad name!").source == "none"
    assert fetcher.calls == []


def test_fetched_then_cached(tmp_path: Path) -> None:
    """A TXT id: fetched once, stored on disk; the next call (same id) uses the cache."""
    fetcher, clock = FakeFetcher(), Clock()
    clock.advance(1000)
    sts = manager(tmp_path, Zones(zone()), fetcher, clock)
    first = state_of(sts, "Example.Test.")
    assert (first.source, first.policy_id, first.expires) == ("fetched", "one", 1000 + 86400)
    assert first.policy == parse_policy(ENFORCE)
    clock.advance(3600)  # past the TXT's TTL: looked up again, same id
    second = state_of(sts)
    assert (second.source, second.policy) == ("cache", first.policy)
    assert fetcher.calls == ["example.test"]
    assert json.loads((tmp_path / "mta-sts" / "example.test.json").read_text())["id"] == "one"


def test_txt_cached_for_ttl(tmp_path: Path) -> None:
    """The TXT answer is kept for its TTL (300 s here), then asked again."""
    dns, clock = Zones(zone()), Clock()
    sts = manager(tmp_path, dns, FakeFetcher(), clock)
    state_of(sts)
    state_of(sts)
    assert dns.txt_queries == 1
    clock.advance(301)
    state_of(sts)
    assert dns.txt_queries == 2


def test_txt_id_change_refetches(tmp_path: Path) -> None:
    """A new TXT id: the new policy is fetched and used at once (not in the background)."""
    dns, fetcher, clock = Zones(zone()), FakeFetcher(), Clock()
    sts = manager(tmp_path, dns, fetcher, clock)
    assert state_of(sts).policy == parse_policy(ENFORCE)
    dns.set(zone("v=STSv1; id=two"))
    fetcher.answer = TESTING
    clock.advance(301)
    state = state_of(sts)
    assert (state.source, state.policy_id, state.policy) == ("fetched", "two", parse_policy(TESTING))
    assert len(fetcher.calls) == 2


def test_txt_id_change_background(tmp_path: Path) -> None:
    """With C{background_refresh}: the cached policy answers while the new one is fetched."""
    dns, fetcher, clock = Zones(zone()), FakeFetcher(), Clock()
    sts = manager(tmp_path, dns, fetcher, clock, background_refresh=True)
    state_of(sts)
    dns.set(zone("v=STSv1; id=two"))
    pending: Deferred[Policy] = Deferred()
    fetcher.answer = pending
    clock.advance(301)
    during = state_of(sts)
    assert (during.source, during.policy_id) == ("cache", "one")
    assert state_of(sts).policy_id == "one" and len(fetcher.calls) == 2, "one background fetch at a time"
    pending.callback(parse_policy(TESTING))
    after = state_of(sts)
    assert (after.source, after.policy_id, after.policy) == ("cache", "two", parse_policy(TESTING))


def test_fetch_failure_without_cache(tmp_path: Path) -> None:
    """A failed fetch and nothing cached: no policy, the failure kept with its RFC 8460 type."""
    fetcher, clock = FakeFetcher(FetchError(WEBPKI_INVALID, "bad certificate")), Clock()
    state = state_of(manager(tmp_path, Zones(zone()), fetcher, clock))
    assert (state.policy, state.source) == (None, "none")
    assert state.failure is not None
    assert (state.failure.result_type, state.failure.detail, state.failure.policy_id) == (
        WEBPKI_INVALID, "bad certificate", "one")


def test_fetch_failure_keeps_cached_policy_and_backs_off(tmp_path: Path) -> None:
    """A failed refresh: the fresh cached policy applies, with the failure; the id is not fetched again for a while."""
    dns, fetcher, clock = Zones(zone()), FakeFetcher(), Clock()
    sts = manager(tmp_path, dns, fetcher, clock, retry_after=600)
    state_of(sts)
    dns.set(zone("v=STSv1; id=two"))
    fetcher.answer = FetchError(FETCH_ERROR, "HTTP 500")
    clock.advance(301)
    state = state_of(sts)
    assert (state.source, state.policy_id) == ("cache", "one")
    assert state.failure is not None and state.failure.result_type == FETCH_ERROR
    clock.advance(100)
    assert state_of(sts).failure is not None
    assert len(fetcher.calls) == 2, "fetched again within retry_after"
    clock.advance(600)
    fetcher.answer = TESTING
    state = state_of(sts)
    assert (state.source, state.policy_id, state.failure) == ("fetched", "two", None)
    assert len(fetcher.calls) == 3


def test_failure_not_reported_once_stale(tmp_path: Path) -> None:
    """A failure for an id is no longer reported when the TXT id is back to the cached one, or gone."""
    dns, fetcher, clock = Zones(zone()), FakeFetcher(), Clock()
    sts = manager(tmp_path, dns, fetcher, clock)
    state_of(sts)
    dns.set(zone("v=STSv1; id=two"))
    fetcher.answer = FetchError(FETCH_ERROR, "HTTP 500")
    clock.advance(301)
    assert state_of(sts).failure is not None
    dns.set(zone("v=STSv1; id=one"))
    clock.advance(301)
    assert (state_of(sts).policy_id, state_of(sts).failure) == ("one", None)
    dns.set(zone("v=STSv1; id=three"))
    clock.advance(301)
    assert state_of(sts).failure is not None
    dns.set(zone(None))
    clock.advance(301)
    state = state_of(sts)
    assert (state.source, state.policy_id, state.failure) == ("cache", "one", None)


def test_invalid_policy_is_a_failure(tmp_path: Path) -> None:
    """A fetched policy that does not parse: C{sts-policy-invalid}, no policy."""
    fetcher = FakeFetcher(FetchError(POLICY_INVALID, "no mode"))
    state = state_of(manager(tmp_path, Zones(zone()), fetcher, Clock()))
    assert state.failure is not None and state.failure.result_type == POLICY_INVALID
    assert state.policy is None


def test_txt_gone_cached_policy_until_expiry(tmp_path: Path) -> None:
    """The TXT record removed: the cached policy applies until max_age runs out, then none (file removed)."""
    dns, fetcher, clock = Zones(zone()), FakeFetcher(), Clock()
    sts = manager(tmp_path, dns, fetcher, clock)
    state_of(sts)
    dns.set(zone(None))
    clock.advance(86400 - 1)
    state = state_of(sts)
    assert (state.source, state.policy_id) == ("cache", "one")
    clock.advance(1)
    state = state_of(sts)
    assert (state.source, state.policy) == ("none", None)
    assert not (tmp_path / "mta-sts" / "example.test.json").exists()
    assert len(fetcher.calls) == 1


def test_max_age_expiry_refetches_same_id(tmp_path: Path) -> None:
    """After max_age the cached policy is gone; the same TXT id is fetched again."""
    fetcher, clock = FakeFetcher("version: STSv1\nmode: enforce\nmx: mx1.example.test\nmax_age: 600\n"), Clock()
    sts = manager(tmp_path, Zones(zone()), fetcher, clock)
    assert state_of(sts).expires == 600
    clock.advance(599)
    assert state_of(sts).source == "cache"
    clock.advance(1)
    state = state_of(sts)
    assert (state.source, state.expires) == ("fetched", 1200)
    assert len(fetcher.calls) == 2


def test_cache_survives_restart(tmp_path: Path) -> None:
    """A new manager on the same directory uses the stored policy without fetching."""
    clock = Clock()
    state_of(manager(tmp_path, Zones(zone()), FakeFetcher(), clock))
    refusing = FakeFetcher(FetchError(FETCH_ERROR, "must not be fetched"))
    clock.advance(1000)
    state = state_of(manager(tmp_path, Zones(zone()), refusing, clock))
    assert (state.source, state.policy, refusing.calls) == ("cache", parse_policy(ENFORCE), [])


def test_cache_expired_across_restart(tmp_path: Path) -> None:
    """An expired file read at start is discarded: the policy is fetched."""
    clock = Clock()
    state_of(manager(tmp_path, Zones(zone()), FakeFetcher(), clock))
    clock.advance(86400)
    fetcher = FakeFetcher(TESTING)
    state = state_of(manager(tmp_path, Zones(zone()), fetcher, clock))
    assert (state.source, state.policy) == ("fetched", parse_policy(TESTING))


def test_concurrent_callers_share_one_fetch(tmp_path: Path) -> None:
    """Calls made while a fetch runs wait for it: one fetch, one answer for all."""
    pending: Deferred[Policy] = Deferred()
    fetcher = FakeFetcher(pending)
    sts = manager(tmp_path, Zones(zone()), fetcher, Clock())
    calls = [sts.policy_for("example.test") for _ in range(5)] + [sts.policy_for("EXAMPLE.test.")]
    assert not any(d.called for d in calls)
    pending.callback(parse_policy(ENFORCE))
    states = [result_of(d) for d in calls]
    assert len(fetcher.calls) == 1
    assert {s.source for s in states} == {"fetched"} and states[0].policy == parse_policy(ENFORCE)


def test_cache_write_failure_does_not_fail_delivery(tmp_path: Path) -> None:
    """A cache that cannot be written: the fetched policy still applies."""
    (tmp_path / "mta-sts").write_text("not a directory")
    state = state_of(manager(tmp_path, Zones(zone()), FakeFetcher(), Clock()))
    assert (state.source, state.policy) == ("fetched", parse_policy(ENFORCE))


LONG = "version: STSv1\nmode: enforce\nmx: mx1.example.test\nmax_age: 604800\n"


def test_refresh_cached_daily(tmp_path: Path) -> None:
    """Proactive refresh: a policy cached more than a day ago is fetched again (same id), extending its life."""
    dns, fetcher, clock = Zones(zone()), FakeFetcher(LONG), Clock()
    sts = manager(tmp_path, dns, fetcher, clock)
    assert state_of(sts).expires == 604800
    clock.advance(3600)
    assert result_of(sts.refresh_cached()) == []
    assert len(fetcher.calls) == 1, "refreshed before a day had passed"
    clock.advance(86400)
    (state,) = result_of(sts.refresh_cached())
    assert (state.source, state.expires) == ("fetched", 3600 + 86400 + 604800)
    assert len(fetcher.calls) == 2


def test_refresh_cached_after_restart_and_failure(tmp_path: Path) -> None:
    """The refresh covers domains only on disk (a restart); a failure keeps the cached policy."""
    clock = Clock()
    state_of(manager(tmp_path, Zones(zone()), FakeFetcher(LONG), clock))
    clock.advance(2 * 86400)
    fetcher = FakeFetcher(FetchError(FETCH_ERROR, "HTTP 503"))
    sts = manager(tmp_path, Zones(zone()), fetcher, clock)
    (state,) = result_of(sts.refresh_cached())
    assert (state.source, state.policy_id, fetcher.calls) == ("cache", "one", ["example.test"])
    assert state.failure is not None and state.failure.result_type == FETCH_ERROR
    assert result_of(sts.refresh_cached()) == [], "a failed id is not fetched again at once"


def test_refresh_cached_skips_domain_without_txt(tmp_path: Path) -> None:
    """A domain whose TXT record is gone is not fetched; its cached policy runs out."""
    dns, fetcher, clock = Zones(zone()), FakeFetcher(LONG), Clock()
    sts = manager(tmp_path, dns, fetcher, clock)
    state_of(sts)
    dns.set(zone(None))
    clock.advance(2 * 86400)
    assert result_of(sts.refresh_cached()) == []
    assert len(fetcher.calls) == 1


def test_state_requirement() -> None:
    """L{PolicyState.requirement} applies the state's policy."""
    state = PolicyState("example.test", parse_policy(ENFORCE), "cache")
    assert not state.requirement("evil.test").usable
    assert state.requirement("mx1.example.test").require_tls


# -- the fetch, for real: HTTPS on loopback ------------------------------------------


class PolicyResource(Resource):
    """Serves C{/.well-known/mta-sts.txt} as a test sets it up."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[tuple[bytes, bytes | None]] = []
        self.code = 200
        self.ctype = b"text/plain; charset=utf-8"
        self.body = ENFORCE.encode()
        self.chunked = False
        self.location = b""

    def render_GET(self, request: Any) -> Any:
        self.requests.append((request.uri, request.getHeader(b"host")))
        request.setResponseCode(self.code)
        if self.location:
            request.setHeader(b"location", self.location)
        request.setHeader(b"content-type", self.ctype)
        if self.chunked:
            # No Content-Length: the client must stop the transfer itself.
            for _ in range(len(self.body) // 8192):
                request.write(b"x" * 8192)
            return NOT_DONE_YET
        return self.body


class Tracking(WrappingFactory):
    """Counts and closes the server's connections, and says when all are gone."""

    def __init__(self, wrapped: Any) -> None:
        super().__init__(wrapped)
        self.connections = 0
        self.made: Deferred[None] = Deferred()
        self._idle: list[Deferred[None]] = []

    def registerProtocol(self, p: Any) -> None:
        super().registerProtocol(p)
        self.connections += 1
        if not self.made.called:
            self.made.callback(None)

    def unregisterProtocol(self, p: Any) -> None:
        super().unregisterProtocol(p)
        if not self.protocols:
            waiting, self._idle = self._idle, []
            for d in waiting:
                d.callback(None)

    def closed(self) -> Deferred[None]:
        """Abort the server's connections; fires when all are gone."""
        for p in list(self.protocols):
            p.transport.abortConnection()
        return self.idle()

    def idle(self) -> Deferred[None]:
        """Fires when the server has no connection (the client closed them)."""
        if not self.protocols:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle.append(d)
        return d


class Silent(Protocol):
    """Accepts a connection and says nothing (not even a TLS handshake)."""


class FetchTests(TestCase):
    """The fetch over real HTTPS on 127.0.0.1."""

    timeout = 30

    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="h-sts-"))
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.ca, self.ca_key = generate_ca(self.dir / "ca")
        self.clock = Clock()
        self.dns = Zones(zone())
        self.resource = PolicyResource()

    def tearDown(self) -> Deferred[None]:
        return self._settle()

    @inlineCallbacks
    def _settle(self) -> Generator[Deferred[Any], Any, None]:
        """Let client sockets that the server closed go away (bounded: 200 reactor turns)."""
        from twisted.internet import tcp

        for _ in range(200):
            readers = global_reactor.getReaders() + global_reactor.getWriters()  # type: ignore[attr-defined]
            if not any(isinstance(r, tcp.Client) for r in readers):
                return
            yield deferLater(global_reactor, 0.01, lambda: None)  # type: ignore[arg-type]

    def serve(self, names: list[str], ca: tuple[Path, Path] | None = None) -> Tracking:
        """A TLS web server on 127.0.0.1:0 with a certificate for C{names}; closed at cleanup."""
        ca_cert, ca_key = ca or (self.ca, self.ca_key)
        certs = self.dir / f"certs-{len(list(self.dir.iterdir()))}"
        certs.mkdir()
        cert, key = generate_cert(certs, ca_cert, ca_key, names)
        tracking = Tracking(Site(self.resource))
        port = global_reactor.listenSSL(  # type: ignore[attr-defined]
            0, tracking, server_options(cert, key), interface="127.0.0.1",
        )
        self.port = port.getHost().port
        self.listening = port
        self.addCleanup(tracking.closed)
        self.addCleanup(port.stopListening)
        return tracking

    def sts(self, **kw: Any) -> MTASTS:
        options: dict[str, Any] = dict(
            ca_file=self.ca, port=self.port, clock=self.clock, run_in_thread=run_now,
        )
        options.update(kw)
        return MTASTS(self.dns, self.dir / "mta-sts", global_reactor, **options)

    @inlineCallbacks
    def test_enforce_policy_fetched(self) -> Generator[Deferred[Any], Any, None]:
        """The policy is fetched over verified TLS from mta-sts.<domain>, Host header and path as RFC 8461 3.3."""
        server = self.serve(["mta-sts.example.test"])
        sts = self.sts()
        state = yield sts.policy_for("example.test")
        self.assertEqual((state.source, state.policy, state.failure), ("fetched", parse_policy(ENFORCE), None))
        self.assertEqual(self.resource.requests, [(b"/.well-known/mta-sts.txt", b"mta-sts.example.test")])
        self.assertEqual(server.connections, 1)
        self.assertTrue(state.requirement("a.mail.example.test").require_tls)
        self.assertFalse(state.requirement("mx9.example.test").usable)

    @inlineCallbacks
    def test_real_thread_pool(self) -> Generator[Deferred[Any], Any, None]:
        """With the reactor's thread pool (the default), the cache file is written and read back."""
        self.serve(["mta-sts.example.test"])
        state = yield self.sts(run_in_thread=None).policy_for("example.test")
        self.assertEqual(state.source, "fetched")
        again = yield self.sts(run_in_thread=None).policy_for("example.test")
        self.assertEqual((again.source, again.policy), ("cache", parse_policy(ENFORCE)))

    @inlineCallbacks
    def check_failure(self, result_type: str, words: str) -> Generator[Deferred[Any], Any, PolicyState]:
        state: PolicyState = yield self.sts().policy_for("example.test")
        self.assertEqual((state.policy, state.source), (None, "none"))
        assert state.failure is not None
        self.assertEqual(state.failure.result_type, result_type, state.failure.detail)
        self.assertIn(words, state.failure.detail)
        return state

    @inlineCallbacks
    def test_certificate_from_another_ca(self) -> Generator[Deferred[Any], Any, None]:
        """A certificate for the right name from a CA not trusted: sts-webpki-invalid, no policy."""
        other = generate_ca(self.dir / "other-ca")
        self.serve(["mta-sts.example.test"], ca=other)
        yield self.check_failure(WEBPKI_INVALID, "certificate verify failed")
        self.assertEqual(self.resource.requests, [])

    @inlineCallbacks
    def test_certificate_for_another_name(self) -> Generator[Deferred[Any], Any, None]:
        """A trusted certificate that does not name mta-sts.<domain>: sts-webpki-invalid."""
        self.serve(["www.example.test", "example.test"])
        yield self.check_failure(WEBPKI_INVALID, "VerificationError")
        self.assertEqual(self.resource.requests, [])

    @inlineCallbacks
    def test_redirect_not_followed(self) -> Generator[Deferred[Any], Any, None]:
        """A 301 to a valid policy elsewhere is not followed: a fetch error."""
        self.serve(["mta-sts.example.test"])
        self.resource.code = 301
        self.resource.location = b"https://mta-sts.example.test/.well-known/mta-sts.txt?moved"
        yield self.check_failure(FETCH_ERROR, "not followed")
        self.assertEqual(len(self.resource.requests), 1)

    @inlineCallbacks
    def test_not_found(self) -> Generator[Deferred[Any], Any, None]:
        """A 404, even with a policy as its body: a fetch error."""
        self.serve(["mta-sts.example.test"])
        self.resource.code = 404
        yield self.check_failure(FETCH_ERROR, "HTTP 404")

    @inlineCallbacks
    def test_wrong_content_type(self) -> Generator[Deferred[Any], Any, None]:
        """C{text/html} is not a policy: sts-policy-invalid."""
        self.serve(["mta-sts.example.test"])
        self.resource.ctype = b"text/html"
        yield self.check_failure(POLICY_INVALID, "not text/plain")

    @inlineCallbacks
    def test_invalid_policy_body(self) -> Generator[Deferred[Any], Any, None]:
        """A 200 text/plain body that is not a policy: sts-policy-invalid."""
        self.serve(["mta-sts.example.test"])
        self.resource.body = b"version: STSv1\r\nmode: enforce\r\nmax_age: 86400\r\n"
        yield self.check_failure(POLICY_INVALID, "no mx pattern")

    @inlineCallbacks
    def test_body_over_64k_with_length(self) -> Generator[Deferred[Any], Any, None]:
        """A body announced larger than 64 KiB is refused without reading it."""
        self.serve(["mta-sts.example.test"])
        self.resource.body = ENFORCE.encode() + b"x-pad: " + b"y" * (64 * 1024) + b"\n"
        yield self.check_failure(FETCH_ERROR, "over 65536")

    @inlineCallbacks
    def test_body_over_64k_streamed(self) -> Generator[Deferred[Any], Any, None]:
        """A chunked body (no length) that goes on past 64 KiB: the transfer is stopped, a fetch error."""
        self.serve(["mta-sts.example.test"])
        self.resource.chunked = True
        self.resource.body = b"x" * (1024 * 1024)
        yield self.check_failure(FETCH_ERROR, "larger than 65536")

    @inlineCallbacks
    def test_timeout(self) -> Generator[Deferred[Any], Any, None]:
        """A policy host that never answers: after the timeout (on the injected clock), a fetch error."""
        tracking = Tracking(Factory.forProtocol(Silent))
        port = global_reactor.listenTCP(0, tracking, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        self.port = port.getHost().port
        d = self.sts(timeout=5.0).policy_for("example.test")
        yield tracking.made
        self.assertFalse(d.called)
        self.clock.advance(4.9)
        self.assertFalse(d.called)
        self.clock.advance(0.2)
        state = yield d
        assert state.failure is not None
        self.assertEqual(state.failure.result_type, FETCH_ERROR)
        self.assertIn("within 5 s", state.failure.detail)
        yield tracking.idle()  # the client dropped its connection

    @inlineCallbacks
    def test_no_address_for_policy_host(self) -> Generator[Deferred[Any], Any, None]:
        """A TXT record but no address for mta-sts.<domain>: a fetch error naming the host."""
        self.dns.set({"example.test": ["_mta-sts TXT v=STSv1; id=one"]})
        self.port = 9  # never connected to
        yield self.check_failure(FETCH_ERROR, "mta-sts.example.test")

    @inlineCallbacks
    def test_next_address_after_refused(self) -> Generator[Deferred[Any], Any, None]:
        """The policy host's first address refuses the connection: the next one (from the node's DNS) is used."""
        self.dns.set({"example.test": [
            "_mta-sts TXT v=STSv1; id=one", "mta-sts A 127.0.0.2", "mta-sts A 127.0.0.1",
        ]})
        answers, _, _ = yield self.dns.lookupAddress("mta-sts.example.test")
        self.assertEqual([a.payload.dottedQuad() for a in answers], ["127.0.0.2", "127.0.0.1"])
        self.serve(["mta-sts.example.test"])
        state = yield self.sts().policy_for("example.test")
        self.assertEqual(state.source, "fetched", state.failure)

    @inlineCallbacks
    def test_ipv6_policy_host(self) -> Generator[Deferred[Any], Any, None]:
        """A policy host with only an AAAA record is reached over IPv6."""
        try:
            probe = global_reactor.listenTCP(0, Factory(), interface="::1")  # type: ignore[attr-defined]
        except Exception as e:
            raise SkipTest(f"no IPv6 loopback: {e}") from None
        yield probe.stopListening()
        self.dns.set({"example.test": ["_mta-sts TXT v=STSv1; id=one", "mta-sts AAAA ::1"]})
        cert, key = generate_cert(self.dir, self.ca, self.ca_key, ["mta-sts.example.test"])
        tracking = Tracking(Site(self.resource))
        port = global_reactor.listenSSL(  # type: ignore[attr-defined]
            0, tracking, server_options(cert, key), interface="::1",
        )
        self.addCleanup(tracking.closed)
        self.addCleanup(port.stopListening)
        self.port = port.getHost().port
        state = yield self.sts().policy_for("example.test")
        self.assertEqual(state.source, "fetched", state.failure)

    @inlineCallbacks
    def test_cache_across_restart(self) -> Generator[Deferred[Any], Any, None]:
        """Fetched once; the server gone, a new manager on the same cache directory still has the policy."""
        tracking = self.serve(["mta-sts.example.test"])
        first = yield self.sts().policy_for("example.test")
        self.assertEqual(first.source, "fetched")
        yield self.listening.stopListening()
        yield tracking.closed()
        second = yield self.sts().policy_for("example.test")
        self.assertEqual((second.source, second.policy, second.failure), ("cache", parse_policy(ENFORCE), None))
        self.assertEqual(len(self.resource.requests), 1)

    @inlineCallbacks
    def test_txt_id_change_refetches(self) -> Generator[Deferred[Any], Any, None]:
        """A new TXT id: the new policy is fetched from the server and replaces the cached one."""
        self.serve(["mta-sts.example.test"])
        sts = self.sts()
        first = yield sts.policy_for("example.test")
        self.assertEqual(first.policy.mode, "enforce")
        self.dns.set(zone("v=STSv1; id=two"))
        self.resource.body = TESTING.encode()
        self.clock.advance(301)
        second = yield sts.policy_for("example.test")
        self.assertEqual((second.source, second.policy_id, second.policy), ("fetched", "two", parse_policy(TESTING)))
        self.assertEqual(len(self.resource.requests), 2)

    @inlineCallbacks
    def test_max_age_expiry(self) -> Generator[Deferred[Any], Any, None]:
        """Once max_age has passed on the injected clock, the same id is fetched again."""
        self.serve(["mta-sts.example.test"])
        self.resource.body = b"version: STSv1\nmode: enforce\nmx: mx1.example.test\nmax_age: 3600\n"
        sts = self.sts()
        yield sts.policy_for("example.test")
        self.clock.advance(3599)
        cached = yield sts.policy_for("example.test")
        self.assertEqual(cached.source, "cache")
        self.clock.advance(1)
        fresh = yield sts.policy_for("example.test")
        self.assertEqual((fresh.source, fresh.expires), ("fetched", 7200))
        self.assertEqual(len(self.resource.requests), 2)

    @inlineCallbacks
    def test_concurrent_callers_share_one_fetch(self) -> Generator[Deferred[Any], Any, None]:
        """Ten calls at once: one HTTPS request, the same policy for all."""
        server = self.serve(["mta-sts.example.test"])
        sts = self.sts()
        states = yield gatherResults([sts.policy_for("example.test") for _ in range(10)])
        self.assertEqual({(s.source, s.policy) for s in states}, {("fetched", parse_policy(ENFORCE))})
        self.assertEqual((len(self.resource.requests), server.connections), (1, 1))


def test_module_has_no_global_reactor() -> None:
    """The module takes its reactor: it does not import the global one."""
    source = Path(mtasts.__file__).read_text()
    assert "import reactor" not in source and "internet.reactor" not in source


def test_dns_error_is_no_live_policy(tmp_path: Path) -> None:
    """A TXT lookup that fails (server failure) is "no live policy": a fresh cached policy still applies."""
    dns, clock = Zones(zone()), Clock()
    sts = manager(tmp_path, dns, FakeFetcher(), clock)
    state_of(sts)

    class Failing(Zones):
        def lookupText(self, name: str, timeout: Any = None) -> Deferred[Any]:
            return fail(error.DNSServerError("SERVFAIL"))

    clock.advance(301)
    sts.resolver = Failing(zone())
    state = state_of(sts)
    assert (state.source, state.policy_id) == ("cache", "one")
