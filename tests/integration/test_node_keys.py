"""Node keys and signed reports against the real master (`rackboot serve` on loopback) and
the real updater on file-backed cards, keys made by openssl and signatures checked by serve
(in process; by openssl processes in the storm test, which bounds them): the
first key is pinned at adoption (auto) or shown and pinned by `rackboot adopt` (manual);
from then on unsigned reports and reports signed by any other key are refused, kept in the
history marked so and never counted, by the node's state or by rollouts; a node whose card
was replaced is re-adopted with `rackboot adopt --replace`."""

from __future__ import annotations

import base64
import json
import sqlite3
import subprocess
import threading
from pathlib import Path

import pytest
from rackboot import cli
from rackboot.initramfs.updater import formats, nodekey
from rackboot.initramfs.updater.disk import Disk
from rackboot.initramfs.updater.errors import UpdaterError
from rackboot.master import nodekeys, rollout
from rackboot.master.inventory import Inventory

from tests.integration.test_fleet import GOLDEN, NODES, Master, make_cfg, plan_version, rack, update
from tests.integration.updater_master import MAC, NODE, image_bytes, publish, write_plan

CARD = 256 << 20


@pytest.fixture
def master(tmp_path):
    m = Master(make_cfg(tmp_path))
    yield m
    m.stop()


def blank_card(path: Path) -> Path:
    with open(path, "wb") as f:
        f.truncate(CARD)
    return path


def card_key(card: Path, node: str = NODE) -> nodekey.NodeKey:
    with Disk(str(card), writable=False) as d:
        key = nodekey.read(d, node)
    assert key is not None, "the updater kept no key on the card"
    return key


def history(m: Master, node: str = NODE) -> list[dict]:
    return m.json(f"/api/nodes/{node}")["history"]


def post(m: Master, body: bytes, key: nodekey.NodeKey | None = None) -> tuple[int, dict]:
    """POST a report body as is, signed by ``key`` when given; (status, the JSON answer or {})."""
    headers = {nodekeys.SIGNATURE_HEADER: base64.b64encode(key.sign(body)).decode()} if key else {}
    status, answer = m.request("POST", "/report", body, headers)
    return status, json.loads(answer) if answer else {}


def forged(node: str, key: nodekey.NodeKey, **fields) -> bytes:
    """A report for ``node`` naming ``key`` (the body a forger signs)."""
    doc = {"node": node, "phase": "confirm", "bytes": 0, "seconds": 0.0, "error": None, "slot": "b", "version": 2}
    return formats.dump(doc | {"time": 1.8e9, "pubkey": key.public_b64} | fields)


def test_a_worker_signs_every_report_and_its_first_key_is_pinned(master, tmp_path, capsys):
    write_plan(master.root, publish(master.root, 1, image_bytes(21)), node="default")
    card = blank_card(tmp_path / "card.img")
    decision = update(master.url, card)
    assert (decision.slot, decision.action) == ("a", "installed")
    key = card_key(card)
    node = master.json(f"/api/nodes/{NODE}")
    assert node["pubkey"] == key.public_b64 and node["key_state"] == "pinned"
    assert node["key_fingerprint"] == f"ed25519 {key.fingerprint}"
    said = history(master)
    # its first contact (plan, before it asks for its plan) is signed already: that report adopts
    # the node and pins its key, so its first plan request is a known node's
    assert [h["phase"] for h in said] == ["plan", "layout", "download", "commit", "boot"]
    assert all(h["signed"] and h["refused"] is None and h["pubkey"] == key.public_b64 for h in said)
    assert cli.main(["status", "-c", str(master.cfg.path), "--node", MAC]) == 0
    assert f"key              ed25519 {key.fingerprint}" in capsys.readouterr().out
    # the node's next boot: still its key, still counted
    update(master.url, card)
    assert card_key(card) == key and history(master)[-1]["signed"] is True


def test_a_report_signed_by_another_key_is_refused_kept_as_refused_and_not_counted(master, tmp_path):
    write_plan(master.root, publish(master.root, 1, image_bytes(22)), node="default")
    card = blank_card(tmp_path / "card.img")
    update(master.url, card)
    before = master.json(f"/api/nodes/{NODE}")
    attacker = nodekey.generate(NODES[1])  # another node's key
    # presenting its own key: it holds that key, but the node's is another (a mismatch)
    status, answer = post(master, forged(NODE, attacker, phase="error", error="halt it"), attacker)
    assert status == 403 and answer["error"].startswith(f"report refused: key mismatch: {NODE} presents ")
    assert "\n" not in answer["error"]
    # presenting the node's own key, signed by the other: a forgery
    status, answer = post(
        master, forged(NODE, card_key(card), phase="error", error="halt it", time=1.8e9 + 1), attacker
    )
    assert status == 403 and answer["error"] == (
        f"report refused: signature does not verify with {NODE}'s pinned key "
        f"{nodekeys.fingerprint(card_key(card).public_b64)}"
    )
    after = master.json(f"/api/nodes/{NODE}")
    assert {k: after[k] for k in ("state", "last_error", "booted_version", "slots")} == {
        k: before[k] for k in ("state", "last_error", "booted_version", "slots")
    }
    refused = [h for h in history(master) if h["refused"]]
    assert [(h["phase"], h["error"], h["signed"]) for h in refused] == [("error", "halt it", False)] * 2
    assert not any("halt it" in line for line in (master.root / "reports" / f"{NODE}.jsonl").read_text().splitlines())
    # the other key is shown beside the pinned one, for an operator to judge, until the node's
    # own key signs again: then it was no new card of the node's
    assert (after["key_state"], after["shown_state"]) == ("mismatch", "key-mismatch")
    update(master.url, card)
    after = master.json(f"/api/nodes/{NODE}")
    assert (after["key_state"], after["pubkey_candidate"], after["shown_state"]) == ("pinned", None, "trial")


def test_old_unsigned_reports_are_taken_until_a_key_is_pinned_and_refused_after(master, tmp_path):
    """A fleet upgrading: every revision of report an older updater sends is taken for a node
    with no key pinned; once its new initramfs pinned one, no unsigned report counts."""
    samples = sorted(p.name for p in GOLDEN.glob("report.rev*.json") if "signed" not in p.name)
    assert len(samples) >= 7
    for name in samples:
        status, _ = post(master, (GOLDEN / name).read_bytes())
        assert status == 204, name
    write_plan(master.root, publish(master.root, 1, image_bytes(23)), node="default")
    update(master.url, blank_card(tmp_path / "card.img"))
    doc = json.loads((GOLDEN / "report.rev1.json").read_bytes()) | {"time": 1.8e9}
    status, answer = post(master, formats.dump(doc))
    assert status == 403 and answer["error"].startswith(f"report refused: unsigned report for {NODE}, whose key ")
    assert history(master)[-1]["refused"] is not None


def test_a_replaced_card_is_refused_until_the_node_is_adopted_again(master, tmp_path, capsys):
    write_plan(master.root, publish(master.root, 1, image_bytes(24)), node="default")
    old = blank_card(tmp_path / "old.img")
    update(master.url, old)
    new = blank_card(tmp_path / "new.img")  # the node's card died; a fresh one from the SD image
    decision = update(master.url, new)
    assert decision.action == "installed"  # it still boots; the master only stops counting its reports
    new_key = card_key(new)
    assert new_key.public != card_key(old).public
    node = master.json(f"/api/nodes/{NODE}")
    assert node["pubkey"] == card_key(old).public_b64 and node["pubkey_candidate"] == new_key.public_b64
    assert node["booted_slot"] == "a" and node["slots"]["a"]["state"] == "trial"  # from the old card's reports
    assert cli.main(["status", "-c", str(master.cfg.path)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(NODE))
    assert " key-mismatch " in row and row.endswith(f"key mismatch, re-adopt with rackboot adopt --replace {NODE}")
    assert cli.main(["adopt", "-c", str(master.cfg.path), "--replace", MAC]) == 0
    out = capsys.readouterr().out
    assert f"key ed25519 {card_key(old).fingerprint} unpinned; the next key it presents is pinned" in out
    assert f"(it presented ed25519 {new_key.fingerprint} last)" in out
    update(master.url, new)
    node = master.json(f"/api/nodes/{NODE}")
    assert (node["pubkey"], node["key_state"], node["shown_state"]) == (new_key.public_b64, "pinned", "trial")
    assert history(master)[-1]["signed"] is True and history(master)[-1]["refused"] is None


def test_manual_adoption_shows_the_fingerprint_of_the_key_the_node_presented(tmp_path, capsys):
    cfg = make_cfg(tmp_path, adopt="manual")
    m = Master(cfg)
    try:
        write_plan(m.root, publish(m.root, 1, image_bytes(25)), node="default")
        card = blank_card(tmp_path / "card.img")
        with pytest.raises(UpdaterError, match="no good slot"):  # no plan until it is adopted
            update(m.url, card)
        key = card_key(card)
        node = m.json(f"/api/nodes/{NODE}")
        assert (node["adopted"], node["pubkey"], node["key_state"]) == (False, None, "candidate")
        assert node["key_candidate_fingerprint"] == f"ed25519 {key.fingerprint}"
        assert not any(h["signed"] for h in node["history"])  # its own key, but not pinned: not authenticated
        assert cli.main(["adopt", "-c", str(cfg.path), MAC]) == 0
        assert capsys.readouterr().out == (
            f"{NODE} adopted: it gets the default plan from its next boot; key ed25519 {key.fingerprint} pinned\n"
        )
        update(m.url, card)
        node = m.json(f"/api/nodes/{NODE}")
        assert node["pubkey"] == key.public_b64 and node["history"][-1]["signed"] is True
        # its card replaced: the new key is shown, and pinned by --replace (no window for another)
        new = blank_card(tmp_path / "new.img")
        update(m.url, new)
        new_key = card_key(new)
        assert m.json(f"/api/nodes/{NODE}")["key_state"] == "mismatch"
        assert cli.main(["adopt", "-c", str(cfg.path), MAC]) == 0  # without --replace the old key stays
        assert f"rackboot adopt --replace {NODE} pins that one" in capsys.readouterr().out
        assert cli.main(["adopt", "-c", str(cfg.path), "--replace", MAC]) == 0
        out = capsys.readouterr().out
        assert f"key ed25519 {new_key.fingerprint} pinned in place of ed25519 {key.fingerprint}" in out
        assert m.json(f"/api/nodes/{NODE}")["pubkey"] == new_key.public_b64
    finally:
        m.stop()


def test_the_api_adopts_with_replace_too(master, tmp_path):
    key = nodekey.generate(NODE)
    assert post(master, forged(NODE, key, phase="boot", slot="a", version=1), key)[0] == 204
    headers = {"Authorization": "Bearer fleet-token-0123456789"}
    path = f"/api/nodes/{NODE}/adopt"
    status, body = master.request("POST", path, b'{"replace": "yes"}', headers)
    assert status == 400 and b"replace: expected true or false" in body
    status, body = master.request("POST", path, b'{"replace": true}', headers)
    assert status == 200 and json.loads(body)["key"].startswith(f"key ed25519 {key.fingerprint} unpinned")
    assert master.json(f"/api/nodes/{NODE}")["pubkey"] is None


def test_a_rollout_counts_no_forged_confirm(tmp_path):
    cfg = make_cfg(tmp_path)
    m = Master(cfg)
    try:
        rack(m)
        for node in NODES:  # each booted v1 and so pinned its key
            assert m.json(f"/api/nodes/{node}")["pubkey"] == m.keys[node].public_b64
        rollout.start(cfg, Inventory(m.root), image="example", version=2, waves="1,rest", max_failed=0)
        target, attacker = NODES[0], nodekey.generate(NODES[0])
        pinned = m.keys[target]
        attempts = [
            (forged(target, attacker), None),  # unsigned
            (forged(target, attacker), attacker),  # signed by a key of its own
            (forged(target, pinned), attacker),  # claiming the node's key
            (forged(target, pinned, phase="boot", slot="a", version=1, error="fell back"), attacker),  # a halt
        ]
        for body, key in attempts:
            status, answer = post(m, body, key)
            assert status == 403 and answer["error"].startswith("report refused: "), answer
        [running] = m.json("/api/rollouts")["rollouts"]
        assert (running["state"], running["wave"], running["nodes"][target]["state"]) == ("running", 0, "assigned")
        assert [plan_version(m, n) for n in NODES] == [2, None, None, None]
        # the node itself confirms: the wave moves on
        assert m.report(node=target, phase="confirm", slot="b", version=2, time=1.7e9 + 10) == 204
        assert [plan_version(m, n) for n in NODES] == [2, 2, 2, 2]
    finally:
        m.stop()


def test_a_rollout_waits_for_a_node_whose_confirm_is_unsigned_and_says_why(tmp_path):
    cfg = make_cfg(tmp_path)
    m = Master(cfg)
    try:
        rack(m, signed=False)  # an initramfs from before node keys: nothing pinned, nothing signed
        rollout.start(cfg, Inventory(m.root), image="example", version=2, waves="1,rest", max_failed=0)
        assert m.report(node=NODES[0], phase="confirm", slot="b", version=2, time=1.7e9) == 204  # taken
        [running] = m.json("/api/rollouts")["rollouts"]
        assert running["nodes"][NODES[0]]["state"] == "assigned"
        assert "confirm report is unsigned" in running["nodes"][NODES[0]]["reason"]
        assert m.json(f"/api/nodes/{NODES[0]}")["state"] == "ok"  # the node's own state takes it
    finally:
        m.stop()


def test_a_wave_timeout_names_the_confirm_that_did_not_count(tmp_path):
    cfg = make_cfg(tmp_path)
    m = Master(cfg)
    try:
        rack(m, signed=False)  # nothing pinned, nothing signed
        inv = Inventory(m.root)
        rollout.start(cfg, inv, image="example", version=2, waves="1,rest", max_failed=0, wave_timeout=600)
        assert m.report(node=NODES[0], phase="confirm", slot="b", version=2, time=1.7e9 + 1) == 204
        row = inv.db.execute("SELECT assigned_at FROM rollout_nodes WHERE node = ?", (NODES[0],)).fetchone()
        progress = rollout.advance(cfg, inv, now=row[0] + 600)
        assert progress is not None and progress.state == "halted"
        assert progress.nodes[NODES[0]]["reason"] == (
            "not confirmed within the wave timeout (600 s); its confirm report is unsigned (no key pinned for it): "
            "only signed reports count; its previous plan is back"
        )
        assert plan_version(m, NODES[0]) == 1  # it followed the default plan: v1 back, as a plan of its own
    finally:
        m.stop()


def test_a_refused_report_of_a_new_node_admits_nothing_and_spends_no_name(tmp_path):
    """A node enters the inventory with its first report taken, adopted and its key pinned
    (auto adoption): a report refused for its key or signature is kept in the history but
    admits no node, adopts none and spends no hostname index."""
    from rackboot.master import hostnames

    m = Master(make_cfg(tmp_path, hostname="worker-{index}"))
    try:
        key, other = nodekey.generate(NODE), nodekey.generate(NODE)
        boot = {"phase": "boot", "slot": "a", "version": 1}
        status, answer = post(m, forged(NODE, key, **boot))  # presents a key, unsigned
        assert status == 403 and "is not signed" in answer["error"]
        status, answer = post(m, forged(NODE, key, **boot, time=1.8e9 + 1), other)  # signed by another key
        assert status == 403 and "does not verify" in answer["error"]
        assert m.request("GET", f"/api/nodes/{NODE}")[0] == 404
        assert hostnames.read(m.root) == {} and not (m.root / "reports").exists()
        assert post(m, forged(NODE, key, **boot, time=1.8e9 + 2), key)[0] == 204  # its own: taken
        node = m.json(f"/api/nodes/{NODE}")
        assert (node["adopted"], node["state"], node["pubkey"]) == (True, "ok", key.public_b64)
        assert [(h["signed"], h["refused"] is not None) for h in node["history"]] == [
            (False, True),
            (False, True),
            (True, False),
        ]
        assert {n: e.hostname for n, e in hostnames.read(m.root).items()} == {NODE: "worker-1"}
    finally:
        m.stop()


def test_manual_adoption_admits_a_node_with_its_first_report_and_keeps_its_key_for_adopt(tmp_path, capsys):
    cfg = make_cfg(tmp_path, adopt="manual", hostname="worker-{index}")
    m = Master(cfg)
    try:
        key = nodekey.generate(NODE)
        assert post(m, forged(NODE, key, phase="boot", slot="a", version=1), key)[0] == 204
        node = m.json(f"/api/nodes/{NODE}")
        assert (node["adopted"], node["state"], node["pubkey"], node["key_state"]) == (
            False,
            "waiting",
            None,
            "candidate",
        )
        from rackboot.master import hostnames

        assert hostnames.read(m.root) == {}  # a name comes with adoption
        assert cli.main(["adopt", "-c", str(cfg.path), MAC]) == 0
        assert f"key ed25519 {key.fingerprint} pinned" in capsys.readouterr().out
        node = m.json(f"/api/nodes/{NODE}")
        assert (node["adopted"], node["pubkey"]) == (True, key.public_b64)
        assert {n: e.hostname for n, e in hostnames.read(m.root).items()} == {NODE: "worker-1"}
    finally:
        m.stop()


@pytest.mark.parametrize(
    "fields, problem",
    [
        ({"error": "fine\x1b[2J\rforged line"}, "control character"),
        ({"output": "\x1b]0;title\x07"}, "control character"),
    ],
)
def test_a_signed_report_with_control_characters_is_refused_like_any_other(master, fields, problem):
    key = nodekey.generate(NODE)
    status, answer = post(master, forged(NODE, key, phase="error", **fields), key)
    assert status == 400 and problem in answer["error"]
    assert master.request("GET", f"/api/nodes/{NODE}")[0] == 404  # nothing taken, nothing pinned


def test_a_signed_report_with_a_content_length_of_other_digits_is_refused(master):
    key = nodekey.generate(NODE)
    body = forged(NODE, key, phase="boot", slot="a", version=1)
    headers = {
        nodekeys.SIGNATURE_HEADER: base64.b64encode(key.sign(body)).decode(),
        "Content-Length": "\u00b2",
    }
    status, _ = master.request("POST", "/report", body, headers)
    assert status == 411
    assert master.request("GET", f"/api/nodes/{NODE}")[0] == 404


def test_a_storm_of_signed_reports_runs_no_more_openssl_at_once_than_allowed(master):
    workers, each = 16, 8
    keys = [nodekey.generate(f"52-54-00-00-02-{i:02x}") for i in range(workers)]
    bodies = [
        [forged(k.node, k, phase="download", slot="b", version=2, bytes=n, time=1.7e9 + n) for n in range(each)]
        for k in keys
    ]
    signed = [[(b, k.sign(b)) for b in bs] for k, bs in zip(keys, bodies, strict=True)]
    failures: list[int] = []
    master.server.fleet.inventory.verify = nodekeys.Verifier(openssl="openssl")  # (serve's checks in process)

    def worker(i: int) -> None:
        for body, signature in signed[i]:
            status, _ = master.request(
                "POST", "/report", body, {nodekeys.SIGNATURE_HEADER: base64.b64encode(signature).decode()}
            )
            if status != 204:
                failures.append(status)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    verify = master.server.fleet.inventory.verify
    assert isinstance(verify, nodekeys.Verifier)
    assert verify.runs == workers * each and 1 <= verify.peak <= nodekeys.MAX_PROCESSES
    rows = Inventory(master.root).db.execute("SELECT COUNT(*) FROM reports WHERE signed = 1").fetchone()[0]
    assert rows == workers * each


def test_without_openssl_signed_reports_get_503_and_the_master_goes_on(master):
    master.server.fleet.inventory.verify = nodekeys.Verifier(openssl="/nonexistent/openssl")
    key = nodekey.generate(NODE)
    status, answer = post(master, forged(NODE, key), key)
    assert status == 503 and answer["error"].startswith("report: cannot run /nonexistent/openssl")
    assert master.report(phase="boot", slot="a", version=1, time=1.7e9) == 204  # unsigned, nothing pinned
    assert [h["phase"] for h in history(master)] == ["boot"]


def test_a_key_replaced_while_a_report_is_checked_does_not_count_the_report(master):
    key = nodekey.generate(NODE)
    assert post(master, forged(NODE, key, phase="boot", slot="a", version=1), key)[0] == 204
    inventory = master.server.fleet.inventory
    real = inventory.verify

    def verify_while_re_adopted(pubkey: str, body: bytes, signature: bytes) -> bool:
        Inventory(master.root).adopt(NODE, replace_key=True)  # rackboot adopt --replace, meanwhile
        return real(pubkey, body, signature)

    inventory.verify = verify_while_re_adopted
    status, answer = post(master, forged(NODE, key, time=1.8e9 + 1), key)
    assert (
        status == 403
        and answer["error"] == f"report refused: {NODE}'s key changed while its report was checked; not counted"
    )


def test_a_damaged_key_record_is_reported_and_repaired(master, tmp_path):
    write_plan(master.root, publish(master.root, 1, image_bytes(26)), node="default")
    card = blank_card(tmp_path / "card.img")
    update(master.url, card)
    with Disk(str(card)) as d:
        d.write(nodekey.COPIES[0] + 40, b"\xde\xad")
    update(master.url, card)
    errors = [h["error"] for h in history(master) if h["phase"] == "error"]
    assert errors == ["node key: the copy at 3 MiB + 256 KiB is damaged, the one at 3 MiB + 320 KiB whole"]
    with Disk(str(card), writable=False) as d:
        copies = nodekey.read_copies(d)
    assert nodekey.decode(copies[0]) == nodekey.decode(copies[1]) == card_key(card)


def test_a_card_copied_into_another_board_makes_a_key_of_its_own(master, tmp_path):
    write_plan(master.root, publish(master.root, 1, image_bytes(27)), node="default")
    card = blank_card(tmp_path / "card.img")
    update(master.url, card)
    copy = tmp_path / "copy.img"
    subprocess.run(["cp", "--sparse=always", card, copy], check=True)
    other_mac = "52:54:00:12:34:57"
    update(master.url, copy, mac=other_mac)
    theirs = card_key(copy, "52-54-00-12-34-57")
    assert theirs.public != card_key(card).public and theirs.seq == 2
    node = master.json("/api/nodes/52-54-00-12-34-57")
    assert node["pubkey"] == theirs.public_b64 and all(h["signed"] for h in node["history"])


def test_an_inventory_from_before_node_keys_migrates_with_no_key_and_unsigned_reports(tmp_path):
    db = sqlite3.connect(tmp_path / ".inventory.db")
    db.executescript((GOLDEN / "inventory.schema1.sql").read_text())
    db.close()
    inv = Inventory(tmp_path)
    node = inv.node(NODE)
    assert node is not None and (node.pubkey, node.pubkey_candidate, node.key_state) == (None, None, "none")
    assert [(h["signed"], h["refused"], h["pubkey"]) for h in inv.history(NODE)] == [(False, None, None)] * 2
    later = formats.parse_report(json.dumps(json.loads((GOLDEN / "report.rev1.json").read_bytes()) | {"time": 1.8e9}))
    assert inv.ingest(later).outcome == "taken"  # its updater has no key yet: still counted
    key = nodekey.generate(NODE)
    body = formats.dump(formats.Report(node=NODE, phase=formats.Phase.BOOT, time=1.8e9 + 1, pubkey=key.public_b64))
    assert inv.ingest(formats.parse_report(body), body=body, signature=key.sign(body)).outcome == "taken"
    assert inv.node(NODE).pubkey == key.public_b64  # type: ignore[union-attr]


def test_a_new_inventory_takes_in_signed_report_lines_unsigned_and_pins_again_on_next_use(master, tmp_path):
    key = nodekey.generate(NODE)
    assert post(master, forged(NODE, key, phase="boot", slot="a", version=1), key)[0] == 204
    lines = (master.root / "reports" / f"{NODE}.jsonl").read_bytes()
    assert b'"pubkey"' in lines  # the stored line keeps the key it came with
    other = tmp_path / "rebuilt"
    (other / "reports").mkdir(parents=True)
    (other / "reports" / f"{NODE}.jsonl").write_bytes(lines)
    inv = Inventory(other)  # the database lost, made again from the files
    node = inv.node(NODE)
    assert node is not None and (node.booted_version, node.pubkey) == (1, None)
    assert [(h["signed"], h["refused"]) for h in inv.history(NODE)] == [(False, None)]
