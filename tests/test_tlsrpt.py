"""
L{relaynet.delivery.tlsrpt}: SMTP TLS Reporting (RFC 8460).

 - Pure: aggregation into the RFC's JSON (exact output, every key checked
   against the RFC's names), the C{_smtp._tls} TXT parser, the report mail
   parsed back with the stdlib C{email} package.
 - Files: flush and read back across a restart, with a L{Clock} and file
   work run in the test's thread.
 - Sending: C{send_due} with an in-process DNS zone (L{relaynet.zones}) and
   a fake C{submit}; HTTPS POST to a real L{twisted.web} server on
   127.0.0.1 with a certificate from a test CA (trial test cases, the
   dirty-reactor check on).
 - L{webpki_result} with certificates from test CAs.
"""

from __future__ import annotations

import email
import email.policy
import gzip
import json
import re
import shutil
import tempfile
from collections.abc import Callable, Generator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import (
    Deferred,
    fail,
    inlineCallbacks,
    maybeDeferred,
    succeed,
)
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from relaynet import zones
from relaynet.delivery import tlsrpt
from relaynet.delivery.tlsrpt import (
    RESULT_TYPES,
    Delivery,
    TLSReports,
    TLSReportSender,
    TLSReportService,
    TLSResult,
    mailto_address,
    parse_tlsrpt_txt,
    report_file_name,
    report_message,
    webpki_result,
)
from relaynet.smtp.tls import generate_ca, generate_cert, server_options

# Twisted hands pyOpenSSL X509/PKey objects to it (deprecated there, not our doing).
pytestmark = pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning")

DAY = "2026-03-08"
NOON = datetime(2026, 3, 8, 12, 0, tzinfo=UTC).timestamp()
NEXT_DAY = NOON + 86400.0

STS_TEXT = "version: STSv1\r\nmode: enforce\r\nmx: mx1.example.test\r\nmx: *.mail.example.test\r\nmax_age: 86400\r\n"
STS_LINES = ["version: STSv1", "mode: enforce", "mx: mx1.example.test", "mx: *.mail.example.test", "max_age: 86400"]
TLSA_RR = "3 1 1 " + "ab" * 32


def run_now(work: Callable[[], Any]) -> Deferred[Any]:
    """A run_in_thread that runs in this thread."""
    return maybeDeferred(work)


def result_of(d: Deferred[Any]) -> Any:
    """The result of a Deferred that has fired."""
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


def make_reports(directory: Path, clock: Clock) -> TLSReports:
    return TLSReports(
        directory, clock, run_now, organization_name="Example Org",
        contact_info="tlsrpt@sender.test", submitter="mx.sender.test",
    )


def sts(**kw: Any) -> TLSResult:
    return TLSResult.for_sts("example.test", STS_TEXT, ["mx1.example.test", "*.mail.example.test"], **kw)


def record_day(reports: TLSReports) -> None:
    """A day of mixed results for example.test (and one for other.test)."""
    for _ in range(3):
        reports.record(sts(receiving_mx_hostname="mx1.example.test", receiving_ip="192.0.2.1"))
    for _ in range(2):
        reports.record(sts(
            receiving_mx_hostname="MX1.example.test.", receiving_ip="192.0.2.1", sending_ip="198.51.100.7",
            result_type="certificate-expired", detail="certificate\nexpired  2026-03-01",
        ))
    reports.record(sts(
        receiving_mx_hostname="a.mail.example.test", receiving_ip="192.0.2.2",
        result_type="starttls-not-supported",
    ))
    reports.record(sts(receiving_mx_hostname="mx9.example.test", result_type="validation-failure",
                       detail="MX host mx9.example.test matches no MTA-STS pattern"))
    reports.record(TLSResult.for_tlsa("example.test", "mx2.example.test", [TLSA_RR], receiving_ip="192.0.2.3"))
    reports.record(TLSResult.no_policy("other.test", receiving_mx_hostname="mx.other.test"))


EXPECTED = {
    "organization-name": "Example Org",
    "date-range": {"start-datetime": "2026-03-08T00:00:00Z", "end-datetime": "2026-03-08T23:59:59Z"},
    "contact-info": "tlsrpt@sender.test",
    "report-id": "2026-03-08.example.test@mx.sender.test",
    "policies": [
        {
            "policy": {
                "policy-type": "sts", "policy-string": STS_LINES, "policy-domain": "example.test",
                "mx-host": ["mx1.example.test", "*.mail.example.test"],
            },
            "summary": {"total-successful-session-count": 3, "total-failure-session-count": 4},
            "failure-details": [
                {
                    "result-type": "certificate-expired", "sending-mta-ip": "198.51.100.7",
                    "receiving-mx-hostname": "mx1.example.test", "receiving-ip": "192.0.2.1",
                    "failed-session-count": 2, "failure-reason-code": "certificate expired 2026-03-01",
                },
                {
                    "result-type": "starttls-not-supported", "receiving-mx-hostname": "a.mail.example.test",
                    "receiving-ip": "192.0.2.2", "failed-session-count": 1,
                },
                {
                    "result-type": "validation-failure", "receiving-mx-hostname": "mx9.example.test",
                    "failed-session-count": 1,
                    "failure-reason-code": "MX host mx9.example.test matches no MTA-STS pattern",
                },
            ],
        },
        {
            "policy": {
                "policy-type": "tlsa", "policy-string": [TLSA_RR], "policy-domain": "example.test",
                "mx-host": ["mx2.example.test"],
            },
            "summary": {"total-successful-session-count": 1, "total-failure-session-count": 0},
        },
    ],
}


# -- aggregation and JSON (RFC 8460 4) -----------------------------------------------


def test_day_of_mixed_results() -> None:
    """A day of successes and failures of two policies becomes exactly the RFC 8460 report."""
    clock = Clock()
    clock.advance(NOON)
    reports = make_reports(Path("/nonexistent"), clock)
    record_day(reports)
    assert reports.report_json(DAY, "example.test") == EXPECTED
    other = reports.report_json(DAY, "other.test")
    assert other["policies"] == [{
        "policy": {"policy-type": "no-policy-found", "policy-domain": "other.test"},
        "summary": {"total-successful-session-count": 1, "total-failure-session-count": 0},
    }]
    assert reports.recorded == 9


def test_results_are_counted_by_utc_day() -> None:
    """A result at 23:59:59 UTC counts for that day, one a second later for the next."""
    clock = Clock()
    clock.advance(datetime(2026, 3, 8, 23, 59, 59, tzinfo=UTC).timestamp())
    reports = make_reports(Path("/nonexistent"), clock)
    reports.record(sts())
    clock.advance(1)
    reports.record(sts())
    reports.record(sts())
    for day, n in (("2026-03-08", 1), ("2026-03-09", 2)):
        assert reports.report_json(day, "example.test")["policies"][0]["summary"]["total-successful-session-count"] == n


REPORT_KEYS = {"organization-name", "date-range", "contact-info", "report-id", "policies"}
DATE_RANGE_KEYS = {"start-datetime", "end-datetime"}
POLICY_ITEM_KEYS = {"policy", "summary", "failure-details"}
POLICY_KEYS = {"policy-type", "policy-string", "policy-domain", "mx-host"}
SUMMARY_KEYS = {"total-successful-session-count", "total-failure-session-count"}
FAILURE_KEYS = {
    "result-type", "sending-mta-ip", "receiving-mx-hostname", "receiving-mx-helo", "receiving-ip",
    "failed-session-count", "additional-information", "failure-reason-code",
}
RFC_RESULT_TYPES = {
    "starttls-not-supported", "certificate-host-mismatch", "certificate-expired", "certificate-not-trusted",
    "validation-failure", "tlsa-invalid", "dnssec-invalid", "dane-required", "sts-policy-fetch-error",
    "sts-policy-invalid", "sts-webpki-invalid",
}


def check_rfc_report(report: dict[str, Any]) -> None:
    """Every key of C{report} is one of RFC 8460 section 4.4, the required ones present, types right."""
    assert set(report) == REPORT_KEYS
    assert set(report["date-range"]) == DATE_RANGE_KEYS
    for key in DATE_RANGE_KEYS:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", report["date-range"][key])
    assert all(isinstance(report[k], str) and report[k] for k in ("organization-name", "contact-info", "report-id"))
    for item in report["policies"]:
        assert set(item) <= POLICY_ITEM_KEYS and {"policy", "summary"} <= set(item)
        policy = item["policy"]
        assert set(policy) <= POLICY_KEYS and {"policy-type", "policy-domain"} <= set(policy)
        assert policy["policy-type"] in ("sts", "tlsa", "no-policy-found")
        for key in ("policy-string", "mx-host"):
            assert all(isinstance(s, str) for s in policy.get(key, []))
        assert set(item["summary"]) == SUMMARY_KEYS
        assert all(type(v) is int and v >= 0 for v in item["summary"].values())
        rows = item.get("failure-details", [])
        assert sum(r["failed-session-count"] for r in rows) <= item["summary"]["total-failure-session-count"]
        for row in rows:
            assert set(row) <= FAILURE_KEYS and {"result-type", "failed-session-count"} <= set(row)
            assert row["result-type"] in RFC_RESULT_TYPES
            assert type(row["failed-session-count"]) is int and row["failed-session-count"] > 0


def test_every_key_is_the_rfcs() -> None:
    """The report uses only RFC 8460 4.4 names and values; the module's result types are the RFC's eleven."""
    assert RESULT_TYPES == RFC_RESULT_TYPES
    clock = Clock()
    clock.advance(NOON)
    reports = make_reports(Path("/nonexistent"), clock)
    record_day(reports)
    for domain in ("example.test", "other.test"):
        report = reports.report_json(DAY, domain)
        check_rfc_report(report)
        assert json.loads(json.dumps(report)) == report


def test_independent_parser() -> None:
    """parsedmarc (an independent RFC 8460 parser) reads the report and the report mail."""
    parsedmarc = pytest.importorskip("parsedmarc")
    clock = Clock()
    clock.advance(NOON)
    reports = make_reports(Path("/nonexistent"), clock)
    record_day(reports)
    report = reports.report_json(DAY, "example.test")
    parsed = parsedmarc.parse_smtp_tls_report_json(json.dumps(report))
    assert parsed["policies"][0]["failed_session_count"] == 4
    message = report_message(report, "example.test", "mx.sender.test", "postmaster@mx.sender.test",
                             ["tlsrpt@example.test"], NEXT_DAY)
    mail = parsedmarc.parse_report_email(message, offline=True)
    assert mail["report_type"] == "smtp_tls"
    assert mail["report"]["report_id"] == report["report-id"]


def test_bad_result_and_policy_types() -> None:
    """Only RFC 8460 result types and policy types are accepted."""
    with pytest.raises(ValueError):
        TLSResult("example.test", "sts", result_type="certificate-revoked")
    with pytest.raises(ValueError):
        TLSResult("example.test", "dane")


def test_failure_rows_are_bounded() -> None:
    """Past MAX_FAILURE_ROWS distinct failures, more count in the summary only."""
    clock = Clock()
    clock.advance(NOON)
    reports = make_reports(Path("/nonexistent"), clock)
    for i in range(tlsrpt.MAX_FAILURE_ROWS + 5):
        reports.record(sts(result_type="validation-failure", detail=f"reason {i}"))
    item = reports.report_json(DAY, "example.test")["policies"][0]
    assert item["summary"]["total-failure-session-count"] == tlsrpt.MAX_FAILURE_ROWS + 5
    assert len(item["failure-details"]) == tlsrpt.MAX_FAILURE_ROWS


# -- TXT record (RFC 8460 3) ---------------------------------------------------------


@pytest.mark.parametrize("records, expected", [
    (["v=TLSRPTv1; rua=mailto:reports@example.test"], ("mailto:reports@example.test",)),
    (["v=TLSRPTv1;rua=mailto:a@example.test, https://r.example.test/tlsrpt ;ext=1;"],
     ("mailto:a@example.test", "https://r.example.test/tlsrpt")),
    (["v=spf1 -all", "v=TLSRPTv1; rua=https://r.example.test/x"], ("https://r.example.test/x",)),
    (["v=TLSRPTv1; rua=ftp://r.example.test/x,mailto:a@example.test"], ("mailto:a@example.test",)),
    (["v=TLSRPTv2; rua=mailto:reports@example.test"], None),
    (["v=TLSRPTv1; rua=mailto:a@example.test", "v=TLSRPTv1; rua=mailto:b@example.test"], None),
    (["v=TLSRPTv1"], None),
    (["v=TLSRPTv1; ext=1"], None),
    (["v=TLSRPTv1; rua=ftp://r.example.test/x"], None),
    (["v=TLSRPTv1; rua=mailto:a@example.test; junk"], None),
    (["v=TLSRPTv1; rua=mailto:a@example.test; rua=mailto:b@example.test"], None),
    (["v=TLSRPTv1x; rua=mailto:a@example.test"], None),
    (["v=TLSRPTv10; rua=mailto:b@example.test", "v=TLSRPTv1; rua=mailto:a@example.test"],
     ("mailto:a@example.test",)),
    ([], None),
])
def test_parse_txt(records: list[str], expected: tuple[str, ...] | None) -> None:
    """Exactly one v=TLSRPTv1 record with a rua gives its mailto/https URIs; anything else: no reports."""
    assert parse_tlsrpt_txt(records) == expected


_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
_uri = st.one_of(
    st.builds(lambda a, b, c: f"mailto:{a}@{b}.{c}", _label, _label, _label),
    st.builds(lambda a, b: f"https://{a}.{b}/tlsrpt", _label, _label),
)
_ws = st.sampled_from(["", " ", "\t", " \t "])


@given(st.lists(_uri, min_size=1, max_size=4), _ws, _ws, st.booleans(), st.booleans())
def test_parse_txt_property(uris: list[str], before: str, after: str, ext: bool, trailing: bool) -> None:
    """Any well-formed record (white space around ';', an extension, a trailing ';') gives its URIs back."""
    record = f"v=TLSRPTv1{before};{after}rua={','.join(uris)}"
    if ext:
        record += f"{before};{after}x_ext.1=value"
    if trailing:
        record += f"{before};"
    assert parse_tlsrpt_txt([record]) == tuple(uris)


@given(st.lists(st.text(max_size=60), max_size=3))
def test_parse_txt_never_raises(records: list[str]) -> None:
    """Arbitrary TXT strings give URIs or None, never an exception."""
    result = parse_tlsrpt_txt(records)
    assert result is None or all(u.lower().startswith(("mailto:", "https:")) for u in result)


@pytest.mark.parametrize("uri, address", [
    ("mailto:reports@example.test", "reports@example.test"),
    ("mailto:tls%2Drpt@example.test?subject=x", "tls-rpt@example.test"),
    ("MAILTO:a@example.test", "a@example.test"),
    ("mailto:no-domain", None),
    ("mailto:a@b@c", None),
    ("https://example.test", None),
])
def test_mailto_address(uri: str, address: str | None) -> None:
    """The address of a mailto: URI, percent-decoded, without its query."""
    assert mailto_address(uri) == address


# -- the mail (RFC 8460 5.3) -------------------------------------------------------------


def test_report_mail_structure() -> None:
    """multipart/report; report-type=tlsrpt: a text part and the gzipped JSON named per 5.1, with the 5.3 headers."""
    clock = Clock()
    clock.advance(NOON)
    reports = make_reports(Path("/nonexistent"), clock)
    record_day(reports)
    report = reports.report_json(DAY, "example.test")
    raw = report_message(report, "example.test", "mx.sender.test", "postmaster@mx.sender.test",
                         ["a@example.test", "b@example.test"], NEXT_DAY)
    assert b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "tlsrpt"
    assert msg["TLS-Report-Domain"] == "example.test"
    assert msg["TLS-Report-Submitter"] == "mx.sender.test"
    assert msg["Subject"] == (
        "Report Domain: example.test Submitter: mx.sender.test Report-ID: <2026-03-08.example.test@mx.sender.test>"
    )
    assert msg["From"] == "postmaster@mx.sender.test"
    assert msg["To"] == "a@example.test, b@example.test"
    assert msg["Date"].datetime == datetime.fromtimestamp(NEXT_DAY, UTC)
    parts = list(msg.iter_parts())  # type: ignore[attr-defined]
    assert [p.get_content_type() for p in parts] == ["text/plain", "application/tlsrpt+gzip"]
    assert "aggregate TLS report" in parts[0].get_content()
    attachment = parts[1]
    assert attachment.get_content_disposition() == "attachment"
    first, last = int(datetime(2026, 3, 8, tzinfo=UTC).timestamp()), int(datetime(2026, 3, 8, 23, 59, 59, tzinfo=UTC).timestamp())
    name = attachment.get_filename()
    assert re.fullmatch(rf"mx\.sender\.test!example\.test!{first}!{last}![A-Za-z0-9]+\.json\.gz", name), name
    assert name == report_file_name("mx.sender.test", "example.test", DAY, report["report-id"])
    assert json.loads(gzip.decompress(attachment.get_content())) == report


# -- files: flush, restart ------------------------------------------------------------------


class FileTests(TestCase):
    """Counters written to disk and read back."""

    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="h-rpt-"))
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.clock = Clock()
        self.clock.advance(NOON)

    def test_flush_and_restart(self) -> None:
        """A flush writes the RFC report per domain; after a restart today's counts go on from the files."""
        reports = make_reports(self.dir, self.clock)
        result_of(reports.load())
        record_day(reports)
        result_of(reports.flush())
        path = self.dir / DAY / "example.test.json"
        self.assertEqual(json.loads(path.read_bytes()), EXPECTED)
        self.assertTrue((self.dir / DAY / "other.test.json").exists())
        self.assertEqual([p.name for p in (self.dir / DAY).iterdir() if p.name.startswith(".")], [])

        again = make_reports(self.dir, self.clock)
        again.record(sts(receiving_mx_hostname="mx1.example.test", receiving_ip="192.0.2.1"))
        result_of(again.load())
        record_day(again)
        result_of(again.flush())
        report = json.loads(path.read_bytes())
        self.assertEqual(report["policies"][0]["summary"],
                         {"total-successful-session-count": 7, "total-failure-session-count": 8})
        self.assertEqual(report["policies"][0]["failure-details"][0]["failed-session-count"], 4)
        self.assertEqual(report["policies"][1]["summary"]["total-successful-session-count"], 2)

    def test_flush_writes_only_changes(self) -> None:
        """A flush with nothing recorded since the last writes nothing."""
        reports = make_reports(self.dir, self.clock)
        reports.record(sts())
        result_of(reports.flush())
        path = self.dir / DAY / "example.test.json"
        path.write_text("{}")
        result_of(reports.flush())
        self.assertEqual(path.read_text(), "{}")

    def test_failed_flush_is_written_next_time(self) -> None:
        """A flush that could not write keeps its changes for the next flush."""
        (self.dir / DAY).write_text("a file where the day's directory goes")
        reports = make_reports(self.dir, self.clock)
        reports.record(sts())
        self.failureResultOf(reports.flush(), OSError)
        (self.dir / DAY).unlink()
        result_of(reports.flush())
        self.assertEqual(json.loads((self.dir / DAY / "example.test.json").read_bytes())["report-id"],
                         "2026-03-08.example.test@mx.sender.test")

    def test_past_days_leave_memory(self) -> None:
        """After midnight, yesterday's counts are written once more and dropped from memory."""
        reports = make_reports(self.dir, self.clock)
        reports.record(sts())
        self.clock.advance(86400)
        reports.record(sts())
        result_of(reports.flush())
        self.assertEqual(sorted(p.name for p in self.dir.iterdir()), ["2026-03-08", "2026-03-09"])
        self.assertEqual(reports.report_json(DAY, "example.test")["policies"], [])
        self.assertEqual(len(reports.report_json("2026-03-09", "example.test")["policies"]), 1)

    def test_service(self) -> None:
        """The service reads back at start, flushes every flush_interval and at stop, and sends on its timer."""
        reports = make_reports(self.dir, self.clock)
        sent: list[float | None] = []

        class Sender:
            def send_due(self, now: float | None = None) -> Deferred[None]:
                sent.append(now)
                return succeed(None)

        service = TLSReportService(reports, self.clock, 60.0, Sender(), 3600.0)  # type: ignore[arg-type]
        service.startService()
        reports.record(sts())
        path = self.dir / DAY / "example.test.json"
        self.assertFalse(path.exists())
        self.clock.advance(60)
        self.assertTrue(path.exists())
        reports.record(sts())
        result_of(service.stopService())
        self.assertEqual(
            json.loads(path.read_bytes())["policies"][0]["summary"]["total-successful-session-count"], 2)
        self.assertEqual(sent, [])
        service.startService()
        self.clock.advance(3600)
        self.assertEqual(sent, [None])
        result_of(service.stopService())


# -- sending ------------------------------------------------------------------------------


def zone(txt: str | None) -> dict[str, list[str]]:
    lines = ["@ MX 10 mx1", "mx1 A 192.0.2.1"]
    if txt is not None:
        lines.append(f"_smtp._tls TXT {txt}")
    return {"example.test": lines}


class Submit:
    """A fake submit: records what it is given; fails while C{failing}."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str], bytes]] = []
        self.failing = False

    def __call__(self, sender: str, recipients: list[str], message: bytes) -> Deferred[None]:
        self.calls.append((sender, recipients, message))
        if self.failing:
            return fail(OSError("queue full"))
        return succeed(None)


class SendTests(TestCase):
    """send_due with an in-process DNS zone and a fake submit."""

    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="h-rpt-"))
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.clock = Clock()
        self.clock.advance(NOON)
        self.reports = make_reports(self.dir, self.clock)
        self.reports.record(sts())
        self.submit = Submit()

    def sender(self, txt: str | None = "v=TLSRPTv1; rua=mailto:tlsrpt@example.test", **kw: Any) -> TLSReportSender:
        kw.setdefault("report_sender", "postmaster@mx.sender.test")
        return TLSReportSender(
            self.reports, zones.resolver(zone(txt)), global_reactor, self.submit, clock=self.clock, **kw,
        )

    def state(self) -> Delivery:
        return Delivery.from_json((self.dir / DAY / "example.test.sent").read_bytes())

    def test_today_is_not_sent(self) -> None:
        """Only complete days are sent; today's report is flushed, not sent."""
        tried = result_of(self.sender().send_due(NOON + 60))
        self.assertEqual((tried, self.submit.calls), ({}, []))
        self.assertTrue((self.dir / DAY / "example.test.json").exists())

    def test_mailed_once(self) -> None:
        """Yesterday's report is mailed to the rua once, marked sent on disk; a restarted sender does not send again."""
        tried = result_of(self.sender().send_due(NEXT_DAY))
        self.assertEqual(tried[(DAY, "example.test")], Delivery(("mailto:tlsrpt@example.test",), 1, True, "delivered"))
        [(sender, recipients, message)] = self.submit.calls
        self.assertEqual((sender, recipients), ("postmaster@mx.sender.test", ["tlsrpt@example.test"]))
        msg = email.message_from_bytes(message, policy=email.policy.default)
        self.assertEqual(msg["TLS-Report-Domain"], "example.test")
        self.assertTrue(self.state().done)
        result_of(self.sender().send_due(NEXT_DAY + 7200))
        self.assertEqual(len(self.submit.calls), 1)

    def test_failure_retried_later(self) -> None:
        """A failed submission is tried again after retry_after, not before; then marked sent."""
        sender = self.sender(retry_after=3600.0)
        self.submit.failing = True
        tried = result_of(sender.send_due(NEXT_DAY))
        state = tried[(DAY, "example.test")]
        self.assertEqual((state.done, state.attempts), (False, 1))
        self.assertIn("queue full", state.note)
        self.assertFalse(self.state().done)
        self.submit.failing = False
        result_of(sender.send_due(NEXT_DAY + 60))
        self.assertEqual(len(self.submit.calls), 1)
        result_of(sender.send_due(NEXT_DAY + 3600))
        self.assertEqual(len(self.submit.calls), 2)
        self.assertEqual((self.state().done, self.state().attempts), (True, 2))

    def test_given_up(self) -> None:
        """A report still failing GIVE_UP_DAYS after its day is given up."""
        self.submit.failing = True
        result_of(self.sender().send_due(NOON + (tlsrpt.GIVE_UP_DAYS + 1) * 86400.0))
        self.assertTrue(self.state().done)
        self.assertIn("given up", self.state().note)

    def test_no_record(self) -> None:
        """A domain without a _smtp._tls record gets no report, and is not looked up again."""
        sender = self.sender(None)
        tried = result_of(sender.send_due(NEXT_DAY))
        self.assertTrue(tried[(DAY, "example.test")].done)
        self.assertIn("no TLSRPT record", self.state().note)
        self.assertEqual(self.submit.calls, [])
        self.assertEqual(result_of(sender.send_due(NEXT_DAY + 7200)), {})

    def test_dns_failure_retried(self) -> None:
        """A failed TXT lookup (not a missing name) is tried again later."""
        sender = self.sender()
        sender.resolver = zones.resolver({"elsewhere.test": ["@ A 192.0.2.9"]})
        tried = result_of(sender.send_due(NEXT_DAY))
        self.assertFalse(tried[(DAY, "example.test")].done)
        sender.resolver = zones.resolver(zone("v=TLSRPTv1; rua=mailto:tlsrpt@example.test"))
        result_of(sender.send_due(NEXT_DAY + tlsrpt.RETRY_AFTER))
        self.assertEqual(len(self.submit.calls), 1)

    def test_modes(self) -> None:
        """send = none sends nothing; send = https skips mailto URIs (done: nothing to send)."""
        self.assertEqual(result_of(self.sender(mode="none").send_due(NEXT_DAY)), {})
        tried = result_of(self.sender(mode="https").send_due(NEXT_DAY))
        self.assertTrue(tried[(DAY, "example.test")].done)
        self.assertIn("no rua usable", tried[(DAY, "example.test")].note)
        self.assertEqual(self.submit.calls, [])

    def test_old_days_pruned(self) -> None:
        """Report directories older than KEEP_DAYS are removed."""
        result_of(self.sender().send_due(NEXT_DAY))
        result_of(self.sender().send_due(NOON + (tlsrpt.KEEP_DAYS + 1) * 86400.0))
        self.assertFalse((self.dir / DAY).exists())


# -- HTTPS (RFC 8460 5.4) against a real server ------------------------------------------------


class Collector(Resource):
    """Answers POSTs with C{code} and keeps what it got."""

    isLeaf = True

    def __init__(self, code: int = 200) -> None:
        super().__init__()
        self.code = code
        self.posts: list[tuple[bytes, bytes | None, bytes, bytes]] = []

    def render_POST(self, request: Request) -> bytes:
        assert request.content is not None
        self.posts.append((
            request.path, request.getHeader(b"content-type"), request.getRequestHostname(),
            request.content.read(),
        ))
        request.setResponseCode(self.code)
        return b"thanks"


class HTTPSTests(TestCase):
    """Reports POSTed over verified TLS to a twisted.web server on 127.0.0.1."""

    timeout = 30

    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="h-rpt-"))
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.ca, self.ca_key = generate_ca(self.dir / "ca")
        self.clock = Clock()
        self.clock.advance(NOON)
        self.reports = make_reports(self.dir / "tls-rpt", self.clock)
        self.reports.record(sts(result_type="starttls-not-supported", receiving_mx_hostname="mx1.example.test"))
        self.resource = Collector()

    def serve(self, ca: tuple[Path, Path] | None = None) -> int:
        ca_cert, ca_key = ca or (self.ca, self.ca_key)
        certs = self.dir / f"certs-{len(list(self.dir.iterdir()))}"
        certs.mkdir()
        cert, key = generate_cert(certs, ca_cert, ca_key, ["reports.example.test"])
        site = Site(self.resource)
        site.displayTracebacks = False
        port = global_reactor.listenSSL(  # type: ignore[attr-defined]
            0, site, server_options(cert, key), interface="127.0.0.1",
        )
        self.addCleanup(port.stopListening)
        return int(port.getHost().port)

    def sender(self, port: int) -> TLSReportSender:
        def connect(host: str, p: int) -> TCP4ClientEndpoint:
            assert host == "reports.example.test"
            return TCP4ClientEndpoint(global_reactor, "127.0.0.1", p, timeout=10)

        resolver = zones.resolver(zone(f"v=TLSRPTv1; rua=https://reports.example.test:{port}/tlsrpt"))
        return TLSReportSender(
            self.reports, resolver, global_reactor, Submit(), mode="both", ca_file=self.ca, connect=connect,
            timeout=10.0,
        )

    @inlineCallbacks
    def test_posted(self) -> Generator[Deferred[Any], Any, None]:
        """The gzipped report is POSTed with Content-Type application/tlsrpt+gzip; marked sent."""
        port = self.serve()
        tried = yield self.sender(port).send_due(NEXT_DAY)
        state = tried[(DAY, "example.test")]
        self.assertEqual((state.done, state.note), (True, "delivered"))
        [(path, ctype, host, body)] = self.resource.posts
        self.assertEqual((path, ctype, host), (b"/tlsrpt", b"application/tlsrpt+gzip", b"reports.example.test"))
        report = json.loads(gzip.decompress(body))
        self.assertEqual(report, self.reports.report_json(DAY, "example.test"))
        check_rfc_report(report)

    @inlineCallbacks
    def test_untrusted_certificate(self) -> Generator[Deferred[Any], Any, None]:
        """A server whose certificate is from another CA gets nothing; the report waits for a retry."""
        port = self.serve(ca=generate_ca(self.dir / "other-ca"))
        tried = yield self.sender(port).send_due(NEXT_DAY)
        state = tried[(DAY, "example.test")]
        self.assertFalse(state.done)
        self.assertEqual(self.resource.posts, [])

    @inlineCallbacks
    def test_server_error(self) -> Generator[Deferred[Any], Any, None]:
        """A 500 answer is a failure: tried again later."""
        self.resource.code = 500
        port = self.serve()
        tried = yield self.sender(port).send_due(NEXT_DAY)
        state = tried[(DAY, "example.test")]
        self.assertFalse(state.done)
        self.assertIn("HTTP 500", state.note)
        self.assertEqual(len(self.resource.posts), 1)


# -- WebPKI (MTA-STS testing mode) ----------------------------------------------------------------


def der_chain(pem_file: Path) -> list[bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    return [c.public_bytes(Encoding.DER) for c in x509.load_pem_x509_certificates(pem_file.read_bytes())]


class TestWebPKI:
    """webpki_result with certificates from test CAs."""

    @pytest.fixture(autouse=True)
    def certs(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.ca, self.ca_key = generate_ca(tmp_path / "ca")
        self.leaf, _ = generate_cert(tmp_path, self.ca, self.ca_key, ["mx1.example.test"])

    def test_good(self) -> None:
        """A chain to the trusted CA naming the host: no failure."""
        assert webpki_result(der_chain(self.leaf), "mx1.example.test", self.ca) is None
        assert webpki_result(der_chain(self.leaf)[:1], "MX1.example.test.", self.ca) is None

    def test_wrong_name(self) -> None:
        """A valid chain for another name: certificate-host-mismatch."""
        assert webpki_result(der_chain(self.leaf), "mx2.example.test", self.ca) == "certificate-host-mismatch"

    def test_other_ca(self) -> None:
        """A chain to a CA not trusted: certificate-not-trusted (also with the system store)."""
        other, _ = generate_ca(self.tmp / "other")
        assert webpki_result(der_chain(self.leaf), "mx1.example.test", other) == "certificate-not-trusted"
        assert webpki_result(der_chain(self.leaf), "mx1.example.test", None) == "certificate-not-trusted"
        assert webpki_result([], "mx1.example.test", self.ca) == "certificate-not-trusted"

    def test_expired(self) -> None:
        """A leaf past its notAfter: certificate-expired."""
        later = datetime.now(UTC) + timedelta(days=900)
        assert webpki_result(der_chain(self.leaf), "mx1.example.test", self.ca, now=later) == "certificate-expired"



def test_load_after_flush_does_nothing(tmp_path: Path) -> None:
    """load() after a flush does not add today's file again (it holds what memory holds)."""
    clock = Clock()
    clock.advance(NOON)
    reports = make_reports(tmp_path, clock)
    reports.record(sts())
    result_of(reports.flush())
    result_of(reports.load())
    assert reports.report_json(DAY, "example.test")["policies"][0]["summary"]["total-successful-session-count"] == 1


# -- [tls_rpt] in the node configuration ------------------------------------------------------


def test_config_defaults() -> None:
    """Off by default; submitter and report sender default to the node's hostname; check-config round trip."""
    from relaynet.config import describe, parse_config

    config = parse_config({"node": {"hostname": "mx.sender.test"}})
    assert config.tls_rpt == tlsrpt_settings(
        enabled=False, submitter="mx.sender.test", report_sender="postmaster@mx.sender.test")
    enabled = parse_config({"node": {"hostname": "mx.sender.test"}, "tls_rpt": {
        "enabled": True, "organization_name": "Example Org", "contact_info": "tlsrpt@sender.test",
        "send": "both", "flush_interval": 5, "submitter": "Reports.Sender.Test.",
        "report_sender": "tlsrpt@sender.test",
    }})
    assert enabled.tls_rpt == tlsrpt_settings(
        enabled=True, organization_name="Example Org", contact_info="tlsrpt@sender.test", send="both",
        flush_interval=5.0, submitter="reports.sender.test", report_sender="tlsrpt@sender.test")
    import tomllib

    assert parse_config(tomllib.loads(describe(enabled)), source="x").tls_rpt == enabled.tls_rpt


def tlsrpt_settings(**kw: Any) -> Any:
    from relaynet.config import TLSRPTSettings

    return TLSRPTSettings(**kw)


@pytest.mark.parametrize("table, key, words", [
    ({"enabled": True, "contact_info": "a@b.test"}, "tls_rpt.organization_name", "required when enabled"),
    ({"enabled": True, "organization_name": "X"}, "tls_rpt.contact_info", "required when enabled"),
    ({"send": "fax"}, "tls_rpt.send", "mail, https, both, none"),
    ({"flush_interval": 0}, "tls_rpt.flush_interval", "positive"),
    ({"report_sender": "postmaster"}, "tls_rpt.report_sender", "address"),
    ({"enabled": "yes"}, "tls_rpt.enabled", "must be bool"),
    ({"rua": "x"}, "tls_rpt.rua", "unknown key"),
])
def test_config_errors(table: dict[str, Any], key: str, words: str) -> None:
    """Each error names the file and the key."""
    from relaynet.config import ConfigError, parse_config

    with pytest.raises(ConfigError) as e:
        parse_config({"tls_rpt": table}, source="node.toml")
    assert (e.value.source, e.value.key) == ("node.toml", key)
    assert words in str(e.value)


def test_tls_failure_result() -> None:
    """Handshake failures map to result types, through Failures and Twisted's wrapped reasons."""
    from OpenSSL import SSL
    from service_identity import VerificationError
    from twisted.python.failure import Failure
    from twisted.web._newclient import ResponseNeverReceived

    from relaynet.delivery.dane import DaneVerificationError, MatchResult

    dane = DaneVerificationError(MatchResult.failed("no TLSA record matched", "certificate-expired"))
    assert tlsrpt.tls_failure_result(dane) == "certificate-expired"
    assert tlsrpt.tls_failure_result(Failure(VerificationError([]))) == "certificate-host-mismatch"
    verify = SSL.Error([("SSL routines", "", "certificate verify failed")])
    assert tlsrpt.tls_failure_result(ResponseNeverReceived([Failure(verify)])) == "certificate-not-trusted"
    expired = SSL.Error([("SSL routines", "", "sslv3 alert certificate expired")])
    assert tlsrpt.tls_failure_result(expired) == "certificate-expired"
    assert tlsrpt.tls_failure_result(ConnectionResetError()) == "validation-failure"
