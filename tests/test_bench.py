"""
Smoke test of the benchmark suite: C{relaynet bench} (bench/run.py) with the
smallest sizes, against real Postfix instances and relaynet nodes on
loopback.  It checks that every scenario runs on both systems and that the
table, the JSON and (with matplotlib installed) the PNG are produced; the
figures themselves are not judged.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from relaynet.peers import postfix_unavailable_reason

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent


def test_bench_quick(tmp_path: Path) -> None:
    reason = postfix_unavailable_reason()
    if reason:
        pytest.skip(reason)
    chart = importlib.util.find_spec("matplotlib") is not None
    out_json = tmp_path / "bench.json"
    out_png = tmp_path / "bench.png"
    # "--": the relaynet command passes everything after "bench" on to bench/run.py.
    cmd = [
        sys.executable, "-m", "relaynet.cli", "bench", "--",
        "--quick", "--rounds", "1", "--messages", "30", "--sizes", "5120", "--sessions", "3",
        "--latency-messages", "10", "--warmup", "5", "--max-minutes", "3",
        "--json", str(out_json), "--png", str(out_png),
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    for needle in ("relaynet/postfix", "accept rate", "delivered rate", "p99", "peak PSS", "CPU per 1000"):
        assert needle in proc.stdout, (needle, proc.stdout)

    result = json.loads(out_json.read_text())
    runs = result["runs"]
    # 1 hop: accept + latency; 3 hops: chain3 + latency; 1 round; 2 systems.
    assert len(runs) == 8
    assert {r["system"] for r in runs} == {"relaynet", "postfix"}
    assert not [r for r in runs if r.get("error") or r.get("skipped")]
    for r in runs:
        assert r["cpu_seconds"] is not None and r["cpu_seconds"] >= 0
        assert r["peak_pss_kb"] > 0
        if r["scenario"] == "latency":
            assert r["latency"]["n"] == 10 and r["latency"]["p50"] > 0
        else:
            assert r["delivered_rate"] > 0 and r["accept_rate"] > 0
    ratios = {(row["section"], row["metric"], row["hops"]): row["ratio"] for row in result["summary"]}
    for key in [("accept", "accept rate", 1), ("accept", "delivered rate", 1),
                ("chain3", "delivered rate", 3), ("latency", "p50", 1), ("latency", "p99", 3),
                ("memory", "peak PSS", 1)]:
        assert ratios.get(key), (key, ratios)

    if chart:
        assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert not out_png.exists()
