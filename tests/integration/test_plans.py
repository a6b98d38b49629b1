"""`rackboot plan --node`: a MAC in any usual spelling lands under the one name the worker asks for."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from rackboot import config
from rackboot.errors import RackbootError
from rackboot.initramfs.updater.formats import node_id
from rackboot.master import plans

from tests.helpers import write_config

WORKER_MAC = "52:54:00:12:34:56"  # as the worker's kernel reports it


@pytest.fixture
def cfg_path(tmp_path):
    path = write_config(tmp_path)
    manifest = tmp_path / "master/images/lab/1/manifest.json"  # plan --version only checks it exists
    manifest.parent.mkdir(parents=True)
    manifest.write_text("{}")
    return path


def rackboot(*args):
    return subprocess.run([sys.executable, "-m", "rackboot", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    "spelling",
    [
        "52:54:00:12:34:56",
        "52:54:00:12:34:56".upper(),
        "52-54-00-12-34-56",
        "52-54-00-12-34-56".upper(),
        "5254.0012.3456",
        "525400123456",
        "525400123456".upper(),
    ],
)
def test_any_mac_spelling_is_stored_as_the_name_the_worker_asks_for(cfg_path, spelling):
    path = plans.assign(config.load(cfg_path), node=spelling, image="lab", version=1)
    assert path.name == f"{node_id(WORKER_MAC)}.json"  # what initramfs/updater fetches: plans/<node_id>.json
    assert json.loads(path.read_text())["node"] == node_id(WORKER_MAC)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_the_cli_takes_a_colon_mac_and_default_stays_valid(cfg_path, tmp_path):
    result = rackboot("plan", "-c", str(cfg_path), "--image", "lab", "--version", "1", "--node", "52:54:00:AB:CD:EF")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "master/plans/52-54-00-ab-cd-ef.json").is_file()
    result = rackboot("plan", "-c", str(cfg_path), "--image", "lab", "--version", "1")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "master/plans").iterdir()) == ["52-54-00-ab-cd-ef.json", "default.json"]


@pytest.mark.parametrize(
    "node", ["52:54-00:12:34:56", "52:54:00:12:34", "52:54:00:12:34:5g", "worker1", "../x", "DEFAULT", ""]
)
def test_anything_else_is_one_line_and_writes_nothing(cfg_path, tmp_path, node):
    with pytest.raises(RackbootError, match="is not a MAC address"):
        plans.assign(config.load(cfg_path), node=node, image="lab", version=1)
    result = rackboot("plan", "-c", str(cfg_path), "--image", "lab", "--version", "1", "--node", node)
    assert result.returncode == 1
    assert result.stderr.startswith("rackboot: error: node ") and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "master/plans").exists()


@pytest.mark.parametrize("image", ["example/1/../../example", "../lab", "lab/1", "Lab", "lab x", ".lab", "", "l" * 65])
def test_an_image_that_is_not_an_image_name_is_one_line_and_writes_nothing(cfg_path, tmp_path, image):
    """example/1/../../example went into a plan: its manifest path resolved to a real version."""
    example = tmp_path / "master/images/example/1/manifest.json"
    example.parent.mkdir(parents=True)
    example.write_text("{}")
    with pytest.raises(RackbootError, match=r"^image .* is not an image name"):
        plans.assign(config.load(cfg_path), node=WORKER_MAC, image=image, version=1)
    result = rackboot("plan", "-c", str(cfg_path), "--image", image, "--version", "1", "--node", WORKER_MAC)
    assert result.returncode == 1
    assert result.stderr.startswith("rackboot: error: image ") and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "master/plans").exists() and not (tmp_path / "master/hostnames.json").exists()
