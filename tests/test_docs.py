"""No dangling references: every markdown link and cited file exists, every `docs/method.md §N`
names a section of docs/method.md, and nothing cites the internal reference the method was
first written against (docs/method.md replaced it)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHOD = ROOT / "docs" / "method.md"
# Folders that hold no tracked text (.gitignore).
SKIPPED = {".git", ".venv", "runs", "build", "dist", "__pycache__", ".pytest_cache", ".ruff_cache"}
TEXT_SUFFIXES = {".py", ".md", ".toml", ".sh", ".txt", ".cfg", ".json", ".jsonl", ".csv"}
# Words that stand for a name in prose and usage lines (results/TABLE.md, models/NAME.py), not files.
PLACEHOLDERS = {"NAME", "TABLE", "STUDY", "VARIANT", "RUN", "CKPT"}

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
CITED_PATH = re.compile(
    r"(?<![\w/.{])((?:docs|results|benchmarks|scripts|tests|configs|src)/[\w./+-]*\w"
    r"\.(?:md|py|toml|jsonl|json|png|sh|csv|txt))(?!\w)"
)
SECTION_CITATION = re.compile(r"method\.md §(\d+(?:\.\d+)?)")
INTERNAL_REFERENCE = re.compile(r"\b" + "SP" + r"EC\b")  # spelled apart so this file does not cite it


def _files(suffixes: set[str]) -> list[Path]:
    found = []
    for folder, subfolders, names in os.walk(ROOT):
        subfolders[:] = [d for d in subfolders if d not in SKIPPED and not d.endswith(".egg-info")]
        found += [Path(folder, n) for n in names if Path(n).suffix in suffixes or n == "Makefile"]
    return sorted(found)


def _prose(text: str) -> str:
    """Markdown without its code blocks and code spans, where a bracket is not a link."""
    return re.sub(r"`[^`\n]*`", "", re.sub(r"```.*?```", "", text, flags=re.S))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.replace("`", "").strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    headings = re.findall(r"^#{1,6} (.+)$", re.sub(r"```.*?```", "", path.read_text(), flags=re.S), flags=re.M)
    return {slug(h) for h in headings}


def method_sections() -> set[str]:
    return set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", METHOD.read_text(), flags=re.M))


def dangling_links(path: Path) -> list[str]:
    bad = []
    for target in LINK.findall(_prose(path.read_text())):
        if re.match(r"[a-z]+:", target):  # https:, mailto: — not a file of the repository
            continue
        name, _, anchor = target.partition("#")
        linked = (path.parent / name).resolve() if name else path
        if not linked.exists():
            bad.append(target)
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            bad.append(target)
    return bad


def dangling_paths(path: Path) -> list[str]:
    bad = []
    for cited in CITED_PATH.findall(path.read_text()):
        if PLACEHOLDERS & set(re.split(r"[/._-]", cited)):
            continue
        if not (ROOT / cited).exists() and not (path.parent / cited).exists():
            bad.append(cited)
    return bad


def test_the_checks_can_fail(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "there.md").write_text("# A title\n\n## 2. The part\n")
    missing = "docs" + "/nothing-here.md"  # in two pieces, or this file would cite it
    page.write_text(
        "# Page\n[ok](there.md) [ok](there.md#2-the-part) [ok](#page) [web](https://example.org)\n"
        "[gone](missing.md) [no anchor](there.md#nowhere) `[code](not-a-link.md)`\n"
        f"see {missing} and results/TABLE.md\n"
    )
    assert dangling_links(page) == ["missing.md", "there.md#nowhere"]
    assert dangling_paths(page) == [missing]
    assert slug("6.1 Two sessions (`init_from`) for PTB's small") == "61-two-sessions-init_from-for-ptbs-small"


@pytest.mark.parametrize("path", _files({".md"}), ids=lambda p: str(p.relative_to(ROOT)))
def test_markdown_links_resolve(path):
    assert dangling_links(path) == []


def test_cited_repository_files_exist():
    bad = {str(p.relative_to(ROOT)): dangling_paths(p) for p in _files(TEXT_SUFFIXES - {".json", ".jsonl", ".csv"})}
    assert {p: b for p, b in bad.items() if b} == {}


def test_method_citations_name_a_section():
    sections = method_sections()
    assert {"1", "3", "6.1", "10"} <= sections
    cited = {}
    for path in _files(TEXT_SUFFIXES):
        for number in SECTION_CITATION.findall(path.read_text()):
            cited.setdefault(number, []).append(str(path.relative_to(ROOT)))
    assert len(cited) >= 5  # the code, configs and results cite it
    assert {n: where for n, where in cited.items() if n not in sections} == {}


def test_nothing_cites_the_internal_reference():
    hits = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in _files(TEXT_SUFFIXES)
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if INTERNAL_REFERENCE.search(line)
    ]
    assert hits == []
