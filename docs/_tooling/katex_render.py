"""MkDocs hook: render the site's maths to HTML at build time with a pinned KaTeX.

pymdownx.arithmatex (generic mode) leaves every formula as ``\\(...\\)`` or ``\\[...\\]``
in a ``<span>``/``<div class="arithmatex">``. A renderer loaded by the browser from a
CDN leaves those delimiters on screen wherever the CDN is unreachable, so this hook
renders each formula with KaTeX (Node.js, run once per page) into the page itself and
ships KaTeX's stylesheet and fonts with the site: the pages need no script and no
network to show their maths. The search index keeps the TeX source (pages are
rewritten after indexing).

KaTeX comes from the npm registry (``npm pack``), pinned by version and checked
against the tarball's sha512; it is unpacked once under ``build/`` and reused. A
formula KaTeX rejects fails the build.

Only the docs build uses this file (it is listed in mkdocs.yml and excluded from the
site); the package does not depend on it.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import logging
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

log = logging.getLogger("mkdocs.plugins.sumto")

KATEX_VERSION = "0.19.1"
# ``npm view katex@0.19.1 dist.integrity``: the registry's sha512 of the tarball.
KATEX_INTEGRITY = "sha512-jG8uKntjSEcm2EpQOh0XturpPuuC9r3Sq5HLHdsFdWZT27E672SF19QEi+of0/YeOy15lDgRhKvr5614uRrEfA=="
# Where the stylesheet and fonts go in the site; katex.min.css refers to fonts/ next to it.
_SITE_DIR = "assets/katex"
_RENDERER = Path(__file__).with_name("katex_render.js")
_MATH = re.compile(r'<(?P<tag>span|div) class="arithmatex">(?P<body>.*?)</(?P=tag)>', re.DOTALL)
_DELIMITERS = {"span": (r"\(", r"\)"), "div": (r"\[", r"\]")}
# A formula in a table-of-contents title (a heading with maths), HTML-escaped text.
_TITLE_MATH = re.compile(r"\\\((.+?)\\\)")

_katex_dist: Path | None = None


def _integrity(path: Path) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()


def _fetch_katex(package: Path) -> None:
    """Unpack the pinned KaTeX release from the npm registry into ``package``."""
    npm = shutil.which("npm")
    if npm is None:
        raise PluginError(
            f"expected npm on PATH to fetch KaTeX {KATEX_VERSION} for the docs' maths, got "
            "none: install Node.js and npm (Debian: apt-get install -y npm)"
        )
    package.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=package.parent) as tmp:
        result = subprocess.run(
            [npm, "pack", f"katex@{KATEX_VERSION}", "--pack-destination", tmp, "--json"],
            cwd=tmp,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if result.returncode != 0:
            raise PluginError(
                f"npm pack katex@{KATEX_VERSION} exited with {result.returncode}: "
                f"{result.stderr.strip()[-2000:]}"
            )
        tarball = Path(tmp) / f"katex-{KATEX_VERSION}.tgz"
        got = _integrity(tarball)
        if got != KATEX_INTEGRITY:
            raise PluginError(
                f"expected katex-{KATEX_VERSION}.tgz with integrity {KATEX_INTEGRITY}, got {got}"
            )
        with tarfile.open(tarball) as archive:
            archive.extractall(tmp, filter="data")
        shutil.rmtree(package, ignore_errors=True)
        Path(tmp, "package").rename(package)
    log.info("KaTeX %s unpacked into %s", KATEX_VERSION, package)


def on_config(config: Any, **kwargs: Any) -> Any:
    """Make sure KaTeX is unpacked and link its stylesheet from every page."""
    global _katex_dist
    root = Path(config.config_file_path).resolve().parent
    package = root / "build" / f"katex-{KATEX_VERSION}"
    if not (package / "dist" / "katex.js").is_file():
        _fetch_katex(package)
    if shutil.which("node") is None:
        raise PluginError(
            "expected node on PATH to render the docs' maths with KaTeX, got none: install "
            "Node.js (Debian: apt-get install -y nodejs)"
        )
    _katex_dist = package / "dist"
    config.extra_css.append(f"{_SITE_DIR}/katex.min.css")
    return config


def on_files(files: Files, config: Any, **kwargs: Any) -> Files:
    """Add KaTeX's stylesheet and fonts to the site."""
    assert _katex_dist is not None  # set by on_config
    sources = [_katex_dist / "katex.min.css", *sorted((_katex_dist / "fonts").iterdir())]
    for source in sources:
        uri = f"{_SITE_DIR}/{source.relative_to(_katex_dist).as_posix()}"
        files.append(File.generated(config, uri, abs_src_path=str(source)))
    return files


def _render(items: list[dict[str, Any]], where: str) -> list[str]:
    assert _katex_dist is not None
    result = subprocess.run(
        ["node", str(_RENDERER), str(_katex_dist / "katex.js")],
        input=json.dumps(items),
        capture_output=True,
        text=True,
        timeout=120,
    )
    if result.returncode != 0:
        raise PluginError(f"{where}: KaTeX renderer failed: {result.stderr.strip()[-2000:]}")
    rendered = json.loads(result.stdout)
    for error in rendered["errors"]:
        index = int(error.split(":", 1)[0].removeprefix("item "))
        log.warning("%s: KaTeX cannot render %r: %s", where, items[index]["tex"], error)
    return [h if h is not None else "" for h in rendered["html"]]


def _toc_items(items: Any) -> Iterator[Any]:
    for item in items:
        yield item
        yield from _toc_items(item.children)


def on_page_content(html_text: str, page: Any, config: Any, **kwargs: Any) -> str:
    """Render the maths of the page's table of contents (headings with formulas)."""
    titled = [item for item in _toc_items(page.toc) if _TITLE_MATH.search(item.title)]
    formulas = [
        {"tex": html.unescape(m.group(1)).strip(), "display": False}
        for item in titled
        for m in _TITLE_MATH.finditer(item.title)
    ]
    if formulas:
        rendered = iter(_render(formulas, f"{page.file.src_uri} (table of contents)"))
        for item in titled:
            item.title = _TITLE_MATH.sub(lambda _: next(rendered), item.title)
    return html_text


def on_post_page(output: str, page: Any, config: Any, **kwargs: Any) -> str:
    """Replace every arithmatex formula of the page by KaTeX's HTML."""
    matches = list(_MATH.finditer(output))
    if not matches:
        return output
    where = page.file.src_uri
    items: list[dict[str, Any]] = []
    for match in matches:
        opening, closing = _DELIMITERS[match["tag"]]
        body = html.unescape(match["body"]).strip()
        if not (body.startswith(opening) and body.endswith(closing)):
            log.warning(
                "%s: expected a formula in %s...%s, got %r", where, opening, closing, body[:80]
            )
        else:
            body = body[len(opening) : -len(closing)]
        items.append({"tex": body.strip(), "display": match["tag"] == "div"})
    rendered = iter(_render(items, where))
    return _MATH.sub(
        lambda m: f'<{m["tag"]} class="arithmatex">{next(rendered)}</{m["tag"]}>', output
    )
