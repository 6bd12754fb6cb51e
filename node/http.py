"""A small HTTP endpoint: ``/metrics`` (Prometheus), ``/healthz`` and, through a router,
the read-only status page (:mod:`node.statuspage`). GET only; no scripts are served."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST

from node.metrics import NodeMetrics

LOGGER = logging.getLogger(__name__)

HealthCheck = Callable[[], tuple[bool, str]]

# The status page has inline CSS, same-origin images and no script.
_SECURITY_HEADERS = (
    ("Content-Security-Policy", "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'"),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
)
_PAGES = ("metrics", "healthz", "preview", "studies")


@dataclass(frozen=True)
class Reply:
    """One HTTP response."""

    code: int
    body: bytes
    content_type: str
    cache_seconds: int = 0


Router = Callable[[str], Reply | None]


def page_name(path: str) -> str:
    """A bounded label for the metrics: index, metrics, healthz, preview, studies or other."""
    first = path.strip("/").split("/", 1)[0]
    if not first:
        return "index"
    return first if first in _PAGES else "other"


class HttpEndpoint:
    """Serves metrics, health and the pages of *router* on a thread of its own."""

    def __init__(self, host: str, port: int, metrics: NodeMetrics, health: HealthCheck,
                 router: Router | None = None) -> None:
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                path = urlsplit(self.path).path
                try:
                    reply = endpoint.answer(path)
                except Exception as exc:  # the request boundary: a broken page is a 500
                    LOGGER.exception("HTTP GET %s failed", path)
                    reply = Reply(500, f"internal error: {type(exc).__name__}\n".encode(),
                                  "text/plain; charset=utf-8")
                endpoint.metrics.http_requests.labels(page=page_name(path),
                                                      code=str(reply.code)).inc()
                self.send_response(reply.code)
                self.send_header("Content-Type", reply.content_type)
                self.send_header("Content-Length", str(len(reply.body)))
                self.send_header("Cache-Control", f"private, max-age={reply.cache_seconds}"
                                 if reply.cache_seconds else "no-store")
                for name, value in _SECURITY_HEADERS:
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(reply.body)

            def log_message(self, format: str, *args: object) -> None:
                LOGGER.debug("http: " + format, *args)

        self.metrics = metrics
        self.health = health
        self.router = router
        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="ich-node-http",
                                        daemon=True)

    def answer(self, path: str) -> Reply:
        """The reply to ``GET path``."""
        if path == "/metrics":
            return Reply(200, self.metrics.render(), CONTENT_TYPE_LATEST)
        if path == "/healthz":
            ok, text = self.health()
            return Reply(200 if ok else 503, (text + "\n").encode(), "text/plain; charset=utf-8")
        reply = self.router(path) if self.router is not None else None
        return reply or Reply(404, b"not found\n", "text/plain; charset=utf-8")

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
