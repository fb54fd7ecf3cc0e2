"""A rejected request explained in its own words: field paths as the producer wrote them,
rules as the docs state them, and "did you mean" for an unknown field.

Values are never repeated (a URL may hold a password): only where they are and what
is expected.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from service.contracts import (
    DESTINATIONS,
    DeleteRequest,
    InconvoDelete,
    InconvoDestination,
    MindsetDelete,
    MindsetDestination,
    SourceSpec,
    UploadRequest,
)
from service.contracts.request import CONTEXT_KEY_PATTERN, IDENT_PATTERN, TENANT_PATTERN

SHOWN = 3  # errors spelled out; the rest are counted
# Per operation: the request's model and its destinations' models.
_OPERATIONS: dict[str, tuple[type[BaseModel], dict[str, type[BaseModel]]]] = {
    "upload": (UploadRequest, {"inconvo": InconvoDestination, "mindset": MindsetDestination}),
    "delete": (DeleteRequest, {"inconvo": InconvoDelete, "mindset": MindsetDelete}),
}
_PATTERNS = {
    IDENT_PATTERN: "must be 1-256 characters of letters, digits and _ . @ -",
    CONTEXT_KEY_PATTERN: "must be 1-256 characters of letters, digits and _ . -",
    TENANT_PATTERN: "must be 1-64 characters of letters, digits and _ . : -",
}
_TYPES = {
    "string_type": "must be a string",
    "bool_type": "must be true or false",
    "int_type": "must be a whole number",
    "float_type": "must be a number",
    "dict_type": "must be an object",
    "model_type": "must be an object",
    "model_attributes_type": "must be an object",
    "list_type": "must be a list",
}
_TYPES_NOT_DESTINATION = " or ".join(f"'{name}'" for name in DESTINATIONS)


def describe(exc: ValidationError) -> str:
    """One line: the first few problems, each ``path: what is wrong``, and how many more."""
    errors = exc.errors(include_input=False, include_url=False)
    parts = [_one(error) for error in errors[:SHOWN]]
    more = len(errors) - len(parts)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def _one(error: ErrorDetails) -> str:
    loc = tuple(str(part) for part in error["loc"])
    kind, ctx = error["type"], error.get("ctx") or {}
    if not loc and kind == "union_tag_invalid":
        return "operation: must be 'upload' or 'delete'"
    operation = "upload"
    if loc and loc[0] in _OPERATIONS:  # pydantic's tag of the request's kind
        operation, loc = loc[0], loc[1:]
    shown = ".".join(_words(loc)) or "the request"
    if kind == "extra_forbidden":
        return f"{shown}: {_unknown(operation, loc)}"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        return f"{shown}.type: must be {_TYPES_NOT_DESTINATION}"
    return f"{shown}: {_rule(kind, ctx, error['msg'])}"


def _words(loc: tuple[str, ...]) -> list[str]:
    """The path as the request spells it: without pydantic's union tag."""
    if len(loc) > 1 and loc[0] == "destination" and loc[1] in DESTINATIONS:
        return [loc[0], *loc[2:]]
    return list(loc)


def _rule(kind: str, ctx: Mapping[str, Any], message: str) -> str:
    if kind == "missing":
        return "missing (required)"
    if kind in _TYPES:
        return _TYPES[kind]
    if kind == "string_too_short":
        least = ctx.get("min_length", 1)
        return "must not be empty" if least == 1 else f"must have at least {least} characters"
    if kind == "string_too_long":
        return f"must have at most {ctx.get('max_length')} characters"
    if kind == "too_long":
        return f"must have at most {ctx.get('max_length')} items"
    if kind == "string_pattern_mismatch":
        return _PATTERNS.get(str(ctx.get("pattern")), f"must match {ctx.get('pattern')}")
    if kind in ("literal_error", "enum"):
        return f"must be {ctx.get('expected')}"
    if kind == "value_error":
        return message.removeprefix("Value error, ")
    return message[:1].lower() + message[1:]


def _model_at(operation: str, loc: tuple[str, ...]) -> type[BaseModel] | None:
    """The model whose field the last element of ``loc`` is."""
    request, destinations = _OPERATIONS[operation]
    parents = loc[:-1]
    if parents == ():
        return request
    if parents == ("source",) and operation == "upload":
        return SourceSpec
    if len(parents) == 2 and parents[0] == "destination":
        return destinations.get(parents[1])
    return None


def _unknown(operation: str, loc: tuple[str, ...]) -> str:
    name = loc[-1]
    model = _model_at(operation, loc)
    if model is None:
        return "unknown field"
    known = list(model.model_fields)
    if operation == "delete" and loc == ("source",):
        return "a delete has no source"
    destinations = _OPERATIONS[operation][1]
    if model in destinations.values():
        kind = loc[1]
        if operation == "delete" and name in _OPERATIONS["upload"][1][kind].model_fields:
            return f"a {kind} delete takes no {name}"
        for other, other_model in destinations.items():
            if other != kind and name in other_model.model_fields and name not in known:
                article = "an" if kind[0] in "aeiou" else "a"
                return f"unknown field for {article} {kind} destination (it is a {other} field)"
    nearest = _nearest(name, known)
    return f"unknown field; did you mean {nearest}?" if nearest else "unknown field"


def _nearest(name: str, known: list[str]) -> str | None:
    lowered = {field.lower(): field for field in known}
    if name.lower() in lowered:
        return lowered[name.lower()]
    prefixed = [f for f in known if f.lower().startswith(name.lower()) and len(name) >= 3]
    if len(prefixed) == 1:
        return prefixed[0]
    close = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.6)
    return lowered[close[0]] if close else None
