"""`rackboot keygen --rotate`: a new master key, named by the next link of the key chain.

The master's first key is key 0. Rotating from key m makes key m + 1 and publishes
``keys/<m + 1>.json`` in the master's tree (formats.KeyLink: the new key's raw bytes, the
retired key's fingerprint), signed by key m; workers holding key m take it on their next
boot (updater keyring.py) and refuse key m from then on. So that the rack keeps updating,
every signed document in the tree (plans, manifests, boot manifests) is signed again
with the new key, each after its old signature verified (a document nobody signed is
never blessed). The old private key is kept aside beside [master] key as
``<key>.<m>`` (mode 0600, its public file ``<key>.<m>.pub``), never in the served tree,
and [master] key holds the new key: the path in the config does not change.

Everything is prepared first (the new key in a private directory beside the old one, the
link, every new signature), then committed: the old key kept aside, the link's signature
and the link, the documents' new signatures, the new public and private key renamed
over the old. A failure undoes what was committed and says so in one line (exit 2): no
half-rotated state is left for the next command to find. The locks of keys/, plans/,
boot/ and every image's directory are held throughout, so no plan or publication signs
with a key that is being retired.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from rackboot.errors import RackbootError
from rackboot.files import TMP_RE, atomic_write_bytes, fsync_dir, lock_dir, remove, sweep
from rackboot.initramfs.updater import formats
from rackboot.initramfs.updater.errors import Refused, UpdaterError
from rackboot.initramfs.updater.formats import KeyLink, encode_key, fingerprint, parse_key_link
from rackboot.initramfs.updater.signature import MasterKey, Verifier

from . import signing

KEYS = "keys"
SIGNED = ("plans/*.json", "images/*/*/manifest.json", "boot/*/boot.json")  # documents a .sig may sign


class KeyChainError(RackbootError):
    """A rotation refused or undone: nothing changed. Exit status 2, like a usage error."""

    exit_code = 2


@dataclass(frozen=True)
class Rotation:
    old: MasterKey
    new: MasterKey
    link: Path  # keys/<n>.json in the master's tree
    retired: Path  # where the old private key is kept
    resigned: tuple[Path, ...]  # documents signed again with the new key


def sig_path(doc: Path) -> Path:
    return doc.with_name(doc.name + ".sig")


def link_path(master: Path, n: int) -> Path:
    return Path(master) / formats.key_link_path(n).lstrip("/")


def rotate(private: Path, master: Path, *, created: int = 0) -> Rotation:
    """Rotate [master] key ``private`` in the tree ``master``; ``created`` stamps the link."""
    try:
        return _rotate(private, Path(master), created)
    except KeyChainError:
        raise
    except RackbootError as e:
        raise KeyChainError(f"key rotation: {e}") from None
    except OSError as e:  # before anything was committed (_commit undoes its own)
        raise KeyChainError(f"key rotation: {e.filename or ''}: {e.strerror or e}") from None


def _rotate(private: Path, master: Path, created: int) -> Rotation:
    signing.check_key(private)
    public = signing.public_key_path(private)
    old = signing.read_public(public)
    if private.resolve().is_relative_to(master.resolve()):
        raise KeyChainError(
            f"[master] key {private} is inside [master] directory {master}, which serve serves: "
            "move the key out before rotating (retired keys are kept beside it)"
        )
    n = old.n + 1
    retired = private.with_name(f"{private.name}.{old.n}")
    for path in (retired, signing.public_key_path(retired)):
        if os.path.lexists(path):
            raise KeyChainError(
                f"{path} exists: key {old.n} was kept aside there by an earlier rotation, "
                f"so {public} (key {old.n}) is not the key that rotation left"
            )
    (master / KEYS).mkdir(parents=True, exist_ok=True)
    with _locked(master):
        sweep(master / KEYS, TMP_RE)
        link = link_path(master, n)
        if os.path.lexists(link) or os.path.lexists(sig_path(link)):
            raise KeyChainError(f"{link} exists: the chain already has a key {n}, yet [master] key is key {old.n}")
        check_chain(master, old)
        with tempfile.TemporaryDirectory(prefix=f".{private.name}.rotate-", dir=private.parent) as tmp:
            new_private = Path(tmp) / private.name
            signing.keygen(new_private, number=n)  # openssl's first run: a missing openssl is said here
            new = signing.read_public(signing.public_key_path(new_private))
            documents = signed_documents(master, Verifier(str(public)), old)
            data = formats.dump(KeyLink(n=n, key=encode_key(new.raw), retires=old.fingerprint, created=created))
            signature = signing.sign(private, data)
            _verify(Verifier(str(public)), link, data, signature)
            _verify(Verifier("the new key", key=new), link, data, signing.sign(new_private, data))  # it signs
            resigned = {doc: signing.sign(new_private, body) for doc, (body, _) in documents.items()}
            _commit(
                private,
                new_private,
                retired,
                [(sig_path(link), signature, None), (link, data, None)]
                + [(sig_path(doc), resigned[doc], old_sig) for doc, (_, old_sig) in documents.items()],
            )
    return Rotation(old, new, link, retired, tuple(documents))


@contextmanager
def _locked(master: Path) -> Iterator[None]:
    """The locks every writer of signed documents takes, in one order: keys/, plans/, boot/,
    then each image's directory (a publication holds its image's for its whole run)."""
    for name in ("plans", "boot"):
        (master / name).mkdir(exist_ok=True)
    with ExitStack() as stack:
        images = sorted(p for p in (master / "images").glob("*") if p.is_dir())
        for directory in [master / KEYS, master / "plans", master / "boot", *images]:
            stack.callback(os.close, lock_dir(directory))
        yield


def check_chain(master: Path, current: MasterKey) -> None:
    """The links 1 .. current.n are all in the tree, each retiring the key the one before
    named, the last naming ``current``: a card holding any older key can follow to it."""
    previous: KeyLink | None = None
    for k in range(1, current.n + 1):
        path = link_path(master, k)
        try:
            link = parse_key_link(path.read_bytes())
        except FileNotFoundError:
            holding = f"key {k - 1}" + (" or older" if k > 1 else "")
            raise KeyChainError(
                f"{path} is missing: cards holding {holding} could not follow the chain to key {current.n}; "
                f"restore {KEYS}/ from a backup of the master's tree before rotating"
            ) from None
        except (OSError, UpdaterError) as e:
            raise KeyChainError(f"{path}: {e}") from None
        if link.n != k or (previous is not None and link.retires != fingerprint(previous.raw)):
            raise KeyChainError(f"{path} does not follow {formats.key_link_path(k - 1)}: the chain is broken")
        previous = link
    if previous is not None and previous.raw != current.raw:
        raise KeyChainError(
            f"{link_path(master, current.n)} names another key {current.n} than [master] key's: "
            "the key and the master's tree are not of one chain"
        )


def signed_documents(master: Path, verifier: Verifier, key: MasterKey) -> dict[Path, tuple[bytes, bytes]]:
    """Every document in the tree with a signature beside it: its bytes and that signature,
    which must verify with ``key`` (the one being retired)."""
    found: dict[Path, tuple[bytes, bytes]] = {}
    for pattern in SIGNED:
        for doc in sorted(master.glob(pattern)):
            if not sig_path(doc).is_file():
                continue  # unsigned (published before the rack had a key): it stays so
            data, signature = doc.read_bytes(), sig_path(doc).read_bytes()
            try:
                verifier.check(str(doc.relative_to(master)), data, signature)
            except Refused as e:
                raise KeyChainError(
                    f"{e}; it would be signed with key {key.n + 1} as it is: publish it again or remove it "
                    "before rotating"
                ) from None
            found[doc] = (data, signature)
    return found


def _verify(verifier: Verifier, link: Path, data: bytes, signature: bytes) -> None:
    try:
        verifier.check(str(link), data, signature)
    except Refused as e:
        raise KeyChainError(f"key rotation: {e}") from None


def _commit(private: Path, new_private: Path, retired: Path, writes: list[tuple[Path, bytes, bytes | None]]) -> None:
    """Keep the old key aside, write ``writes`` (path, new bytes, old bytes or None: new
    file) in order, then rename the new key pair over the old. Any failure undoes it all."""
    public, new_public = signing.public_key_path(private), signing.public_key_path(new_private)
    retired_public = signing.public_key_path(retired)
    undo: list[Callable[[], None]] = []
    try:
        _keep_aside(private, retired)
        undo.append(lambda: remove(retired))
        _keep_aside(public, retired_public)
        undo.append(lambda: remove(retired_public))
        for path, data, before in writes:
            atomic_write_bytes(path, data)
            undo.append(_putting_back(path, before))
        os.replace(new_public, public)
        undo.append(lambda: atomic_write_bytes(public, retired_public.read_bytes()))
        os.replace(new_private, private)
        fsync_dir(private.parent)
    except (OSError, RackbootError) as e:
        problem = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        for step in reversed(undo):
            try:
                step()
            except (OSError, RackbootError):
                pass  # best effort: the first failure is the one to report
        raise KeyChainError(f"key rotation undone: {problem}") from None


def _putting_back(path: Path, before: bytes | None) -> Callable[[], None]:
    """What undoes a write of ``path``: its old bytes again, or no file (None)."""
    return lambda: remove(path) if before is None else atomic_write_bytes(path, before)


def _keep_aside(path: Path, aside: Path) -> None:
    """A second name for ``path`` (a hard link: same bytes, same 0600); a copy where links fail."""
    try:
        os.link(path, aside)
    except FileExistsError:
        raise
    except OSError:
        fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(path.read_bytes())
            f.flush()
            os.fsync(f.fileno())
