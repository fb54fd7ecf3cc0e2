"""Rewrite schemas/*.schema.json and schemas/asyncapi.json from the models (``make schemas``)."""

from __future__ import annotations

from pathlib import Path

import orjson

from service.asyncapi import default_document
from service.contracts import json_schemas

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"
ASYNCAPI_FILE = "asyncapi.json"


def rendered() -> dict[str, bytes]:
    """The checked-in form of each schema, by file name."""
    return {
        f"{name}.schema.json": orjson.dumps(
            schema, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS
        )
        + b"\n"
        for name, schema in json_schemas().items()
    }


def rendered_asyncapi() -> bytes:
    """The checked-in AsyncAPI document: the default names, keys in the document's own order."""
    return orjson.dumps(default_document(), option=orjson.OPT_INDENT_2) + b"\n"


if __name__ == "__main__":
    for file_name, content in {**rendered(), ASYNCAPI_FILE: rendered_asyncapi()}.items():
        (SCHEMA_DIR / file_name).write_bytes(content)
        print(f"wrote schemas/{file_name}")
