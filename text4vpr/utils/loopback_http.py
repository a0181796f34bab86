"""Debian's nginx on a free loopback port, for tests and benchmarks that read shards over HTTP:
one process, no root paths (config, pid, logs and temp files under its own prefix)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


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
                f"  server {{ listen 127.0.0.1:{self.port}; root {self.www}; }}\n}}\n")

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
        link = self.www / name
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
