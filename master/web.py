"""The master's dynamic side beside its static tree: the fleet page and its JSON API.

`rackboot serve` answers ``/`` (the rack at a glance: nodes, versions, states, errors,
rollout progress; it refreshes itself from the API every few seconds and fits a phone)
and ``/api/nodes``, ``/api/nodes/<id>``, ``/api/rollouts``: read-only, no token. Actions
(``POST /api/nodes/<id>/adopt``, ``/assign``, ``/power``) need ``Authorization: Bearer
<[master] token>``, compared in constant time; with no token set they are refused.

These are small routes on serve's own ThreadingHTTPServer (its connection cap, timeouts
and stream slots hold for them too) rather than a web framework beside it: a dozen JSON
routes do not need one, and the static tree stays servable by any HTTP server.
"""

from __future__ import annotations

import hmac
import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rackboot.errors import RackbootError
from rackboot.initramfs.updater import formats
from rackboot.initramfs.updater.errors import UpdaterError

from . import hostnames, plans, rollout, signing, status
from .inventory import Adoption, Inventory

if TYPE_CHECKING:
    from rackboot.config import Config

MAX_BODY = 4096  # an action's JSON body
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

    @classmethod
    def open(cls, master: Path, config: Config | None = None, log: Any = None) -> Fleet:
        log = log or (lambda _line: None)
        fleet = cls(master, open_inventory(master, config, log), config, log)
        if config is not None:  # every report taken may move a rollout on; a restart continues it
            power = _power(config, log)
            fleet.inventory.hooks.append(lambda inv, _node: rollout.advance(config, inv, power=power, quick=True))
            rollout.advance(config, fleet.inventory, power=power)
        return fleet

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
            known = self.inventory.node(node)
            if known is None or not known.adopted:
                return None
        default = directory / f"default{suffix}"
        return default if default.is_file() else None

    def named_default(self, node: str, default: Path, suffix: str) -> Reply | None:
        """With a [master] hostname pattern, the default plan as ``node``'s own, carrying the
        name the pattern gives it (hostnames.assign: kept, never reused), signed here with the
        master key: a node that follows the default plan is named too. Deterministic (Ed25519
        signatures are), so the .sig fetched next matches. None: serve the file as it is."""
        cfg = self.config
        if cfg is None or not cfg.master.hostname or not _is_node(node) or default.name != f"default{suffix}":
            return None
        try:
            plan = formats.parse_plan((default.parent / "default.json").read_bytes())
            name = hostnames.assign(self.master, node, hostname=None, pattern=cfg.master.hostname)
            data = formats.dump(replace(plan, node=node, hostname=name))
            if suffix == ".json.sig":
                if not cfg.master.key:
                    return None
                data = signing.sign(cfg.master.key, data)
        except (OSError, UpdaterError, RackbootError) as e:
            self.log(f"plans: default plan not named for {node}: {e}")
            return None  # the default plan as it is: the node boots, unnamed
        return Reply(HTTPStatus.OK, data, "application/octet-stream" if suffix == ".json.sig" else "application/json")

    def saw_plan_request(self, node: str, ip: str, serial: str | None, served: Path | None) -> None:
        """Record a plan request; an inventory that fails is logged, the plan still goes out."""
        if not _is_node(node):
            return
        try:
            self._record_plan_request(node, ip, serial, served)
        except (sqlite3.Error, RackbootError) as e:
            self.log(f"inventory: plan request of {node} not recorded: {e}")

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
            adopt=not self.manual,
        )

    # --- GET ---------------------------------------------------------------------------------------

    def get(self, path: str) -> Reply:
        try:
            return self._get(path)
        except sqlite3.Error as e:  # busy past its timeout, or a disk gone bad: say so, keep serving
            self.log(f"inventory: GET {path[:200]}: {e}")
            return _json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": f"inventory: {e}"})

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
        if len(parts) != 5 or parts[:3] != ["", "api", "nodes"] or parts[4] not in ("adopt", "assign", "power"):
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
        if action == "assign":
            if image is None:
                raise RackbootError("assign needs an image")
            path = plans.assign(self.config, node=node, image=image, version=version)
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


def open_inventory(master: Path, config: Config | None, log: Any = None) -> Inventory:
    """The master's inventory, pinning keys as [master] adopt says (auto: on first use)."""
    return Inventory(master, log=log, trust_first_key=config is None or config.master.adopt == "auto")


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
        plans.assign(cfg, node=node, image=image, version=version)
    elif version is not None:
        raise RackbootError("--version needs --image")
    return inventory.adopt(node, replace_key=replace_key)


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
