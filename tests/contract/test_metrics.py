"""The contract's metrics count what the decisions did, with the labels it names.

Sections 8 and 9: ``courier_ingestions_total{destination,outcome}``,
``courier_ingestion_seconds{destination}``, ``courier_tracked_files``,
``courier_tenant_requests_total{tenant,outcome}`` and ``courier_tenant_waiting{tenant}``,
a tenant named only when ``COURIER_TENANT_WEIGHTS`` names it (``other`` otherwise).
"""

from __future__ import annotations

from datetime import UTC, datetime

from service.errors import ErrorCode, PermanentError
from service.fair import Tenants
from service.instrument import Instruments
from service.messages import Envelope
from service.metrics import Metrics
from service.outcome import Ingestion, Outcome, PlatformFile
from service.settle import Finish, Follow, Ingested

STORED = PlatformFile("stored", "completed", {"file": {"name": "a.csv"}})
FAILED = PlatformFile("fail", "failed", {"uid": "f1"}, uid="f1", reason="no speech")
UPLOADED = Outcome(3.0, "inconvo", delivery="multipart", result={"file": {"name": "a.csv"}})
REJECTED = PermanentError(ErrorCode.DESTINATION_REJECTED, "no")


def rig() -> tuple[Instruments, Metrics]:
    metrics = Metrics()
    return Instruments(metrics, Tenants({"web": 4.0})), metrics


def test_outcomes_count_by_tenant_named_or_other() -> None:
    """A named tenant keeps its name; any other tenant is other; outcomes split."""
    instruments, metrics = rig()
    instruments.settled(Finish(UPLOADED, 1), Envelope(), "inconvo", "web", 0.01)
    failed = Outcome(1.0, "inconvo", error=REJECTED)
    for tenant in ("acme", "globex"):
        instruments.settled(Finish(failed, 1), Envelope(), "inconvo", tenant, 0.01)
    value = metrics.registry.get_sample_value
    assert value("courier_tenant_requests_total", {"tenant": "web", "outcome": "succeeded"}) == 1
    assert value("courier_tenant_requests_total", {"tenant": "other", "outcome": "failed"}) == 2
    assert value("courier_tenant_requests_total", {"tenant": "acme", "outcome": "failed"}) is None
    instruments.waiting("web", 3)
    instruments.waiting("acme", 2)
    instruments.waiting("acme", -1)
    assert value("courier_tenant_waiting", {"tenant": "web"}) == 3
    assert value("courier_tenant_waiting", {"tenant": "other"}) == 1


def test_ingestions_count_by_destination_and_outcome_with_their_wait() -> None:
    """An Inconvo upload's ingestion (final at once) and a Mindset file that failed after
    two minutes of following: counted by destination and outcome, their wait observed."""
    instruments, metrics = rig()
    stored = Ingestion("inconvo", STORED, 0.0, 0)
    instruments.settled(Finish(UPLOADED, 1, stored), Envelope(), "inconvo", "web", 0.01)
    error = PermanentError(ErrorCode.INGESTION_FAILED, "no speech")
    failed = Ingestion("mindset", FAILED, 120_000.0, 4, error)
    instruments.settled(Ingested(failed), Envelope(), "mindset", "web", 0.01)
    value = metrics.registry.get_sample_value
    completed = {"destination": "inconvo", "outcome": "completed"}
    assert value("courier_ingestions_total", completed) == 1
    assert value("courier_ingestions_total", {"destination": "mindset", "outcome": "failed"}) == 1
    assert value("courier_ingestion_seconds_count", {"destination": "inconvo"}) == 1
    assert value("courier_ingestion_seconds_sum", {"destination": "mindset"}) == 120.0
    assert value("courier_events_published_total", {"type": "courier.ingestion.failed"}) == 1


def test_tracked_files_rise_with_a_follow_and_fall_when_its_copy_returns() -> None:
    """A file parked to be read counts as tracked until its copy comes back; one that
    comes back and is parked again still counts once."""
    instruments, metrics = rig()
    mindset = Outcome(3.0, "mindset", delivery="sourceUrl")
    instruments.settled(Follow(10, {}, Finish(mindset, 1)), Envelope(), "mindset", "web", 0.1)
    tracked = metrics.registry.get_sample_value
    assert tracked("courier_tracked_files") == 1
    following = Envelope(follow_since=datetime(2026, 12, 4, tzinfo=UTC), checks=1)
    instruments.settled(Follow(60, {}), following, "mindset", "web", 0.1)
    assert tracked("courier_tracked_files") == 1
    done = Ingested(Ingestion("mindset", STORED, 5_000.0, 2))
    instruments.settled(done, following, "mindset", "web", 0.1)
    assert tracked("courier_tracked_files") == 0
    succeeded = {"destination": "mindset", "outcome": "succeeded"}
    assert metrics.registry.get_sample_value("courier_requests_total", succeeded) == 1
