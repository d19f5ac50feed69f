"""A small TOML writer for job.resolved.toml (tables, arrays of tables, scalars, lists)."""

from __future__ import annotations

import json
from typing import Any


def dumps(data: dict[str, Any]) -> str:
    """TOML text of a job dict; None values are left out (TOML has no null)."""
    lines: list[str] = []
    _write_table(lines, data, prefix="")
    return "\n".join(lines).strip() + "\n"


def _write_table(lines: list[str], table: dict[str, Any], prefix: str) -> None:
    """Scalars first, then sub-tables, then arrays of tables, as TOML requires."""
    nested, arrays = [], []
    for key, value in table.items():
        if value is None:
            continue
        if isinstance(value, dict) and not _is_inline(value):
            nested.append((key, value))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            arrays.append((key, value))
        else:
            lines.append(f"{_key(key)} = {toml_value(value)}")
    for key, value in nested:
        name = f"{prefix}{_key(key)}"
        lines.extend(["", f"[{name}]"])
        _write_table(lines, value, prefix=f"{name}.")
    for key, items in arrays:
        name = f"{prefix}{_key(key)}"
        for item in items:
            lines.extend(["", f"[[{name}]]"])
            _write_table(lines, item, prefix=f"{name}.")


def _is_inline(value: dict) -> bool:
    """Empty dicts are written inline; others as tables."""
    return not value


def _key(key: str) -> str:
    """Bare keys where TOML allows them, quoted otherwise."""
    bare = key and all(c.isalnum() or c in "_-" for c in key)
    return key if bare else json.dumps(key)


def toml_value(value: Any) -> str:
    """A TOML literal; JSON string escaping is valid TOML basic-string escaping."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value if v is not None) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")
