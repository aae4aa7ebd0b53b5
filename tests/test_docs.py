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
