"""
Smoke test of the benchmark suite: C{relaynet bench} (bench/run.py) with the
smallest sizes, against real Postfix instances and relaynet nodes on
loopback.  It checks that every scenario runs on both systems and that the
table, the JSON and (with matplotlib installed) the PNG are produced; the
figures themselves are not judged.

Also: how C{relaynet bench} finds the bench (the C{bench} package of the source
checkout, run as C{python -m bench.run}), and what it says when there is none
(an installed wheel ships neither C{bench/} nor C{harness/}).
"""

from __future__ import annotations

import argparse
import configparser
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness.peers import postfix_unavailable_reason
from relaynet import cli

REPO = Path(__file__).resolve().parent.parent


def test_bench_without_checkout_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """
    C{relaynet bench} from a package with no checkout around it (no
    C{bench/}, no C{harness/} beside it) prints one line to stderr naming the
    way out, runs nothing and returns 2.
    """
    installed = tmp_path / "site-packages" / "relaynet"
    installed.mkdir(parents=True)
    monkeypatch.setattr(cli, "__file__", str(installed / "cli.py"))
    monkeypatch.setattr(sys, "argv", ["relaynet", "bench", "--estimate"])
    # --estimate: were the bench found anyway, it would print a figure and return 0.
    assert cli._bench(argparse.Namespace(args=["--estimate"])) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.splitlines()) == 1, err
    assert "source checkout" in err and "make bench" in err, err
    assert sys.argv == ["relaynet", "bench", "--estimate"]


def test_installed_package_bench_exits_2(tmp_path: Path) -> None:
    """
    The same through the console entry point, with the package imported from
    a directory laid out like site-packages (a copy of C{relaynet/} alone):
    exit status 2, one line on stderr, no traceback.
    """
    site = tmp_path / "site-packages"
    shutil.copytree(REPO / "relaynet", site / "relaynet",
                    ignore=shutil.ignore_patterns("__pycache__"))
    env = dict(os.environ, PYTHONPATH=str(site))
    code = (
        "import sys, relaynet.cli as c; "
        "assert c.__file__.startswith(sys.argv[1]), c.__file__; "
        "sys.exit(c.main(['bench', '--estimate']))"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(site)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "source checkout" in proc.stderr and "make bench" in proc.stderr


def test_bench_from_checkout(tmp_path: Path) -> None:
    """
    From the checkout, C{relaynet bench} runs C{bench.run} whatever the current
    directory (here: elsewhere), and C{python -m bench.run} works from the root.
    """
    proc = subprocess.run([sys.executable, "-m", "relaynet.cli", "bench", "--estimate"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout) > 0
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--help"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--quick" in proc.stdout


def test_harness_not_shipped() -> None:
    """
    The wheel's packages (setup.cfg) name neither the harness nor the bench,
    and no module of the package imports them.
    """
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    packages = setup["options"]["packages"].split()
    assert "relaynet" in packages
    assert not [p for p in packages if p.split(".")[0] in ("harness", "bench", "tests")], packages
    importers = [
        str(f.relative_to(REPO)) for f in sorted((REPO / "relaynet").rglob("*.py"))
        if any(line.lstrip().startswith(("import harness", "from harness", "import bench", "from bench"))
               for line in f.read_text("utf-8").splitlines())
    ]
    assert importers == []


@pytest.mark.slow
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
