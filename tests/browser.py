"""Headless Chromium for browser tests: Debian's ``chromium`` driven by Playwright's Python package.

Nothing is downloaded but Debian's package: when ``/usr/bin/chromium`` is missing and we are root
with apt-get, it is installed; otherwise the tests skip with the reason.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
#: Held while one test process installs chromium.
INSTALL_LOCK = Path("/tmp/flordb-build-tests-chromium.lock")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def install_chromium() -> str | None:
    """Install Debian's chromium when it is missing and we may (root, apt-get); None or why not."""
    if CHROMIUM.exists():
        return None
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        return f"no Chromium at '{CHROMIUM}' and no root apt-get to install it (Debian: apt-get install chromium)"
    # Test files run in parallel processes (pytest-xdist): one installs, the others wait for it
    # (two apt-gets at once fail on dpkg's lock) and then find chromium there.
    with open(INSTALL_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if CHROMIUM.exists():
            return None
        return _apt_install()


def _apt_install() -> str | None:
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        proc = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
        if proc.returncode != 0:
            return f"could not install chromium with '{' '.join(command)}': {proc.stderr.strip()[-300:]}"
    return None if CHROMIUM.exists() else f"apt-get installed chromium but '{CHROMIUM}' is missing"
