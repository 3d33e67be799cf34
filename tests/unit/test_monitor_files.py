"""A monitoring job's directory kept in line by its node: files written when they differ, and
reloads that failed tried again at the next beat (an in-process HTTP server stands for the
blackbox exporter and Prometheus)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from orchestrator import monitoring
from orchestrator.catalogue.monitoring import MonitorEndpoint
from workers.monitor import MonitorFiles


class Reloads:
    def __init__(self) -> None:
        self.seen: list[str] = []
        self.failing = 0  # answer the next N with 500

    def serve(self) -> ThreadingHTTPServer:
        reloads = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                reloads.seen.append(self.path)
                failing = reloads.failing > 0
                reloads.failing -= failing
                self.send_response(500 if failing else 200)
                self.end_headers()

            def log_message(self, *_: object) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server


@pytest.fixture
def reloads() -> Iterator[tuple[Reloads, MonitorEndpoint]]:
    r = Reloads()
    server = r.serve()
    port = int(server.server_address[1])
    yield r, MonitorEndpoint("e", "monitoring", "127.0.0.1", port, port, "admin", "secret")
    server.shutdown()


def files(blackbox: str, targets: str = "[]\n") -> dict[str, str]:
    return {monitoring.PROMETHEUS_FILE: "p\n", monitoring.RULES_FILE: "r\n", monitoring.BLACKBOX_FILE: blackbox,
            f"{monitoring.TARGETS_DIR}/http.json": targets}


def test_only_what_changed_is_reloaded_and_a_failed_reload_is_tried_again(
        tmp_path: Path, reloads: tuple[Reloads, MonitorEndpoint]) -> None:
    r, endpoint = reloads
    kept = MonitorFiles(str(tmp_path))
    kept.prepare("j1", files("a\n"))
    assert kept.apply("j1", files("a\n"), endpoint) == set() and r.seen == []  # nothing differs
    assert kept.apply("j1", files("a\n", '[{"targets": ["x"]}]\n'), endpoint) == {"targets/http.json"}
    assert r.seen == []  # targets: Prometheus reads them by itself
    r.failing = 1
    kept.apply("j1", files("b\n"), endpoint)  # a new site's module: the reload fails once
    assert r.seen == ["/-/reload"]
    kept.apply("j1", files("b\n"), endpoint)  # unchanged file, but its reload is still due
    assert r.seen == ["/-/reload", "/-/reload"]
    kept.apply("j1", files("b\n"), endpoint)
    assert len(r.seen) == 2  # done: nothing more
    assert (tmp_path / "j1" / monitoring.BLACKBOX_FILE).read_text() == "b\n"
