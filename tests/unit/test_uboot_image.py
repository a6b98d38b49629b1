"""Legacy images: byte-identical to mkimage, and a parser that fails cleanly."""

import os
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rackboot.errors import RackbootError
from rackboot.uboot.image import legacy_image, parse_legacy_image


def mkimage(tmp_path, payload, *, arch, image_type, load=0, entry=0, name="rackboot", epoch=1700000000):
    src, out = tmp_path / "in", tmp_path / "out"
    src.write_bytes(payload)
    subprocess.run(
        [
            "mkimage",
            "-A",
            arch,
            "-O",
            "linux",
            "-T",
            image_type,
            "-C",
            "none",
            "-a",
            hex(load),
            "-e",
            hex(entry),
            "-n",
            name,
            "-d",
            str(src),
            str(out),
        ],
        check=True,
        capture_output=True,
        env={**os.environ, "SOURCE_DATE_EPOCH": str(epoch)},
    )
    return out.read_bytes()


@pytest.mark.parametrize("arch", ["arm", "arm64"])
@pytest.mark.parametrize("image_type", ["script", "ramdisk", "kernel"])
@pytest.mark.parametrize("size", [1, 3, 4097, 1 << 20])
def test_byte_identical_to_mkimage(tmp_path, arch, image_type, size):
    payload = os.urandom(size) if image_type != "script" else (b"echo rackboot\n" * size)[:size]
    load = 0x40000000 if image_type == "kernel" else 0
    ours = legacy_image(
        payload, image_type=image_type, arch=arch, name="rackboot", timestamp=1700000000, load=load, entry=load
    )
    assert ours == mkimage(tmp_path, payload, arch=arch, image_type=image_type, load=load, entry=load)


def test_mkimage_lists_and_dumpimage_extracts_ours(tmp_path):
    payload = os.urandom(5000)
    image = tmp_path / "r.uimg"
    image.write_bytes(legacy_image(payload, image_type="ramdisk", arch="arm64", name="initramfs", timestamp=0))
    listing = subprocess.run(["mkimage", "-l", str(image)], capture_output=True, text=True, check=True).stdout
    assert "initramfs" in listing and "RAMDisk Image" in listing and "AArch64" in listing
    subprocess.run(
        ["dumpimage", "-T", "ramdisk", "-p", "0", "-o", str(tmp_path / "x"), str(image)],
        check=True,
        capture_output=True,
    )
    assert (tmp_path / "x").read_bytes() == payload


def test_round_trip_and_rejections():
    good = legacy_image(b"hello", image_type="ramdisk", arch="arm", name="n", timestamp=5)
    header, payload = parse_legacy_image(good)
    assert payload == b"hello" and header.time == 5 and header.arch == 2
    cases = {
        "bad magic": b"\0" + good[1:],
        "header CRC": good[:10] + bytes([good[10] ^ 1]) + good[11:],
        "data CRC": good[:-1] + bytes([good[-1] ^ 1]),
        "truncated": good[:-2],
        "shorter than": good[:20],
    }
    for what, data in cases.items():
        with pytest.raises(RackbootError, match=what):
            parse_legacy_image(data)


def test_long_name_and_unknown_arch_are_refused():
    with pytest.raises(RackbootError, match="longer than 31"):
        legacy_image(b"x", image_type="script", arch="arm", name="n" * 32, timestamp=0)
    with pytest.raises(RackbootError, match="arch 'x86'"):
        legacy_image(b"x", image_type="script", arch="x86", name="n", timestamp=0)


_valid = legacy_image(b"echo fuzz\n", image_type="script", arch="arm64", name="fuzz", timestamp=0)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=200),
        st.tuples(st.integers(0, len(_valid) - 1), st.integers(0, 255)).map(
            lambda t: _valid[: t[0]] + bytes([t[1]]) + _valid[t[0] + 1 :]
        ),
    )
)
def test_parser_fuzz_only_clean_errors(data):
    try:
        parse_legacy_image(data)
    except RackbootError:
        pass
