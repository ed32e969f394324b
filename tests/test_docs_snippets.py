"""Docs: the Python code blocks of the documentation pages run, so the docs stay true to the API.

Every fenced block tagged ``python`` in ``docs/**/*.md`` runs, in page order, in one
namespace per page (later blocks may use names from earlier ones), inside a temporary
working directory. A block directly preceded by a ``<!-- skip -->`` comment (or
``<!-- skip: reason -->``) is not run; use it only where running is impossible here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

DOCS = Path(__file__).resolve().parents[1] / "docs"

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^\n`]*)$")
_SKIP = re.compile(r"^<!--\s*skip(\s*:.*)?\s*-->$")


@dataclass(frozen=True)
class Block:
    """One fenced code block of a Markdown page."""

    page: Path
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    skipped: bool


def extract_blocks(page: Path) -> list[Block]:
    """Fenced code blocks of ``page`` in order, with their language and skip marker."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        indent, fence = opening.group("indent"), opening.group("fence")
        language = opening.group("info").strip().split(" ")[0].lstrip(".").lower()
        previous = next((line.strip() for line in reversed(lines[:i]) if line.strip()), "")
        body: list[str] = []
        j = i + 1
        while j < len(lines):
            closing = lines[j].strip()
            if closing.startswith(fence[0] * len(fence)) and not closing.strip(fence[0]):
                break
            body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j])
            j += 1
        else:
            raise ValueError(f"{page}:{i + 1}: code block is never closed")
        blocks.append(
            Block(page, i + 1, language, "\n".join(body) + "\n", bool(_SKIP.match(previous)))
        )
        i = j + 1
    return blocks


def _pages() -> list[Path]:
    # The README's examples are the first code a user runs: they are checked too.
    return [*sorted(DOCS.rglob("*.md")), DOCS.parent / "README.md"]


def _python_blocks(page: Path) -> list[Block]:
    return [b for b in extract_blocks(page) if b.language in ("python", "py")]


def test_extractor_finds_blocks_languages_and_skip_markers(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n\n```python\nx = 1\n```\n\n<!-- skip: needs two processes -->\n\n"
        "```python\nraise RuntimeError\n```\n\n```bash\nmake docs\n```\n\n"
        "!!! note\n\n    ```python\n    y = x + 1\n    ```\n",
        encoding="utf-8",
    )
    blocks = extract_blocks(page)
    assert [(b.line, b.language, b.skipped) for b in blocks] == [
        (3, "python", False),
        (9, "python", True),
        (13, "bash", False),
        (19, "python", False),
    ]
    assert blocks[0].code == "x = 1\n"
    assert blocks[3].code == "y = x + 1\n"


def test_guides_have_runnable_examples() -> None:
    for name in ("index.md", "choosing.md", "recipes.md"):
        runnable = [b for b in _python_blocks(DOCS / name) if not b.skipped]
        assert runnable, f"expected runnable python blocks in docs/{name}, got none"


@pytest.mark.parametrize(
    "page",
    [p for p in _pages() if _python_blocks(p)],
    ids=lambda p: p.relative_to(DOCS.parent).as_posix(),
)
def test_page_code_blocks_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace: dict[str, object] = {"__name__": f"docs_{page.stem}"}
    for block in _python_blocks(page):
        if block.skipped:
            continue
        where = f"{page.relative_to(DOCS.parent)}:{block.line}"
        # Pad with newlines so that tracebacks and warnings give the page's line numbers.
        code = compile("\n" * block.line + block.code, str(page), "exec")
        try:
            exec(code, namespace)
        except Exception as error:
            raise AssertionError(f"code block at {where} failed: {error!r}") from error
