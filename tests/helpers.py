"""Helpers the test modules import as ``tests.helpers``: rackboot.toml files written into
tmp dirs, and a log callback that says nothing."""

from __future__ import annotations

import json
from pathlib import Path


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int)):
        return json.dumps(value)  # JSON strings and ints are valid TOML
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(value)


def write_config(directory: Path, *, arch: str = "arm64", updater: bool = False, **sections: dict) -> Path:
    """A rackboot.toml for qemu-virt with output and master under ``directory``; sections override."""
    doc = {
        "board": {"name": "qemu-virt", "arch": arch},
        "initramfs": {"updater": updater},
        "master": {"directory": "master"},
        "output": {"directory": "build"},
    }
    for name, values in sections.items():
        doc.setdefault(name, {}).update(values)
    text = "".join(
        f"[{name}]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in values.items()) for name, values in doc.items()
    )
    path = directory / "rackboot.toml"
    path.write_text(text)
    return path


def quiet(_line: str) -> None:
    pass
