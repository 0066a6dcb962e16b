"""The small HTTP server of the daemon: /metrics (Prometheus text format), /healthz, /readyz.

Whoever can reach the port can hold connections open, so each connection has a deadline
(`connection_timeout_s` for the whole exchange, half-sent requests included: its socket is shut
down then) and at most `max_connections` are served at once; one more is closed at once, unread.
A slow or hostile client can thus delay a scrape by at most the deadline, never exhaust the
daemon's threads (README "Security"; restrict who reaches the port: deploy/k8s/networkpolicy.yaml).
"""
from __future__ import annotations

import socket
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

CONNECTION_TIMEOUT_S = 5.0  # a scrape answers in milliseconds; Prometheus' default scrape timeout is 10 s
MAX_CONNECTIONS = 16

__all__ = ["CONNECTION_TIMEOUT_S", "MAX_CONNECTIONS", "MetricsServer", "serve"]


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
    """ThreadingHTTPServer with a deadline per connection and a bound on concurrent connections."""

    daemon_threads = True
    request_queue_size = 128  # a burst is accepted and shed at once, not left to the kernel's SYN retries

    def __init__(self, address: tuple[str, int], handler: type, timeout_s: float, max_connections: int) -> None:
        super().__init__(address, handler)
        self.deadline_s = timeout_s
        self._slots = threading.BoundedSemaphore(max_connections)

    def process_request(self, request: socket.socket, client_address: object) -> None:  # type: ignore[override]
        """Serve on a thread when a slot is free; otherwise close the connection at once."""
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: socket.socket, client_address: object) -> None:  # type: ignore[override]
        deadline = threading.Timer(self.deadline_s, _hang_up, (request,))
        deadline.daemon = True
        deadline.start()
        try:
            super().process_request_thread(request, client_address)
        finally:
            deadline.cancel()
            self._slots.release()

    def handle_error(self, request: object, client_address: object) -> None:
        """A client that went away mid-request or ran past its deadline (a probe's timeout, a
        half-sent request) is nobody's error: no traceback on stderr. Anything else keeps socketserver's report."""
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)


def serve(
    metrics_registry: CollectorRegistry,
    host: str,
    port: int,
    health: Callable[[], bool],
    ready: Callable[[], bool],
    connection_timeout_s: float = CONNECTION_TIMEOUT_S,
    max_connections: int = MAX_CONNECTIONS,
) -> MetricsServer:
    """Serve /metrics, /healthz and /readyz on a daemon thread; port 0 picks a free port.

    /healthz answers 200 while `health()` is true (liveness: restart when it is not), /readyz
    200 while `ready()` is true (model loaded, consumer assigned), 503 otherwise. A connection
    gets `connection_timeout_s` in all (and per socket operation); at most `max_connections` are
    served at once. Raises OSError when the address cannot be bound.
    """

    class Handler(BaseHTTPRequestHandler):
        timeout = connection_timeout_s  # per socket operation (StreamRequestHandler.setup)

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

    httpd = _Server((host, port), Handler, connection_timeout_s, max_connections)
    # poll_interval bounds how long close() waits for the serving loop to notice shutdown.
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, name="metrics-http", daemon=True
    )
    thread.start()
    return MetricsServer(httpd, thread)


def _hang_up(request: socket.socket) -> None:
    """End a connection past its deadline: the handler's blocked read or write returns."""
    try:
        request.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed
