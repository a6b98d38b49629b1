"""A worker whose master is Debian's nginx (`rackboot nginx-config`), with `rackboot serve`
behind it: a blank card takes v1 from nginx by the full stream, then v2 as a block delta
over nginx's multi-range answers, and the boot files; its plan requests and reports reach serve, whose
inventory (`rackboot status`) shows the node on v2, while serve itself sends no image byte.

The session's build (conftest.example), one worker from its blank card, two boots.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from rackboot import config
from rackboot.master import plans, serve
from rackboot.qemu import harness

from tests.e2e.rack import Example, free_port
from tests.nginx import Nginx, open_dir

pytestmark = [pytest.mark.e2e, pytest.mark.network]

SESSION_HOSTNAME = 'hostname = "worker-{index:02d}"\n'  # rack.provision's pattern


@contextmanager
def nginx_config(example: Example, base: Path) -> Iterator[config.Config]:
    """The session example's settings with the master tree in ``base``, a directory nginx's
    workers (nobody) may walk, which pytest's root-only tmp dirs are not; no hostname pattern,
    so nginx serves the plans itself (mirroring each GET to serve) rather than proxying them.
    The file lies beside the example's, its other paths (the build, the key, hooks/) resolving
    as there; it goes afterwards."""
    text = example.cfg.path.read_text()
    master = base / "master"
    assert text.count(SESSION_HOSTNAME) == 1 and text.count('directory = "master"\n') == 1, text
    text = text.replace(SESSION_HOSTNAME, "").replace('directory = "master"\n', f'directory = "{master}"\n')
    path = example.cfg.base / "rackboot-nginx.toml"
    path.write_text(text)
    try:
        cfg = config.load(path)
        assert (cfg.master.directory, cfg.master.hostname) == (master, ""), cfg.master
        assert (cfg.master.port, cfg.master.key, cfg.output.directory) == (
            example.cfg.master.port,  # where nginx listens: the worker's master URL, built into its card
            example.cfg.master.key,
            example.cfg.output.directory,
        )
        harness.start_afresh(master)  # (0755: nobody walks into it, as into base)
        yield cfg
    finally:
        path.unlink()


def boot(cfg: config.Config, out, disk, log, version: int) -> str:
    with harness.new_worker(cfg, out, disk, log) as worker:
        worker.expect(rf"rackboot-demo: v{version} is up", timeout=300)
        worker.wait_exit(timeout=60)
    return log.read_text(errors="replace")


def test_a_worker_installs_v1_and_a_v2_delta_from_nginx_and_reports_to_serve(example, tmp_path):
    work = tmp_path / "work"
    disk = example.start(0, work)  # a blank card of the session's build, its master key as made
    out = example.out
    with open_dir("rackboot-nginx-e2e-") as base, nginx_config(example, base) as cfg:
        harness.publish_example(cfg, cfg.base / "rootfs", work, 1)
        plans.assign(cfg, node="default", image=harness.IMAGE)
        srv = serve.make_server(
            cfg.master.directory, "127.0.0.1", free_port(), quiet=True, config=cfg, proxied_by="127.0.0.1"
        )
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        try:
            with Nginx(cfg, cfg.master.port, srv.url, base / "nginx") as nginx:
                first = boot(cfg, out, disk, work / "boot1.log", 1)
                v2 = harness.publish_example(cfg, cfg.base / "rootfs", work, 2)
                plans.assign(cfg, node="default", image=harness.IMAGE)
                second = boot(cfg, out, disk, work / "boot2.log", 2)
                log = nginx.access_log()
            stats = srv.stats()
        finally:
            srv.shutdown()
            srv.server_close()
        assert "rackboot-demo: v1 is up" in first and "Traceback" not in first + second
        assert re.search(r"^rackboot: delta: .* MiB from the card", second, re.M), second
        assert "rackboot-mark-good: slot b (example v2) confirmed" in second
        # the images came from nginx: the full stream of v1, multi-range answers from v2's pack
        assert v2.delta is not None
        pack = f"/images/{harness.IMAGE}/2/{v2.delta.pack}"
        assert any(
            f'"GET {pack} HTTP/1.1" 206 ' in line and '"multipart/byteranges; boundary=' in line for line in log
        ), "\n".join(log)
        assert any(f'"GET /images/{harness.IMAGE}/1/' in line and '" 200 ' in line for line in log)
        assert harness.image_bytes(stats) == 0, stats  # serve sent none of them
        assert any(re.search(r'"GET /boot/[0-9a-f]+/boot\.json HTTP/1\.1" 200 ', line) for line in log)  # boot files
        assert any(line.startswith("127.0.0.1 ") and '"POST /report HTTP/1.1" 204 ' in line for line in log)
        # the reports are serve's: its history and its inventory have the node on v2
        reports = [
            json.loads(line)
            for f in (cfg.master.directory / "reports").glob("*.jsonl")
            for line in f.read_text().splitlines()
        ]
        download = [r for r in reports if r["phase"] == "download"]
        assert [r["version"] for r in download] == [1, 2] and download[1]["delta"].startswith("delta: ")
        shown = subprocess.run(
            [harness.rackboot_command(), "status", "-c", str(cfg.path), "--json"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        nodes = json.loads(shown)
        nodes = nodes["nodes"] if isinstance(nodes, dict) else nodes
        assert [(n["booted_version"], n["plan"], n["ip"]) for n in nodes] == [(2, "default", "127.0.0.1")], shown
