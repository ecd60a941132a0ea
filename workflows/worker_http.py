"""The worker's HTTP listener (``BUCKETS_WORKER_HTTP=host:port``; off by default).

``GET /healthz`` (the process answers: 200), ``GET /readyz`` (200 when ready, else 503; the
checks as JSON, see :mod:`buckets.health`) and ``GET /metrics`` (Prometheus text format, see
:mod:`buckets.metrics`). No token: the answers hold no contact data.
A small threaded server of the standard library, so the worker needs no second event loop;
it runs as a daemon thread and is closed on shutdown.
"""

from __future__ import annotations

import json
import logging
import threading
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from buckets.errors import ConfigError
from buckets.settings import parse_host_port

if TYPE_CHECKING:
    from workflows.worker import Worker

log = logging.getLogger("buckets.worker.http")


class WorkerHttp:
    def __init__(self, address: str, worker: Worker) -> None:
        host, port = parse_host_port(address)
        handler = _handler(worker)
        try:
            self.server = ThreadingHTTPServer((host, port), handler)
        except OSError as exc:
            raise ConfigError(
                f"BUCKETS_WORKER_HTTP: cannot listen on {address}: {exc.strerror or exc}"
            ) from None
        self.server.daemon_threads = True
        bound_host, bound_port = self.server.server_address[:2]
        self.host = str(bound_host)
        self.port = int(bound_port)
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True
        )
        self.thread.name = "worker-http"
        self.thread.start()

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _handler(worker: Worker) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "buckets-worker"

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/healthz":
                self._json(200, {"status": "ok", "worker_id": worker.worker_id})
            elif path == "/readyz":
                report = worker.readiness(datetime.now(UTC))
                self._json(200 if report.ok else 503, report.to_dict())
            elif path == "/metrics":
                from buckets.metrics import render

                body, content_type = render(worker.runtime)
                self._send(200, body, content_type)
            else:
                self._json(404, {"detail": "not found"})

        def _json(self, status: int, payload: dict[str, Any]) -> None:
            self._send(status, json.dumps(payload).encode(), "application/json")

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s %s", self.address_string(), format % args)

    return Handler
