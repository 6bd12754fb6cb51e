"""Notification receivers for tests: an HTTP server (stdlib) and an HL7 MLLP server
(python-hl7's asyncio server), each on 127.0.0.1 in a thread, recording what they got."""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import hl7
from hl7.mllp import HL7StreamReader, HL7StreamWriter, start_hl7_server


@dataclass
class WebhookServer:
    """Answers every POST with ``status``; ``requests`` holds (path, headers, JSON body)."""

    port: int
    status: int = 200
    requests: list[tuple[str, dict[str, str], dict[str, Any]]] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> WebhookServer:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with owner._lock:
                    owner.requests.append((self.path, dict(self.headers.items()),
                                           json.loads(body.decode("utf-8"))))
                    status = owner.status
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return None  # quiet test output

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def bodies(self) -> list[dict[str, Any]]:
        with self._lock:
            return [body for _, _, body in self.requests]


@dataclass
class MllpServer:
    """Answers every message with an ACK of ``ack_code`` (None: close without an ACK);
    ``messages`` holds the parsed messages."""

    port: int
    ack_code: str | None = "AA"
    messages: list[hl7.Message] = field(default_factory=list)
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    async def _handle(self, reader: HL7StreamReader, writer: HL7StreamWriter) -> None:
        try:
            while not reader.at_eof():
                try:
                    message = await reader.readmessage()
                except asyncio.IncompleteReadError:
                    return  # the client closed the connection
                with self._lock:
                    self.messages.append(message)
                    code = self.ack_code
                if code is None:
                    return
                writer.writemessage(message.create_ack(code, application="TEST_RIS"))
                await writer.drain()
        finally:
            writer.close()

    def start(self) -> MllpServer:
        loop = asyncio.new_event_loop()
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            server = loop.run_until_complete(
                start_hl7_server(self._handle, "127.0.0.1", self.port, encoding="utf-8"))
            started.set()
            loop.run_forever()
            server.close()
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(server.wait_closed())
            loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        assert started.wait(10), "MLLP server did not start"
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop = self._thread = None

    def received(self) -> list[hl7.Message]:
        with self._lock:
            return list(self.messages)
