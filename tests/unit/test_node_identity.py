"""Each worker its own: hostname patterns and the registry, [layout] persist checks, the
plan's rev4 fields, the machine-id and what the decision hands /init."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from rackboot import config
from rackboot.errors import ConfigError, RackbootError
from rackboot.initramfs.updater import formats, node
from rackboot.initramfs.updater.errors import UpdaterError
from rackboot.initramfs.updater.main import Decision
from rackboot.master import dnsmasq, hostnames, plans
from rackboot.master.inventory import Inventory

from tests.helpers import write_config

A, B, C = "52-54-00-00-00-01", "52-54-00-00-00-02", "52-54-00-00-00-03"


# --- names ----------------------------------------------------------------------------


@pytest.fixture
def names(tmp_path, database):
    """The hostname registry: an inventory's tables, on each backend."""
    return Inventory(tmp_path, database_url=database)


@pytest.mark.parametrize("pattern", ["", "worker-{index:02d}", "pi-{mac}", "n{index}", "r1-{index:d}-{mac}"])
def test_good_patterns(pattern):
    assert hostnames.pattern_problem(pattern) is None


@pytest.mark.parametrize(
    "pattern, problem",
    [
        ("worker", "fills in neither {index} nor {mac}"),
        ("w-{node}", "{node}: only {index} and {mac} are filled in"),
        ("w-{index:>5}", "{index:>5}: not a format it takes"),
        ("w-{mac!r}", "{mac!r}: not a format it takes"),
        ("W-{index}", "is not a hostname: one RFC 1123 label"),
        ("w.{index}", "is not a hostname"),
        ("-{index}", "is not a hostname"),
        ("x" * 60 + "{mac}", "is not a hostname"),  # too long once the MAC is in
        ("w-{index", "not a pattern"),
    ],
)
def test_bad_patterns_say_why(pattern, problem):
    assert problem in (hostnames.pattern_problem(pattern) or "")


def test_a_bad_pattern_is_a_config_error_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"\[master\] hostname: 'worker': fills in neither"):
        config.load(write_config(tmp_path, master={"directory": "master", "hostname": "worker"}))


def test_indexes_follow_plan_creation_and_are_never_reused(names):
    pattern = "worker-{index:02d}"
    assert hostnames.assign(names, A, hostname=None, pattern=pattern) == "worker-01"
    assert hostnames.assign(names, B, hostname="db", pattern=pattern) == "db"  # index 2, named by hand
    assert hostnames.assign(names, A, hostname=None, pattern=pattern) == "worker-01"  # kept
    assert hostnames.assign(names, C, hostname=None, pattern=pattern) == "worker-03"  # 2 is B's, even renamed
    assert hostnames.assign(names, B, hostname="db2", pattern=pattern) == "db2"
    assert hostnames.assign(names, B, hostname="db2", pattern=pattern) == "db2"  # the same again: no change
    assert {n: (e.index, e.hostname) for n, e in hostnames.read(names).items()} == {
        A: (1, "worker-01"),
        B: (2, "db2"),
        C: (3, "worker-03"),
    }
    assert hostnames.assign(names, "52-54-00-00-00-09", hostname=None, pattern="") is None  # no pattern, no name
    assert hostnames.assign(names, "52-54-00-00-00-0a", hostname=None, pattern="pi-{mac}") == "pi-52540000000a"


def test_the_pattern_passes_over_names_given_by_hand(names):
    # a replacement board named by hand with a name the pattern reaches later (issue 19)
    D, E = "52-54-00-00-00-04", "52-54-00-00-00-05"
    pattern = "worker-{index}"
    assert hostnames.assign(names, A, hostname=None, pattern=pattern) == "worker-1"
    assert hostnames.assign(names, B, hostname="worker-3", pattern=pattern) == "worker-3"  # index 2
    assert hostnames.assign(names, C, hostname=None, pattern=pattern) == "worker-4"  # index 3 makes B's name
    assert hostnames.assign(names, D, hostname=None, pattern=pattern) == "worker-5"
    assert hostnames.assign(names, C, hostname=None, pattern=pattern) == "worker-4"  # kept
    assert {n: (e.index, e.hostname) for n, e in hostnames.read(names).items()} == {
        A: (1, "worker-1"),
        B: (2, "worker-3"),
        C: (4, "worker-4"),
        D: (5, "worker-5"),
    }
    with pytest.raises(RackbootError, match=f"hostname 'worker-4' is node {C}'s already; give {E} another"):
        hostnames.assign(names, E, hostname="worker-4", pattern=pattern)  # by hand: still one node's
    # a pattern without {index} cannot move on: a name held is refused in one line
    hostnames.assign(names, E, hostname="pi-525400000006", pattern="")
    with pytest.raises(RackbootError, match=f"'pi-525400000006' is node {E}'s already"):
        hostnames.assign(names, "52-54-00-00-00-06", hostname=None, pattern="pi-{mac}")


def test_peek_spends_nothing_and_forget_frees_the_name_but_not_the_index(names):
    pattern = "worker-{index:02d}"
    assert hostnames.peek(names, A, pattern=pattern) is None  # no index yet: no name
    assert hostnames.peek(names, A, pattern="pi-{mac}") == "pi-525400000001"  # needs none
    assert hostnames.read(names) == {}
    assert hostnames.assign(names, A, hostname=None, pattern=pattern) == "worker-01"
    assert hostnames.assign(names, B, hostname="pi-525400000003", pattern=pattern) == "pi-525400000003"
    assert hostnames.peek(names, A, pattern=pattern) == "worker-01"
    assert hostnames.peek(names, C, pattern="pi-{mac}") is None  # B holds it
    assert hostnames.forget(names, A) == hostnames.Entry(1, "worker-01")
    assert hostnames.forget(names, A) is None
    assert hostnames.assign(names, C, hostname="worker-01", pattern=pattern) == "worker-01"  # free again
    assert hostnames.assign(names, A, hostname=None, pattern=pattern) == "worker-04"  # back: a new index
    assert {n: e.index for n, e in hostnames.read(names).items()} == {A: 4, B: 2, C: 3}


def test_a_name_is_one_nodes(names):
    hostnames.assign(names, A, hostname="db", pattern="")
    with pytest.raises(RackbootError, match=f"hostname 'db' is node {A}'s already"):
        hostnames.assign(names, B, hostname="db", pattern="")
    with pytest.raises(RackbootError, match="--hostname: 'Db_1' is not a hostname"):
        hostnames.assign(names, B, hostname="Db_1", pattern="")
    assert set(hostnames.read(names)) == {A}  # nothing written for the refused ones


def test_plans_carry_the_name_and_the_hosts_file_hands_it_out(tmp_path):
    cfg = config.load(
        write_config(
            tmp_path,
            master={"directory": "master", "hostname": "w{index}"},
            layout={"persist": ["/etc/ssh", "/var/lib/x"]},
        )
    )
    cfg.master.directory.mkdir()
    plan = plans.make_plan(cfg, node=A, manifest=None)
    assert (plan.hostname, plan.persist) == ("w1", ("/etc/ssh", "/var/lib/x"))
    assert plans.make_plan(cfg, node=plans.DEFAULT, manifest=None).hostname is None
    with pytest.raises(RackbootError, match="a hostname is one node's"):
        plans.make_plan(cfg, node=plans.DEFAULT, manifest=None, hostname="x")
    plans.write_plan(cfg.master.directory, A, plan)
    plans.write_plan(cfg.master.directory, B, plans.make_plan(cfg, node=B, manifest=None, hostname="db"))
    plans.write_plan(cfg.master.directory, plans.DEFAULT, plans.make_plan(cfg, node=plans.DEFAULT, manifest=None))
    (cfg.master.directory / "plans" / f"{C}.json").write_text("{}")  # a plan from before the registry
    assert dnsmasq.render_hosts(cfg.master.directory, hostnames.read(Inventory.for_config(cfg))) == (
        f"52:54:00:00:00:01,w1\n52:54:00:00:00:02,db\n52:54:00:00:00:03,{C}\n"
    )


# --- persisted paths -------------------------------------------------------------------


@pytest.mark.parametrize(
    "persist, problem",
    [
        (["etc/ssh"], "'etc/ssh' is not an absolute path below /"),
        (["/"], "'/' is not an absolute path below /"),
        (["/etc/../root"], "leaves the root or is not normalised"),
        (["/etc/./ssh"], "leaves the root or is not normalised"),
        (["/etc//ssh"], "is not a plain path"),
        (["/etc/ssh/"], "is not a plain path"),
        (["/my dir"], "is not a plain path"),
        (["/run/x"], "is under /run, which the booted system mounts itself"),
        (["/proc"], "is under /proc"),
        (["/etc", "/etc/ssh"], "'/etc/ssh' overlaps '/etc'"),
        (["/var/lib/x", "/var/lib/x"], "overlaps"),
        ("/etc/ssh", "expected a list"),
        ([1], "expected absolute paths"),
        (["/x"] * 33, "at most 32"),
    ],
)
def test_bad_persist_lists_say_why(persist, problem):
    assert problem in (formats.persist_problem(persist) or "")


def test_good_persist_lists():
    assert formats.persist_problem([]) is None
    assert formats.persist_problem(["/etc/ssh", "/var/lib/myservice", "/etc/ssh2", "/srv/a@b+c"]) is None


@pytest.mark.parametrize(
    "persist, message",
    [
        (["/etc/ssh", "/etc"], r"\[layout\] persist: '/etc/ssh' overlaps '/etc'"),
        (["../x"], r"\[layout\] persist\[0\]: '../x': '../x' is not an absolute path"),
    ],
)
def test_persist_errors_are_one_config_line_and_exit_2(tmp_path, persist, message):
    path = write_config(tmp_path, layout={"persist": persist})
    with pytest.raises(ConfigError, match=message):
        config.load(path)
    done = subprocess.run(
        [sys.executable, "-m", "rackboot", "config", "-c", str(path)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "persist" in done.stderr


def test_persist_needs_a_data_partition(tmp_path):
    parts = [
        {"name": "boot", "size_mib": 64, "type": "0c"},
        {"name": "a", "size_mib": 64},
        {"name": "b", "size_mib": 64},
    ]
    with pytest.raises(ConfigError, match=r"\[layout\] persist: persisted paths live on a partition named 'data'"):
        config.load(write_config(tmp_path, layout={"partitions": parts, "persist": ["/etc/ssh"]}))
    assert config.load(write_config(tmp_path, layout={"partitions": parts})).layout.persist == ()


# --- the plan's rev4 fields -------------------------------------------------------------

PLAN = {
    "format": 1,
    "node": A,
    "layout": {
        "partitions": [
            {"name": "boot", "start_mib": 4, "size_mib": 16, "type": "0c"},
            {"name": "a", "size_mib": 64, "type": "83"},
            {"name": "b", "size_mib": 64, "type": "83"},
            {"name": "data", "size_mib": "rest", "type": "83"},
        ],
        "repartition": "allowed",
    },
    "image": None,
    "mount": "ro+overlay:tmpfs",
}


def test_plan_rev4_round_trips_and_a_plan_without_them_is_rev3():
    plan = formats.parse_plan(json.dumps({**PLAN, "hostname": "worker-01", "persist": ["/etc/ssh"]}))
    assert (plan.hostname, plan.persist) == ("worker-01", ("/etc/ssh",))
    assert formats.parse_plan(formats.dump(plan)) == plan
    bare = formats.parse_plan(json.dumps(PLAN))
    assert (bare.hostname, bare.persist) == (None, ())
    assert b"hostname" not in formats.dump(bare) and b"persist" not in formats.dump(bare)


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"hostname": "Worker"}, "plan: hostname: 'Worker' is not a hostname"),
        ({"hostname": "a" * 64}, "plan: hostname:"),
        ({"hostname": 7}, "plan: hostname: expected a string"),
        ({"persist": ["/etc", "/etc/ssh"]}, "plan: persist: '/etc/ssh' overlaps '/etc'"),
        ({"persist": ["/a b"]}, "plan: persist: '/a b' is not a plain path"),
    ],
)
def test_bad_rev4_fields_name_the_field(extra, message):
    with pytest.raises(UpdaterError) as e:
        formats.parse_plan(json.dumps({**PLAN, **extra}))
    assert str(e.value).startswith(message)


def test_reports_carry_the_hostname_and_the_hook():
    report = formats.Report(node=A, phase=formats.Phase.HOOK, hostname="worker-01", hook=formats.HookName.FIRST_BOOT)
    assert formats.parse_report(formats.dump(report)) == report
    with pytest.raises(UpdaterError, match="report: hook: must be one of"):
        formats.parse_report(json.dumps({**report.to_dict(), "hook": "later"}))


# --- machine-id and the decision ---------------------------------------------------------


def test_machine_id_is_systemd_shaped_stable_and_per_node_and_image():
    first = node.machine_id(A, "example")
    assert first == node.machine_id(A, "example")
    assert len({first, node.machine_id(B, "example"), node.machine_id(A, "other")}) == 3
    for value in (first, node.machine_id(B, "x")):
        assert len(value) == 32 and value == value.lower() and int(value, 16) != 0
        assert value[12] == "4" and value[16] in "89ab"  # UUID v4 version and variant, as systemd makes them


def test_the_decision_hands_init_the_settings_and_reads_back():
    settings = node.NodeSettings(
        node=A,
        hostname="worker-01",
        machine_id=node.machine_id(A, "example"),
        persist=("/etc/ssh", "/var/lib/x"),
        planned=True,
        first_boot="/run/rackboot/first-boot.sh",
        first_boot_timeout=60,
        first_boot_script=b"echo hi\n",
    )
    decision = Decision("a", 2, "/dev/vda2", "ro+overlay:tmpfs", formats.Action.INSTALLED, settings=settings)
    shell = decision.to_shell()
    assert "echo hi" not in shell  # the script goes beside the decision, not into it
    values = node.read_shell(shell)
    assert values["hostname"] == "worker-01" and values["persist"] == "/etc/ssh /var/lib/x"
    assert values["planned"] == "1" and values["first_boot_timeout"] == "60" and values["slot"] == "a"
    done = subprocess.run(["sh", "-c", '. /dev/stdin; echo "$hostname|$persist|$node"'], input=shell, text=True,
                          capture_output=True, check=True)  # fmt: skip
    assert done.stdout == f"worker-01|/etc/ssh /var/lib/x|{A}\n"
    blank = node.read_shell(Decision("a", 2, "/dev/vda2", "ro", formats.Action.OFFLINE).to_shell())
    assert blank["hostname"] == blank["planned"] == blank["first_boot"] == ""


def test_an_older_masters_hostnames_json_is_taken_in_once(tmp_path, database):
    # the golden sample: hostnames.json as master/hostnames.py of a6a1a4d wrote it (index 3 forgotten)
    golden = (Path(__file__).resolve().parents[1] / "data" / "hostnames.rev1.json").read_text()
    (tmp_path / hostnames.REGISTRY).write_text(golden)
    said: list[str] = []
    names = Inventory(tmp_path, database_url=database, log=said.append)
    assert hostnames.read(names) == {
        A: hostnames.Entry(1, "worker-01"),
        B: hostnames.Entry(2, "db"),
        "52-54-00-00-00-04": hostnames.Entry(4, "worker-04"),
    }
    assert not (tmp_path / hostnames.REGISTRY).exists()
    assert (tmp_path / "hostnames.json.imported").read_text() == golden  # kept, renamed: never read again
    assert any("3 hostnames imported" in line for line in said), said
    # the next index goes on from the file's: 3 stays spent (forgotten), never reused
    assert hostnames.assign(names, C, hostname=None, pattern="worker-{index:02d}") == "worker-05"
    # another master's file, on a database whose registry holds names: not taken in, said
    other = tmp_path / "other"
    other.mkdir()
    (other / hostnames.REGISTRY).write_text(golden)
    if database:  # (SQLite: each master tree has its own file, so its own registry)
        said.clear()
        Inventory(other, database_url=database, log=said.append)
        assert (other / hostnames.REGISTRY).exists() and any("not imported" in line for line in said), said
    assert hostnames.read(Inventory(tmp_path, database_url=database))[C] == hostnames.Entry(5, "worker-05")


def test_a_hostnames_json_that_is_not_one_stops_the_inventory_in_one_line(tmp_path):
    (tmp_path / hostnames.REGISTRY).write_text('{"next_index": 1, "nodes": {"x": {"index": "one"}}}')
    with pytest.raises(RackbootError, match=r"hostnames.json: not a hostname registry \(next_index, nodes\)"):
        Inventory(tmp_path)
    assert (tmp_path / hostnames.REGISTRY).exists()
