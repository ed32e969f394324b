"""Open every page of the built site in headless Chromium and check what a reader sees.

Usage: ``python docs/_tooling/browser_check.py SITE_DIR [--screenshot PNG] [--require]``

The site is served from ``127.0.0.1`` and Chromium resolves no other host, so the
check also proves the site renders offline. For each page it fails on:

* a console error, an uncaught exception, a failed request or an HTTP error status
  (a stylesheet, script or font the site does not ship, or one it loads from outside);
* TeX left on screen: ``\\(``, ``\\)``, ``\\[``, ``\\]``, ``$$`` or a TeX command such as
  ``\\sum`` in the page's text outside code blocks and KaTeX's hidden MathML;
* a formula without KaTeX's output, or a font that failed to load.

It saves a screenshot of the home page. Chromium is driven through the DevTools
protocol over a pipe (``--remote-debugging-pipe``), with the standard library only.
Without a Chromium binary it prints a loud notice and exits 0, or exits 1 with
``--require``.

Only the docs build uses this file; the package does not depend on it.
"""

from __future__ import annotations

import argparse
import base64
import functools
import json
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

_BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
_TIMEOUT = 30.0  # seconds for one page to load and settle
# Raw TeX a reader should never see: math delimiters, or a backslash command.
_RAW_TEX = re.compile(r"\\[()\[\]]|\$\$|\\(?:[A-Za-z]{2,})\b")

# Collects the page's text outside code and KaTeX's MathML copy, after the fonts settle.
_PAGE_REPORT_JS = """
(async () => {
  await document.fonts.ready;
  const skip = "pre, code, script, style, noscript, textarea, .katex-mathml, annotation";
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  const parts = [];
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    if (node.parentElement && !node.parentElement.closest(skip)) parts.push(node.data);
  }
  return {
    text: parts.join(" "),
    formulas: document.querySelectorAll(".arithmatex").length,
    rendered: document.querySelectorAll(".arithmatex > .katex, .arithmatex > .katex-display").length,
    failedFonts: [...document.fonts].filter((f) => f.status === "error").map((f) => f.family),
  };
})()
"""


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def _serve(site: Path) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=site))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


class _DevTools:
    """A minimal DevTools protocol client over Chromium's pipe (fd 3 in, fd 4 out)."""

    def __init__(self, binary: str, profile: Path, log: Any) -> None:
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        flags = [
            "--headless",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--mute-audio",
            # Offline: every host but the local server fails to resolve.
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            f"--user-data-dir={profile}",
            "--remote-debugging-pipe",
            "about:blank",
        ]
        if os.geteuid() == 0:
            flags.insert(0, "--no-sandbox")  # Chromium refuses to run its sandbox as root
        # The shell moves the pipe ends to the fds Chromium expects.
        script = f'exec "$0" "$@" 3<&{to_chrome_r} 4>&{from_chrome_w}'
        self._process = subprocess.Popen(
            ["sh", "-c", script, binary, *flags],
            pass_fds=(to_chrome_r, from_chrome_w),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

    def close(self) -> None:
        with suppress(OSError, RuntimeError, TimeoutError):
            self.send("Browser.close", timeout=5.0)
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        os.close(self._to_chrome)
        os.close(self._from_chrome)

    def _receive(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("Chromium did not answer in time")
            ready, _, _ = select.select([self._from_chrome], [], [], left)
            if ready:
                chunk = os.read(self._from_chrome, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"Chromium exited (status {self._process.poll()})")
                self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        decoded: dict[str, Any] = json.loads(message)
        return decoded

    def send(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        session: str | None = None,
        timeout: float = _TIMEOUT,
    ) -> dict[str, Any]:
        """Call ``method`` and return its result; events that arrive meanwhile are kept."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._receive(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                result: dict[str, Any] = reply.get("result", {})
                return result
            self.events.append(reply)

    def wait_for(self, method: str, loader: str, timeout: float = _TIMEOUT) -> None:
        """Wait for ``Page.lifecycleEvent`` named ``method`` of the navigation ``loader``."""
        deadline = time.monotonic() + timeout

        def seen() -> bool:
            return any(
                e.get("method") == "Page.lifecycleEvent"
                and e["params"].get("name") == method
                and e["params"].get("loaderId") == loader
                for e in self.events
            )

        while not seen():
            self.events.append(self._receive(deadline))


def _problems(events: list[dict[str, Any]]) -> list[str]:
    """Console errors, exceptions and failed requests among the DevTools events."""
    found: list[str] = []
    urls: dict[str, str] = {}
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Network.requestWillBeSent":
            urls[params["requestId"]] = params["request"]["url"]
        elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
            args = [str(a.get("value", a.get("description", ""))) for a in params["args"]]
            found.append(f"console.{params['type']}: {' '.join(args)}")
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            found.append(f"uncaught exception: {text}")
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            entry = params["entry"]
            found.append(
                f"console error ({entry['source']}): {entry['text']} {entry.get('url', '')}"
            )
        elif method == "Network.loadingFailed" and not params.get("canceled"):
            url = urls.get(params["requestId"], "?")
            found.append(f"request failed: {url}: {params['errorText']}")
        elif method == "Network.responseReceived" and params["response"]["status"] >= 400:
            response = params["response"]
            found.append(f"HTTP {response['status']}: {response['url']}")
    return list(dict.fromkeys(found))


def _check_page(
    tools: _DevTools, session: str, url: str, screenshot: Path | None
) -> tuple[list[str], int]:
    """Load ``url``; return its problems and its number of rendered formulas."""
    tools.events.clear()
    navigation = tools.send("Page.navigate", {"url": url}, session)
    if navigation.get("errorText"):
        return [f"navigation failed: {navigation['errorText']}"], 0
    tools.wait_for("load", navigation["loaderId"])
    tools.wait_for("networkIdle", navigation["loaderId"])
    evaluated = tools.send(
        "Runtime.evaluate",
        {"expression": _PAGE_REPORT_JS, "awaitPromise": True, "returnByValue": True},
        session,
    )
    if "exceptionDetails" in evaluated:
        return [f"page report failed: {evaluated['exceptionDetails']}"], 0
    report = evaluated["result"]["value"]
    problems = _problems(tools.events)
    for match in sorted({m.group(0) for m in _RAW_TEX.finditer(report["text"])}):
        start = report["text"].find(match)
        context = " ".join(report["text"][max(0, start - 40) : start + 40].split())
        problems.append(f"raw TeX on screen: {match!r} in ...{context}...")
    if report["rendered"] != report["formulas"]:
        problems.append(
            f"expected every formula rendered by KaTeX, got {report['rendered']} of "
            f"{report['formulas']}"
        )
    problems += [f"font failed to load: {family}" for family in report["failedFonts"]]
    if screenshot is not None:
        image = tools.send("Page.captureScreenshot", {"format": "png"}, session)
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        screenshot.write_bytes(base64.b64decode(image["data"]))
    return problems, report["rendered"]


def _pages(site: Path) -> list[str]:
    """Every HTML page of the site as a URL path, the home page first."""
    paths = sorted(p.relative_to(site).as_posix() for p in site.rglob("*.html"))
    urls = [p.removesuffix("index.html") for p in paths]
    return sorted(urls, key=lambda u: (u != "", u))


def _find_browser() -> str | None:
    for name in _BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Check every page of the site; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("site", type=Path, help="the built site (mkdocs build's output)")
    parser.add_argument("--screenshot", type=Path, help="where to save the home page's PNG")
    parser.add_argument(
        "--require", action="store_true", help="fail instead of skipping without Chromium"
    )
    args = parser.parse_args(argv)
    site: Path = args.site.resolve()
    if not (site / "index.html").is_file():
        print(f"browser check: expected a built site in {site}, got no index.html")
        return 1
    browser = _find_browser()
    if browser is None:
        banner = "#" * 78
        print(
            f"{banner}\n# SKIPPED: docs browser check: no Chromium found ({', '.join(_BROWSERS)})."
            "\n# Install Debian's `chromium` package to check the built site in a browser."
            f"\n{banner}"
        )
        return 1 if args.require else 0

    failures = 0
    formulas = 0
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp, _serve(site) as base:
        log_path = Path(tmp, "chromium.log")
        with log_path.open("wb") as log:
            tools = _DevTools(browser, Path(tmp, "profile"), log)
            try:
                target = tools.send("Target.createTarget", {"url": "about:blank"})
                session = tools.send(
                    "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
                )["sessionId"]
                for domain in ("Page", "Runtime", "Log", "Network"):
                    tools.send(f"{domain}.enable", {}, session)
                tools.send("Page.setLifecycleEventsEnabled", {"enabled": True}, session)
                tools.send(
                    "Emulation.setDeviceMetricsOverride",
                    {"width": 1280, "height": 1000, "deviceScaleFactor": 1, "mobile": False},
                    session,
                )
                pages = _pages(site)
                for page in pages:
                    shot = args.screenshot if page == "" and args.screenshot else None
                    problems, count = _check_page(tools, session, base + page, shot)
                    formulas += count
                    for problem in problems:
                        print(f"browser check: /{page}: {problem}")
                    failures += bool(problems)
            except (OSError, RuntimeError, TimeoutError) as exc:
                print(f"browser check: error driving {browser}: {exc}")
                print(log_path.read_text(errors="replace")[-3000:])
                return 1
            finally:
                tools.close()
    print(
        f"browser check: {len(pages) - failures} of {len(pages)} pages clean "
        f"({formulas} formulas rendered, offline, {time.monotonic() - started:.1f} s)"
        + (f"; home page screenshot: {args.screenshot}" if args.screenshot else "")
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
