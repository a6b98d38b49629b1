"""`pip install .` (not editable) gives a working rackboot: the folders mapped into one
`rackboot` namespace, with the templates, the /init shim and the updater inside."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.helpers import write_config

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """The package installed into a bare directory; the venv's site-packages only for its
    dependencies. `python -S` skips .pth files, so the editable checkout stays out of it."""
    target = tmp_path_factory.mktemp("site")
    # from a copy: setuptools leaves build/ and egg-info behind in the tree it builds
    source = tmp_path_factory.mktemp("src") / "rackboot"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".venv", ".git", "out", "build", "*.egg-info"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(source),
        ],
        check=True,
        capture_output=True,
    )
    deps = sysconfig.get_paths()["purelib"]
    return dict(os.environ, PYTHONPATH=f"{target}{os.pathsep}{deps}")


def run(env, *args, cwd=None):
    return subprocess.run([sys.executable, "-S", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=600)


def test_nothing_generic_lands_at_the_top_of_site_packages(installed):
    top = {p.name for p in Path(installed["PYTHONPATH"].split(os.pathsep)[0]).iterdir()}
    assert "rackboot" in top
    assert not top & {"builder", "initramfs", "uboot", "firmware", "qemu", "tests"}


def test_installed_package_builds_from_its_own_templates(installed, tmp_path):
    where = run(installed, "-c", "import rackboot, rackboot.uboot; print(rackboot.__file__)")
    assert where.returncode == 0, where.stderr
    assert "site" in where.stdout and str(REPO) not in where.stdout
    cfg = write_config(tmp_path, updater=True)
    result = run(installed, "-m", "rackboot", "build", "-c", str(cfg), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for name in ("boot.scr.uimg", "boot.scr", "initramfs.cpio.gz", "sdcard.img"):
        assert (tmp_path / "build" / name).stat().st_size > 0
    listing = subprocess.run(
        ["sh", "-c", f"gzip -dc {tmp_path}/build/initramfs.cpio.gz | cpio -t"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert "init" in listing and "usr/lib/rackboot/updater/install.py" in listing
