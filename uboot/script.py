"""Boot scripts rendered from the Jinja2 templates in uboot/templates/."""

from __future__ import annotations

from rackboot import templates


def render(template: str, **context: object) -> str:
    text = templates.render(__package__, template, **context)
    # The comments are for people reading the templates: U-Boot's hush parser trips on
    # quotes inside them, and blank lines and trailing spaces only cost bytes.
    lines = (line.rstrip() for line in text.splitlines())
    return "\n".join(line for line in lines if line.strip() and not line.lstrip().startswith("#")) + "\n"


def template_hash(template: str) -> str:
    return templates.source_hash(__package__, template)
