"""Sources after the master on a booting worker: the build puts `[master] sources` on the
kernel command line, /init hands it to the updater, and with its master down the worker
installs v1 from the next source, reports there, and says where its bytes came from."""

from __future__ import annotations

import json
import re
import threading

import pytest
from rackboot import config
from rackboot.master import plans, serve
from rackboot.qemu import harness

from tests.e2e.rack import example_config, free_port
from tests.helpers import quiet

pytestmark = [pytest.mark.e2e, pytest.mark.network]


def test_a_worker_whose_master_is_down_installs_from_its_next_source_and_reports_there(tmp_path):
    path = example_config(tmp_path)  # its master's port: nobody listens there
    port = free_port()
    source_url = f"http://10.0.2.2:{port}"  # QEMU's user network: the host's loopback
    path.write_text(path.read_text().replace("[master]\n", f'[master]\nsources = ["{source_url}"]\n', 1))
    cfg = config.load(path)
    work = tmp_path / "demo"
    out = harness.prepare(cfg, work, quiet)
    manifest = harness.publish_example(cfg, cfg.base / "rootfs", work, 1)
    plans.assign(cfg, node="default", image=harness.IMAGE)
    disk = work / "worker-disk.img"
    harness.blank_card(out / "sdcard.img", disk)
    source = serve.make_server(cfg.master.directory, "127.0.0.1", port, quiet=True, config=cfg)
    threading.Thread(target=source.serve_forever, daemon=True).start()
    log = work / "boot.log"
    try:
        with harness.new_worker(cfg, out, disk, log) as worker:
            worker.expect(r"rackboot-demo: v1 is up", timeout=300)
            worker.wait_exit(timeout=60)
        sent = harness.image_bytes(source.stats())
    finally:
        source.shutdown()
        source.server_close()
    console = log.read_text(errors="replace")
    assert re.search(rf"Kernel command line: .*rackboot\.sources={re.escape(source_url)}( |$)", console, re.M)
    assert f"rackboot: source {cfg.master.url} passed over: " in console
    lines = [
        json.loads(line)
        for f in sorted((cfg.master.directory / "reports").glob("*.jsonl"))
        for line in f.read_text().splitlines()
    ]
    boot = [r for r in lines if r["phase"] == "boot"][-1]  # heard by the source: the master was down
    assert (boot["slot"], boot["version"]) == ("a", 1)
    master, second = boot["sources"]
    assert (master["url"], master["bytes"]) == (cfg.master.url, 0) and master["failed"]
    assert (second["url"], second["failed"]) == (source_url, None)
    assert manifest.delta is not None
    # the stream and the index kept behind it; the source also sent the hooks' scripts (documents)
    assert second["bytes"] == boot["bytes"] == manifest.stream_size + manifest.delta.index_size
    assert sent == second["bytes"] + sum(hook.size for hook in manifest.hooks)
