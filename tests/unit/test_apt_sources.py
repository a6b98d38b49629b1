"""tools/apt-firmware-source on sample apt sources in a temporary root (never the real /etc/apt)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tools/apt-firmware-source"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"

DEB822 = f"""Types: deb
# a comment inside the paragraph
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: {KEYRING}

Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main
Signed-By: {KEYRING}
"""

ONE_LINE = """# deb http://elsewhere.example/debian bookworm main non-free-firmware
deb-src http://apt.lan:3142/debian bookworm main non-free-firmware
deb [ arch=amd64,arm64 ] http://apt.lan:3142/debian bookworm main contrib   # the local cache
deb http://apt.lan:3142/debian bookworm-updates main
deb http://apt.lan:3142/debian-security bookworm-security main
"""


def make_root(tmp_path: Path, files: dict[str, str], codename: str = "bookworm") -> Path:
    root = tmp_path / "root"
    (root / "etc/apt/sources.list.d").mkdir(parents=True)
    (root / "etc/os-release").write_text(f'NAME="Debian GNU/Linux"\nVERSION_CODENAME={codename}\n')
    for name, text in files.items():
        (root / "etc/apt" / name).write_text(text)
    return root


def run(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", str(SCRIPT), str(root)], capture_output=True, text=True, timeout=60)


def written(root: Path) -> str:
    return (root / "etc/apt/sources.list.d/rackboot-firmware.sources").read_text()


def body(text: str) -> str:
    return "".join(line + "\n" for line in text.splitlines() if not line.startswith("#"))


def test_deb822_sources_give_their_uri_suites_and_keyring(tmp_path):
    root = make_root(tmp_path, {"sources.list.d/debian.sources": DEB822})
    proc = run(root)
    assert proc.returncode == 0, proc.stderr
    assert body(written(root)) == (
        "Types: deb\nURIs: http://mirror.example/debian\n"
        "Suites: bookworm bookworm-updates\nComponents: non-free-firmware\n"
        f"Signed-By: {KEYRING}\n"
    )
    assert "wrote" in proc.stdout and "http://mirror.example/debian" in proc.stdout


def test_one_line_sources_on_a_local_mirror_keep_the_mirror(tmp_path):
    root = make_root(tmp_path, {"sources.list": ONE_LINE})
    assert run(root).returncode == 0
    assert body(written(root)) == (
        "Types: deb\nURIs: http://apt.lan:3142/debian\n"
        "Suites: bookworm bookworm-updates\nComponents: non-free-firmware\n"
    )


def test_a_third_party_repository_naming_bookworm_main_is_not_taken(tmp_path):
    third_party = "deb [signed-by=/usr/share/keyrings/php.gpg] https://php.example/debian bookworm main\n"
    root = make_root(tmp_path, {"sources.list.d/a-php.list": third_party, "sources.list.d/debian.sources": DEB822})
    assert run(root).returncode == 0
    assert "URIs: http://mirror.example/debian\n" in written(root)


def test_a_resigned_mirror_is_taken_when_there_is_no_other(tmp_path):
    mirror = "deb [signed-by=/etc/apt/keyrings/lab.gpg] http://aptly.lan/debian bookworm main\n"
    root = make_root(tmp_path, {"sources.list": mirror})
    assert run(root).returncode == 0
    assert body(written(root)) == (
        "Types: deb\nURIs: http://aptly.lan/debian\nSuites: bookworm\n"
        "Components: non-free-firmware\nSigned-By: /etc/apt/keyrings/lab.gpg\n"
    )


def test_already_enabled_writes_nothing_and_drops_an_older_file_of_ours(tmp_path):
    enabled = DEB822.replace("Components: main\n", "Components: main non-free-firmware\n", 1)
    root = make_root(
        tmp_path,
        {
            "sources.list.d/debian.sources": enabled,
            "sources.list.d/rackboot-firmware.sources": "Types: deb\nURIs: http://old.example/debian\n",
        },
    )
    proc = run(root)
    assert proc.returncode == 0, proc.stderr
    assert not (root / "etc/apt/sources.list.d/rackboot-firmware.sources").exists()
    assert "already enabled" in run(root).stdout


def test_disabled_entries_and_files_apt_ignores_do_not_count(tmp_path):
    disabled = DEB822.replace("Components: main\n", "Components: main non-free-firmware\nEnabled: no\n", 1)
    root = make_root(
        tmp_path,
        {
            "sources.list.d/off.sources": disabled.split("\n\n")[0] + "\n",
            "sources.list.d/firmware.list.disabled": "deb http://x.example/debian bookworm non-free-firmware\n",
            "sources.list": ONE_LINE,
        },
    )
    assert run(root).returncode == 0
    assert "URIs: http://apt.lan:3142/debian\n" in written(root)


def test_a_second_run_changes_nothing(tmp_path):
    root = make_root(tmp_path, {"sources.list.d/debian.sources": DEB822})
    run(root)
    first = written(root)
    proc = run(root)
    assert (proc.returncode, written(root)) == (0, first)
    assert "up to date" in proc.stdout


def test_the_release_comes_from_os_release(tmp_path):
    root = make_root(tmp_path, {"sources.list": ONE_LINE.replace("bookworm", "trixie")}, codename="trixie")
    assert run(root).returncode == 0
    assert "Suites: trixie trixie-updates\n" in written(root)


@pytest.mark.parametrize(
    "files,reason",
    [
        (
            {"sources.list": "deb http://apt.lan/debian-security bookworm-security main\n"},
            "no enabled source in {apt} serves Debian's bookworm main",
        ),
        ({}, "no apt sources in {apt}"),
    ],
)
def test_no_source_to_follow_is_one_line_and_writes_nothing(tmp_path, files, reason):
    root = make_root(tmp_path, files)
    proc = run(root)
    assert proc.returncode == 1
    assert proc.stderr.startswith("apt-firmware-source: " + reason.format(apt=root / "etc/apt"))
    assert proc.stderr.count("\n") == 1
    assert list((root / "etc/apt/sources.list.d").iterdir()) == []


def test_no_debian_host_is_named_in_the_repository():
    """The machine's own sources say where Debian is; the project names no mirror host."""
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, check=True).stdout
    host = re.compile(rb"[a-z0-9.-]*\bdebian\.(org|net)\b")
    named = [
        name
        for name in tracked.decode().split("\0")
        if name and (REPO / name).is_file() and host.search((REPO / name).read_bytes())
    ]
    assert named == []
