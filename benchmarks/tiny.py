"""Every benchmark on a tiny input: with RACKBOOT_BENCH_TINY=1 in the environment (`make
bench TINY=1`, which runs them all, and tests/integration/test_benchmarks.py, which runs so
all but the QEMU ones and the build's), each module shrinks what it measures (image sizes,
package sets, runs, workers) until it runs in seconds. The code paths are the full run's,
so a crash shows in the test suite (or `make bench TINY=1`) rather than in the next `make
bench`; the figures printed then mean nothing."""

from __future__ import annotations

import os
from typing import TypeVar

V = TypeVar("V")

TINY = os.environ.get("RACKBOOT_BENCH_TINY", "") == "1"


def pick(full: V, tiny: V) -> V:
    """``full`` for `make bench`, ``tiny`` under RACKBOOT_BENCH_TINY=1."""
    return tiny if TINY else full
