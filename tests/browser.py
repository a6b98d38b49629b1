"""Debian's chromium, headless, as the fleet tests and the README's screenshot use it: the
DOM after the page's scripts ran, or a PNG. A missing chromium fails loudly."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

BUDGET_MS = 4000  # virtual time the page gets to run its scripts (its first refresh from the API)
FLAGS = (
    "--headless",
    "--no-sandbox",  # as root
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


def chromium() -> str:
    found = shutil.which("chromium")
    if found is None:
        raise AssertionError("chromium is not installed: apt-get install chromium (the Makefile's DEBS has it)")
    return found


def _run(args: list[str], timeout: float) -> str:
    with tempfile.TemporaryDirectory(prefix="rackboot-chromium-") as profile:
        done = subprocess.run(
            [chromium(), *FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={BUDGET_MS}", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    if done.returncode != 0:
        raise AssertionError(f"chromium exited {done.returncode}: {done.stderr[-2000:]}")
    return done.stdout


def dump_dom(url: str, timeout: float = 120) -> str:
    """The page's DOM once its scripts ran (--dump-dom)."""
    return _run(["--dump-dom", url], timeout)


def screenshot(url: str, png: Path, size: tuple[int, int] = (1100, 420), timeout: float = 120) -> Path:
    _run([f"--window-size={size[0]},{size[1]}", f"--screenshot={png}", url], timeout)
    if not png.is_file():
        raise AssertionError(f"chromium wrote no screenshot to {png}")
    return png
