"""The documentation holds together: every relative link and #anchor in README.md and docs/*.md leads somewhere, and
README.md stays a short guide with a picture."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
README_MAX_LINES = 200

FENCED_BLOCK = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]+`")
LINK = re.compile(r"(!?)\[[^\]]*\]\(\s*([^)\s]+)[^)]*\)")  # [text](target "title") and ![alt](target)
HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.+?)[ \t#]*$", re.MULTILINE)
EXTERNAL = ("http://", "https://", "mailto:")


def prose(markdown: str) -> str:
    """The page without its fenced code blocks, whose lines are neither headings nor links."""
    return FENCED_BLOCK.sub("", markdown)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text lowercased, punctuation but hyphens (and underscores, which GitHub
    keeps) removed, spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading shows its text
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    """Every heading's anchor; a repeated heading gets -1, -2, ... as on GitHub."""
    found, seen = set(), {}
    for heading in HEADING.findall(prose(markdown)):
        base = slug(heading)
        found.add(f"{base}-{seen[base]}" if base in seen else base)
        seen[base] = seen.get(base, 0) + 1
    return found


def links(markdown: str) -> list[tuple[bool, str]]:
    """(is an image, target) of every link outside code."""
    return [(bang == "!", target) for bang, target in LINK.findall(INLINE_CODE.sub("", prose(markdown)))]


def broken_links(page: Path) -> list[str]:
    """Each relative link of ``page`` whose file is missing, or whose #anchor is no heading of its target."""
    broken = []
    for _, target in links(page.read_text()):
        if target.startswith(EXTERNAL):
            continue
        path, _, anchor = unquote(target).partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{page.name}: {target}: no file {path}")
        elif anchor and anchor not in anchors(linked.read_text() if linked.suffix == ".md" else ""):
            broken.append(f"{page.name}: {target}: no heading #{anchor} in {linked.name}")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_relative_link_and_anchor_resolves(page):
    assert broken_links(page) == []


def test_a_broken_link_or_anchor_is_reported(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## Run: --resume, `--epochs`\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n\n## Twice\n\n## Twice\n\n```bash\n# not a heading: [nor a link](missing.md)\n```\n\n"
        "[ok](#twice-1) [ok](other.md#run---resume---epochs) [ok](https://example.com/gone) ![ok](other.md)\n"
        "[file](gone.md) [anchor](#twice-2) [other anchor](other.md#no-such-heading)\n"
    )
    assert broken_links(page) == [
        "page.md: gone.md: no file gone.md",
        "page.md: #twice-2: no heading #twice-2 in page.md",
        "page.md: other.md#no-such-heading: no heading #no-such-heading in other.md",
    ]


def test_the_readme_is_a_short_guide_with_a_picture_that_links_every_page_of_docs():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= README_MAX_LINES
    assert any(is_image for is_image, _ in links(readme))
    linked = {target.partition("#")[0] for _, target in links(readme)}
    assert {f"docs/{page.name}" for page in PAGES[1:]} <= linked
