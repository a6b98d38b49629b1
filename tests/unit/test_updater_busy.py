"""A busy master's answer, read by the updater: Retry-After parsed and bounded, each wait
stretched by a seeded jitter within its bounds; and the master's own count of the queue
behind its cap of streams."""

from __future__ import annotations

import random

import pytest
from rackboot.initramfs.updater.fetch import JITTER, MAX_RETRY_AFTER, jittered, retry_after
from rackboot.master import serve


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("2", 2),
        (" 5 ", 5),
        ("0", 1),  # asking again at once would hammer the master: a second at least
        ("86400", MAX_RETRY_AFTER),  # a worker looks again within a minute, whatever it is told
        (None, None),
        ("", None),
        ("-1", None),
        ("1.5", None),
        ("Wed, 21 Oct 2026 07:28:00 GMT", None),  # a date: the worker has no clock to read it by
    ],
)
def test_retry_after_is_whole_seconds_within_bounds(header, seconds):
    assert retry_after(header) == seconds


def test_jitter_stretches_each_wait_by_up_to_half_and_spreads_a_rack():
    rng = random.Random(2026)
    waits = [jittered(4, rng) for _ in range(1000)]
    assert all(4 <= w <= 4 * (1 + JITTER) for w in waits)
    assert min(waits) < 4.1 and max(waits) > 5.9  # the whole range is used, not one value
    assert waits == [jittered(4, r) for r in [random.Random(2026)] for _ in range(1000)]  # seeded: the same


def test_the_master_counts_streams_and_stretches_retry_after_with_the_queue(tmp_path):
    server = serve.make_server(tmp_path, quiet=True, max_streams=2)
    try:
        assert server.start_stream() is None and server.start_stream() is None
        told = [server.start_stream() for _ in range(40)]  # 40 refused within RETRY_AFTER s
        assert told[0] == serve.RETRY_AFTER
        assert told == sorted(told) and told[-1] == serve.RETRY_AFTER_MAX
        server.end_stream()
        assert server.start_stream() is None
        streams = server.stats()["streams"]
        assert streams == {"max": 2, "active": 2, "peak": 2, "refused": 40}
    finally:
        server.server_close()
