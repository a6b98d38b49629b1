"""The inventory, the API, discovery and rollouts against the real master (`rackboot serve` on
loopback): concurrent reporters all counted, bad reports refused or ignored with a reason and
the master still up, schema migration, the token, manual adoption with the real updater, and
rollouts halting or moving on from the reports workers send."""

from __future__ import annotations

import base64
import json
import sqlite3
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
from rackboot import cli, config, demo
from rackboot.errors import RackbootError
from rackboot.initramfs.updater import formats, nodekey
from rackboot.initramfs.updater.errors import UpdaterError
from rackboot.initramfs.updater.fetch import MasterClient
from rackboot.initramfs.updater.formats import Phase, Report, parse_plan
from rackboot.initramfs.updater.main import Identity, run
from rackboot.initramfs.updater.signature import Verifier
from rackboot.master import inventory, nodekeys, plans, rollout, serve, signing
from rackboot.master.inventory import MIGRATIONS, SCHEMA, Inventory

from tests.helpers import write_config
from tests.integration.updater_master import MAC, NODE, image_bytes, publish, write_plan

TOKEN = "fleet-token-0123456789"
GOLDEN = Path(__file__).resolve().parents[1] / "data"


def make_cfg(tmp_path: Path, **master) -> config.Config:
    (tmp_path / "master").mkdir(exist_ok=True)
    return config.load(write_config(tmp_path, master={"token": TOKEN, **master}))


class Master:
    """`rackboot serve` on loopback. ``signing``: reports sent with report() are signed with
    each node's own key, as today's updater signs them (made with openssl, once per node)."""

    def __init__(self, cfg: config.Config, *, signing: bool = False, keys: dict[str, nodekey.NodeKey] | None = None):
        self.cfg = cfg
        self.signing = signing
        self.keys: dict[str, nodekey.NodeKey] = keys if keys is not None else {}  # (a restart: the nodes keep theirs)
        self.root = cfg.master.directory
        self.server = serve.make_server(self.root, quiet=True, config=cfg)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = self.server.url

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def key(self, node: str) -> nodekey.NodeKey:
        if node not in self.keys:
            self.keys[node] = nodekey.generate(node)
        return self.keys[node]

    def report(self, *, key: nodekey.NodeKey | None = None, **fields) -> int:
        """POST one report (signed with ``key``, else with the node's own when signing); its status."""
        doc = {"node": NODE, "phase": "boot", "bytes": 0, "seconds": 0.0, "error": None, "slot": None}
        doc |= {"version": None, "time": 0.0} | fields
        key = key or (self.key(doc["node"]) if self.signing else None)
        if key is None:
            return self.request("POST", "/report", json.dumps(doc).encode())[0]
        body = json.dumps(doc | {"pubkey": key.public_b64}).encode()
        signature = base64.b64encode(key.sign(body)).decode()
        return self.request("POST", "/report", body, {nodekeys.SIGNATURE_HEADER: signature})[0]

    def json(self, path: str):
        status, body = self.request("GET", path)
        assert status == 200, body
        return json.loads(body)


@pytest.fixture
def master(tmp_path):
    m = Master(make_cfg(tmp_path))
    yield m
    m.stop()


def test_many_workers_reporting_at_once_lose_no_report(master):
    workers, each = 24, 20
    failures: list[int] = []

    def worker(i: int) -> None:
        node = f"52-54-00-00-01-{i:02x}"
        for n in range(each):
            status = master.report(node=node, phase="download", bytes=n, time=1700000000.0 + n, slot="b", version=2)
            if status != 204:
                failures.append(status)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    inv = Inventory(master.root)
    assert inv.count_reports() == workers * each
    lines = sum(len(f.read_text().splitlines()) for f in (master.root / "reports").glob("*.jsonl"))
    assert lines == workers * each  # the plain files keep every one too
    nodes = master.json("/api/nodes")["nodes"]
    assert len(nodes) == workers and {n["install_bytes"] for n in nodes} == {each - 1}


def test_bad_reports_are_refused_or_ignored_and_the_master_goes_on(master):
    assert master.report(phase="download", slot="b", version=2, bytes=10, time=1700000010.0) == 204
    assert master.request("POST", "/report", b"{not json")[0] == 400
    assert master.request("POST", "/report", json.dumps({"node": NODE, "phase": "nap"}).encode())[0] == 400
    assert master.report(node="../../etc/passwd") == 400
    assert master.request("POST", "/report", b"x" * (serve.MAX_REPORT + 1))[0] == 413
    # the same report again: a replay, ignored
    assert master.report(phase="download", slot="b", version=2, bytes=10, time=1700000010.0) == 200
    assert master.report(phase="commit", slot="b", version=2, time=1700000020.0) == 204
    # older than the last one taken: kept in the history, the node's state unchanged
    assert master.report(phase="error", slot="b", version=2, error="late", time=1700000015.0) == 204
    node = master.json(f"/api/nodes/{NODE}")
    assert node["state"] == "trial" and node["last_error"] is None
    assert [(h["phase"], h["late"]) for h in node["history"]] == [
        ("download", False),
        ("commit", False),
        ("error", True),
    ]
    assert master.json("/stats")["total_bytes_sent"] >= 0  # still serving


def test_the_api_reads_without_a_token_and_acts_only_with_it(master):
    assert master.report(phase="boot", slot="a", version=1, time=1700000000.0) == 204
    assert master.json("/api/rollouts") == {"rollouts": []}
    assert master.request("GET", "/api/nodes/52-54-00-99-99-99")[0] == 404
    path = f"/api/nodes/{NODE}/adopt"
    assert master.request("POST", path, b"{}")[0] == 401
    assert master.request("POST", path, b"{}", {"Authorization": "Bearer wrong-token-0123456789"})[0] == 401
    assert master.request("POST", path, b"{}", {"Authorization": f"Basic {TOKEN}"})[0] == 401
    status, body = master.request("POST", path, b"{}", {"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and json.loads(body)["node"]["adopted"] is True
    status, body = master.request("POST", path, b"[1]", {"Authorization": f"Bearer {TOKEN}"})
    assert status == 400 and b"JSON object" in body
    assert master.request("POST", "/api/nodes/52-54-00-12-34-56/reboot", b"{}")[0] == 404


@pytest.mark.parametrize("action", ["assign", "adopt"])
def test_an_api_action_with_an_image_that_is_not_an_image_name_is_400_and_writes_nothing(master, action):
    publish(master.root, 1, image_bytes(1))  # example/1/../../example resolved to this version's manifest
    bad = json.dumps({"image": "example/1/../../example", "version": 1}).encode()
    status, body = master.request("POST", f"/api/nodes/{NODE}/{action}", bad, {"Authorization": f"Bearer {TOKEN}"})
    assert (status, json.loads(body)) == (
        400,
        {"error": "image 'example/1/../../example' is not an image name ([a-z0-9][a-z0-9._-]*, at most 64 characters)"},
    )
    assert not (master.root / "plans").exists() and not (master.root / "hostnames.json").exists()


def test_without_a_token_in_the_config_no_action_goes_through(tmp_path):
    (tmp_path / "master").mkdir()
    m = Master(config.load(write_config(tmp_path)))
    try:
        status, body = m.request("POST", f"/api/nodes/{NODE}/adopt", b"{}", {"Authorization": "Bearer x" * 3})
        assert status == 403 and b"[master] token" in body
    finally:
        m.stop()


def test_an_older_schema_is_migrated_on_open_keeping_what_it_holds(tmp_path):
    # the golden sample: schema 1 as its code wrote it, with a node, its slots and two reports
    db = sqlite3.connect(tmp_path / inventory.FILE)
    db.executescript((GOLDEN / "inventory.schema1.sql").read_text())
    db.close()
    said: list[str] = []
    inv = Inventory(tmp_path, log=said.append)
    assert inv.schema() == SCHEMA
    node = inv.node(NODE)
    assert node is not None
    assert (node.state, node.booted_slot, node.booted_version, node.serial) == ("ok", "b", 2, "10000000cafe")
    assert node.label == "" and node.slots["a"].version == 1 and node.slots["b"].state == "good"
    assert [h["phase"] for h in inv.history(NODE)] == ["boot", "confirm"]
    assert inv.db.execute("SELECT COUNT(*) FROM rollouts").fetchone()[0] == 0
    assert said == [f"inventory {inv.path}: migrated from schema {v} to {v + 1}" for v in range(1, SCHEMA)]
    # a report after the migration lands on the migrated node
    taken = inv.ingest(Report(node=NODE, phase=Phase.BOOT, slot="b", version=2, time=1700000400.0), received=1.7e9)
    assert taken.outcome == "taken" and len(inv.history(NODE)) == 3
    inv.close()
    assert Inventory(tmp_path).schema() == SCHEMA  # a second open changes nothing


def test_the_first_schema_step_makes_what_the_golden_sample_holds():
    db = sqlite3.connect(":memory:")
    db.executescript(MIGRATIONS[0])
    made = sorted(r[0] for r in db.execute("SELECT sql FROM sqlite_master WHERE sql IS NOT NULL"))
    golden = sqlite3.connect(":memory:")
    golden.executescript((GOLDEN / "inventory.schema1.sql").read_text())
    assert made == sorted(r[0] for r in golden.execute("SELECT sql FROM sqlite_master WHERE sql IS NOT NULL"))


def test_the_demo_ends_with_the_status_table(tmp_path):
    inv = Inventory(tmp_path)
    inv.ingest(Report(node=NODE, phase=Phase.BOOT, slot="a", version=1, time=1700000000.0))
    table = demo.fleet_table(tmp_path, 86400)
    assert table.startswith("rackboot status:\nNODE") and NODE in table and table.endswith("1 node: 1 ok")


def test_one_process_writers_queue_in_it_and_never_meet_sqlites_busy_handler(tmp_path, monkeypatch):
    """With no busy timeout at all, a second writer that reached SQLite's lock would fail at
    once ("database is locked"): every report of 8 threads at once is taken all the same."""
    monkeypatch.setattr(inventory, "BUSY_TIMEOUT", 0.0)
    inv = Inventory(tmp_path)
    failed: list[BaseException] = []

    def reporter(worker: int) -> None:
        node = f"52-54-00-00-05-{worker:02x}"
        try:
            for n in range(40):
                inv.ingest(Report(node=node, phase=Phase.DOWNLOAD, slot="b", version=2, bytes=n, time=1.7e9 + n))
        except BaseException as e:
            failed.append(e)

    threads = [threading.Thread(target=reporter, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failed == [] and inv.count_reports() == 8 * 40


def test_a_thread_done_with_the_inventory_hands_its_connection_to_the_next(tmp_path):
    inv = Inventory(tmp_path)
    seen: list[sqlite3.Connection] = []

    def one_request() -> None:  # as serve's thread for one HTTP connection
        inv.ingest(Report(node=NODE, phase=Phase.BOOT, slot="a", version=1, time=1.7e9 + len(seen)))
        seen.append(inv.db)
        inv.release()

    for _ in range(3):
        t = threading.Thread(target=one_request)
        t.start()
        t.join()
    assert seen[0] is seen[1] is seen[2] and inv.count_reports() == 3
    inv.db.execute("BEGIN")  # a thread that leaves a transaction open: its connection is not handed on
    open_one = inv.db
    inv.release()
    assert inv.db is not open_one and not inv.db.in_transaction


def test_a_newer_schema_is_refused_in_one_line(tmp_path):
    db = sqlite3.connect(tmp_path / inventory.FILE)
    db.execute(f"PRAGMA user_version = {SCHEMA + 1}")
    db.commit()
    db.close()
    with pytest.raises(RackbootError, match=f"schema version {SCHEMA + 1} is newer"):
        Inventory(tmp_path)


def test_a_new_inventory_takes_in_an_older_masters_report_files(tmp_path):
    reports = tmp_path / "reports"
    reports.mkdir()
    golden = (GOLDEN / "reports.rev1.jsonl").read_text()
    (reports / f"{NODE}.jsonl").write_text(golden + '{"node": "52-54-00-12-34-56", "phase": "dance"}\n')
    said: list[str] = []
    inv = Inventory(tmp_path, log=said.append)
    assert [h["phase"] for h in inv.history(NODE)] == ["boot", "hook", "confirm", "wait"]
    node = inv.node(NODE)
    assert node is not None and node.slots["b"].state == "good" and node.last_seen == 1700000401.0
    refused = [line for line in said if "not imported" in line]
    assert len(refused) == 1 and f"{NODE}.jsonl:5 not imported" in refused[0]


# --- discovery ----------------------------------------------------------------------------------


def update(server_url: str, card: Path, mac: str = MAC):
    client = MasterClient(server_url, read_timeout=5.0, retries=1, backoff=0.01)
    return run(str(card), server_url, Identity(mac), log=lambda m: None, master=client)


def test_manual_adoption_gives_a_new_node_no_plan_until_it_is_adopted(tmp_path, capsys):
    cfg = make_cfg(tmp_path, adopt="manual")
    m = Master(cfg)
    try:
        write_plan(m.root, publish(m.root, 1, image_bytes(3)), node="default")
        card = tmp_path / "card.img"
        with open(card, "wb") as f:
            f.truncate(256 << 20)
        with pytest.raises(UpdaterError, match="no good slot"):  # blank: /init retries it with backoff
            update(m.url, card)
        node = m.json(f"/api/nodes/{NODE}")
        assert (node["state"], node["adopted"], node["plan"]) == ("waiting", False, None)
        assert "404" in node["history"][-1]["error"]
        assert not (m.root / "plans" / f"{NODE}.json").exists()

        assert cli.main(["adopt", "-c", str(cfg.path), MAC]) == 0
        assert f"{NODE} adopted" in capsys.readouterr().out
        decision = update(m.url, card)
        assert (decision.slot, decision.action) == ("a", "installed")
        node = m.json(f"/api/nodes/{NODE}")
        assert (node["adopted"], node["plan"], node["image"], node["version"]) == (True, "default", "example", 1)
        assert node["state"] == "trial" and node["slots"]["a"] == {"image": "example", "state": "trial", "version": 1}

        # another node, not adopted, whose card holds a system: no plan, it boots what it has
        other = tmp_path / "other.img"
        subprocess.run(["cp", "--sparse=always", card, other], check=True)
        decision = update(m.url, other, mac="52:54:00:12:34:57")
        assert (decision.slot, decision.action, decision.version) == ("a", "offline", 1)
        node = m.json("/api/nodes/52-54-00-12-34-57")
        assert (node["state"], node["adopted"], node["booted_slot"]) == ("waiting", False, "a")
        assert not (m.root / "plans" / "52-54-00-12-34-57.json").exists()
    finally:
        m.stop()


def test_auto_adoption_gives_a_new_node_the_default_plan_and_records_it_with_its_first_report(master, tmp_path):
    write_plan(master.root, publish(master.root, 1, image_bytes(4)), node="default")
    status, _ = master.request("GET", f"/plans/{NODE}.json", headers={"X-Rackboot-Serial": "10000000cafe"})
    assert status == 200
    assert master.request("GET", f"/api/nodes/{NODE}")[0] == 404  # a plan request alone adopts nothing
    assert master.report(phase="layout", time=1700000000.0) == 204  # its first report: it booted our initramfs
    node = master.json(f"/api/nodes/{NODE}")
    assert (node["state"], node["adopted"], node["serial"], node["ip"]) == (
        "installing",
        True,
        "10000000cafe",  # what its plan request said, kept until then
        "127.0.0.1",
    )
    assert (node["plan"], node["image"], node["version"]) == ("default", "example", 1)
    assert master.request("GET", "/.inventory.db")[0] == 404  # the static side never hands it out


def test_status_cli_table_json_and_one_node(master, capsys):
    assert master.report(phase="boot", slot="a", version=1, time=1700000000.0) == 204
    assert master.report(node="52-54-00-00-00-07", phase="error", error="verify: bad", time=1700000000.0) == 204
    path = str(master.cfg.path)
    assert cli.main(["status", "-c", path]) == 0
    out = capsys.readouterr().out
    assert "\x1b[" not in out and out.splitlines()[-1] == "2 nodes: 1 error, 1 ok"
    assert cli.main(["status", "-c", path, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [n["id"] for n in doc] == ["52-54-00-00-00-07", NODE] and doc[0]["last_error"] == "verify: bad"
    assert cli.main(["status", "-c", path, "--node", MAC.upper()]) == 0
    out = capsys.readouterr().out
    assert "history (oldest first):" in out and "boot     slot a v1" in out
    assert cli.main(["status", "-c", path, "--node", "52:54:00:99:99:99"]) == 1
    assert "not in the inventory" in capsys.readouterr().err


# --- rollouts -----------------------------------------------------------------------------------

NODES = ["52-54-00-00-00-01", "52-54-00-00-00-02", "52-54-00-00-00-03", "52-54-00-00-00-04"]


def rack(m: Master, nodes: list[str] = NODES, *, signed: bool = True) -> None:
    """v1 and v2 published, the default plan on v1, and ``nodes`` booted on it: each asked
    for its plan and reported its boot (which adopts it and, ``signed``, pins the key it
    signs with)."""
    m.signing = signed
    publish(m.root, 1, image_bytes(5))
    publish(m.root, 2, image_bytes(6))
    write_plan(m.root, "/images/example/1/manifest.json", node="default")
    for node in nodes:
        assert m.request("GET", f"/plans/{node}.json")[0] == 200
        assert m.report(node=node, phase="boot", slot="a", version=1, time=1700000000.0) == 204


def ingest_signed(m: Master, inv: Inventory, report: Report, **kwargs) -> inventory.Ingested:
    """``report`` taken straight into ``inv``, signed by its node's key as the updater signs it."""
    key = m.key(report.node)
    body = formats.dump(replace(report, pubkey=key.public_b64))
    return inv.ingest(formats.parse_report(body), body=body, signature=key.sign(body), **kwargs)


def plan_version(m: Master, node: str) -> int | None:
    path = m.root / "plans" / f"{node}.json"
    return int(json.loads(path.read_text())["image"].split("/")[3]) if path.is_file() else None


def test_a_rollout_moves_on_wave_by_wave_as_nodes_confirm_and_survives_a_restart(tmp_path):
    cfg = make_cfg(tmp_path)
    m = Master(cfg)
    try:
        rack(m)
        progress = rollout.start(cfg, Inventory(m.root), image="example", version=2, waves="1,50%,rest", max_failed=0)
        assert progress.waves == [NODES[:1], NODES[1:3], NODES[3:]]
        assert [plan_version(m, n) for n in NODES] == [2, None, None, None]
        assert m.report(node=NODES[0], phase="commit", slot="b", version=2, time=1700000001.0) == 204
        assert plan_version(m, NODES[1]) is None  # committed is not confirmed
        assert m.report(node=NODES[0], phase="confirm", slot="b", version=2, time=1700000002.0) == 204
        assert [plan_version(m, n) for n in NODES] == [2, 2, 2, None]
    finally:
        m.stop()
    m = Master(cfg, signing=True, keys=m.keys)  # a restarted master carries on from the database
    try:
        for node in NODES[1:3]:
            assert m.report(node=node, phase="confirm", slot="b", version=2, time=1700000003.0) == 204
        assert plan_version(m, NODES[3]) == 2
        assert m.report(node=NODES[3], phase="confirm", slot="b", version=2, time=1700000004.0) == 204
        [done] = m.json("/api/rollouts")["rollouts"]
        assert (done["state"], done["confirmed"], done["failed"]) == ("done", 4, 0)
        assert plan_version(m, "default") == 2  # a node that turns up later gets it too
    finally:
        m.stop()


def test_a_rollout_halts_when_a_wave_fails_and_the_rest_keep_their_version(tmp_path, capsys):
    key = tmp_path / "master.key"
    signing.keygen(key)
    cfg = make_cfg(tmp_path, key=str(key))
    m = Master(cfg)
    try:
        rack(m)
        own = plans.assign(cfg, node=NODES[0], image="example", version=1)  # it had a plan of its own
        before = parse_plan(own.read_bytes())
        assert (
            cli.main(["rollout", "-c", str(cfg.path), "--image", "example", "--version", "2", "--waves", "2,rest"]) == 0
        )
        assert "wave 1 of 2" in capsys.readouterr().out
        assert plan_version(m, NODES[0]) == plan_version(m, NODES[1]) == 2
        rolled = {n: parse_plan((m.root / "plans" / f"{n}.json").read_bytes()).serial for n in NODES[:2]}
        assert rolled == {NODES[0]: 2, NODES[1]: 1}  # each node's own sequence
        with pytest.raises(RackbootError, match="still running"):
            rollout.start(cfg, Inventory(m.root), image="example", version=2, waves="rest", max_failed=0)
        never = "slot b (example v2) never confirmed itself; back to slot a"
        assert m.report(node=NODES[0], phase="boot", slot="b", version=2, time=1700000001.0) == 204
        assert m.report(node=NODES[0], phase="error", slot="b", version=2, error=never, time=1700000002.0) == 204
        assert m.report(node=NODES[0], phase="boot", slot="a", version=1, error=never, time=1700000003.0) == 204
        [halted] = m.json("/api/rollouts")["rollouts"]
        assert halted["state"] == "halted" and NODES[0] in halted["message"] and "never confirmed" in halted["message"]
        # its own plan back, written anew: a fresh serial (a worker refuses a lower one) and signature
        restored = own.read_bytes()
        assert parse_plan(restored) == replace(before, serial=3)
        Verifier(str(signing.public_key_path(key))).check(
            "plan", restored, own.with_name(own.name + ".sig").read_bytes()
        )
        # the node that followed the default plan gets its content as its own (a worker that took
        # a plan of its own refuses the default one), with its next serial
        followed = parse_plan((m.root / "plans" / f"{NODES[1]}.json").read_bytes())
        assert (followed.node, followed.image, followed.serial) == (NODES[1], "/images/example/1/manifest.json", 2)
        assert [plan_version(m, n) for n in NODES[2:]] == [None, None]
        assert plan_version(m, "default") == 1
        assert cli.main(["rollout", "-c", str(cfg.path), "--status"]) == 1
        assert "halted in wave 1" in capsys.readouterr().out
        assert 'data-state="halted"' in m.request("GET", "/")[1].decode()
    finally:
        m.stop()


def test_a_rollout_allows_k_failures_per_wave(tmp_path):
    cfg = make_cfg(tmp_path)
    m = Master(cfg)
    try:
        rack(m)
        rollout.start(cfg, Inventory(m.root), image="example", version=2, waves="2,rest", max_failed=1)
        assert m.report(node=NODES[0], phase="error", slot="b", version=2, error="verify: bad", time=1.0e9 + 1) == 204
        assert m.report(node=NODES[0], phase="boot", slot="a", version=1, error="verify: bad", time=1.0e9 + 2) == 204
        assert plan_version(m, NODES[2]) is None  # the wave is not through yet
        assert m.report(node=NODES[1], phase="confirm", slot="b", version=2, time=1.0e9 + 3) == 204
        assert [plan_version(m, n) for n in NODES[2:]] == [2, 2]
        [running] = m.json("/api/rollouts")["rollouts"]
        assert (running["state"], running["nodes"][NODES[0]]["state"]) == ("running", "failed")
    finally:
        m.stop()


def test_an_aborted_rollout_leaves_the_plans_as_they_are_and_moves_no_further(tmp_path, capsys):
    cfg = make_cfg(tmp_path)
    m = Master(cfg)
    try:
        rack(m)
        rollout.start(cfg, Inventory(m.root), image="example", version=2, waves="1,rest", max_failed=0)
        assert cli.main(["rollout", "-c", str(cfg.path), "--abort"]) == 0
        assert "aborted in wave 1" in capsys.readouterr().out
        assert m.report(node=NODES[0], phase="confirm", slot="b", version=2, time=1.0e9 + 1) == 204
        assert [plan_version(m, n) for n in NODES] == [2, None, None, None]
        assert cli.main(["rollout", "-c", str(cfg.path), "--abort"]) == 1
        assert "no rollout is running" in capsys.readouterr().err
    finally:
        m.stop()


def test_a_hostname_pattern_names_nodes_that_follow_the_default_plan_once_they_reported(tmp_path):
    """With [master] hostname set, an adopted node without a plan of its own gets the default
    plan under its own name, signed by the master: the names come from the pattern in order
    of first report (adoption), stay with their node, and the .sig fetched next verifies. A
    node that has not reported yet gets the default plan as it is and spends no index."""
    from rackboot.initramfs.updater.formats import Plan, parse_plan
    from rackboot.initramfs.updater.signature import Verifier
    from rackboot.master import hostnames, plans, signing

    key = tmp_path / "master.key"
    signing.keygen(key)
    cfg = make_cfg(tmp_path, hostname="worker-{index:02d}", key=str(key))
    publish(cfg.master.directory, 1, b"v1" * 4096)
    plans.assign(cfg, node="default", image="example", version=1)
    a, b = "52-54-00-00-00-0a", "52-54-00-00-00-0b"
    m = Master(cfg)

    def fetch(mac: str) -> Plan:
        status, data = m.request("GET", f"/plans/{mac}.json")
        assert status == 200, data
        sig_status, sig = m.request("GET", f"/plans/{mac}.json.sig")
        assert sig_status == 200, sig
        Verifier(str(signing.public_key_path(key))).check(f"/plans/{mac}.json", data, sig)  # raises if not
        return parse_plan(data)

    try:
        unnamed = fetch(b)
        assert (unnamed.node, unnamed.hostname) == ("default", None)
        assert hostnames.read(m.root) == {}  # no index spent on a plan request
        for mac in (b, a):  # their first reports adopt them, in this order
            assert m.report(node=mac, phase="layout", time=1700000000.0) == 204
        got = {}
        for mac in (b, a, b):
            plan = fetch(mac)
            assert plan.node == mac and got.setdefault(mac, plan.hostname) == plan.hostname
            assert plan.default and plan.serial == 1  # the default plan still: its serial is the default's
        assert got == {b: "worker-01", a: "worker-02"}
        default = parse_plan((cfg.master.directory / "plans" / "default.json").read_bytes())
        assert default.hostname is None and default.node == "default"  # the file itself is unchanged
    finally:
        m.stop()


# --- what a stray client, a name given by hand or a silent node cannot do -----------------------


def test_a_name_given_by_hand_neither_stops_new_nodes_nor_a_rollout_nor_a_restarted_serve(tmp_path, capsys):
    """A replacement board named by hand with a name the pattern reaches later, then five new
    nodes and a rollout, serve restarted in between: every node is named, the rollout moves."""
    from rackboot.master import hostnames

    cfg = make_cfg(tmp_path, hostname="worker-{index}")
    path = str(cfg.path)
    hand, new = "52-54-00-00-00-01", [f"52-54-00-00-00-1{i}" for i in range(5)]
    m = Master(cfg)
    try:
        rack(m, nodes=[])
        assert (
            cli.main(
                ["plan", "-c", path, "--node", hand, "--image", "example", "--version", "1"]
                + ["--hostname", "worker-3"]
            )
            == 0
        )
        rack(m, nodes=[hand, *new])
        names = {n: e.hostname for n, e in hostnames.read(m.root).items()}
        assert names == {hand: "worker-3"} | dict(
            zip(new, ["worker-2", "worker-4", "worker-5", "worker-6", "worker-7"], strict=True)
        )
        assert (
            cli.main(["plan", "-c", path, "--node", new[1], "--image", "example", "--version", "1"]) == 0
        )  # no --hostname
        capsys.readouterr()
        assert cli.main(["rollout", "-c", path, "--image", "example", "--version", "2", "--waves", "1,rest"]) == 0
        assert m.report(node=hand, phase="confirm", slot="b", version=2, time=1700000001.0) == 204
    finally:
        m.stop()
    m = Master(cfg, signing=True, keys=m.keys)  # serve starts again, and the rollout goes on from where it was
    try:
        [running] = m.json("/api/rollouts")["rollouts"]
        assert (running["shown_state"], running["wave"], running["stuck"]) == ("running", 1, None)
        assert all(plan_version(m, n) == 2 for n in new)
        for node in new:
            assert m.report(node=node, phase="confirm", slot="b", version=2, time=1700000002.0) == 204
        [done] = m.json("/api/rollouts")["rollouts"]
        assert (done["state"], done["confirmed"]) == ("done", 6)
        assert [parse_hostname(m, n) for n in new] == ["worker-2", "worker-4", "worker-5", "worker-6", "worker-7"]
    finally:
        m.stop()


def parse_hostname(m: Master, node: str) -> str | None:
    return json.loads((m.root / "plans" / f"{node}.json").read_text()).get("hostname")


def test_a_rollout_that_cannot_move_on_is_shown_stuck_and_serve_still_starts(tmp_path, capsys):
    cfg = make_cfg(tmp_path)
    m = Master(cfg)
    try:
        rack(m)
        rollout.start(cfg, Inventory(m.root), image="example", version=2, waves="1,rest", max_failed=0)
        (m.root / "plans" / f"{NODES[2]}.json").mkdir()  # wave 2 cannot have this node's plan written
        assert m.report(node=NODES[0], phase="confirm", slot="b", version=2, time=1700000001.0) == 204
    finally:
        m.stop()
    said = serve_starts(cfg)  # `rackboot serve` starts with it, and says why it is stuck
    assert f"rollout 1: stuck in wave 1: cannot write {m.root / 'plans' / NODES[2]}.json" in said
    m = Master(cfg)
    try:
        [stuck] = m.json("/api/rollouts")["rollouts"]
        assert (stuck["state"], stuck["shown_state"], stuck["wave"]) == ("running", "stuck", 0)
        assert f"cannot write {m.root / 'plans' / NODES[2]}.json" in stuck["stuck"]
        assert [plan_version(m, n) for n in NODES] == [2, None, None, None]  # wave 2 not half started
        assert 'data-state="stuck"' in m.request("GET", "/")[1].decode()
        assert cli.main(["rollout", "-c", str(cfg.path), "--status"]) == 1
        out = capsys.readouterr().out
        assert "stuck, wave 1 of 2" in out and f"stuck: cannot write {m.root / 'plans' / NODES[2]}.json" in out
        row = sqlite3.connect(m.root / inventory.FILE).execute("SELECT state, stuck FROM rollouts").fetchone()
        assert row[0] == "running" and "cannot write" in row[1]
        (m.root / "plans" / f"{NODES[2]}.json").rmdir()  # put right: the next advance moves on
        assert cli.main(["rollout", "-c", str(cfg.path), "--status"]) == 0
        assert [plan_version(m, n) for n in NODES] == [2, 2, 2, 2]
        [moving] = m.json("/api/rollouts")["rollouts"]
        assert (moving["shown_state"], moving["wave"], moving["stuck"]) == ("running", 1, None)
    finally:
        m.stop()


def serve_starts(cfg: config.Config) -> str:
    """Run `rackboot serve` until it is serving; what it said on the way (it must get there)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "rackboot", "serve", "-c", str(cfg.path), "--port", "0"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines = []
        while not (lines and lines[-1].startswith("serving ")):
            line = proc.stderr.readline() if proc.stderr else ""
            assert line, f"serve ended before serving (exit {proc.wait(timeout=30)}): {''.join(lines)}"
            lines.append(line)
        return "".join(lines)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if proc.stderr:
            proc.stderr.close()


def test_a_wave_that_fails_halfway_leaves_its_plan_files_and_rows_as_they_were(tmp_path):
    """A wave's plan files and its rows change together or not at all: a plan that cannot be
    made (a name held by another node) writes no file; a file that cannot be written puts
    back those written before it."""
    from rackboot.master import hostnames

    m = Master(make_cfg(tmp_path))
    try:
        rack(m, nodes=NODES[:3])
    finally:
        m.stop()
    own = m.root / "plans" / f"{NODES[0]}.json"
    own.write_text((m.root / "plans" / "default.json").read_text())  # a plan of its own, to be kept
    before = own.read_bytes()
    cfg = make_cfg(tmp_path, hostname="pi-{mac}")
    # the second node's name is another's: its plan cannot be made
    hostnames.assign(m.root, "52-54-00-00-00-99", hostname="pi-525400000002", pattern="")
    with pytest.raises(RackbootError, match="'pi-525400000002' is node 52-54-00-00-00-99's already"):
        rollout.start(cfg, Inventory(m.root), image="example", version=2, waves="rest", max_failed=0)
    assert own.read_bytes() == before and [plan_version(m, n) for n in NODES[1:3]] == [None, None]
    assert Inventory(m.root).db.execute("SELECT COUNT(*) FROM rollouts").fetchone()[0] == 0
    # the second node's plan cannot be written: the first one's file is put back
    hostnames.forget(m.root, "52-54-00-00-00-99")
    (m.root / "plans" / f"{NODES[1]}.json").mkdir()
    with pytest.raises(RackbootError, match=f"cannot write .*{NODES[1]}.json"):
        rollout.start(cfg, Inventory(m.root), image="example", version=2, waves="rest", max_failed=0)
    assert own.read_bytes() == before and plan_version(m, NODES[2]) is None
    inv = Inventory(m.root)
    assert inv.db.execute("SELECT COUNT(*) FROM rollouts").fetchone()[0] == 0
    assert inv.db.execute("SELECT COUNT(*) FROM rollout_nodes").fetchone()[0] == 0
    # and in a later wave, as a report moves the rollout on: its rows stay waiting, with nothing saved
    (m.root / "plans" / f"{NODES[1]}.json").rmdir()
    rollout.start(cfg, inv, image="example", version=2, waves="1,rest", max_failed=0)
    (m.root / "plans" / f"{NODES[2]}.json").mkdir()
    ingest_signed(m, inv, Report(node=NODES[0], phase=Phase.CONFIRM, slot="b", version=2, time=1700000001.0))
    progress = rollout.advance(cfg, inv)
    assert progress is not None and progress.shown_state == "stuck" and progress.wave == 0
    assert plan_version(m, NODES[1]) is None
    rows = inv.db.execute("SELECT state, assigned_at, previous_plan FROM rollout_nodes WHERE wave = 1").fetchall()
    assert [tuple(r) for r in rows] == [("waiting", None, None), ("waiting", None, None)]


def test_head_requests_and_plan_requests_of_made_up_nodes_adopt_nothing(tmp_path):
    from rackboot.master import hostnames

    cfg = make_cfg(tmp_path, hostname="worker-{index}")
    m = Master(cfg)
    try:
        rack(m, nodes=[])
        assert m.report(node=NODES[0], phase="boot", slot="a", version=1, time=1700000000.0) == 204
        inv = Inventory(m.root)
        before = inv.nodes()
        registry = hostnames.read(m.root)
        for i in range(200):
            assert m.request("HEAD", f"/plans/52-54-00-aa-{i // 256:02x}-{i % 256:02x}.json")[0] == 200
        assert m.request("HEAD", f"/plans/{NODES[0]}.json")[0] == 200  # a known node's HEAD changes nothing either
        assert inv.nodes() == before
        for i in range(50):  # a GET of a made-up node gets the default plan and adopts nothing
            status, body = m.request("GET", f"/plans/52-54-00-bb-00-{i:02x}.json")
            assert status == 200 and json.loads(body).get("hostname") is None  # unnamed: no index
        assert inv.nodes() == before
        assert hostnames.read(m.root) == registry  # no index spent
        progress = rollout.start(cfg, Inventory(m.root), image="example", version=2, waves="rest", max_failed=0)
        assert progress.waves == [[NODES[0]]]  # no ghost in it
    finally:
        m.stop()


def test_manual_adoption_shows_a_node_waiting_once_it_reported(tmp_path):
    m = Master(make_cfg(tmp_path, adopt="manual"))
    try:
        rack(m, nodes=[])
        assert m.request("GET", f"/plans/{NODE}.json")[0] == 404
        assert m.request("GET", f"/api/nodes/{NODE}")[0] == 404  # a plan request is not a node
        assert m.report(phase="error", error="plan: HTTP 404", time=1700000000.0) == 204
        node = m.json(f"/api/nodes/{NODE}")
        assert (node["state"], node["adopted"]) == ("waiting", False)
    finally:
        m.stop()


def test_a_node_that_never_confirms_fails_at_the_wave_timeout_and_gets_its_previous_plan_back(tmp_path, capsys):
    cfg = make_cfg(tmp_path)
    m = Master(cfg)
    try:
        rack(m, nodes=NODES[:3])
        own = m.root / "plans" / f"{NODES[1]}.json"
        own.write_text((m.root / "plans" / "default.json").read_text())
        before = own.read_bytes()
        inv = Inventory(m.root)
        assert (
            cli.main(
                ["rollout", "-c", str(cfg.path), "--image", "example", "--version", "2", "--waves", "2,rest"]
                + ["--max-failed", "1", "--wave-timeout", "600"]
            )
            == 0
        )
        assigned_at = inv.db.execute("SELECT assigned_at FROM rollout_nodes WHERE node = ?", (NODES[0],)).fetchone()[0]
        assert m.report(node=NODES[0], phase="confirm", slot="b", version=2, time=1700000001.0) == 204
        progress = rollout.advance(cfg, inv, now=assigned_at + 599)
        assert progress is not None and progress.nodes[NODES[1]]["state"] == "assigned"  # not yet
        progress = rollout.advance(cfg, inv, now=assigned_at + 600)  # NODES[1] never booted: its wave ends
        assert progress is not None and progress.wave == 1 and progress.state == "running"
        assert progress.nodes[NODES[1]] == {
            "wave": 0,
            "state": "failed",
            "reason": "not confirmed within the wave timeout (600 s); its previous plan is back",
        }
        restored, old = parse_plan(own.read_bytes()), parse_plan(before)
        assert restored.image == old.image and plan_version(m, NODES[2]) == 2  # v1's plan again, anew:
        assert restored.serial is not None and restored.serial > (old.serial or 0)  # no worker takes it as a replay
        assert "wave timeout 600 s" in progress.text()
    finally:
        m.stop()


def test_serve_ends_a_silent_wave_at_its_timeout_by_itself(tmp_path):
    cfg = make_cfg(tmp_path)
    m = Master(cfg)
    m.stop()
    m.server = serve.make_server(m.root, quiet=True, config=cfg, tick=0.05)  # looks often, for the test
    m.thread = threading.Thread(target=m.server.serve_forever, daemon=True)
    m.thread.start()
    m.url = m.server.url
    try:
        rack(m, nodes=NODES[:2])
        rollout.start(cfg, Inventory(m.root), image="example", version=2, waves="rest", max_failed=0, wave_timeout=0.5)
        assert m.report(node=NODES[0], phase="confirm", slot="b", version=2, time=1700000001.0) == 204
        for _ in range(600):  # no report comes: only the tick can end it
            [ro] = m.json("/api/rollouts")["rollouts"]
            if ro["state"] != "running":
                break
            threading.Event().wait(0.05)
        assert ro["state"] == "halted" and "wave timeout" in ro["message"]
        # it followed the default plan (v1): it gets that back as its own, since a worker that
        # took a plan of its own refuses the default one
        assert ro["nodes"][NODES[1]]["state"] == "failed" and plan_version(m, NODES[1]) == 1
        assert plan_version(m, NODES[0]) == 2  # confirmed: it keeps it
    finally:
        m.stop()


def test_stale_nodes_are_left_out_of_a_wave_and_listed_as_skipped(tmp_path):
    cfg = make_cfg(tmp_path)
    m = Master(cfg)
    try:
        rack(m, nodes=NODES[:3])
    finally:
        m.stop()
    inv = Inventory(m.root)
    now = inv.node(NODES[2]).last_seen + 2 * 86400  # two days on: every node is stale ([master] stale: a day) ...
    for node in NODES[:2]:  # ... but two that booted again just now
        ingest_signed(m, inv, Report(node=node, phase=Phase.BOOT, slot="a", version=1, time=1700000100.0), received=now)
    progress = rollout.start(cfg, inv, image="example", version=2, waves="1,rest", max_failed=0, now=now)
    ingest_signed(
        m, inv, Report(node=NODES[0], phase=Phase.CONFIRM, slot="b", version=2, time=1700000101.0), received=now
    )
    progress = rollout.advance(cfg, inv, now=now)
    assert progress is not None and progress.nodes[NODES[2]]["state"] == "skipped"
    assert progress.nodes[NODES[2]]["reason"] == "stale when its wave started: last heard from 2 d ago ([master] stale)"
    assert plan_version(m, NODES[2]) is None  # no plan for it
    assert progress.to_dict()["skipped"] == 1 and f"{NODES[2]} skipped (stale when its wave started" in progress.text()
    ingest_signed(
        m, inv, Report(node=NODES[1], phase=Phase.CONFIRM, slot="b", version=2, time=1700000102.0), received=now
    )
    progress = rollout.advance(cfg, inv, now=now)  # the wave does not wait for it
    assert progress is not None and progress.state == "done" and progress.message is not None
    assert "1 skipped" in progress.message and "2 of 3 nodes confirmed, 1 skipped" in progress.text()


def test_forget_removes_a_node_its_plan_and_its_name_and_a_wave_stops_waiting_for_it(tmp_path, capsys):
    from rackboot.master import hostnames

    cfg = make_cfg(tmp_path, hostname="worker-{index}")
    path = str(cfg.path)
    m = Master(cfg)
    try:
        rack(m, nodes=NODES[:3])
        assert cli.main(["rollout", "-c", path, "--image", "example", "--version", "2", "--waves", "2,rest"]) == 0
        gone = NODES[1]  # in wave 1, it never boots again
        assert plan_version(m, gone) == 2 and hostnames.read(m.root)[gone].hostname == "worker-2"
        assert m.report(node=NODES[0], phase="confirm", slot="b", version=2, time=1700000001.0) == 204
        capsys.readouterr()
        assert cli.main(["forget", "-c", path, gone.replace("-", ":")]) == 0
        said = capsys.readouterr().out.splitlines()  # (the rollout's log line, then what was removed)
        assert said[-1].startswith(f"{gone} forgotten: its inventory rows, its plan, its name worker-2 (free again;")
        assert m.request("GET", f"/api/nodes/{gone}")[0] == 404
        assert not (m.root / "plans" / f"{gone}.json").exists() and gone not in hostnames.read(m.root)
        [ro] = m.json("/api/rollouts")["rollouts"]
        assert ro["nodes"][gone] == {"wave": 0, "state": "skipped", "reason": "forgotten (rackboot forget)"}
        assert ro["wave"] == 1 and plan_version(m, NODES[2]) == 2  # wave 1 is through without it
        assert cli.main(["forget", "-c", path, gone]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"rackboot: error: node {gone} is unknown to ") and len(err.splitlines()) == 1
        # over the API, with the token
        action = f"/api/nodes/{NODES[2]}/forget"
        assert m.request("POST", action, b"{}")[0] == 401
        status, body = m.request("POST", action, b"{}", {"Authorization": f"Bearer {TOKEN}"})
        assert status == 200 and json.loads(body)["name"] == {"index": 3, "hostname": "worker-3"}
        status, body = m.request("POST", action, b"{}", {"Authorization": f"Bearer {TOKEN}"})
        assert status == 400 and b"is unknown to" in body
        # back again, a node is new: a new index, never a reused one
        assert m.report(node=gone, phase="boot", slot="a", version=1, time=1700000003.0) == 204
        assert hostnames.read(m.root)[gone] == hostnames.Entry(4, "worker-4")
    finally:
        m.stop()
