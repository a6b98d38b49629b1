"""Key rotation end to end on loopback: `rackboot keygen --rotate` (keychain.rotate) in a
master tree that the real `rackboot serve` serves, and the updater on a file-backed card
whose initramfs key is the master's first one. A worker follows the chain link by link,
keeps the newest key on the card and refuses the retired one; every refused chain is one
line in a report, and the good slot boots."""

from __future__ import annotations

import json
import shutil
import threading

import pytest
from rackboot.initramfs.updater import formats, keyring
from rackboot.initramfs.updater.disk import Disk
from rackboot.initramfs.updater.errors import UpdaterError
from rackboot.initramfs.updater.fetch import MasterClient
from rackboot.initramfs.updater.formats import KeyLink
from rackboot.initramfs.updater.main import Identity, run
from rackboot.initramfs.updater.signature import Verifier
from rackboot.master import keychain, serve, signing

from tests.integration.signed_rack import primary, release, sign
from tests.integration.updater_master import MAC, NODE

PLAN = f"/plans/{NODE}.json"


class Rack:
    """A master tree served by `rackboot serve`, its key, and a card flashed with key 0."""

    def __init__(self, tmp_path):
        self.root = tmp_path / "master"
        self.root.mkdir()
        self.key = tmp_path / "keys" / "master.key"
        signing.keygen(self.key)
        self.built_in = tmp_path / "initramfs" / "master.pub"  # what the card's initramfs carries
        self.built_in.parent.mkdir()
        shutil.copy(signing.public_key_path(self.key), self.built_in)
        self.card = str(tmp_path / "card.img")
        with open(self.card, "wb") as f:
            f.truncate(256 << 20)
        self.server = serve.make_server(self.root, quiet=True)
        self.url = self.server.url
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.up = True

    def stop(self) -> None:
        if self.up:
            self.server.shutdown()
            self.server.server_close()
            self.up = False

    def boot(self) -> tuple[object, list[str]]:
        lines: list[str] = []
        master = MasterClient(self.url, connect_timeout=1.0, read_timeout=5.0, retries=1, backoff=0.01)
        decision = run(self.card, self.url, Identity(MAC), master=master, log=lines.append, verifier=self.verifier())
        return decision, lines

    def verifier(self) -> Verifier:
        return Verifier(str(self.built_in))

    def rotate(self, times: int = 1) -> None:
        for _ in range(times):
            keychain.rotate(self.key, self.root)

    def retired(self, n: int):
        return self.key.with_name(f"master.key.{n}")

    def key_of(self, path) -> object:
        return signing.read_public(signing.public_key_path(path))

    def kept(self) -> keyring.KeyRecord | None:
        with Disk(self.card, writable=False) as d:
            return keyring.read(d)

    def errors(self) -> list[str]:
        path = self.root / "reports" / f"{NODE}.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        return [r["error"] for r in map(json.loads, lines) if r["phase"] == "error"]

    def link(self, at: int, *, signer, **fields) -> None:
        """keys/<at>.json as an attacker or a broken master would write it, signed by ``signer``."""
        new = self.key_of(self.key)
        doc = {"n": at, "key": formats.encode_key(new.raw), "retires": self.key_of(self.retired(at - 1)).fingerprint}
        path = self.root / "keys" / f"{at}.json"
        path.write_bytes(formats.dump(KeyLink(**{**doc, **fields})))
        sign(self.root, f"/keys/{at}.json", signer)


@pytest.fixture
def rack(tmp_path):
    r = Rack(tmp_path)
    yield r
    r.stop()


def installed_v1(rack: Rack) -> None:
    release(rack.root, 1, rack.key)
    decision, _ = rack.boot()
    assert (decision.action, decision.version) == ("installed", 1)


def refused_on_v1(rack: Rack, decision, message: str) -> None:
    """The good slot booted, and the refusal (``message``: "<phase>: <what>") is one line in one report."""
    assert (decision.action, decision.slot, decision.version) == ("refused", "a", 1)
    assert message.split(": ", 1)[1] in decision.error and primary(rack.card) == ("a", 1)
    assert rack.errors() == [f"{message.split(': ', 1)[0]}: {decision.error}"] and message in rack.errors()[0]


# --- the chain followed ---------------------------------------------------------------------


def test_a_rotated_key_is_followed_and_v2_comes_under_it(rack):
    installed_v1(rack)
    rack.rotate()
    release(rack.root, 2, rack.key)  # signed by [master] key: the new key now
    new = rack.key_of(rack.key)
    decision, log = rack.boot()
    assert (decision.action, decision.version) == ("installed", 2) and primary(rack.card) == ("b", 2)
    assert f"{new.name} from /keys/1.json: signed by key 0, which it retires" in log
    assert "master key 1: keeping it on the card" in log
    assert rack.kept() == keyring.KeyRecord(n=1, key=formats.encode_key(new.raw), seq=1)
    decision, log = rack.boot()  # from the card's key now: nothing more to take
    assert decision.action == "up-to-date" and log[0] == f"{new.name}: kept on the card (the initramfs has key 0)"
    assert not any("keeping it on the card" in line for line in log) and rack.kept().seq == 1
    assert rack.errors() == []


def test_a_card_flashed_long_ago_catches_up_over_several_links_on_its_first_boot(rack):
    release(rack.root, 1, rack.key)
    rack.rotate(3)
    release(rack.root, 2, rack.key)
    decision, log = rack.boot()
    assert (decision.action, decision.version) == ("installed", 2)
    taken = [line for line in log if " from /keys/" in line]
    assert [line.split(" from ")[1].split(":")[0] for line in taken] == [f"/keys/{n}.json" for n in (1, 2, 3)]
    assert rack.kept().master_key == rack.key_of(rack.key) and rack.kept().n == 3


def test_the_offline_boot_uses_the_key_kept_on_the_card(rack):
    installed_v1(rack)
    rack.rotate()
    release(rack.root, 2, rack.key)
    rack.boot()
    rack.stop()
    decision, log = rack.boot()
    assert (decision.action, decision.slot, decision.version) == ("offline", "b", 2)
    assert log[0] == f"{rack.key_of(rack.key).name}: kept on the card (the initramfs has key 0)"


# --- chains refused -------------------------------------------------------------------------


def test_a_chain_with_a_gap_stops_before_it_and_the_newer_key_is_refused(rack):
    installed_v1(rack)
    rack.rotate(3)
    for name in ("2.json", "2.json.sig"):
        (rack.root / "keys" / name).unlink()
    release(rack.root, 2, rack.key)  # signed by key 3
    decision, _ = rack.boot()
    refused_on_v1(rack, decision, f"plan: {PLAN}: signature does not verify with master key 1")
    assert rack.kept().n == 1  # the links before the gap stand


@pytest.mark.parametrize(
    "spoil, message",
    [
        ("tamper", "plan: /keys/1.json: signature does not verify with master key 0"),
        ("other-key", "plan: /keys/1.json: signature does not verify with master key 0"),
        ("unsigned", "plan: /keys/1.json: no signature"),
    ],
)
def test_a_link_with_a_bad_signature_is_refused(rack, keys, spoil, message):
    installed_v1(rack)
    rack.rotate()
    link = rack.root / "keys" / "1.json"
    if spoil == "tamper":  # another key put in after the old key signed
        doc = json.loads(link.read_bytes())
        doc["key"] = formats.encode_key(rack.key_of(keys["other"]).raw)
        link.write_bytes(formats.dump(doc))
    elif spoil == "other-key":
        sign(rack.root, "/keys/1.json", keys["other"])
    else:
        (rack.root / "keys" / "1.json.sig").unlink()
    release(rack.root, 2, rack.key)
    decision, _ = rack.boot()
    refused_on_v1(rack, decision, message)
    assert rack.kept() is None


def test_a_link_that_retires_another_key_is_refused(rack, keys):
    installed_v1(rack)
    rack.rotate()
    rack.link(1, signer=rack.retired(0), retires=rack.key_of(keys["other"]).fingerprint)
    release(rack.root, 2, rack.key)
    decision, _ = rack.boot()
    other = rack.key_of(keys["other"]).fingerprint[:16]
    refused_on_v1(rack, decision, f"plan: /keys/1.json: retires key sha256 {other}, not master key 0")
    assert rack.kept() is None


def test_a_link_whose_number_does_not_follow_is_refused(rack):
    installed_v1(rack)
    rack.rotate()
    rack.link(1, signer=rack.retired(0), n=2)
    release(rack.root, 2, rack.key)
    decision, _ = rack.boot()
    refused_on_v1(rack, decision, "plan: /keys/1.json: names key 2, where key 1 follows key 0")


@pytest.mark.parametrize("replay", [False, True])
def test_a_key_that_goes_back_is_refused(rack, replay):
    installed_v1(rack)
    rack.rotate(2)
    plan = (rack.root / PLAN.lstrip("/")).read_bytes()
    rack.boot()
    assert rack.kept().n == 2
    keys = rack.root / "keys"
    if replay:  # the first link again, where the third belongs
        for suffix in ("", ".sig"):
            shutil.copy(keys / f"1.json{suffix}", keys / f"3.json{suffix}")
        message = "plan: /keys/3.json: signature does not verify with master key 2"
    else:  # signed by key 2 itself, naming key 1
        doc = {"n": 1, "key": formats.encode_key(rack.key_of(rack.retired(1)).raw)}
        (keys / "3.json").write_bytes(formats.dump(KeyLink(retires=rack.kept().master_key.fingerprint, **doc)))
        sign(rack.root, "/keys/3.json", rack.key)
        message = "plan: /keys/3.json: names key 1, not newer than key 2 this card holds: a key never goes back"
    decision, _ = rack.boot()
    assert (decision.action, decision.version) == ("refused", 1) and rack.errors() == [f"plan: {decision.error}"]
    assert message in rack.errors()[0]
    assert rack.kept().n == 2 and (rack.root / PLAN.lstrip("/")).read_bytes() == plan


def test_after_a_rotation_the_retired_key_is_refused(rack):
    installed_v1(rack)
    rack.rotate()
    rack.boot()  # the card takes key 1
    assert rack.kept().n == 1
    release(rack.root, 2, rack.retired(0))  # v2 and its plan signed by the retired key
    decision, _ = rack.boot()
    refused_on_v1(rack, decision, f"plan: {PLAN}: signature does not verify with master key 1")


def test_a_damaged_key_record_falls_back_to_the_initramfs_key_and_the_chain_again(rack):
    installed_v1(rack)
    rack.rotate()
    rack.boot()
    with Disk(rack.card) as d:
        d.write(keyring.COPIES[0] + 20, b"X")  # the one copy written
    decision, log = rack.boot()
    assert decision.action == "up-to-date"
    assert log[0] == f"key record: damaged (no whole copy); using the initramfs's {rack.verifier().key.name}"
    assert "master key 1: keeping it on the card" in log and rack.kept().n == 1


def test_a_torn_newest_copy_leaves_the_older_key_and_the_chain_takes_it_forward(rack):
    installed_v1(rack)
    rack.rotate()
    rack.boot()
    rack.rotate()
    rack.boot()
    assert rack.kept().seq == 2
    with Disk(rack.card) as d:
        d.write(keyring.COPIES[1] + 20, b"X")  # copy 2 holds seq 2, key 2
    decision, log = rack.boot()
    assert decision.action == "up-to-date" and log[0].startswith("master key 1 ") and "kept on the card" in log[0]
    assert any(line.startswith("master key 2 ") and "from /keys/2.json" in line for line in log)
    assert (rack.kept().n, rack.kept().seq) == (2, 2)  # over the torn copy, after seq 1


class KeyRecordWritesFail(Disk):
    """A card whose key-record sectors went bad: reads work, writes there fail (a fault a
    file-backed card cannot have otherwise)."""

    def write(self, offset: int, data) -> None:
        if offset in keyring.COPIES:
            raise UpdaterError(f"disk {self.path}: write at {offset}: Input/output error")
        super().write(offset, data)


def test_a_key_record_that_cannot_be_written_still_lets_the_new_key_verify_this_boot(rack):
    installed_v1(rack)
    rack.rotate()
    release(rack.root, 2, rack.key)
    lines: list[str] = []
    master = MasterClient(rack.url, connect_timeout=1.0, read_timeout=5.0, retries=1, backoff=0.01)
    decision = run(
        rack.card,
        rack.url,
        Identity(MAC),
        master=master,
        log=lines.append,
        verifier=rack.verifier(),
        open_disk=KeyRecordWritesFail,
    )
    assert (decision.action, decision.version) == ("installed", 2) and rack.kept() is None
    assert any(line.startswith("key record not written: disk") for line in lines)
    assert [e for e in rack.errors() if "key record" in e] == [
        f"plan: key record not written: disk {rack.card}: write at {keyring.COPIES[0]}: Input/output error"
    ]
    decision, log = rack.boot()  # the next boot takes the link again, and keeps it
    assert decision.action == "up-to-date" and rack.kept().n == 1 and "master key 1: keeping it on the card" in log


def test_an_unsigned_rack_asks_for_no_keys(rack):
    release(rack.root, 1, None)
    rack.rotate()  # a link is there to take, but a card without a key checks no signatures
    lines: list[str] = []
    master = MasterClient(rack.url, connect_timeout=1.0, read_timeout=5.0, retries=1, backoff=0.01)
    decision = run(rack.card, rack.url, Identity(MAC), master=master, log=lines.append, verifier=Verifier(None))
    assert decision.action == "installed" and not any(line.startswith("master key") for line in lines), lines
    assert "/keys/1.json" not in rack.server.stats()["bytes_sent"] and rack.kept() is None
