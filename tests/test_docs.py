"""The project's documents hold together: every docs/design.md section the code cites exists, no text
cites a design file the repository does not hold, and the README's and docs' relative links resolve."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [p for d in ("ettin_export", "runtimes", "plugins", "scripts", "tests") for p in (ROOT / d).rglob("*.py")]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _headings(path: Path) -> set[str]:
    return {line.lstrip("#").strip() for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("#")}


def test_design_citations_name_existing_sections():
    headings = _headings(ROOT / "docs" / "design.md")
    cited = []
    for path in SOURCES:
        text = path.read_text(encoding="utf-8")
        if path != Path(__file__).resolve():
            assert "DESIGN" + ".md" not in text, f"{path} cites a design file the repository lacks"
        for match in re.finditer(r'docs/design\.md(?:\'s)?,? \(?"([^"]+)"', text):
            cited.append((path.name, match.group(1)))
    assert cited, "no citation found: the pattern no longer matches the code's citations"
    missing = [(name, section) for name, section in cited if section not in headings]
    assert not missing, f"cited sections docs/design.md lacks: {missing}"


def test_relative_links_resolve():
    broken = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text(encoding="utf-8")):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (doc.parent / target).exists():
                broken.append((doc.name, target))
    assert not broken, broken
