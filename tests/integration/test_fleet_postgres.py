"""Several masters on one PostgreSQL database (a real server: tests/postgres.py): two
masters (processes, each its own Inventory and connections) racing to name nodes and to
move one rollout wave on never give one name twice nor advance a wave twice; a database
that is unreachable, newer than this rackboot or misnamed stops `rackboot` in one line; one
that goes away under a running master costs reports (an error answer, logged), never plans."""

from __future__ import annotations

import json
import multiprocessing
import socket
import time
from pathlib import Path

import psycopg
from rackboot import cli, config
from rackboot.initramfs.updater import formats
from rackboot.initramfs.updater.formats import Phase, Report
from rackboot.master import hostnames, rollout
from rackboot.master.inventory import SCHEMA, Inventory

from tests.helpers import write_config
from tests.integration.test_fleet import NODES, TOKEN, Master, plan_version, rack
from tests.integration.updater_master import image_bytes, publish, write_plan

MASTERS = 2
RACK = [f"52-54-00-00-10-{i:02x}" for i in range(24)]


def pg_cfg(tmp_path: Path, url: str, **master) -> config.Config:
    (tmp_path / "master").mkdir(exist_ok=True)
    return config.load(write_config(tmp_path, master={"token": TOKEN, "database": url, **master}))


def _race(target, args: list[tuple]) -> list:
    """``target`` in one process per args (each a master of its own), all let go at once
    (a barrier as the last argument); what each returned (sent back through a queue)."""
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Barrier(len(args)), ctx.Queue()
    procs = [ctx.Process(target=_run, args=(target, i, (*a, start), results)) for i, a in enumerate(args)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert not any(isinstance(v, BaseException) for v in got.values()), got
    return [got[i] for i in range(len(args))]


def _run(target, i, args, results) -> None:
    try:
        results.put((i, target(*args)))
    except Exception as e:
        results.put((i, RuntimeError(f"{type(e).__name__}: {e}")))


def _name_all(root: str, url: str, order: int, start) -> dict[str, str]:
    """One master: names every node of the rack (in its own order), as adoption would."""
    inv = Inventory(Path(root), database_url=url)
    start.wait()
    nodes = RACK if order % 2 == 0 else RACK[::-1]
    return {node: str(hostnames.assign(inv, node, hostname=None, pattern="w{index}")) for node in nodes}


def test_masters_on_one_database_never_give_one_name_to_two_nodes(tmp_path, postgres):
    url = postgres.database()
    roots = [tmp_path / f"m{i}" for i in range(MASTERS)]
    for root in roots:
        root.mkdir()
    Inventory(roots[0], database_url=url)  # made and migrated once, before the race
    got = _race(_name_all, [(str(root), url, i) for i, root in enumerate(roots)])
    assert got[0] == got[1]  # each node has one name, whichever master asked
    names = list(got[0].values())
    assert sorted(names) == sorted(f"w{i}" for i in range(1, len(RACK) + 1))  # none twice, no index spent twice
    registry = hostnames.read(Inventory(roots[1], database_url=url))
    assert {n: e.hostname for n, e in registry.items()} == got[0]


def _advance(cfg_path: str, rounds: int, start) -> list[str]:
    """One master: moves the running rollout on, ``rounds`` times; what it logged."""
    cfg = config.load(Path(cfg_path))
    said: list[str] = []
    inv = Inventory.for_config(cfg, log=said.append)
    start.wait()
    for _ in range(rounds):
        rollout.advance(cfg, inv)
    return said


def test_masters_on_one_database_never_advance_a_wave_twice(tmp_path, postgres):
    cfg = pg_cfg(tmp_path, postgres.database())
    m = Master(cfg)
    try:
        rack(m)
        rollout.start(cfg, m.inventory(), image="example", version=2, waves="1,rest", max_failed=0)
        assert [plan_version(m, n) for n in NODES] == [2, None, None, None]
    finally:
        m.stop()
    # wave 1's node confirms, taken without moving the rollout on (no serve: no hook)
    key = m.key(NODES[0])
    doc = {"node": NODES[0], "phase": "confirm", "slot": "b", "version": 2, "bytes": 0, "seconds": 0.0}
    body = json.dumps(doc | {"error": None, "time": 1700000002.0, "pubkey": key.public_b64}).encode()
    taken = m.inventory().ingest(formats.parse_report(body), body=body, signature=key.sign(body))
    assert taken.outcome == "taken"
    said = _race(_advance, [(str(cfg.path), 5)] * MASTERS)
    through = [line for lines in said for line in lines if "wave 1 through" in line]
    assert through == [f"rollout 1: wave 1 through; wave 2: {', '.join(NODES[1:])}"]  # once, by one master
    assert [plan_version(m, n) for n in NODES] == [2, 2, 2, 2]
    later = [json.loads((m.root / "plans" / f"{n}.json").read_text())["serial"] for n in NODES[1:]]
    assert later == [1, 1, 1]  # each wave-2 plan written once (a second write is serial 2)
    [progress] = rollout.listing(m.inventory(), limit=1)
    assert (progress.state, progress.wave) == ("running", 1)
    assert {n: progress.nodes[n]["state"] for n in NODES[1:]} == dict.fromkeys(NODES[1:], "assigned")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens on it once closed


def test_bad_databases_stop_rackboot_in_one_line(tmp_path, postgres, capsys):
    (tmp_path / "master").mkdir()
    # unreachable: nothing listens there
    unreachable = f"postgresql://postgres@127.0.0.1:{_closed_port()}/rackboot"
    path = write_config(tmp_path, master={"database": unreachable})
    assert cli.main(["status", "-c", str(path)]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"inventory {unreachable}: cannot connect: " in err
    # newer than this rackboot knows
    url = postgres.database()
    Inventory(tmp_path / "master", database_url=url)
    with psycopg.connect(url, autocommit=True) as db:
        db.execute("UPDATE rackboot_schema SET version = %s", (SCHEMA + 1,))
    path = write_config(tmp_path, master={"database": url})
    assert cli.main(["status", "-c", str(path)]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"schema version {SCHEMA + 1} is newer than this rackboot's {SCHEMA}; upgrade rackboot" in err
    # not a database URL: the config says so, naming the setting; the password is not repeated
    for bad, why in (
        ("mysql://u:secret@db/fleet", "not a postgresql://"),
        ("postgresql://u:secret@db:port/fleet", "not a database URL"),
        ("postgresql://u:secret@db", "names no database"),
    ):
        path = write_config(tmp_path, master={"database": bad})
        assert cli.main(["status", "-c", str(path)]) != 0
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "[master] database" in err and why in err, err
        assert "secret" not in err


def test_a_database_that_goes_away_costs_reports_not_plans(tmp_path, postgres):
    url = postgres.database()
    cfg = pg_cfg(tmp_path, url)
    said: list[str] = []
    m = Master(cfg)
    m.server.fleet.inventory.log = m.server.fleet.log = said.append
    try:
        publish(m.root, 1, image_bytes(5))
        write_plan(m.root, "/images/example/1/manifest.json", node="default")
        write_plan(m.root, "/images/example/1/manifest.json", node=NODES[1])
        assert m.report(node=NODES[0], phase="boot", slot="a", version=1, time=1700000000.0) == 204
        name = url.rsplit("/", 1)[1]
        with psycopg.connect(postgres.url("postgres"), autocommit=True) as db:
            db.execute(f"DROP DATABASE {name} WITH (FORCE)")  # its connections cut, the database gone
        for node in NODES[:2]:  # a default plan, a plan of its own: served as before
            status, body = m.request("GET", f"/plans/{node}.json")
            assert status == 200 and json.loads(body)["image"] == "/images/example/1/manifest.json"
        assert m.request("GET", "/images/example/1/manifest.json")[0] == 200
        status = m.report(node=NODES[0], phase="boot", slot="a", version=1, time=1700000100.0)
        assert status == 503  # told; kept in reports/ as the file history
        assert len((m.root / "reports" / f"{NODES[0]}.jsonl").read_text().splitlines()) == 2
        status, body = m.request("GET", "/api/nodes")
        assert status == 503 and json.loads(body)["error"].startswith("inventory: ")
        assert any(line.startswith(f"inventory: plan request of {NODES[0]} not recorded") for line in said), said
        # back: the next request opens a new connection, and the master goes on
        with psycopg.connect(postgres.url("postgres"), autocommit=True) as db:
            db.execute(f"CREATE DATABASE {name}")
        deadline = time.monotonic() + 30
        while m.request("GET", "/api/nodes")[0] != 200:  # (a fresh database: migrated by the next open)
            assert time.monotonic() < deadline
            Inventory(m.root, database_url=url)
            time.sleep(0.1)
        assert m.report(node=NODES[0], phase="boot", slot="a", version=1, time=1700000200.0) == 204
    finally:
        m.stop()


def test_postgresql_keeps_what_sqlite_keeps(tmp_path, postgres):
    """The columns' types, mapped (database.py): a time to the millisecond and its replay,
    an install past 4 GiB, a plan's bytes; the same schema version as SQLite's."""
    inv = Inventory(tmp_path, database_url=postgres.database())
    assert inv.schema() == SCHEMA == Inventory(tmp_path).schema()  # (the SQLite file beside it)
    node = "52-54-00-00-20-01"
    big = Report(node=node, phase=Phase.DOWNLOAD, slot="b", version=2, bytes=5 << 30, seconds=61.25, time=1.7e9 + 0.123)
    assert inv.ingest(big, received=1700000000.456).outcome == "taken"
    assert inv.ingest(big, received=1700000001.0).outcome == "replay"  # the same time, read back exactly
    [kept] = inv.history(node)
    assert (kept["bytes"], kept["seconds"], kept["time"], kept["received"]) == (
        5 << 30,
        61.25,
        1.7e9 + 0.123,
        1700000000.456,
    )
    found = inv.node(node)
    assert found is not None and (found.install_bytes, found.last_seen) == (5 << 30, 1700000000.456)
    with inv.write() as db:
        db.execute(
            "INSERT INTO rollouts (image, version, manifest, waves, max_failed, state, wave, created, updated)"
            " VALUES ('x', 1, 'm', 'rest', 0, 'done', 0, 0, 0)"
        )
        db.execute(
            "INSERT INTO rollout_nodes (rollout, node, wave, state, previous_plan) VALUES (1, ?, 0, 'done', ?)",
            (node, b"\x00\xff{}"),
        )
    assert inv.db.execute("SELECT previous_plan FROM rollout_nodes").fetchone()[0] == b"\x00\xff{}"
