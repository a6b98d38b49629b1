"""Make the plan serials' golden samples in tests/data with today's code (the revision that wrote them).

Run from the repository:  .venv/bin/python tests/data/make_golden_serial.py
plan rev7 (serial; a node's own plan as plans.write_plan writes it, and the default plan as
rackboot serve names it for one node: default true) and the slot state's rev3 (plan: the
newest serialled plan the card acted on); the .sig files with the committed test key
(tests/data/keys).
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

from rackboot.initramfs.updater import formats, state
from rackboot.initramfs.updater.disk import Disk
from rackboot.initramfs.updater.formats import PlanKind, PlanRecord, Slot, SlotState
from rackboot.master import signing

HERE = Path(__file__).resolve().parent
KEY = HERE / "keys" / "test-master.key"
MIB = 1 << 20
NODE = "52-54-00-12-34-56"
H1, H2 = hashlib.sha256(b"example v1").hexdigest(), hashlib.sha256(b"example v2").hexdigest()
LAYOUT = formats.Layout(
    (
        formats.Partition("boot", 4, 16, "0c"),
        formats.Partition("a", 20, 64, "83"),
        formats.Partition("b", 84, 64, "83"),
        formats.Partition("data", 148, "rest", "83"),
    )
)

# plan rev4's values (a node's own plan, hostname and persisted paths), its 7th write
PLAN = formats.Plan(
    node=NODE,
    layout=LAYOUT,
    image="/images/example/2/manifest.json",
    pin=True,
    tries=5,
    hostname="worker-01",
    persist=("/etc/ssh", "/var/lib/myservice"),
    serial=7,
)
# the default plan (rev3's values, 3rd write) as serve hands it to NODE under a [master] hostname pattern
NAMED_DEFAULT = formats.Plan(
    node=NODE,
    layout=LAYOUT,
    image="/images/example/2/manifest.json",
    pin=True,
    tries=5,
    hostname="worker-01",
    serial=3,
    default=True,
)

GOOD_A = Slot(formats.SlotStatus.GOOD, "example", 1, H1, 2)
# three writes on a blank card: a good v1 under the default plan's serial 3; then the node's
# own plan (serial 1) has slot b written with v2; then its serial 2 (same image) finds b on trial
STATES = [
    SlotState(slots={"a": GOOD_A}, primary="a", last_good="a", plan=PlanRecord(NODE, PlanKind.DEFAULT, 3)),
    SlotState(
        slots={"a": GOOD_A, "b": Slot(formats.SlotStatus.WRITING, "example", 2, H2, 3)},
        primary="a",
        last_good="a",
        plan=PlanRecord(NODE, PlanKind.OWN, 1),
    ),
    SlotState(
        slots={"a": GOOD_A, "b": Slot(formats.SlotStatus.TRIAL, "example", 2, H2, 3, tries=3)},
        primary="b",
        last_good="a",
        plan=PlanRecord(NODE, PlanKind.OWN, 2),
    ),
]


def slot_state_area(states: list[SlotState]) -> bytes:
    """``states`` written one after another by state.write on a blank card: both copies' areas."""
    with tempfile.NamedTemporaryFile() as card:
        card.truncate(4 * MIB)
        with Disk(card.name) as d:
            for s in states:
                state.write(d, s)
            return b"".join(d.read(offset, state.RESERVED) for offset in state.COPIES)


def main() -> None:
    for name, doc in (("plan.format1.rev7.serial.json", PLAN), ("plan.format1.rev7.named-default.json", NAMED_DEFAULT)):
        data = formats.dump(doc)
        (HERE / name).write_bytes(data)
        (HERE / (name + ".sig")).write_bytes(signing.sign(KEY, data))
        print(f"{name}: {len(data)} bytes, signed")
    area = slot_state_area(STATES)
    (HERE / "slot-state.format1.rev3.bin").write_bytes(area)
    print(f"slot-state.format1.rev3.bin: {len(area)} bytes")


if __name__ == "__main__":
    main()
