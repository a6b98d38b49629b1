"""The updater's one error type.

The updater ships alone in the initramfs, so it cannot import rackboot.errors; the
builder catches UpdaterError where it imports this package.
"""


class UpdaterError(Exception):
    """One line: what was wrong and where."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split("\n")))


class Refused(UpdaterError):
    """What the master sent is not installed: a bad or missing signature, or a replay."""


class NoCard(UpdaterError):
    """The card is not there: no device at its path, or a reader with no medium in it.
    Nothing to install to or boot from, and retrying will not change that."""


class DiskError(UpdaterError):
    """The card failed a read, a write or a sync: the worker's own fault, never a source's
    (sources.py passes over a source for what it sent, not for what the card did with it)."""
