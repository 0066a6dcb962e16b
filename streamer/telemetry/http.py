"""The small HTTP server of the daemon: /metrics (Prometheus text format), /healthz, /readyz."""
from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

__all__ = ["MetricsServer", "serve"]


class MetricsServer:
    """A running metrics/health server; `close()` stops it and frees the port."""

    def __init__(self, httpd: ThreadingHTTPServer, thread: threading.Thread) -> None:
        self._httpd = httpd
        self._thread = thread

    @property
    def host(self) -> str:
        return str(self._httpd.server_address[0])

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _probe(check: Callable[[], bool]) -> bool:
    # A probe that raises is a failing probe, not a crashed request thread.
    try:
        return bool(check())
    except Exception:
        return False


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        """A client that went away mid-request (a probe's timeout, a half-sent request) is nobody's
        error: no traceback on stderr. Anything else keeps socketserver's report."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


def serve(
    metrics_registry: CollectorRegistry,
    host: str,
    port: int,
    health: Callable[[], bool],
    ready: Callable[[], bool],
) -> MetricsServer:
    """Serve /metrics, /healthz and /readyz on a daemon thread; port 0 picks a free port.

    /healthz answers 200 while `health()` is true (liveness: restart when it is not), /readyz
    200 while `ready()` is true (model loaded, consumer assigned), 503 otherwise.
    """

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._reply(200, CONTENT_TYPE_LATEST, generate_latest(metrics_registry))
            elif path == "/healthz":
                self._reply_probe(health)
            elif path == "/readyz":
                self._reply_probe(ready)
            else:
                self._reply(404, "text/plain; charset=utf-8", b"not found\n")

        def _reply_probe(self, check: Callable[[], bool]) -> None:
            if _probe(check):
                self._reply(200, "text/plain; charset=utf-8", b"ok\n")
            else:
                self._reply(503, "text/plain; charset=utf-8", b"unavailable\n")

        def _reply(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            # Scrapes every 15 s would flood stderr; access logs are not wanted here.
            pass

    httpd = _Server((host, port), Handler)
    httpd.daemon_threads = True
    # poll_interval bounds how long close() waits for the serving loop to notice shutdown.
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, name="metrics-http", daemon=True
    )
    thread.start()
    return MetricsServer(httpd, thread)
