"""The documentation stays true: every test it names exists, and every file it links to is there."""

import ast
import re

from helpers import REPO_ROOT

DOCUMENTS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]


def defined_tests() -> set[str]:
    return {
        node.name
        for path in (REPO_ROOT / "tests").glob("test_*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")
    }


def test_every_test_the_documentation_names_exists():
    existing = defined_tests()
    for document in DOCUMENTS:
        named = set(re.findall(r"`(test_[a-z0-9_]+)`", document.read_text()))
        assert named <= existing, f"{document.name} names tests that do not exist: {sorted(named - existing)}"
    assert len(re.findall(r"`test_", (REPO_ROOT / "docs" / "architecture.md").read_text())) >= 20


def test_every_file_the_documentation_links_to_exists():
    for document in DOCUMENTS:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", document.read_text()):
            assert (document.parent / target).exists(), f"{document.name} links to {target}, which is missing"
