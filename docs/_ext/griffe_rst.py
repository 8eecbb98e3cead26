"""Griffe extension for the API reference: the reST markup of the docstrings, as Markdown.

The docstrings are Google style but use reST roles (``:class:`LowRank```, ``:func:`~a.b```) and
``.. math::`` blocks. Before mkdocstrings renders them, this extension turns each role into a
cross-reference when the name resolves to an object of the package (optional, so a reference to
an object the reference does not render stays plain code, never a warning) and each math block
into an arithmatex ``$$ ... $$`` block. A docstring that a module completes at import time
(``f.__doc__ += ...``, or a decorator that fills in a ``{marker}`` line), which static analysis
cannot see, is read from the imported module. The source files are not changed.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|obj|exc|const):`(~?)([^`<>]+?)`")
_MATH = re.compile(r"^([ \t]*)\.\. math::[ \t]*$")


def _walk(obj: griffe.Object):
    yield obj
    for member in obj.members.values():
        if member.is_alias or not (member.is_module or member.is_class or member.is_function):
            if not member.is_alias and member.is_attribute:
                yield member
            continue
        yield from _walk(member)


def _resolve(name: str, obj: griffe.Object, collection: Any) -> str | None:
    scope = obj if (obj.is_class or obj.is_module) else obj.parent
    candidates = []
    while scope is not None:
        candidates.append(f"{scope.path}.{name}")
        scope = scope.parent
    candidates.append(name)
    for path in candidates:
        try:
            target = collection[path]
        except Exception:  # KeyError, alias resolution errors: not an object of the package
            continue
        try:  # where the object is defined: mkdocstrings registers that path for its heading
            return target.canonical_path
        except Exception:
            return path
    return None


def _roles(text: str, obj: griffe.Object, collection: Any) -> str:
    def replace(match: re.Match) -> str:
        short, name = match[1] == "~", match[2].strip().lstrip(".")
        shown = name.rsplit(".", 1)[-1] if short else name
        path = _resolve(name, obj, collection)
        if path is None:
            return f"`{shown}`"
        return f'<autoref optional identifier="{path}"><code>{shown}</code></autoref>'

    return _ROLE.sub(replace, text)


def _math(text: str) -> str:
    lines, out, i = text.split("\n"), [], 0
    while i < len(lines):
        m = _MATH.match(lines[i])
        if not m:
            out.append(lines[i])
            i += 1
            continue
        indent, body, i = m[1], [], i + 1
        while i < len(lines) and (
            not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > len(indent)
        ):
            body.append(lines[i])
            i += 1
        while body and not body[-1].strip():
            body.pop()
        depth = min(len(b) - len(b.lstrip()) for b in body if b.strip())
        out += [indent + "$$"] + [indent + b[depth:] for b in body if b.strip()]
        out += [indent + "$$", ""]
    return "\n".join(out)


_MARKER = re.compile(r"^[ \t]*\{\w+\}[ \t]*$", re.M)


def _runtime_docstrings(module: griffe.Module, loader: griffe.GriffeLoader) -> None:
    """Docstrings completed at import time, from the imported module.

    Static analysis sees neither ``name.__doc__ += ...`` nor a decorator that fills a marker line
    such as ``{usage}`` into the docstring; for those objects the docstring is read from the
    imported module (only such modules are imported).
    """
    if module.filepath is None or isinstance(module.filepath, list):
        return
    tree = ast.parse(module.filepath.read_text())
    names = {
        node.target.value.id
        for node in ast.walk(tree)
        if isinstance(node, ast.AugAssign)
        and isinstance(node.target, ast.Attribute)
        and node.target.attr == "__doc__"
        and isinstance(node.target.value, ast.Name)
    }
    names |= {
        name
        for name, member in module.members.items()
        if not member.is_alias
        and member.docstring is not None
        and _MARKER.search(member.docstring.value)
    }
    if not names:
        return
    live = importlib.import_module(module.path)
    for name in sorted(names):
        doc = inspect.getdoc(getattr(live, name, None))
        member = module.members.get(name)
        if doc and member is not None and not member.is_alias:
            member.docstring = griffe.Docstring(
                doc,
                parent=member,
                parser=loader.docstring_parser,
                parser_options=loader.docstring_options,
            )


class RstToMarkdown(griffe.Extension):
    """Rewrite reST roles and math blocks in every docstring of a loaded package."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        for obj in _walk(pkg):
            if obj.is_module:
                _runtime_docstrings(obj, loader)
            if obj.docstring is not None:
                value = _math(obj.docstring.value)
                obj.docstring.value = _roles(value, obj, loader.modules_collection)
