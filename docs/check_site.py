"""Open every page of a built Sphinx site in headless Chromium and fail on what a reader would see broken.

    python docs/check_site.py docs/_build/html [--chromium /usr/bin/chromium] [--width 1280]

Checks, per page, after it has loaded (scripts run, MathJax included):

- every ``<img>`` loads: its file exists and it decodes to a picture wider than 0 pixels;
- every internal link (``href`` to a file of the site, with or without ``#anchor``) points to a file that exists,
  and its anchor is an ``id`` (or ``<a name>``) on the page it points to;
- the page is not wider than the window: ``document.documentElement.scrollWidth <= --width`` at a window of
  ``--width`` pixels;
- the page requests nothing from the network: no request other than ``file:``, ``data:``, ``blob:`` or ``about:``
  while it loads (they are blocked, and listed), and no network URL in the ``src``/``href`` of a script, stylesheet,
  image, frame or media element of its markup.

One Chromium runs for the whole site and is driven over the DevTools protocol on a pipe
(``--remote-debugging-pipe``: JSON messages separated by NUL bytes on file descriptors 3 and 4), so nothing
but the standard library is needed. Prints one line per problem and a one-line summary; exit status 1 when
there is a problem, 2 when the site or Chromium cannot be used.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import unquote, urldefrag, urlparse

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--disable-extensions", "--mute-audio", "--hide-scrollbars"]
#: Folders of a Sphinx build that hold assets, not pages.
ASSET_DIRS = {"_static", "_sources", "_images", "_downloads", "_sphinx_design_static", ".doctrees"}
LOCAL_SCHEMES = {"file", "data", "blob", "about", "chrome", "chrome-extension", "devtools"}

# Runs in the page once it has loaded: images (decoded again, so a lazy one is loaded too), links, anchors, width.
PAGE_SCRIPT = r"""
(async () => {
  const images = [];
  for (const img of Array.from(document.images)) {
    const src = img.currentSrc || img.src;
    let ok = false, width = 0;
    if (src) {
      const probe = new Image();
      probe.src = src;
      try { await probe.decode(); ok = true; width = probe.naturalWidth; } catch (e) { ok = false; }
    }
    images.push({src: src, ok: ok, width: width});
  }
  const links = Array.from(document.querySelectorAll("a[href]")).map(a => a.href);
  const ids = Array.from(document.querySelectorAll("[id]")).map(e => e.id)
    .concat(Array.from(document.querySelectorAll("a[name]")).map(e => e.name));
  return {images: images, links: links, ids: ids,
          scrollWidth: document.documentElement.scrollWidth, innerWidth: window.innerWidth};
})()
"""


class Chromium:
    """A headless Chromium driven over ``--remote-debugging-pipe``."""

    def __init__(self, executable: str, width: int, height: int = 900) -> None:
        self.profile = tempfile.mkdtemp(prefix="check_site_")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def child_fds() -> None:  # the protocol's descriptors: 3 = commands in, 4 = replies out
            high_r = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD, 10)  # out of the way of 3 and 4 first
            high_w = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD, 10)
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)

        self.proc = subprocess.Popen(
            [executable, *FLAGS, "--remote-debugging-pipe", f"--user-data-dir={self.profile}",
             f"--window-size={width},{height}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=child_fds, pass_fds=(3, 4),  # kept open after preexec_fn, every other descriptor closed
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Emulation.setDeviceMetricsOverride", session=True, width=width, height=height,
                  deviceScaleFactor=1, mobile=False)
        self.call("Page.enable", session=True)
        self.call("Network.enable", session=True)
        self.call("Network.setBlockedURLs", session=True, urls=["http://*", "https://*", "ws://*", "wss://*", "ftp://*"])

    def _read_message(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while b"\0" not in self._buffer:
            if time.monotonic() > deadline:
                raise TimeoutError("Chromium did not answer")
            ready, _, _ = select.select([self._from_browser], [], [], max(0.0, deadline - time.monotonic()))
            if ready:
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    raise RuntimeError("Chromium closed the DevTools pipe (did it start?)")
                self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, *, session: bool = False, timeout: float = 30.0, **params) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read_message(timeout)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error'].get('message')}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def wait_for(self, method: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            for i, event in enumerate(self.events):
                if event["method"] == method:
                    del self.events[i]  # the other events stay for the caller (the page's requests)
                    return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                reply = self._read_message(remaining)
            except TimeoutError:
                return False
            if "method" in reply:
                self.events.append(reply)

    def close(self) -> None:
        try:
            os.write(self._to_browser, json.dumps({"id": 0, "method": "Browser.close"}).encode() + b"\0")
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        for fd in (self._to_browser, self._from_browser):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.profile, ignore_errors=True)


def pages_of(site: Path) -> list[Path]:
    """The HTML pages of a built site, asset folders left out."""
    return sorted(p for p in site.rglob("*.html") if not ASSET_DIRS & set(p.relative_to(site).parts[:-1]))


def visit(browser: Chromium, page: Path, timeout: float) -> tuple[dict, list[str]]:
    """Load one page; return what PAGE_SCRIPT measured and the URLs it requested from the network."""
    browser.events.clear()
    browser.call("Page.navigate", session=True, url=page.as_uri())
    if not browser.wait_for("Page.loadEventFired", timeout):
        raise TimeoutError(f"{page}: did not finish loading in {timeout:g} s")
    # let scripts that run after the load (MathJax typesetting, the theme's) start their requests and layout
    browser.call("Runtime.evaluate", session=True, expression="new Promise(r => setTimeout(r, 150))",
                 awaitPromise=True)
    result = browser.call("Runtime.evaluate", session=True, expression=PAGE_SCRIPT, awaitPromise=True,
                          returnByValue=True, timeout=int(timeout * 1000))
    if "exceptionDetails" in result:
        raise RuntimeError(f"{page}: the check script failed: {result['exceptionDetails'].get('text')}")
    network = []
    for event in browser.events:
        if event["method"] == "Network.requestWillBeSent":
            url = event["params"]["request"]["url"]
            if urlparse(url).scheme not in LOCAL_SCHEMES:
                network.append(url)
    browser.events.clear()
    return result["result"]["value"], network


def check_site(site: Path, *, chromium: str = CHROMIUM, width: int = 1280, timeout: float = 30.0,
               out=sys.stdout) -> int:
    """Check every page of ``site``; print the problems and a summary; return the number of problems."""
    site = site.resolve()
    pages = pages_of(site)
    if not pages:
        raise FileNotFoundError(f"{site}: no HTML pages (build the site first: make docs)")
    start = time.monotonic()
    browser = Chromium(chromium, width)
    problems: list[str] = []
    measured: dict[Path, dict] = {}
    links: list[tuple[Path, str]] = []
    try:
        for page in pages:
            rel = page.relative_to(site)
            info, network = visit(browser, page, timeout)
            measured[page] = info
            for url in sorted(set(network) | set(_static_requests(page))):
                problems.append(f"{rel}: requests the network: {url}")
            for img in info["images"]:
                if not img["ok"] or img["width"] == 0:
                    src = img["src"]
                    why = "file absent" if src.startswith("file:") and not Path(unquote(urlparse(src).path)).exists() \
                        else "does not decode" if not img["ok"] else "naturalWidth 0"
                    problems.append(f"{rel}: image {_short(src, site)} does not load ({why})")
            if info["scrollWidth"] > width:
                problems.append(f"{rel}: wider than the window ({info['scrollWidth']} px > {width} px)")
            links += [(page, href) for href in info["links"]]
    finally:
        browser.close()
    ids = {page: set(info["ids"]) for page, info in measured.items()}
    seen = set()
    for page, href in links:
        parsed = urlparse(href)
        if parsed.scheme != "file" or (page, href) in seen:
            continue  # http(s) and mailto links are the reader's to follow; fetching them is not a page's load
        seen.add((page, href))
        url, fragment = urldefrag(href)
        target = Path(unquote(urlparse(url).path))
        rel = page.relative_to(site)
        if not target.exists():
            problems.append(f"{rel}: broken link to {_short(href, site)} (no such file)")
        elif fragment and target.suffix == ".html":
            anchors = ids.get(target)
            if anchors is None:
                anchors = set(_static_ids(target))
            if unquote(fragment) not in anchors:
                problems.append(f"{rel}: broken link to {_short(href, site)} (no anchor #{unquote(fragment)})")
    for line in problems:
        print(line, file=out)
    seconds = time.monotonic() - start
    verdict = "FAILED" if problems else "ok"
    print(f"check_site: {verdict}: {len(pages)} pages, {sum(len(m['images']) for m in measured.values())} images, "
          f"{len(seen)} internal links, {len(problems)} problem{'' if len(problems) == 1 else 's'} ({seconds:.1f} s)", file=out)
    return len(problems)


def _short(url: str, site: Path) -> str:
    path = unquote(urlparse(url).path)
    frag = urldefrag(url)[1]
    try:
        path = str(Path(path).relative_to(site))
    except ValueError:
        pass
    return path + (f"#{frag}" if frag else "")


def _static_requests(page: Path) -> list[str]:
    """Network URLs that a page's markup loads (script, stylesheet, image, frame, media), found in its source: also
    those the browser would fetch only later (a lazy image below the fold, a preload)."""
    text = page.read_text(errors="replace")
    return re.findall(r'<(?:script|link|img|iframe|source|video|audio|embed|object)\b[^>]*?\b(?:src|href|data)='
                      r'["\']((?:https?:)?//[^"\']+)', text, re.I)


def _static_ids(page: Path) -> list[str]:
    """Anchors of a page the browser did not visit (an asset folder's HTML), read from its source."""
    text = page.read_text(errors="replace")
    return re.findall(r'\bid="([^"]+)"', text) + re.findall(r'<a[^>]*\bname="([^"]+)"', text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("site", type=Path, help="the built site, e.g. docs/_build/html")
    parser.add_argument("--chromium", default=os.environ.get("CHROMIUM", CHROMIUM), help="the Chromium executable")
    parser.add_argument("--width", type=int, default=1280, help="window width in pixels (default 1280)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds a page may take to load")
    args = parser.parse_args(argv)
    if not args.site.is_dir():
        print(f"check_site: {args.site} is not a folder; build the site first (make docs).", file=sys.stderr)
        return 2
    if not (shutil.which(args.chromium) or Path(args.chromium).exists()):
        print(f"check_site: no Chromium at {args.chromium}; install it (apt-get install chromium) or pass --chromium.",
              file=sys.stderr)
        return 2
    try:
        return 1 if check_site(args.site, chromium=args.chromium, width=args.width, timeout=args.timeout) else 0
    except (OSError, RuntimeError, TimeoutError) as e:
        print(f"check_site: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
