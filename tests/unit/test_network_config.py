"""[network]: the netboot service's addresses are checked at load; every mistake is one
line naming the file and the key, exit status 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
from rackboot import config
from rackboot.config import DhcpMode
from rackboot.errors import ConfigError

RACK = '[master]\naddress = "10.213.0.1"\n[network]\ninterface = "rack0"\n'
FULL = RACK + 'dhcp = "full"\nrange_start = "10.213.0.100"\nrange_end = "10.213.0.199"\n'


def parse(text, tmp_path):
    return config.parse(text, tmp_path / "rackboot.toml")


def test_no_netboot_service_by_default(tmp_path):
    """QEMU's user network serves TFTP itself: the demo and the e2e tests run no dnsmasq."""
    network = parse("", tmp_path).network
    assert network.interface == "" and network.dhcp is DhcpMode.NONE


def test_a_full_rack(tmp_path):
    network = parse(FULL, tmp_path).network
    assert (network.interface, network.dhcp, network.range_start, network.range_end, network.prefix) == (
        "rack0",
        DhcpMode.FULL,
        "10.213.0.100",
        "10.213.0.199",
        24,
    )


def test_tftp_only_needs_no_range(tmp_path):
    assert parse(RACK, tmp_path).network.dhcp is DhcpMode.NONE


@pytest.mark.parametrize(
    "text, expected",
    [
        (FULL.replace("10.213.0.199", "10.213.1.5"), r"\[network\] range_end: 10.213.1.5 is outside the rack subnet"),
        (FULL.replace("10.213.0.100", "10.0.0.100"), r"\[network\] range_start: 10.0.0.100 is outside the rack subnet"),
        (FULL + "prefix = 28\n", r"\[network\] range_start: 10.213.0.100 is outside the rack subnet 10.213.0.0/28"),
        (FULL.replace("10.213.0.199", "10.213.0.255"), r"range_end: 10.213.0.255 is outside"),  # the broadcast
        (FULL.replace("10.213.0.100", "10.213.0.1"), r"range_start..range_end: 10.213.0.1..10.213.0.199 contains "),
        (FULL.replace('"10.213.0.1"', '"10.213.0.150"'), r"contains \[master\] address 10.213.0.150"),
        (FULL.replace("10.213.0.100", "10.213.0.200"), r"range_start: 10.213.0.200 comes after range_end"),
        (FULL.replace("10.213.0.100", "10.213.0.999"), r"\[network\] range_start: '10.213.0.999': not an IPv4"),
        (FULL.replace('range_end = "10.213.0.199"\n', ""), r"\[network\] range_end: dhcp = \"full\" needs the range"),
        (RACK.replace("10.213.0.1", "master.lan"), r"\[master\] address: 'master.lan': the netboot service needs an"),
        (RACK.replace("10.213.0.1", "10.213.0.0"), r"\[master\] address: 10.213.0.0 is not a host address"),
        (RACK.replace("rack0", "rack 0"), r"\[network\] interface: 'rack 0': not a network interface name"),
        (RACK.replace("rack0", "a-very-long-name0"), r"\[network\] interface: .*not a network interface name"),
        ('[network]\ndhcp = "full"\n', r'\[network\] dhcp: "full" needs \[network\] interface'),
        ('[network]\ndhcp = "proxy"\n', r"\[network\] dhcp: expected one of none, full"),
        (RACK + "lease_time = 60\n", r"\[network\] lease_time: expected an integer >= 120"),
        (RACK + "prefix = 31\n", r"\[network\] prefix: expected an integer from 8 to 30"),
    ],
)
def test_bad_network_is_one_line_naming_file_and_key(tmp_path, text, expected):
    with pytest.raises(ConfigError, match=expected) as info:
        parse(text, tmp_path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(tmp_path / "rackboot.toml"))
    assert info.value.exit_code == 2


def test_the_cli_exits_2_with_one_line(tmp_path):
    path = tmp_path / "rackboot.toml"
    path.write_text(FULL.replace("10.213.0.100", "10.0.0.100"))
    result = subprocess.run(
        [sys.executable, "-m", "rackboot", "serve", "-c", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "[network] range_start: 10.0.0.100 is outside" in result.stderr
