"""Several places to fetch from, in order: the master, then the sources after it.

`rackboot.sources=URL,URL` on the kernel command line names sources a worker may fetch from
after the master (a region's master, the rack's, a cache): any of them may hold a signed
document or an image, since the updater takes bytes from anywhere once they match what was
signed. For every document and every byte range, the sources are asked in turn; a source that
cannot be reached, answers an error, stalls past the read timeout, or sends bytes that fail
their check (a signature, a binding, a stream's sha256, a block's index hash) is passed over
for that piece, which the next source is asked for. Checks and source choice meet in
``verified(what, take)``: ``take(client)`` fetches from one source and checks what it got,
raising UpdaterError when the bytes are wrong; nothing it writes before its check passes is
ever committed by the caller.

A source that failed once is demoted for the rest of the boot: it is asked after every source
that has not failed (in their order), so a dead or damaged source costs its timeout or its
bytes once, yet is still there when nothing else has a piece. A 404 is no failure (a cache may
lack a file): the next source is asked, and the piece is missing only when no source has it.
A source that could not be reached is not asked for a piece another source said is missing.
Reports go to the master; when it cannot be reached, to the next source that can be.
"""

from __future__ import annotations

import http.client
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

from .errors import DiskError, Refused, UpdaterError
from .fetch import CHUNK, MasterClient, NoRange, NotFound, Unreachable, describe
from .formats import MAX_REPORT_SOURCES, MAX_SOURCE_URL, SourceUse

T = TypeVar("T")
MAX_SOURCES = MAX_REPORT_SOURCES  # the master and at most 7 sources after it
MAX_URL = MAX_SOURCE_URL  # characters in one source's URL
MAX_LIST = 384  # characters of rackboot.sources= (the kernel keeps 1024 of command line on armhf)
# the list's separator, and what a shell or U-Boot's hush acts on (/init splits the command
# line unquoted: a glob's brackets or star could match a file)
_UNSAFE = set(",'\"$\\;`<>|&(){}[]^*")
_TRANSPORT = (OSError, http.client.HTTPException)


def url_problem(url: str) -> str | None:
    """What is wrong with one source URL for the kernel command line, or None: an
    http://host[:port][/path] URL of printable ASCII that nothing between U-Boot and the
    updater would split or act on."""
    if not url:
        return "empty"
    if len(url) > MAX_URL:
        return f"{len(url)} characters is longer than the {MAX_URL} allowed"
    bad = sorted({c for c in url if c in _UNSAFE or not "!" <= c <= "~"})
    if bad:
        return f"contains {', '.join(repr(c) for c in bad)} (printable ASCII without spaces, commas or quotes only)"
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        return "not an http://host[:port][/path] URL"
    if parts.username is not None or parts.query or parts.fragment or "#" in url or "?" in url:
        return "has a user, a query or a fragment (http://host[:port][/path] only)"
    try:
        parts.port  # noqa: B018 (it raises on a bad port)
    except ValueError:
        return "has a bad port"
    return None


def parse_list(text: str, *, where: str = "rackboot.sources") -> tuple[str, ...]:
    """``rackboot.sources``'s value (comma-separated URLs) -> the URLs; UpdaterError naming
    the first problem. Empty: no sources after the master."""
    if not text:
        return ()
    if len(text) > MAX_LIST:
        raise UpdaterError(f"{where}: {len(text)} characters is longer than the {MAX_LIST} allowed")
    urls = tuple(text.split(","))
    if len(urls) > MAX_SOURCES - 1:
        raise UpdaterError(f"{where}: {len(urls)} sources, at most {MAX_SOURCES - 1} after the master")
    for url in urls:
        if problem := url_problem(url):
            raise UpdaterError(f"{where}: {url[:80]!r}: {problem}")
    if len(set(urls)) != len(urls):
        raise UpdaterError(f"{where}: a source is named twice")
    return urls


class Sources:
    """MasterClient's interface over several sources in order; the first is the master."""

    def __init__(self, clients: Sequence[MasterClient], *, log: Callable[[str], None] | None = None):
        if not clients:
            raise UpdaterError("sources: none given")
        self.clients = list(clients)
        self.order = list(range(len(self.clients)))  # source indexes, the demoted ones last
        self.failed: dict[int, str] = {}  # index -> its first failure this boot
        self.unreachable: set[int] = set()  # refused, reset or timed out this boot
        self.log = log
        # hears of each move to the next source: one source's tries are bounded, so a watchdog
        # fed here never sees several stalled sources in a row as one stalled update
        self.progress: Callable[[], None] = lambda: None

    @classmethod
    def of(cls, master: str, extra: Sequence[str] = (), **client: Any) -> Sources:
        """The master and ``extra`` sources after it (a name given twice is asked once). With a
        next source to go to, each is tried twice rather than four times: a retry of a source
        that failed costs waits that the next source saves."""
        urls = list(dict.fromkeys([master, *extra]))
        if len(urls) > 1:
            client.setdefault("retries", 1)
        return cls([MasterClient(url, **client) for url in urls])

    # --- what main and the reports read -------------------------------------------------

    @property
    def master(self) -> MasterClient:
        return self.clients[0]

    @property
    def url(self) -> str:
        return self.master.url

    @property
    def host(self) -> str:
        return self.master.host

    @property
    def stream_bytes(self) -> int:
        return sum(c.stream_bytes for c in self.clients)

    @property
    def busy_waits(self) -> int:
        return sum(c.busy_waits for c in self.clients)

    @property
    def busy_seconds(self) -> float:
        return sum(c.busy_seconds for c in self.clients)

    @property
    def range_requests(self) -> int:
        return sum(c.range_requests for c in self.clients)

    def uses(self) -> tuple[SourceUse, ...] | None:
        """Per source, in the configured order: its bytes and its failure; None with one source
        (a report then says nothing it did not say before)."""
        if len(self.clients) == 1:
            return None
        return tuple(SourceUse(c.url, c.stream_bytes, self.failed.get(i)) for i, c in enumerate(self.clients))

    # --- the choice -----------------------------------------------------------------------

    def in_order(self) -> list[MasterClient]:
        return [self.clients[i] for i in self.order]

    def demote(self, client: MasterClient, reason: str, *, unreachable: bool = False) -> None:
        """``client`` failed: it is asked after every source that has not, for the rest of the boot."""
        i = self.clients.index(client)
        if unreachable:
            self.unreachable.add(i)
        if i not in self.failed:  # behind the sources in good standing and those demoted before it
            self.failed[i] = reason
            self.order.remove(i)
            self.order.append(i)
        if self.log and len(self.clients) > 1:
            self.log(f"source {client.url} passed over: {reason}")

    def verified(self, what: str, take: Callable[[MasterClient], T]) -> T:
        """``take(source)`` from each source in turn until one returns (its checks passed).
        A 404 or a source without byte ranges is passed over without demotion; any other
        failure demotes the source. A source that could not be reached is not asked for a
        piece another source said is missing (the key chain's last link is one every boot):
        a dead source costs its timeouts once. When every source failed: NotFound if one said 404 and
        none sent a refused document, Refused if one did, NoRange if none answered a range,
        else an UpdaterError naming each source's failure. A card that fails (DiskError) ends
        it at once: no source is to blame."""
        failures: list[UpdaterError] = []
        for client in self.in_order():
            if self.clients.index(client) in self.unreachable and any(isinstance(e, NotFound) for e in failures):
                continue
            if failures:
                self.progress()
            try:
                return take(client)
            except DiskError:
                raise
            except (NotFound, NoRange) as e:
                failures.append(e)
            except UpdaterError as e:
                failures.append(e)
                self.demote(client, _reason(what, e), unreachable=isinstance(e, Unreachable))
        if len(failures) == 1:
            raise failures[0]
        told = "; ".join(str(e) for e in failures)
        if any(isinstance(e, Refused) for e in failures):
            raise Refused(f"{what}: every source failed: {told}")
        if any(isinstance(e, NotFound) for e in failures):
            raise NotFound(f"{what}: no source has it: {told}")
        if all(isinstance(e, NoRange) for e in failures):
            raise NoRange(f"{what}: no source answers byte ranges: {told}")
        raise UpdaterError(f"{what}: every source failed: {told}")

    # --- MasterClient's interface ---------------------------------------------------------

    def get(self, path: str, *, headers: dict | None = None) -> bytes:
        return self.verified(f"GET {path}", lambda c: c.get(path, headers=headers))

    def get_doc(self, path: str, parse: Callable[[bytes], T], *, headers: dict | None = None) -> T:
        """The document parsed: a source whose document does not parse is passed over like one
        that sent nothing."""
        return self.verified(f"GET {path}", lambda c: parse(c.get(path, headers=headers)))

    def stream(
        self, path: str, size: int, *, chunk: int = CHUNK, on_wait: Callable[[float], None] | None = None
    ) -> Iterator[bytes]:
        """``path``'s ``size`` bytes from the first source that starts sending them (each resumes
        only within itself). Bytes already handed on cannot be taken back: a source that fails
        after them fails the stream; callers that check a stream whole take it with ``verified``."""
        failures: list[UpdaterError] = []
        for client in self.in_order():
            if failures:
                self.progress()
            sent = False
            try:
                for piece in client.stream(path, size, chunk=chunk, on_wait=on_wait):
                    sent = True
                    yield piece
                return
            except NotFound as e:
                failures.append(e)
            except UpdaterError as e:
                self.demote(client, _reason(f"GET {path}", e), unreachable=isinstance(e, Unreachable))
                if sent:
                    raise
                failures.append(e)
        told = "; ".join(str(e) for e in failures)
        if all(isinstance(e, NotFound) for e in failures):
            raise NotFound(f"GET {path}: no source has it: {told}")
        raise UpdaterError(f"GET {path}: every source failed: {told}")

    def get_range(self, path: str, start: int, end: int, *, on_wait: Callable[[float], None] | None = None) -> bytes:
        return self.verified(
            f"GET {path} bytes {start}-{end - 1}", lambda c: c.get_range(path, start, end, on_wait=on_wait)
        )

    def get_ranges(
        self, path: str, spans: list[tuple[int, int]], *, on_wait: Callable[[float], None] | None = None
    ) -> list[bytes]:
        return self.verified(f"GET {path} {len(spans)} ranges", lambda c: c.get_ranges(path, spans, on_wait=on_wait))

    def post(
        self, path: str, body: bytes, *, timeout: float | None = None, headers: dict[str, str] | None = None
    ) -> int:
        """To the master, or when it cannot be reached (refused, reset, timed out) the next
        source, in the configured order: a source that sent a bad piece is still a fine
        place to report to, one that could not be reached this boot is not asked again. Any
        answer is the answer; Unreachable when no source can be reached."""
        tried: list[str] = []
        for i, client in enumerate(self.clients):
            if i in self.unreachable:
                continue
            if tried:
                self.progress()
            try:
                return client.post(path, body, timeout=timeout, headers=headers)
            except _TRANSPORT as e:
                tried.append(f"{client.url}: {describe(e)}")
                self.demote(client, f"POST {path}: {describe(e)}", unreachable=True)
        raise Unreachable(f"POST {path}: no source can be reached" + (f" ({'; '.join(tried)})" if tried else ""))


def _reason(what: str, e: UpdaterError) -> str:
    """Why a source was passed over: the error, with what was asked unless it says already."""
    text = str(e)
    return text if what.partition(" ")[2].split(" ")[0] in text else f"{what}: {text}"
