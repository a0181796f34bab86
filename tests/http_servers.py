"""Loopback HTTP for the remote-shard tests (and `benchmarks/bench_data.py --nginx`): Debian's
nginx serving folders (one process, no root paths: config, pid, logs and temp files under its
own prefix), and a threaded fault proxy in front of it that resets, answers 503, stalls or
truncates on a schedule."""

from __future__ import annotations

import http.client
import shutil
import socket
import struct
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
FAULTS = ("reset", "503", "stall", "truncate")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Nginx:
    """nginx in one process (no root paths: config, pid, logs and temp files under `prefix`),
    serving `prefix/www`; `serve(folder, name)` links a folder in and returns its URL."""

    def __init__(self, prefix: Path):
        if not Path(NGINX).is_file():
            raise RuntimeError(f"no nginx at {NGINX}: install it (Debian: apt-get install nginx; `.ci/run` does)")
        self.prefix, self.www = prefix, prefix / "www"
        self.www.mkdir(parents=True)
        for attempt in range(5):  # the free port can be taken between the probe and nginx's bind
            self.port = free_port()
            conf = prefix / "nginx.conf"
            conf.write_text(self._config())
            self.proc = subprocess.Popen([NGINX, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if self._wait_up():
                return
            self.proc.kill()
            self.proc.wait()
        log = prefix / "error.log"
        raise RuntimeError(f"nginx did not start: {log.read_text()[-2000:] if log.exists() else 'no error log'}")

    def _config(self) -> str:
        t = self.prefix
        temps = "".join(f"  {k}_temp_path {t / k};\n" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        return (f"daemon off;\nmaster_process off;\npid {t / 'nginx.pid'};\nerror_log {t / 'error.log'} warn;\n"
                "events { worker_connections 512; }\n"
                f"http {{\n  access_log off;\n  default_type application/octet-stream;\n  sendfile on;\n{temps}"
                f"  server {{ listen 127.0.0.1:{self.port}; root {self.www};\n"
                # like S3: a list of ranges is answered with the whole file (200), one range as asked
                "    location ^~ /single-range/ { max_ranges 1; }\n  }\n}\n")

    def _wait_up(self) -> bool:
        """True once this nginx answers with its own token (not another server on the port)."""
        import http.client
        import secrets

        token = secrets.token_hex(8)
        (self.www / "token.txt").write_text(token)
        for _ in range(100):
            if self.proc.poll() is not None:
                return False
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/token.txt")
                if conn.getresponse().read().decode() == token:
                    return True
            except OSError:
                pass
            time.sleep(0.05)
        return False

    def serve(self, folder: Path, name: str) -> str:
        link = self.www / name  # a name under single-range/ is served without multi-range answers
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(Path(folder).resolve(), target_is_directory=True)
        return f"http://127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


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
