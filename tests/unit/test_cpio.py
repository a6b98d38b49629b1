"""The newc writer: GNU cpio must read back exactly the tree we meant, byte-stable."""

import io
import os
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rackboot import cpio
from rackboot.errors import RackbootError

MTIME = 1_700_000_000


def archive_bytes(entries, mtime=MTIME) -> bytes:
    buf = io.BytesIO()
    cpio.write_archive(entries, buf, mtime=mtime)
    return buf.getvalue()


def extract(data: bytes, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["cpio", "-idm", "--quiet", "--no-absolute-filenames"], input=data, cwd=dest, check=True, capture_output=True
    )


def listing(data: bytes) -> list[str]:
    out = subprocess.run(["cpio", "-t", "--quiet"], input=data, check=True, capture_output=True).stdout
    return out.decode().splitlines()


def snapshot(root: Path) -> dict:
    """What a tree means: per path its type, permissions, content or target, link group.

    A hard-link group is named by its smallest path, so the name does not depend on
    the order the filesystem lists directories in.
    """
    result, names_of = {}, {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(dirpath, name)
            st_ = full.lstat()
            rel = full.relative_to(root).as_posix()
            perm = stat.S_IMODE(st_.st_mode)
            if stat.S_ISLNK(st_.st_mode):
                result[rel] = ("link", os.readlink(full))
            elif stat.S_ISDIR(st_.st_mode):
                result[rel] = ("dir", perm)
            elif stat.S_ISREG(st_.st_mode):
                names_of.setdefault(st_.st_ino, []).append(rel)
                result[rel] = ("file", perm, full.read_bytes(), st_.st_ino, st_.st_nlink)
            elif stat.S_ISCHR(st_.st_mode) or stat.S_ISBLK(st_.st_mode):
                kind = "c" if stat.S_ISCHR(st_.st_mode) else "b"
                result[rel] = (kind, perm, os.major(st_.st_rdev), os.minor(st_.st_rdev))
            elif stat.S_ISFIFO(st_.st_mode):
                result[rel] = ("fifo", perm)
    for rel, info in result.items():
        if info[0] == "file":
            group = min(names_of[info[3]]) if info[4] > 1 else None
            result[rel] = info[:3] + (group,) + info[4:]
    return result


def parse_headers(data: bytes) -> list[dict]:
    """An independent reader: magic, 13 hex fields, name, each start checked for alignment."""
    names = [
        "ino",
        "mode",
        "uid",
        "gid",
        "nlink",
        "mtime",
        "filesize",
        "devmajor",
        "devminor",
        "rdevmajor",
        "rdevminor",
        "namesize",
        "check",
    ]
    members, pos = [], 0
    while True:
        assert pos % 4 == 0, f"member at {pos} is not 4-aligned"
        h = {"magic": data[pos : pos + 6].decode()}
        for i, name in enumerate(names):
            h[name] = int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16)
        name_end = pos + 110 + h["namesize"]
        assert data[name_end - 1] == 0, "namesize must count the NUL"
        h["name"] = data[pos + 110 : name_end - 1].decode()
        data_at = (name_end + 3) & ~3
        assert data[name_end:data_at] == bytes(data_at - name_end)
        h["data"] = data[data_at : data_at + h["filesize"]]
        members.append(h)
        end = data_at + h["filesize"]
        pos = (end + 3) & ~3
        assert data[end:pos] == bytes(pos - end)
        if h["name"] == "TRAILER!!!":
            assert pos == len(data)
            return members


def stage(root: Path, order=1, umask=0o022, mtime_seed=0) -> Path:
    """A small tree with every kind the staged initramfs has, built in a chosen order."""
    steps = [
        lambda: (root / "bin").mkdir(),
        lambda: (root / "lib/modules").mkdir(parents=True),
        lambda: (root / "bin/busybox").write_bytes(b"\x7fELF" + bytes(range(256)) * 9),
        lambda: (root / "bin/busybox").chmod(0o4755),  # setuid dropped, exec kept
        lambda: os.symlink("busybox", root / "bin/sh"),
        lambda: (root / "init").write_text("#!/bin/sh\nexec sh\n"),
        lambda: (root / "init").chmod(0o700),
        lambda: (root / "lib/modules/a.ko").write_bytes(b"module" * 1000),
        lambda: os.link(root / "lib/modules/a.ko", root / "lib/alias.ko"),
        lambda: (root / "etc").mkdir(mode=0o700),
        lambda: (root / "etc/conf").write_text("x=1\n"),
        lambda: (root / "etc/conf").chmod(0o600),
        lambda: (root / "empty").write_bytes(b""),
    ]
    root.mkdir(parents=True, exist_ok=True)
    old = os.umask(umask)
    try:
        # Chains after the first (which makes directories) are independent of each
        # other; order=-1 runs them in reverse.
        chains = [steps[0:2], steps[2:5], steps[5:7], steps[7:9], steps[9:12], steps[12:]]
        if order < 0:
            chains = [chains[0]] + chains[1:][::-1]
        for chain in chains:
            for step in chain:
                step()
    finally:
        os.umask(old)
    for i, path in enumerate(sorted(root.rglob("*"))):
        if not path.is_symlink():
            os.utime(path, (mtime_seed + i * 7919, mtime_seed + i * 7919))
    return root


# --- GNU cpio reads what we meant ----------------------------------------------------


def test_gnu_cpio_extracts_the_same_tree(tmp_path):
    src = stage(tmp_path / "src")
    entries = cpio.tree_entries(src)
    data = archive_bytes(entries)
    extract(data, tmp_path / "out")
    got = snapshot(tmp_path / "out")
    assert got["bin/busybox"][:3] == ("file", 0o755, (src / "bin/busybox").read_bytes())
    assert got["init"][:2] == ("file", 0o755) and got["etc/conf"][:2] == ("file", 0o644)
    assert got["etc"] == ("dir", 0o755) and got["empty"][:3] == ("file", 0o644, b"")
    assert got["bin/sh"] == ("link", "busybox")
    # One inode, two names, data present through both.
    assert got["lib/modules/a.ko"][2:] == got["lib/alias.ko"][2:] == (b"module" * 1000, "lib/alias.ko", 2)
    assert (tmp_path / "out/lib/alias.ko").stat().st_ino == (tmp_path / "out/lib/modules/a.ko").stat().st_ino
    assert set(got) == {e.path for e in entries}


def test_device_nodes_and_fifos_come_out_as_nodes(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("creating device nodes needs root")
    entries = [
        cpio.Device("dev/console", 0o600, "c", 5, 1),
        cpio.Device("dev/mmcblk0", 0o660, "b", 179, 0),
        cpio.Device("dev/big", 0o600, "c", 511, 70000),
        cpio.Fifo("run/pipe", 0o600),
    ]
    extract(archive_bytes(entries), tmp_path)
    got = snapshot(tmp_path)
    assert got["dev/console"] == ("c", 0o600, 5, 1)
    assert got["dev/mmcblk0"] == ("b", 0o660, 179, 0)
    assert got["dev/big"] == ("c", 0o600, 511, 70000)
    assert got["run/pipe"] == ("fifo", 0o600)
    assert got["dev"] == ("dir", 0o755) and got["run"] == ("dir", 0o755)


def test_cpio_lists_exactly_our_paths_parents_first(tmp_path):
    entries = cpio.tree_entries(stage(tmp_path / "src")) + [cpio.Device("dev/console", 0o600, "c", 5, 1)]
    names = listing(archive_bytes(entries))
    assert names == [
        "bin",
        "bin/busybox",
        "bin/sh",
        "dev",
        "dev/console",
        "empty",
        "etc",
        "etc/conf",
        "init",
        "lib",
        "lib/alias.ko",
        "lib/modules",
        "lib/modules/a.ko",
    ]


def test_archive_ignores_umask_mtimes_and_creation_order(tmp_path):
    a = stage(tmp_path / "a", order=1, umask=0o022, mtime_seed=0)
    b = stage(tmp_path / "b", order=-1, umask=0o077, mtime_seed=123456789)
    assert (a / "lib").stat().st_mode != (b / "lib").stat().st_mode  # the inputs really differ
    assert archive_bytes(cpio.tree_entries(a)) == archive_bytes(cpio.tree_entries(b))
    # And the list order handed to the writer does not matter either.
    entries = cpio.tree_entries(a)
    assert archive_bytes(entries[::-1]) == archive_bytes(entries)


def test_prefix_places_the_tree_below_a_path(tmp_path):
    src = stage(tmp_path / "src")
    names = [m["name"] for m in parse_headers(archive_bytes(cpio.tree_entries(src / "lib", prefix="/usr/lib")))]
    assert names == ["usr", "usr/lib", "usr/lib/alias.ko", "usr/lib/modules", "usr/lib/modules/a.ko", "TRAILER!!!"]


# --- the bytes themselves ------------------------------------------------------------


def test_header_fields(tmp_path):
    entries = [
        cpio.Directory("a"),
        cpio.Directory("a/b"),
        cpio.Directory("a/c", 0o700),
        cpio.File("a/b/f", 0o644, b"hello"),
        cpio.Symlink("a/l", "b/f"),
        cpio.Device("dev/console", 0o600, "c", 5, 1),
    ]
    members = parse_headers(archive_bytes(entries, mtime=42))
    by_name = {m["name"]: m for m in members}
    assert all(m["magic"] == "070701" for m in members)
    assert [m["name"] for m in members] == ["a", "a/b", "a/b/f", "a/c", "a/l", "dev", "dev/console", "TRAILER!!!"]
    assert [m["ino"] for m in members[:-1]] == list(range(1, 8))
    assert all(m["uid"] == m["gid"] == 0 and m["mtime"] == 42 for m in members[:-1])
    assert all(m["devmajor"] == m["devminor"] == m["check"] == 0 for m in members)
    assert all(m["namesize"] == len(m["name"]) + 1 for m in members)
    assert by_name["a"]["nlink"] == 4 and by_name["a/b"]["nlink"] == 2  # 2 + subdirectories
    assert by_name["a"]["mode"] == 0o040755 and by_name["a/c"]["mode"] == 0o040700
    assert (by_name["a/b/f"]["mode"], by_name["a/b/f"]["data"]) == (0o100644, b"hello")
    assert (by_name["a/l"]["mode"], by_name["a/l"]["data"]) == (0o120777, b"b/f")
    console = by_name["dev/console"]
    assert (console["mode"], console["rdevmajor"], console["rdevminor"]) == (0o020600, 5, 1)
    trailer = members[-1]
    assert (trailer["ino"], trailer["mode"], trailer["nlink"], trailer["filesize"]) == (0, 0, 1, 0)


def test_hard_link_group_carries_data_once_on_its_last_member():
    entries = [
        cpio.File("m/z", 0o755, b"payload"),
        cpio.HardLink("a", "m/z"),
        cpio.HardLink("m/b", "/m/z"),
        cpio.File("other", 0o644, b"x"),
    ]
    members = {m["name"]: m for m in parse_headers(archive_bytes(entries))}
    group = [members[n] for n in ("a", "m/b", "m/z")]
    assert len({m["ino"] for m in group}) == 1 and members["other"]["ino"] != group[0]["ino"]
    assert [m["nlink"] for m in group] == [3, 3, 3]
    assert [m["filesize"] for m in group] == [0, 0, 7]
    assert group[-1]["data"] == b"payload" and all(m["mode"] == 0o100755 for m in group)


def test_implied_parents_are_added_as_0755_directories():
    members = parse_headers(archive_bytes([cpio.File("usr/lib/x/y", 0o644, b"")]))
    assert [(m["name"], m["mode"]) for m in members[:3]] == [
        ("usr", 0o040755),
        ("usr/lib", 0o040755),
        ("usr/lib/x", 0o040755),
    ]


def test_large_file_streams_whole(tmp_path):
    big = tmp_path / "big"
    payload = os.urandom(1000) * (3 * cpio.CHUNK // 1000 + 17)  # several chunks and a tail
    big.write_bytes(payload)
    members = parse_headers(archive_bytes([cpio.File("big", 0o644, big), cpio.File("small", 0o644, b"abc")]))
    assert members[0]["data"] == payload and members[1]["data"] == b"abc"


def test_read_members_parses_gnu_cpio_output(tmp_path):
    stage(tmp_path / "src")
    data = subprocess.run(
        "find . | LC_ALL=C sort | cpio -o -H newc --quiet",
        shell=True,
        cwd=tmp_path / "src",
        check=True,
        capture_output=True,
    ).stdout
    members = cpio.read_members(data)
    assert members[-1].name == "TRAILER!!!"
    busybox = next(m for m in members if m.name.removeprefix("./") == "bin/busybox")
    assert (
        data[busybox.data_offset : busybox.data_offset + busybox.filesize]
        == (tmp_path / "src/bin/busybox").read_bytes()
    )


# --- refusals ------------------------------------------------------------------------


def test_duplicate_path_is_refused_by_name():
    with pytest.raises(RackbootError, match="dev/console"):
        archive_bytes([cpio.Device("dev/console", 0o600, "c", 5, 1), cpio.File("/dev/console", 0o644, b"")])


@pytest.mark.parametrize(
    "entries, message",
    [
        ([cpio.File("a/../b", 0o644, b"")], "bad archive path"),
        ([cpio.Directory("/")], "bad archive path"),
        ([cpio.File("f", 0o644, b""), cpio.File("f/g", 0o644, b"")], "not a directory"),
        ([cpio.HardLink("h", "missing")], "not a file"),
        ([cpio.Symlink("s", "x"), cpio.HardLink("h", "s")], "not a file"),
        ([cpio.Device("d", 0o600, "x", 1, 1)], "kind"),
        ([cpio.File("f", 0o100644, b"")], "permission bits"),
        ([cpio.File("f", 0o644, Path("/nonexistent/rackboot"))], "cannot read"),
    ],
)
def test_bad_entries_are_refused(entries, message):
    with pytest.raises(RackbootError, match=message):
        archive_bytes(entries)


def test_mtime_out_of_range_is_refused():
    with pytest.raises(RackbootError, match="mtime"):
        archive_bytes([], mtime=-1)


def test_device_nodes_in_the_tree_are_refused(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("creating device nodes needs root")
    os.mknod(tmp_path / "null", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    with pytest.raises(RackbootError, match="cpio.Device"):
        cpio.tree_entries(tmp_path)


# --- random trees --------------------------------------------------------------------

NAMES = st.sampled_from(["a", "b", "c", "d.txt", "e-f", "Z", "ü", "a b"])
NODES = st.recursive(
    st.one_of(
        st.tuples(st.just("file"), st.binary(max_size=300), st.booleans()),
        st.tuples(st.just("link"), st.sampled_from(["a", "../b", "/x/y", "nowhere"])),
    ),
    lambda children: st.dictionaries(NAMES, children, max_size=4),
    max_leaves=12,
)


def build(root: Path, node: dict, files: list) -> None:
    for name, child in node.items():
        path = root / name
        if isinstance(child, dict):
            path.mkdir()
            build(path, child, files)
        elif child[0] == "file":
            path.write_bytes(child[1])
            path.chmod(0o750 if child[2] else 0o640)
            files.append(path)
        else:
            os.symlink(child[1], path)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=st.dictionaries(NAMES, NODES, max_size=5), link_every=st.integers(2, 4))
def test_random_trees_round_trip_through_gnu_cpio(tree, link_every):
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp, "src"), Path(tmp, "out")
        src.mkdir()
        files: list[Path] = []
        build(src, tree, files)
        for i, f in enumerate(files[::link_every]):  # some hard links into other directories
            os.link(f, src / f"hl{i}")
        extract(archive_bytes(cpio.tree_entries(src)), out)
        want, got = snapshot(src), snapshot(out)
        normalised = {}
        for path, info in want.items():
            if info[0] == "dir":
                info = ("dir", 0o755)
            elif info[0] == "file":
                info = ("file", 0o755 if info[1] & 0o111 else 0o644) + info[2:]
            normalised[path] = info
        assert got == normalised
