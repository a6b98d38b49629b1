"""`rackboot publish` and `rackboot plan` from the command line, against the config's
real Debian kernel: the published root carries the modules that kernel needs."""

from __future__ import annotations

import json
import subprocess
import sys

from rackboot import build, config
from conftest import write_config


def rackboot(*args):
    return subprocess.run([sys.executable, "-m", "rackboot", *args], capture_output=True, text=True, timeout=300)


def debugfs_cat(fs, path):
    return subprocess.run(["debugfs", "-R", f"cat {path}", str(fs)], capture_output=True, check=True).stdout


def test_publish_adds_the_configured_modules_with_a_modules_dep(tmp_path):
    cfg_path = write_config(tmp_path, kernel={"root_modules": ["overlay", "ext4"]})
    (tmp_path / "rootfs/sbin").mkdir(parents=True)
    (tmp_path / "rootfs/sbin/init").write_text("#!/bin/sh\n")
    result = rackboot("publish", "-c", str(cfg_path), "--dir", str(tmp_path / "rootfs"), "--image", "lab")
    assert result.returncode == 0, result.stderr
    kver = build.Inputs(config.load(cfg_path)).kernel.release
    stream = tmp_path / "master/images/lab/1/rootfs.ext4.gz"
    fs = tmp_path / "rootfs.ext4"
    fs.write_bytes(subprocess.run(["gzip", "-dc", str(stream)], capture_output=True, check=True).stdout)
    dep = debugfs_cat(fs, f"/lib/modules/{kver}/modules.dep").decode()
    lines = dict(line.split(":", 1) for line in dep.splitlines())
    overlay = next(path for path in lines if path.endswith("/overlay.ko"))
    ext4 = next(path for path in lines if path.endswith("/ext4.ko"))
    assert "jbd2.ko" in lines[ext4] and "mbcache.ko" in lines[ext4]
    assert len(lines) < 20  # the closure, not the kernel's thousands of modules
    assert debugfs_cat(fs, f"/lib/modules/{kver}/{overlay}")[:4] == b"\x7fELF"

    result = rackboot("plan", "-c", str(cfg_path), "--image", "lab")
    assert result.returncode == 0, result.stderr
    plan = json.loads((tmp_path / "master/plans/default.json").read_text())
    assert plan["image"] == "/images/lab/1/manifest.json"


def test_publish_of_a_module_the_kernel_lacks_is_one_line_and_publishes_nothing(tmp_path):
    cfg_path = write_config(tmp_path, kernel={"root_modules": ["overlayy"]})
    (tmp_path / "rootfs").mkdir()
    result = rackboot("publish", "-c", str(cfg_path), "--dir", str(tmp_path / "rootfs"), "--image", "lab")
    assert result.returncode == 1
    assert result.stderr.startswith("rackboot: error: ") and "overlayy" in result.stderr
    assert "did you mean 'overlay'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not list((tmp_path / "master").rglob("manifest.json"))
