"""A loopback HTTP server for download tests: serves in-memory routes on 127.0.0.1 only."""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest


@dataclass
class Route:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    behaviour: str = "full"  # "full", or "cut": promise the whole body, send half, hang up


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict[str, Route] = {}
    requests: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - the name http.server dispatches to
        type(self).requests.append(self.path)
        route = self.routes.get(self.path, Route(404, body=b"missing"))
        self.send_response(route.status)
        headers = {"Content-Length": str(len(route.body)), **route.headers}
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        try:
            if route.behaviour == "cut":
                self.wfile.write(route.body[: len(route.body) // 2])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
            else:
                self.wfile.write(route.body)
        except (BrokenPipeError, ConnectionResetError):
            # The client may hang up early on purpose (a refused download closes the body
            # unread); that is not a server fault worth a traceback.
            self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
        pass


@dataclass
class Server:
    base: str
    routes: dict[str, Route]
    requests: list[str]


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    # A proxy from the environment would swallow loopback requests.
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    for name in ("SLIMSEG_OFFLINE", "SLIMSEG_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    handler = type("Handler", (_Handler,), {"routes": {}, "requests": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield Server(f"http://127.0.0.1:{httpd.server_address[1]}", handler.routes, handler.requests)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)
