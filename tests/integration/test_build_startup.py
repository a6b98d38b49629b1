"""A no-op `rackboot build` stays a small process: its up-to-date check hashes templates and
code but never renders or reads ELF, so it must not import jinja2, pyelftools or http.server
(together they cost a whole-process no-op more than the check itself)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from rackboot import build, config

from tests.helpers import quiet, write_config

pytestmark = pytest.mark.network

HEAVY = ("jinja2", "elftools", "http.server")

# The CLI as a user runs it, then what it imported, on the last line.
CHILD = f"""
import sys
from rackboot import cli
code = cli.main(["build", "-c", sys.argv[1]])
print("imported:", *sorted(m for m in sys.modules if m in {HEAVY!r} or m.partition(".")[0] in {HEAVY!r}))
sys.exit(code)
"""


def test_noop_build_imports_no_renderer_nor_elf_reader(tmp_path):
    path = write_config(tmp_path)
    build.build(config.load(path), log=quiet)
    result = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("rebuilt 0 of") for line in lines), result.stdout
    assert lines[-1] == "imported:"
