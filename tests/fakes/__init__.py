"""Strict local fakes of the destination APIs (Inconvo, Mindset) for the tests."""

from tests.fakes._server import FakeServer, RecordedRequest
from tests.fakes.inconvo import FakeInconvo, ReceivedUpload
from tests.fakes.mindset import FakeMindset, ReceivedIngest

__all__ = [
    "FakeInconvo",
    "FakeMindset",
    "FakeServer",
    "ReceivedIngest",
    "ReceivedUpload",
    "RecordedRequest",
]
