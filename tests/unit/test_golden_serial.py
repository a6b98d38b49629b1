"""Plan serials' golden samples (tests/data/make_golden_serial.py): plan rev7 and slot state
rev3 are read with their values and written byte for byte; the records before them read as
a card that never took a serialled plan, and an old card's state migrates when it is written."""

from __future__ import annotations

import json
import struct
import threading
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
from rackboot import config
from rackboot.initramfs.updater import formats, state
from rackboot.initramfs.updater.disk import Disk
from rackboot.initramfs.updater.errors import UpdaterError
from rackboot.initramfs.updater.formats import PlanKind, PlanRecord
from rackboot.master import plans, serve

from tests.data import make_golden_serial as golden
from tests.helpers import write_config

DATA = Path(__file__).resolve().parents[1] / "data"
NODE = golden.NODE
KEY = DATA / "keys" / "test-master.key"


def sample(name: str) -> bytes:
    return (DATA / name).read_bytes()


def card(tmp_path, area: bytes) -> str:
    path = tmp_path / "card.img"
    with open(path, "wb") as f:
        f.truncate(4 << 20)
        for i, offset in enumerate(state.COPIES):
            f.seek(offset)
            f.write(area[i * state.RESERVED : (i + 1) * state.RESERVED])
    return str(path)


def test_plan_rev7_carries_its_serial_and_is_written_byte_for_byte():
    plan = formats.parse_plan(sample("plan.format1.rev7.serial.json"))
    assert plan == golden.PLAN and (plan.serial, plan.kind, plan.default) == (7, PlanKind.OWN, False)
    assert formats.dump(plan) == sample("plan.format1.rev7.serial.json")


def test_the_default_plan_named_for_a_node_is_the_default_plan():
    plan = formats.parse_plan(sample("plan.format1.rev7.named-default.json"))
    assert plan == golden.NAMED_DEFAULT and (plan.node, plan.kind, plan.serial) == (NODE, PlanKind.DEFAULT, 3)
    assert formats.dump(plan) == sample("plan.format1.rev7.named-default.json")


@pytest.mark.parametrize(
    "name",
    ["plan.format1.rev1.json", "plan.format1.rev3.json", "plan.format1.rev4.json", "plan.format1.rev6.rsync.json"],
)
def test_plans_before_rev7_have_no_serial(name):
    plan = formats.parse_plan(sample(name))
    assert plan.serial is None and not plan.default and b"serial" not in formats.dump(plan)


@pytest.mark.parametrize("serial", [0, -1, "7", 1.5, True, None])
def test_a_serial_that_is_not_a_positive_integer_is_refused(serial):
    doc = {**json.loads(sample("plan.format1.rev7.serial.json")), "serial": serial}
    if serial is None:  # null reads as absent: a plan from before serials
        assert formats.parse_plan(json.dumps(doc)).serial is None
        return
    with pytest.raises(UpdaterError, match="^plan: serial: "):
        formats.parse_plan(json.dumps(doc))


def test_slot_state_rev3_is_read_with_the_plan_it_acted_on(tmp_path):
    with Disk(card(tmp_path, sample("slot-state.format1.rev3.bin")), writable=False) as d:
        newer, older = state.read_copies(d)
        assert state.read(d) == newer
    assert newer == replace(golden.STATES[2], seq=3) and newer.plan == PlanRecord(NODE, PlanKind.OWN, 2)
    assert older == replace(golden.STATES[1], seq=2) and older.plan == PlanRecord(NODE, PlanKind.OWN, 1)


def test_slot_state_writer_makes_the_rev3_area_byte_for_byte():
    assert golden.slot_state_area(golden.STATES) == sample("slot-state.format1.rev3.bin")


@pytest.mark.parametrize("name", ["slot-state.format1.rev1.bin", "slot-state.format1.rev2.bin"])
def test_older_slot_states_read_as_a_card_that_never_took_a_serialled_plan(tmp_path, name):
    with Disk(card(tmp_path, sample(name)), writable=False) as d:
        assert all(c is not None and c.plan is None for c in state.read_copies(d))


def test_a_rev2_card_migrates_to_rev3_when_its_state_is_written(tmp_path):
    path = card(tmp_path, sample("slot-state.format1.rev2.bin"))
    record = PlanRecord(NODE, PlanKind.DEFAULT, 4)
    with Disk(path) as d:
        old = state.read(d)
        stored = state.write(d, replace(old, plan=record))
        assert state.read(d) == stored == replace(old, seq=5, plan=record)
        # the older copy (seq 3) was overwritten; the other keeps rev2's seq 4 as it was
        assert [c.seq if c else None for c in state.read_copies(d)] == [5, 4]
        raw = d.read(state.COPIES[0], state.RESERVED)
    body = json.loads(raw[12 : 12 + struct.unpack_from("<I", raw, 8)[0]])
    assert body["plan"] == {"node": NODE, "kind": "default", "serial": 4}
    assert {k: v for k, v in body.items() if k != "plan"} == {**formats.SlotState.to_dict(old), "seq": 5}


@pytest.mark.parametrize(
    "plan, problem",
    [
        ({"node": NODE, "kind": "own", "serial": 0}, "serial: must be >= 1"),
        ({"node": NODE, "kind": "mine", "serial": 1}, "kind: must be one of own, default"),
        ({"node": "", "kind": "own", "serial": 1}, "node: '' is not a node id"),
        ("own", "expected a JSON object"),
    ],
)
def test_a_record_with_a_bad_plan_is_refused_by_name(plan, problem):
    body = json.loads(json.dumps(formats.SlotState.to_dict(replace(golden.STATES[2], seq=3))))
    body["plan"] = plan
    with pytest.raises(UpdaterError, match=problem):
        formats.parse_slot_state(json.dumps(body))


def test_serve_names_the_default_plan_for_a_node_as_the_sample_byte_for_byte(tmp_path):
    """The default plan's 3rd write, as `rackboot serve` hands it to a node under a hostname pattern."""
    cfg = config.load(write_config(tmp_path, master={"key": str(KEY), "hostname": "worker-{index:02d}"}))
    root = cfg.master.directory
    for _ in range(3):
        plans.write_plan(
            root, "default", replace(golden.NAMED_DEFAULT, node="default", hostname=None, default=False), key=KEY
        )
    srv = serve.make_server(root, "127.0.0.1", 0, quiet=True, config=cfg)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    srv.fleet.inventory.adopt(NODE)  # only an adopted node (one that reported) is named
    try:
        for suffix in ("", ".sig"):
            with urllib.request.urlopen(f"{srv.url}/plans/{NODE}.json{suffix}", timeout=10) as resp:
                assert resp.read() == sample(f"plan.format1.rev7.named-default.json{suffix}")
    finally:
        srv.shutdown()
        srv.server_close()
