"""Serving the API with uvicorn, in the foreground (``orchestrator api``) or in a thread (dev)."""

from __future__ import annotations

import threading

import uvicorn

from orchestrator.api.app import create_api
from orchestrator.platform import Platform


def _server(platform: Platform, port: int, host: str) -> uvicorn.Server:
    config = uvicorn.Config(create_api(platform), host=host, port=port, log_level="warning")
    return uvicorn.Server(config)


def serve(platform: Platform, port: int, host: str = "127.0.0.1") -> None:
    _server(platform, port, host).run()


def serve_in_thread(platform: Platform, port: int, host: str = "127.0.0.1") -> uvicorn.Server:
    server = _server(platform, port, host)
    threading.Thread(target=server.run, name="api", daemon=True).start()
    return server
