"""The documentation holds together: README stays a front page, every relative link resolves, and
the "Writing a plugin" example of docs/enrichment.md is real code (written out, loaded, its own
test run)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Iterator, List, Set, Tuple

from tq_mw_thehive.enrichment.registry import Registry

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
ENRICHMENT = DOCS / "enrichment.md"
FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.S | re.M)
INLINE_CODE = re.compile(r"(`+)(?!`).+?(?<!`)\1(?!`)", re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def python_blocks() -> dict:
    """docs/enrichment.md's python code blocks, keyed by the file name in their first comment line."""
    blocks = {}
    for block in re.findall(r"```python\n(.*?)```", ENRICHMENT.read_text(encoding="utf-8"), re.S):
        first = block.splitlines()[0]
        if first.startswith("# "):
            blocks[first[2:].strip()] = block
    return blocks


def test_the_example_plugin_loads_and_its_test_passes(tmp_path):
    blocks = python_blocks()
    plugin_dir = tmp_path / "my_plugins"
    plugin_dir.mkdir()
    for name in ("my_plugins/blocklist.py", "my_plugins/test_blocklist.py"):
        (tmp_path / name).write_text(blocks[name], encoding="utf-8")
    registry = Registry.discover([str(plugin_dir)], entry_points=False)
    info = registry.get("blocklist")
    assert info is not None and info.error is None and info.data_types == ("domain", "fqdn")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             str(plugin_dir / "test_blocklist.py")], cwd=plugin_dir, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout


# --- links ------------------------------------------------------------------------------------------

def markdown_files() -> List[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def prose(text: str) -> str:
    """The text without code: fenced blocks and inline code spans hold no links."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, code marks and punctuation dropped, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> Set[str]:
    """Every anchor a markdown file offers (its headings outside code blocks; repeats get -1, -2…)."""
    found: Set[str] = set()
    for line in FENCE.sub("", path.read_text(encoding="utf-8")).splitlines():
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            name, n = base, 0
            while name in found:
                n += 1
                name = f"{base}-{n}"
            found.add(name)
    return found


def relative_links(path: Path) -> Iterator[Tuple[str, Path, str]]:
    """(link as written, the file it points at, its anchor or '') for each relative link in a file."""
    for target in LINK.findall(prose(path.read_text(encoding="utf-8"))):
        if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("//"):
            continue  # https:, mailto:, …: not a file here
        file_part, _, anchor = target.partition("#")
        yield target, (path.parent / file_part).resolve() if file_part else path, anchor


def broken_links(files: List[Path], root: Path = ROOT) -> List[str]:
    broken = []
    for path in files:
        for target, points_at, anchor in relative_links(path):
            where = f"{path.relative_to(root)}: ({target})"
            if not points_at.exists():
                broken.append(f"{where}: no file {points_at}")
            elif anchor and points_at.suffix == ".md" and anchor not in anchors(points_at):
                broken.append(f"{where}: no heading #{anchor} in {points_at.name}")
    return broken


def test_every_relative_link_in_readme_and_docs_resolves():
    files = markdown_files()
    assert len(files) >= 9 and sum(1 for path in files for _ in relative_links(path)) >= 50, \
        "too few links found: is the link scan still reading the pages?"
    assert broken_links(files) == []


def test_the_link_check_catches_a_missing_file_and_a_missing_heading(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other\n\n## A `code` heading: yes\n\n```sh\n# not a heading\n```\n")
    page.write_text("[ok](other.md) [ok](other.md#a-code-heading-yes) [ok](#page) [web](https://x.org/y.md)\n"
                    "`[in code](gone.md)`\n\n```\n[in a block](gone.md)\n```\n\n# Page\n\n"
                    "[bad](gone.md) [bad](other.md#not-a-heading) [bad](#nowhere)\n")
    assert broken_links([page], root=tmp_path) == [
        f"page.md: (gone.md): no file {tmp_path / 'gone.md'}",
        "page.md: (other.md#not-a-heading): no heading #not-a-heading in other.md",
        "page.md: (#nowhere): no heading #nowhere in page.md",
    ]


# --- README as a front page -------------------------------------------------------------------------

def test_readme_is_a_front_page_that_links_every_docs_page():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) < 250, "README is a front page: move detail to docs/"
    linked = {points_at for _, points_at, _ in relative_links(README)}
    assert [p.name for p in sorted(DOCS.glob("*.md")) if p.resolve() not in linked] == []
    assert (ROOT / "ARCHITECTURE.md").resolve() in linked
