"""`rackboot demo` empties only what it made: a master or work directory holding anything
else is refused before the build, with one line; a config without the example root is one
line too, not a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from rackboot import config
from rackboot.qemu import harness

from tests.helpers import quiet, write_config


def rackboot(*args):
    return subprocess.run(
        [sys.executable, "-m", "rackboot", *map(str, args)], capture_output=True, text=True, timeout=300
    )


def with_rootfs(tmp_path: Path) -> Path:
    (tmp_path / "rootfs/sbin").mkdir(parents=True)
    (tmp_path / "rootfs/sbin/init").write_text("#!/bin/sh\n")
    return write_config(tmp_path)


def a_real_master(master: Path) -> dict[Path, bytes]:
    """What a rack's master holds: another image, plans, reports."""
    files = {
        master / "images/lab/1/manifest.json": b"{}",
        master / "images/lab/latest.json": b"{}",
        master / "plans/default.json": b"{}",
        master / "reports/02-00-00-00-00-01.jsonl": b"{}\n",
    }
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def test_a_master_the_demo_did_not_make_is_refused_and_kept(tmp_path):
    cfg = with_rootfs(tmp_path)
    files = a_real_master(tmp_path / "master")
    result = rackboot("demo", "-c", cfg)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(tmp_path / "master") in lines[0] and "[master] directory" in lines[0]
    assert all(path.read_bytes() == data for path, data in files.items())
    assert not (tmp_path / "build").exists()  # refused before building anything


def test_a_workdir_with_other_files_is_refused_and_kept(tmp_path):
    cfg = with_rootfs(tmp_path)
    work = tmp_path / "home"
    work.mkdir()
    (work / "thesis.tex").write_text("years of work\n")
    result = rackboot("demo", "-c", cfg, "--workdir", work)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(work) in lines[0] and "--workdir" in lines[0]
    assert (work / "thesis.tex").read_text() == "years of work\n"


def test_no_example_root_is_one_line_before_the_build(tmp_path):
    cfg = write_config(tmp_path)
    result = rackboot("demo", "-c", cfg)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(tmp_path / "rootfs") in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "build").exists()


@pytest.mark.network
def test_the_demo_starts_its_own_directories_afresh_on_every_run(tmp_path):
    """What `make demo` does twice: the second run empties what the first made."""
    cfg = config.load(with_rootfs(tmp_path))
    master, work = tmp_path / "master", tmp_path / "demo"
    master.mkdir()  # an empty directory is the demo's to take
    harness.prepare(cfg, work, log=quiet)
    assert (master / harness.MARKER).is_file() and (work / harness.MARKER).is_file()
    (master / "images/example/1").mkdir(parents=True)
    (work / "logs/boot1.log").write_text("first run\n")
    harness.prepare(cfg, work, log=quiet)
    assert sorted(p.name for p in master.iterdir()) == [harness.MARKER]
    assert sorted(p.name for p in work.iterdir()) == [harness.MARKER, "logs"]
    assert list((work / "logs").iterdir()) == []


def test_a_workdir_overlapping_the_master_or_the_build_is_refused(tmp_path):
    cfg = with_rootfs(tmp_path)
    for workdir in (tmp_path / "master", tmp_path / "build/demo"):
        result = rackboot("demo", "-c", cfg, "--workdir", workdir)
        assert result.returncode == 1
        assert len(result.stderr.strip().splitlines()) == 1 and "overlap" in result.stderr
    assert not (tmp_path / "build").exists() and not (tmp_path / "master").exists()
