"""Every link and repository path that README.md and docs/*.md cite exists.

Modules move (issue 20 moved a dozen); a page that still names the old place sends the next
engineer to a file that is not there. Checked: Markdown links and images (and their #anchors
against the target's headings), backticked repository paths (`pipeline/graph.py`, `tests/...`),
and backticked dotted names of the repository's own code (`pipeline.kinds.kind_of`), which must
name a module, or a def, class or assignment in one. Text only: nothing is imported.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[2]
PAGES = [PROJECT / "README.md", *sorted((PROJECT / "docs").glob("*.md"))]
PACKAGES = ("components", "pipeline", "detector", "dags", "benchmarks", "tests", "docker", "docs")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
CODE = re.compile(r"`([^`\n]+)`")
# paths a user or the pipeline makes, never committed
MADE_LATER = {"docker/.env"}


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {_slug(m.group(1)) for m in re.finditer(r"^#+\s+(.+)$", text, flags=re.M)}


def _prose(page: Path) -> str:
    """The page without its fenced blocks (commands and sample output, not references)."""
    return re.sub(r"```.*?```", "", page.read_text(), flags=re.S)


def _links(page: Path):
    for match in LINK.finditer(_prose(page)):
        target = match.group(1)
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        yield target


def _code_paths(page: Path):
    for match in CODE.finditer(_prose(page)):
        token = match.group(1).strip().rstrip(".,:;")
        if not token.startswith(tuple(p + "/" for p in PACKAGES)) or token in MADE_LATER:
            continue
        if re.search(r"[<>*…{}| ]", token):  # a pattern (runs/<run id>/), not one path
            continue
        yield token.split("::")[0]  # tests/x.py::test_y -> the file


def _code_names(page: Path):
    for match in CODE.finditer(_prose(page)):
        token = match.group(1).strip()
        if re.fullmatch(r"(components|pipeline|detector|dags|benchmarks)(\.\w+)+", token):
            yield token


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        base = PROJECT.joinpath(*parts[:cut])
        module = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
        if module.is_file():
            rest = parts[cut:]
            if not rest:
                return True
            # the first name after the module is defined there (a method's class is enough)
            return re.search(rf"^\s*(def|class)\s+{rest[0]}\b|^{rest[0]}\s*[:=]", module.read_text(),
                             flags=re.M) is not None
        if not base.is_dir():
            continue
    return False


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(PROJECT).as_posix())
def test_every_link_and_path_on_the_page_exists(page):
    missing = []
    for target in _links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            missing.append(f"link {target}")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            missing.append(f"anchor {target}")
    missing += [f"path {p}" for p in _code_paths(page) if not (PROJECT / p).exists()]
    missing += [f"name {n}" for n in _code_names(page) if not _resolves(n)]
    assert not missing, f"{page.name} cites what does not exist: {missing}"


def test_the_checks_catch_what_they_are_for(tmp_path, monkeypatch):
    """A moved module, a broken link, a wrong anchor and a gone function are each caught."""
    page = tmp_path / "page.md"
    page.write_text("# Title\n\nSee [x](missing.md), [t](#nope), `components/models.py`, "
                    "`pipeline.kinds.no_such_name` and `detector.networks.build`.\n"
                    "```\n`components/ignored_in_a_fence.py`\n```\n")
    assert list(_links(page)) == ["missing.md", "#nope"]
    assert list(_code_paths(page)) == ["components/models.py"]
    assert not (PROJECT / "components/models.py").exists()
    assert [_resolves(n) for n in _code_names(page)] == [False, True]
    assert "nope" not in _anchors(page) and "title" in _anchors(page)
