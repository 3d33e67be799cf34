"""The CLI's HTTP client (orchestrator.cli.wire) and its answers' meaning (orchestrator.cli.remote),
against a server on 127.0.0.1 that sends given bytes and keeps what it was sent."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from orchestrator.cli import wire
from orchestrator.cli.remote import ApiUnavailable, Remote, remote
from orchestrator.errors import BadInput
from tests.harness import free_port


@contextmanager
def server(*answers: bytes, hold: float = 0.0, accept_for: float = 5.0) -> Iterator[tuple[str, list[bytes]]]:
    """http://127.0.0.1:PORT answering each connection with the next of ``answers`` (then
    closing it, after ``hold`` seconds of silence); the requests it read, whole (b"" for a
    connection that sent nothing whole). It waits ``accept_for`` seconds for each connection."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(accept_for)
    received: list[bytes] = []

    def serve() -> None:
        for answer in answers:
            try:
                conn, _ = listener.accept()
            except OSError:  # (TimeoutError too) nobody came
                return
            with conn:
                conn.settimeout(5)
                data = b""
                while b"\r\n\r\n" not in data and (more := conn.recv(65536)):
                    data += more
                head, _, body = data.partition(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                while len(body) < length and (more := conn.recv(65536)):
                    body += more
                received.append(head + b"\r\n\r\n" + body if len(body) == length else b"")
                if hold:
                    threading.Event().wait(hold)
                conn.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", received
    finally:
        listener.close()
        thread.join(timeout=5)


def test_a_request_is_sent_whole_and_its_answer_read_by_its_length() -> None:
    answer = b'HTTP/1.1 201 Created\r\nContent-Length: 11\r\nETag: "7"\r\nX-Other: a: b\r\n\r\n{"id": 12}\nEXTRA'
    with server(answer) as (url, received):
        got = wire.request(f"{url}/api/v1/envs/a%20b?wait=5", "POST", {"Authorization": "Bearer t"}, b'{"x": 1}', 5)
    assert got == wire.Answer(201, "Created", {"content-length": "11", "etag": '"7"', "x-other": "a: b"},
                              b'{"id": 12}\n')
    head, _, body = received[0].partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /api/v1/envs/a%20b?wait=5 HTTP/1.1"
    assert {f"Host: {url.removeprefix('http://')}", "Connection: close", "Authorization: Bearer t",
            "Content-Length: 8"} <= set(lines[1:])
    assert body == b'{"x": 1}'


def test_chunked_answers_answers_to_the_end_of_the_stream_and_interim_ones() -> None:
    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"4;ext=1\r\n[1, \r\n3\r\n2]\n\r\n0\r\nTrailer: x\r\n\r\n")
    to_the_end = b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n[3]"
    interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
    not_modified = b'HTTP/1.1 304 Not Modified\r\nETag: "9"\r\n\r\n'
    with server(chunked, to_the_end, interim, not_modified) as (url, _):
        bodies = [wire.request(url, "GET", {}, None, 5).body for _ in range(3)]
        unchanged = wire.request(url, "GET", {}, None, 5)
    assert bodies == [b"[1, 2]\n", b"[3]", b"{}"]
    assert (unchanged.status, unchanged.headers["etag"], unchanged.body) == (304, '"9"', b"")


@pytest.mark.parametrize("answer", [
    b"",  # closed at once
    b"SSH-2.0-OpenSSH\r\n\r\n",  # not HTTP
    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",  # cut short
    b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2",  # headers never ended
])
def test_what_is_not_an_http_answer_is_said_so(answer: bytes) -> None:
    with server(answer) as (url, _), pytest.raises(wire.BadAnswer):
        wire.request(url, "GET", {}, None, 5)


def test_a_server_out_of_reach_or_silent_is_an_os_error() -> None:
    with pytest.raises(ConnectionRefusedError):
        wire.request(f"http://127.0.0.1:{free_port()}/", "GET", {}, None, 5)
    with server(b"HTTP/1.1 200 OK\r\n\r\n", hold=2) as (url, _), pytest.raises(TimeoutError):
        wire.request(url, "GET", {}, None, 0.3)


def test_a_line_break_in_a_header_is_refused_before_anything_is_sent() -> None:
    with server(b"HTTP/1.1 204 No Content\r\n\r\n", accept_for=0.5) as (url, received), \
            pytest.raises(ValueError, match="line break"):
        wire.request(f"{url}/", "GET", {"Authorization": "Bearer t\r\nX-Evil: 1"}, None, 5)
    assert received == []  # (the server waited for a connection in vain)


@pytest.mark.parametrize(("url", "token", "names"), [
    ("http://127.0.0.1:8000", "abc\ndef", "ORCH_API_TOKEN"),
    ("http://127.0.0.1:8000", "abc def", "ORCH_API_TOKEN"),
    ("http://127.0.0.1:8000\r\nX: 1", "abc", "ORCH_API_URL"),
    ("http://127.0.0.1:80\t00", "abc", "ORCH_API_URL"),
])
def test_a_url_or_token_with_a_line_break_is_bad_input(monkeypatch: pytest.MonkeyPatch, tmp_path: object,
                                                       url: str, token: str, names: str) -> None:
    """A pasted value with a line break (or a space, or another control character) is the
    user's input: a one-line refusal (exit 2), not an API "that cannot be reached"."""
    monkeypatch.setenv("ORCH_API_URL", url)
    monkeypatch.setenv("ORCH_API_TOKEN", token)
    with pytest.raises(BadInput, match=names) as refused:
        remote()
    assert "\n" not in str(refused.value)
    monkeypatch.setenv("ORCH_API_URL", "http://127.0.0.1:8000/api/v1/")
    monkeypatch.setenv("ORCH_API_TOKEN", " abc\n")  # (whitespace around a value is only trimmed)
    assert remote() == Remote("http://127.0.0.1:8000", "abc")


def json_answer(status: str, body: object, extra: str = "") -> bytes:
    data = json.dumps(body).encode()
    return f"HTTP/1.1 {status}\r\nContent-Length: {len(data)}\r\n{extra}\r\n".encode() + data


def test_the_cli_reads_the_apis_answers_as_its_contract_says() -> None:
    answers = [
        json_answer("200 OK", {"id": 3}, 'ETag: "3-1"\r\n'),
        b'HTTP/1.1 304 Not Modified\r\nETag: "3-1"\r\n\r\n',
        json_answer("409 Conflict", {"detail": "service web\n  is being removed"}),
        json_answer("422 Unprocessable Entity", {"detail": [{"loc": ["body", "scale"], "msg": "too big"}]}),
        json_answer("503 Service Unavailable", {"detail": "the catalogue is locked"}),
        b"HTTP/1.1 302 Found\r\nLocation: /elsewhere\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n{x}",
    ]
    with server(*answers) as (url, received):
        api = Remote(url, "secret")
        assert api.call("GET", "/operations/3") == ({"id": 3}, '"3-1"')
        assert api.poll("/operations/3", '"3-1"', 5) == (None, '"3-1"')
        with pytest.raises(BadInput, match=r"^service web is being removed$"):
            api.post("/envs/e/services/web/redeploy")
        with pytest.raises(BadInput, match=r"^scale: too big$"):
            api.post("/envs/e/services/web/scale", {"scale": 10**6})
        with pytest.raises(ApiUnavailable, match="answered 503: the catalogue is locked"):
            api.get("/operations")
        with pytest.raises(ApiUnavailable, match="answered 302: HTTP 302 Found"):
            api.get("/operations")
        with pytest.raises(ApiUnavailable, match="cannot be reached"):
            api.get("/operations")
    assert b"GET /api/v1/operations/3?wait=5 HTTP/1.1" in received[1] and b'If-None-Match: "3-1"' in received[1]
    assert all(b"Authorization: Bearer secret" in r for r in received)


def test_through_a_proxy_the_standard_client_asks_and_a_redirect_is_not_followed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With http_proxy set the request goes through urllib (which knows proxies and no_proxy);
    a redirect is an answer, not followed: the token would go wherever it points."""
    for name in ("no_proxy", "NO_PROXY", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    redirect = b"HTTP/1.1 307 Temporary Redirect\r\nLocation: http://127.0.0.1:9/x\r\nContent-Length: 0\r\n\r\n"
    with server(json_answer("200 OK", {"id": 1}), redirect) as (proxy, received):
        monkeypatch.setenv("http_proxy", proxy)
        api = Remote("http://api.invalid:8000", "secret")  # reached only through the proxy
        assert api.get("/operations/1") == {"id": 1}
        with pytest.raises(ApiUnavailable, match="answered 307"):
            api.get("/operations/1")
    assert received[0].startswith(b"GET http://api.invalid:8000/api/v1/operations/1 HTTP/1.1")
    assert len(received) == 2  # nothing went to the redirect's target
