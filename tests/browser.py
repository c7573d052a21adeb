"""Headless Chromium for the HTML tests: Debian's `chromium`, installed by the test setup when missing. Without it
the tests that need it skip, except in CI (``CI=true``), where they fail."""

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


INSTALL = "`apt-get install chromium` as root on Debian/Ubuntu, or put `chromium` / `chromium-browser` on PATH"


@pytest.fixture(scope="session")
def browser() -> Browser:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None and shutil.which("apt-get") and os.geteuid() == 0:
        # a fresh image has no package lists yet: update them only when the plain install fails
        install = subprocess.run(
            ["sh", "-c", "apt-get install -y -q chromium || (apt-get update -q && apt-get install -y -q chromium)"],
            capture_output=True, text=True, timeout=480, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )  # fmt: skip
        binary = shutil.which("chromium")
        if binary is None:
            missing_tool(f"chromium is missing and `apt-get install chromium` failed: {install.stderr.strip()[-300:]}",
                         INSTALL)  # fmt: skip
    if binary is None:
        missing_tool("chromium is missing and cannot be installed here (needs root and apt-get)", INSTALL)
    return Browser(binary)
