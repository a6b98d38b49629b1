"""The master's dynamic side beside its static tree: the fleet page and its JSON API.

`rackboot serve` answers ``/`` (the rack at a glance: nodes, versions, states, errors,
rollout progress; it refreshes itself from the API every few seconds and fits a phone)
and ``/api/nodes``, ``/api/nodes/<id>``, ``/api/rollouts``: read-only, no token. Actions
(``POST /api/nodes/<id>/adopt``, ``/assign``, ``/power``, ``/forget``) need ``Authorization:
Bearer <[master] token>``, compared in constant time; with no token set they are refused.

These are small routes on serve's own ThreadingHTTPServer (its connection cap, timeouts
and stream slots hold for them too) rather than a web framework beside it: a dozen JSON
routes do not need one, and the static tree stays servable by any HTTP server.
"""

from __future__ import annotations

import hmac
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rackboot.errors import RackbootError
from rackboot.initramfs.updater import formats
from rackboot.initramfs.updater.errors import UpdaterError

from . import database, hostnames, plans, rollout, signing, status
from .inventory import Adoption, Inventory

if TYPE_CHECKING:
    from rackboot.config import Config

MAX_BODY = 4096  # an action's JSON body
ACTIONS = ("adopt", "assign", "power", "forget")
REFRESH_SECONDS = 5
DEFAULT_STALE = 86400


@dataclass(frozen=True)
class Reply:
    status: HTTPStatus
    body: bytes
    content_type: str = "application/json"


def _json(status: HTTPStatus, obj: Any) -> Reply:
    return Reply(status, json.dumps(obj, sort_keys=True, separators=(",", ":")).encode() + b"\n")


@dataclass
class Fleet:
    """The inventory and the settings the dynamic side needs (a config, when serve has one)."""

    master: Path
    inventory: Inventory
    config: Config | None = None
    log: Any = field(default=lambda _line: None)
    advance: Callable[[], object] = field(default=lambda: None)  # moves the running rollout on, never raises
    _stop: threading.Event = field(default_factory=threading.Event)
    _ticker: threading.Thread | None = None

    @classmethod
    def open(cls, master: Path, config: Config | None = None, log: Any = None) -> Fleet:
        log = log or (lambda _line: None)
        fleet = cls(master, inventory_for(master, config, log), config, log)
        if config is not None:  # every report taken may move a rollout on; a restart continues it
            power = _power(config, log)

            def advance(say_stuck: bool = False) -> None:
                try:
                    rollout.advance(config, fleet.inventory, power=power, quick=True, say_stuck=say_stuck)
                except Exception as e:  # (advance says why a rollout is stuck itself; this is the rest)
                    log(f"rollout: {type(e).__name__}: {e}")

            fleet.advance = advance
            fleet.inventory.hooks.append(lambda _inv, _node: advance())
            advance(say_stuck=True)  # serve starts whatever the rollout's state: one stuck says why
        return fleet

    def start_ticking(self, interval: float | None = None) -> None:
        """Move the running rollout on every ``interval`` s (default rollout.TICK) as well,
        so that a wave whose nodes stay silent still ends at its timeout."""
        if self.config is None or self._ticker is not None:
            return
        every = rollout.TICK if interval is None else interval
        self._ticker = threading.Thread(target=self._tick, args=(every,), name="rackboot-rollout", daemon=True)
        self._ticker.start()

    def _tick(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.advance()

    def stop(self) -> None:
        self._stop.set()
        if self._ticker is not None and self._ticker is not threading.current_thread():
            self._ticker.join()

    @property
    def manual(self) -> bool:
        return self.config is not None and self.config.master.adopt == "manual"

    @property
    def token(self) -> str:
        return self.config.master.token if self.config is not None else ""

    @property
    def stale(self) -> float:
        return self.config.master.stale if self.config is not None else DEFAULT_STALE

    # --- plan requests ---------------------------------------------------------------------------

    def plan_for(self, node: str, suffix: str) -> Path | None:
        """The plan file ``node`` gets: its own, else the default one unless adoption is
        manual and it is not adopted yet; None: no plan."""
        directory = self.master / "plans"
        own = directory / f"{node}{suffix}"
        if own.is_file():
            return own
        if self.manual and not _is_node(node):
            return None
        if self.manual:
            try:
                known = self.inventory.node(node)
            except database.ERRORS as e:  # adoption unknown: no default plan (it boots its last good slot)
                self.log(f"inventory: plan of {node}: cannot tell whether it is adopted: {database.describe(e)}")
                return None
            if known is None or not known.adopted:
                return None
        default = directory / f"default{suffix}"
        return default if default.is_file() else None

    def named_default(self, node: str, default: Path, suffix: str, *, spend: bool = True) -> Reply | None:
        """With a [master] hostname pattern, the default plan as ``node``'s own, carrying the
        name the pattern gives it (hostnames.assign: kept, never reused), signed here with the
        master key: a node that follows the default plan is named too. Marked ``default``, since
        it carries the default plan's serial and the worker takes it as the default plan.
        Deterministic (Ed25519 signatures are), so the .sig fetched next matches. None: serve
        the file as it is. Only an adopted node (one that reported) spends an index, and only
        when ``spend`` (not for a HEAD); another gets the name it has, or a {mac} pattern's,
        else none yet."""
        cfg = self.config
        if cfg is None or not cfg.master.hostname or not _is_node(node) or default.name != f"default{suffix}":
            return None
        try:
            plan = formats.parse_plan((default.parent / "default.json").read_bytes())
            known = self.inventory.node(node)
            if spend and known is not None and known.adopted:
                name = hostnames.assign(self.inventory, node, hostname=None, pattern=cfg.master.hostname)
            else:
                name = hostnames.peek(self.inventory, node, pattern=cfg.master.hostname)
            if name is None:
                return None  # not adopted yet: the default plan as it is, the name comes with its next one
            data = formats.dump(replace(plan, node=node, hostname=name, default=True))  # the default's serial
            if suffix == ".json.sig":
                if not cfg.master.key:
                    return None
                data = signing.sign(cfg.master.key, data)
        except (OSError, UpdaterError, RackbootError, *database.ERRORS) as e:
            self.log(f"plans: default plan not named for {node}: {database.describe(e)}")
            return None  # the default plan as it is: the node boots, unnamed
        return Reply(HTTPStatus.OK, data, "application/octet-stream" if suffix == ".json.sig" else "application/json")

    def saw_plan_request(self, node: str, ip: str, serial: str | None, served: Path | None) -> None:
        """Record a plan request (a GET: a HEAD changes nothing) for a node the inventory
        knows; an unknown node's is only remembered until its first report (Inventory.
        plan_request). An inventory that fails is logged, the plan still goes out."""
        if not _is_node(node):
            return
        try:
            self._record_plan_request(node, ip, serial, served)
        except (RackbootError, *database.ERRORS) as e:
            self.log(f"inventory: plan request of {node} not recorded: {database.describe(e)}")

    def _record_plan_request(self, node: str, ip: str, serial: str | None, served: Path | None) -> None:
        kind = None if served is None else ("default" if served.name.startswith("default.") else "own")
        manifest = None
        if served is not None:
            try:
                manifest = json.loads(served.read_bytes()).get("image")
            except (OSError, ValueError, AttributeError):
                manifest = None
        self.inventory.plan_request(
            node,
            ip=ip,
            serial=serial,
            plan=kind,
            manifest=manifest if isinstance(manifest, str) else None,
        )

    # --- GET ---------------------------------------------------------------------------------------

    def get(self, path: str) -> Reply:
        try:
            return self._get(path)
        except database.ERRORS as e:  # busy past its timeout, a disk gone bad, a server gone: say so, keep serving
            self.log(f"inventory: GET {path[:200]}: {database.describe(e)}")
            return _json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": f"inventory: {database.describe(e)}"})

    def _get(self, path: str) -> Reply:
        now = time.time()
        if path == "/":
            return Reply(HTTPStatus.OK, self.page(now).encode(), "text/html; charset=utf-8")
        if path == "/api/nodes":
            nodes = [  # "display": the cells of the page's row, so its script formats nothing itself
                status.node_json(n, now, self.stale) | {"display": status.row(n, now, self.stale)}
                for n in self.inventory.nodes()
            ]
            return _json(HTTPStatus.OK, {"now": round(now, 3), "stale": self.stale, "nodes": nodes})
        if path == "/api/rollouts":
            return _json(HTTPStatus.OK, {"rollouts": [p.to_dict() for p in rollout.listing(self.inventory)]})
        parts = path.split("/")
        if len(parts) == 4 and parts[:3] == ["", "api", "nodes"]:
            node = self.inventory.node(parts[3]) if _is_node(parts[3]) else None
            if node is None:
                return _json(HTTPStatus.NOT_FOUND, {"error": f"no node {parts[3][:40]!r} in the inventory"})
            doc = status.node_json(node, now, self.stale) | {"history": self.inventory.history(node.id)}
            return _json(HTTPStatus.OK, doc)
        return _json(HTTPStatus.NOT_FOUND, {"error": f"no such API path: {path[:200]}"})

    def page(self, now: float) -> str:
        import jinja2  # only when the page is asked for: serve starts without it

        env = jinja2.Environment(
            loader=jinja2.FunctionLoader(
                lambda name: resources.files("rackboot.master").joinpath("templates", name).read_text()
            ),
            undefined=jinja2.StrictUndefined,
            autoescape=True,  # node labels, errors and serials come from the rack: never markup
        )
        nodes = self.inventory.nodes()
        rows = [status.row(n, now, self.stale) for n in nodes]
        rollouts = [p.to_dict() for p in rollout.listing(self.inventory, limit=3)]
        return env.get_template("fleet.html.j2").render(
            rows=rows, columns=status.COLUMNS, rollouts=rollouts, refresh=REFRESH_SECONDS, stale=self.stale
        )

    # --- POST: actions -------------------------------------------------------------------------

    def post(self, path: str, authorization: str | None, body: bytes) -> Reply:
        parts = path.split("/")
        if len(parts) != 5 or parts[:3] != ["", "api", "nodes"] or parts[4] not in ACTIONS:
            return _json(HTTPStatus.NOT_FOUND, {"error": f"no such action: POST {path[:200]}"})
        if not self.token:
            return _json(HTTPStatus.FORBIDDEN, {"error": "actions over HTTP are off: set [master] token"})
        if not check_token(authorization, self.token):
            return _json(HTTPStatus.UNAUTHORIZED, {"error": "actions need Authorization: Bearer <[master] token>"})
        node, action = parts[3], parts[4]
        try:
            node = plans.node_name(node)
            if node == plans.DEFAULT and action != "assign":
                raise RackbootError("'default' is not a node")
            args = json.loads(body or b"{}")
            if not isinstance(args, dict):
                raise RackbootError("the body must be a JSON object")
            return _json(HTTPStatus.OK, self.act(node, action, args))
        except ValueError as e:
            return _json(HTTPStatus.BAD_REQUEST, {"error": f"body: not JSON: {e}"})
        except RackbootError as e:
            return _json(HTTPStatus.BAD_REQUEST, {"error": str(e)})
        except database.ERRORS as e:  # the database gone or failing: the action is not done, serving goes on
            self.log(f"inventory: POST {path[:200]}: {database.describe(e)}")
            return _json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": f"inventory: {database.describe(e)}"})

    def act(self, node: str, action: str, args: dict[str, Any]) -> dict[str, Any]:
        if self.config is None:
            raise RackbootError("this master was started without a config: no actions")
        image, version = args.get("image"), args.get("version")
        if image is not None and not isinstance(image, str):
            raise RackbootError("image: expected a string")
        if version is not None and (not isinstance(version, int) or isinstance(version, bool)):
            raise RackbootError("version: expected an integer")
        if action == "adopt":
            replace_key = args.get("replace", False)
            if not isinstance(replace_key, bool):
                raise RackbootError("replace: expected true or false")
            adopted = adopt(self.config, self.inventory, node, image=image, version=version, replace_key=replace_key)
            return {"node": adopted.node.to_dict(), "key": adopted.said}
        if action == "forget":
            gone = forget(self.config, self.inventory, node)
            self.log(f"web: {gone.text()}")
            return gone.to_dict()
        if action == "assign":
            if image is None:
                raise RackbootError("assign needs an image")
            path = plans.assign(self.config, node=node, image=image, version=version, names=self.inventory)
            self.log(f"web: plan for {node} written: {path}")
            return {"node": node, "plan": str(path.relative_to(self.master))}
        from . import power

        what = args.get("action")
        if what not in power.ACTIONS:
            raise RackbootError(f"action: expected one of {', '.join(power.ACTIONS)}")
        [outcome] = power.switch(self.config, [node], what)
        if not outcome.ok:
            raise RackbootError(outcome.detail)
        return {"node": node, "action": what, "done": outcome.detail}


def check_token(authorization: str | None, token: str) -> bool:
    """``Authorization: Bearer <token>``, compared in constant time."""
    if not token or not authorization:
        return False
    scheme, _, given = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode(), token.encode())


def adopt(
    cfg: Config,
    inventory: Inventory,
    node: str,
    *,
    image: str | None = None,
    version: int | None = None,
    replace_key: bool = False,
) -> Adoption:
    """Adopt ``node`` and pin the key it presented: from its next boot it gets the default
    plan, or with ``image`` its own. ``replace_key``: its card was replaced (Inventory.adopt)."""
    node = plans.node_name(node)
    if node == plans.DEFAULT:
        raise RackbootError("'default' is not a node; adopt takes a node's MAC")
    if image is not None:
        plans.assign(cfg, node=node, image=image, version=version, names=inventory)
    elif version is not None:
        raise RackbootError("--version needs --image")
    return inventory.adopt(node, replace_key=replace_key)  # (named by the pattern there, when it has none yet)


def inventory_for(master: Path, config: Config | None, log: Any = None) -> Inventory:
    """The inventory as a config has it adopt and name nodes and pin their keys (without one:
    auto, trust on first use, no pattern)."""
    if config is None:
        return Inventory(master, log=log)
    return Inventory.for_config(config, log)


@dataclass(frozen=True)
class Forgotten:
    """What `rackboot forget` removed."""

    node: str
    rows: bool  # it was in the inventory
    plan: bool  # it had a plan of its own
    name: hostnames.Entry | None  # its hostname, free again (its index stays spent)
    rollouts: int  # running rollouts that skip it from now on

    def to_dict(self) -> dict[str, Any]:
        name = None if self.name is None else {"index": self.name.index, "hostname": self.name.hostname}
        return {"node": self.node, "inventory": self.rows, "plan": self.plan, "name": name, "rollouts": self.rollouts}

    def text(self) -> str:
        parts = ["its inventory rows" if self.rows else "", "its plan" if self.plan else ""]
        if self.name is not None:
            parts.append(f"its name {self.name.hostname} (free again; index {self.name.index} is not reused)")
        if self.rollouts:
            parts.append("its place in the running rollout (skipped)")
        return f"{self.node} forgotten: " + ", ".join(p for p in parts if p)


def forget(cfg: Config, inventory: Inventory, node: str) -> Forgotten:
    """Remove ``node``: its inventory rows, its plan (and .sig), its name; a running rollout
    skips it. A node that comes back is a new node (adopted again with its first report)."""
    node = plans.node_name(node)
    if node == plans.DEFAULT:
        raise RackbootError("'default' is not a node; forget takes a node's MAC")
    master = cfg.master.directory
    with inventory.write() as db:  # the files go inside it: a failure there keeps the rows
        rows = inventory.remove(db, node)
        running = rollout.leave_out(db, node, "forgotten (rackboot forget)")
        name = hostnames.forget(inventory, node)
        plan = plans.remove_plan(master, node)
        if not (rows or running or name or plan):
            raise RackbootError(f"node {node} is unknown to {master}: not in the inventory, no plan, no name")
    if running:
        rollout.advance(cfg, inventory)  # a wave that waited for it may move on
    return Forgotten(node, rows, plan, name, running)


def _is_node(node: str) -> bool:
    try:
        return formats.node_id(node.replace("-", ":")) == node
    except UpdaterError:
        return False


def _power(config: Config, log: Any) -> rollout.Power | None:
    from . import power

    try:
        cycle = power.cycler(config, log)
    except RackbootError:
        return None  # no driver: rollouts with --cycle are refused when they start

    def in_background(nodes: list[str]) -> None:  # staggered switching must not hold up a report's reply
        threading.Thread(target=cycle, args=(nodes,), name="rackboot-power", daemon=True).start()

    return in_background
