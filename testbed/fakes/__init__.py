"""Strict local fakes of the destination APIs (Inconvo, Mindset) for the tests."""

from testbed.fakes._server import FailureRule, FakeServer, RecordedRequest
from testbed.fakes.inconvo import DeletedDataset, FakeInconvo, ReceivedUpload
from testbed.fakes.mindset import FakeMindset, ReceivedIngest

__all__ = [
    "DeletedDataset",
    "FailureRule",
    "FakeInconvo",
    "FakeMindset",
    "FakeServer",
    "ReceivedIngest",
    "ReceivedUpload",
    "RecordedRequest",
]
