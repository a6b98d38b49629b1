"""The fleet's pure parts: a node's state machine over its reports, the status table, the wave
arithmetic, a rollout node's judgement, the token check and the power command template."""

from __future__ import annotations

import io
from dataclasses import replace

import pytest
from rackboot import config
from rackboot.errors import ConfigError, RackbootError
from rackboot.initramfs.updater.formats import Phase, Report
from rackboot.master import power, rollout, status, web
from rackboot.master.inventory import Inventory, Node, NodeState, SlotInfo, apply, clean_serial, parse_manifest_path

NODE = "52-54-00-12-34-56"


def report(phase: Phase, **fields) -> Report:
    return Report(node=NODE, phase=phase, **fields)


def run(*reports: Report, node: Node | None = None) -> Node:
    node = node or Node(id=NODE, image="example", version=2)
    for i, r in enumerate(reports):
        node = apply(node, r, received=1000.0 + i)
    return node


def test_an_install_then_its_confirmation_walks_the_node_through_its_states():
    node = run(report(Phase.DOWNLOAD, slot="b", version=2, bytes=5000, seconds=2.5))
    assert node.state == NodeState.INSTALLING and node.slots["b"].state == "writing"
    node = run(report(Phase.COMMIT, slot="b", version=2), node=node)
    assert node.state == NodeState.TRIAL and node.slots["b"].image == "example"
    node = run(report(Phase.BOOT, slot="b", version=2), node=node)
    assert (node.state, node.last_action, node.booted_slot, node.booted_version) == (
        NodeState.TRIAL,
        "installed",
        "b",
        2,
    )
    assert (node.install_bytes, node.install_seconds) == (5000, 2.5)
    node = run(report(Phase.CONFIRM, slot="b", version=2), report(Phase.BOOT, slot="b", version=2), node=node)
    assert (node.state, node.last_action, node.slots["b"].state) == (NodeState.OK, "up-to-date", "good")


def test_a_trial_that_never_confirms_is_failed_and_the_node_falls_back():
    node = run(
        report(Phase.BOOT, slot="a", version=1),
        report(Phase.COMMIT, slot="b", version=2),
        report(Phase.BOOT, slot="b", version=2),
        report(Phase.ERROR, slot="b", version=2, error="slot b (example v2) never confirmed itself; back to slot a"),
        report(Phase.BOOT, slot="a", version=1, error="never confirmed itself"),
    )
    assert node.slots["b"].state == "failed" and node.slots["a"].state == "good"
    assert (node.state, node.last_action, node.booted_slot) == (NodeState.FALLBACK, "fallback", "a")
    assert node.last_error == "never confirmed itself"


def test_a_confirmation_sent_before_the_plan_request_gets_its_image_later():
    # the updater takes a confirmation before it asks for its plan: the first report of a node
    node = apply(Node(id=NODE), report(Phase.CONFIRM, slot="a", version=1), received=1.0)
    assert node.slots["a"] == SlotInfo(None, 1, "good")
    planned = replace(node, image="example", version=1)  # then its plan request names the image
    assert run(report(Phase.BOOT, slot="a", version=1), node=planned).slots["a"] == SlotInfo("example", 1, "good")


def test_the_hostname_a_node_reports_labels_it():
    assert run(report(Phase.BOOT, slot="a", version=2, hostname="worker-07")).label == "worker-07"
    assert run(report(Phase.BOOT, slot="a", version=2), node=Node(id=NODE, label="rack-3")).label == "rack-3"


def test_an_install_error_marks_the_slot_bad_not_failed():
    node = run(
        report(Phase.DOWNLOAD, slot="b", version=2),
        report(Phase.ERROR, slot="b", version=2, error="verify: sha256 differs"),
    )
    assert node.slots["b"].state == "bad" and node.state == NodeState.ERROR and node.last_error_at == 1001.0


@pytest.mark.parametrize(
    "seconds, said",
    [
        (-3, "just now"),
        (2, "just now"),
        (42, "42 s ago"),
        (150, "2 min ago"),
        (7300, "2 h ago"),
        (3 * 86400, "3 d ago"),
    ],
)
def test_ago_says_it_as_a_person_would(seconds, said):
    assert status.ago(seconds) == said


def nodes() -> list[Node]:
    ok = run(report(Phase.BOOT, slot="a", version=2))
    broken = apply(
        Node(id="52-54-00-00-00-02", last_seen=10.0),
        report(Phase.ERROR, error="plan: master unreachable " + "x" * 100),
        received=10.0,
    )
    return [ok, broken]


def test_the_status_table_is_plain_when_piped_and_marks_stale_nodes():
    now = 1000.0 + 86400 * 2
    text = status.table(nodes(), now=1042.0, stale_after=86400)
    assert "\x1b[" not in text
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["NODE", "LABEL", "IP"]
    assert NODE in lines[1] and "a example v2 (good)" in lines[1] and " ok " in lines[1] and "42 s ago" in lines[1]
    assert "error" in lines[2] and "…" in lines[2] and "x" * 100 not in lines[2]
    assert lines[-1] == "2 nodes: 1 error, 1 ok"
    stale = status.table(nodes(), now=now, stale_after=86400)
    assert stale.splitlines()[-1] == "2 nodes: 2 stale"


def test_the_status_table_colours_states_only_when_asked():
    text = status.table(nodes(), now=1003.0, stale_after=86400, colour=True)
    assert "\x1b[32mok" in text and "\x1b[31merror" in text


FORGED = "verify: bad\r2026-01-01 all good \x1b[2J\x9b"  # CR, an ESC sequence and a C1 CSI
WRITTEN_OUT = "verify: bad\\x0d2026-01-01 all good \\x1b[2J\\x9b"


def test_the_status_table_writes_out_the_control_characters_of_a_stored_report():
    """A report stored before the master refused control characters must not drive the terminal."""
    node = apply(Node(id=NODE, last_seen=10.0), report(Phase.ERROR, error=FORGED), received=10.0)
    text = status.table([node], now=11.0, stale_after=86400)
    assert not set(text) & {"\x1b", "\r", "\x9b"}
    assert text.splitlines()[1].endswith(f"  error  just now   {WRITTEN_OUT}")


def test_status_of_one_node_writes_out_the_control_characters_of_its_history(tmp_path):
    inv = Inventory(tmp_path)  # as an older master stored it: ingest takes the report as it is
    inv.ingest(report(Phase.ERROR, error=FORGED, time=1700000000.0), received=1700000000.0, ip=None)
    out = io.StringIO()
    assert status.run(inv, 86400, out, node=NODE) == 0
    text = out.getvalue()
    assert not set(text) & {"\x1b", "\r", "\x9b"}
    assert f"last error       {WRITTEN_OUT}\n" in text and f"error   : {WRITTEN_OUT}\n" in text


def test_rollout_status_writes_out_the_control_characters_of_the_reasons_it_quotes():
    progress = rollout.Progress(
        id=1,
        image="example",
        version=2,
        state=rollout.HALTED,
        wave=0,
        waves=[[NODE]],
        nodes={NODE: {"wave": 0, "state": rollout.FAILED, "reason": FORGED}},
        max_failed=0,
        message=f"halted in wave 1: 1 failed (more than 0): {NODE}: {FORGED}; the other nodes keep theirs",
    )
    lines = progress.text().splitlines()
    assert lines[1] == f"  halted in wave 1: 1 failed (more than 0): {NODE}: {WRITTEN_OUT}; the other nodes keep theirs"
    assert lines[2] == f"  wave 1: {NODE} failed ({WRITTEN_OUT})"


def test_status_on_an_empty_rack_says_what_to_expect():
    assert "with its first report to the master" in status.table([], now=0, stale_after=60)


@pytest.mark.parametrize(
    "spec, count, waves",
    [
        ("1,25%,rest", 8, [1, 2, 5]),
        ("1,25%,rest", 1, [1]),
        ("1,25%,rest", 2, [1, 1]),
        ("2,50%", 10, [2, 5, 3]),  # nodes left after the last wave form one more
        ("10%,rest", 40, [4, 36]),
        ("1,1,1", 2, [1, 1]),  # empty waves are dropped
        ("100%", 3, [3]),
    ],
)
def test_waves_split_the_nodes_in_order(spec, count, waves):
    ids = [f"n{i:02d}" for i in range(count)]
    split = rollout.split(rollout.parse_waves(spec), ids)
    assert [len(w) for w in split] == waves
    assert [n for w in split for n in w] == ids


@pytest.mark.parametrize(
    "spec, problem",
    [("rest,1", "only be the last"), ("0", "not a number"), ("150%", "more than 100%"), ("1,,2", "not a number")],
)
def test_bad_waves_are_one_clear_line(spec, problem):
    with pytest.raises(RackbootError, match=problem):
        rollout.parse_waves(spec)


def rep(phase: str, version: int | None = None, error: str | None = None, signed: bool = True) -> dict:
    return {"phase": phase, "version": version, "error": error, "signed": signed}


def test_judge_confirmed_failed_or_still_waiting():
    assert rollout.judge([rep("download", 2), rep("commit", 2), rep("boot", 2)], 2) == (rollout.ASSIGNED, None)
    assert rollout.judge([rep("boot", 2), rep("confirm", 2), rep("boot", 2)], 2) == (rollout.CONFIRMED, None)
    never = [rep("boot", 2), rep("error", 2, "slot b (example v2) never confirmed itself"), rep("boot", 1, "x")]
    assert rollout.judge(never, 2) == (rollout.FAILED, "slot b (example v2) never confirmed itself")
    # a read-back retried and then written well is no failure
    retried = [rep("error", 2, "read-back differs"), rep("commit", 2), rep("boot", 2)]
    assert rollout.judge(retried, 2) == (rollout.ASSIGNED, None)
    refused = [rep("error", None, "download: manifest refused"), rep("boot", 1, "download: manifest refused")]
    assert rollout.judge(refused, 2) == (rollout.FAILED, "download: manifest refused")


def test_judge_counts_only_signed_reports():
    """A confirm or a fall back that did not verify against the node's pinned key moves
    nothing; the node's reason says why it still waits. A signed one then decides."""
    unsigned = [rep("boot", 2), rep("confirm", 2, signed=False)]
    state, reason = rollout.judge(unsigned, 2)
    assert state == rollout.ASSIGNED and reason is not None and "confirm report is unsigned" in reason
    fell_back = [rep("error", 2, "never confirmed", signed=False), rep("boot", 1, "never confirmed", signed=False)]
    assert rollout.judge(fell_back, 2)[0] == rollout.ASSIGNED
    assert rollout.judge([*unsigned, rep("confirm", 2)], 2) == (rollout.CONFIRMED, None)
    # an unsigned error names no reason for a signed fall back that follows
    assert rollout.judge([rep("error", 2, "forged", signed=False), rep("boot", 1, "real")], 2) == (
        rollout.FAILED,
        "real",
    )


def test_a_rollouts_text_and_json_show_skipped_nodes_with_why_and_a_stuck_rollout():
    progress = rollout.Progress(
        id=3,
        image="example",
        version=2,
        state=rollout.RUNNING,
        wave=1,
        waves=[["n1"], ["n2", "n3"]],
        nodes={
            "n1": {"wave": 0, "state": rollout.CONFIRMED, "reason": None},
            "n2": {"wave": 1, "state": rollout.SKIPPED, "reason": "stale when its wave started: last heard 3 d ago"},
            "n3": {"wave": 1, "state": rollout.WAITING, "reason": None},
        },
        max_failed=0,
        message=None,
        wave_timeout=900.0,
        stuck="cannot write plans/n3.json: Is a directory",
    )
    lines = progress.text().splitlines()
    assert lines[0] == (
        "rollout 3: example v2: stuck, wave 2 of 2, 1 of 3 nodes confirmed, 1 skipped "
        "(max failed per wave 0, wave timeout 900 s)"
    )
    assert lines[1].startswith("  stuck: cannot write plans/n3.json: Is a directory")
    assert lines[-1] == "  wave 2: n2 skipped (stale when its wave started: last heard 3 d ago); n3 waiting"
    doc = progress.to_dict()
    assert (doc["state"], doc["shown_state"], doc["skipped"], doc["wave_timeout"]) == ("running", "stuck", 1, 900.0)
    assert replace(progress, state=rollout.HALTED).shown_state == rollout.HALTED  # stuck is a running one's


@pytest.mark.parametrize(
    "header, ok",
    [
        ("Bearer 0123456789abcdef", True),
        ("bearer 0123456789abcdef", True),
        ("Bearer 0123456789abcdeX", False),
        ("Bearer 0123456789abcdef0", False),
        ("Basic 0123456789abcdef", False),
        ("", False),
        (None, False),
    ],
)
def test_the_token_check(header, ok):
    assert web.check_token(header, "0123456789abcdef") is ok


def test_no_token_set_lets_nothing_through():
    assert not web.check_token("Bearer ", "")


def test_manifest_paths_and_serials_are_read_only_as_they_can_be():
    assert parse_manifest_path("/images/example/12/manifest.json") == ("example", 12)
    assert parse_manifest_path("/images/../x/1/manifest.json") == (None, None)
    assert parse_manifest_path(None) == (None, None)
    assert clean_serial("10000000abcdef") == "10000000abcdef"
    assert clean_serial("\x1b[31m") is None and clean_serial("x" * 65) is None


def test_fleet_settings_are_checked_where_they_enter(tmp_path):
    cfg = config.parse(
        '[master]\nadopt = "manual"\ntoken = "0123456789abcdef"\n'
        '[power]\ndriver = "command"\ncommand = "relay {node} {action}"\n',
        tmp_path / "rackboot.toml",
    )
    assert cfg.master.adopt is config.AdoptMode.MANUAL and cfg.power.driver is config.PowerDriver.COMMAND
    for bad, where in [
        ('[master]\ntoken = "short"\n', "token"),
        ('[master]\nadopt = "always"\n', "adopt"),
        ('[power]\ncommand = "relay {action}"\n', "command"),
        ('[power]\ncommand = "relay {node} {host}"\n', "command"),
        ('[power]\nqmp = "run/{node}.qmp"\n', "qmp"),
        ("[power]\nstagger = -1\n", "stagger"),
    ]:
        with pytest.raises(ConfigError, match=where):
            config.parse(bad, tmp_path / "rackboot.toml")


def power_cfg(tmp_path, command: str, stagger: int = 3) -> config.Config:
    text = f'[power]\ndriver = "command"\ncommand = "{command}"\nstagger = {stagger}\n'
    return config.parse(text, tmp_path / "rackboot.toml")


def test_the_command_driver_runs_the_template_per_node_staggered_when_switching_on(tmp_path):
    log = tmp_path / "switched"
    cfg = power_cfg(tmp_path, f"echo {{node}} {{action}} >> {log}")
    slept: list[float] = []
    nodes = ["52-54-00-00-00-01", "52-54-00-00-00-02", "52-54-00-00-00-03"]
    outcomes = power.switch(cfg, nodes, "on", sleep=slept.append)
    assert all(o.ok for o in outcomes) and slept == [3, 3]
    assert log.read_text().splitlines() == [f"{n} on" for n in nodes]
    assert power.switch(cfg, nodes[:2], "off", sleep=slept.append)[1].ok and slept == [3, 3]  # off: no waiting


def test_a_failing_switch_is_one_line_naming_the_node_and_the_rest_are_still_switched(tmp_path):
    script = tmp_path / "relay.sh"
    script.write_text('[ "$1" != 52-54-00-00-00-01 ] || { echo relay 1 jammed >&2; exit 3; }\n')
    cfg = power_cfg(tmp_path, f"sh {script} {{node}} {{action}}", stagger=0)
    outcomes = power.switch(cfg, ["52-54-00-00-00-01", "52-54-00-00-00-02"], "cycle")
    assert [o.ok for o in outcomes] == [False, True]
    with pytest.raises(RackbootError, match=r"1 of 2 failed: 52-54-00-00-00-01: .* exited 3: relay 1 jammed$"):
        power.check(outcomes)


def test_power_without_a_driver_says_so(tmp_path):
    with pytest.raises(RackbootError, match=r"\[power\] driver is not set"):
        power.switch(config.parse("", tmp_path / "rackboot.toml"), ["52-54-00-00-00-01"], "on")
    with pytest.raises(RackbootError, match="expected one of on, off, cycle"):
        power.switch(power_cfg(tmp_path, "true {node}"), ["52-54-00-00-00-01"], "reboot")
