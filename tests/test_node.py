"""
Tests for L{relaynet.node}: the node's service tree, built on a
C{MemoryReactorClock} (listeners and connections are recorded, not made),
with the spool on disk under a temporary directory.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.python.failure import Failure

import relaynet.node as node_module
from relaynet.node import RelayNode, ThreadPoolService
from relaynet.queue.spool import Recipient
from relaynet.runner import QueueRunner
from relaynet.smtp.netio import EndpointService
from relaynet.testing import EPOCH, PumpedReactor, make_config, make_queue_entry

TOML = """
[[listener]]
endpoint = "tcp:2525:interface=127.0.0.1"

[[route]]
domains = ["*"]
action = "relay"
next_hops = ["tcp:192.0.2.7:2526"]
"""


def node(tmp_path: Path) -> tuple[RelayNode, PumpedReactor]:
    config = make_config(tmp_path / "spool", toml=TOML)
    reactor = PumpedReactor()
    return RelayNode(config, reactor, threads=2), reactor


def stop(n: RelayNode, reactor: PumpedReactor) -> None:
    out: list[Any] = []
    d = n.stopService()
    assert isinstance(d, Deferred)
    d.addBoth(out.append)
    for _ in range(100):  # the grace period for sessions is timed by the reactor
        if out:
            break
        reactor.drain(n.pool, n.commit_pool)
        reactor.advance(0.5)
    assert out == [None], out


def test_children_in_start_order(tmp_path: Path) -> None:
    """
    The pools, the runner, the history, the admin site and the listeners
    are child services, in that order: listeners start last.
    """
    n, _ = node(tmp_path)
    n.privilegedStartService()
    kinds = [type(s).__name__ for s in n]
    assert kinds[:4] == ["ThreadPoolService", "ThreadPoolService", "TimerService", "QueueRunner"]
    assert kinds[-1] == "EndpointService" and isinstance(list(n)[-1], EndpointService)
    assert isinstance(n.runner, QueueRunner) and n.runner in list(n)


def test_recovery_after_listening(tmp_path: Path) -> None:
    """
    The node listens at once (the SMTP listener with a backlog of 256, the
    admin site on its UNIX socket) and recovers its queue in the background
    (batches read in a worker thread): a message left in the spool is
    recovered and attempted (a connection to its next hop is made); XTXN is
    offered at once, and the transfer window is complete only once the
    queue is recovered; a stop stops the pools after the runner.
    """
    config = make_config(tmp_path / "spool", toml=TOML)
    make_queue_entry(config.queue_dir, b"Subject: left over\r\n\r\nhi\r\n",
                     recipients=(Recipient("u@remote.test", "relay:*"),))
    n, reactor = node(tmp_path)
    n.runner.now = lambda: EPOCH + 10  # the message arrived at EPOCH: not expired
    n.privilegedStartService()
    assert reactor.tcpServers[0][0] == 2525 and reactor.tcpServers[0][2] == 256
    n.startService()
    try:
        assert [u[0] for u in reactor.unixServers] == [str(config.queue_dir.parent / "admin.sock")]
        assert n.intake.transfers() is n.window and not n.window.complete
        reactor.drain(n.pool, n.commit_pool)
        assert n.recovery.called and n.recovery.result == 1
        assert n.window.complete
        reactor.advance(0)  # a recovered message due is attempted from the next reactor turn on
        assert n.runner.counts()["active"] == 1
        assert [(c[0], c[1]) for c in reactor.tcpClients] == [("192.0.2.7", 2526)]
        assert len(n.ports) == 1
        pools = [s for s in n if isinstance(s, ThreadPoolService)]
        assert all(p.pool.started for p in pools)
        # The next hop does not answer: the attempt defers when the connection fails.
        _host, _port, factory, _timeout, _bind = reactor.tcpClients[0]
        factory.clientConnectionFailed(reactor.connectors[0], Failure(ConnectionRefusedError()))
        reactor.drain(n.pool, n.commit_pool)
        assert n.runner.counts()["deferred"] == 1
    finally:
        stop(n, reactor)
    assert not any(p.pool.started for p in pools)
    assert n.ports == []


def started_with_held_recovery(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[RelayNode, PumpedReactor, threading.Event]:
    """
    A node started on a spool of 5 queued messages, recovered 2 a batch,
    whose recovery's thread waits for the returned event before it reads
    the second batch; its first batch attempted.
    """
    monkeypatch.setattr(node_module, "RECOVERY_BATCH", 2)
    config = make_config(tmp_path / "spool", toml=TOML)
    for i in range(5):
        make_queue_entry(config.queue_dir, b"Subject: left over\r\n\r\nhi\r\n",
                         recipients=(Recipient(f"u{i}@remote.test", "relay:*"),))
    n, reactor = node(tmp_path)
    n.runner.now = lambda: EPOCH + 10
    real_recover = n.spool.recover
    go_on = threading.Event()

    def held_recover() -> Any:
        for i, entry in enumerate(real_recover()):
            if i == 2:  # the second batch's first read waits for the test
                assert go_on.wait(10), "the test never let the recovery go on"
            yield entry

    n.spool.recover = held_recover  # type: ignore[method-assign]
    n.privilegedStartService()
    n.startService()
    reactor.run_until(lambda: len(reactor.tcpClients) >= 2)
    return n, reactor, go_on


def test_recovered_mail_is_attempted_while_the_rest_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    The recovery hands the queue to the runner a batch at a time, and the
    due messages of a batch are attempted at once (a connection to their
    next hop), while the thread still reads the next batch: old mail moves
    from the first seconds of a restart, not once a big queue is all read.
    The recovery is then complete with every message.
    """
    n, reactor, go_on = started_with_held_recovery(tmp_path, monkeypatch)
    try:
        assert len(reactor.tcpClients) == 2, "the first batch was not attempted"
        assert not n.recovery.called and n.runner.counts()["active"] == 2
        go_on.set()
        reactor.drain(n.pool, n.commit_pool)
        reactor.advance(0)
        assert n.recovery.called and n.recovery.result == 5
        assert len(reactor.tcpClients) == 5 and n.runner.counts()["active"] == 5
    finally:
        go_on.set()
        stop(n, reactor)


def test_a_stop_during_recovery_takes_no_more_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    A stop while the queue is still being read: the batch being read is
    not taken over (its messages stay on disk for the next start), and the
    runner's pacing ends with the stop (no refill timer left).
    """
    n, reactor, go_on = started_with_held_recovery(tmp_path, monkeypatch)
    assert len(reactor.tcpClients) == 2
    out: list[Any] = []
    n.stopService().addBoth(out.append)
    go_on.set()
    for _ in range(100):
        if out:
            break
        reactor.drain(n.pool, n.commit_pool)
        reactor.advance(0.5)
    assert out == [None], out
    assert len(n.runner.core) == 2 and len(reactor.tcpClients) == 2  # the first batch only
    assert not [c for c in reactor.getDelayedCalls() if c.active() and "_refill" in repr(c)]


def test_a_listener_that_cannot_listen_fails_the_start(tmp_path: Path) -> None:
    """
    A listener whose endpoint refuses at once makes the start fail (the node
    does not run without it), and no thread pool is left running.
    """
    n, reactor = node(tmp_path)

    def refuse(*args: Any, **kw: Any) -> Any:
        raise OSError(98, "Address already in use")

    reactor.listenTCP = refuse  # type: ignore[method-assign]
    with pytest.raises(OSError, match="Address already in use"):
        n.privilegedStartService()
    assert not any(s.pool.started for s in n if isinstance(s, ThreadPoolService))


def test_event_log_is_fsynced_about_once_a_second(tmp_path: Path) -> None:
    """
    Lines written to events.jsonl are fsynced by the node in a worker
    thread about once a second (not per line; not never: a power loss would
    take the whole log), and only when there are new lines.
    """
    n, reactor = node(tmp_path)
    synced: list[int] = []
    real_sync = n.events.sync

    def counting_sync() -> None:
        synced.append(1)
        real_sync()

    n.events.sync = counting_sync  # type: ignore[method-assign]
    n.privilegedStartService()
    n.startService()
    try:
        reactor.drain(n.pool, n.commit_pool)
        before = len(synced)
        n.events.emit("test", queue_id="Q")
        n.events.emit("test", queue_id="R")
        reactor.advance(1.0)
        reactor.drain(n.pool, n.commit_pool)
        assert len(synced) == before + 1 and n.events.unsynced == 0
        reactor.advance(1.0)
        reactor.drain(n.pool, n.commit_pool)
        assert len(synced) == before + 1  # nothing new: no fsync
    finally:
        stop(n, reactor)
