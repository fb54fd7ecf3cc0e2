"""Rewrite schemas/*.schema.json from the models (``make schemas``)."""

from __future__ import annotations

from pathlib import Path

import orjson

from service.contracts import json_schemas

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"


def rendered() -> dict[str, bytes]:
    """The checked-in form of each schema, by file name."""
    return {
        f"{name}.schema.json": orjson.dumps(
            schema, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS
        )
        + b"\n"
        for name, schema in json_schemas().items()
    }


if __name__ == "__main__":
    for file_name, content in rendered().items():
        (SCHEMA_DIR / file_name).write_bytes(content)
        print(f"wrote schemas/{file_name}")
