"""Running the host tools rackboot drives (mke2fs, mtools, openssl, apt-get, ...)."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from pathlib import Path

from .errors import RackbootError


def run(
    cmd: list[str],
    what: str,
    *,
    env: Mapping[str, str] | None = None,
    data: bytes | None = None,
    cwd: Path | None = None,
    missing: str = "",
) -> bytes:
    """Run ``cmd`` and return its stdout; a failure is one RackbootError line, ``what``
    followed by the tool's last line of complaint. ``missing`` says how to install it."""
    try:
        done = subprocess.run(cmd, input=data, capture_output=True, cwd=cwd, env=None if env is None else dict(env))
    except FileNotFoundError:
        hint = f" ({missing})" if missing else ""
        raise RackbootError(f"{cmd[0]} is not installed{hint}; needed to {what}") from None
    if done.returncode != 0:
        text = (done.stderr or done.stdout).decode("utf-8", "replace")
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        raise RackbootError(f"{what}: {lines[-1] if lines else f'{cmd[0]} exit status {done.returncode}'}")
    return done.stdout
