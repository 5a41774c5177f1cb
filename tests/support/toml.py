"""A config dict written as TOML, for the tests that reload a config file (tables nest by
name; strings, numbers, booleans and lists of them: all a CaseDesk config holds)."""

from __future__ import annotations

import json
from typing import Any


def to_toml(raw: dict[str, Any]) -> str:
    lines = []

    def table(prefix: str, values: dict[str, Any]) -> None:
        scalars = {k: v for k, v in values.items() if not isinstance(v, dict)}
        lines.append(f"[{prefix}]")
        for key, val in scalars.items():
            lines.append(f"{key} = {toml_value(val)}")
        for key, val in values.items():
            if isinstance(val, dict):
                table(f'{prefix}."{key}"', val)

    for key, val in raw.items():
        table(key, val)
    return "\n".join(lines) + "\n"


def toml_value(val: Any) -> str:
    if isinstance(val, bool):
        return "true" if val else "false"
    if isinstance(val, str):
        return json.dumps(val)  # a TOML basic string: JSON's escapes are TOML's
    if isinstance(val, list):
        return "[" + ", ".join(toml_value(v) for v in val) + "]"
    return repr(val)
