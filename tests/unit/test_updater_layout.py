"""layout: ok / repartition / refuse decisions, pure."""

from __future__ import annotations

import pytest
from rackboot.initramfs.updater import layout, mbr
from rackboot.initramfs.updater.errors import UpdaterError
from rackboot.initramfs.updater.formats import Layout, Partition

MIB = 1 << 20


def plan(a=64, b=64, repartition="allowed", boot_start=4, boot=16) -> Layout:
    return Layout(
        (
            Partition("boot", boot_start, boot, "0c"),
            Partition("a", boot_start + boot, a, "83"),
            Partition("b", boot_start + boot + a, b, "83"),
            Partition("data", boot_start + boot + a + b, "rest", "83"),
        ),
        repartition,
    )


def test_rest_runs_to_the_card_end_aligned_down_to_a_mib():
    entries = layout.wanted_entries(plan(), 256 * MIB + 12345)
    assert [(e.number, e.start, e.sectors, e.type, e.bootable) for e in entries] == [
        (1, 4 * 2048, 16 * 2048, 0x0C, True),
        (2, 20 * 2048, 64 * 2048, 0x83, False),
        (3, 84 * 2048, 64 * 2048, 0x83, False),
        (4, 148 * 2048, 108 * 2048, 0x83, False),
    ]


def test_blank_card_gets_everything():
    d = layout.decide(plan(), None, 256 * MIB, node="w1")
    assert d.action == "repartition" and d.changed == ("boot", "a", "b", "data") and d.kept == ()
    assert d.table.entries == layout.wanted_entries(plan(), 256 * MIB)  # 16 MiB: no room for two boot areas
    assert d.table.signature == layout.decide(plan(), None, 256 * MIB, node="w1").table.signature != 0


def test_matching_card_is_ok_and_keeps_its_table():
    current = mbr.Mbr(0xABCD, layout.wanted_entries(plan(), 256 * MIB), b"\x01" * 440)
    d = layout.decide(plan(), current, 256 * MIB)
    assert d.action == "ok" and d.table == current and d.changed == ()


def test_same_plan_on_a_bigger_card_only_grows_data():
    current = mbr.Mbr(0xABCD, layout.wanted_entries(plan(), 256 * MIB))
    d = layout.decide(plan(), current, 512 * MIB)
    assert d.action == "repartition" and d.changed == ("data",)
    assert d.kept == ("boot", "a", "b", "data") and d.table.signature == 0xABCD
    assert d.table.entries[3].sectors == (512 - 148) * 2048


def test_slot_resize_keeps_boot_and_data_when_data_does_not_move():
    current = mbr.Mbr(7, layout.wanted_entries(plan(), 256 * MIB))
    d = layout.decide(plan(a=48, b=80), current, 256 * MIB)
    assert d.changed == ("a", "b") and d.kept == ("boot", "a", "data")  # a keeps its start


def test_type_change_is_a_change():
    current = mbr.Mbr(7, layout.wanted_entries(plan(), 256 * MIB))
    other = Layout(plan().partitions[:3] + (Partition("data", 148, "rest", "0c"),), "allowed")
    d = layout.decide(other, current, 256 * MIB)
    assert d.changed == ("data",) and "data" not in d.kept


def test_extra_partition_on_the_card_is_a_mismatch():
    three = Layout(plan().partitions[:3], "never")
    current = mbr.Mbr(7, layout.wanted_entries(plan(), 256 * MIB))
    with pytest.raises(UpdaterError, match=r"differs from the plan \(extra partition 4\)"):
        layout.decide(three, current, 256 * MIB)


def test_repartition_never_refuses_a_mismatch():
    current = mbr.Mbr(7, layout.wanted_entries(plan(), 256 * MIB))
    with pytest.raises(UpdaterError, match=r"\(a, b\) and the plan says repartition never"):
        layout.decide(plan(a=48, b=80, repartition="never"), current, 256 * MIB)


def test_boot_partition_never_moves():
    current = mbr.Mbr(7, layout.wanted_entries(plan(), 256 * MIB))
    with pytest.raises(
        UpdaterError,
        match=r"change the boot partition's size \(card 32768, plan 65536 sectors\); "
        r"refusing$",
    ):
        layout.decide(plan(boot=32), current, 256 * MIB)
    with pytest.raises(
        UpdaterError,
        match=r"boot partition's start \(card 8192, plan 16384 sectors\) and size "
        r"\(card 32768, plan 30720 sectors\); refusing$",
    ):
        layout.decide(plan(boot_start=8, boot=15), current, 256 * MIB)


def test_a_blank_card_with_room_for_two_boot_areas_gets_area_a():
    d = layout.decide(plan(boot=80), None, 512 * MIB, node="w1")
    _, *rest = layout.wanted_entries(plan(boot=80), 512 * MIB)
    assert d.table.entries[0] == mbr.Entry(1, 0x0C, 4 * 2048, 40 * 2048, bootable=True)
    assert list(d.table.entries[1:]) == rest


@pytest.mark.parametrize("area", ["a", "b", "whole"])
def test_entry_1_on_either_boot_area_or_the_whole_region_is_the_plans_boot(area):
    """The plan's boot partition is the card's boot region: entry 1 points at area A or B
    (bootfiles.py), or spans the region on a card from before boot areas; each is kept as
    it is, also when the slots are repartitioned."""
    start, sectors = {"a": (4, 40), "b": (44, 40), "whole": (4, 80)}[area]
    entries = layout.wanted_entries(plan(boot=80), 512 * MIB)
    boot = mbr.Entry(1, 0x0C, start * 2048, sectors * 2048, bootable=True)
    current = mbr.Mbr(7, (boot, *entries[1:]))
    assert layout.decide(plan(boot=80), current, 512 * MIB).action == "ok"
    d = layout.decide(plan(boot=80, a=48, b=80), current, 512 * MIB)
    assert d.changed == ("a", "b") and d.table.entries[0] == boot


def test_entry_1_on_half_an_area_is_refused():
    entries = layout.wanted_entries(plan(boot=80), 512 * MIB)
    current = mbr.Mbr(7, (mbr.Entry(1, 0x0C, 4 * 2048, 20 * 2048, bootable=True), *entries[1:]))
    with pytest.raises(UpdaterError, match=r"boot partition's size \(card 40960, plan 163840 sectors\); refusing$"):
        layout.decide(plan(boot=80), current, 512 * MIB)


def with_boot_type(ptype: str) -> Layout:
    return Layout((Partition("boot", 4, 16, ptype),) + plan().partitions[1:], "allowed")


def test_a_boot_type_change_is_refused_naming_the_type_not_a_move():
    """The card image once always wrote 0c whatever the plan said: start and size equal, and
    the refusal spoke of moving or resizing."""
    current = mbr.Mbr(7, layout.wanted_entries(with_boot_type("0c"), 256 * MIB))
    with pytest.raises(UpdaterError, match=r"change the boot partition's type \(card 0c, plan 0e\); refusing$"):
        layout.decide(with_boot_type("0e"), current, 256 * MIB)


@pytest.mark.parametrize("ptype", ["05", "0f", "85", "ee"])
def test_an_extended_boot_type_is_refused_even_on_a_blank_card(ptype):
    """Written, it would make the card's table unreadable: the next boot saw a blank card."""
    with pytest.raises(UpdaterError, match=rf"partition boot: type {ptype} is an extended or GPT entry"):
        layout.decide(with_boot_type(ptype), None, 256 * MIB)


@pytest.mark.parametrize("ptype", ["05", "0f", "85", "ee"])
def test_a_slot_typed_as_an_extended_or_gpt_entry_is_refused(ptype):
    """mbr.parse refuses such entries, so a table holding one would read as blank next boot."""
    odd = Layout(plan().partitions[:3] + (Partition("data", 148, "rest", ptype),), "allowed")
    with pytest.raises(UpdaterError, match=rf"partition data: type {ptype} is an extended or GPT entry"):
        layout.wanted_entries(odd, 256 * MIB)


def test_rest_stops_at_mbr_2tib_on_a_bigger_card():
    entries = layout.wanted_entries(plan(), 3 << 40)
    assert entries[-1].end == 1 << 32  # the last sector a 32-bit LBA addresses
    mbr.dump(mbr.Mbr(7, entries))  # a table the card can hold
    with pytest.raises(UpdaterError, match="needs 2097173 MiB, the card has 2097152 MiB that MBR can address"):
        layout.wanted_entries(plan(a=1 << 20, b=1 << 20), 3 << 40)


def test_card_too_small_names_both_sizes():
    with pytest.raises(UpdaterError, match="card too small: the plan needs 213 MiB, the card has 200 MiB"):
        layout.wanted_entries(plan(a=96, b=96), 200 * MIB)
    with pytest.raises(UpdaterError, match="needs 149 MiB, the card has 148 MiB"):
        layout.wanted_entries(plan(), 148 * MIB + 4096)  # rest would be empty


def test_partition_range():
    table = mbr.Mbr(7, layout.wanted_entries(plan(), 256 * MIB))
    assert layout.partition_range(table, 3) == (84 * MIB, 64 * MIB)
    with pytest.raises(UpdaterError, match="no partition 4"):
        layout.partition_range(mbr.Mbr(7, table.entries[:3]), 4)
