"""The README and docs/ promise only what exists: their commands, files, links, variables,
metrics and runbooks are checked against the code, and nothing points outside the repository."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from service.cli_args import parser
from service.config import known_variables
from service.metrics import Metrics
from testbed.support import ROOT

README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS, ROOT / "examples" / "README.md", ROOT / "CHANGELOG.md"]
_FENCE = re.compile(r"```(\w*)\n(.*?)```", re.S)
_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _commands(page: Path) -> list[list[str]]:
    """Every shell command in the page's sh/console blocks (prompts and comments dropped)."""
    found = []
    for language, block in _FENCE.findall(page.read_text()):
        if language not in ("sh", "console"):
            continue
        for line in block.splitlines():
            if language == "console":
                if not line.startswith("$ "):
                    continue
                line = line[2:]
            tokens = shlex.split(line, comments=True)
            if tokens:
                found.append(tokens)
    return found


def _make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([a-z][\w-]*):", text, re.M))


def _anchor(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {_anchor(h) for h in re.findall(r"^#+ (.+)$", page.read_text(), re.M)}


def test_readme_is_short() -> None:
    """The README stays a page people read: under 250 lines."""
    assert len(README.read_text().splitlines()) < 250


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_command_in_the_page_exists(page: Path) -> None:
    """make targets exist, courier command lines parse, and the files they name are there."""
    targets = _make_targets()
    for tokens in _commands(page):
        program = tokens[0].removeprefix(".venv/bin/")
        if program == "make":
            assert set(tokens[1:]) <= targets, tokens
        elif program == "courier":
            try:
                args = parser().parse_args(tokens[1:])
            except SystemExit:
                pytest.fail(f"{page.name}: `{shlex.join(tokens)}` does not parse")
            path = getattr(args, "file", None)
            if path and path != "-" and not path.startswith(("request", "your")):
                assert (ROOT / path).is_file(), f"{page.name}: {path} does not exist"
        elif program == "kubectl" and tokens[1] in ("kustomize", "apply"):
            assert (ROOT / tokens[-1] / "kustomization.yaml").is_file(), tokens


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_resolves_inside_the_repository(page: Path) -> None:
    """Relative links name files that exist, and anchors name headings that exist."""
    for target in _LINK.findall(page.read_text()):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.exists(), f"{page.name}: {target}"
        assert ROOT in resolved.parents or resolved == ROOT, f"{page.name}: {target}"
        if anchor and resolved.suffix == ".md":
            assert anchor in _anchors(resolved), f"{page.name}: {target}"


def test_nothing_points_outside_the_repository() -> None:
    """No page, example, deploy file or script refers to documents that are not here."""
    texts = [*PAGES, *(ROOT / "deploy").rglob("*.yaml"), *(ROOT / "scripts").glob("*.py")]
    texts += [ROOT / "service" / name for name in ("cli.py", "cli_args.py", "watch.py")]
    for path in texts:
        text = path.read_text()
        for pattern in (r"\bCONTRACT\b", r"\bARCHITECTURE\b", r"\.\./shared", r"\bissue \d+"):
            assert not re.search(pattern, text), f"{path.relative_to(ROOT)}: {pattern}"


def test_every_variable_is_in_the_readme() -> None:
    """Each variable the settings read is in the README's Configuration."""
    text = README.read_text()
    names = {name for name in known_variables() if not name.endswith("_FILE")}
    names -= {"AWS_REGION", "AWS_DEFAULT_REGION"}  # the AWS chain's own, under AWS_*
    missing = sorted(name for name in names if f"`{name}`" not in text)
    assert not missing


def test_every_metric_is_documented_and_every_documented_one_exists() -> None:
    """docs/operating.md's metric table and the exported metrics are the same set."""
    exported = {
        metric.name + ("_total" if metric.type == "counter" else "")
        for metric in Metrics().registry.collect()
        if metric.name.startswith("courier_")
    }
    exported = {"courier_build_info" if n == "courier_build" else n for n in exported}
    table = (ROOT / "docs" / "operating.md").read_text()
    documented = set(re.findall(r"^\| `(courier_\w+)`", table, re.M))
    assert documented == exported


def test_every_alert_has_its_runbook() -> None:
    """Each alert's runbook_url names a heading of docs/operating.md that says what to do."""
    rules = yaml.safe_load((ROOT / "deploy" / "base" / "prometheusrule.yaml").read_text())
    anchors = _anchors(ROOT / "docs" / "operating.md")
    page = (ROOT / "docs" / "operating.md").read_text()
    for rule in rules["spec"]["groups"][0]["rules"]:
        path, _, anchor = rule["annotations"]["runbook_url"].partition("#")
        assert path == "docs/operating.md" and anchor in anchors, rule["alert"]
        section = page.split(f"### {rule['alert']}\n", 1)[1].split("\n### ", 1)[0]
        assert "**What to do:**" in section, rule["alert"]


def test_the_readme_keeps_a_place_for_the_flake_report() -> None:
    """Development keeps the heading that `make flake`'s report goes under."""
    text = README.read_text()
    assert "### Flake report" in text.split("## Development", 1)[1]
