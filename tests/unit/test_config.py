"""rackboot.toml parsing: defaults, validation, one-line errors with suggestions."""

from pathlib import Path

import pytest

from rackboot import config
from rackboot.errors import ConfigError


def parse(text, tmp_path):
    return config.parse(text, tmp_path / "rackboot.toml")


def test_defaults_fill_every_setting(tmp_path):
    cfg = parse("", tmp_path)
    assert cfg.get("board", "name") == "qemu-virt"
    assert cfg.get("board", "arch") == "arm64"
    assert cfg.get("output", "directory") == (tmp_path / "build").resolve()
    assert [p["name"] for p in cfg.get("layout", "partitions")] == ["boot", "a", "b", "data"]
    for s in config.SETTINGS:
        assert s.key in cfg.values[s.section]


def test_paths_are_relative_to_the_config_file(tmp_path):
    cfg = parse('[output]\ndirectory = "out/x"\n[initramfs.files]\n"/etc/motd" = "motd.txt"\n', tmp_path)
    assert cfg.get("output", "directory") == (tmp_path / "out/x").resolve()
    assert cfg.get("initramfs", "files") == {"/etc/motd": (tmp_path / "motd.txt").resolve()}


@pytest.mark.parametrize("text, expected", [
    ("[initramfs]\nmodles = []\n", r"\[initramfs\] modles: unknown key \(did you mean 'modules'\?\)"),
    ("[bord]\nname = 'rpi3'\n", r"\[bord\]: unknown section \(did you mean 'board'\?\)"),
    ("[board]\narch = 'arm46'\n", r"\[board\] arch: expected one of arm64, armhf, got 'arm46' \(did you mean 'arm64'\?\)"),
    ("[master]\nport = '80'\n", r"\[master\] port: expected an integer, got '80'"),
    ("[initramfs]\nmodules = 'virtio_net'\n", r"\[initramfs\] modules: expected a list of strings"),
    ("[initramfs]\nuboot_wrap = 1\n", r"uboot_wrap: expected true or false"),
    ("[board\n", r"not valid TOML"),
    ("[layout]\npartitions = [{name='boot', size_mib='rest'}, {name='a', size_mib=1}]\n",
     r"only allowed on the last partition"),
    ("[layout]\npartitions = [{name='boot', size_mib=8}, {name='a', size_mib=8}]\n",
     r"needs a partition named 'b'"),
    ("[layout]\npartitions = [{name='boot', size_mib=8, typ='83'}]\n", r"unknown key 'typ' \(did you mean 'type'\?\)"),
])
def test_bad_config_is_one_line_naming_file_and_key(tmp_path, text, expected):
    with pytest.raises(ConfigError, match=expected) as info:
        parse(text, tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(tmp_path / "rackboot.toml"))
    assert info.value.exit_code == 2


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        config.load(tmp_path / "nope.toml")


def test_reference_lists_every_setting():
    text = config.reference()
    for s in config.SETTINGS:
        assert f"`[{s.section}] {s.key}`" in text


def test_readme_carries_the_current_reference():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert config.reference() in readme, "README settings table is stale: paste `rackboot config --reference`"
