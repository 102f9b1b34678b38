"""
The HTTP injection API (L{relaynet.intake.http}): every error path over a
real socket to a real node process (C{twistd relaynet} with an
C{[http_api]} listener), messages queued and delivered, personalised bulk
sends, and the durability contract: a message answered C{201} survives a
C{kill -9} sent right after the answer.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import uuid
from pathlib import Path
from typing import Any

import pytest

from harness.nodeproc import HOST, NodeProcess, free_port, parse_message, wait_for
from relaynet.config import ConfigError, parse_config
from relaynet.delivery.routing import RoutingTable
from relaynet.intake.http import (
    APIError,
    APIToken,
    add_token,
    prepare,
    read_tokens_file,
    remove_token,
)

LIMIT = 65536

EXTRA = """
[http_api]
endpoint = "tcp:{http}:interface=127.0.0.1"
tokens_file = "tokens"
max_request_size = %d
max_recipients = 5
""".replace("%d", str(LIMIT))


class Node:
    """A node process with its HTTP port and two tokens: C{good} (example.org) and C{other} (other.test)."""

    def __init__(self, tmp: Path) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        self.http_port = free_port()
        self.good = add_token(tmp / "tokens", "app", ["example.org", "*.example.net"])
        self.other = add_token(tmp / "tokens", "other", ["other.test"])
        self.proc = NodeProcess(tmp, extra_toml=EXTRA.replace("{http}", str(self.http_port)), name="httpapi")

    def start(self) -> Node:
        self.proc.start()
        wait_for(lambda: _connects(self.http_port), 10, "the HTTP API listener")
        return self

    def post(self, body: Any, token: str | None = None, content_type: str = "application/json",
             raw: bytes | None = None) -> tuple[int, dict[str, Any], dict[str, str]]:
        """POST /api/v1/messages; the status, the JSON body and the headers."""
        conn = http.client.HTTPConnection(HOST, self.http_port, timeout=20)
        headers = {"Content-Type": content_type}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        data = raw if raw is not None else json.dumps(body).encode()
        try:
            conn.request("POST", "/api/v1/messages", body=data, headers=headers)
            resp = conn.getresponse()
            text = resp.read()
            return resp.status, _json(text), {k.lower(): v for k, v in resp.getheaders()}
        finally:
            conn.close()


def _json(text: bytes) -> dict[str, Any]:
    assert b"Traceback" not in text and b"<html" not in text.lower(), text
    value = json.loads(text)
    assert isinstance(value, dict)
    return value


def _connects(port: int) -> bool:
    try:
        socket.create_connection((HOST, port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Any:
    n = Node(tmp_path_factory.mktemp("httpapi")).start()
    with n.proc:
        yield n


def message(**over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "sender": "app@example.org",
        "recipients": ["alice@localhost"],
        "content": {"from": "Shop <app@example.org>", "subject": "Receipt", "text": "Thanks!"},
    }
    body.update(over)
    return body


def delivered(node: Node, user: str, marker: str) -> list[bytes]:
    """The Maildir files of C{user} that contain C{marker}."""
    return [p.read_bytes() for p in node.proc.maildir_new(user) if marker.encode() in p.read_bytes()]


# -- error paths over real sockets ------------------------------------------


def test_bad_json(node: Node) -> None:
    """A body that is not JSON is a 400 JSON error, not a traceback."""
    status, body, headers = node.post(None, node.good, raw=b'{"sender": "app@example.org", "recipients": [')
    assert status == 400
    assert headers["content-type"] == "application/json"
    assert "not JSON" in body["error"] and body["field"] is None


def test_json_not_an_object(node: Node) -> None:
    """JSON that is not an object is a 400."""
    status, body, _ = node.post(["app@example.org"], node.good)
    assert status == 400 and "object" in body["error"]


@pytest.mark.parametrize("missing", ["sender", "recipients"])
def test_missing_field(node: Node, missing: str) -> None:
    """A missing required field is a 422 naming it."""
    body = message()
    del body[missing]
    status, reply, _ = node.post(body, node.good)
    assert status == 422
    assert reply == {"error": "is required", "field": missing}


def test_invalid_fields_are_named(node: Node) -> None:
    """A bad nested field is named by its JSON path."""
    status, reply, _ = node.post(message(recipients=["alice@localhost", {"address": "not an address"}]), node.good)
    assert (status, reply["field"]) == (422, "recipients[1].address")
    status, reply, _ = node.post(message(content={"subject": "x", "text": "y"}), node.good)
    assert (status, reply["field"]) == (422, "content.from")
    body = message()
    body["message"] = "Subject: both\r\n\r\nx\r\n"
    status, reply, _ = node.post(body, node.good)
    assert status == 422 and reply["field"] in ("message", "content")
    status, reply, _ = node.post(message(recipients=[f"u{i}@localhost" for i in range(6)]), node.good)
    assert (status, reply["field"]) == (422, "recipients")


def test_no_token(node: Node) -> None:
    """No Authorization header: 401 with a Bearer challenge."""
    status, reply, headers = node.post(message())
    assert status == 401 and reply["field"] == "Authorization"
    assert headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize("which", ["wrong secret", "unknown name", "garbage"])
def test_wrong_token(node: Node, which: str) -> None:
    """A wrong secret, an unknown token name or garbage: 401, nothing queued."""
    name, _, secret = node.good.partition(".")
    token = {"wrong secret": f"{name}.{secret[:-2]}xx", "unknown name": f"nobody.{secret}",
             "garbage": "x"}[which]
    before = len(node.proc.queue_files("new"))
    status, reply, _ = node.post(message(), token)
    assert status == 401 and reply["error"] == "unknown or wrong token"
    assert len(node.proc.queue_files("new")) <= before


def test_token_not_allowed_for_sender_domain(node: Node) -> None:
    """A token may use only its sender domains: 403 naming the sender."""
    status, reply, _ = node.post(message(), node.other)
    assert status == 403 and reply["field"] == "sender"
    assert "other" in reply["error"] and "example.org" in reply["error"]
    status, reply, _ = node.post(message(sender="app@evil.example"), node.good)
    assert status == 403


def test_too_large_content_length(node: Node) -> None:
    """A Content-Length above max_request_size is answered 413 at once (the body need not be sent)."""
    with socket.create_connection((HOST, node.http_port), timeout=10) as s:
        s.sendall(
            b"POST /api/v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + node.good.encode() + b"\r\n"
            b"Content-Length: %d\r\n\r\n" % (LIMIT + 1)
        )
        f = s.makefile("rb")
        status = f.readline()
        assert status.startswith(b"HTTP/1.1 413"), status
        headers = {}
        while (line := f.readline()) not in (b"\r\n", b""):
            k, _, v = line.decode().partition(":")
            headers[k.strip().lower()] = v.strip()
        body = _json(f.read(int(headers["content-length"])))
        assert "larger than 65536" in body["error"]


def test_too_large_body_sent(node: Node) -> None:
    """A client that sends its whole oversized body first still reads the 413."""
    text = "x" * LIMIT
    status, reply, _ = node.post(message(content={"from": "a@example.org", "text": text}), node.good)
    assert status == 413 and "larger than" in reply["error"]


def test_too_large_chunked(node: Node) -> None:
    """A chunked body that grows past the limit: 413."""
    conn = http.client.HTTPConnection(HOST, node.http_port, timeout=20)
    chunks = (b"x" * 8192 for _ in range(LIMIT // 8192 + 2))
    conn.request("POST", "/api/v1/messages", body=chunks, encode_chunked=True,
                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {node.good}"})
    resp = conn.getresponse()
    assert resp.status == 413
    assert "larger than" in _json(resp.read())["error"]
    conn.close()


def test_wrong_content_type_and_method(node: Node) -> None:
    """Not JSON content type: 415; GET on messages: 405; other paths: JSON 404."""
    status, reply, _ = node.post(message(), node.good, content_type="text/plain")
    assert (status, reply["field"]) == (415, "Content-Type")
    conn = http.client.HTTPConnection(HOST, node.http_port, timeout=10)
    conn.request("GET", "/api/v1/messages")
    resp = conn.getresponse()
    assert resp.status == 405 and _json(resp.read())["error"]
    conn.request("GET", "/nothing/here")
    resp = conn.getresponse()
    assert resp.status == 404 and _json(resp.read())["error"]
    conn.close()


def test_refused_recipient(node: Node) -> None:
    """A recipient the routing table refuses (no route): 422 naming it, with the SMTP reply."""
    status, reply, _ = node.post(message(recipients=["alice@localhost", "bob@unrouted.test"]), node.good)
    assert (status, reply["field"]) == (422, "recipients[1]")
    assert "5.1.2" in reply["error"] or "550" in reply["error"]


def test_openapi(node: Node) -> None:
    """/api/v1/openapi.json describes the endpoint and its answers."""
    conn = http.client.HTTPConnection(HOST, node.http_port, timeout=10)
    conn.request("GET", "/api/v1/openapi.json")
    resp = conn.getresponse()
    doc = _json(resp.read())
    conn.close()
    assert resp.status == 200 and doc["openapi"].startswith("3.")
    post = doc["paths"]["/api/v1/messages"]["post"]
    assert {"201", "400", "401", "403", "413", "422"} <= set(post["responses"])


# -- messages queued --------------------------------------------------------


def test_structured_message_delivered(node: Node) -> None:
    """Structured parts become one MIME message for all recipients; the event names the token, not its secret."""
    marker = uuid.uuid4().hex
    body = message(
        recipients=["alice@localhost", "carol@localhost"],
        content={"from": "Shop <app@example.org>", "subject": f"Receipt {marker}", "text": "Grüße",
                 "html": "<p>Hello</p>", "headers": {"X-Campaign": "c1"},
                 "attachments": [{"filename": "r.bin", "content_type": "application/octet-stream",
                                  "data": base64.b64encode(b"\x00\x01binary").decode()}]},
    )
    status, reply, _ = node.post(body, node.good)
    assert status == 201, reply
    (queued,) = reply["messages"]
    assert queued["recipients"] == ["alice@localhost", "carol@localhost"]
    for user in ("alice", "carol"):
        (data,) = wait_for(lambda u=user: delivered(node, u, marker), 10, f"delivery to {user}")
        msg = parse_message(data)
        assert msg["X-Campaign"] == "c1" and "with HTTP id " + queued["queue_id"] in " ".join(msg.get_all("Received"))
        parts = {p.get_content_type(): p for p in msg.walk()}
        assert parts["text/plain"].get_payload(decode=True).decode("utf-8").strip() == "Grüße"
        assert parts["application/octet-stream"].get_payload(decode=True) == b"\x00\x01binary"
    events = [e for e in node.proc.events() if e.get("queue_id") == queued["queue_id"] and e["event"] == "received"]
    assert len(events) == 1
    assert events[0]["protocol"] == "http" and events[0]["token"] == "app"
    secret = node.good.partition(".")[2]
    assert secret not in node.proc.events_path.read_text() and secret not in node.proc.log_text()


def test_raw_message_delivered(node: Node) -> None:
    """A complete RFC 5322 message is queued as given (CRLF lines), a Message-ID added when missing."""
    marker = uuid.uuid4().hex
    raw = f"From: app@example.org\nTo: alice@localhost\nSubject: raw {marker}\n\nline one\nline two\n"
    body = {"sender": "app@example.org", "recipients": ["alice@localhost"], "message": raw}
    status, reply, _ = node.post(body, node.good)
    assert status == 201, reply
    (data,) = wait_for(lambda: delivered(node, "alice", marker), 10, "delivery")
    assert data.replace(b"\r\n", b"\n").endswith(raw.split("\n\n", 1)[1].encode())
    assert parse_message(data)["Message-ID"]


def test_personalised_bulk(node: Node) -> None:
    """Recipients with substitutions get a message each, filled from their values over the shared ones."""
    marker = uuid.uuid4().hex
    body = message(
        recipients=[{"address": "dave@localhost", "substitutions": {"name": "Dave"}},
                    {"address": "erin@localhost", "substitutions": {"name": "Erin", "shop": "Erin's"}}],
        content={"from": "app@example.org", "subject": "{{shop}} " + marker, "text": "Hi {{name}} <{{recipient}}>"},
        substitutions={"shop": "Shop"},
    )
    status, reply, _ = node.post(body, node.good)
    assert status == 201, reply
    assert [m["recipients"] for m in reply["messages"]] == [["dave@localhost"], ["erin@localhost"]]
    assert len(set(reply["queue_ids"])) == 2
    for user, name, shop in (("dave", "Dave", "Shop"), ("erin", "Erin", "Erin's")):
        (data,) = wait_for(lambda u=user: delivered(node, u, marker), 10, f"delivery to {user}")
        msg = parse_message(data)
        assert msg["Subject"] == f"{shop} {marker}" and msg["To"] == f"{user}@localhost"
        assert f"Hi {name} <{user}@localhost>" in msg.get_payload()


def test_missing_substitution(node: Node) -> None:
    """A placeholder without a value is a 422 naming where the values come from; nothing is queued."""
    body = message(recipients=[{"address": "dave@localhost", "substitutions": {"name": "D"}}],
                   content={"from": "app@example.org", "text": "{{name}} {{missing}}"})
    status, reply, _ = node.post(body, node.good)
    assert (status, reply["field"]) == (422, "recipients[0].substitutions")
    assert "missing" in reply["error"]


# -- durability ---------------------------------------------------------------


def test_201_survives_kill9(tmp_path: Path) -> None:
    """
    The node is killed (SIGKILL) right after each 201: after a restart
    every message answered 201 is delivered.
    """
    n = Node(tmp_path).start()
    with n.proc:
        markers = []
        for i in range(5):
            marker = uuid.uuid4().hex
            status, reply, _ = n.post(message(recipients=["zed@localhost", "yan@localhost"],
                                              content={"from": "app@example.org", "subject": marker, "text": "x"}),
                                      n.good)
            assert status == 201, reply
            n.proc.kill9()
            markers.append(marker)
            n.proc.start()
        for marker in markers:
            for user in ("zed", "yan"):
                wait_for(lambda u=user, m=marker: delivered(n, u, m), 15, f"{marker} delivered to {user}")


# -- pure parts -------------------------------------------------------------


def test_prepare_header_injection() -> None:
    """A substitution value cannot add header fields (422), in structured content or a raw message."""
    config = parse_config({})
    token = APIToken("t", "", ("*",))
    body = {"sender": "a@example.org",
            "recipients": [{"address": "u@localhost", "substitutions": {"s": "x\r\nBcc: evil@example.com"}}],
            "content": {"from": "a@example.org", "subject": "{{s}}", "text": "t"}}
    with pytest.raises(APIError) as e:
        prepare(json.dumps(body).encode(), token, config, RoutingTable(config), 10)
    assert e.value.status == 422 and e.value.field == "content.subject"
    body = {"sender": "a@example.org", "recipients": ["u@localhost"],
            "content": {"from": "a@example.org", "text": "t", "headers": {"X-A": "v\r\nBcc: evil@x"}}}
    with pytest.raises(APIError) as e:
        prepare(json.dumps(body).encode(), token, config, RoutingTable(config), 10)
    assert e.value.field == "content.headers.X-A"


def test_tokens_file(tmp_path: Path) -> None:
    """add_token stores a hash (never the secret), replaces by name; remove_token removes."""
    path = tmp_path / "tokens"
    first = add_token(path, "a", ["example.org"])
    add_token(path, "b", ["*"])
    again = add_token(path, "a", ["*.example.net"])
    text = path.read_text()
    assert first.partition(".")[2] not in text and again.partition(".")[2] not in text
    assert path.stat().st_mode & 0o777 == 0o600
    tokens = read_tokens_file(path)
    assert set(tokens) == {"a", "b"} and tokens["a"].domains == ("*.example.net",)
    assert tokens["a"].allows("x@m.example.net") and not tokens["a"].allows("x@example.org")
    assert tokens["b"].allows("x@anything.test")
    assert remove_token(path, "a") and not remove_token(path, "a")
    with pytest.raises(ValueError):
        add_token(path, "bad name", ["example.org"])


def test_config_needs_tokens_file() -> None:
    """[http_api] endpoint without tokens_file is refused, naming file and key."""
    with pytest.raises(ConfigError) as e:
        parse_config({"http_api": {"endpoint": "tcp:8025"}}, source="node.toml")
    assert "node.toml" in str(e.value) and "http_api.tokens_file" in str(e.value)
    with pytest.raises(ConfigError) as e:
        parse_config({"http_api": {"endpoint": "nonsense:", "tokens_file": "t"}}, source="node.toml")
    assert "http_api.endpoint" in str(e.value)
    with pytest.raises(ConfigError):
        parse_config({"http_api": {"max_request_size": 0}})


def test_cli_api_token(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """relaynet api-token add prints the token once (the file has its hash); list; remove."""
    from relaynet.cli import main

    path = tmp_path / "tokens"
    assert main(["api-token", "add", str(path), "shop", "--domain", "example.org", "--domain", "*.example.net"]) == 0
    token = capsys.readouterr().out.strip()
    assert token.startswith("shop.") and token.partition(".")[2] not in path.read_text()
    assert main(["api-token", "list", str(path)]) == 0
    assert capsys.readouterr().out == "shop\texample.org,*.example.net\n"
    assert main(["api-token", "add", str(path), "bad name", "--domain", "x.org"]) == 1
    assert main(["api-token", "remove", str(path), "shop"]) == 0
    assert main(["api-token", "remove", str(path), "shop"]) == 1
    assert read_tokens_file(path) == {}


def test_prepare_suppressed_recipients_left_out() -> None:
    """Suppressed recipients are left out and listed; when all are, no message is built."""
    from relaynet.queue.suppression import Suppression

    config = parse_config({})
    token = APIToken("t", "", ("*",))
    entry = Suppression("gone@localhost", kind="invalid-recipient", source="bounce", time=0.0,
                        reason="550 no such user")

    def suppressed(address: str) -> Any:
        return entry if address == "gone@localhost" else None

    body = {"sender": "a@example.org", "recipients": ["u@localhost", {"address": "gone@localhost"}],
            "content": {"from": "a@example.org", "text": "t"}}
    inj = prepare(json.dumps(body).encode(), token, config, RoutingTable(config), 10, suppressed)
    assert [m.recipients[0].address for m in inj.messages] == ["u@localhost"]
    assert [(r.field, r.address) for r in inj.suppressed] == [("recipients[1].address", "gone@localhost")]
    assert "5.1.1" in inj.suppressed[0].error
    body["recipients"] = ["gone@localhost"]
    inj = prepare(json.dumps(body).encode(), token, config, RoutingTable(config), 10, suppressed)
    assert inj.messages == () and len(inj.suppressed) == 1


def test_prepare_deeply_nested_json() -> None:
    """JSON nested beyond the parser's recursion limit is a 400, not an internal error."""
    config = parse_config({})
    with pytest.raises(APIError) as e:
        prepare(b"[" * 100000 + b"]" * 100000, APIToken("t", "", ("*",)), config, RoutingTable(config), 10)
    assert e.value.status == 400


def test_token_file_changes_apply(node: Node) -> None:
    """A token added to the file of a running node works at once; once removed it is refused (the cache is dropped)."""
    path = node.proc.dir / "tokens"
    token = add_token(path, "temp", ["example.org"])
    status, reply, _ = node.post(message(), token)
    assert status == 201, reply
    assert remove_token(path, "temp")
    status, reply, _ = node.post(message(), token)
    assert status == 401


def test_config_describe_round_trip(tmp_path: Path) -> None:
    """relaynet check-config renders [http_api]; loading the rendering gives the same settings."""
    import tomllib

    from relaynet.config import describe

    config = parse_config({"http_api": {"endpoint": "tcp:8025:interface=0.0.0.0", "tokens_file": "tok",
                                        "max_request_size": 4096, "max_recipients": 7}},
                          source="node.toml", base=tmp_path)
    assert config.http_api.tokens_file == tmp_path / "tok"
    again = parse_config(tomllib.loads(describe(config)), source="described.toml")
    assert again.http_api == config.http_api
    assert parse_config({}).http_api.endpoint is None
    assert "[http_api]" not in describe(parse_config({}))
