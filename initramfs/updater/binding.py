"""Signatures that bind: a signed document is taken only when it was signed for this node
and for the question asked, not merely by the master key (TUF's and Uptane's checks
against wrong software for the device, mix-and-match and rollback).

- A plan is this node's own (``node`` its id) or the default one; the default only while
  the card has never taken a plan of its own, so an own plan cannot be swapped for it.
- Plans carry a ``serial`` the master raises on every write, one sequence for the node's
  own plan and one for the default. The card keeps the newest serialled plan it acted on
  (slot state rev3, PlanRecord) and refuses a lower serial of the same plan (a replay).
  A plan without a serial (an older master's) is taken while the card has never taken a
  serialled plan, and binds nothing; once it has, one is refused (else a replay of a plan
  from before the master's upgrade would roll the node back).
- A manifest is the image and version its path in the plan names; a boot manifest the
  build its path names. What a manifest pins (stream, block index, file manifest, hooks)
  is pinned by hash in it, so it is bound with it.

Pure functions: each refusal is a Refused naming what was asked and what came, in one line
(the step's name goes before it in the report: "plan: the plan is node ...'s").
"""

from __future__ import annotations

from .errors import Refused
from .formats import DEFAULT_PLAN, Manifest, Plan, PlanKind, PlanRecord, manifest_named


def plan_record(plan: Plan, node: str, card: PlanRecord | None) -> PlanRecord | None:
    """What the card records once ``plan`` (served for ``node``) is taken, given what it
    recorded before (``card``); None: nothing to record (a plan without a serial, with no
    serialled plan taken before). Refused when the plan is not this node's to take."""
    if plan.node not in (node, DEFAULT_PLAN):
        raise Refused(f"the plan is node {plan.node}'s, not this node's ({node}); refused")
    if plan.image is not None and manifest_named(plan.image) is None:
        raise Refused(
            f"the plan's image {plan.image[:120]!r} is not an image's manifest path "
            "(/images/<image>/<version>/manifest.json), so no manifest can be bound to it; refused"
        )
    mine = card if card is not None and card.node == node else None  # a card moved to another board starts over
    if mine is None:
        return None if plan.serial is None else PlanRecord(node, plan.kind, plan.serial)
    if plan.serial is None:
        raise Refused(
            f"the plan has no serial, and this card took serial {mine.serial} of its {mine.kind} plan; "
            "refused as a replay of a plan from before the master wrote serials"
        )
    if plan.kind is PlanKind.DEFAULT and mine.kind is PlanKind.OWN:
        raise Refused(
            f"the default plan, but this node has had a plan of its own (serial {mine.serial}); "
            "refused: a node's own plan is never swapped for the default one"
        )
    if plan.kind is mine.kind and plan.serial < mine.serial:
        raise Refused(
            f"the plan's serial {plan.serial} ({plan.kind} plan) is lower than {mine.serial}, the newest this "
            "card acted on; refused as a replay of an older plan"
        )
    return PlanRecord(node, plan.kind, plan.serial)


def check_manifest(path: str, manifest: Manifest) -> None:
    """The manifest at ``path`` (the plan's image) is the image and version that path names."""
    named = manifest_named(path)
    if named is None:  # plan_record refused such a plan already
        raise Refused(f"the plan's image {path[:120]!r} is not an image's manifest path; refused")
    if (manifest.image, manifest.version) != named:
        image, version = named
        raise Refused(
            f"manifest: {path} holds {manifest.image} v{manifest.version}, not {image} v{version} "
            "as the plan asked; refused"
        )


def check_boot_manifest(path: str, build: str, expected: str) -> None:
    """The boot manifest at ``path`` (the plan's boot) is of ``expected``, the build its path names."""
    if build != expected:
        raise Refused(f"boot manifest: {path} is of build {build}, not {expected} as the plan asked; refused")
