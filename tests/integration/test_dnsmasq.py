"""rackboot serve's netboot service with the real dnsmasq: the generated configs pass
`dnsmasq --test`, and serve, started inside a network namespace this test makes, serves
the build over TFTP, leases addresses in the full DHCP mode, refuses to start with one
line when it cannot run, and leaves no dnsmasq behind when it stops or is killed (the
next serve ends one that dropped root and so outlived a SIGKILLed serve)."""

from __future__ import annotations

import itertools
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from rackboot import config
from rackboot.master import dnsmasq, hostnames
from rackboot.master.inventory import Inventory

from tests.helpers import write_config

MASTER = "10.213.0.1"
FULL = {"dhcp": "full", "range_start": "10.213.0.100", "range_end": "10.213.0.199"}
_names = itertools.count()


@pytest.fixture(autouse=True)
def _root_and_dnsmasq() -> None:
    """Fails loudly, never skips: a skipped netboot test would hide a missing install."""
    if os.geteuid() != 0 or not shutil.which("dnsmasq", path="/usr/sbin:/usr/bin:/sbin:/bin"):
        pytest.fail("the netboot service tests need root and dnsmasq (make test installs it)")


def rack_config(directory: Path, interface: str = "rk0", **network) -> Path:
    build = directory / "build"
    build.mkdir(exist_ok=True)
    (directory / "master").mkdir(exist_ok=True)
    (build / "boot.scr.uimg").write_bytes(random.Random(1).randbytes(300_000))  # about 200 TFTP blocks
    return write_config(
        directory, master={"address": MASTER, "port": 8080}, network={"interface": interface, **network}
    )


@pytest.mark.parametrize("network", [{}, FULL], ids=["tftp", "dhcp"])
def test_generated_configs_pass_dnsmasqs_own_check(tmp_path, network):
    cfg = config.load(rack_config(tmp_path, **network))
    conf = tmp_path / "dnsmasq.conf"
    conf.write_text(dnsmasq.render_config(cfg))
    done = subprocess.run(["dnsmasq", "--test", f"--conf-file={conf}"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "syntax check OK" in done.stderr


@pytest.fixture
def netns() -> Iterator[str]:
    """The master's namespace: loopback, and rk0 with the master's address, a veth whose
    other end, rk1, is in the worker's namespace (the name + "w"). Everything in them is
    killed and they are deleted afterwards."""
    name = f"rbdns{os.getpid()}-{next(_names)}"
    made = []
    try:
        for ns in (name, f"{name}w"):
            subprocess.run(["ip", "netns", "add", ns], check=True)
            made.append(ns)
        for ns, cmd in (
            (name, "link set lo up"),
            (name, f"link add rk0 type veth peer name rk1 netns {name}w"),
            (name, f"addr add {MASTER}/24 dev rk0"),
            (name, "link set rk0 up"),
            (f"{name}w", "link set rk1 up"),
        ):
            subprocess.run(["ip", "-n", ns, *cmd.split()], check=True)
        yield name
    finally:
        for ns in made:
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:  # only what this test started runs in its namespaces
                os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", ns], check=True)


def in_ns(ns: str, *cmd: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *cmd]


def serve(ns: str, cfg_path: Path, log: Path) -> subprocess.Popen[bytes]:
    """`rackboot serve` in the namespace, started once it says it is serving."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            in_ns(ns, sys.executable, "-m", "rackboot", "serve", "-c", str(cfg_path), "--bind", MASTER),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 60
    while b"serving " not in log.read_bytes():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    return proc


def dnsmasq_pids(conf: Path) -> list[int]:
    """The dnsmasq processes that run our config, wherever they are."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"dnsmasq") and f"--conf-file={conf}".encode() in argv:
            found.append(int(entry.name))
    return found


def wait_gone(conf: Path) -> None:
    deadline = time.monotonic() + 30
    while dnsmasq_pids(conf) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert dnsmasq_pids(conf) == []


@pytest.mark.slow  # starts serve in a namespace
def test_serve_sends_the_build_over_tftp_and_stops_its_dnsmasq(tmp_path, netns):
    cfg_path = rack_config(tmp_path)
    proc = serve(netns, cfg_path, tmp_path / "serve.log")
    conf = tmp_path / "master" / dnsmasq.CONF
    try:
        assert len(dnsmasq_pids(conf)) == 1
        got = tmp_path / "got"
        fetched = subprocess.run(
            in_ns(netns, "curl", "-sS", "--max-time", "60", "-o", str(got), f"tftp://{MASTER}/boot.scr.uimg"),
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert fetched.returncode == 0, fetched.stderr
        assert got.read_bytes() == (tmp_path / "build/boot.scr.uimg").read_bytes()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    assert dnsmasq_pids(conf) == []  # serve waited for it
    log = (tmp_path / "serve.log").read_text()
    assert "dnsmasq-tftp" in log and "sent " in log  # dnsmasq's log is serve's
    assert conf.read_text().startswith("# Generated by rackboot")


@pytest.mark.slow  # starts serve in a namespace
def test_a_killed_serve_takes_its_dnsmasq_along(tmp_path, netns):
    proc = serve(netns, rack_config(tmp_path), tmp_path / "serve.log")
    conf = tmp_path / "master" / dnsmasq.CONF
    assert len(dnsmasq_pids(conf)) == 1
    # ip netns exec runs serve as its own process (exec): SIGKILL leaves no finally to run
    proc.kill()
    proc.wait(timeout=30)
    wait_gone(conf)


@pytest.mark.slow  # starts serve in a namespace
def test_tftp_options_match_the_board_profiles(tmp_path, netns):
    """What U-Boot may ask of the master's dnsmasq over a 1500-byte link: a block of at most
    the profiles' 1468 bytes (the MTU less IP, UDP and TFTP headers), and no RFC 7440 window,
    which dnsmasq does not answer (so the profiles set none)."""
    from rackboot.firmware import boards

    subprocess.run(["ip", "-n", f"{netns}w", "addr", "add", "10.213.0.50/24", "dev", "rk1"], check=True)
    proc = serve(netns, rack_config(tmp_path), tmp_path / "serve.log")
    options = [b"boot.scr.uimg", b"octet", b"blksize", b"8192", b"windowsize", b"8", b"tsize", b"0"]
    request = (b"\0\1" + b"\0".join(options) + b"\0").hex()
    code = f"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(10)
s.sendto(bytes.fromhex("{request}"), ("{MASTER}", 69))
sys.stdout.write(s.recv(65536).hex())
"""
    try:
        done = subprocess.run(
            in_ns(f"{netns}w", sys.executable, "-c", code), capture_output=True, text=True, timeout=60
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    assert done.returncode == 0, done.stderr
    reply = bytes.fromhex(done.stdout)
    assert reply[:2] == b"\0\6", reply  # OACK
    fields = reply[2:].split(b"\0")[:-1]
    assert dict(zip(fields[::2], fields[1::2], strict=True)) == {b"blksize": b"1468", b"tsize": b"300000"}
    assert {board.tftp_blocksize for board in boards.BOARDS.values()} == {1468}


@pytest.fixture
def nobodys_build() -> Iterator[Path]:
    """A directory whose build/ belongs to nobody, which dnsmasq then runs as; readable by
    nobody (pytest's tmp dirs are root's alone)."""
    directory = Path(tempfile.mkdtemp(prefix="rbdns-"))
    try:
        directory.chmod(0o755)
        rack_config(directory)
        for path in (directory / "build", directory / "build" / "boot.scr.uimg"):
            os.chown(path, 65534, 65534)
        yield directory
    finally:
        shutil.rmtree(directory)


def alive(pid: int) -> bool:
    """Running, not a zombie (whoever inherited an orphan reaps it when it will)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def uid(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:")))


@pytest.mark.slow  # starts serve in a namespace, twice
def test_the_next_serve_ends_the_dnsmasq_a_killed_serve_left(nobodys_build, netns):
    """dnsmasq that dropped root for the build's owner lost the parent-death signal, so a
    SIGKILLed serve leaves it running with the TFTP port; the next serve ends it and starts
    its own."""
    directory, cfg_path = nobodys_build, nobodys_build / "rackboot.toml"
    master = directory / "master"
    first = serve(netns, cfg_path, directory / "serve1.log")
    [orphan] = dnsmasq_pids(master / dnsmasq.CONF)
    assert uid(orphan) == 65534  # dropped root: no parent-death signal
    assert (master / dnsmasq.PID).read_text() == f"{orphan} {first.pid}\n"  # ip netns exec execs serve
    assert dnsmasq.end_orphan(config.load(cfg_path)) is None  # its serve runs: not an orphan
    assert alive(orphan)
    first.kill()
    first.wait(timeout=30)
    second = serve(netns, cfg_path, directory / "serve2.log")
    try:
        [running] = dnsmasq_pids(master / dnsmasq.CONF)
        assert running != orphan and not alive(orphan)
        assert f"netboot: ending dnsmasq {orphan}, left running by a serve that was killed" in (
            (directory / "serve2.log").read_text()
        )
        assert (master / dnsmasq.PID).read_text() == f"{running} {second.pid}\n"
        got = directory / "got"
        fetched = subprocess.run(
            in_ns(netns, "curl", "-sS", "--max-time", "60", "-o", str(got), f"tftp://{MASTER}/boot.scr.uimg"),
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert fetched.returncode == 0, fetched.stderr
        assert got.read_bytes() == (directory / "build/boot.scr.uimg").read_bytes()
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=60) == 0
    assert dnsmasq_pids(master / dnsmasq.CONF) == [] and not (master / dnsmasq.PID).exists()


def test_a_pid_file_naming_another_process_ends_nothing(tmp_path):
    """The pid in the master tree is ended only while it is a dnsmasq with our config: a pid
    reused by another program, or gone, only drops the stale file."""
    cfg = config.load(rack_config(tmp_path))
    pid_file = tmp_path / "master" / dnsmasq.PID
    other = subprocess.Popen(["sleep", "60"])
    try:
        pid_file.write_text(f"{other.pid} 1\n")
        assert dnsmasq.end_orphan(cfg) is None
        assert other.poll() is None and not pid_file.exists()
    finally:
        other.kill()
        other.wait()
    pid_file.write_text(f"{other.pid} 1\n")  # reaped: no such process now
    assert dnsmasq.end_orphan(cfg) is None and not pid_file.exists()


@pytest.mark.slow  # starts serve in a namespace
def test_a_dnsmasq_that_dies_is_said_in_serves_log(tmp_path, netns):
    log = tmp_path / "serve.log"
    proc = serve(netns, rack_config(tmp_path), log)
    try:
        [pid] = dnsmasq_pids(tmp_path / "master" / dnsmasq.CONF)
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while "netboot: dnsmasq exited" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "netboot: dnsmasq exited with status -9; no TFTP until serve restarts" in log.read_text()
        assert proc.poll() is None  # HTTP goes on
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0


@pytest.mark.slow  # starts serve in a namespace
def test_a_second_start_rewrites_nothing(tmp_path, netns):
    cfg_path = rack_config(tmp_path)
    conf = tmp_path / "master" / dnsmasq.CONF
    for _ in range(2):
        proc = serve(netns, cfg_path, tmp_path / "serve.log")
        before = conf.stat()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    assert (conf.stat().st_ino, conf.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def dhcp_discover(ns: str, mac: bytes, *, request: bool = False) -> dict[str, object]:
    """One DHCPDISCOVER broadcast from rk1 in the worker's namespace (no address there yet);
    the offer's address, next-server, boot file and options. With ``request``, the offered
    address is then asked for (DHCPREQUEST), and the same of the acknowledgement."""
    code = f"""
import socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"rk1")
s.bind(("0.0.0.0", 68))
s.settimeout(10)
mac = bytes.fromhex({mac.hex()!r})
packet = struct.pack("!BBBBIHH4s4s4s4s16s192s4s", 1, 1, 6, 0, 0x1234ABCD, 0, 0x8000, bytes(4), bytes(4),
                     bytes(4), bytes(4), mac + bytes(10), bytes(192), bytes([99, 130, 83, 99]))
def ask(packet):
    for _ in range(5):
        s.sendto(packet, ("255.255.255.255", 67))
        try:
            return s.recv(1500)
        except TimeoutError:
            continue
    sys.exit("no answer")
reply = ask(packet + bytes([53, 1, 1, 255]))
if {request!r}:
    server = reply[reply.index(bytes([54, 4])) + 2 :][:4]  # the offer's server id
    reply = ask(packet + bytes([53, 1, 3, 50, 4]) + reply[16:20] + bytes([54, 4]) + server + bytes([255]))
sys.stdout.write(reply.hex())
"""
    done = subprocess.run(in_ns(f"{ns}w", sys.executable, "-c", code), capture_output=True, text=True, timeout=90)
    assert done.returncode == 0 and done.stdout, done.stderr
    reply = bytes.fromhex(done.stdout)
    yiaddr, siaddr = reply[16:20], reply[20:24]
    options: dict[int, bytes] = {}
    at = 240
    while at < len(reply) and reply[at] != 255:
        if reply[at] == 0:
            at += 1
            continue
        options[reply[at]] = reply[at + 2 : at + 2 + reply[at + 1]]
        at += 2 + reply[at + 1]
    return {
        "address": socket.inet_ntoa(yiaddr),
        "next_server": socket.inet_ntoa(siaddr),
        "file": reply[108:236].rstrip(b"\0").decode(),
        "options": options,
        "xid": struct.unpack("!I", reply[4:8])[0],
    }


@pytest.mark.slow  # starts serve in a namespace
def test_full_dhcp_offers_a_lease_with_the_master_as_tftp_server(tmp_path, netns):
    cfg_path = rack_config(tmp_path, **FULL)
    plans = tmp_path / "master" / "plans"
    plans.mkdir()
    (plans / "52-54-00-aa-00-01.json").write_text("{}")
    proc = serve(netns, cfg_path, tmp_path / "serve.log")
    try:
        offer = dhcp_discover(netns, bytes.fromhex("525400aa0001"))
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    assert offer["xid"] == 0x1234ABCD
    assert 100 <= int(str(offer["address"]).rsplit(".", 1)[1]) <= 199
    assert offer["next_server"] == MASTER and offer["file"] == "boot.scr.uimg"
    options = offer["options"]
    assert isinstance(options, dict)
    assert options[53] == b"\x02" and options[1] == socket.inet_aton("255.255.255.0")
    assert 3 not in options  # no router: an isolated rack
    assert options[6] == socket.inet_aton(MASTER)  # the master's DNS, which knows the nodes' names
    assert (tmp_path / "master" / dnsmasq.HOSTS).read_text() == "52:54:00:aa:00:01,52-54-00-aa-00-01\n"
    assert dnsmasq_pids(tmp_path / "master" / dnsmasq.CONF) == []


def dns_address(ns: str, name: str) -> str | None:
    """The IPv4 address the master's DNS gives ``name``, asked from the worker's namespace;
    None when it answers with none."""
    code = f"""
import socket, struct, sys
query = struct.pack("!HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0)
query += b"".join(bytes([len(p)]) + p.encode() for p in {name!r}.split(".")) + b"\\0" + struct.pack("!HH", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(10)
s.sendto(query, ({MASTER!r}, 53))
sys.stdout.write(s.recv(1500).hex())
"""
    done = subprocess.run(in_ns(f"{ns}w", sys.executable, "-c", code), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout, done.stderr
    reply = bytes.fromhex(done.stdout)
    assert reply[:2] == b"\x42\x42"
    answers = struct.unpack("!H", reply[6:8])[0]
    return socket.inet_ntoa(reply[-4:]) if answers and reply[-6:-4] == b"\x00\x04" else None  # A: 4 bytes


@pytest.mark.slow  # starts serve in a namespace
def test_full_dhcp_names_each_leased_node_in_the_masters_dns(tmp_path, netns):
    """Seed 004's rack: the master's dnsmasq leases the addresses and resolves the nodes'
    names; a name with no lease, and any name outside the rack, get no address."""
    cfg_path = rack_config(tmp_path, **FULL)
    master = tmp_path / "master"
    (master / "plans").mkdir()
    (master / "plans" / "52-54-00-aa-00-03.json").write_text("{}")
    hostnames.assign(Inventory(master), "52-54-00-aa-00-03", hostname="rack-w3", pattern="")
    proc = serve(netns, cfg_path, tmp_path / "serve.log")
    try:  # the asking end has an address outside the range: no lease of its own
        subprocess.run(in_ns(f"{netns}w", "ip", "addr", "add", "10.213.0.50/24", "dev", "rk1"), check=True)
        assert dns_address(netns, "rack-w3") is None  # named, but not leased yet
        ack = dhcp_discover(netns, bytes.fromhex("525400aa0003"), request=True)
        options = ack["options"]
        assert isinstance(options, dict) and options[53] == b"\x05"  # DHCPACK
        assert options[12] == b"rack-w3"  # the lease carries the node's hostname
        assert dns_address(netns, "rack-w3") == ack["address"]
        assert dns_address(netns, "example.org") is None  # nothing is forwarded off the rack
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0


@pytest.mark.slow  # starts serve in a namespace
def test_a_new_plan_is_read_by_the_running_dnsmasq(tmp_path, netns):
    """A node planned while serve runs gets its dhcp-host line; dnsmasq re-reads the hosts
    file on SIGHUP and keeps running (a restart would cut the rack's TFTP transfers)."""
    proc = serve(netns, rack_config(tmp_path, **FULL), tmp_path / "serve.log")
    master = tmp_path / "master"
    try:
        [pid] = dnsmasq_pids(master / dnsmasq.CONF)
        (master / "plans").mkdir()
        (master / "plans" / "52-54-00-aa-00-02.json").write_text("{}")
        hosts = master / dnsmasq.HOSTS
        read = f"read {hosts}"
        deadline = time.monotonic() + 60
        while (tmp_path / "serve.log").read_text().count(read) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (tmp_path / "serve.log").read_text().count(read) == 2  # at start, and on the new plan
        assert hosts.read_text() == "52:54:00:aa:00:02,52-54-00-aa-00-02\n"
        assert dnsmasq_pids(master / dnsmasq.CONF) == [pid]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0


def run_serve(ns: str, cfg_path: Path, *prefix: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        in_ns(ns, *prefix, sys.executable, "-m", "rackboot", "serve", "-c", str(cfg_path), "--bind", MASTER),
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.slow  # starts serve in a namespace
def test_an_unknown_interface_is_one_line_exit_2(tmp_path, netns):
    result = run_serve(netns, rack_config(tmp_path, interface="rk9", **FULL))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "[network] interface: 'rk9': no such interface on this host" in result.stderr
    assert not (tmp_path / "master" / dnsmasq.CONF).exists()  # nothing started


@pytest.mark.slow  # starts serve in a namespace
def test_a_master_address_on_another_interface_is_one_line_exit_2(tmp_path, netns):
    result = run_serve(netns, rack_config(tmp_path, interface="lo"))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert f"[master] address: {MASTER} is not an address of [network] interface lo (it has 127.0.0.1)" in (
        result.stderr
    )


@pytest.mark.slow  # starts serve in a namespace
def test_a_taken_tftp_port_is_one_line(tmp_path, netns):
    holder = subprocess.Popen(
        in_ns(
            netns,
            sys.executable,
            "-c",
            f"import socket, sys; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('{MASTER}', 69)); "
            "print('bound', flush=True); sys.stdin.read()",
        ),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"bound\n"
        result = run_serve(netns, rack_config(tmp_path))
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert f"TFTP port {MASTER}:69/udp is taken by another program" in result.stderr


@pytest.mark.slow  # starts serve in a namespace
def traversable(path: Path) -> list[tuple[Path, int]]:
    """Let any user through ``path`` and the directories above it (o+x), so nobody's python
    can import rackboot from this checkout; the (path, mode) pairs changed, to put back."""
    changed = []
    for directory in (path, *path.parents):
        mode = directory.stat().st_mode & 0o7777
        if not mode & 0o001:
            directory.chmod(mode | 0o001)
            changed.append((directory, mode))
    return changed


def test_not_root_is_one_line(netns):
    # a directory the unprivileged user can read (pytest's tmp dirs are root's alone)
    directory = Path(tempfile.mkdtemp(prefix="rbdns-"))
    opened = traversable(Path(__file__).resolve().parents[2])  # a checkout in a mktemp -d dir is root's alone too
    try:
        directory.chmod(0o755)
        cfg_path = rack_config(directory)
        result = run_serve(netns, cfg_path, "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")
    finally:
        shutil.rmtree(directory)
        for path, mode in opened:
            path.chmod(mode)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert "the netboot service needs root" in result.stderr
