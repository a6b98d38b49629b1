"""`rackboot nginx-config`: an nginx config that serves the master's static tree, with
`rackboot serve` behind it for what needs the inventory.

nginx sends the tree as serve would: a node's plan falls back to the default plan (and its
signature with it), images go out with Range and multipart/byteranges answers, at most
[master] max_streams image streams at once (one more gets 503 with Retry-After), and it
never sends a dot file, a private key, a file not readable by others (its workers run as an
unprivileged user, so the kernel refuses those) or a directory listing; symlinks are not
followed below the root. Reports, the fleet page and API and /stats are proxied to serve.

Plans stay with nginx only while nothing in them is per node: a GET of one is then mirrored
to serve, which records the plan request in the inventory (the answer nginx sent is the
worker's). With [master] adopt = "manual" (only adopted nodes get the default plan) or a
[master] hostname pattern (serve names and signs the default plan for each node), plan
requests are proxied to serve.

Every value lands in the config checked and quoted: a path cannot add a directive.
"""

from __future__ import annotations

import ipaddress
import re
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from rackboot.errors import RackbootError
from rackboot.templates import render

from .limits import IDLE_TIMEOUT, MAX_STREAMS

if TYPE_CHECKING:
    from rackboot.config import Config

MAX_REPORT = 64 * 1024  # serve.MAX_REPORT (serve.py imports http.server, slow for a CLI)
MAX_RANGES = 256  # serve.MAX_RANGES
RETRY_AFTER = 2  # serve.RETRY_AFTER
_HOSTNAME_RE = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)
_USER_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}")
# in a quoted nginx string a double quote or backslash ends or escapes it, and '$' names a
# variable (root takes variables); control characters would start a new line
_PATH_FORBIDDEN = re.compile(r'["\\$\x00-\x1f\x7f-\x9f]')


def _port(value: str, what: str) -> int:
    if not value.isascii() or not value.isdigit() or not 1 <= int(value) <= 65535:
        raise RackbootError(f"{what}: port {value[:20]!r} is not a number from 1 to 65535")
    return int(value)


def _host_port(value: str, what: str, *, hostnames: bool) -> str:
    """``ADDR:PORT`` (IPv4, [IPv6] or, with ``hostnames``, a hostname) as nginx writes it."""
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise RackbootError(f"{what}: {value[:100]!r} is not ADDRESS:PORT (e.g. 0.0.0.0:8080)")
    number = _port(port, what)
    if host.startswith("[") and host.endswith("]"):
        try:
            return f"[{ipaddress.IPv6Address(host[1:-1]).compressed}]:{number}"
        except ValueError:
            pass
    else:
        try:
            return f"{ipaddress.IPv4Address(host)}:{number}"
        except ValueError:
            if hostnames and _HOSTNAME_RE.fullmatch(host):
                return f"{host}:{number}"
    kind = "an IPv4 address, [IPv6 address]" + (" or hostname" if hostnames else "")
    raise RackbootError(f"{what}: {host[:100]!r} is not {kind}")


def listen_address(value: str) -> str:
    """``--listen``: where nginx listens, ``ADDR:PORT`` with an IP address."""
    return _host_port(value, "--listen", hostnames=False)


def serve_address(url: str) -> str:
    """``--serve``: rackboot serve's URL, ``http://HOST:PORT`` and nothing more -> ``HOST:PORT``."""
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.path not in ("", "/") or parts.query or parts.fragment or "@" in parts.netloc:
        raise RackbootError(f"--serve: {url[:100]!r} is not http://HOST:PORT (rackboot serve's address)")
    if ":" not in parts.netloc.rpartition("]")[2]:
        raise RackbootError(f"--serve: {url[:100]!r} names no port (rackboot serve's --port)")
    return _host_port(parts.netloc, "--serve", hostnames=True)


def user_name(value: str, what: str) -> str:
    if not _USER_RE.fullmatch(value):
        raise RackbootError(f"{what}: {value[:40]!r} is not a user or group name")
    return value


def root_path(cfg: Config) -> str:
    """The master directory, absolute, as it may stand in a quoted nginx string."""
    root = str(cfg.master.directory.resolve())
    bad = sorted(set(_PATH_FORBIDDEN.findall(root)))
    if bad:
        raise RackbootError(
            f"{cfg.path}: [master] directory {root[:200]!r} holds {', '.join(repr(c) for c in bad)}, "
            "which nginx would read as a quote, an escape, a variable or a line break; not written"
        )
    return root


def dynamic_plans(cfg: Config) -> str | None:
    """Why plans must come from serve, or None when nginx may serve them as files."""
    why = []
    if cfg.master.adopt == "manual":
        why.append('[master] adopt = "manual": only adopted nodes get the default plan')
    if cfg.master.hostname:
        why.append("[master] hostname: serve names and signs the default plan per node")
    return "; ".join(why) or None


def render_config(cfg: Config, listen: str, serve: str, *, user: str = "nobody", group: str = "nogroup") -> str:
    """nginx.conf for this master; deterministic for the same config and arguments."""
    plans_why = dynamic_plans(cfg)
    return render(
        "rackboot.master",
        "nginx.conf.j2",
        config=str(cfg.path).translate(_NO_NEWLINES),
        root=root_path(cfg),
        listen=listen_address(listen),
        serve=serve_address(serve),
        user=user_name(user, "--user"),
        group=user_name(group, "--group"),
        max_streams=cfg.master.max_streams or MAX_STREAMS,
        idle_timeout=int(IDLE_TIMEOUT),
        max_report=MAX_REPORT,
        max_ranges=MAX_RANGES,
        retry_after=RETRY_AFTER,
        static_plans=plans_why is None,
        plans_why=plans_why or "",
    )


# the config's path only lands in a comment; a newline there would end it
_NO_NEWLINES = {c: "?" for c in (*range(0x20), *range(0x7F, 0xA0))}
