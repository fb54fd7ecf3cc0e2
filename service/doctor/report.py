"""A doctor's report: checks with a verdict and, for a failure, the fix."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

Verdict = Literal["ok", "fail", "note", "skip"]


@dataclass(frozen=True, slots=True)
class Check:
    """One line of the report."""

    area: str
    verdict: Verdict
    detail: str
    fix: str | None = None


def passed(checks: list[Check]) -> bool:
    """Whether no check failed."""
    return all(check.verdict != "fail" for check in checks)


def render(checks: list[Check]) -> str:
    """The report as text: one line per check, then a verdict line."""
    lines = []
    for check in checks:
        line = f"{check.verdict.upper():<5} {check.area:<10} {check.detail}"
        if check.fix:
            line += f"; fix: {check.fix}"
        lines.append(line)
    failures = sum(check.verdict == "fail" for check in checks)
    lines.append(
        "all well" if not failures else f"{failures} problem{'s' if failures > 1 else ''} found"
    )
    return "\n".join(lines)


def as_json(checks: list[Check]) -> dict[str, Any]:
    """The report as printed by ``--json``."""
    return {"ok": passed(checks), "checks": [asdict(check) for check in checks]}
