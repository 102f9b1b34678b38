# -*- test-case-name: tests.test_soak -*-
"""
C{relaynet lab soak}: the pure parts (the load's choices, the messages it
builds, the last hop's overlay, the report and its verdict) and, in the slow
tier, a short soak of chain3 under C{kill -9}.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import random
import tomllib
from pathlib import Path
from typing import Any

import pytest

from relaynet.lab import control
from relaynet.lab.check import Evidence, Holder
from relaynet.lab.cli import _OneLineParser
from relaynet.lab.observe import EventIndex
from relaynet.lab.soak import (
    MAX_RECIPIENTS,
    MAX_SIZE,
    MIN_SIZE,
    SoakReport,
    overlay_config,
    percentile,
    pick_recipients,
    pick_size,
    recipient_kind,
    soak_message,
    summarise,
)
from relaynet.lab.soakcli import add_soak_parser
from relaynet.lab.state import Lab

TOPOLOGIES = Path(__file__).parent.parent / "topologies"


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="relaynet lab")
    sub = p.add_subparsers(dest="lab_command", parser_class=_OneLineParser)
    add_soak_parser(sub)
    return p.parse_args(argv)


# -- the load ----------------------------------------------------------------


def test_recipient_kinds() -> None:
    """Unknown soak users are the 5xx kind, the deferring domain the 4xx kind, the rest ordinary."""
    assert recipient_kind("soak-nouser-07@dest.test") == "5xx"
    assert recipient_kind("soak-r07@soak-defer.dest.test") == "4xx"
    assert recipient_kind("SOAK-R07@Soak-Defer.Dest.Test") == "4xx"
    assert recipient_kind("soak-r07@dest.test") == "ok"
    assert recipient_kind("bob@dest.test") == "ok"


def test_recipients_are_distinct_bounded_and_replayed_by_the_seed() -> None:
    """1 to 50 distinct recipients per message, of all three kinds over many messages; the seed replays them."""
    kinds: dict[str, int] = {}
    counts = []
    for seq in range(2000):
        rcpts = pick_recipients(random.Random(f"5:{seq}"), "dest.test")
        assert rcpts == pick_recipients(random.Random(f"5:{seq}"), "dest.test")
        assert 1 <= len(rcpts) <= MAX_RECIPIENTS
        assert len({r.split("@")[0].split("-")[-1] for r in rcpts}) == len(rcpts)
        counts.append(len(rcpts))
        for r in rcpts:
            kinds[recipient_kind(r)] = kinds.get(recipient_kind(r), 0) + 1
    assert set(kinds) == {"ok", "4xx", "5xx"}
    assert kinds["ok"] > 10 * (kinds["4xx"] + kinds["5xx"]) / 2
    assert min(counts) == 1 and max(counts) == MAX_RECIPIENTS
    assert sorted(counts)[len(counts) // 2] <= 5  # mostly few


def test_sizes_spread_from_1k_to_1m() -> None:
    """Sizes are log-uniform: within [1 KB, 1 MB], with both small and large ones common."""
    sizes = sorted(pick_size(random.Random(i)) for i in range(2000))
    assert MIN_SIZE <= sizes[0] and sizes[-1] <= MAX_SIZE
    assert sizes[len(sizes) // 10] < 4096 and sizes[-len(sizes) // 10] > 256 * 1024


@pytest.mark.parametrize("size", [1, 500, 1024, 1100, 4097, 65536 + 3, MAX_SIZE])
@pytest.mark.parametrize("nrcpt", [1, 50])
def test_messages_have_short_crlf_lines_whatever_the_size_and_recipients(size: int, nrcpt: int) -> None:
    """Every line ends in CRLF and is at most 78 octets (the To: field is folded); the size is kept."""
    rcpts = [f"soak-r{i:02d}@soak-defer.dest.test" for i in range(1, nrcpt + 1)]
    data = soak_message("<lab-soak-x-1@chain3.lab.test>", "alice@client.test", rcpts, size, "soak-x", 1)
    assert data.endswith(b"\r\n")
    lines = data.split(b"\r\n")[:-1]
    assert all(b"\r" not in line and b"\n" not in line for line in lines)
    assert max(len(line) for line in lines) <= 78
    head = data[: data.index(b"\r\n\r\n")]
    if size > len(head) + 100:
        assert abs(len(data) - size) <= 1
    assert data.count(b"soak-r") >= nrcpt


def test_overlay_adds_mailboxes_and_defers_until_the_window_opens() -> None:
    """Closed: a 451 reject route for soak-defer.DOMAIN comes first; open: that domain is local too."""
    data = {"local": {"domains": ["dest.test"], "users": ["bob"]},
            "route": [{"domains": ["client.test"], "action": "relay"}]}
    closed = overlay_config(data, "dest.test", open_window=False)
    assert closed["local"]["domains"] == ["dest.test"]
    assert closed["local"]["users"][0] == "bob" and "soak-r50" in closed["local"]["users"]
    assert closed["route"][0] == {"domains": ["soak-defer.dest.test"], "action": "reject", "code": 451,
                                  "enhanced": "4.7.1", "text": "soak: deferred on purpose, try again later"}
    assert closed["route"][1:] == data["route"]
    opened = overlay_config(data, "dest.test", open_window=True)
    assert opened["local"]["domains"] == ["dest.test", "soak-defer.dest.test"]
    assert data == {"local": {"domains": ["dest.test"], "users": ["bob"]},
                    "route": [{"domains": ["client.test"], "action": "relay"}]}


# -- the report --------------------------------------------------------------


def _events(*records: dict[str, Any]) -> EventIndex:
    return EventIndex(list(records))


def test_summarise_counts_each_recipient_once_and_measures_from_the_250() -> None:
    """
    Delivered (after a deferral or not), bounced as expected (5xx), bounced
    unexpectedly, duplicated, lost, in flight: each pair is counted once, and
    latency runs from the client's 250 to the first local delivery.
    """
    sent = [
        {"message_id": "<m1>", "time": 100.0, "start": 99.0,
         "recipients": ["soak-r01@dest.test", "soak-nouser-02@dest.test", "soak-r03@soak-defer.dest.test"]},
        {"message_id": "<m2>", "time": 200.0, "recipients": ["soak-r01@dest.test", "soak-r02@dest.test"]},
        {"message_id": "<m3>", "time": 300.0, "recipients": ["soak-r04@dest.test", "soak-r05@dest.test"]},
    ]
    ev = Evidence()
    ev.copies = {("<m1>", "soak-r01@dest.test"): 1, ("<m1>", "soak-r03@soak-defer.dest.test"): 1,
                 ("<m2>", "soak-r01@dest.test"): 2, ("<m3>", "soak-r05@dest.test"): 1}
    ev.failed = {("<m1>", "soak-nouser-02@dest.test"): 1, ("<m2>", "soak-r02@dest.test"): 1}
    ev.queued = {"<m3>": [Holder("hop2", pending=frozenset({"soak-r04@dest.test"}))]}
    index = _events(
        {"event": "received", "queue_id": "A", "message_id": "<m1>", "time": 100.0},
        {"event": "received", "queue_id": "B", "message_id": "<m1>", "time": 100.1},
        {"event": "deferred", "queue_id": "A", "recipient": "soak-r03@soak-defer.dest.test", "time": 101.0},
        {"event": "delivered", "queue_id": "B", "recipient": "soak-r01@dest.test", "time": 100.5},
        {"event": "delivered", "queue_id": "B", "recipient": "soak-r03@soak-defer.dest.test", "time": 130.0},
    )
    report = summarise(sent, ev, index, SoakReport())
    assert (report.acknowledged, report.acknowledged_recipients) == (3, 7)
    assert report.kinds == {"ok": 5, "5xx": 1, "4xx": 1}
    assert report.delivered == 3
    assert (report.deferred_then_delivered, report.deferred_then_delivered_4xx) == (1, 1)
    assert report.bounced_expected == 1
    assert report.bounced_unexpected == [("<m2>", "soak-r02@dest.test")]
    assert report.duplicated == [("<m2>", "soak-r01@dest.test", 2)]
    assert report.in_flight == [("<m3>", "soak-r04@dest.test")]
    assert report.lost == []
    assert report.latencies == [pytest.approx(0.5)]
    assert report.latencies_4xx == [pytest.approx(30.0)]
    assert not report.ok
    assert report.verdict() == "FAIL: 1 duplicated, 1 in flight after the drain, 1 bounced unexpectedly"
    assert report.format().splitlines()[-1] == report.verdict()
    assert report.to_json()["ok"] is False and report.to_json()["verdict"] == report.verdict()


def test_latency_falls_back_to_the_mailbox_file_time_when_the_event_is_gone() -> None:
    """A delivery without a 'delivered' event (lost to a power cut) is timed by its mailbox file, and said so."""
    sent = [{"message_id": "<m>", "time": 10.0, "recipients": ["soak-r01@dest.test", "soak-r02@dest.test"]}]
    ev = Evidence()
    ev.copies = {("<m>", "soak-r01@dest.test"): 1, ("<m>", "soak-r02@dest.test"): 1}
    index = _events({"event": "received", "queue_id": "Q", "message_id": "<m>", "time": 10.0},
                    {"event": "delivered", "queue_id": "Q", "recipient": "soak-r01@dest.test", "time": 11.0})
    times = {("<m>", "soak-r01@dest.test"): 50.0, ("<m>", "soak-r02@dest.test"): 13.0}
    report = summarise(sent, ev, index, SoakReport(), times)
    assert report.latencies == [pytest.approx(1.0), pytest.approx(3.0)]
    assert report.latency_from_files == 1
    assert report.to_json()["latency"]["from_mailbox_file_times"] == 1
    assert "1 deliveries have no 'delivered' event" in report.format()
    assert report.ok


def test_a_lost_recipient_and_a_delivered_5xx_fail_the_soak() -> None:
    """Nothing delivered and nothing bounced is lost; a 5xx recipient delivered is a failure too."""
    sent = [{"message_id": "<m>", "time": 1.0, "recipients": ["soak-r01@dest.test", "soak-nouser-01@dest.test"]}]
    ev = Evidence()
    ev.copies = {("<m>", "soak-nouser-01@dest.test"): 1}
    report = summarise(sent, ev, _events(), SoakReport())
    assert report.lost == [("<m>", "soak-r01@dest.test")]
    assert report.delivered_unexpected == [("<m>", "soak-nouser-01@dest.test")]
    assert report.verdict() == "FAIL: 1 lost, 1 delivered although refused with 5xx"


def test_clean_report_says_ok_in_its_last_line() -> None:
    """All delivered or bounced as expected: OK, and the last line says so."""
    sent = [{"message_id": "<m>", "time": 1.0, "recipients": ["soak-r01@dest.test", "soak-nouser-01@dest.test"]}]
    ev = Evidence()
    ev.copies = {("<m>", "soak-r01@dest.test"): 1}
    ev.failed = {("<m>", "soak-nouser-01@dest.test"): 1}
    report = summarise(sent, ev, _events(), SoakReport(lab="chain3"))
    assert report.ok
    last = report.format().splitlines()[-1]
    assert last == report.verdict() and last.startswith("OK: 1 delivered exactly once")
    assert "1 bounced as expected" in last


def test_percentiles_are_nearest_rank() -> None:
    """p50/p99 of the report are nearest-rank percentiles of the sorted latencies."""
    values = [float(i) for i in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0], 50) == 1.0 and percentile([1.0, 2.0], 51) == 2.0
    assert percentile([1.0, 2.0, 3.0], 100) == 3.0 and percentile([1.0, 2.0, 3.0], 0) == 1.0
    assert percentile([], 50) is None
    report = SoakReport(latencies=values)
    assert report.to_json()["latency"] == {"p50": 50.0, "p99": 99.0, "max": 100.0, "count": 100,
                                         "from_mailbox_file_times": 0}


def test_unknown_fault_kind_is_a_one_line_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """--faults names only known kinds: otherwise exit status 2 and one line."""
    with pytest.raises(SystemExit) as e:
        _parse(["soak", "topologies/chain3.toml", "--faults", "kill,flood"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown fault kind(s) flood" in err[0]


# -- a real soak -------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_short_chain3_soak_under_kill_9(tmp_path: Path, capsys: pytest.CaptureFixture[str], workers: int) -> None:
    """
    25 s of mixed load on chain3 with kill -9 of hop2 every 6-9 s and defer
    windows of 6 s: everything acknowledged is delivered once or bounced as
    expected, the exit status and last line agree, and the JSON report is in
    the lab directory; the last hop's config is restored. Also with two
    workers per node: the soak then waits for each worker of the last hop
    to reload its overlay (the admin API's status), where it used to go on
    at the first worker's C{reload} event.
    """
    labdir = tmp_path / "chain3"
    topology = TOPOLOGIES / "chain3.toml"
    if workers > 1:
        text = re.sub(r"(?m)^\[defaults\.config\].*$", lambda m: f"{m[0]}\nnode = {{ workers = {workers} }}",
                      topology.read_text(), count=1)
        assert f"workers = {workers}" in text
        topology = tmp_path / "chain3.toml"
        topology.write_text(text)
    args = _parse(["soak", str(topology), "--dir", str(labdir), "--minutes", "0.42",
                   "--rate", "2", "--seed", "11", "--faults", "kill,power,disk,link", "--target", "hop2",
                   "--interval", "6", "9", "--down", "0.5", "1.5", "--defer-window", "6", "--drain", "90"])
    try:
        rc = args.func(args)
        out, err = capsys.readouterr()
        lines = out.strip().splitlines()
        assert "skipping link faults" in err
        report_path = Path(lines[-2].removeprefix("report: "))
        assert report_path.parent == labdir
        report = json.loads(report_path.read_text())
        assert report["verdict"] == lines[-1]
        # Duplicates between hops after a kill -9 fail the soak until the
        # hops hand over exactly once; nothing else may.
        assert (rc, lines[-1].split(":")[0]) == ((0, "OK") if not report["duplicated"] else (1, "FAIL")), out + err
        assert report["faults"]["kill"] >= 1
        assert report["memory"]["hop2"]["restarts"] == report["faults"]["kill"]
        assert all(m["peak_kib"] > 0 for m in report["memory"].values())
        assert report["acknowledged"] >= 30
        assert report["delivered_once"] + report["bounced_expected"] + report["duplicated"] == \
            report["acknowledged_recipients"]
        assert report["bounced_expected"] == report["recipient_kinds"].get("5xx", 0)
        assert (report["lost"], report["in_flight"], report["bounced_unexpected"]) == (0, 0, 0)
        assert report["latency"]["p50"] is not None
        hop3 = labdir / "hop3"
        assert not (hop3 / "node.toml.soak-orig").exists()
        assert "soak-r01" not in tomllib.loads((hop3 / "node.toml").read_text())["local"]["users"]
    finally:
        if (labdir / "lab.json").exists():
            control.down(Lab(labdir).load())


def _power_fs_missing() -> str | None:
    from relaynet.lab import chaos

    if not hasattr(chaos, "power_cut") or "power_fs" not in inspect.signature(control.up).parameters:
        return "this relaynet has no lab up --power-fs"
    from relaynet.lab.powerfs import unavailable_reason

    return unavailable_reason()


@pytest.mark.slow
@pytest.mark.skipif(_power_fs_missing() is not None, reason=f"no power faults here: {_power_fs_missing()}")
def test_short_power_fs_soak_counts_power_cuts_and_full_disks(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """
    In a lab started with --power-fs, the soak cuts the power of nodes and
    fills their disks (relaynet.lab.chaos), counts each kind, and still
    finds nothing lost; chaos.jsonl has one line per cut.
    """
    labdir = tmp_path / "chain3"
    args = _parse(["soak", str(TOPOLOGIES / "chain3.toml"), "--dir", str(labdir), "--power-fs", "--minutes",
                   "0.4", "--rate", "1", "--seed", "5", "--faults", "power,disk", "--target", "hop2",
                   "--target", "hop3", "--interval", "4", "6", "--down", "1", "2", "--defer-window", "8",
                   "--drain", "90"])
    try:
        rc = args.func(args)
        out, err = capsys.readouterr()
        lines = out.strip().splitlines()
        report = json.loads(Path(lines[-2].removeprefix("report: ")).read_text())
        assert report["faults"]["power"] + report["faults"]["disk"] >= 2, out + err
        assert report["faults"]["kill"] == report["faults"]["link"] == 0
        assert (report["lost"], report["in_flight"], report["bounced_unexpected"]) == (0, 0, 0), out + err
        assert (rc, lines[-1].split(":")[0]) == ((0, "OK") if not report["duplicated"] else (1, "FAIL"))
        cuts = [json.loads(line) for line in (labdir / "chaos.jsonl").read_text().splitlines()]
        assert sum(1 for c in cuts if c["action"] == "power cut") == report["faults"]["power"]
    finally:
        if (labdir / "lab.json").exists():
            control.down(Lab(labdir).load())
