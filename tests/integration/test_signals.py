"""SIGTERM, SIGHUP and SIGKILL in the middle of `rackboot publish` and `rackboot build`: a
terminated command removes its temporaries on the way out, a killed one leaves them to
the next run, which sweeps them under its lock; either way the next run succeeds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import write_config

pytestmark = pytest.mark.network  # the build test needs the Debian cache


def start(tmp_path: Path, *args) -> subprocess.Popen:
    tmp = tmp_path / "tmpdir"  # the command's own TMPDIR, so the test sees only its temporaries
    tmp.mkdir(exist_ok=True)
    env = dict(os.environ, TMPDIR=str(tmp))
    return subprocess.Popen(
        [sys.executable, "-m", "rackboot", *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(proc: subprocess.Popen, found, what: str, limit: float = 120) -> None:
    """Poll until ``found()`` holds; the command must still be running then."""
    deadline = time.monotonic() + limit
    while not found():
        if proc.poll() is not None:
            pytest.fail(f"the command ended before {what}: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {what} within {limit} s")
        time.sleep(0.02)


def big_root(tmp_path: Path) -> Path:
    """A root that takes a few seconds to publish: incompressible data."""
    root = tmp_path / "root"
    (root / "srv").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "etc/hostname").write_text("worker\n")
    with open(root / "srv/blob", "wb") as f:
        for _ in range(96):
            f.write(os.urandom(1 << 20))
    return root


def publish(tmp_path: Path, cfg: Path) -> subprocess.Popen:
    return start(tmp_path, "publish", "-c", cfg, "--dir", tmp_path / "root", "--image", "lab", "--no-modules")


def leftovers(tmp_path: Path) -> list[str]:
    image_dir = tmp_path / "master/images/lab"
    found = [p.name for p in image_dir.iterdir() if p.name.startswith(".")] if image_dir.is_dir() else []
    return found + [p.name for p in (tmp_path / "tmpdir").iterdir()]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
@pytest.mark.slow
def test_a_terminated_publish_removes_its_work_and_the_next_one_publishes(tmp_path, signum):
    cfg = write_config(tmp_path)
    big_root(tmp_path)
    proc = publish(tmp_path, cfg)
    image_dir = tmp_path / "master/images/lab"
    wait_for(
        proc,
        lambda: image_dir.is_dir() and any(image_dir.glob(".publish-*/rootfs.ext4")),
        "publication work directory with its filesystem",
    )
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == ["rackboot: interrupted"]
    assert leftovers(tmp_path) == []
    assert not (image_dir / "1").exists() and not (image_dir / "latest.json").exists()
    again = publish(tmp_path, cfg)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert sorted(p.name for p in image_dir.iterdir()) == ["1", "latest.json"]


@pytest.mark.slow
def test_a_killed_publishs_work_is_swept_by_the_next(tmp_path):
    cfg = write_config(tmp_path)
    big_root(tmp_path)
    proc = publish(tmp_path, cfg)
    image_dir = tmp_path / "master/images/lab"
    wait_for(
        proc,
        lambda: image_dir.is_dir() and any(image_dir.glob(".publish-*/rootfs.ext4")),
        "publication work directory with its filesystem",
    )
    proc.kill()  # SIGKILL: nothing runs on the way out
    proc.communicate(timeout=60)
    assert any(name.startswith(".publish-") for name in leftovers(tmp_path))
    again = publish(tmp_path, cfg)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert sorted(p.name for p in image_dir.iterdir()) == ["1", "latest.json"]


@pytest.mark.slow
def test_a_terminated_build_removes_its_stage_and_the_next_one_builds(tmp_path):
    cfg = write_config(tmp_path)
    out = tmp_path / "build"
    stage = out / ".rackboot/stage"
    proc = start(tmp_path, "build", "-c", cfg)
    wait_for(proc, lambda: stage.is_dir() and any(stage.glob(".initramfs-*/stage")), "initramfs being staged")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert not stage.exists()
    assert sorted(p.name for p in out.iterdir()) == [".rackboot"]  # nothing committed
    assert [p.name for p in (tmp_path / "tmpdir").iterdir()] == []
    again = start(tmp_path, "build", "-c", cfg)
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err
    assert (out / "sdcard.img").is_file() and not stage.exists()
