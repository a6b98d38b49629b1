"""The block index and pack of a published image, beside its stream (delta installs).

The index and pack bytes are the updater's own (initramfs/updater/delta.py writes and
reads them, so both sides share one definition); this module puts them in a version's
directory and describes them for the manifest. notes/delta.md says why 4 KiB blocks,
8-byte hashes and a per-block deflated pack.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import BinaryIO

from rackboot.errors import RackbootError
from rackboot.files import write_durable
from rackboot.initramfs.updater import delta
from rackboot.initramfs.updater.errors import UpdaterError
from rackboot.initramfs.updater.formats import BlockDelta

INDEX_NAME = "rootfs.ext4.index"
PACK_NAME = "rootfs.ext4.pack"


def write_index(data: BinaryIO, size: int, out: Path) -> BlockDelta:
    """Index and pack ``size`` bytes of ``data`` into directory ``out``; the manifest's entry."""
    pack_path = out / PACK_NAME
    try:
        with open(pack_path, "wb") as pack:
            index = delta.build_index(data, size, pack)
            pack.flush()
            os.fsync(pack.fileno())
    except UpdaterError as e:
        raise RackbootError(f"block index: {e}") from None
    body = index.dump()
    write_durable(out / INDEX_NAME, body)
    return BlockDelta(
        index=INDEX_NAME,
        index_size=len(body),
        index_sha256=hashlib.sha256(body).hexdigest(),
        pack=PACK_NAME,
        pack_size=index.pack_size,
        block_size=index.block_size,
    )
