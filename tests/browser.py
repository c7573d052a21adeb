"""Headless Chromium for the HTML tests: Debian's `chromium`, which `make install` (so `make test`) installs where
it can (root and apt-get). The fixture only finds it: without it the tests that need it skip, except in CI
(``CI=true``), where they fail.

Screenshots are written into the test's tmp dir. ``ATMAN_TEST_ARTIFACTS=DIR`` also copies them to DIR, to look at
after the run: nothing asserts on how a page looks, so a person has to, but a test run writes into the repository
(or anywhere outside its tmp dirs) only when asked to."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import missing_tool

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run", "--disable-extensions"]


@dataclass(frozen=True)
class Browser:
    binary: str

    def load(self, page: Path, tmp: Path) -> tuple[str, str]:
        """The DOM after the page's scripts ran, and Chromium's log (console messages land there)."""
        out = subprocess.run(
            [self.binary, *FLAGS, f"--user-data-dir={tmp / 'profile'}", "--enable-logging=stderr", "--v=0",
             "--virtual-time-budget=3000", "--dump-dom", page.as_uri()],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout, out.stderr

    def screenshot(self, page: Path, png: Path, tmp: Path, size: str = "1200,1800") -> Path:
        subprocess.run(
            [self.binary, *FLAGS, f"--user-data-dir={tmp / 'profile'}", f"--window-size={size}",
             "--virtual-time-budget=3000", f"--screenshot={png}", page.as_uri()],
            capture_output=True, timeout=120, check=True,
        )  # fmt: skip
        return png


def console_errors(log: str) -> list[str]:
    """Console errors and uncaught exceptions that Chromium logged for the page."""
    return [line for line in log.splitlines() if re.search(r"CONSOLE.*(error|Uncaught)|Uncaught ", line, re.I)]


INSTALL = (
    "`make install` as root on Debian/Ubuntu (it runs `apt-get install chromium`), or put `chromium` / "
    "`chromium-browser` on PATH"
)
ARTIFACTS_ENV = "ATMAN_TEST_ARTIFACTS"


@pytest.fixture(scope="session")
def browser() -> Browser:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        missing_tool("chromium is missing", INSTALL)
    return Browser(binary)


def keep(png: Path) -> None:
    """Copy a screenshot to ``$ATMAN_TEST_ARTIFACTS`` when it is set (see the module's docstring)."""
    where = os.environ.get(ARTIFACTS_ENV)
    if where:
        Path(where).mkdir(parents=True, exist_ok=True)
        shutil.copy(png, Path(where) / png.name)
