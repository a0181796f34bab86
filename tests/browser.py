"""Headless Chromium for checking HTML reports as a person would see them: the DOM after the
page's scripts ran, the console messages, and a PNG screenshot (tests, docs screenshots)."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--enable-logging=stderr", "--v=0")
_CONSOLE = re.compile(r":CONSOLE[:(]\d*\)?\] (.*)")


class BrowserMissing(RuntimeError):
    """No Chromium on PATH."""


def chromium() -> str:
    """Path of the Chromium executable; raises with the install command when there is none."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        exe = shutil.which(name)
        if exe:
            return exe
    raise BrowserMissing("chromium not found on PATH: apt-get install -y chromium (.ci/run installs it)")


def _run(page: Path, extra: list[str], timeout: float) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        cmd = [chromium(), *FLAGS, f"--user-data-dir={profile}", *extra, page.resolve().as_uri()]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def dump_dom(page: str | Path, timeout: float = 120) -> tuple[str, list[str]]:
    """(the serialised DOM after load, console messages) of a page opened from disk."""
    done = _run(Path(page), ["--dump-dom"], timeout)
    if done.returncode != 0 or not done.stdout.strip():
        raise RuntimeError(f"chromium failed on {page} (exit {done.returncode}): {done.stderr[-2000:]}")
    return done.stdout, _CONSOLE.findall(done.stderr)


def screenshot(page: str | Path, png: str | Path, width: int = 1280, height: int = 2000, timeout: float = 120) -> Path:
    """Render the page at width x height px into `png`."""
    png = Path(png).resolve()
    done = _run(Path(page), [f"--screenshot={png}", f"--window-size={width},{height}"], timeout)
    if not png.is_file():
        raise RuntimeError(f"chromium wrote no screenshot of {page} (exit {done.returncode}): {done.stderr[-2000:]}")
    return png


@dataclass
class Element:
    tag: str
    attrs: dict
    text: str = ""


@dataclass
class ParsedDom:
    """Elements of a dumped DOM, with the text directly inside them."""

    elements: list[Element] = field(default_factory=list)

    def select(self, tag: str | None = None, cls: str | None = None, attr: str | None = None) -> list[Element]:
        return [e for e in self.elements if (tag is None or e.tag == tag)
                and (cls is None or cls in (e.attrs.get("class") or "").split())
                and (attr is None or attr in e.attrs)]

    def by_id(self, ident: str) -> Element | None:
        return next((e for e in self.elements if e.attrs.get("id") == ident), None)


class _Collector(HTMLParser):
    VOID = {"img", "br", "meta", "link", "input", "hr", "source"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.dom, self.stack = ParsedDom(), []

    def handle_starttag(self, tag, attrs):
        el = Element(tag, dict(attrs))
        self.dom.elements.append(el)
        if tag not in self.VOID:
            self.stack.append(el)

    def handle_endtag(self, tag):
        while self.stack:
            if self.stack.pop().tag == tag:
                break

    def handle_data(self, data):
        if self.stack:
            self.stack[-1].text += data


def parse_dom(html: str) -> ParsedDom:
    c = _Collector()
    c.feed(html)
    return c.dom
