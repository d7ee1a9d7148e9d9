"""Browser fixtures: Debian's Chromium driven by Playwright, headless, with a fresh profile.

Playwright's own browser downloads are never used (`playwright install` fetches from the
internet); the tests run the system's /usr/bin/chromium, which CI installs with apt."""

from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
# No network of its own (updates, sync, safe browsing): the browser talks to 127.0.0.1 only.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
VIEWPORT = {"width": 1280, "height": 860}


@pytest.fixture(scope="session")
def ui_base_url(api_server) -> str:
    return api_server.url


@pytest.fixture(scope="session")
def browser_context(tmp_path_factory):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium (CI installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport=VIEWPORT,
        )
        try:
            yield context
        finally:
            context.close()


class Browser:
    """One tab, its JavaScript errors, and screenshots saved as the test's artefacts."""

    def __init__(self, context, base_url: str, out: Path):
        context.clear_cookies()
        self.page = context.new_page()
        self.page.set_default_timeout(20_000)
        self.base_url = base_url.rstrip("/")
        self.out = out
        self.errors: list[str] = []
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))

    def open(self, hash_route: str) -> None:
        self.page.goto(f"{self.base_url}/{hash_route}")

    def shot(self, name: str, *, full_page: bool = False) -> Path:
        path = self.out / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=full_page)
        return path

    def data(self, selector: str, key: str) -> list[str]:
        """The data-<key> attribute of every element matching `selector`, in page order."""
        return self.page.eval_on_selector_all(
            selector, "(els, key) => els.map((e) => e.dataset[key])", key
        )

    def thumbnails_loaded(self, selector: str) -> int:
        """Wait until every image matching `selector` has really decoded (naturalWidth > 0);
        returns how many there are. A broken thumbnail makes this time out."""
        self.page.wait_for_function(
            """(sel) => {
                const imgs = [...document.querySelectorAll(sel)];
                return imgs.length > 0 && imgs.every((img) => img.complete && img.naturalWidth > 0);
            }""",
            arg=selector,
            # Cold thumbnails are made on first request; a loaded shared machine is slow at it.
            timeout=60_000,
        )
        return self.page.locator(selector).count()


@pytest.fixture
def browser(browser_context, ui_base_url, tmp_path) -> Iterator[Browser]:
    tab = Browser(browser_context, ui_base_url, tmp_path)
    try:
        yield tab
    finally:
        print(f"screenshots: {tmp_path}")
        tab.page.close()
    assert not tab.errors, f"JavaScript errors in the page: {tab.errors}"
