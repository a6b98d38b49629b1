"""Sources after the master: rackboot.sources as the worker reads it, [master] sources as the
builder checks it and puts it on the kernel command line and in init.conf, and the report's
per-source field (rev10) as a master reads it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from rackboot import build, config, initramfs_tree
from rackboot.errors import ConfigError
from rackboot.firmware.boards import BOARDS
from rackboot.initramfs.updater import __main__ as updater_main
from rackboot.initramfs.updater import formats
from rackboot.initramfs.updater.errors import UpdaterError
from rackboot.initramfs.updater.sources import MAX_LIST, MAX_SOURCES, parse_list
from rackboot.uboot import script as uscript

from tests.helpers import write_config

NODE = "52-54-00-12-34-56"


@pytest.mark.parametrize(
    "text, urls",
    [
        ("", ()),
        ("http://10.1.0.2:8080", ("http://10.1.0.2:8080",)),
        ("http://10.1.0.2:8080,http://cache.rack/rackboot", ("http://10.1.0.2:8080", "http://cache.rack/rackboot")),
    ],
)
def test_a_list_of_http_urls_is_read_in_order(text, urls):
    assert parse_list(text) == urls


@pytest.mark.parametrize(
    "text, problem",
    [
        ("https://10.1.0.2", "not an http://host"),
        ("ftp://10.1.0.2", "not an http://host"),
        ("http://", "not an http://host"),
        ("10.1.0.2:8080", "not an http://host"),
        ("http://10.1.0.2:99999", "bad port"),
        ("http://10.1.0.2:80x", "bad port"),
        ("http://user@10.1.0.2", "user, a query or a fragment"),
        ("http://10.1.0.2/?a=b", "user, a query or a fragment"),
        ("http://10.1.0.2/#top", "user, a query or a fragment"),
        ("http://10.1.0.2,,http://10.1.0.3", "empty"),
        ("http://10.1.0.2 panic=1", "' '"),
        ('http://10.1.0.2/"', "'\"'"),
        ("http://10.1.0.2/$x", "'$'"),
        ("http://10.1.0.2/;reboot", "';'"),
        ("http://10.1.0.2/`id`", "'`'"),
        ("http://[fd00::2]:8080", "'['"),
        ("http://10.1.0.2/*", "'*'"),
        ("http://10.1.0.2/\x1b", "'\\x1b'"),
        ("http://10.1.0.2/é", "'é'"),
        ("http://10.1.0.2/" + "a" * 200, "longer than the 200"),
        ("http://10.1.0.2,http://10.1.0.2", "named twice"),
        (",".join(f"http://10.1.0.{n}" for n in range(MAX_SOURCES)), f"at most {MAX_SOURCES - 1} after the master"),
        (",".join(f"http://10.1.0.{n}/" + "a" * 90 for n in range(5)), f"longer than the {MAX_LIST} allowed"),
    ],
)
def test_a_bad_list_is_one_line_naming_what_is_wrong(text, problem):
    with pytest.raises(UpdaterError) as e:
        parse_list(text)
    assert str(e.value).startswith("rackboot.sources: ") and problem in str(e.value)
    assert "\n" not in str(e.value)


def test_the_updater_leaves_a_bad_list_out_whole_and_says_so(capsys):
    assert updater_main.extra_sources("http://10.1.0.2,https://10.1.0.3") == ()
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "rackboot: rackboot.sources: 'https://10.1.0.3': not an http://host[:port][/path] URL; "
        "the master alone is asked"
    ]
    assert updater_main.extra_sources("http://10.1.0.2,http://10.1.0.3") == ("http://10.1.0.2", "http://10.1.0.3")
    args = updater_main.parse_args(["--disk", "d", "--master", "http://m", "--sources", "http://s"])
    assert args.sources == "http://s"
    assert updater_main.parse_args(["--disk", "d", "--master", "http://m"]).sources == ""


# --- [master] sources ---------------------------------------------------------------------


def configured(tmp_path, sources: list[str]) -> config.Config:
    return config.load(write_config(tmp_path, master={"sources": sources}))


def bootargs(cfg: config.Config) -> dict[str, str]:
    context = build.script_context(build.Inputs(cfg), "vmlinuz", "initrd.img")
    out = {}
    for template in ("card.cmd.j2", "netboot.cmd.j2"):
        line = next(line for line in uscript.render(template, **context).splitlines() if "setenv bootargs" in line)
        out[template] = line
    return out


def test_sources_go_on_the_kernel_command_line_and_into_init_conf(tmp_path):
    cfg = configured(tmp_path, ["http://10.1.0.2:8080", "http://cache.rack/rackboot"])
    assert cfg.master.sources == ("http://10.1.0.2:8080", "http://cache.rack/rackboot")
    for template, line in bootargs(cfg).items():
        words = line.split('"')[1].split()
        assert "rackboot.master=http://10.0.2.2:8080" in words, template
        assert "rackboot.sources=http://10.1.0.2:8080,http://cache.rack/rackboot" in words, template
    spec = initramfs_tree.spec(cfg, BOARDS[("qemu-virt", "arm64")])
    assert spec.init_conf["RACKBOOT_SOURCES"] == "http://10.1.0.2:8080,http://cache.rack/rackboot"


def test_no_sources_no_word_on_the_command_line(tmp_path):
    cfg = configured(tmp_path, [])
    for line in bootargs(cfg).values():
        assert "rackboot.sources" not in line
    assert initramfs_tree.spec(cfg, BOARDS[("qemu-virt", "arm64")]).init_conf["RACKBOOT_SOURCES"] == ""


@pytest.mark.parametrize(
    "sources, problem",
    [
        (["https://10.1.0.2"], "[master] sources[0]: 'https://10.1.0.2': not an http://host"),
        (["http://10.1.0.2", "http://a b"], "[master] sources[1]: 'http://a b': contains ' '"),
        (["http://10.1.0.2,http://10.1.0.3"], "[master] sources[0]: 'http://10.1.0.2,http://10.1.0.3': contains ','"),
        (['http://10.1.0.2/"'], "contains '\"'"),
        ([f"http://10.1.0.{n}" for n in range(MAX_SOURCES)], f"at most {MAX_SOURCES - 1} after the master"),
        ([f"http://10.1.0.{n}/" + "a" * 90 for n in range(5)], f"longer than the {MAX_LIST} allowed"),
        (["http://10.1.0.2", "http://10.1.0.2"], "named twice"),
        (["http://10.0.2.2:8080"], "is the master, asked first already"),
        (["http://10.0.2.2:8080/"], "is the master, asked first already"),
    ],
)
def test_bad_sources_in_the_config_are_one_line_naming_the_setting(tmp_path, sources, problem):
    with pytest.raises(ConfigError) as e:
        configured(tmp_path, sources)
    assert "[master] sources" in str(e.value) and problem in str(e.value)
    assert "\n" not in str(e.value)


# --- the report's sources (rev10) ----------------------------------------------------------


def report(**extra) -> bytes:
    return json.dumps({"node": NODE, "phase": "boot", "bytes": 5, "seconds": 1.0, **extra}).encode()


def test_a_report_without_sources_reads_as_before_and_writes_none():
    parsed = formats.parse_report(report())
    assert parsed.sources is None and "sources" not in json.loads(formats.dump(parsed))


@pytest.mark.parametrize(
    "sources, problem",
    [
        ("http://a", "sources: expected a list of 1 to 8 sources"),
        ([], "sources: expected a list of 1 to 8 sources"),
        ([{"url": f"http://a{n}", "bytes": 0} for n in range(9)], "sources: expected a list of 1 to 8 sources"),
        (["http://a"], "sources[0]: expected a JSON object"),
        ([{"url": "https://a", "bytes": 0}], "sources[0]: url:"),
        ([{"url": "http://a b", "bytes": 0}], "sources[0]: url:"),
        ([{"url": "http://a", "bytes": -1}], "sources[0]: bytes: must be >= 0"),
        ([{"url": "http://a"}], "sources[0]: bytes: missing"),
        ([{"url": "http://a", "bytes": 1, "failed": "a\nb"}], "sources[0]: failed: must be one line"),
        ([{"url": "http://a", "bytes": 1, "failed": "a\x1b[2J"}], "sources[0]: failed: control character"),
    ],
)
def test_a_report_with_bad_sources_is_refused_naming_the_entry(sources, problem):
    with pytest.raises(UpdaterError) as e:
        formats.parse_report(report(sources=sources))
    assert problem in str(e.value)


# --- /init hands the list to the updater ----------------------------------------------------


def init_function(name: str) -> str:
    """One shell function of /init, as written there."""
    text = (Path(__file__).resolve().parents[2] / "initramfs/init.sh").read_text()
    start = text.index(f"\n{name}() {{") + 1
    return text[start : text.index("\n}\n", start) + 3]


@pytest.mark.parametrize(
    "cmdline, conf, given",
    [
        (
            "console=ttyAMA0 rackboot.master=http://10.0.2.2:8080 rackboot.sources=http://a:1,http://b/c "
            "rackboot.source=net",
            "http://conf",
            "http://a:1,http://b/c",
        ),
        ("console=ttyAMA0 rackboot.master=http://10.0.2.2:8080 rackboot.source=card", "http://conf", "http://conf"),
        ("rackboot.source=card", "", ""),
    ],
)
def test_init_passes_the_command_lines_sources_or_its_own_to_the_updater(tmp_path, cmdline, conf, given):
    (tmp_path / "cmdline").write_text(cmdline + "\n")
    recorder = tmp_path / "python3"
    recorder.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done\n')
    recorder.chmod(0o755)
    script = (init_function("param") + init_function("run_updater")).replace("/proc/cmdline", str(tmp_path / "cmdline"))
    script = script.replace("/usr/bin/python3", str(recorder))
    env = {"PATH": "/usr/bin:/bin", "RACKBOOT_MASTER": "http://m", "RACKBOOT_SOURCES": conf, "RACKBOOT_DISK": "/d"}
    out = subprocess.run(["sh", "-c", script + "run_updater"], env=env, capture_output=True, text=True, check=True)
    args = out.stdout.splitlines()
    assert args[args.index("--sources") + 1] == given
