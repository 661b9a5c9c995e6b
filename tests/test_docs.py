"""The README stays a two-minute read that starts with the two commands, and no link in it or in docs/ is broken."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from core.paths import PROJECT_ROOT

pytestmark = pytest.mark.unit

README = PROJECT_ROOT / "README.md"
DOCS = PROJECT_ROOT / "docs"
MAX_README_LINES = 150
TOP_LINES = 10  # where a newcomer looks first
FENCED = re.compile(r"^[ \t]*(```|~~~).*?^[ \t]*\1", re.DOTALL | re.MULTILINE)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, https:, mailto:
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*$", re.MULTILINE)


def pages() -> list[Path]:
    """The README and every page of docs/."""
    return [README, *sorted(DOCS.glob("*.md"))]


def link_targets(markdown: str) -> list[str]:
    """The targets of the Markdown links and images in `markdown`, code blocks and code spans left out."""
    prose = INLINE_CODE.sub("", FENCED.sub("", markdown))
    return LINK.findall(prose)


def anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of `markdown`: lower case, punctuation dropped, spaces as hyphens."""
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
            for heading in HEADING.findall(FENCED.sub("", markdown))}


def broken_links(page: Path) -> list[str]:
    """The relative links of `page` that name no file or folder of the repository, or no heading of a Markdown page."""
    text = page.read_text(encoding="utf-8")
    broken = []
    for target in link_targets(text):
        path, _, anchor = target.partition("#")
        if EXTERNAL.match(target):
            continue
        found = page.parent / path if path else page
        if not found.exists():
            broken.append(target)
        elif anchor and found.suffix == ".md" and anchor not in anchors(found.read_text(encoding="utf-8")):
            broken.append(target)
    return broken


def test_link_targets_skip_code_and_find_links_and_images() -> None:
    text = 'See [docs](docs/a.md#x), ![shot](b.png "t") and `[not](c.md)`.\n```\n[nor](d.md)\n```\n[web](https://x.org)\n'
    assert link_targets(text) == ["docs/a.md#x", "b.png", "https://x.org"]


def test_a_missing_file_or_heading_is_reported(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    (tmp_path / "here.md").write_text("# Top: the `first` one\n```\n# not a heading\n```\n")
    page.write_text("# Mine\n[ok](here.md#top-the-first-one) [gone](gone.md) [web](https://example.org/gone.md) "
                    "[own](#mine) [no heading](here.md#not-a-heading) [not own](#top)\n")
    assert broken_links(page) == ["gone.md", "here.md#not-a-heading", "#top"]


def test_the_readme_is_short_and_starts_with_the_two_commands() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines: move detail into docs/"
    top = "\n".join(lines[:TOP_LINES])
    assert "make demo" in top and "make test" in top


@pytest.mark.parametrize("page", pages(), ids=lambda page: page.relative_to(PROJECT_ROOT).as_posix())
def test_every_relative_link_resolves(page: Path) -> None:
    assert broken_links(page) == []


def test_the_readme_links_every_docs_page() -> None:
    linked = {(README.parent / target.split("#", 1)[0]).resolve() for target in link_targets(README.read_text())}
    assert [page.name for page in sorted(DOCS.glob("*.md")) if page.resolve() not in linked] == []
