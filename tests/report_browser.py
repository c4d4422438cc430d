"""Open a report in headless Chromium (Debian's package, driven by Playwright) and read what it shows.

Every request the page makes is recorded; anything but ``file://`` is aborted and reported, so a test can
assert that the page fetched nothing from a network.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@contextlib.contextmanager
def chromium():
    """A headless Chromium browser, closed on exit (never a browser Playwright downloaded)."""
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        raise RuntimeError(f"{CHROMIUM} is missing: apt-get install chromium (make install does)")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class Opened:
    """A page and every request it made."""

    page: object
    requests: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)


@contextlib.contextmanager
def open_page(browser, url: str, *, allow_network: bool = False, viewport=(1400, 1000)):
    """Open ``url`` in a fresh context; without ``allow_network`` only file:// (and data:) requests pass."""
    context = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]})
    page = context.new_page()
    opened = Opened(page)

    def route(route):
        request_url = route.request.url
        if allow_network or request_url.startswith(("file://", "data:")):
            route.continue_()
        else:
            opened.blocked.append(request_url)
            route.abort()

    context.route("**/*", route)
    page.on("request", lambda request: opened.requests.append(request.url))
    page.on("console", lambda msg: opened.console_errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: opened.console_errors.append(str(exc)))
    try:
        page.goto(url, wait_until="load")
        yield opened
    finally:
        context.close()


CARDS_JS = """() => Array.from(document.querySelectorAll('#gallery .card'), c => ({
  pos: Number(c.dataset.pos), status: c.dataset.status, error: c.dataset.error, visible: !c.hidden &&
  c.offsetParent !== null, text: c.innerText,
  inputs: c.querySelectorAll('.inputs img').length, outputs: c.querySelectorAll('.outputs img').length,
  missing: c.querySelectorAll('.noimg').length, answer: (c.querySelector('.answer .output') || {}).textContent
    || null}))"""

IMAGES_JS = """() => Array.from(document.images, i => ({src: i.src, complete: i.complete,
  width: i.naturalWidth,
  href: i.closest('a') ? i.closest('a').href : null}))"""


def cards(page) -> list[dict]:
    """The gallery's cards as the page shows them now."""
    return page.evaluate(CARDS_JS)


def images(page) -> list[dict]:
    """Every <img> with whether it loaded; waits until none is still loading."""
    page.wait_for_function("() => Array.from(document.images).every(i => i.complete)", timeout=30_000)
    return page.evaluate(IMAGES_JS)


def visible_positions(page) -> list[int]:
    """Positions of the cards shown now."""
    return [c["pos"] for c in cards(page) if c["visible"]]


def click_filter(page, name: str) -> None:
    """Press the toolbar chip for ``all``, ``ok``, ``failed`` or ``error:TYPE``."""
    page.locator(f'nav.toolbar [data-filter="{name}"]').click()


def search(page, text: str) -> None:
    """Type into the search box (replacing what is there)."""
    page.fill("#search", text)
