"""Expert names: validated once, used as keys everywhere (files, modules, API, report)."""

from __future__ import annotations

import re

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_expert_name(name: object) -> str:
    """Return ``name`` if it is a safe expert name, else raise.

    A name becomes a directory (``experts/<name>/``), a model id in the HTTP API and a report
    key, so it is limited to letters, digits, ``_``, ``.`` and ``-`` (no path separators, no
    leading dot), 1-64 characters.

    Raises:
        TypeError: if ``name`` is not a string.
        ValueError: naming the offending value and the allowed characters.
    """
    if not isinstance(name, str):
        raise TypeError(f"expert name must be a string, got {type(name).__name__} ({name!r}).")
    if not _NAME.match(name):
        raise ValueError(
            f"invalid expert name {name!r}: use 1-64 letters, digits, `_`, `.` or `-`, starting with a "
            "letter or digit (no `/`, spaces or leading dot)."
        )
    return name


def safe_key(name: str) -> str:
    """Map an expert name to a key that `nn.ModuleDict` and PEFT adapter names accept (no `.`)."""
    return name.replace("-", "-2d").replace(".", "-2e")
