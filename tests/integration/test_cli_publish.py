"""`rackboot publish` and `rackboot plan` from the command line, against the config's
real Debian kernel: the published root carries the modules that kernel needs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from rackboot import build, config

from tests.helpers import write_config


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
    mark_good = subprocess.run(
        ["debugfs", "-R", "stat /usr/sbin/rackboot-mark-good", str(fs)], capture_output=True, text=True, check=True
    ).stdout
    assert "Mode:  0755" in mark_good  # every published root can confirm its slot
    assert b"rackboot-good" in debugfs_cat(fs, "/usr/sbin/rackboot-mark-good")

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


@pytest.mark.slow
def test_keygen_publish_and_plan_sign_and_the_build_carries_the_key(tmp_path):
    cfg_path = write_config(
        tmp_path, updater=True, master={"key": "keys/master.key"}, kernel={"root_modules": ["overlay"]}
    )
    result = rackboot("build", "-c", str(cfg_path))
    assert result.returncode == 1 and "rackboot keygen makes it" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "build/initramfs.cpio.gz").exists()

    assert rackboot("keygen", "-c", str(cfg_path)).returncode == 0
    again = rackboot("keygen", "-c", str(cfg_path))
    assert again.returncode == 1 and "never overwrites" in again.stderr
    (tmp_path / "rootfs").mkdir()
    (tmp_path / "fix.sh").write_text("echo fixed\n")
    bad = rackboot(
        "publish", "-c", str(cfg_path), "--dir", str(tmp_path / "rootfs"), "--image", "lab", "--hook", "fix.sh"
    )
    assert bad.returncode == 2 and "'fix.sh' is not WHEN=SCRIPT" in bad.stderr
    for args in (
        [
            "publish",
            "--dir",
            str(tmp_path / "rootfs"),
            "--image",
            "lab",
            "--hook",
            f"post-install={tmp_path / 'fix.sh'}",
            "--hook-timeout",
            "30",
        ],
        ["plan", "--image", "lab"],
        ["build"],
    ):
        result = rackboot(args[0], "-c", str(cfg_path), *args[1:])
        assert result.returncode == 0, result.stderr
    public = tmp_path / "keys/master.key.pub"
    for doc in ("images/lab/1/manifest.json", "plans/default.json"):
        path = tmp_path / "master" / doc
        verified = subprocess.run(
            [
                "openssl",
                "pkeyutl",
                "-verify",
                "-pubin",
                "-inkey",
                str(public),
                "-rawin",
                "-in",
                str(path),
                "-sigfile",
                f"{path}.sig",
            ],
            capture_output=True,
        )
        assert verified.returncode == 0, verified.stdout
    hooks = json.loads((tmp_path / "master/images/lab/1/manifest.json").read_text())["hooks"]
    assert [(h["name"], h["timeout"]) for h in hooks] == [("post-install", 30)]
    assert (tmp_path / "master/images/lab/1/post-install.sh").read_text() == "echo fixed\n"
    listing = subprocess.run(
        ["sh", "-c", f"gzip -dc {tmp_path}/build/initramfs.cpio.gz | cpio -i --to-stdout etc/rackboot/master.pub"],
        capture_output=True,
        check=True,
    ).stdout
    assert listing == public.read_bytes()
    files = subprocess.run(
        ["sh", "-c", f"gzip -dc {tmp_path}/build/initramfs.cpio.gz | cpio -t"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert "usr/bin/openssl" in files and any("libcrypto.so" in f for f in files)


def test_a_plan_written_under_umask_077_is_still_one_serve_will_send(tmp_path):
    cfg_path = write_config(tmp_path)
    (tmp_path / "rootfs/sbin").mkdir(parents=True)
    (tmp_path / "rootfs/sbin/init").write_text("#!/bin/sh\n")
    assert rackboot("publish", "-c", str(cfg_path), "--dir", str(tmp_path / "rootfs"), "--image", "lab").returncode == 0
    result = subprocess.run(
        ["sh", "-c", 'umask 077 && exec "$0" -m rackboot plan -c "$1" --image lab', sys.executable, str(cfg_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "master/plans/default.json").stat().st_mode & 0o004  # serve refuses what others cannot read
