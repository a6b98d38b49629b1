"""Signed hooks: scripts a manifest pins by size and sha256, run by the updater as root
only when that manifest's signature verified; a failing, hanging, swapped or unsigned
hook stops the install and the good slot boots."""

from __future__ import annotations

import hashlib
import os
import signal
import time
from pathlib import Path

import pytest
from rackboot.initramfs.updater import hooks
from rackboot.initramfs.updater.formats import Hook

from tests.integration.signed_rack import primary, release, sign, slot, update


def hook(root: Path, version: int, name: str, script: str, timeout: int = 30) -> Hook:
    """Write ``script`` beside version's manifest; the Hook entry that pins it."""
    data = script.encode()
    where = root / "images" / "example" / str(version)
    where.mkdir(parents=True, exist_ok=True)
    (where / f"{name}.sh").write_bytes(data)
    return Hook(name=name, file=f"{name}.sh", size=len(data), sha256=hashlib.sha256(data).hexdigest(), timeout=timeout)


def provisioned(server, card, keys) -> None:
    """v1 in slot a, then v2 waits on the master with the test's hooks."""
    release(server.root, 1, keys["master"])
    update(card, server, keys)
    assert primary(card) == ("a", 1)


def hook_reports(server) -> list[dict]:
    return [r for r in server.reports if r["phase"] == "hook"]


def test_signed_hooks_run_in_order_with_the_slot_they_install(server, card, keys, tmp_path):
    provisioned(server, card, keys)
    trace = tmp_path / "trace"
    pre = hook(
        server.root,
        2,
        "pre-install",
        f'echo "pre $RACKBOOT_IMAGE v$RACKBOOT_VERSION slot $RACKBOOT_SLOT" | tee -a {trace}\n',
    )
    # post-install sees the slot written: its first bytes are the image's
    post = hook(
        server.root,
        2,
        "post-install",
        f'head -c 16 "$RACKBOOT_DISK" >/dev/null && echo "post $RACKBOOT_SLOT_DEVICE" | tee -a {trace}\n',
    )
    release(server.root, 2, keys["master"], hooks=[pre, post])
    lines: list[str] = []
    decision = update(card, server, keys, log=lines.append)
    assert (decision.action, decision.slot, decision.version) == ("installed", "b", 2)
    assert trace.read_text().splitlines() == ["pre example v2 slot b", f"post {card}3"]
    assert "hook pre-install: pre example v2 slot b" in lines  # its output on the console
    reports = hook_reports(server)
    assert [r["output"] for r in reports] == ["pre example v2 slot b\n", f"post {card}3\n"]
    assert all(r["error"] is None and r["slot"] == "b" for r in reports)


def test_a_card_without_the_master_key_runs_no_hook(server, card, tmp_path):
    ran = tmp_path / "ran"
    release(server.root, 1, None, hooks=[hook(server.root, 1, "pre-install", f"touch {ran}\n")])
    with pytest.raises(Exception, match="no master key.*an unsigned hook never runs"):
        update(card, server, None)
    assert not ran.exists() and server.image_bytes == 0 and primary(card) == (None, None)


def test_a_hook_swapped_after_signing_is_refused_before_anything_runs(server, card, keys, tmp_path):
    provisioned(server, card, keys)
    ran = tmp_path / "ran"
    pre = hook(server.root, 2, "pre-install", "echo fine\n")
    release(server.root, 2, keys["master"], hooks=[pre])
    (server.root / "images/example/2/pre-install.sh").write_text(f"touch {ran}\n")  # not what was signed
    served = server.image_bytes
    lines: list[str] = []
    decision = update(card, server, keys, log=lines.append)
    assert (decision.action, decision.slot, decision.version) == ("refused", "a", 1)
    assert "hook pre-install" in decision.error and "signed manifest says" in decision.error
    refusals = [line for line in lines if "refused:" in line]
    assert refusals == [f"download refused: {decision.error}"]  # one line on the console
    assert not ran.exists() and server.image_bytes == served and slot(card, "b").state == "empty"


def test_a_hook_entry_edited_into_a_signed_manifest_breaks_its_signature(server, card, keys, tmp_path):
    provisioned(server, card, keys)
    manifest = release(server.root, 2, keys["master"])
    doc = server.root / manifest.lstrip("/")
    sig = doc.with_name(doc.name + ".sig").read_bytes()
    release(server.root, 2, None, hooks=[hook(server.root, 2, "pre-install", f"touch {tmp_path}/ran\n")])
    doc.with_name(doc.name + ".sig").write_bytes(sig)  # the old signature beside the new manifest
    sign(server.root, "/plans/52-54-00-12-34-56.json", keys["master"])
    decision = update(card, server, keys)
    assert decision.action == "refused" and "does not verify" in decision.error
    assert not (tmp_path / "ran").exists()


def test_failing_pre_install_leaves_the_slot_untouched_and_reports_its_output(server, card, keys):
    provisioned(server, card, keys)
    pre = hook(server.root, 2, "pre-install", "echo checking the fan\necho fan is dead >&2\nexit 3\n")
    release(server.root, 2, keys["master"], hooks=[pre])
    served = server.image_bytes
    decision = update(card, server, keys)
    assert (decision.action, decision.slot) == ("fallback", "a")
    assert decision.error == "hook pre-install exited with status 3: fan is dead"
    assert server.image_bytes == served and slot(card, "b").state == "empty"
    (report,) = hook_reports(server)
    assert report["output"] == "checking the fan\nfan is dead\n" and "status 3" in report["error"]


def test_failing_post_install_leaves_the_slot_uncommitted(server, card, keys):
    provisioned(server, card, keys)
    release(server.root, 2, keys["master"], hooks=[hook(server.root, 2, "post-install", "exit 1\n")])
    decision = update(card, server, keys)
    assert (decision.action, decision.slot, decision.version) == ("fallback", "a", 1)
    assert slot(card, "b").state == "bad" and primary(card) == ("a", 1)
    errors = [(r["slot"], r["version"], r["error"]) for r in server.reports if r["phase"] == "error"]
    assert errors == [("b", 2, "post-install: hook post-install exited with status 1")]


@pytest.mark.slow
def test_a_hanging_hook_is_killed_with_its_children_at_its_timeout(server, card, keys, tmp_path):
    provisioned(server, card, keys)
    late = tmp_path / "late"
    script = f"echo started\n(sleep 2; touch {late}) &\nsleep 60\n"
    release(server.root, 2, keys["master"], hooks=[hook(server.root, 2, "pre-install", script, timeout=1)])
    decision = update(card, server, keys)
    assert (decision.action, decision.slot) == ("fallback", "a")
    assert decision.error == "hook pre-install timed out and was killed: started"
    time.sleep(2.5)
    assert not late.exists()  # the background child died with the group


def test_hook_runner_reports_signals_and_keeps_the_output_tail(tmp_path):
    h = Hook(name="post-install", file="x.sh", size=1, sha256="0" * 64, timeout=10)
    out = hooks.run(h, b"yes line | head -n 5000\nkill -9 $$\n", {"PATH": "/usr/bin:/bin"}, log=lambda m: None)
    assert out.status == -9 and out.problem().startswith("hook post-install was killed by signal 9")
    assert len(out.output) == 4000 and out.output.endswith("line\n")


@pytest.mark.slow
def test_a_hook_whose_escaped_child_holds_its_output_still_ends(tmp_path):
    """setsid takes a child out of the hook's process group; the kill misses it and it keeps
    the output pipe open. The updater stops waiting for it all the same."""
    h = Hook(name="pre-install", file="x.sh", size=1, sha256="0" * 64, timeout=1)
    pid_file = tmp_path / "escaped.pid"
    script = f"echo started\nsetsid sh -c 'echo $$ > {pid_file}; exec sleep 60' &\nsleep 60\n".encode()
    try:
        out = hooks.run(h, script, {"PATH": "/usr/bin:/bin"}, log=lambda m: None)
    finally:
        if pid_file.exists():
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
    assert out.status is None and not out.ok
    assert out.output.startswith("started\n") and "output cut" in out.output
