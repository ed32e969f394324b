"""Griffe extension: render the reST bits of sumto's docstrings as Markdown.

sumto's docstrings follow torch's conventions: Google sections, plus reST
``.. math::`` blocks, ``:math:`` roles and Sphinx cross-reference roles
(``:func:`project_sum```). mkdocstrings renders docstrings as Markdown, where those
would show up verbatim. Once the package is loaded this extension rewrites them:

* ``.. math::`` + indented block -> a ``$$ ... $$`` block (pymdownx.arithmatex),
* ``:math:`...``` -> ``$...$``,
* ``:func:`name```, ``:class:``, ``:meth:``, ... -> an autorefs link when ``name``
  is a sumto object (looked up relative to the docstring's object, its module and
  the ``sumto`` package), otherwise inline code. A module without a page of its
  own (option ``modules``: the modules that have one) links to the nearest
  enclosing module that has one, which re-exports its public names.

Only the docs build uses this file (it is listed in mkdocs.yml and excluded from
the site); the package does not depend on it.
"""

from __future__ import annotations

import re
from typing import Any

from griffe import (
    Alias,
    AliasResolutionError,
    CyclicAliasError,
    Extension,
    GriffeLoader,
    Module,
    Object,
)

_MATH_ROLE = re.compile(r":math:`([^`]+)`")
_XREF_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|exc|obj):`(~?)([^`<]+?)`")
_MATH_DIRECTIVE = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*(?P<inline>.*)$")


def _indent_of(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _math_blocks(text: str) -> str:
    """Replace every ``.. math::`` directive and its indented body by ``$$`` fences."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        match = _MATH_DIRECTIVE.match(lines[i])
        if match is None:
            out.append(lines[i])
            i += 1
            continue
        indent = match.group("indent")
        body: list[str] = [match.group("inline")] if match.group("inline") else []
        i += 1
        while i < len(lines) and (
            not lines[i].strip() or _indent_of(lines[i]) > len(indent.expandtabs())
        ):
            body.append(lines[i])
            i += 1
        while body and not body[-1].strip():
            body.pop()
        depth = min((_indent_of(b) for b in body if b.strip()), default=0)
        if out and out[-1].strip():
            out.append("")
        out.append(f"{indent}$$")
        out.extend(f"{indent}{b[depth:]}" if b.strip() else "" for b in body)
        out.append(f"{indent}$$")
        if i < len(lines) and lines[i].strip():
            out.append("")
    return "\n".join(out)


def _resolve(name: str, obj: Object | Alias, loader: GriffeLoader) -> str | None:
    """Dotted path of the sumto object ``name`` refers to from ``obj``, or None."""
    scopes = [obj.path]
    parent = obj.parent
    while parent is not None:
        scopes.append(parent.path)
        parent = parent.parent
    scopes.append("sumto")
    candidates = [name, *(f"{scope}.{name}" for scope in scopes)]
    for path in candidates:
        if not path.startswith("sumto"):
            continue
        try:
            # an alias of an object outside sumto (``import zipfile``) cannot be resolved
            loader.modules_collection[path].is_module  # noqa: B018
        except (KeyError, ValueError, AliasResolutionError, CyclicAliasError):
            continue
        return path
    return None


def _convert(text: str, obj: Object | Alias, loader: GriffeLoader, modules: tuple[str, ...]) -> str:
    text = _math_blocks(text)
    text = _MATH_ROLE.sub(lambda m: f"${m.group(1)}$", text)

    def xref(match: re.Match[str]) -> str:
        short, name = match.group(1) == "~", match.group(2).strip()
        label = name.rsplit(".", 1)[-1] if short else name
        path = _resolve(name, obj, loader)
        if path is not None and loader.modules_collection[path].is_module:
            while path not in modules and "." in path:
                path = path.rsplit(".", 1)[0]
        return f"[`{label}`][{path}]" if path else f"`{label}`"

    return _XREF_ROLE.sub(xref, text)


class RstRoles(Extension):
    """Rewrite reST maths and cross-reference roles in every sumto docstring.

    Args:
        modules: Dotted paths of the modules rendered on an API page.
    """

    def __init__(self, modules: list[str] | None = None) -> None:
        super().__init__()
        self.modules = tuple(modules or ["sumto"])

    def on_package(self, *, pkg: Module, loader: GriffeLoader, **kwargs: Any) -> None:
        if pkg.path != "sumto":
            return
        seen: set[int] = set()
        stack: list[Object | Alias] = [pkg]
        while stack:
            obj = stack.pop()
            if obj.is_alias or id(obj) in seen:
                continue
            seen.add(id(obj))
            if obj.docstring is not None:
                obj.docstring.value = _convert(obj.docstring.value, obj, loader, self.modules)
            stack.extend(obj.members.values())
