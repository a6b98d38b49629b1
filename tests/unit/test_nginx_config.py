"""`rackboot nginx-config`: the config it prints (a golden copy, tests/data/nginx.conf.golden,
with the tmp dir as @BASE@), plans proxied when they are per node, and every value that
could break the config refused with one line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from rackboot import __version__, config
from rackboot.errors import RackbootError
from rackboot.master import limits, nginx, serve

from tests.helpers import write_config

GOLDEN = Path(__file__).resolve().parents[1] / "data/nginx.conf.golden"
LISTEN, SERVE = "0.0.0.0:8080", "http://127.0.0.1:8081"


def render(tmp_path: Path, **master) -> str:
    cfg = config.load(write_config(tmp_path, master=master))
    return nginx.render_config(cfg, LISTEN, SERVE)


def test_the_config_is_the_golden_one_and_deterministic(tmp_path):
    text = render(tmp_path)
    assert text == render(tmp_path)
    base = str(tmp_path.resolve())
    assert text.replace(base, "@BASE@").replace(f"rackboot {__version__} ", "rackboot VERSION ") == GOLDEN.read_text()


def test_the_limits_are_serves():
    assert (nginx.MAX_REPORT, nginx.MAX_RANGES, nginx.RETRY_AFTER) == (
        serve.MAX_REPORT,
        serve.MAX_RANGES,
        serve.RETRY_AFTER,
    )
    assert limits.MAX_STREAMS == 8


def test_max_streams_comes_from_the_config(tmp_path):
    assert "limit_conn rackboot_streams 3;" in render(tmp_path, max_streams=3)


@pytest.mark.parametrize(
    ("master", "why"),
    [
        ({"adopt": "manual"}, "only adopted nodes get the default plan"),
        ({"hostname": "worker-{index:02d}"}, "serve names and signs the default plan per node"),
    ],
)
def test_plans_go_to_serve_when_they_are_per_node(tmp_path, master, why):
    text = render(tmp_path, **master)
    assert f"# plans are serve's: [master] {next(iter(master))}" in text and why in text
    assert "mirror" not in text and "try_files $uri /plans/default.json" not in text
    assert 'location ~ "^/plans/[^/]+\\.json(\\.sig)?$" {\n            proxy_pass http://rackboot_serve;' in text


@pytest.mark.parametrize(
    "directory",
    ["master$document_root", "mas\\ter", "m$1"],
)
def test_a_master_directory_nginx_would_misread_is_refused(tmp_path, directory):
    cfg = config.load(write_config(tmp_path, master={"directory": directory}))
    with pytest.raises(RackbootError, match=r"\[master\] directory .* which nginx would read as"):
        nginx.render_config(cfg, LISTEN, SERVE)


@pytest.mark.parametrize(
    ("listen", "serve_url", "error"),
    [
        ("127.0.0.1:8080; include /etc/shadow", SERVE, "--listen: port '8080; include /etc/s' is not a number"),
        ("127.0.0.1:0", SERVE, "--listen: port '0' is not a number from 1 to 65535"),
        ("8080", SERVE, "--listen: '8080' is not ADDRESS:PORT"),
        ("master.example:8080", SERVE, "--listen: 'master.example' is not an IPv4 address, [IPv6 address]"),
        ("[::1;]:8080", SERVE, "is not an IPv4 address"),
        (LISTEN, "http://127.0.0.1:8081/plans", "--serve: 'http://127.0.0.1:8081/plans' is not http://HOST:PORT"),
        (LISTEN, "https://127.0.0.1:8081", "is not http://HOST:PORT"),
        (LISTEN, "http://user@127.0.0.1:8081", "is not http://HOST:PORT"),
        (LISTEN, "http://127.0.0.1", "names no port"),
        (LISTEN, "http://a;b:8081", "--serve: 'a;b' is not an IPv4 address, [IPv6 address] or hostname"),
        (LISTEN, "http://127.0.0.1:8081?x", "is not http://HOST:PORT"),
    ],
)
def test_bad_addresses_are_refused(tmp_path, listen, serve_url, error):
    cfg = config.load(write_config(tmp_path))
    with pytest.raises(RackbootError, match=("^" if error.startswith("--") else "") + re.escape(error)):
        nginx.render_config(cfg, listen, serve_url)


def test_good_addresses_are_written_as_nginx_reads_them(tmp_path):
    cfg = config.load(write_config(tmp_path))
    text = nginx.render_config(cfg, "[0:0::1]:80", "http://localhost:8081/")
    assert "listen [::1]:80;" in text and "server localhost:8081;" in text


def test_a_bad_user_is_refused(tmp_path):
    cfg = config.load(write_config(tmp_path))
    with pytest.raises(RackbootError, match="^--user: 'nobody; daemon on' is not a user or group name"):
        nginx.render_config(cfg, LISTEN, SERVE, user="nobody; daemon on")


def test_the_command_prints_the_config_or_one_line(tmp_path):
    path = write_config(tmp_path)
    command = [sys.executable, "-m", "rackboot", "nginx-config", "-c", str(path), "--listen", LISTEN]
    done = subprocess.run([*command, "--serve", SERVE], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout == nginx.render_config(config.load(path), LISTEN, SERVE)
    done = subprocess.run([*command, "--serve", "ftp://x:1"], capture_output=True, text=True)
    assert done.returncode != 0 and done.stdout == ""
    assert done.stderr == "rackboot: error: --serve: 'ftp://x:1' is not http://HOST:PORT (rackboot serve's address)\n"
