"""The build graph: rebuild only what changed, say why, never leave half artefacts."""

import json
import subprocess
import threading

import pytest
from rackboot import graph
from rackboot.errors import RackbootError


def artefact(name, data, calls, **kw):
    def build(tmp):
        calls.append(name)
        tmp.write_bytes(data())

    return graph.Artefact(
        name=name, kind="test", filename=f"{name}.bin", inputs=kw.pop("inputs", {"v": 1}), build=build, **kw
    )


def quiet(_):
    pass


def test_second_run_rebuilds_nothing_and_manifest_is_complete(tmp_path):
    calls = []
    arts = [artefact("a", lambda: b"A", calls), artefact("b", lambda: b"B", calls, after=("a",))]
    graph.run(arts, tmp_path, log=quiet)
    assert calls == ["a", "b"]
    result = graph.run(arts, tmp_path, log=quiet)
    assert calls == ["a", "b"] and result.rebuilt == []
    doc = json.loads((tmp_path / "artefacts.json").read_text())
    assert [e["name"] for e in doc["artefacts"]] == ["a", "b"]
    import hashlib

    assert doc["artefacts"][0] == {
        "name": "a",
        "kind": "test",
        "path": "a.bin",
        "size": 1,
        "sha256": hashlib.sha256(b"A").hexdigest(),
    }


def test_changed_input_rebuilds_it_and_says_why(tmp_path):
    calls, lines = [], []
    graph.run([artefact("a", lambda: b"A", calls, inputs={"modules": ["x"]})], tmp_path, log=quiet)
    result = graph.run([artefact("a", lambda: b"A", calls, inputs={"modules": ["y"]})], tmp_path, log=lines.append)
    assert result.outcomes[0].reason == "modules changed"
    assert any("rebuilding (modules changed)" in line for line in lines)


def test_dependent_rebuilds_only_when_dependency_output_changes(tmp_path):
    calls = []
    content = {"a": b"1"}

    def arts(inputs):
        return [
            artefact("a", lambda: content["a"], calls, inputs=inputs),
            artefact("b", lambda: b"B", calls, after=("a",)),
        ]

    graph.run(arts({"v": 1}), tmp_path, log=quiet)
    graph.run(arts({"v": 2}), tmp_path, log=quiet)  # a rebuilt, same bytes: b stays
    assert calls == ["a", "b", "a"]
    content["a"] = b"2"
    result = graph.run(arts({"v": 3}), tmp_path, log=quiet)
    assert calls[-2:] == ["a", "b"] and result.outcomes[1].reason == "a rebuilt"


def test_tampered_or_missing_output_is_rebuilt(tmp_path):
    calls = []
    arts = [artefact("a", lambda: b"A", calls)]
    graph.run(arts, tmp_path, log=quiet)
    (tmp_path / "a.bin").write_bytes(b"edited")
    assert graph.run(arts, tmp_path, log=quiet).outcomes[0].reason == "output changed on disk"
    (tmp_path / "a.bin").unlink()
    assert graph.run(arts, tmp_path, log=quiet).outcomes[0].reason == "output missing"


def test_failed_build_leaves_no_partial_output(tmp_path):
    def build(tmp):
        tmp.write_bytes(b"half")
        raise RackbootError("boom")

    with pytest.raises(RackbootError, match="boom"):
        graph.run([graph.Artefact("a", "test", "a.bin", {}, build)], tmp_path, log=quiet)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != graph.STATE_DIR]
    assert leftovers == []


def test_full_disk_is_one_clear_error_and_nothing_left(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)]).returncode:
        pytest.fail("cannot mount a tmpfs to fill (tests run as root)")
    try:
        big = graph.Artefact("big", "test", "big.bin", {}, lambda tmp: tmp.write_bytes(b"x" * (1 << 20)))
        with pytest.raises(RackbootError, match=r"no space left on device while writing .*big\.bin"):
            graph.run([big], mnt, log=quiet)
        assert not any(p.name.startswith(".big") or p.name == "big.bin" for p in mnt.iterdir())
    finally:
        subprocess.run(["umount", str(mnt)])


def test_concurrent_runs_are_serialised(tmp_path):
    active, overlap = [0], []
    lock = threading.Lock()

    def build(tmp):
        with lock:
            active[0] += 1
            overlap.append(active[0])
        import time

        time.sleep(0.2)
        tmp.write_bytes(b"x")
        with lock:
            active[0] -= 1

    # flock is per open file description, so two threads contend like two processes would
    def arts(n):
        return [graph.Artefact("a", "test", "a.bin", {"n": n}, build)]

    threads = [threading.Thread(target=graph.run, args=(arts(n), tmp_path), kwargs={"log": quiet}) for n in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert max(overlap) == 1 and len(overlap) == 2


def test_a_late_failure_leaves_the_previous_build_whole(tmp_path):
    """a is rebuilt, then b fails: a.bin, its stamp and artefacts.json stay as the last
    build left them, and the next good run commits both."""
    calls = []

    def arts(v, fail):
        return [
            artefact("a", lambda: f"A{v}".encode(), calls, inputs={"v": v}),
            graph.Artefact(
                "b", "test", "b.bin", {}, after=("a",), build=lambda tmp: _fail() if fail else tmp.write_bytes(b"B")
            ),
        ]

    graph.run(arts(1, False), tmp_path, log=quiet)
    before = {p: (tmp_path / p).read_bytes() for p in ("a.bin", "b.bin", "artefacts.json")}
    with pytest.raises(RackbootError, match="card step failed"):
        graph.run(arts(2, True), tmp_path, log=quiet)
    assert {p: (tmp_path / p).read_bytes() for p in before} == before
    assert not graph.stage_dir(tmp_path).exists()
    result = graph.run(arts(2, False), tmp_path, log=quiet)
    assert result.rebuilt == ["a", "b"] and (tmp_path / "a.bin").read_bytes() == b"A2"
    assert graph.run(arts(2, False), tmp_path, log=quiet).rebuilt == []


def _fail():
    raise RackbootError("card step failed")


def test_steps_read_what_this_run_built(tmp_path):
    """b copies a's output: it must see this run's a, not the previous build's."""

    def copy_a(tmp):
        tmp.write_bytes(b"from " + (graph.stage_dir(tmp_path) / "a.bin").read_bytes())

    def arts(v):
        return [
            artefact("a", lambda: f"A{v}".encode(), [], inputs={"v": v}),
            graph.Artefact("b", "test", "b.bin", {}, copy_a, after=("a",)),
        ]

    graph.run(arts(1), tmp_path, log=quiet)
    graph.run(arts(2), tmp_path, log=quiet)
    assert (tmp_path / "b.bin").read_bytes() == b"from A2"


def test_an_output_the_build_no_longer_makes_goes_when_it_commits(tmp_path):
    """Switching compression renames the initramfs: the old file leaves with the commit,
    not before (a failed run keeps it) and not never."""

    def initramfs(suffix, fail=False):
        return graph.Artefact(
            "initramfs",
            "initramfs",
            f"initramfs.cpio{suffix}",
            {"suffix": suffix},
            lambda tmp: _fail() if fail else tmp.write_bytes(suffix.encode()),
        )

    graph.run([initramfs(".gz"), artefact("extra", lambda: b"E", [])], tmp_path, log=quiet)
    with pytest.raises(RackbootError):
        graph.run([initramfs(".xz", fail=True)], tmp_path, log=quiet)
    assert (tmp_path / "initramfs.cpio.gz").is_file()
    graph.run([initramfs(".xz")], tmp_path, log=quiet)
    assert sorted(p.name for p in tmp_path.iterdir()) == [graph.STATE_DIR, "artefacts.json", "initramfs.cpio.xz"]
    doc = json.loads((tmp_path / "artefacts.json").read_text())
    assert [e["path"] for e in doc["artefacts"]] == ["initramfs.cpio.xz"]
    assert sorted(p.name for p in (tmp_path / graph.STATE_DIR).glob("*.json")) == ["initramfs.json"]


def test_a_manifest_path_outside_the_output_is_never_removed(tmp_path):
    out, outside = tmp_path / "out", tmp_path / "keep.txt"
    outside.write_text("mine")
    graph.run([artefact("a", lambda: b"A", [])], out, log=quiet)
    doc = json.loads((out / "artefacts.json").read_text())
    doc["artefacts"] += [{"path": "../keep.txt"}, {"path": str(outside)}]
    (out / "artefacts.json").write_text(json.dumps(doc))
    graph.run([artefact("a", lambda: b"A", [])], out, log=quiet)
    assert outside.read_text() == "mine"


def test_leftovers_of_a_killed_run_are_swept_under_the_lock(tmp_path):
    graph.run([artefact("a", lambda: b"A", [])], tmp_path, log=quiet)
    stage = graph.stage_dir(tmp_path)
    (stage / ".initramfs-x").mkdir(parents=True)
    (stage / ".initramfs-x/big").write_bytes(b"x" * 1000)
    (tmp_path / ".a.bin.tmp-99999").write_bytes(b"half")
    (tmp_path / graph.STATE_DIR / ".a.json.tmp-99999").write_bytes(b"half")
    (tmp_path / "notes.tmp-1").write_text("not ours: no leading dot")
    graph.run([artefact("a", lambda: b"A", [])], tmp_path, log=quiet)
    assert not stage.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [graph.STATE_DIR, "a.bin", "artefacts.json", "notes.tmp-1"]
    assert not list((tmp_path / graph.STATE_DIR).glob(".*tmp*"))
