"""
Delivery webhooks (L{relaynet.admin.webhooks}): the configuration, the
durable outbox, and delivery to a real HTTP receiver on loopback that is
down for a while and comes back: every event arrives once, in order, with
a signature that verifies.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer, reactor
from twisted.internet.defer import maybeDeferred
from twisted.trial.unittest import TestCase
from twisted.web import resource, server

from relaynet.admin.webhooks import Outbox, Webhook, WebhookSettings, parse_webhooks, signature
from relaynet.config import ConfigError

SECRET = b"0123456789abcdef0123"


def now(work: Any) -> Any:
    """A worker thread that runs the work at once (tests)."""
    return maybeDeferred(work)


def test_parse_webhooks(tmp_path: Path) -> None:
    """name, url, secret_file (0600, 16+ characters), events; errors name the key."""
    key = tmp_path / "hook.key"
    key.write_text(SECRET.decode() + "\n")
    key.chmod(0o600)
    (w,) = parse_webhooks("n.toml", [{"name": "app", "url": "https://hooks.example/x", "secret_file": "hook.key",
                                      "events": ["sent", "bounced"], "batch_size": 10}], tmp_path)
    assert (w.name, w.secret, w.events, w.batch_size) == ("app", SECRET, frozenset({"sent", "bounced"}), 10)
    open_key = tmp_path / "open.key"
    open_key.write_text(SECRET.decode())
    open_key.chmod(0o644)
    for bad, field in [
        ({"url": "https://x/"}, "name"),
        ({"name": "a", "url": "ftp://x/"}, "url"),
        ({"name": "a", "url": "https://x/"}, "secret_file"),
        ({"name": "a", "url": "https://x/", "secret_file": "open.key"}, "secret_file"),
        ({"name": "a", "url": "https://x/", "secret_file": "hook.key", "events": ["nope"]}, "events"),
    ]:
        with pytest.raises(ConfigError) as e:
            parse_webhooks("n.toml", [bad], tmp_path)
        assert e.value.key == f"webhook[0].{field}", e.value


def _outbox_run(d: Any) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the thread runner runs at once"
    if isinstance(out[0], Exception):
        raise out[0]
    return out[0]


def test_outbox_survives_a_restart_and_compacts(tmp_path: Path) -> None:
    """
    Events flushed to the file are read back in batches from the
    acknowledged offset, after a restart too (ids go on increasing); a
    drained file over the compaction size starts again.
    """
    box = Outbox(tmp_path, "app", now)
    _outbox_run(box.load())
    for i in range(5):
        box.add({"event": "sent", "queue_id": f"Q{i}"}, "n-0")
    _outbox_run(box.flush())
    lines, offset = _outbox_run(box.batch(2))
    assert [json.loads(x)["id"] for x in lines] == ["n-0-1", "n-0-2"]
    _outbox_run(box.acknowledge(offset))

    again = Outbox(tmp_path, "app", now)
    _outbox_run(again.load())
    lines, offset = _outbox_run(again.batch(10))
    assert [json.loads(x)["queue_id"] for x in lines] == ["Q2", "Q3", "Q4"]
    again.add({"event": "sent", "queue_id": "Q5"}, "n-0")
    _outbox_run(again.flush())
    lines, _ = _outbox_run(again.batch(10))
    assert json.loads(lines[-1])["id"] == "n-0-6"

    import relaynet.admin.webhooks as hooks

    old = hooks.COMPACT_OVER
    hooks.COMPACT_OVER = 10
    try:
        lines, offset = _outbox_run(again.batch(10))
        _outbox_run(again.acknowledge(offset))
    finally:
        hooks.COMPACT_OVER = old
    assert os.path.getsize(tmp_path / "app.jsonl") == 0 and again.backlog == 0


class Receiver(resource.Resource):
    """An HTTP receiver that answers 503 to its first C{down} requests, then 200, keeping the bodies."""

    isLeaf = True

    def __init__(self, down: int) -> None:
        resource.Resource.__init__(self)
        self.down = down
        self.bodies: list[tuple[bytes, bytes]] = []
        self.requests = 0

    def render_POST(self, request: Any) -> bytes:  # noqa: N802 - Twisted's name
        self.requests += 1
        body = request.content.read()
        if self.requests <= self.down:
            request.setResponseCode(503)
            return b"down"
        self.bodies.append((body, request.getHeader(b"x-relaynet-signature") or b""))
        return b"ok"


class DeliveryTests(TestCase):
    """Delivery over real HTTP on loopback."""

    @defer.inlineCallbacks
    def test_receiver_down_then_back_gets_every_event_once_in_order(self) -> Any:
        """
        While the receiver answers 503 the events wait (retried with
        backoff); once it answers 200 it gets all of them, each once, in
        the order they happened, in signed batches.
        """
        receiver = Receiver(down=2)
        port = reactor.listenTCP(0, server.Site(receiver), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        settings = WebhookSettings(
            name="app", url=f"http://127.0.0.1:{port.getHost().port}/hook", secret=SECRET,
            batch_size=4, flush_interval=0.05, timeout=5.0,
        )
        tmp = Path(tempfile.mkdtemp(prefix="relaynet-webhooks-"))
        self.addCleanup(shutil.rmtree, tmp, True)
        hook = Webhook(settings, tmp, reactor, now, "node-0")
        hook.startService()
        self.addCleanup(hook.stopService)
        events = []
        for i in range(10):
            for name in ("received", "sent"):
                record = {"event": name, "queue_id": f"Q{i}", "time": i}
                events.append((name, f"Q{i}"))
                hook.observe(record)
        hook.observe({"event": "hop_up", "relay": "x"})  # not a delivery event: not sent
        deadline = reactor.seconds() + 30
        while sum(len(json.loads(b)["events"]) for b, _ in receiver.bodies) < len(events):
            self.assertLess(reactor.seconds(), deadline, "events did not all arrive")
            d: defer.Deferred[None] = defer.Deferred()
            reactor.callLater(0.05, d.callback, None)
            yield d
        got = [e for body, _ in receiver.bodies for e in json.loads(body)["events"]]
        self.assertEqual([(e["event"], e["queue_id"]) for e in got], events)
        self.assertEqual(len({e["id"] for e in got}), len(got))
        for body, sig in receiver.bodies:
            expected = "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()
            self.assertEqual(sig.decode(), expected)
            self.assertEqual(signature(SECRET, body), expected)
        self.assertGreaterEqual(hook.failures, 2)
        # The receiver has the last batch before its 200 reaches the hook,
        # which then records the acknowledgement: wait for it, bounded.
        while hook.outbox.backlog and reactor.seconds() < deadline:
            d = defer.Deferred()
            reactor.callLater(0.05, d.callback, None)
            yield d
        self.assertEqual(hook.outbox.backlog, 0)


@pytest.mark.slow
def test_node_webhook_survives_kill_9_and_a_dead_receiver(tmp_path: Path) -> None:
    """
    A real node with a [[webhook]]: the receiver answers 503 while five
    messages go through; the node is killed with SIGKILL once their events
    are in its outbox, restarted, and two more messages go; then the
    receiver answers 200 and gets every event of the seven messages (two
    each: received, delivered), each id once, each message's in order.
    """
    import http.server
    import smtplib
    import threading

    from harness.nodeproc import NodeProcess, wait_for

    state = {"up": False, "events": [], "bad_signatures": 0}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if not state["up"]:
                self.send_response(503)
                self.end_headers()
                return
            if self.headers["X-Relaynet-Signature"] != signature(SECRET, body):
                state["bad_signatures"] += 1
            state["events"].extend(json.loads(body)["events"])
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    key = tmp_path / "hook.key"
    key.write_text(SECRET.decode())
    key.chmod(0o600)
    node = NodeProcess(tmp_path / "node", extra_toml=f"""
[[webhook]]
name = "app"
url = "http://127.0.0.1:{httpd.server_address[1]}/events"
secret_file = "{key}"
events = ["received", "delivered"]
flush_interval = 0.2
""", name="hooks")

    def send(n: int, start: int) -> None:
        for i in range(start, start + n):
            with smtplib.SMTP("127.0.0.1", node.port, timeout=30) as s:
                s.sendmail("a@x.test", [f"u{i}@localhost"], f"Message-ID: <m{i}@x.test>\r\n\r\n{i}\r\n".encode())

    outbox = node.spool / "webhooks" / "app.jsonl"
    try:
        with node:
            send(5, 0)
            wait_for(lambda: outbox.exists() and len(outbox.read_bytes().splitlines()) >= 10, 30,
                     "ten events in the outbox")
            node.kill9()
            node.start()
            send(2, 5)
            state["up"] = True
            wait_for(lambda: len(state["events"]) >= 14, 60, "the 14 events at the receiver")
    finally:
        httpd.shutdown()
    events = state["events"]
    assert len(events) == 14 and len({e["id"] for e in events}) == 14, events
    assert state["bad_signatures"] == 0
    by_message: dict[str, list[str]] = {}
    for e in events:
        by_message.setdefault(e["queue_id"], []).append(e["event"])
    assert len(by_message) == 7 and all(v == ["received", "delivered"] for v in by_message.values()), by_message
