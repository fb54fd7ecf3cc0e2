"""Strict local fakes of the destination APIs (Inconvo, Mindset) for the tests."""

from testbed.fakes._server import FailureRule, FakeServer, RecordedRequest
from testbed.fakes.inconvo import DeletedDataset, FakeInconvo, ReceivedUpload
from testbed.fakes.mindset import (
    DeletedFile,
    FakeMindset,
    FileRead,
    IngestionRule,
    ReceivedIngest,
)

__all__ = [
    "DeletedDataset",
    "DeletedFile",
    "FailureRule",
    "FakeInconvo",
    "FakeMindset",
    "FakeServer",
    "FileRead",
    "IngestionRule",
    "ReceivedIngest",
    "ReceivedUpload",
    "RecordedRequest",
]
