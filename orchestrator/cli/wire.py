"""One HTTP/1.1 request over a plain socket: how the CLI asks the API at an http:// URL.

The standard library's client (``urllib.request`` on ``http.client``) loads the email package
and ssl to start: 40-50 ms of imports in every CLI call that asks the API, about as much as click
and the CLI together, for a request this module makes in a few lines: one request per connection
(``Connection: close``), the answer's body by its Content-Length, by chunks, or to the end of the
stream. An https:// URL goes through urllib (``remote.Remote``): TLS is not done here.
"""

from __future__ import annotations

import socket
import urllib.parse
from typing import BinaryIO, NamedTuple

MAX_LINE = 65536  # a status or header line longer than this is not an answer from the API
MAX_HEADERS = 100


class BadAnswer(Exception):
    """What came back is not an HTTP answer (or it was cut short)."""


class Answer(NamedTuple):
    status: int
    reason: str
    headers: dict[str, str]  # names in lower case
    body: bytes


def request(url: str, method: str, headers: dict[str, str], body: bytes | None, timeout: float) -> Answer:
    """``method`` on ``url`` (http://): its answer, whatever its status. Raises OSError when the
    server cannot be reached or stops answering within ``timeout`` (seconds, per wait), and
    BadAnswer when what it sends is not HTTP."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"not an http:// URL: {url}")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    lines = [f"{method} {target} HTTP/1.1", f"Host: {parts.netloc.rpartition('@')[2]}", "Connection: close",
             *(f"{name}: {value}" for name, value in headers.items())]
    if any(c in line for line in lines for c in "\r\n\0"):  # (a token pasted with its line break)
        raise ValueError("a line break in the request's target or headers")
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    with socket.create_connection((parts.hostname, parts.port or 80), timeout=timeout) as sock, \
            sock.makefile("rb") as stream:
        sock.sendall(head + (body or b""))
        return _answer(stream, method)


def _answer(stream: BinaryIO, method: str) -> Answer:
    while True:
        status, reason = _status(stream.readline(MAX_LINE + 1))
        headers = _headers(stream)
        if not 100 <= status < 200:  # (an interim answer, 100 Continue: the real one follows)
            break
    if method == "HEAD" or status in (204, 304):
        return Answer(status, reason, headers, b"")
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return Answer(status, reason, headers, _chunks(stream))
    length = headers.get("content-length")
    if length is None:
        return Answer(status, reason, headers, stream.read())
    if not length.strip().isdigit():
        raise BadAnswer(f"Content-Length {length!r}")
    return Answer(status, reason, headers, _exactly(stream, int(length)))


def _status(line: bytes) -> tuple[int, str]:
    if len(line) > MAX_LINE or not line.endswith(b"\n"):
        raise BadAnswer("no status line" if not line else "a status line cut short or too long")
    version, _, rest = line.decode("latin-1").strip().partition(" ")
    code, _, reason = rest.partition(" ")
    if not version.startswith("HTTP/1.") or len(code) != 3 or not code.isdigit():
        raise BadAnswer(f"not an HTTP status line: {line[:80]!r}")
    return int(code), reason


def _headers(stream: BinaryIO) -> dict[str, str]:
    headers: dict[str, str] = {}
    for _ in range(MAX_HEADERS + 1):
        line = stream.readline(MAX_LINE + 1)
        if len(line) > MAX_LINE or not line.endswith(b"\n"):
            raise BadAnswer("a header line cut short or too long")
        if line in (b"\r\n", b"\n"):
            return headers
        name, sep, value = line.decode("latin-1").partition(":")
        if not sep:
            raise BadAnswer(f"not a header line: {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    raise BadAnswer(f"more than {MAX_HEADERS} header lines")


def _chunks(stream: BinaryIO) -> bytes:
    body = bytearray()
    while True:
        line = stream.readline(MAX_LINE + 1)
        size = line.split(b";", 1)[0].strip()
        try:
            length = int(size, 16)
        except ValueError:
            raise BadAnswer(f"not a chunk size: {line[:80]!r}") from None
        if length == 0:
            _headers(stream)  # (trailers, then the end)
            return bytes(body)
        body += _exactly(stream, length)
        if stream.readline(MAX_LINE + 1) not in (b"\r\n", b"\n"):
            raise BadAnswer("a chunk not ended by a line break")


def _exactly(stream: BinaryIO, length: int) -> bytes:
    data = stream.read(length)
    if len(data) != length:
        raise BadAnswer(f"the answer was cut short ({len(data)} of {length} bytes)")
    return data
