"""The file manifest (rsync mode's signed file list): its lines, its strict reader (fuzzed
like the other parsers: only UpdaterError escapes, whatever parses round trips), the
scan that both the master and the worker run, and the comparison's one-line answers."""

from __future__ import annotations

import gzip
import hashlib
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rackboot.initramfs.updater import filemanifest as fm
from rackboot.initramfs.updater.errors import UpdaterError
from rackboot.initramfs.updater.filemanifest import Entry

SHA = hashlib.sha256(b"hi\n").hexdigest()
SAMPLE = (
    b"rackboot-files 1\n"
    b"d 0755 0 0 0 - - .\n"
    b"d 0755 0 0 0 - - bin\n"
    b"f 4755 0 0 3 " + SHA.encode() + b" - bin/su\n"
    b"h 4755 0 0 3 " + SHA.encode() + b" - bin/su2 bin/su\n"
    b"c 0666 0 0 0 - 1:3 dev-null\n"
    b"l 0777 0 0 11 - - etc%20mtab /proc/mount\n"
)


def test_a_sample_reads_field_by_field_and_dumps_the_same_bytes():
    entries = fm.parse(SAMPLE)
    assert [e.path for e in entries] == [b".", b"bin", b"bin/su", b"bin/su2", b"dev-null", b"etc mtab"]
    su, su2, null, mtab = entries[2:]
    assert (su.type, su.mode, su.size, su.sha256) == ("f", 0o4755, 3, SHA)
    assert (su2.type, su2.target) == ("h", b"bin/su")
    assert (null.type, null.rdev) == ("c", (1, 3))
    assert (mtab.type, mtab.target, mtab.size) == ("l", b"/proc/mount", 11)
    assert fm.dump(entries) == SAMPLE


def test_names_with_any_byte_round_trip_through_the_escapes():
    name = bytes(range(1, 256)).replace(b"/", b"")
    entry = Entry(name, "f", 0o644, 0, 0, 3, SHA)
    line = entry.line()
    assert line.count(b" ") == 7 and line.endswith(b"\n") and max(line[:-1]) < 0x7F
    assert fm.parse(fm.MAGIC + Entry(b".", "d", 0o755, 0, 0).line() + line)[1] == entry


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b"rackboot-files 2\nd 0755 0 0 0 - - .\n", "does not start with 'rackboot-files 1'"),
        (b"rackboot-files 1\nd 0755 0 0 0 - - .", "does not end with a newline"),
        (b"rackboot-files 1\n", "the root directory '.' is not listed"),
        (b"rackboot-files 1\nd 0755 0 0 0 - - a\n", "line 2: /a: the first entry must be the root"),
        (b"rackboot-files 1\nd 0755 0 0 0 - - .\nf 0644 0 0 0 - - a\n", "line 3: sha256 is 64 lowercase hex"),
        (b"rackboot-files 1\nd 0755 0 0 0 - - .\nd 0755 0 0 0 - - b\nd 0755 0 0 0 - - a\n", "line 4: /a: not after /b"),
        (b"rackboot-files 1\nd 0755 0 0 0 - - .\nd 0755 0 0 0 - - a/b\n", "line 3: /a/b: its directory is not listed"),
        (b"rackboot-files 1\nd 0755 0 0 0 - - .\nd 0755 0 0 0 - - ..\n", "not a relative path"),
        (b"rackboot-files 1\nd 0755 0 0 0 - - .\nd 0755 0 0 0 - - a%2fb\n", "not a name as quote writes it"),
        (b"rackboot-files 1\nd 0755 0 0 0 - - .\nd 0855 0 0 0 - - a\n", "mode b'0855' is not 4 octal digits"),
        (b"rackboot-files 1\nd 0755 0 0 0 - - .\nd 0755 00 0 0 - - a\n", "uid b'00' is not a whole number"),
        (b"rackboot-files 1\nd 0755 0 0 0 - - .\nl 0777 0 0 3 - - a /etc\n", "a symlink's size is its target's"),
        (b"rackboot-files 1\nd 0755 0 0 0 - - .\nc 0644 0 0 0 - - a\n", "major:minor is given for devices"),
        (b"rackboot-files 1\nd 0755 0 0 0 - - .\nd 0755 0 0 0 - - a b\n", "a target is given only for"),
        (b"rackboot-files 1\nd 0755 0 0 0 - - .\nh 0644 0 0 3 " + SHA.encode() + b" - a b\n", "an earlier file"),
        (b"rackboot-files 1\nd 0755 0 0 0 - - .\nd 0755 4294967296 0 0 - - a\n", "above 2^32-1"),
    ],
)
def test_bad_lines_are_one_line_naming_the_line_and_the_path(text, message):
    with pytest.raises(UpdaterError, match="^file manifest: ") as err:
        fm.parse(text)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_oversized_list_is_refused_unread():
    with pytest.raises(UpdaterError, match="larger than"):
        fm.parse(fm.MAGIC + b" " * fm.MAX_BYTES)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(data):
    for candidate in (data, fm.MAGIC + data, fm.MAGIC + b"d 0755 0 0 0 - - .\n" + data):
        try:
            fm.parse(candidate)
        except UpdaterError:
            pass


_FIELD = st.sampled_from(
    [b"f", b"h", b"d", b"l", b"c", b"x", b"0755", b"4755", b"0", b"1", b"-", b"1:3", SHA.encode(), b"a", b"a/b", b"%20"]
)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.lists(_FIELD, min_size=6, max_size=10), max_size=5))
def test_fuzz_structured_lines(lines):
    data = fm.MAGIC + b"d 0755 0 0 0 - - .\n" + b"".join(b" ".join(fields) + b"\n" for fields in lines)
    try:
        entries = fm.parse(data)
    except UpdaterError:
        return
    assert fm.parse(fm.dump(entries)) == entries  # whatever parses, round trips


def test_scan_lists_every_kind_and_hard_links_by_their_first_path(tmp_path):
    root = tmp_path / "root"
    (root / "b").mkdir(parents=True)
    (root / "b/file").write_bytes(b"hi\n")
    os.link(root / "b/file", root / "a-link")  # a-link sorts before b/file: it is the f entry
    (root / "l").symlink_to("/nowhere")
    os.mkfifo(root / "fifo")
    entries = fm.scan(root)
    by = {e.path: e for e in entries}
    assert entries[0].path == b"." and [e.path for e in entries[1:]] == sorted(e.path for e in entries[1:])
    assert (by[b"a-link"].type, by[b"b/file"].type, by[b"b/file"].target) == ("f", "h", b"a-link")
    assert by[b"a-link"].sha256 == SHA and by[b"l"].target == b"/nowhere" and by[b"fifo"].type == "p"
    assert fm.parse(fm.dump(entries)) == entries


def test_difference_names_the_first_path_and_field_that_differ(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "f").write_bytes(b"hi\n")
    signed = fm.scan(root)
    assert fm.difference(signed, fm.scan(root)) is None
    (root / "f").write_bytes(b"ho\n")
    other = hashlib.sha256(b"ho\n").hexdigest()
    assert fm.difference(signed, fm.scan(root)) == (
        f"/f: sha256 is {other[:16]}..., the signed file manifest says {SHA[:16]}..."
    )
    (root / "f").chmod(0o600)
    assert fm.difference(signed, fm.scan(root)) == "/f: mode is 0600, the signed file manifest says 0644"
    (root / "extra").mkdir()
    (root / "f").chmod(0o644)
    (root / "f").write_bytes(b"hi\n")
    assert fm.difference(signed, fm.scan(root)) == "/extra is not in the signed file manifest"
    assert fm.difference(signed, fm.scan(root, skip=frozenset([b"extra"]))) is None
    (root / "f").unlink()
    assert fm.difference(signed, fm.scan(root, skip=frozenset([b"extra"]))) == "/f is missing"


def test_the_served_file_is_gzip_and_plain_still_reads():
    entries = fm.parse(SAMPLE)
    assert fm.load(gzip.compress(SAMPLE, mtime=0)) == entries == fm.load(SAMPLE)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (gzip.compress(SAMPLE)[:-9], "truncated"),
        (gzip.compress(SAMPLE) + b"x", "followed by other bytes"),
        (b"\x1f\x8b" + b"\0" * 20, "not valid gzip"),
        (gzip.compress(fm.MAGIC + b" " * fm.MAX_BYTES), "inflates to more than"),
    ],
)
def test_bad_gzip_is_one_line(data, message):
    with pytest.raises(UpdaterError, match=message):
        fm.load(data)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_gzip_bytes(data):
    for candidate in (fm.GZIP_MAGIC + data, gzip.compress(data)):
        try:
            fm.load(candidate)
        except UpdaterError:
            pass
