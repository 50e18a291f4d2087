"""The project's documents hold together: the README stays short, every docs/design.md section the code cites
exists, no text cites a design file the repository does not hold, and the README's and docs' relative links
(and their #anchors) resolve."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [p for d in ("ettin_export", "runtimes", "plugins", "scripts", "tests") for p in (ROOT / d).rglob("*.py")
           if p != Path(__file__).resolve()]  # this file names the old design file on purpose
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_LIMIT = 12_500  # bytes: what it is, install, test, quickstart, the table, links; the rest lives in docs/


def _headings(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)  # a "# comment" is no heading
    return {line.lstrip("#").strip() for line in text.splitlines() if re.match(r"#{1,6} ", line)}


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def test_the_readme_stays_short():
    size = len((ROOT / "README.md").read_bytes())
    assert size <= README_LIMIT, f"README.md is {size} bytes (limit {README_LIMIT}): move detail into docs/"


def test_design_citations_name_existing_sections():
    headings = _headings(ROOT / "docs" / "design.md")
    cited = []
    for path in SOURCES:
        text = path.read_text(encoding="utf-8")
        assert "DESIGN.md" not in text.replace("docs/design.md", ""), f"{path} cites a DESIGN.md the repository lacks"
        for match in re.finditer(r'docs/design\.md(?:\'s)?,? \(?"([^"]+)"', text):
            cited.append((path.name, match.group(1)))
    assert cited, "no citation found: the pattern no longer matches the code's citations"
    missing = [(name, section) for name, section in cited if section not in headings]
    assert not missing, f"cited sections docs/design.md lacks: {missing}"


def test_relative_links_resolve():
    broken = []
    for doc in DOCS:
        text = re.sub(r"```.*?```", "", doc.read_text(encoding="utf-8"), flags=re.S)
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", text):
            if "://" in target or target.startswith("mailto:"):
                continue
            path = (doc.parent / target).resolve() if target else doc
            if not path.exists():
                broken.append((doc.name, target))
            elif anchor and path.suffix == ".md" and anchor not in {_anchor(h) for h in _headings(path)}:
                broken.append((doc.name, f"{target}#{anchor}"))
    assert not broken, broken
