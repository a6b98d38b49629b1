"""rackboot.toml parsing: defaults, validation, one-line errors with suggestions."""

import dataclasses
import json
import re
import tomllib
from pathlib import Path

import pytest
from rackboot import config
from rackboot.errors import ConfigError
from rackboot.initramfs.updater.formats import DEFAULT_TRIES, Mount, Repartition


def parse(text, tmp_path):
    return config.parse(text, tmp_path / "rackboot.toml")


def test_defaults_fill_every_setting(tmp_path):
    cfg = parse("", tmp_path)
    assert cfg.board.name == "qemu-virt"
    assert cfg.board.arch == "arm64"
    assert cfg.output.directory == (tmp_path / "build").resolve()
    assert [p.name for p in cfg.layout.partitions] == ["boot", "a", "b", "data"]
    assert cfg.layout.tries == 3 and cfg.master.port == 8080 and cfg.kernel.path is None
    assert cfg.initramfs.packages == ("busybox-static",)


def test_each_section_dataclass_has_exactly_the_settings_of_its_section():
    """SETTINGS and the dataclasses cannot drift: same sections, same keys in the same order."""
    assert list(config.SECTIONS) == [f.name for f in dataclasses.fields(config.Config)][1:]
    for section, cls in config.SECTIONS.items():
        keys = [s.key for s in config.SETTINGS if s.section == section]
        assert [f.name for f in dataclasses.fields(cls)] == keys, section


# The annotation each kind of setting is held under (a path without a default may be unset)
KIND_TYPES = {
    "str": "str",
    "int": "int",
    "bool": "bool",
    "path": "Path",
    "list[str]": "tuple[str, ...]",
    "table[path]": "Mapping[str, Path]",
    "layout": "tuple[Partition, ...]",
}


def test_each_field_is_typed_as_its_settings_kind():
    for s in config.SETTINGS:
        annotation = {f.name: f.type for f in dataclasses.fields(config.SECTIONS[s.section])}[s.key]
        if s.kind == "choice":  # held as the StrEnum it is checked against
            assert s.choices is not None and annotation == s.choices.__name__, s.name
            continue
        wanted = KIND_TYPES[s.kind] + (" | None" if s.kind == "path" and s.default is None else "")
        assert annotation == wanted, s.name


def test_choices_load_as_their_enums(tmp_path):
    cfg = config.parse('[layout]\nmount = "rw"\n', tmp_path / "rackboot.toml")
    assert cfg.layout.mount is Mount.RW and cfg.board.name is config.BoardName.QEMU_VIRT
    assert cfg.layout.repartition is Repartition.ALLOWED and cfg.layout.tries == DEFAULT_TRIES


def test_a_config_is_immutable(tmp_path):
    cfg = parse('[initramfs.files]\n"/etc/motd" = "motd.txt"\n', tmp_path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.layout.tries = 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.layout.partitions[0].size_mib = 1
    with pytest.raises(TypeError):
        cfg.initramfs.files["/etc/passwd"] = tmp_path
    assert isinstance(cfg.initramfs.modules, tuple) and isinstance(cfg.layout.partitions, tuple)


def test_plain_is_the_json_able_rebuild_key_of_a_section(tmp_path):
    cfg = parse('[initramfs.files]\n"/etc/motd" = "motd.txt"\n[master]\nkey = "k"\n', tmp_path)
    master = config.plain(cfg.master)
    assert master == {
        "address": "10.0.2.2",
        "port": 8080,
        "sources": [],
        "max_streams": 8,
        "key": str((tmp_path / "k").resolve()),
        "directory": str((tmp_path / "master").resolve()),
        "hostname": "",
        "adopt": "auto",
        "token": "",
        "stale": 86400,
        "rsync_port": 0,
        "database": "",
        "upstream": "",
        "upstream_key": None,
        "upstream_rsync_port": 873,
        "sync_interval": 300,
        "rack": "",
    }
    initramfs = config.plain(cfg.initramfs)
    assert initramfs["files"] == {"/etc/motd": str((tmp_path / "motd.txt").resolve())}
    assert initramfs["packages"] == ["busybox-static"]
    assert json.loads(json.dumps(config.plain(cfg.layout)))["partitions"][3] == {
        "name": "data",
        "size_mib": "rest",
        "type": "83",
    }


def test_paths_are_relative_to_the_config_file(tmp_path):
    cfg = parse('[output]\ndirectory = "out/x"\n[initramfs.files]\n"/etc/motd" = "motd.txt"\n', tmp_path)
    assert cfg.output.directory == (tmp_path / "out/x").resolve()
    assert cfg.initramfs.files == {"/etc/motd": (tmp_path / "motd.txt").resolve()}


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[initramfs]\nmodles = []\n", r"\[initramfs\] modles: unknown key \(did you mean 'modules'\?\)"),
        ("[bord]\nname = 'rpi3'\n", r"\[bord\]: unknown section \(did you mean 'board'\?\)"),
        (
            "[board]\narch = 'arm46'\n",
            r"\[board\] arch: expected one of arm64, armhf, got 'arm46' \(did you mean 'arm64'\?\)",
        ),
        ("[master]\nport = '80'\n", r"\[master\] port: expected an integer, got '80'"),
        ("[initramfs]\nmodules = 'virtio_net'\n", r"\[initramfs\] modules: expected a list of strings"),
        ("[initramfs]\nuboot_wrap = 1\n", r"uboot_wrap: expected true or false"),
        ("[board\n", r"not valid TOML"),
        (
            "[layout]\npartitions = [{name='boot', size_mib='rest'}, {name='a', size_mib=1}]\n",
            r"only allowed on the last partition",
        ),
        (
            "[layout]\npartitions = [{name='boot', size_mib=8}, {name='a', size_mib=8}]\n",
            r"needs a partition named 'b'",
        ),
        (
            "[layout]\npartitions = [{name='boot', size_mib=8, typ='83'}]\n",
            r"unknown key 'typ' \(did you mean 'type'\?\)",
        ),
        # a rack master: no private key, the region's public key, a plain URL and rack name
        (
            "[master]\nupstream = 'http://10.0.0.1:8080'\nupstream_key = 'region.pub'\nkey = 'k.key'\n",
            r"\[master\] key: a rack master \(\[master\] upstream set\) must hold no private key",
        ),
        ("[master]\nupstream = 'http://10.0.0.1:8080'\n", r"\[master\] upstream_key: a rack master needs"),
        (
            "[master]\nupstream = 'http://r:8080'\nupstream_key = 'region.key'\n",
            r"upstream_key: .*region.key looks like a private key",
        ),
        ("[master]\nupstream = 'https://r/x'\n", r"\[master\] upstream: .*not http://HOST:PORT"),
        ("[master]\nrack = 'a b'\n", r"\[master\] rack: .*not a rack name"),
    ],
)
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


def layout(*parts):
    return "[layout]\npartitions = [" + ", ".join(parts) + "]\n"


SLOTS = "{name='a', size_mib=8}, {name='b', size_mib=8}"


@pytest.mark.parametrize(
    "text, expected",
    [
        # what lands in boot scripts, the kernel command line and /init's init.conf
        ("[master]\nport = 99999\n", r"\[master\] port: expected an integer from 1 to 65535, got 99999"),
        ("[master]\nport = 0\n", r"\[master\] port: expected an integer from 1 to 65535, got 0"),
        (
            "[master]\naddress = 'http://10.0.0.1'\n",
            r"\[master\] address: 'http://10.0.0.1': not an IPv4 address or a hostname",
        ),
        (
            "[master]\naddress = 'master .lan'\n",
            r"\[master\] address: 'master .lan': not an IPv4 address or a hostname",
        ),
        ("[master]\naddress = '10.0.0.1:80'\n", r"\[master\] address: .*not an IPv4 address or a hostname"),
        ("[master]\naddress = '10.0.0.256'\n", r"\[master\] address: '10.0.0.256': not an IPv4 address"),
        ("[master]\naddress = '$(reboot)'\n", r"\[master\] address: .*not an IPv4 address or a hostname"),
        ("[kernel]\ncmdline = 'quiet\" ; reset ; echo \"'\n", r"\[kernel\] cmdline: .*contains '\"', ';'"),
        ("[kernel]\ncmdline = 'root=${x}'\n", r"\[kernel\] cmdline: .*contains '\$'"),
        ('[kernel]\ncmdline = "a\\nb"\n', r"\[kernel\] cmdline: .*contains '\\n'"),
        ("[kernel]\ncmdline = 'a\\b'\n", r"\[kernel\] cmdline: .*contains " + re.escape(repr("\\"))),
        ("[kernel]\ncmdline = '" + "x" * 513 + "'\n", r"\[kernel\] cmdline: .*513 characters is longer than the 512"),
        ("[kernel]\ncmdline = 'quiet -- single'\n", r"\[kernel\] cmdline: .*'--' would hand the rest"),
        ("[layout]\ntries = -1\n", r"\[layout\] tries: expected an integer >= 1, got -1"),
        ("[layout]\ntries = 0\n", r"\[layout\] tries: expected an integer >= 1, got 0"),
        ("[initramfs]\nwatchdog = -5\n", r"\[initramfs\] watchdog: expected an integer >= 0, got -5"),
        ("[kernel]\npackage = 'linux image'\n", r"\[kernel\] package: 'linux image': not a Debian package name"),
        (
            "[initramfs]\npackages = ['busybox-static', 'Bad;Name']\n",
            r"\[initramfs\] packages\[1\]: 'Bad;Name': not a Debian package name",
        ),
        (
            "[initramfs]\nmodules = ['../../etc/x']\n",
            r"\[initramfs\] modules\[0\]: '../../etc/x': not a kernel module name",
        ),
        (
            "[kernel]\nroot_modules = ['ext4', 'a/b']\n",
            r"\[kernel\] root_modules\[1\]: 'a/b': not a kernel module name",
        ),
        # partitions past what MBR holds, names the plan would refuse, boot types the firmware cannot read
        (
            layout("{name='boot', size_mib=128}", "{name='a', size_mib=1048576}", "{name='b', size_mib=1048576}"),
            r"the partitions end at 2097284 MiB, past the 2097152 MiB \(2 TiB\) an MBR can address",
        ),
        (
            layout(
                "{name='boot', size_mib=64, type='0c'}",
                "{name='a', size_mib=1048000}",
                "{name='b', size_mib=1049084}",
                "{name='data', size_mib='rest'}",
            ),
            r"end at 2097153 MiB, past the 2097152 MiB",
        ),
        (
            layout("{name='boot', size_mib=8, type='0c'}", SLOTS, "{name='Data Store', size_mib=8}"),
            r"partitions\[3\].name: expected a partition name",
        ),
        (
            layout("{name='boot', size_mib=8, type='0c'}", SLOTS, "{name='a', size_mib=8}"),
            r"partitions\[3\].name: 'a' appears twice",
        ),
        (
            layout("{name='boot', size_mib=8, type='05'}", SLOTS),
            r"partitions\[0\].type: the boot partition holds the card's FAT32 filesystem.*got \"05\"",
        ),
        (layout("{name='boot', size_mib=8, type='83'}", SLOTS), r"partitions\[0\].type: .*0b, 0c, 0e\), got \"83\""),
        (
            layout("{name='boot', size_mib=8, type='0c'}", SLOTS, "{name='data', size_mib=8, type='00'}"),
            r"partitions\[3\].type: 00 marks an unused MBR entry",
        ),
        # paths that would leave the sysroot or the staging directory
        (
            "[initramfs]\nbinaries = ['/bin/../../etc/passwd']\n",
            r"\[initramfs\] binaries\[0\]: '/bin/../../etc/passwd': must stay inside the sysroot",
        ),
        ("[initramfs]\nbinaries = ['../sbin/x']\n", r"binaries\[0\]: '../sbin/x': must stay inside the sysroot"),
        ("[initramfs]\nbinaries = ['sbin/x']\n", r"binaries\[0\]: 'sbin/x': must be an absolute path or a bare name"),
        (
            "[initramfs.files]\n'/../../tmp/x' = 'x'\n",
            r"\[initramfs\] files.\"/../../tmp/x\": expected an absolute target",
        ),
    ],
)
def test_values_for_scripts_cmdlines_paths_and_mbr_are_checked_at_load(tmp_path, text, expected):
    with pytest.raises(ConfigError, match=expected) as info:
        parse(text, tmp_path)
    assert "\n" not in str(info.value) and info.value.exit_code == 2


@pytest.mark.parametrize("address", ["10.0.2.2", "master", "master.rack.lan", "master-1.example.", "192.168.0.1"])
def test_addresses_workers_can_reach_are_accepted(tmp_path, address):
    assert parse(f"[master]\naddress = '{address}'\n", tmp_path).master.address == address


def test_ordinary_values_still_load(tmp_path):
    cfg = parse(
        "[kernel]\ncmdline = 'quiet loglevel=3 ip=dhcp root=PARTUUID=7261636b-02 x=a,b:c/d'\n"
        "[initramfs]\nbinaries = ['busybox', '/usr/sbin/mke2fs']\npackages = ['./tree', 'g++-12']\n"
        "[master]\nport = 65535\n"
        + layout("{name='boot', size_mib=8, type='0e'}", SLOTS, "{name='data_1', size_mib='rest'}"),
        tmp_path,
    )
    assert cfg.master.port == 65535 and cfg.layout.partitions[0].type == "0e"


def test_a_boot_partition_without_a_type_is_the_card_images_fat32(tmp_path):
    """It was 83, as for the slots: the plan said 83, the card 0c, and the updater refused the card."""
    cfg = parse(layout("{name='boot', size_mib=8}", SLOTS), tmp_path)
    assert [p.type for p in cfg.layout.partitions] == ["0c", "83", "83"]


def test_reference_defaults_are_toml_a_user_can_paste(tmp_path):
    """Every default the reference shows parses back to the same value (the layout was once
    shown as a string the parser refuses)."""
    defaults = parse("", tmp_path)
    rows = re.findall(r"^\| `\[(\w+)\] (\w+)` \| `(.*?)` \|", config.reference(), re.M)
    assert len(rows) == sum(s.default is not None for s in config.SETTINGS)
    for section, key, shown in rows:
        text = f"[{section}]\n{key} = {shown}\n"
        tomllib.loads(text)
        parsed = getattr(parse(text, tmp_path), section)
        assert getattr(parsed, key) == getattr(getattr(defaults, section), key), (section, key)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # a newline would be a directive of its own in dnsmasq's config (it passed `dnsmasq --test`)
        (
            '[output]\ndirectory = "build\\ndhcp-script=/tmp/x"\n',
            r"\[output\] directory: 'build\\ndhcp-script=/tmp/x': contains the control character '\\n'",
        ),
        ('[master]\ndirectory = "m\\n[evil]\\npath = /"\n', r"\[master\] directory: .*control character '\\n'"),
        ('[master]\nkey = "k\\u0000ey"\n', r"\[master\] key: 'k\\x00ey': contains the control character '\\x00'"),
        ('[kernel]\npath = "tree\\u001b[2J"\n', r"\[kernel\] path: .*control character '\\x1b'"),
        (
            '[initramfs.files]\n"/etc/motd" = "motd\\r"\n',
            r"\[initramfs\] files.\"/etc/motd\": .*control character '\\r'",
        ),
        ('[initramfs.files]\n"/etc/m\\notd" = "motd"\n', r"\[initramfs\] files.*expected an absolute target"),
        ('[output]\ndirectory = "a \\"b"\n', r"\[output\] directory: .*'\"', which dnsmasq's or rsyncd's"),
        ('[output]\ndirectory = "rack #2"\n', r"\[output\] directory: .*'#'"),
        ('[master]\ndirectory = "%HOME%"\n', r"\[master\] directory: .*'%'"),
        ('[output]\ndirectory = "build "\n', r"\[output\] directory: .*ends in whitespace"),
    ],
)
def test_paths_that_would_break_a_generated_config_are_refused_at_load(tmp_path, text, expected):
    with pytest.raises(ConfigError, match=expected) as info:
        parse(text, tmp_path)
    assert "\n" not in str(info.value) and info.value.exit_code == 2


def test_the_defaults_are_checked_too_the_configs_folder_being_part_of_them(tmp_path):
    folder = tmp_path / "rack\ndhcp-script=x"
    folder.mkdir()
    with pytest.raises(ConfigError, match=r"\[master\] directory: .*control character '\\n'"):
        parse("", folder)


@pytest.mark.parametrize("key", ["master/keys/master.key", "master/master.key", "./master/../master/k.key", "master"])
def test_a_key_inside_the_master_directory_is_refused(tmp_path, key):
    """serve hands the master's tree out: GET /keys/master.key gave the private key away."""
    with pytest.raises(ConfigError) as info:
        parse(f'[master]\ndirectory = "master"\nkey = "{key}"\n', tmp_path)
    master = (tmp_path / "master").resolve()
    assert str(info.value) == (
        f"{tmp_path / 'rackboot.toml'}: [master] key: {(tmp_path / key).resolve()} is inside [master] directory "
        f"{master}, which rackboot serve hands out; keep the private key outside it"
    )
    assert info.value.exit_code == 2


def test_a_key_reached_through_a_link_into_the_master_directory_is_refused(tmp_path):
    (tmp_path / "master/keys").mkdir(parents=True)
    (tmp_path / "keys").symlink_to(tmp_path / "master/keys")
    with pytest.raises(ConfigError, match=r"\[master\] key: .*/master/keys/master.key is inside"):
        parse('[master]\nkey = "keys/master.key"\n', tmp_path)


def test_a_key_beside_the_master_directory_loads(tmp_path):
    cfg = parse('[master]\ndirectory = "master"\nkey = "keys/master.key"\n', tmp_path)
    assert cfg.master.key == (tmp_path / "keys/master.key").resolve()
    assert parse('[master]\ndirectory = "srv/master"\nkey = "srv/master.key"\n', tmp_path).master.key is not None


def test_serve_with_its_key_inside_the_master_directory_exits_2_before_it_listens(tmp_path, capsys):
    from rackboot import cli

    (tmp_path / "rackboot.toml").write_text('[master]\ndirectory = "master"\nkey = "master/keys/master.key"\n')
    assert cli.main(["serve", "-c", str(tmp_path / "rackboot.toml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "[master] key: " in err and "keep the private key outside it" in err


def test_a_rack_masters_build_gives_its_workers_the_regions_public_key(tmp_path):
    """A rack master holds no private key: the initramfs and card it builds carry the region's
    public key (upstream_key), so its workers check every document as the region's."""
    from rackboot import initramfs_tree
    from rackboot.firmware.boards import board
    from rackboot.initramfs.updater.signature import PUBLIC_KEY

    text = "[initramfs]\nupdater = true\n[master]\nupstream = 'http://10.0.0.1:8080'\nupstream_key = 'region.pub'\n"
    rack = parse(text, tmp_path)
    assert rack.master.public_key == (tmp_path / "region.pub").resolve()
    spec = initramfs_tree.spec(rack, board("qemu-virt", "arm64"))
    assert spec.files[PUBLIC_KEY] == (tmp_path / "region.pub").resolve()
    region = parse("[master]\nkey = 'keys/master.key'\n", tmp_path)
    assert region.master.public_key == (tmp_path / "keys/master.key.pub").resolve()
