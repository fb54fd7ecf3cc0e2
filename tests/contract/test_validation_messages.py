"""invalid_request messages in the request's own words: paths as written, rules as the docs
state them, "did you mean" for an unknown field, and no pydantic vocabulary or values."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from service.errors import CourierError, ErrorCode
from service.messages import parse_request

URL = {"url": "https://files.example.com/a.csv"}
INCONVO = {"type": "inconvo", "userIdentifier": "u"}
MINDSET = {"type": "mindset", "appUid": "app", "contextUid": "ctx"}
PYDANTIC_WORDS = ("Input should", "Value error", "Extra inputs", "discriminator", "String should")


def _message(document: dict[str, Any]) -> str:
    with pytest.raises(CourierError) as info:
        parse_request(orjson.dumps(document), 1 << 20)
    assert info.value.code is ErrorCode.INVALID_REQUEST
    return info.value.message


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (
            {"source": URL, "destination": {"type": "inconvo", "userId": "u"}},
            "destination.userId: unknown field; did you mean userIdentifier?",
        ),
        (
            {"source": {**URL, "filename": "a.csv"}, "destination": INCONVO},
            "source.filename: unknown field; did you mean fileName?",
        ),
        (
            {"Source": URL, "source": URL, "destination": INCONVO},
            "Source: unknown field; did you mean source?",
        ),
        (
            {"source": URL, "destination": {**INCONVO, "appUid": "a"}},
            "destination.appUid: unknown field for an inconvo destination (it is a mindset field)",
        ),
        (
            {"source": URL, "destination": {"type": "dropbox"}},
            "destination.type: must be 'inconvo' or 'mindset'",
        ),
        ({"source": URL, "destination": {}}, "destination.type: must be 'inconvo' or 'mindset'"),
        (
            {"source": {"url": "x"}, "destination": {"type": "inconvo"}},
            "destination: give exactly one scope: userIdentifier, or contextKey + contextValue",
        ),
        ({"destination": INCONVO}, "source: missing (required)"),
        (
            {"source": URL, "destination": {**INCONVO, "userIdentifier": "u u"}},
            "destination.userIdentifier: must be 1-256 characters of letters, digits and _ . @ -",
        ),
        (
            {"source": URL, "destination": {**MINDSET, "delivery": "email"}},
            "destination.delivery: must be 'auto', 'sourceUrl' or 'documentContent'",
        ),
        (
            {"source": URL, "destination": {**MINDSET, "autoPublish": "yes"}},
            "destination.autoPublish: must be true or false",
        ),
        (
            {"source": URL, "destination": {**MINDSET, "appUid": ""}},
            "destination.appUid: must not be empty",
        ),
        (
            {"id": "x" * 201, "source": URL, "destination": INCONVO},
            "id: must have at most 200 characters",
        ),
        ({"source": {"url": 7}, "destination": INCONVO}, "source.url: must be a string"),
        (
            {"source": URL, "destination": INCONVO, "metadata": {"k": 1}},
            "metadata.k: must be a string",
        ),
    ],
)
def test_messages_speak_the_request(document: dict[str, Any], message: str) -> None:
    """Each problem named where the producer wrote it."""
    text = _message(document)
    assert text == message
    assert not any(word in text for word in PYDANTIC_WORDS)


def test_many_problems_are_counted_and_no_value_is_repeated() -> None:
    """Three problems spelled out, the rest counted; a URL's password never shows."""
    document = {
        "source": {"url": "https://user:hunter2@files.example.com/a.csv", "a": 1, "b": 2},
        "destination": {**MINDSET, "c": 3, "d": 4},
    }
    text = _message(document)
    assert text.endswith("(and 1 more)") and text.count("unknown field") == 3
    assert "hunter2" not in text
