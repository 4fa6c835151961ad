"""The documentation site as a reader sees it: built with ``mkdocs build --strict``, served
on localhost and opened in headless Chromium (Debian's ``chromium`` package), which
screenshots the home page, the tutorial and an API page and checks what is on them: the
main column does not overflow (wide tables scroll inside it), code is highlighted at build
time, the API headings have no empty boxes, search finds pages (also from file://), and
no request leaves the machine.

The browser is driven over the Chrome DevTools Protocol on a pipe
(``--remote-debugging-pipe``: JSON messages ending in NUL on file descriptors 3 and 4),
so the test needs nothing but the standard library and the browser. Without Chromium it
fails and says how to install it; it is never skipped (CI installs it, see ``.ci/run``).

``CKPTABLE_DOCS_SCREENSHOTS=/tmp/shots pytest tests/test_docs_browser.py`` keeps the
screenshots there (otherwise they go to a temporary directory); its ``docs-home.png`` is
the one shown in docs/index.md as docs/img/docs-home.png. ``CKPTABLE_CHROMIUM`` names
another Chromium executable.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import functools
import http.server
import json
import os
import shutil
import signal
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

ROOT = Path(__file__).resolve().parent.parent
WIDTH, HEIGHT = 1280, 800  # a laptop's viewport
INSTALL_HINT = (
    "the docs browser test needs Chromium: install Debian's package with "
    "`apt-get install -y chromium` (or set CKPTABLE_CHROMIUM to a Chromium executable)"
)

#: The flags this machine needs: without the background-networking ones Chromium tries
#: to reach Google's services at start. The resolver rule makes sure that nothing but
#: localhost can be reached even if a page asked for it (the test records and fails
#: every such request before it would be sent).
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--disable-dev-shm-usage",
    "--mute-audio",
    "--hide-scrollbars",
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE localhost , EXCLUDE 127.0.0.1",
    f"--window-size={WIDTH},{HEIGHT}",
    "--remote-debugging-pipe",
]


def chromium_executable() -> str:
    """The Chromium to drive; fails with how to install it when there is none."""
    explicit = os.environ.get("CKPTABLE_CHROMIUM")
    candidates = [explicit] if explicit else ["chromium", "chromium-browser", "google-chrome"]
    for name in candidates:
        found = shutil.which(name)
        if found:
            return found
    pytest.fail(INSTALL_HINT, pytrace=False)


# --- A small DevTools Protocol client over a pipe -----------------------------------------


class CDPError(RuntimeError):
    """A DevTools command answered with an error, or no answer came in time."""


class Browser:
    """Headless Chromium and one tab, driven over ``--remote-debugging-pipe``.

    Every request that any page or worker of the tab is about to send is recorded in
    ``requests`` (its URL), every HTTP answer's status in ``responses``, and everything
    logged to the console or thrown in ``console``.
    """

    def __init__(self, executable: str, profile: Path, log: Path) -> None:
        # Chromium reads commands on its fd 3 and writes answers on its fd 4. posix_spawn
        # puts the pipe's ends there (and is safe in a process with threads, unlike a
        # preexec_fn); the ends are first moved to fds >= 10 so that no dup2 below
        # overwrites another.
        def high(fd: int) -> int:
            moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
            os.close(fd)
            return moved

        commands_r, commands_w = map(high, os.pipe())
        answers_r, answers_w = map(high, os.pipe())
        self._to_browser, self._from_browser = commands_w, answers_r
        self._log = log.open("wb")
        null = high(os.open(os.devnull, os.O_RDONLY))
        log_fd = high(os.dup(self._log.fileno()))
        self.pid = os.posix_spawn(
            executable,
            [executable, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
            os.environ,
            file_actions=[
                (os.POSIX_SPAWN_DUP2, null, 0),
                (os.POSIX_SPAWN_DUP2, log_fd, 1),
                (os.POSIX_SPAWN_DUP2, log_fd, 2),
                (os.POSIX_SPAWN_DUP2, commands_r, 3),
                (os.POSIX_SPAWN_DUP2, answers_w, 4),
            ],
        )
        self.returncode: int | None = None
        for fd in (commands_r, answers_w, null, log_fd):
            os.close(fd)
        self._next_id = 0
        self._answers: dict[int, dict[str, Any]] = {}
        self._events: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._closed = False
        self.requests: list[str] = []
        self.responses: list[tuple[str, int]] = []
        self.console: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.version = self.send("Browser.getVersion", timeout=30)["product"]
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]
        self._instrument(self.session)
        self.send(
            "Emulation.setDeviceMetricsOverride",
            session=self.session,
            width=WIDTH,
            height=HEIGHT,
            deviceScaleFactor=1,
            mobile=False,
        )

    # The wire.

    def _read(self) -> None:
        buffer = b""
        while True:
            try:
                chunk = os.read(self._from_browser, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                with self._cond:
                    self._closed = True
                    self._cond.notify_all()
                return
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            for raw in messages:
                message = json.loads(raw)
                with self._cond:
                    if "id" in message:
                        self._answers[message["id"]] = message
                    else:
                        self._on_event(message)
                        self._events.append(message)
                    self._cond.notify_all()

    def send(
        self, method: str, session: str | None = None, timeout: float = 20, **params: Any
    ) -> Any:
        with self._cond:
            self._next_id += 1
            ident = self._next_id
        message: dict[str, Any] = {"id": ident, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        with self._cond:
            if not self._cond.wait_for(
                lambda: ident in self._answers or self._closed, timeout=timeout
            ):
                raise CDPError(f"{method}: no answer from Chromium in {timeout} s")
            if ident not in self._answers:
                raise CDPError(f"{method}: Chromium exited ({self.poll()})")
            answer = self._answers.pop(ident)
        if "error" in answer:
            raise CDPError(f"{method}: {answer['error']}")
        return answer.get("result", {})

    def _instrument(self, session: str) -> None:
        """Record the requests of ``session`` and of every worker it starts."""
        for domain in ("Network", "Runtime", "Page"):
            with contextlib.suppress(CDPError):  # a worker has no Page domain
                self.send(f"{domain}.enable", session=session)
        self.send(
            "Target.setAutoAttach",
            session=session,
            autoAttach=True,
            waitForDebuggerOnStart=True,
            flatten=True,
        )

    def _on_event(self, message: dict[str, Any]) -> None:
        """Called on the reader thread with the lock held: record, never block."""
        method, params = message.get("method"), message.get("params", {})
        if method == "Network.requestWillBeSent":
            self.requests.append(params["request"]["url"])
        elif method == "Network.responseReceived":
            self.responses.append((params["response"]["url"], params["response"]["status"]))
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "warning"):
            args = " ".join(str(a.get("value", a.get("description", ""))) for a in params["args"])
            self.console.append(f"console.{params['type']}: {args}")
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            self.console.append(f"exception: {text}")
        elif method == "Target.attachedToTarget":
            # A worker (the search index runs in one): record its requests too, then let
            # it run. Done on another thread: this one must go on reading answers.
            threading.Thread(
                target=self._instrument_worker, args=(params["sessionId"],), daemon=True
            ).start()

    def _instrument_worker(self, session: str) -> None:
        with contextlib.suppress(CDPError, OSError):
            self._instrument(session)
            self.send("Runtime.runIfWaitingForDebugger", session=session)

    def _wait_event(self, method: str, since: int, timeout: float) -> None:
        with self._cond:
            if not self._cond.wait_for(
                lambda: any(e.get("method") == method for e in self._events[since:]),
                timeout=timeout,
            ):
                raise CDPError(f"no {method} in {timeout} s")

    # What the test uses.

    def goto(self, url: str, timeout: float = 30) -> None:
        """Open ``url`` and wait until it has loaded, its fonts are ready and the
        theme's script has run."""
        with self._cond:
            since = len(self._events)
        answer = self.send("Page.navigate", session=self.session, url=url)
        if answer.get("errorText"):
            raise CDPError(f"{url}: {answer['errorText']}")
        self._wait_event("Page.loadEventFired", since, timeout)
        self.eval("document.fonts.ready.then(() => true)")
        self.wait_for("window.document$ !== undefined", timeout=10)

    def eval(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.send(
            "Runtime.evaluate",
            session=self.session,
            expression=expression,
            awaitPromise=True,
            returnByValue=True,
        )
        if "exceptionDetails" in result:
            raise CDPError(f"{expression[:80]}…: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 10) -> Any:
        """Poll a JavaScript expression until it is truthy; return its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.eval(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise CDPError(f"still false after {timeout} s: {expression}")
            time.sleep(0.1)

    def screenshot(self, path: Path, clip: dict[str, float] | None = None) -> bytes:
        params: dict[str, Any] = {"format": "png"}
        if clip:
            params["clip"] = {**clip, "scale": 1}
        data = base64.b64decode(
            self.send("Page.captureScreenshot", session=self.session, **params)["data"]
        )
        path.write_bytes(data)
        return data

    def poll(self) -> int | None:
        """Chromium's exit status, or None while it runs."""
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def close(self) -> None:
        with contextlib.suppress(CDPError, OSError):
            self.send("Browser.close", timeout=5)
        deadline = time.monotonic() + 10
        while self.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.poll() is None:
            os.kill(self.pid, signal.SIGKILL)  # the browser this test started, by its pid
            os.waitpid(self.pid, 0)
        for fd in (self._to_browser, self._from_browser):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._log.close()


# --- Screenshots: a PNG decoder small enough to keep here ---------------------------------


def png_pixels(data: bytes) -> tuple[int, int, list[bytes]]:
    """The width, height and rows of RGB pixels of an 8-bit, non-interlaced PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, b"", b""
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos : pos + 4]), data[pos + 4 : pos + 8]
        chunk = data[pos + 8 : pos + 8 + length]
        header = chunk if kind == b"IHDR" else header
        idat += chunk if kind == b"IDAT" else b""
        pos += 12 + length
    width, height, depth, colour_type, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert depth == 8 and colour_type in (2, 6) and interlace == 0, header
    bpp = 3 if colour_type == 2 else 4
    raw, stride = zlib.decompress(idat), width * bpp
    rows, previous = [], bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        for x in range(stride) if kind else ():  # filter 0 (none) leaves the bytes as they are
            left = line[x - bpp] if x >= bpp else 0
            up, up_left = previous[x], (previous[x - bpp] if x >= bpp else 0)
            if kind == 1:
                line[x] = (line[x] + left) & 0xFF
            elif kind == 2:
                line[x] = (line[x] + up) & 0xFF
            elif kind == 3:
                line[x] = (line[x] + ((left + up) >> 1)) & 0xFF
            else:  # 4, Paeth
                guess = left + up - up_left
                near = min((abs(guess - v), i) for i, v in enumerate((left, up, up_left)))[1]
                line[x] = (line[x] + (left, up, up_left)[near]) & 0xFF
        previous = line
        rows.append(bytes(line) if bpp == 3 else bytes(b for i, b in enumerate(line) if i % 4 != 3))
    return width, height, rows


def colours(rows: list[bytes]) -> set[bytes]:
    """The distinct RGB colours in the rows."""
    return {row[i : i + 3] for row in rows for i in range(0, len(row), 3)}


# --- The site, served -------------------------------------------------------------------


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def base_url(site: Path) -> Iterator[str]:
    """The site served by http.server on 127.0.0.1, in a thread."""
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    executable = chromium_executable()
    work = tmp_path_factory.mktemp("chromium")
    try:
        chrome = Browser(executable, work / "profile", work / "chromium.log")
    except (CDPError, OSError) as error:
        log = (work / "chromium.log").read_text(errors="replace")[-3000:]
        pytest.fail(f"{executable} did not start ({error}); {INSTALL_HINT}\n{log}", pytrace=False)
    try:
        yield chrome
    finally:
        chrome.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the screenshots go: $CKPTABLE_DOCS_SCREENSHOTS, or a temporary directory."""
    kept = os.environ.get("CKPTABLE_DOCS_SCREENSHOTS")
    if kept:
        path = Path(kept) if Path(kept).is_absolute() else ROOT / kept
        path.mkdir(parents=True, exist_ok=True)
        return path
    return tmp_path_factory.mktemp("screenshots")


# --- What is checked on every page ----------------------------------------------------------

#: Elements of the article that stick out of the main column and are not inside a box
#: of the column that scrolls or clips them (a table's wrapper, a code block).
OVERFLOWING = """(() => {
  const column = document.querySelector('.md-content').getBoundingClientRect();
  const clipped = (el) => {
    for (let p = el.parentElement; p && p !== document.body; p = p.parentElement) {
      const overflow = getComputedStyle(p).overflowX;
      const right = p.getBoundingClientRect().right;
      if (overflow !== 'visible' && right <= column.right + 1) return true;
    }
    return false;
  };
  const out = [];
  for (const el of document.querySelectorAll('.md-content article *')) {
    const box = el.getBoundingClientRect();
    if (box.width && box.right > column.right + 1 && !clipped(el))
      out.push(`${el.tagName.toLowerCase()}.${el.className} right=${Math.round(box.right)}`);
  }
  return {column: [column.left, column.right], out: out.slice(0, 10),
          scrollWidth: document.scrollingElement.scrollWidth, innerWidth: window.innerWidth};
})()"""

#: Wide tables: each one inside a wrapper that scrolls sideways, within the column.
TABLES = """(() => {
  const column = document.querySelector('.md-content').getBoundingClientRect();
  return [...document.querySelectorAll('.md-content article table')].map((t) => {
    const wrap = t.closest('.md-typeset__scrollwrap');
    const overflow = wrap ? getComputedStyle(wrap).overflowX : 'none';
    const right = (wrap || t).getBoundingClientRect().right;
    return {wrapped: !!wrap, overflow, inside: right <= column.right + 1,
            wide: t.scrollWidth > (wrap ? wrap.clientWidth : t.clientWidth) + 1};
  });
})()"""

#: Code blocks: how many there are, how many carry pygments' token spans, and in how many
#: colours the tokens are drawn.
HIGHLIGHTING = """(() => {
  const all = [...document.querySelectorAll('.md-content article pre > code')];
  const language = (b) => {
    const box = b.closest('.highlight');
    const name = box && [...box.classList].find((c) => c.startsWith('language-'));
    return name ? name.slice('language-'.length) : '';
  };
  // Plain text (a program's output, a file tree) has nothing to highlight.
  const blocks = all.filter((b) => !['', 'text', 'txt', 'plain'].includes(language(b)));
  const highlighted = blocks.filter((b) => b.querySelector('span[class]:not(.linenos)'));
  const spans = highlighted.flatMap((b) => [...b.querySelectorAll('span[class]')]);
  const tokenColours = new Set(spans.map((s) => getComputedStyle(s).color));
  return {all: all.length, byPygments: all.filter((b) => b.closest('.highlight')).length,
          blocks: blocks.length, highlighted: highlighted.length,
          tokenColours: tokenColours.size,
          firstBlock: highlighted.length ? (() => {
            const r = highlighted[0].getBoundingClientRect();
            return {x: r.left, y: r.top + window.scrollY,
                    width: r.width, height: Math.min(r.height, 300)};
          })() : null,
          highlightJs: !!(window.hljs || document.querySelector('script[src*="highlight"]'))};
})()"""

#: Boxes in API headings: an element that draws a box (a background or border) but shows
#: nothing in it, neither text nor an icon nor CSS-generated content.
EMPTY_BOXES = """(() => {
  const shows = (el) => {
    if (el.textContent.trim() || el.querySelector('svg, img')) return true;
    for (const pseudo of ['::before', '::after']) {
      const style = getComputedStyle(el, pseudo);
      const content = style.content;
      if (content && content !== 'none' && content !== 'normal' && content !== '""') return true;
      if (style.maskImage && style.maskImage !== 'none') return true;
      if (style.webkitMaskImage && style.webkitMaskImage !== 'none') return true;
    }
    return false;
  };
  const headings = [...document.querySelectorAll('.doc-heading')];
  const empty = [];
  for (const h of headings) {
    for (const el of [h, ...h.querySelectorAll('*')]) {
      const style = getComputedStyle(el);
      const box = el.getBoundingClientRect();
      const drawn = style.backgroundColor !== 'rgba(0, 0, 0, 0)' ||
                    parseFloat(style.borderTopWidth) > 0;
      if (drawn && box.width > 0 && !shows(el)) empty.push(el.outerHTML.slice(0, 120));
    }
  }
  return {headings: headings.length, empty: empty.slice(0, 10)};
})()"""


def off_host(urls: list[str]) -> list[str]:
    """The URLs that are not on this machine (nor data:, blob: or the page itself)."""
    local = {"127.0.0.1", "localhost", "[::1]"}
    return [
        url
        for url in urls
        if not (
            urlsplit(url).scheme in ("data", "blob", "about", "file", "chrome-error")
            or (urlsplit(url).scheme in ("http", "https", "ws") and urlsplit(url).hostname in local)
        )
    ]


def check_page(browser: Browser, url: str, shot: Path) -> dict[str, Any]:
    """Open ``url``, screenshot it into ``shot``, and check what every page must be."""
    browser.goto(url)
    overflow = browser.eval(OVERFLOWING)
    assert overflow["scrollWidth"] <= overflow["innerWidth"], (
        f"{url}: the page scrolls sideways ({overflow})"
    )
    assert overflow["out"] == [], f"{url}: content sticks out of the main column: {overflow}"
    for table in browser.eval(TABLES):
        assert table["wrapped"] and table["inside"], f"{url}: a table overflows the column: {table}"
        assert table["overflow"] in ("auto", "scroll"), f"{url}: a table cannot scroll: {table}"
    data = browser.screenshot(shot)
    width, height, rows = png_pixels(data)
    assert (width, height) == (WIDTH, HEIGHT)
    assert len(colours(rows[::8])) > 20, f"{shot} looks blank"
    return {"highlighting": browser.eval(HIGHLIGHTING)}


def assert_highlighted(url: str, highlighting: dict[str, Any], minimum: int) -> None:
    assert not highlighting["highlightJs"], f"{url}: highlight.js is still loaded"
    assert highlighting["blocks"] >= minimum, f"{url}: {highlighting}"
    assert highlighting["byPygments"] == highlighting["all"], (
        f"{url}: code blocks not rendered by pygments: {highlighting}"
    )
    assert highlighting["highlighted"] == highlighting["blocks"], (
        f"{url}: code blocks without pygments' highlighting: {highlighting}"
    )
    # Keywords, names, strings and numbers are drawn in colours of their own.
    assert highlighting["tokenColours"] >= 4, f"{url}: code is drawn in one colour: {highlighting}"


# --- The tests ----------------------------------------------------------------------------


def test_home_page_reads_well(browser: Browser, base_url: str, shots: Path) -> None:
    url = base_url + "index.html"
    result = check_page(browser, url, shots / "docs-home.png")
    assert_highlighted(url, result["highlighting"], minimum=1)
    assert browser.eval("document.title").startswith("ckptable")
    assert browser.eval("document.querySelectorAll('.md-nav__link').length") > 20


def test_tutorial_has_highlighted_code(browser: Browser, base_url: str, shots: Path) -> None:
    url = base_url + "tutorial.html"
    result = check_page(browser, url, shots / "docs-tutorial.png")
    highlighting = result["highlighting"]
    assert_highlighted(url, highlighting, minimum=8)
    # And the colours are on the screen: a code block shows several of them.
    block = highlighting["firstBlock"]
    browser.eval(f"window.scrollTo(0, {max(0, block['y'] - 100)})")
    data = browser.screenshot(shots / "docs-tutorial-code.png", clip=block)  # page coordinates
    assert len(colours(png_pixels(data)[2])) > 8, "the tutorial's first code block is monochrome"


def test_api_page_has_no_empty_heading_boxes(browser: Browser, base_url: str, shots: Path) -> None:
    url = base_url + "reference/checkpointable.html"
    result = check_page(browser, url, shots / "docs-api.png")
    boxes = browser.eval(EMPTY_BOXES)
    assert boxes["headings"] >= 10, f"{url}: {boxes}"
    assert boxes["empty"] == [], f"{url}: API headings with empty boxes: {boxes}"
    assert_highlighted(url, result["highlighting"], minimum=1)


def test_search_works_offline(browser: Browser, base_url: str, site: Path) -> None:
    index = json.loads((site / "search" / "search_index.json").read_text())
    assert len(index["docs"]) > 50
    assert (site / "search" / "search_index.js").exists()  # for pages opened from file://
    for url in (base_url + "index.html", (site / "index.html").as_uri()):
        browser.goto(url)
        browser.eval(
            """(() => {
              const input = document.querySelector('[data-md-component=search-query]');
              input.focus();
              input.value = 'from_checkpoint';
              input.dispatchEvent(new Event('focus'));
              input.dispatchEvent(new Event('input', {bubbles: true}));
              input.dispatchEvent(new KeyboardEvent('keyup', {bubbles: true}));
              return true;
            })()"""
        )
        found = browser.wait_for(
            "document.querySelectorAll('.md-search-result__item').length", timeout=20
        )
        assert found > 0, url


def test_no_request_leaves_the_machine(browser: Browser, base_url: str) -> None:
    """Run last: every page and worker opened above only asked for local files."""
    for page in ("index.html", "tutorial.html", "reference/checkpointable.html"):
        browser.goto(base_url + page)
    time.sleep(0.5)
    assert browser.requests, "no request was recorded at all"
    assert off_host(browser.requests) == [], (
        f"requests to other hosts: {off_host(browser.requests)}"
    )
    failed = [(url, status) for url, status in browser.responses if status >= 400]
    assert failed == [], f"missing files: {failed}"
    assert [line for line in browser.console if "exception" in line] == [], browser.console
