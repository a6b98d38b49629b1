"""The block index and pack of a published image, beside its stream (delta installs).

The index and pack bytes are the updater's own (initramfs/updater/delta.py writes and
reads them, so both sides share one definition); this module puts them in a version's
directory, with the index as a diff against each of the few versions before it (what a
worker holding one of those fetches instead of the whole index), and describes them for the
manifest. notes/delta.md says why 4 KiB blocks, 8-byte hashes, a per-block deflated pack
with a 32 KiB dictionary, and diffs.
"""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import os
from array import array
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import BinaryIO

from rackboot.errors import RackbootError
from rackboot.files import write_durable
from rackboot.initramfs.updater import delta, formats, indexdiff
from rackboot.initramfs.updater.errors import UpdaterError
from rackboot.initramfs.updater.formats import BlockDelta

INDEX_NAME = "rootfs.ext4.index"
PACK_NAME = "rootfs.ext4.pack"
DIFF_BASES = 4  # earlier versions a new index is diffed against: the ones a rack still runs
DIFF_SHARE = 0.5  # a diff this share of the whole index or more is not worth a file
PIECE = 16 << 20  # bytes of the image a worker process indexes at a time (a multiple of every block size)


def write_index(data: BinaryIO, size: int, out: Path, earlier: Sequence[Path] = ()) -> BlockDelta:
    """Index and pack ``size`` bytes of ``data`` into directory ``out``, with the index's diffs
    against the versions in directories ``earlier`` (newest first); the manifest's entry."""
    pack_path = out / PACK_NAME
    try:
        with open(pack_path, "wb") as pack:
            index = build_index(data, size, pack)
            pack.flush()
            os.fsync(pack.fileno())
    except UpdaterError as e:
        raise RackbootError(f"block index: {e}") from None
    body = index.dump()
    write_durable(out / INDEX_NAME, body)
    for base in _bases(earlier, index):
        patch = indexdiff.diff(base, index)
        if len(patch) < DIFF_SHARE * len(body) and len(patch) <= formats.MAX_DOCUMENT:
            write_durable(out / indexdiff.diff_name(INDEX_NAME, base.plain_sha256), patch)
    return BlockDelta(
        index=INDEX_NAME,
        index_size=len(body),
        index_sha256=hashlib.sha256(body).hexdigest(),
        pack=PACK_NAME,
        pack_size=index.pack_size,
        block_size=index.block_size,
        window=index.window,
        plain_sha256=index.plain_sha256,
    )


def build_index(data: BinaryIO, size: int, pack: BinaryIO, *, workers: int | None = None) -> delta.BlockIndex:
    """delta.build_index of ``size`` bytes of file ``data`` from where it stands, the same
    bytes, but in pieces on every CPU: each block's dictionary is the image's bytes before it,
    not anything compressed, so each piece needs only the window before it. Indexing with a
    32 KiB dictionary costs ~3 times as much as without (notes/delta.md)."""
    workers = workers or len(os.sched_getaffinity(0))
    name = getattr(data, "name", None)
    if workers < 2 or size <= PIECE or not isinstance(name, str) or not os.path.isfile(name):
        return delta.build_index(data, size, pack)
    start = data.tell()
    pieces = [(name, start, at, min(PIECE, size - at)) for at in range(0, size, PIECE)]
    lengths: array[int] = array("H")
    hashes: list[bytes] = []
    context = multiprocessing.get_context("spawn")  # not fork: the caller may have threads (serve, tests)

    def take(done: Future[tuple[array[int], list[bytes], bytes]]) -> None:
        piece_lengths, piece_hashes, stored = done.result()
        pack.write(stored)
        lengths.extend(piece_lengths)
        hashes.extend(piece_hashes)

    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        running: deque[Future[tuple[array[int], list[bytes], bytes]]] = deque()
        for piece in pieces:
            running.append(pool.submit(_index_piece, *piece))
            if len(running) > 2 * workers:  # pieces done wait in memory for the ones before them: a few
                take(running.popleft())
        while running:
            take(running.popleft())
    data.seek(start + size)
    return delta.BlockIndex(size, lengths, hashes, window=delta.WINDOW)


def _index_piece(path: str, start: int, at: int, length: int) -> tuple[array[int], list[bytes], bytes]:
    """One piece's block lengths, hashes and pack bytes (in a worker process): ``length`` bytes
    at ``at`` in the image, which starts at byte ``start`` of file ``path``."""
    with open(path, "rb") as f:
        before = os.pread(f.fileno(), min(at, delta.WINDOW), start + at - min(at, delta.WINDOW))
        data = os.pread(f.fileno(), length, start + at)
    if len(data) != length:
        raise UpdaterError(f"the image ended inside bytes {at}..{at + length - 1}")
    pack = io.BytesIO()
    index = delta.build_index(io.BytesIO(data), length, pack, before=before)
    return index.lengths, index.hashes, pack.getvalue()


def _bases(earlier: Sequence[Path], new: delta.BlockIndex) -> list[delta.BlockIndex]:
    """The indexes of the first DIFF_BASES of ``earlier`` that have one a diff can be made against."""
    found: list[delta.BlockIndex] = []
    for directory in earlier:
        if len(found) == DIFF_BASES:
            break
        try:
            manifest = formats.parse_manifest((directory / "manifest.json").read_bytes())
            spec = manifest.delta
            if spec is None:
                continue
            base = delta.parse_index((directory / spec.index).read_bytes(), where=str(directory / spec.index))
        except (OSError, UpdaterError):
            continue  # a version without a readable index: its workers take the whole one
        if (base.block_size, base.hash_len) == (new.block_size, new.hash_len):
            found.append(base)
    return found
