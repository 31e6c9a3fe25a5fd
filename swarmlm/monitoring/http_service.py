"""A tiny threaded HTTP server for GET routes: a peer's /metrics, the health page and its JSON.

`HttpService(routes, host, port).start()` binds (port 0 picks a free port), serves from a daemon
thread and returns at once; `url` is the bound address; `stop()` closes it. A route is a function
of no arguments returning (content type, body); one that raises is answered with 500 and logged.
"""

from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Mapping, Optional

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

logger = logging.getLogger(__name__)

Route = Callable[[], tuple[str, bytes]]


class HttpService:
    def __init__(self, routes: Mapping[str, Route], host: str = "127.0.0.1", port: int = 0):
        self.routes, self.host, self.port = dict(routes), host, port
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "HttpService":
        self._server = ThreadingHTTPServer((self.host, self.port), _handler_class(self.routes))
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="swarmlm-http", daemon=True)
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None

    def __enter__(self) -> "HttpService":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def metrics_route(registry: CollectorRegistry) -> Route:
    """Serves `registry` in the Prometheus text format."""
    return lambda: (CONTENT_TYPE_LATEST, generate_latest(registry))


def serve_metrics(registry: CollectorRegistry, host: str = "127.0.0.1", port: int = 0) -> HttpService:
    """Starts serving `registry` at http://host:port/metrics."""
    return HttpService({"/metrics": metrics_route(registry)}, host, port).start()


def _handler_class(routes: Mapping[str, Route]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            route = routes.get(self.path.split("?", 1)[0])
            if route is None:
                self._answer(404, "text/plain; charset=utf-8", f"no such page; try one of {sorted(routes)}\n".encode())
                return
            try:
                content_type, body = route()
            except Exception as e:
                logger.warning(f"GET {self.path} failed", exc_info=e)
                self._answer(500, "text/plain; charset=utf-8", f"{type(e).__name__}: {e}\n".encode())
                return
            self._answer(200, content_type, body)

        def _answer(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args) -> None:
            logger.debug(f"{self.address_string()} {format % args}")

    return Handler
