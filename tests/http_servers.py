"""Loopback HTTP for the remote-shard tests: Debian's nginx serving folders, and a threaded
fault proxy in front of it that resets, answers 503, stalls or truncates on a schedule."""

from __future__ import annotations

import http.client
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from text4vpr.utils.loopback_http import Nginx, free_port  # noqa: F401 - the fixtures' nginx

FAULTS = ("reset", "503", "stall", "truncate")


class FaultProxy:
    """Forwards GETs to `upstream_port`; `schedule(path, n)` -> None or a fault for the n-th
    (0-based) request of `path`: "reset" (RST half-way through the body), "503", "stall"
    (headers, then silence for `stall_s`), "truncate" (half the body, then close)."""

    def __init__(self, upstream_port: int, schedule: Callable[[str, int], str | None], stall_s: float = 5.0):
        self.upstream, self.schedule, self.stall_s = upstream_port, schedule, stall_s
        self.seen: dict[str, int] = {}
        self.faults: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def _next_fault(self, path: str) -> str | None:
        with self.lock:
            n = self.seen.get(path, 0)
            self.seen[path] = n + 1
            fault = self.schedule(path, n)
            if fault:
                self.faults.append((path, fault))
            return fault

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                fault = proxy._next_fault(self.path)
                if fault == "503":
                    self._answer(503, {"Content-Type": "text/plain"}, b"busy\n")
                    return
                status, headers, body = self._forward()
                if fault is None:
                    self._answer(status, headers, body)
                    return
                self.close_connection = True
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                if fault == "stall":
                    time.sleep(proxy.stall_s)
                    return
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                if fault == "reset":  # SO_LINGER 0: close sends RST
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

            def _forward(self):
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream, timeout=30)
                fwd = {k: v for k, v in self.headers.items() if k.lower() in ("range", "accept-encoding")}
                conn.request("GET", self.path, headers=fwd)
                r = conn.getresponse()
                body = r.read()
                conn.close()
                keep = {k: v for k, v in r.getheaders() if k.lower() in ("content-type", "content-range", "accept-ranges")}
                keep["Content-Length"] = str(len(body))
                return r.status, keep, body

            def _answer(self, status, headers, body):
                self.send_response(status)
                for k, v in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

        return Handler

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class FailEachOnce:
    """Every path's first request fails; the k-th new path gets fault kind k mod 4."""

    def __init__(self, kinds=FAULTS):
        self.kinds, self.paths = kinds, 0

    def __call__(self, path: str, n: int) -> str | None:
        if n:
            return None
        self.paths += 1  # called under the proxy's lock
        return self.kinds[(self.paths - 1) % len(self.kinds)]


def fail_always(name: str, fault: str = "503"):
    """Every request of paths ending in `name` fails with `fault`; others pass."""
    return lambda path, n: fault if path.endswith(name) else None
