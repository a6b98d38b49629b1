"""master/index.py indexes an image in pieces on several processes: the same bytes as one pass."""

from __future__ import annotations

import io
import random

import pytest
from rackboot.errors import RackbootError
from rackboot.initramfs.updater import delta
from rackboot.master import index

BS = delta.BLOCK_SIZE


def image(blocks: int, seed: int) -> bytes:
    """Zero runs, repeated text (which the dictionary shortens across piece boundaries) and noise."""
    rng = random.Random(seed)
    out = bytearray()
    for i in range(blocks):
        kind = rng.randrange(3)
        out += [bytes(BS), (b"rackboot piece %d\n" % (i % 3) * 300)[:BS], rng.randbytes(BS)][kind]
    return bytes(out)


@pytest.mark.parametrize(("blocks", "tail"), [(40, 0), (33, 1000), (17, 4095)])
def test_pieces_on_several_processes_give_the_bytes_of_one_pass(tmp_path, monkeypatch, blocks, tail):
    data = image(blocks, blocks) + random.Random(tail).randbytes(tail)
    offset = 3 * BS + 100  # the image starts inside a file (a partition of an OS image)
    path = tmp_path / "os.img"
    path.write_bytes(b"\xff" * offset + data + b"\xee" * 999)
    monkeypatch.setattr(index, "PIECE", 8 * BS)  # many pieces, each starting in the middle of a window
    whole = io.BytesIO()
    one = delta.build_index(io.BytesIO(data), len(data), whole)
    pieces = io.BytesIO()
    with open(path, "rb") as f:
        f.seek(offset)
        many = index.build_index(f, len(data), pieces, workers=2)
        assert f.tell() == offset + len(data)  # where one pass leaves it
    assert (many.body(), pieces.getvalue()) == (one.body(), whole.getvalue())
    assert many.blocks > 2 * 8  # it did go in pieces


def test_an_image_that_ends_early_is_one_line(tmp_path, monkeypatch):
    path = tmp_path / "short.img"
    path.write_bytes(image(20, 1))
    monkeypatch.setattr(index, "PIECE", 8 * BS)
    with open(path, "rb") as f, pytest.raises(RackbootError, match="block index: the image ended inside bytes"):
        index.write_index(f, 40 * BS, tmp_path)
