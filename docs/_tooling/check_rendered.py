"""MkDocs hook: fail the strict build when reST syntax survives into a rendered page.

Docstrings use reST maths and cross-reference roles, which ``rst_roles.py`` rewrites
as Markdown. Anything it misses (a new role, a malformed directive) would show up
verbatim on the site; this hook logs a warning for it, which ``mkdocs build --strict``
turns into an error.
"""

from __future__ import annotations

import logging
import re
from typing import Any

log = logging.getLogger("mkdocs.plugins.sumto")

# A directive, or a role whose backticks Markdown has turned into <code>.
_LEFTOVER = re.compile(
    r"\.\. [a-z-]+::|:(?:py:)?(?:func|class|meth|mod|attr|data|exc|obj|math|ref):(?:<code>|`)"
)


def on_page_content(html: str, page: Any, **kwargs: Any) -> str:
    """Warn about reST directives or roles left in the page's HTML."""
    for leftover in sorted({match.group(0) for match in _LEFTOVER.finditer(html)}):
        log.warning("%s: reST syntax left in the rendered page: %r", page.file.src_uri, leftover)
    return html
