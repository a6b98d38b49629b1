"""Numbers the master reads from requests and from names in its tree: ASCII digits alone.

str.isdigit takes '²', which int() then refuses (a traceback where an answer was due), and
int() takes '١٢', ' 7', '+7' and '7_0', none of which a client or a version directory means.
"""

from __future__ import annotations

MAX_DIGITS = 18  # a byte count, an offset or a version; longer is none the master uses (int() refuses past 4300)


def ascii_int(text: str | None) -> int | None:
    """``text`` as a whole number when it is 1 to MAX_DIGITS ASCII digits, else None."""
    if not text or len(text) > MAX_DIGITS or not text.isascii() or not text.isdigit():
        return None
    return int(text)
