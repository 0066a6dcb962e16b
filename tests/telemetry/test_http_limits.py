"""The metrics server under a slow-connection attack: 200 half-sent requests must not hold 200
threads, and a client trickling bytes must not hold one for ever; scrapes work again at once."""
from __future__ import annotations

import socket
import threading
import time
import urllib.request

from prometheus_client import CollectorRegistry

from streamer.telemetry import serve

TIMEOUT_S = 1.0
MAX_CONNECTIONS = 8


def _get(port: int, path: str) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        return response.status


def _half_sent(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never the blank line that ends the request
    return sock


def _closed_by_server(sock: socket.socket, within_s: float) -> bool:
    sock.settimeout(within_s)
    try:
        return sock.recv(1) == b""
    except (socket.timeout, TimeoutError):
        return False
    except ConnectionError:
        return True


def test_half_sent_requests_hold_neither_threads_nor_the_port() -> None:
    """200 half-sent requests: at most MAX_CONNECTIONS are served (threads bounded), the rest are
    closed at once; every held one is cut at the deadline; then /healthz answers."""
    threads_before = threading.active_count()
    with serve(CollectorRegistry(), "127.0.0.1", 0, lambda: True, lambda: True,
               connection_timeout_s=TIMEOUT_S, max_connections=MAX_CONNECTIONS) as server:
        socks = [_half_sent(server.port) for _ in range(200)]
        try:
            time.sleep(0.3)
            # each served connection: a handler thread and its deadline timer
            assert threading.active_count() - threads_before <= 1 + 2 * MAX_CONNECTIONS
            closed_at_once = sum(_closed_by_server(s, 0.05) for s in socks)
            assert closed_at_once >= 200 - MAX_CONNECTIONS
            start = time.monotonic()
            assert all(_closed_by_server(s, 3 * TIMEOUT_S) for s in socks)  # the held ones, at the deadline
            assert time.monotonic() - start < 3 * TIMEOUT_S
        finally:
            for sock in socks:
                sock.close()
        assert _get(server.port, "/healthz") == 200


def test_a_trickling_client_is_cut_at_the_deadline() -> None:
    """A byte every 0.2 s resets no per-read timeout that matters: the whole connection has one deadline."""
    with serve(CollectorRegistry(), "127.0.0.1", 0, lambda: True, lambda: True,
               connection_timeout_s=TIMEOUT_S, max_connections=MAX_CONNECTIONS) as server:
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        start, cut = time.monotonic(), False
        try:
            while time.monotonic() - start < 4 * TIMEOUT_S:
                try:
                    sock.sendall(b"X-Slow: 1\r\n")
                except OSError:
                    cut = True
                    break
                if _closed_by_server(sock, 0.2):
                    cut = True
                    break
        finally:
            sock.close()
        assert cut and time.monotonic() - start < 3 * TIMEOUT_S
        assert _get(server.port, "/metrics") == 200
