"""The inventory, the API, discovery and rollouts against the real master (`rackboot serve` on
loopback): concurrent reporters all counted, bad reports refused or ignored with a reason and
the master still up, schema migration, the token, manual adoption with the real updater, and
rollouts halting or moving on from the reports workers send."""

from __future__ import annotations

import base64
import json
import sqlite3
import subprocess
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from rackboot import cli, config, demo
from rackboot.errors import RackbootError
from rackboot.initramfs.updater import nodekey
from rackboot.initramfs.updater.errors import UpdaterError
from rackboot.initramfs.updater.fetch import MasterClient
from rackboot.initramfs.updater.formats import Phase, Report
from rackboot.initramfs.updater.main import Identity, run
from rackboot.master import inventory, nodekeys, rollout, serve
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

    def __init__(self, cfg: config.Config, *, signing: bool = False):
        self.cfg = cfg
        self.signing = signing
        self.keys: dict[str, nodekey.NodeKey] = {}
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
    assert len(said) == 1 and f"{NODE}.jsonl:5 not imported" in said[0]


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


def test_auto_adoption_records_a_new_node_and_gives_it_the_default_plan(master, tmp_path):
    write_plan(master.root, publish(master.root, 1, image_bytes(4)), node="default")
    status, _ = master.request("GET", f"/plans/{NODE}.json", headers={"X-Rackboot-Serial": "10000000cafe"})
    assert status == 200
    node = master.json(f"/api/nodes/{NODE}")
    assert (node["state"], node["adopted"], node["serial"], node["ip"]) == ("new", True, "10000000cafe", "127.0.0.1")
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


def rack(m: Master) -> None:
    """Four nodes that asked for the default plan (v1) and sign their reports."""
    m.signing = True
    publish(m.root, 1, image_bytes(5))
    publish(m.root, 2, image_bytes(6))
    write_plan(m.root, "/images/example/1/manifest.json", node="default")
    for node in NODES:
        assert m.request("GET", f"/plans/{node}.json")[0] == 200


def plan_version(m: Master, node: str) -> int | None:
    path = m.root / "plans" / f"{node}.json"
    return int(json.loads(path.read_text())["image"].split("/")[3]) if path.exists() else None


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
    keys = m.keys
    m = Master(cfg, signing=True)  # a restarted master carries on from the database
    m.keys = keys  # (the nodes keep theirs)
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
    cfg = make_cfg(tmp_path)
    m = Master(cfg)
    try:
        rack(m)
        own = m.root / "plans" / f"{NODES[0]}.json"
        own.write_text((m.root / "plans" / "default.json").read_text())  # it had a plan of its own
        before = own.read_bytes()
        assert (
            cli.main(["rollout", "-c", str(cfg.path), "--image", "example", "--version", "2", "--waves", "1,rest"]) == 0
        )
        assert "wave 1 of 2" in capsys.readouterr().out
        assert plan_version(m, NODES[0]) == 2
        with pytest.raises(RackbootError, match="still running"):
            rollout.start(cfg, Inventory(m.root), image="example", version=2, waves="rest", max_failed=0)
        never = "slot b (example v2) never confirmed itself; back to slot a"
        assert m.report(node=NODES[0], phase="boot", slot="b", version=2, time=1700000001.0) == 204
        assert m.report(node=NODES[0], phase="error", slot="b", version=2, error=never, time=1700000002.0) == 204
        assert m.report(node=NODES[0], phase="boot", slot="a", version=1, error=never, time=1700000003.0) == 204
        [halted] = m.json("/api/rollouts")["rollouts"]
        assert halted["state"] == "halted" and NODES[0] in halted["message"] and "never confirmed" in halted["message"]
        assert own.read_bytes() == before  # its own plan back
        assert [plan_version(m, n) for n in NODES[1:]] == [None, None, None]
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


def test_a_hostname_pattern_names_nodes_that_follow_the_default_plan(tmp_path):
    """With [master] hostname set, a node without a plan of its own gets the default plan
    under its own name, signed by the master: the names come from the pattern in order of
    first request, stay with their node, and the .sig fetched next verifies."""
    from rackboot.initramfs.updater.formats import parse_plan
    from rackboot.initramfs.updater.signature import Verifier
    from rackboot.master import plans, signing

    key = tmp_path / "master.key"
    signing.keygen(key)
    cfg = make_cfg(tmp_path, hostname="worker-{index:02d}", key=str(key))
    publish(cfg.master.directory, 1, b"v1" * 4096)
    plans.assign(cfg, node="default", image="example", version=1)
    m = Master(cfg)
    try:
        got = {}
        for mac in ("52-54-00-00-00-0b", "52-54-00-00-00-0a", "52-54-00-00-00-0b"):
            status, data = m.request("GET", f"/plans/{mac}.json")
            assert status == 200, data
            sig_status, sig = m.request("GET", f"/plans/{mac}.json.sig")
            assert sig_status == 200, sig
            Verifier(str(signing.public_key_path(key))).check(f"/plans/{mac}.json", data, sig)  # raises if not
            plan = parse_plan(data)
            assert plan.node == mac and got.setdefault(mac, plan.hostname) == plan.hostname
        assert got == {"52-54-00-00-00-0b": "worker-01", "52-54-00-00-00-0a": "worker-02"}
        default = parse_plan((cfg.master.directory / "plans" / "default.json").read_bytes())
        assert default.hostname is None and default.node == "default"  # the file itself is unchanged
    finally:
        m.stop()
