"""Jinja2 templates shipped inside rackboot's packages (uboot/templates, firmware/templates)."""

from __future__ import annotations

import hashlib
from importlib import resources

from . import __version__
from .errors import RackbootError


def source(package: str, name: str) -> str:
    return resources.files(package).joinpath("templates", name).read_text()


def source_hash(package: str, name: str) -> str:
    """Part of the rebuild key of whatever the template renders."""
    return hashlib.sha256(source(package, name).encode()).hexdigest()


def render(package: str, name: str, **context: object) -> str:
    import jinja2  # here: a no-op `rackboot build` only hashes templates, and jinja2 is slow to import

    # StrictUndefined: a variable the caller forgot is an error, never an empty string
    env = jinja2.Environment(
        loader=jinja2.FunctionLoader(lambda n: source(package, n)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    try:
        return env.get_template(name).render(version=__version__, **context)
    except jinja2.TemplateError as exc:
        raise RackbootError(f"template {package}/{name}: {exc}") from None
