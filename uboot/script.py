"""Boot scripts rendered from the Jinja2 templates in uboot/templates/."""

from __future__ import annotations

from importlib import resources

import jinja2

from rackboot import __version__
from rackboot.errors import RackbootError


def _env() -> jinja2.Environment:
    loader = jinja2.FunctionLoader(lambda name: resources.files(__package__).joinpath("templates", name).read_text())
    # StrictUndefined: a variable the caller forgot is an error, never an empty string in a boot script
    return jinja2.Environment(loader=loader, undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                              autoescape=False)


def render(template: str, **context) -> str:
    try:
        text = _env().get_template(template).render(version=__version__, **context)
    except jinja2.TemplateError as exc:
        raise RackbootError(f"boot script template {template}: {exc}") from None
    # U-Boot's hush parser is happiest without blank lines and trailing spaces
    return "\n".join(line.rstrip() for line in text.splitlines() if line.strip()) + "\n"


def template_source(template: str) -> str:
    """The raw template text: part of the rebuild key of the script it renders."""
    return resources.files(__package__).joinpath("templates", template).read_text()
