"""The rack at a glance and under control, on emulated workers: a blank worker is discovered
with its first report (its plan request alone records nothing), `rackboot status` and its
JSON show what each node runs, the fleet page in headless Chromium shows the rows while a
worker reports, `rackboot power` switches workers through QEMU's QMP (the `qemu` driver),
and a rollout of a version that never confirms halts after its first wave while the other
worker never receives it. Each worker signs its reports with a key of its own, pinned on
its first report: confirms forged for a worker that never booted v2 are refused and the
wave does not advance.

Two workers on QEMU's user-mode network, each running with -no-shutdown so that a powered
off worker keeps its QEMU and `rackboot power` can start it again. The story runs once
(module fixture, ~6 boots); the tests read what it recorded.

    A: boot 1 discovered, installs v1 | power cycle: boot 2 confirms v1 (B: boot 1, discovered, v1 from the card)
    rollout of a broken v2 with --cycle; confirms forged for A are refused, the wave stays;
    A installs v2, which never confirms
    power cycle --all: A gives v2 up and falls back (the rollout halts), B boots v1 again
"""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from rackboot import config
from rackboot.initramfs.updater import formats, nodekey
from rackboot.master import nodekeys, plans, power
from rackboot.qemu import harness
from rackboot.qemu.runner import QemuWorker

from tests import browser
from tests.e2e.rack import example_config
from tests.helpers import quiet

pytestmark = [pytest.mark.e2e, pytest.mark.network]

A, B = "52:54:00:00:00:0a", "52:54:00:00:00:0b"
NODE_A, NODE_B = A.replace(":", "-"), B.replace(":", "-")
TOKEN = "e2e-fleet-token-0123456789"
BOOT = 300  # seconds one boot may take on a busy machine


@dataclass
class Story:
    cfg: config.Config
    url: str
    doms: dict[str, str] = field(default_factory=dict)  # the page's DOM at moments of the story
    outputs: dict[str, str] = field(default_factory=dict)  # what commands printed
    codes: dict[str, int] = field(default_factory=dict)
    switched: dict[str, str] = field(default_factory=dict)  # QMP run-state after power actions
    logs: dict[str, Path] = field(default_factory=dict)
    api: dict[str, object] = field(default_factory=dict)  # what the JSON API said at the end
    forged: list[tuple[int, str]] = field(default_factory=list)  # (status, answer) of each forged confirm


def fleet_config(directory: Path) -> config.Config:
    """The example with one try per new slot (a broken version gives up at the next boot), a
    token, and the qemu power driver on QMP sockets under directory/qmp."""
    path = example_config(directory, tries=1)
    text = path.read_text().replace("[master]\n", f'[master]\ntoken = "{TOKEN}"\n', 1)
    text += f'[power]\ndriver = "qemu"\nqmp = "{directory}/qmp/{{node}}.qmp"\nstagger = 1\n'
    path.write_text(text)
    return config.load(path)


def worker(cfg: config.Config, out: Path, card: Path, log: Path, mac: str) -> QemuWorker:
    """A worker that stays a QEMU process when it powers off (-no-shutdown), its QMP socket
    where the config's [power] qmp names it."""
    # not -no-reboot: QEMU would take the driver's reset for a shutdown
    w = harness.new_worker(cfg, out, card, log, mac=mac, no_reboot=False, extra_args=["-no-shutdown"])
    link = Path(cfg.power.qmp.format(node=mac.replace(":", "-")))
    link.parent.mkdir(exist_ok=True)
    link.unlink(missing_ok=True)
    link.symlink_to(w.qmp_path)
    return w


def run_cli(story: Story, name: str, *args: str) -> int:
    """`rackboot ARGS -c CONFIG` in a process of its own, as a person runs it."""
    done = subprocess.run(
        [str(harness.rackboot_command()), *args, "-c", str(story.cfg.path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "NO_COLOR": "1"},
    )
    story.outputs[name] = done.stdout + done.stderr
    story.codes[name] = done.returncode
    return done.returncode


def run_state(cfg: config.Config, node: str) -> str:
    return str(power.qmp(cfg.power.qmp.format(node=node), "query-status")[0]["status"])


@pytest.fixture(scope="module")
def story(tmp_path_factory) -> Story:
    directory = tmp_path_factory.mktemp("fleet")
    cfg = fleet_config(directory)
    work = directory / "demo"
    out = harness.prepare(cfg, work, log=quiet)
    harness.publish_example(cfg, cfg.base / "rootfs", work, 1)
    plans.assign(cfg, node="default", image=harness.IMAGE)
    cards = {NODE_A: work / "a.img", NODE_B: work / "b.img"}
    harness.blank_card(out / "sdcard.img", cards[NODE_A])
    master = harness.MasterThread(cfg)
    story = Story(cfg, f"http://127.0.0.1:{cfg.master.port}")
    story.logs = {NODE_A: work / "logs" / "a.log", NODE_B: work / "logs" / "b.log"}
    a = worker(cfg, out, cards[NODE_A], story.logs[NODE_A], A)
    b: QemuWorker | None = None
    try:
        a.start()
        # boot 1 of A: a blank card, a node the master has never seen
        a.expect(r"rackboot: plan for ", timeout=BOOT)
        wait_known(story.url, NODE_A, timeout=BOOT)  # its first report (first contact, signed) adopts it
        story.doms["discovered"] = browser.dump_dom(story.url + "/")  # while it installs and reports
        a.expect(r"rackboot-demo: v1 is up", timeout=BOOT)
        wait_paused(a)
        story.switched["a after poweroff"] = run_state(cfg, NODE_A)
        run_cli(story, "power off a (already off)", "power", "off", A)
        # boot 2 of A (it confirms v1) through the qemu driver; B, with a copy of A's card
        # as it is now (v1 in slot a), boots for the first time beside it
        subprocess.run(["cp", "--sparse=always", cards[NODE_A], cards[NODE_B]], check=True)
        run_cli(story, "power cycle a", "power", "cycle", A)
        b = worker(cfg, out, cards[NODE_B], story.logs[NODE_B], B).start()
        a.expect(r"rackboot-demo: v1 is up", timeout=BOOT)
        b.expect(r"rackboot-demo: v1 is up", timeout=BOOT)
        wait_paused(a)
        wait_paused(b)
        run_cli(story, "status", "status")
        run_cli(story, "status json", "status", "--json")
        run_cli(story, "status a", "status", "--node", A)
        # a version that never confirms, rolled out in waves; --cycle switches wave 1 (A) on
        harness.publish_example(cfg, cfg.base / "rootfs", work, 2, broken=True)
        run_cli(story, "rollout", "rollout", "--image", harness.IMAGE, "--waves", "1,rest", "--cycle")
        # while A has not booted v2, confirms of v2 in its name from another host: refused
        story.forged = forge_confirms(story.url, NODE_A)
        run_cli(story, "rollout after forgeries", "rollout", "--status")
        story.api["plan of B after forgeries"] = (cfg.master.directory / "plans" / f"{NODE_B}.json").exists()
        a.expect(r"rackboot-demo: v2 is up", timeout=BOOT)
        wait_paused(a)
        # the rack switched on again, staggered: A gives v2 up, B keeps v1
        run_cli(story, "power cycle all", "power", "cycle", "--all", "--stagger", "1")
        a.expect(r"rackboot-demo: v1 is up", timeout=BOOT)
        b.expect(r"rackboot-demo: v1 is up", timeout=BOOT)
        wait_paused(a)
        wait_paused(b)
        run_cli(story, "rollout status", "rollout", "--status")
        story.doms["halted"] = browser.dump_dom(story.url + "/")
        for path in ("/api/rollouts", f"/api/nodes/{NODE_A}"):
            story.api[path] = api(story.url, path)
        run_cli(story, "status end", "status")
        shot = os.environ.get("RACKBOOT_SCREENSHOT")  # the README's picture: make it with this run
        if shot:
            browser.screenshot(story.url + "/", Path(shot))
    finally:
        a.kill()
        if b is not None:
            b.kill()
        master.stop()
    return story


def forge_confirms(url: str, node: str) -> list[tuple[int, str]]:
    """POST confirms of v2 for ``node``: unsigned, signed by a key of the forger's own, and
    claiming the node's pinned key; (status, answer) of each."""
    pinned = api(url, f"/api/nodes/{node}")["pubkey"]  # type: ignore[index]
    forger = nodekey.generate(node)
    doc = {"node": node, "phase": "confirm", "bytes": 0, "seconds": 0.0, "error": None, "slot": "b", "version": 2}
    tries = [
        (doc | {"time": round(time.time(), 3)}, None),
        (doc | {"time": round(time.time(), 3) + 1, "pubkey": forger.public_b64}, forger),
        (doc | {"time": round(time.time(), 3) + 2, "pubkey": pinned}, forger),
    ]
    answers = []
    for fields, key in tries:
        body = formats.dump(fields)
        headers = {nodekeys.SIGNATURE_HEADER: base64.b64encode(key.sign(body)).decode()} if key else {}
        req = urllib.request.Request(url + "/report", data=body, method="POST", headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                answers.append((resp.status, resp.read().decode()))
        except urllib.error.HTTPError as e:
            answers.append((e.code, e.read().decode()))
    return answers


def wait_known(url: str, node: str, timeout: float) -> None:
    """Until the inventory holds ``node`` (GET /api/nodes/<id> is 200)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            api(url, f"/api/nodes/{node}")
            return
        except urllib.error.HTTPError:
            time.sleep(0.2)
    raise AssertionError(f"{node} not in the inventory within {timeout} s")


def wait_paused(w: QemuWorker, timeout: float = 60) -> None:
    """A worker powered off under -no-shutdown: QEMU stays, its guest is shut down."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if power.qmp(w.qmp_path, "query-status")[0]["status"] == "shutdown":
            return
        time.sleep(0.5)
    raise AssertionError(f"worker did not power off within {timeout} s (log: {w.log_path})")


def api(url: str, path: str) -> object:
    with urllib.request.urlopen(url + path, timeout=30) as resp:
        return json.loads(resp.read())


def test_a_blank_worker_is_discovered_with_its_first_report(story):
    assert f'data-node="{NODE_A}"' in story.doms["discovered"]  # on the page while it installed
    history = [r["phase"] for r in story_history(story, NODE_A)]
    # reported from its first boot on: the blank card laid out, v1 written and committed, then confirmed
    assert history.index("layout") < history.index("commit") < history.index("confirm")


def story_history(story: Story, node: str) -> list[dict]:
    doc = json.loads(story.outputs["status json"])
    assert [n["id"] for n in doc] == [NODE_A, NODE_B]
    db = sqlite3.connect(story.cfg.master.directory / ".inventory.db")
    rows = db.execute("SELECT phase, version, error FROM reports WHERE node = ? ORDER BY id", (node,)).fetchall()
    return [{"phase": p, "version": v, "error": e} for p, v, e in rows]


def test_status_shows_each_node_its_version_and_state(story):
    lines = story.outputs["status"].splitlines()
    assert story.codes["status"] == 0 and "\x1b[" not in story.outputs["status"]
    row_a = next(line for line in lines if line.startswith(NODE_A))
    row_b = next(line for line in lines if line.startswith(NODE_B))
    assert "a example v1 (good)" in row_a and " ok " in row_a
    assert " ok " in row_b and "a " in row_b and "v1" in row_b
    assert lines[-1] == "2 nodes: 2 ok"
    doc = {n["id"]: n for n in json.loads(story.outputs["status json"])}
    assert doc[NODE_A]["plan"] == "default" and doc[NODE_A]["adopted"] is True
    assert doc[NODE_A]["booted_slot"] == "a" and doc[NODE_A]["booted_version"] == 1
    assert doc[NODE_A]["install_bytes"] > 0 and doc[NODE_A]["last_action"] == "up-to-date"
    assert doc[NODE_B]["first_seen"] > doc[NODE_A]["first_seen"]
    assert "history (oldest first):" in story.outputs["status a"] and "confirm" in story.outputs["status a"]


def test_power_goes_through_qmp(story):
    assert story.switched["a after poweroff"] == "shutdown"
    assert story.codes["power off a (already off)"] == 0
    assert "already off" in story.outputs["power off a (already off)"]
    assert story.codes["power cycle a"] == 0 and "cycled" in story.outputs["power cycle a"]
    # each cycle was a boot: A booted four times, B twice (its console says so)
    assert story.logs[NODE_A].read_text(errors="replace").count("rackboot-demo: v") == 4
    assert story.logs[NODE_B].read_text(errors="replace").count("rackboot-demo: v1 is up") == 2
    assert story.outputs["power cycle all"].count("cycled") == 2


def test_a_version_that_never_confirms_halts_the_rollout_after_its_first_wave(story):
    assert story.codes["rollout"] == 0, story.outputs["rollout"]
    assert story.codes["rollout status"] == 1  # halted
    said = story.outputs["rollout status"]
    assert "halted in wave 1" in said and NODE_A in said and "never confirmed itself" in said
    [rollout] = story.api["/api/rollouts"]["rollouts"]
    assert rollout["state"] == "halted" and rollout["waves"] == [[NODE_A], [NODE_B]]
    assert rollout["nodes"][NODE_B]["state"] == "waiting"
    # B never received v2: no plan of its own, nothing about v2 in its reports
    assert not (story.cfg.master.directory / "plans" / f"{NODE_B}.json").exists()
    assert all(r["version"] != 2 for r in story_history(story, NODE_B))
    node_a = story.api[f"/api/nodes/{NODE_A}"]
    assert node_a["booted_version"] == 1 and node_a["slots"]["b"]["state"] == "failed"
    assert node_a["state"] == "fallback"


def test_the_page_in_a_browser_shows_the_rows_and_the_halt(story):
    dom = story.doms["halted"]
    assert 'data-refreshed="yes"' in dom  # its script fetched the API and redrew the table
    assert f'<tr data-node="{NODE_A}" data-state="fallback">' in dom
    assert f'<tr data-node="{NODE_B}" data-state="ok">' in dom
    assert 'data-state="halted"' in dom and "never confirmed itself" in dom
    assert '<meta name="viewport"' in dom


def test_forged_confirms_for_a_node_that_never_booted_v2_do_not_advance_the_wave(story):
    assert [status for status, _ in story.forged] == [403, 403, 403], story.forged
    unsigned, own_key, claimed = (json.loads(answer)["error"] for _, answer in story.forged)
    assert unsigned.startswith(f"report refused: unsigned report for {NODE_A}, whose key ed25519 SHA256:")
    assert own_key.startswith(f"report refused: key mismatch: {NODE_A} presents ")
    assert claimed.startswith(f"report refused: signature does not verify with {NODE_A}'s pinned key")
    said = story.outputs["rollout after forgeries"]
    assert "running, wave 1 of 2, 0 of 2 nodes confirmed" in said and f"{NODE_A} assigned" in said, said
    assert story.api["plan of B after forgeries"] is False  # wave 2 never began
    # kept in A's history, marked refused, and A confirmed nothing
    history = story.api[f"/api/nodes/{NODE_A}"]["history"]  # type: ignore[index]
    refused = [h for h in history if h["refused"]]
    assert [(h["phase"], h["version"], h["signed"]) for h in refused] == [("confirm", 2, False)] * 3
    assert not any(h["phase"] == "confirm" and h["version"] == 2 and not h["refused"] for h in history)


def test_each_worker_signs_with_a_key_of_its_own_pinned_on_its_first_report(story):
    node_a = story.api[f"/api/nodes/{NODE_A}"]
    fingerprint = node_a["key_fingerprint"]  # type: ignore[index]
    assert fingerprint.startswith("ed25519 SHA256:") and f"key              {fingerprint}" in story.outputs["status a"]
    # the fingerprint the master pinned is the one A's console printed when it made the key
    console = story.logs[NODE_A].read_text(errors="replace")
    assert f"rackboot: node key: {fingerprint} kept on the card" in console
    assert all(h["signed"] for h in node_a["history"] if not h["refused"])  # type: ignore[index]
    # B's card was a copy of A's: on its first boot in another board it made a key of its own
    b_console = story.logs[NODE_B].read_text(errors="replace")
    assert f"node key: making a key for {NODE_B}: the card's key is {NODE_A}'s (this card moved)" in b_console
    doc = {n["id"]: n for n in json.loads(story.outputs["status json"])}
    assert doc[NODE_B]["pubkey"] not in (None, doc[NODE_A]["pubkey"])
