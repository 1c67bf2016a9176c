"""A real headless Chromium (Debian's `chromium` + `chromium-driver`) driven by selenium,
for the dashboard's browser tests and bench/dashboard.py.

    with Browser() as b:
        b.open(f"{base}/")
        b.wait_js("return document.documentElement.dataset.tableReady")
        b.screenshot("devices")        # -> $EDGERUN_ARTIFACTS or .artifacts/dashboard/
        assert not b.console_errors()  # CSP violations and script errors land here

One window of a fixed size, so screenshots and the virtual list's row counts are the
same on every machine. The browser's console log is read through chromedriver's
`goog:loggingPrefs` (every level), so a refused inline script or style shows up.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

try:  # selenium is in the `test` extra; without it the browser tests say so
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webelement import WebElement
except ImportError:  # pragma: no cover - exercised only on a machine without the extra
    webdriver = None  # type: ignore[assignment]

WINDOW = (1400, 900)
REPO = Path(__file__).resolve().parents[3]
CHROMIUM = ("chromium", "chromium-browser", "/usr/bin/chromium")
DRIVER = ("chromedriver", "/usr/bin/chromedriver")


def _which(names: tuple[str, ...]) -> str | None:
    for name in names:
        found = shutil.which(name) or (name if os.path.isfile(name) else None)
        if found:
            return found
    return None


def artifacts_dir() -> Path:
    """Where screenshots go: $EDGERUN_ARTIFACTS/dashboard, else .artifacts/dashboard/."""
    root = os.environ.get("EDGERUN_ARTIFACTS")
    path = Path(root) / "dashboard" if root else REPO / ".artifacts" / "dashboard"
    path.mkdir(parents=True, exist_ok=True)
    return path


def missing() -> str | None:
    """Why no browser can run here (None when one can)."""
    if webdriver is None:
        return "selenium is not installed (pip install -e '.[test]')"
    if _which(CHROMIUM) is None:
        return "chromium is not installed (make deps-system installs it)"
    if _which(DRIVER) is None:
        return "chromedriver is not installed (make deps-system installs chromium-driver)"
    return None


class Browser:
    def __init__(self, *, window: tuple[int, int] = WINDOW) -> None:
        why = missing()
        if why:
            raise RuntimeError(why)
        options = webdriver.ChromeOptions()
        options.binary_location = str(_which(CHROMIUM))
        for arg in (
            "--headless=new",
            f"--window-size={window[0]},{window[1]}",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
        ):
            options.add_argument(arg)
        if os.geteuid() == 0:
            options.add_argument("--no-sandbox")  # Chromium refuses to run as root otherwise
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.driver = webdriver.Chrome(options=options, service=Service(str(_which(DRIVER))))
        self.driver.set_page_load_timeout(30)
        self._logs: list[dict[str, Any]] = []

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.driver.quit()

    # ------------------------------------------------------------------ driving

    def open(self, url: str) -> None:
        self.driver.get(url)

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)  # type: ignore[no-untyped-call]

    def wait(self, predicate: Callable[[], Any], timeout: float = 15.0, what: str = "") -> Any:
        """Poll `predicate` until it returns something truthy; its value, or AssertionError
        naming `what` (and the browser's console) after `timeout`."""
        deadline = time.monotonic() + timeout
        last_exc: Exception | None = None
        while True:
            try:
                value = predicate()
                if value:
                    return value
            except Exception as exc:  # a stale element mid-redraw: try again
                last_exc = exc
            if time.monotonic() > deadline:
                logs = "; ".join(e.get("message", "") for e in self.logs()[-5:])
                raise AssertionError(
                    f"timed out after {timeout} s waiting for {what or predicate!r}"
                    f" (last error: {last_exc!r}; browser log: {logs or 'empty'})"
                )
            time.sleep(0.05)

    def wait_js(self, script: str, timeout: float = 15.0, *args: Any) -> Any:
        return self.wait(lambda: self.js(script, *args), timeout, what=script)

    # Pages redraw their rows (live updates, ages ticking): an element found a moment
    # ago may be gone. These read and act in one script, on what is there now.

    def text(self, css: str) -> str | None:
        """The text of the first match (as rendered: innerText), None when nothing matches."""
        return self.js(  # type: ignore[no-any-return]
            "const e = document.querySelector(arguments[0]); return e ? e.innerText : null", css
        )

    def attr(self, css: str, name: str) -> str | None:
        return self.js(  # type: ignore[no-any-return]
            "const e = document.querySelector(arguments[0]);"
            "return e ? e.getAttribute(arguments[1]) : null",
            css,
            name,
        )

    def enabled(self, css: str) -> bool:
        return bool(
            self.js(
                "const e = document.querySelector(arguments[0]); return !!e && !e.disabled", css
            )
        )

    def click(self, css: str) -> None:
        if not self.js(
            "const e = document.querySelector(arguments[0]); if (e) e.click(); return !!e", css
        ):
            raise AssertionError(f"nothing to click at {css}")

    def find(self, css: str) -> WebElement:
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def find_all(self, css: str) -> list[WebElement]:
        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def screenshot(self, name: str) -> Path:
        path = artifacts_dir() / f"{name}.png"
        self.driver.save_screenshot(str(path))
        return path

    # ------------------------------------------------------------------ the console log

    def logs(self) -> list[dict[str, Any]]:
        """Every browser console entry so far (chromedriver hands each out once)."""
        self._logs.extend(self.driver.get_log("browser"))  # type: ignore[no-untyped-call]
        return list(self._logs)

    def console_errors(self) -> list[str]:
        """SEVERE entries: script errors, CSP refusals, failed loads. An EventSource that
        the test's server closed at teardown is not one (it reconnects by design)."""
        return [
            str(e.get("message", ""))
            for e in self.logs()
            if e.get("level") == "SEVERE" and "/api/live" not in str(e.get("message", ""))
        ]

    def clear_logs(self) -> None:
        self.logs()
        self._logs.clear()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    why = missing()
    if why:
        pytest.fail(f"the dashboard's browser tests need a browser: {why}")
    with Browser() as b:
        yield b
