"""Signed plans and manifests: keys made and documents signed by rackboot's builder (with
openssl), checked by the updater (with openssl) before it uses a byte of them. Every
refusal leaves the good slot good and boots it."""

from __future__ import annotations

import hashlib

import pytest
from rackboot.initramfs.updater import state
from rackboot.initramfs.updater.disk import Disk
from rackboot.initramfs.updater.errors import Refused, UpdaterError
from rackboot.initramfs.updater.signature import Verifier
from rackboot.master import signing

from tests.integration.signed_rack import primary, release, sign, update
from tests.integration.updater_master import NODE, write_plan


def test_signed_plan_and_manifest_install(server, card, keys):
    release(server.root, 1, keys["master"])
    decision = update(card, server, keys)
    assert (decision.action, decision.version) == ("installed", 1) and primary(card) == ("a", 1)


@pytest.mark.parametrize(
    "spoil, message",
    [
        ("tamper", "does not verify"),
        ("other-key", "does not verify"),
        ("unsigned", "no signature"),
        ("truncated", "signature is 32 bytes"),
    ],
)
def test_bad_manifest_signature_is_refused_and_the_good_slot_boots(server, card, keys, spoil, message):
    release(server.root, 1, keys["master"])
    update(card, server, keys)
    manifest = release(server.root, 2, keys["master"])
    doc = server.root / manifest.lstrip("/")
    sig = doc.with_name(doc.name + ".sig")
    if spoil == "tamper":  # a byte of the version label changed after signing
        doc.write_bytes(doc.read_bytes().replace(b'"v2"', b'"v3"'))
    elif spoil == "other-key":
        sign(server.root, manifest, keys["other"])
    elif spoil == "unsigned":
        sig.unlink()
    else:
        sig.write_bytes(sig.read_bytes()[:32])
    served = server.image_bytes
    decision = update(card, server, keys)
    assert (decision.action, decision.slot, decision.version) == ("refused", "a", 1)
    assert message in decision.error and server.image_bytes == served  # not a byte of the image fetched
    assert primary(card) == ("a", 1)
    assert any(r["phase"] == "error" and message in r["error"] for r in server.reports)


def test_plan_signed_by_another_key_is_refused(server, card, keys):
    release(server.root, 1, keys["master"])
    update(card, server, keys)
    release(server.root, 2, keys["master"])
    sign(server.root, f"/plans/{NODE}.json", keys["other"])
    decision = update(card, server, keys)
    assert (decision.action, decision.version) == ("refused", 1) and "does not verify" in decision.error


def test_fresh_card_with_an_unsigned_plan_has_nothing_to_boot(server, card, keys):
    release(server.root, 1, None)
    with pytest.raises(UpdaterError, match="no good slot.*no signature"):
        update(card, server, keys)
    with Disk(card, writable=False) as d:
        assert state.read(d).primary is None  # nothing committed


def test_signed_replay_of_an_older_version_is_refused_unless_pinned(server, card, keys):
    release(server.root, 1, keys["master"])
    update(card, server, keys)
    release(server.root, 2, keys["master"])
    update(card, server, keys)
    assert primary(card) == ("b", 2)
    # an attacker replays the old, validly signed v1 plan
    write_plan(server.root, "/images/example/1/manifest.json")
    sign(server.root, f"/plans/{NODE}.json", keys["master"])
    decision = update(card, server, keys)
    assert decision.action == "refused" and "replay" in decision.error and primary(card) == ("b", 2)
    # the master means it: a pinned plan rolls back, from the slot that still holds v1
    write_plan(server.root, "/images/example/1/manifest.json", pin=True)
    sign(server.root, f"/plans/{NODE}.json", keys["master"])
    decision = update(card, server, keys)
    assert (decision.action, decision.slot) == ("up-to-date", "a") and primary(card) == ("a", 1)


def test_verifier_refuses_without_openssl(tmp_path, keys):
    verifier = Verifier(str(signing.public_key_path(keys["master"])), openssl=str(tmp_path / "no-openssl"))
    with pytest.raises(Refused, match="cannot run"):
        verifier.check("/plans/x.json", b"{}", bytes(64))


def test_keygen_never_overwrites_and_keeps_the_private_key_private(tmp_path, keys):
    assert keys["master"].stat().st_mode & 0o077 == 0
    before = hashlib.sha256(keys["master"].read_bytes()).hexdigest()
    with pytest.raises(Exception, match="never overwrites"):
        signing.keygen(keys["master"])
    assert hashlib.sha256(keys["master"].read_bytes()).hexdigest() == before
