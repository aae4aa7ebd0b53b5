"""The docs point at things that exist: tests named in reliability.md, pages in the index."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_every_test_named_in_reliability_md_exists():
    text = (ROOT / "docs" / "reliability.md").read_text()
    refs = re.findall(r"`(tests/test_\w+\.py)(?:::(\w+))?", text)
    assert len(refs) > 15
    for path, name in refs:
        source = (ROOT / path).read_text()
        if name:
            assert f"def {name}(" in source, f"{path}::{name} is named in reliability.md"


def test_docs_index_links_resolve():
    index = (ROOT / "docs" / "index.md").read_text()
    for target in re.findall(r"\]\(([\w.]+\.md)\)", index):
        assert (ROOT / "docs" / target).is_file(), target


def test_every_docs_link_resolves():
    # docs/presets.md once pointed at a docs/freeze.md that never existed.
    for page in (ROOT / "docs").glob("*.md"):
        for target in re.findall(r"\]\(([\w./-]+\.md)(?:#[\w-]+)?\)", page.read_text()):
            if target.startswith("http"):
                continue
            assert (page.parent / target).resolve().is_file(), f"{page.name} links to {target}"
    readme = (ROOT / "README.md").read_text()
    for target in re.findall(r"\]\(([\w./-]+\.md)\)", readme):
        assert (ROOT / target).is_file(), f"README.md links to {target}"


def test_feature_sections_name_existing_doc_pages():
    from forge.config import FEATURE_SECTIONS
    from forge.config.docs import DOC_PAGES

    assert set(DOC_PAGES) == set(FEATURE_SECTIONS)
    for page in DOC_PAGES.values():
        assert (ROOT / page).is_file(), page
