"""The session's one build of the qemu-virt example and its provisioned card (rack.Example),
for the e2e modules that boot the example as it is."""

from __future__ import annotations

import pytest

from tests.e2e.rack import Example, provision


@pytest.fixture(scope="session")
def example(tmp_path_factory) -> Example:
    return provision(tmp_path_factory.mktemp("example"))
