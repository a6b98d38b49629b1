"""Signed install hooks: the master's fix-ups, run as root only as the master signed them.

A manifest names each hook by file, size and sha256, and the manifest's signature covers
those fields, so a hook whose bytes differ by one bit is refused before anything runs.
A card without the master's key has nothing to check a signature with: it refuses any
manifest that carries hooks. Hooks are fetched and checked before the slot is touched;
each runs under /bin/sh in its own process group and is killed when its timeout passes.
"""

from __future__ import annotations

import functools
import hashlib
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .errors import Refused, UpdaterError
from .fetch import MasterClient
from .formats import MAX_REPORT_OUTPUT, Hook, Manifest, beside
from .sources import Sources

SHELL = "/bin/sh"
DRAIN_SECONDS = 5  # after the kill, how long a hook's output may take to close
RUN_DIR = "/run/rackboot"  # a tmpfs on the worker; the hooks' scripts never touch the card


@dataclass(frozen=True)
class HookResult:
    hook: str
    status: int | None  # exit status; None when it was killed at its timeout
    output: str  # the tail, at most MAX_REPORT_OUTPUT characters
    seconds: float

    @property
    def ok(self) -> bool:
        return self.status == 0

    def problem(self) -> str:
        if self.status is None:
            why = "timed out and was killed"
        elif self.status < 0:
            why = f"was killed by signal {-self.status}"
        else:
            why = f"exited with status {self.status}"
        last = next((line for line in reversed(self.output.splitlines()) if line.strip()), "")
        return f"hook {self.hook} {why}" + (f": {last.strip()[:200]}" if last else "")


def fetch(master: MasterClient | Sources, manifest_path: str, manifest: Manifest, signed: bool) -> dict[str, bytes]:
    """Every hook's script, checked against the signed manifest (a source whose script is not
    the one signed is passed over for the next); Refused on any doubt."""
    if manifest.hooks and not signed:
        raise Refused(
            f"manifest: {manifest.image} v{manifest.version} carries hooks and this card has "
            "no master key to check them with; an unsigned hook never runs"
        )
    scripts: dict[str, bytes] = {}
    for hook in manifest.hooks:
        path = beside(manifest_path, hook.file)
        scripts[hook.name] = master.verified(f"GET {path}", functools.partial(_signed_script, path=path, hook=hook))
    return scripts


def _signed_script(source: MasterClient, *, path: str, hook: Hook) -> bytes:
    data = source.get(path)
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != hook.size or digest != hook.sha256:
        raise Refused(
            f"hook {hook.name}: {path} is {len(data)} bytes with sha256 {digest[:16]}..., "
            f"the signed manifest says {hook.size} bytes, {hook.sha256[:16]}...; not run"
        )
    return data


def run(
    hook: Hook,
    script: bytes,
    env: Mapping[str, str],
    *,
    log: Callable[[str], None],
    shell: str = SHELL,
    now: Callable[[], float] = time.monotonic,
    root: str | None = None,
) -> HookResult:
    """Run one checked hook to completion or to its timeout; its lines go to ``log``.
    With ``root``, chrooted into it: the script goes into its /run (a tmpfs /init mounted)."""
    base = os.path.join(root, "run") if root else RUN_DIR if os.path.isdir(RUN_DIR) else None
    with tempfile.TemporaryDirectory(prefix="hook-", dir=base) as tmp:
        path = os.path.join(tmp, hook.file)
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o700), "wb") as f:
            f.write(script)
        started = now()
        argv = ["chroot", root, shell, "/" + os.path.relpath(path, root)] if root else [shell, path]
        proc = subprocess.Popen(
            argv,
            cwd=tmp,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            raw, _ = proc.communicate(timeout=hook.timeout)
            status: int | None = proc.returncode
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)  # its children too: a hook must not outlive its timeout
            raw = _drain(proc)
            status = None
    text = raw.decode("utf-8", "replace")
    for line in text.splitlines():
        log(f"hook {hook.name}: {line}")
    return HookResult(hook.name, status, text[-MAX_REPORT_OUTPUT:], round(now() - started, 3))


def _drain(proc: subprocess.Popen[bytes]) -> bytes:
    """The killed hook's output. A process that left its group (setsid) may still hold the
    pipe open: the wait for it is bounded, and whatever arrived by then is kept."""
    try:
        raw, _ = proc.communicate(timeout=DRAIN_SECONDS)
        return raw
    except subprocess.TimeoutExpired as e:
        if proc.stdout is not None:  # always: run() opens it as a pipe
            proc.stdout.close()
        proc.wait()
        return (e.output or b"") + b"\n(output cut: a process the hook started outside its group still holds it)\n"


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def environment(manifest: Manifest, *, hook: str, node: str, slot: str, slot_device: str, disk: str) -> dict[str, str]:
    """What a hook knows: which image goes where. PATH is the initramfs's."""
    return {
        "PATH": "/sbin:/bin:/usr/sbin:/usr/bin",
        "RACKBOOT_HOOK": hook,
        "RACKBOOT_NODE": node,
        "RACKBOOT_IMAGE": manifest.image,
        "RACKBOOT_VERSION": str(manifest.version),
        "RACKBOOT_SLOT": slot,
        "RACKBOOT_SLOT_DEVICE": slot_device,
        "RACKBOOT_DISK": disk,
    }


def check(result: HookResult) -> None:
    if not result.ok:
        raise UpdaterError(result.problem())
