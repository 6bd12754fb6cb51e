"""A small HTTP endpoint: ``/metrics`` (Prometheus) and ``/healthz``."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST

from node.metrics import NodeMetrics

LOGGER = logging.getLogger(__name__)

HealthCheck = Callable[[], tuple[bool, str]]


class HttpEndpoint:
    """Serves metrics and health on a thread of its own."""

    def __init__(self, host: str, port: int, metrics: NodeMetrics, health: HealthCheck) -> None:
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                if self.path == "/metrics":
                    self._reply(200, endpoint.metrics.render(), CONTENT_TYPE_LATEST)
                elif self.path == "/healthz":
                    ok, text = endpoint.health()
                    self._reply(200 if ok else 503, (text + "\n").encode(), "text/plain")
                else:
                    self._reply(404, b"not found\n", "text/plain")

            def _reply(self, code: int, body: bytes, content_type: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                LOGGER.debug("http: " + format, *args)

        self.metrics = metrics
        self.health = health
        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="ich-node-http",
                                        daemon=True)

    @property
    def port(self) -> int:
        """The bound port."""
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Start serving."""
        self._thread.start()

    def stop(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()
