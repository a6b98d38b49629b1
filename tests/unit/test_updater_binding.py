"""binding: which plans, manifests and boot manifests a card takes, case by case (the
updater against a real master: tests/integration/test_updater_binding.py)."""

from __future__ import annotations

import pytest
from rackboot.initramfs.updater import binding, bootfiles
from rackboot.initramfs.updater.errors import Refused
from rackboot.initramfs.updater.formats import (
    Layout,
    Manifest,
    Partition,
    Plan,
    PlanKind,
    PlanRecord,
    manifest_named,
    manifest_path,
)

NODE = "52-54-00-12-34-56"
LAYOUT = Layout((Partition("a", 4, 64, "83"), Partition("b", 68, 64, "83")))
OWN, DEFAULT = PlanKind.OWN, PlanKind.DEFAULT


def plan(node: str = NODE, serial: int | None = None, *, default: bool = False, image: str | None = None) -> Plan:
    return Plan(node=node, layout=LAYOUT, image=image, serial=serial, default=default)


@pytest.mark.parametrize(
    "taken, card, record",
    [
        (plan(serial=None), None, None),  # an older master's plan binds nothing
        (plan("default", None), None, None),
        (plan(serial=5), None, PlanRecord(NODE, OWN, 5)),
        (plan("default", 3), None, PlanRecord(NODE, DEFAULT, 3)),
        (plan(serial=3, default=True), None, PlanRecord(NODE, DEFAULT, 3)),  # serve's named default
        (plan(serial=5), PlanRecord(NODE, OWN, 5), PlanRecord(NODE, OWN, 5)),  # the same plan again
        (plan(serial=6), PlanRecord(NODE, OWN, 5), PlanRecord(NODE, OWN, 6)),
        (plan("default", 9), PlanRecord(NODE, DEFAULT, 8), PlanRecord(NODE, DEFAULT, 9)),
        (plan(serial=1), PlanRecord(NODE, DEFAULT, 8), PlanRecord(NODE, OWN, 1)),  # own: a sequence of its own
        (plan(serial=1), PlanRecord("52-54-00-00-00-09", OWN, 7), PlanRecord(NODE, OWN, 1)),  # a card on a new board
        (plan("default", 1), PlanRecord("52-54-00-00-00-09", OWN, 7), PlanRecord(NODE, DEFAULT, 1)),
    ],
)
def test_plans_a_card_takes_and_what_it_records(taken, card, record):
    assert binding.plan_record(taken, NODE, card) == record


@pytest.mark.parametrize(
    "taken, card, message",
    [
        (plan("52-54-00-00-00-09", 9), None, "the plan is node 52-54-00-00-00-09's, not this node's"),
        (plan("db-primary", None), PlanRecord(NODE, OWN, 1), "the plan is node db-primary's"),
        (plan(serial=4), PlanRecord(NODE, OWN, 5), "the plan's serial 4 (own plan) is lower than 5"),
        (plan("default", 7), PlanRecord(NODE, DEFAULT, 8), "the plan's serial 7 (default plan) is lower than 8"),
        (plan("default", 99), PlanRecord(NODE, OWN, 1), "the default plan, but this node has had a plan of its own"),
        (plan(serial=99, default=True), PlanRecord(NODE, OWN, 1), "the default plan, but this node has had"),
        (
            plan(serial=None),
            PlanRecord(NODE, OWN, 1),
            "the plan has no serial, and this card took serial 1 of its own plan",
        ),
        (plan("default", None), PlanRecord(NODE, DEFAULT, 2), "the plan has no serial"),
        (plan(serial=1, image="/images/example/latest.json"), None, "is not an image's manifest path"),
    ],
)
def test_plans_a_card_refuses_in_one_line(taken, card, message):
    with pytest.raises(Refused) as e:
        binding.plan_record(taken, NODE, card)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "path, named",
    [
        ("/images/example/2/manifest.json", ("example", 2)),
        ("/images/a.b_c-d/123/manifest.json", ("a.b_c-d", 123)),
        ("/images/example/02/manifest.json", None),  # no directory publish writes
        ("/images/example/0/manifest.json", None),
        ("/images/Example/2/manifest.json", None),
        ("/images/example/2/manifest.json.sig", None),
        ("/images/example/2/../3/manifest.json", None),
        ("/plans/default.json", None),
    ],
)
def test_a_manifest_path_names_its_image_and_version(path, named):
    assert manifest_named(path) == named
    if named:
        assert manifest_path(*named) == path


def manifest(image: str, version: int) -> Manifest:
    return Manifest(image, version, 1, "0" * 64, "0" * 8, "rootfs.ext4.gz", 1, "0" * 64)


def test_a_manifest_is_bound_to_the_image_and_version_its_path_names():
    binding.check_manifest("/images/example/2/manifest.json", manifest("example", 2))
    for other in (manifest("example", 1), manifest("other", 2)):
        with pytest.raises(Refused, match=r"^manifest: /images/example/2/manifest.json holds .*, not example v2"):
            binding.check_manifest("/images/example/2/manifest.json", other)


def test_a_boot_manifest_is_bound_to_the_build_its_path_names():
    build = "0123456789abcdef"
    path = f"/boot/{build}/boot.json"
    assert bootfiles.build_named(path) == build
    assert bootfiles.build_named("/boot/0123456789ABCDEF/boot.json") is None
    assert bootfiles.build_named(f"/boot/{build}/boot.json.sig") is None
    binding.check_boot_manifest(path, build, build)
    with pytest.raises(Refused, match=f"is of build fedcba9876543210, not {build} as the plan asked"):
        binding.check_boot_manifest(path, "fedcba9876543210", build)
